// The local status page: reads /api/status and /api/trend from the agent that serves it and draws
// them. Every text goes in through textContent (a tag name or an event is data, never markup), and
// every time shown is relative to the agent's clock ("now" in the answer), not the browser's.
"use strict";

const REFRESH_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "none";
  const s = Math.round(seconds);
  if (s < 120) return s + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function utc(ns) {
  return new Date(Math.floor(ns / 1e6)).toISOString().slice(11, 19);
}

function formatValue(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(4).replace(/\.?0+$/, "");
  return String(v);
}

function fill(list, pairs) {
  list.replaceChildren();
  for (const [k, v] of pairs) list.append(el("dt", {}, k), el("dd", {}, v));
}

// The last hour as a band (min to max per bucket) under the mean line, on the agent's time axis.
function sparkline(series, now, windowS) {
  const w = 180, h = 28, pad = 2;
  const node = svg("svg", { class: "trend", viewBox: `0 0 ${w} ${h}`, role: "img" });
  node.append(svg("rect", { class: "frame", x: 0.5, y: 0.5, width: w - 1, height: h - 1 }));
  const pts = series.points;
  if (!pts.length) return node;
  const t0 = now - windowS * 1e9;
  let lo = Infinity, hi = -Infinity;
  for (const p of pts) { lo = Math.min(lo, p[1]); hi = Math.max(hi, p[2]); }
  if (hi === lo) { hi += 1; lo -= 1; }
  const x = (t) => pad + ((t - t0) / (windowS * 1e9)) * (w - 2 * pad);
  const y = (v) => h - pad - ((v - lo) / (hi - lo)) * (h - 2 * pad);
  const top = pts.map((p) => `${x(p[0]).toFixed(1)},${y(p[2]).toFixed(1)}`);
  const bottom = pts.slice().reverse().map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`);
  node.append(svg("polygon", { class: "band", points: top.concat(bottom).join(" ") }));
  node.append(svg("polyline", { class: "line", points: pts.map((p) => `${x(p[0]).toFixed(1)},${y(p[3]).toFixed(1)}`).join(" ") }));
  node.setAttribute("aria-label", `${series.tag} ${formatValue(lo)} to ${formatValue(hi)}`);
  return node;
}

function renderHeader(st) {
  document.getElementById("agent").textContent = st.agent;
  document.getElementById("version").textContent = "v" + st.version;
  document.getElementById("updated").textContent = "as of " + utc(st.now) + " UTC";
  const badge = document.getElementById("health");
  const problems = document.querySelector("#problems ul");
  problems.replaceChildren();
  if (!st.health) {
    badge.className = "badge unknown";
    badge.textContent = "health unknown";
    problems.append(el("li", { class: "empty" }, "not reported by this agent"));
    return;
  }
  badge.className = "badge " + (st.health.ok ? "ok" : "bad");
  badge.textContent = st.health.ok ? "healthy" : "unhealthy";
  for (const p of st.health.problems) {
    problems.append(el("li", { class: "problem" }, `${p.kind}: ${p.subject}${p.detail ? " (" + p.detail + ")" : ""}`));
  }
  if (!st.health.problems.length) problems.append(el("li", { class: "empty" }, "no problems"));
}

function renderSummary(st) {
  const b = st.broker;
  fill(document.querySelector("#broker dl"), b.configured === false
    ? [["state", "not configured"]]
    : [["state", b.connected ? "connected" : "disconnected"], ["broker", b.broker],
       ["in flight", b.inflight], ["last error", b.last_error || "none"]]);
  const buf = st.buffer;
  fill(document.querySelector("#buffer dl"), [
    ["undelivered", `${buf.depth_readings} readings`],
    ["oldest undelivered", age(buf.oldest_undelivered_age_s)],
    ["size", `${(buf.size_bytes / 1048576).toFixed(1)} of ${(buf.max_bytes / 1048576).toFixed(0)} MiB`],
    ["quarantined", buf.quarantined],
  ]);
}

function renderDevices(st, trend) {
  const byDevice = new Map();
  for (const s of trend.series) {
    if (!byDevice.has(s.device)) byDevice.set(s.device, []);
    byDevice.get(s.device).push(s);
  }
  const box = document.getElementById("devices");
  box.replaceChildren();
  const names = Object.keys(st.devices).sort();
  if (!names.length) box.append(el("p", { class: "empty" }, "no devices configured"));
  for (const name of names) {
    const d = st.devices[name];
    const errors = Object.entries(d.driver.errors || {}).filter(([, n]) => n > 0);
    const total = errors.reduce((sum, [, n]) => sum + n, 0);
    const card = el("div", { class: "card device", "data-device": name },
      el("div", { class: "head" },
        el("h3", {}, name),
        el("span", { class: "badge state " + d.state }, d.state),
        el("span", { class: "meta" }, `${d.protocol} · ${d.profile}`)),
      el("p", { class: "errors " + (total ? "some" : "none") },
        total
          ? `${total} errors (${errors.map(([k, n]) => k + " " + n).join(", ")})` +
            (d.last_error ? ` · last: ${d.last_error}` : "")
          : "no errors"));
    const rows = el("tbody");
    for (const s of byDevice.get(name) || []) {
      const q = s.last ? s.last.quality : "bad";
      rows.append(el("tr", { "data-tag": s.tag },
        el("td", {}, s.tag),
        el("td", { class: "num value q-" + q }, formatValue(s.last && s.last.value) + (s.unit ? " " + s.unit : "")),
        el("td", {}, sparkline(s, trend.now, trend.window_s))));
    }
    if (!rows.children.length) rows.append(el("tr", {}, el("td", { class: "empty", colspan: 3 }, "no readings yet")));
    card.append(el("table", { class: "tags" },
      el("thead", {}, el("tr", {}, el("th", {}, "Tag"), el("th", {}, "Last value"), el("th", {}, "Last hour"))), rows));
    box.append(card);
  }
}

function renderAlarms(st) {
  const body = document.querySelector("#alarms tbody");
  body.replaceChildren();
  const active = (st.limits && st.limits.active) || [];
  for (const a of active) {
    body.append(el("tr", { class: "alarm" }, el("td", {}, a.device), el("td", {}, a.tag),
      el("td", {}, `${a.level} ${a.kind}`), el("td", {}, a.since_ts ? utc(a.since_ts) : "—"),
      el("td", { class: "num" }, formatValue(a.peak))));
  }
  if (!active.length) body.append(el("tr", {}, el("td", { class: "empty", colspan: 5 }, "no active alarms")));
}

function renderEvents(st) {
  const body = document.querySelector("#events tbody");
  body.replaceChildren();
  const events = st.recent_events || [];
  for (const e of events.slice(0, 15)) {
    body.append(el("tr", { class: "sev-" + e.severity }, el("td", {}, utc(e.ts)), el("td", {}, e.device),
      el("td", {}, e.kind), el("td", {}, e.summary)));
  }
  if (!events.length) body.append(el("tr", {}, el("td", { class: "empty", colspan: 4 }, "no events since the agent started")));
}

async function getJson(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const [st, trend] = await Promise.all([getJson("api/status"), getJson("api/trend")]);
    renderHeader(st);
    renderSummary(st);
    renderDevices(st, trend);
    renderAlarms(st);
    renderEvents(st);
    error.hidden = true;
    document.body.dataset.loaded = "true";
  } catch (exc) {
    error.textContent = "The agent does not answer: " + exc.message;
    error.hidden = false;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);

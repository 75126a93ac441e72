"""Rebuild the shipped models from simulator data, reproducibly (`python models/build.py`).

1. Generate fault-free training data (``data/train.yaml``, seed 100) and held-out
   evaluation data with every process fault kind (``data/eval.yaml``, seed 900: other
   devices, other random streams).
2. Train one PCA model per device kind through ``cleanroom-agent models train``.
3. Evaluate each through ``cleanroom-agent models evaluate`` (the agent's own scoring
   path) against the GMP rule baseline in ``data/limits-<kind>.yaml``, record the
   metrics in the manifest, write plots and the HTML evaluation report to ``eval/`` and
   refresh the generated part of each model card (``<id>.md``; intended use and limitations
   are written by hand). The models ship unapproved: a project's build is no site's release, so
   they run in shadow mode until a site's QA approves them (``cleanroom-agent models approve``).

Takes a few minutes (mostly simulating 10 bioreactor-days per device). Generated CSVs
go to a scratch folder (``--work``), not into the repository.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

KINDS = {
    "bioreactor": {
        "hours": 240,
        "period_s": 30,
        "signals": "temperature_c,ph,do_pct,agitation_rpm,air_flow_slpm,o2_flow_slpm,co2_flow_slpm,"
        "n2_flow_slpm,heater_pct,gas_supply_bar,vcd_e6_per_ml,viability_pct,weight_kg",
        "units": "temperature_c=degC,ph=pH,do_pct=%,agitation_rpm=rpm,air_flow_slpm=slpm,o2_flow_slpm=slpm,"
        "co2_flow_slpm=slpm,n2_flow_slpm=slpm,heater_pct=%,gas_supply_bar=bar,vcd_e6_per_ml=1e6/mL,"
        "viability_pct=%,weight_kg=kg",
        "train": [
            "--period",
            "30s",
            "--window",
            "60",
            "--raise-after",
            "2",
            "--clear-after",
            "10",
            "--envelope",
            "culture_day>=0.125",
        ],
    },
    "incubator": {
        "hours": 168,
        "period_s": 5,
        "signals": "temperature_c,co2_pct,rh_pct,co2_supply_bar,heater_pct,co2_valve_pct",
        "units": "temperature_c=degC,co2_pct=%,rh_pct=%,co2_supply_bar=bar,heater_pct=%,co2_valve_pct=%",
        "train": ["--period", "5s", "--window", "60", "--raise-after", "1", "--clear-after", "12"],
    },
    "particle_counter": {
        "hours": 168,
        "period_s": 60,
        "signals": "count_0_3um,count_0_5um,count_1_0um,count_5_0um,flow_fault,laser_fault",
        "units": "count_0_3um=counts,count_0_5um=counts,count_1_0um=counts,count_5_0um=counts,flow_fault=bit,"
        "laser_fault=bit",
        "train": ["--period", "60s", "--window", "10", "--raise-after", "1", "--clear-after", "3"],
    },
}
TRAIN_SEED = 100
EVAL_SEED = 900
CONFIRM_SEED = 950
"""A second draw of the evaluation scenario, scored once after the settings were fixed: the
settings were chosen while looking at the seed-900 results, so this run is the unbiased one."""


def generate(scenario: Path, kind: str, seed: int, out: Path) -> None:
    from simulators.process.generate import generate as run
    from simulators.process.scenario import load_scenario

    spec = KINDS[kind]
    scn = load_scenario(scenario)
    scn = scn.model_copy(update={"devices": [d for d in scn.devices if d.kind == kind]})
    run(scn, float(spec["hours"]), seed, out, period_s=float(spec["period_s"]))  # type: ignore[arg-type]


def derive_status(folder: Path) -> None:
    """Counter records as the agent commits them (``deploy/profiles/particle-counter-sim-modbus.yaml``):
    the sample status bits ``flow_fault`` and ``laser_fault`` (= not ``flow_ok`` / ``laser_ok``) ride in
    the same record as the counts, and the counts of a sample with either bit set are bad-quality
    readings (``bad_when``), so they are blanked here: the model is evaluated on what it would see."""
    for path in folder.glob("*.csv"):
        lines = path.read_text().splitlines()
        if path.name == "labels.csv" or "flow_fault" in lines[0]:
            continue
        head = lines[0].split(",")
        flow, laser = head.index("flow_ok"), head.index("laser_ok")
        counts = [i for i, h in enumerate(head) if h.startswith("count_")]
        out = [lines[0] + ",flow_fault,laser_fault"]
        for line in lines[1:]:
            row = line.split(",")
            bits = [1 - int(row[flow]), 1 - int(row[laser])]
            if any(bits):
                for i in counts:
                    row[i] = ""
            out.append(",".join(row + [str(b) for b in bits]))
        path.write_text("\n".join(out) + "\n")


def cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--log-level", "WARNING", "models", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout


def evaluate(model_id: str, kind: str, data: Path, *extra: str) -> str:
    """``models evaluate`` of a shipped model on one data folder, against the kind's GMP limits."""
    limits = HERE / "data" / f"limits-{kind.replace('_', '-')}.yaml"
    model = HERE / f"{model_id}.model.yaml"
    return cli("evaluate", "--model", str(model), "--data", str(data), "--limits", str(limits), *extra)


BEGIN, END = "<!-- generated by models/build.py -->", "<!-- end generated -->"


def card(model_id: str, metrics: dict[str, Any], confirm: dict[str, Any]) -> None:
    """Refresh the generated part of the model card from the manifest and the metrics."""
    from agent.transforms.anomaly.manifest import approval_summary, read_manifest

    m = read_manifest(HERE / f"{model_id}.model.yaml")
    p = m.provenance
    lines = [
        BEGIN,
        "## Model",
        f"- `{m.file}`, sha256 `{m.sha256}`, version {m.version}, method `{m.method}`, "
        f"trained {m.created} with cleanroom-edge {m.tool_version}.",
        f"- Signals ({len(m.signals)}): " + ", ".join(f"`{s.name}` ({s.unit})" for s in m.signals) + ".",
        f"- Resampled to {m.period:g} s slots; windows of {m.window} slots "
        f"({m.window * m.period / 60:g} min); "
        f"threshold {m.threshold:.4g}; alarm after {m.hysteresis.raise_after} window(s) over, cleared after "
        f"{m.hysteresis.clear_after} under {m.hysteresis.clear_ratio:g} x threshold; windows with less than "
        f"{m.min_completeness:.0%} good data are not scored.",
        f"- Drift bounds: mean shift {m.drift.mean_shift_sigma:g} σ, PSI {m.drift.psi:g}, "
        f"over {m.drift.window / 3600:g} h.",
        f"- Approval: {approval_summary(m)}. An unapproved model runs in shadow mode only, whatever its "
        "binding says.",
        "",
        "## Data",
        f"- Training: {p.rows} rows ({p.excluded_rows} excluded), {p.start} to {p.end} "
        f"(simulated time); {p.notes}.",
        f"- Fitting windows {m.validation.get('fit_windows')}, held-out normal windows "
        f"{m.validation.get('holdout_windows')} (time blocks spread over each run).",
        f"- Evaluation: {metrics['devices']} devices, {metrics['device_days']} device-days, "
        f"{metrics['faults']} faults "
        "on held-out seeds and devices (`data/eval.yaml`); rule baseline `data/limits-*.yaml`.",
        "",
        "## Metrics (held-out, event level)",
        f"- Precision {metrics['precision']}, recall {metrics['recall']}, **F1 {metrics['f1']}**; "
        "false alarms "
        f"{metrics['false_alarms']} = **{metrics['false_alarms_per_device_week']} per device-week**; "
        f"late alarms (within {metrics['grace_s'] / 60:g} min after a fault) {metrics['late_alarms']}.",
        f"- Detection delay median {metrics['delay_median_s']} s, p90 {metrics['delay_p90_s']} s; "
        f"GMP rule limits: median {metrics['rule_limits_delay_median_s']} s "
        f"({metrics['rule_limits_detected']} of {metrics['faults']} faults crossed a limit at all).",
        f"- On the {metrics['paired_faults']} faults a rule limit caught: model median delay "
        f"{metrics['paired_model_delay_median_s']} s vs rules {metrics['paired_rule_delay_median_s']} s; "
        f"model earlier on {metrics['model_earlier_than_rules']} of them.",
        f"- Confirmation on a fresh draw of the same scenario (seed {CONFIRM_SEED}, scored once after the "
        f"settings were fixed): {confirm['detected']} of {confirm['faults']} faults, precision "
        f"{confirm['precision']}, recall {confirm['recall']}, **F1 {confirm['f1']}**, "
        f"{confirm['false_alarms_per_device_week']} false alarms per device-week, paired delay "
        f"{confirm['paired_model_delay_median_s']} s vs rules {confirm['paired_rule_delay_median_s']} s.",
        "",
        "| fault kind | faults | detected | model delay median (s) | rule limits detected "
        "| rule delay median (s) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, v in metrics["per_kind"].items():
        lines.append(
            f"| {kind} | {v['faults']} | {v['detected']} | {v['delay_median_s']} | "
            f"{v['rule_limits_detected']} | {v['rule_limits_delay_median_s']} |"
        )
    plots = ", ".join(f"[{Path(x).stem}](eval/{model_id}/{Path(x).name})" for x in metrics.get("plots", []))
    lines += ["", f"Plots (score, threshold, faults shaded, alarms red): {plots}."]
    if "report" in metrics:
        link = f"eval/{model_id}/report/report.html"
        lines += [
            "",
            f"Evaluation report (signals with labelled and detected intervals, score, contributions of the "
            f"worst alarms, event- and row-level confusion counts): [{link}]({link}).",
        ]
    lines.append(END)
    path = HERE / f"{model_id}.md"
    text = path.read_text()
    head, rest = text.split(BEGIN, 1) if BEGIN in text else (text.rstrip() + "\n\n", END)
    tail = rest.split(END, 1)[1]
    path.write_text(head + "\n".join(lines) + tail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cleanroom-models")
    parser.add_argument("--kind", choices=sorted(KINDS), action="append", help="only these kinds")
    parser.add_argument("--skip-generate", action="store_true", help="reuse data already in --work")
    args = parser.parse_args()
    pooled: dict[str, dict[str, Any]] = {}
    for kind in args.kind or sorted(KINDS):
        spec = KINDS[kind]
        train_dir, eval_dir = args.work / kind / "train", args.work / kind / "eval"
        confirm_dir = args.work / kind / "confirm"
        if not args.skip_generate:
            generate(HERE / "data" / "train.yaml", kind, TRAIN_SEED, train_dir)
            generate(HERE / "data" / "eval.yaml", kind, EVAL_SEED, eval_dir)
            generate(HERE / "data" / "eval.yaml", kind, CONFIRM_SEED, confirm_dir)
        if kind == "particle_counter":
            for folder in (train_dir, eval_dir, confirm_dir):
                derive_status(folder)
        model_id = f"{kind.replace('_', '-')}-pca"
        cli(
            "train",
            "--data",
            str(train_dir),
            "--signals",
            str(spec["signals"]),
            "--units",
            str(spec["units"]),
            "--out",
            str(HERE),
            "--id",
            model_id,
            "--device-kind",
            kind,
            "--intended-use",
            (HERE / f"{model_id}.md").read_text().split("## Intended use", 1)[1].split("##", 1)[0].strip()
            if (HERE / f"{model_id}.md").is_file()
            else f"Advisory anomaly detection on {kind} signals; not for release or control decisions.",
            "--source",
            f"models/data/train.yaml seed {TRAIN_SEED} (generated by models/build.py)",
            "--notes",
            f"simulator data: models/data/train.yaml seed {TRAIN_SEED}; evaluated on models/data/eval.yaml "
            f"seed {EVAL_SEED}",
            # The shipped models keep the calibration they were built and evaluated with (models/README.md).
            "--calibration",
            "holdout",
            *spec["train"],  # type: ignore[misc]
        )
        metrics = evaluate(
            model_id,
            kind,
            eval_dir,
            "--plots",
            str(HERE / "eval" / model_id),
            "--report",
            str(HERE / "eval" / model_id / "report"),
            "--record",
            "--source",
            f"models/data/eval.yaml seed {EVAL_SEED} (generated by models/build.py)",
        )
        confirmed = evaluate(model_id, kind, confirm_dir)
        (HERE / "eval" / model_id / "metrics.json").write_text(metrics.replace(f"{HERE}/", "models/"))
        (HERE / "eval" / model_id / "confirm.json").write_text(confirmed.replace(f"{HERE}/", "models/"))
        summary, confirm = json.loads(metrics), json.loads(confirmed)
        card(model_id, summary, confirm)
        pooled[model_id] = {"eval": summary, "confirm": confirm}
        keys = ("faults", "detected", "f1", "false_alarms_per_device_week", "paired_model_delay_median_s")
        print(model_id, {k: summary[k] for k in keys}, "confirm", {k: confirm[k] for k in keys})
    if len(pooled) == len(KINDS):
        (HERE / "eval" / "summary.json").write_text(json.dumps(pool(pooled), indent=1) + "\n")
    return 0


def pool(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Event-level metrics over every shipped model's held-out faults together (each fault
    and each alarm counted once, whatever the model), per evaluation run."""
    out: dict[str, Any] = {}
    for run in ("eval", "confirm"):
        runs = [r[run] for r in results.values()]
        true, false = sum(m["true_alarms"] for m in runs), sum(m["false_alarms"] for m in runs)
        faults, detected = sum(m["faults"] for m in runs), sum(m["detected"] for m in runs)
        precision, recall = true / max(1, true + false), detected / max(1, faults)
        out[run] = {
            "models": sorted(results),
            "faults": faults,
            "detected": detected,
            "false_alarms": false,
            "device_weeks": round(sum(m["device_days"] for m in runs) / 7, 2),
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(2 * precision * recall / max(1e-9, precision + recall), 4),
            "per_model_f1": {k: r[run]["f1"] for k, r in results.items()},
        }
    return out


if __name__ == "__main__":
    sys.exit(main())

"""The historian recipes of docs/recipes/, applied to what a real agent published with
``mqtt.payload: flat`` (one module-scoped run, see tests/test_flat.py).

* InfluxDB through Telegraf: Telegraf is not installable here, so the test applies the
  ``mqtt_consumer`` + ``json_v2`` mapping that the recipe's telegraf.conf states (read from the
  recipe with tomllib: the doc and the test cannot drift) and checks the line protocol it yields.
  The mapping refuses any setting it does not implement, so the recipe cannot grow one untested.
* TimescaleDB / PostgreSQL: the recipe's SQL, as written, against a PostgreSQL server the test
  starts (initdb + pg_ctl, a Unix socket in a temporary folder, no TCP), loaded through psql.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import topic_matches_sub

from tests.test_flat import UNS_TOPIC, FlatRun, shared_flat_run

RECIPES = Path(__file__).resolve().parent.parent / "docs" / "recipes"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def fenced(doc: str, lang: str) -> list[str]:
    """The fenced blocks of ``lang`` in a recipe, in order."""
    return [body for kind, body in FENCE.findall((RECIPES / doc).read_text()) if kind == lang]


@pytest.fixture(scope="module")
def run() -> FlatRun:
    return shared_flat_run()


def samples(run: FlatRun) -> list[tuple[str, dict[str, Any]]]:
    prefix = UNS_TOPIC.split("/", 1)[0] + "/"
    return [(t, m) for t, m, _ in run.flat(prefix) if "values" in m]


# --------------------------------------------------------------------------- Telegraf json_v2

CONSUMER_KEYS = {
    "servers",
    "topics",
    "qos",
    "persistent_session",
    "client_id",
    "topic_tag",
    "data_format",
    "json_v2",
}
JSON_V2_KEYS = {"measurement_name", "timestamp_path", "timestamp_format", "tag", "field", "object"}
TIMESTAMP_FORMATS = {"unix_ns": 1, "unix_us": 1_000, "unix_ms": 1_000_000}
"""ns per unit of the formats the mapping reads."""
TYPES = {"int", "float", "string", "bool"}


def telegraf_consumer() -> dict[str, Any]:
    [toml] = fenced("influxdb-telegraf.md", "toml")
    [consumer] = tomllib.loads(toml)["inputs"]["mqtt_consumer"]
    unknown = set(consumer) - CONSUMER_KEYS
    assert not unknown, f"the recipe sets {unknown}, which this mapping does not apply: extend it first"
    assert consumer["data_format"] == "json_v2"
    for section in consumer["json_v2"]:
        assert set(section) <= JSON_V2_KEYS, set(section) - JSON_V2_KEYS
        assert section["timestamp_format"] in TIMESTAMP_FORMATS
        for tag in section.get("tag", []):
            assert set(tag) <= {"path", "rename"} and re.fullmatch(r"\w+", tag["path"])
        for field in section.get("field", []):
            assert set(field) <= {"path", "rename", "type"} and re.fullmatch(r"\w+", field["path"])
            assert field.get("type", "float") in TYPES
        for obj in section.get("object", []):
            assert set(obj) <= {"path", "disable_prepend_keys"} and re.fullmatch(r"\w+", obj["path"])
    return consumer


def _escape(text: str, chars: str) -> str:
    """Line protocol escaping: a backslash before each of ``chars`` (backslashes first)."""
    if "\\" in chars:
        text = text.replace("\\", "\\\\")
    for c in chars.replace("\\", ""):
        text = text.replace(c, "\\" + c)
    return text


def _field(value: Any, kind: str | None = None) -> str:
    """A field value as Telegraf's influx serializer writes it: json_v2 reads every JSON number as
    a float unless the field's ``type`` says otherwise."""
    if kind == "int":
        return f"{int(value)}i"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return format(Decimal(repr(float(value))).normalize(), "f")
    return '"' + _escape(str(value), '\\"') + '"'


def line_protocol(consumer: dict[str, Any], topic: str, msg: dict[str, Any]) -> list[str]:
    """What Telegraf makes of one message with the recipe's settings: one line per json_v2 section
    (none for a topic the consumer does not subscribe to)."""
    if not any(topic_matches_sub(sub, topic) for sub in consumer["topics"]):
        return []
    lines = []
    for section in consumer["json_v2"]:
        tags = {t.get("rename", t["path"]): str(msg[t["path"]]) for t in section.get("tag", [])}
        if consumer.get("topic_tag", "topic"):
            tags[consumer.get("topic_tag", "topic")] = topic
        fields = {
            f.get("rename", f["path"]): _field(msg[f["path"]], f.get("type"))
            for f in section.get("field", [])
        }
        for obj in section.get("object", []):
            prefix = "" if obj.get("disable_prepend_keys") else obj["path"] + "_"
            fields |= {prefix + k: _field(v) for k, v in msg[obj["path"]].items() if v is not None}
        ts = int(msg[section["timestamp_path"]]) * TIMESTAMP_FORMATS[section["timestamp_format"]]
        key = ",".join(
            [_escape(section["measurement_name"], ", ")]
            + [f"{_escape(k, ',= ')}={_escape(v, ',= ')}" for k, v in sorted(tags.items()) if v]
        )
        body = ",".join(f"{_escape(k, ',= ')}={v}" for k, v in sorted(fields.items()))
        lines.append(f"{key} {body} {ts}")
    return lines


def test_the_recipes_example_message_becomes_the_line_it_shows() -> None:
    """The recipe's own example: its JSON through its telegraf.conf gives its line protocol."""
    consumer = telegraf_consumer()
    [text] = fenced("influxdb-telegraf.md", "json")
    [expected] = [
        b for kind, b in FENCE.findall((RECIPES / "influxdb-telegraf.md").read_text()) if kind == ""
    ]
    msg = json.loads(text.replace("…", ""))
    assert line_protocol(consumer, "plant/basel/upstream/line-2/bioreactor-1", msg) == [expected.strip()]


def test_odd_values_are_escaped_and_typed_as_telegraf_does() -> None:
    consumer = telegraf_consumer()
    msg = {
        "ts": 5,
        "agent": "gw 1",
        "device": "br,1",
        "group": "a=b",
        "seq": 9,
        "n": 4,
        "values": {"state": 'say "hi"\\', "door": True, "t": 2, "bad": None},
    }
    [line] = line_protocol(consumer, "plant/s/a/l/br,1", msg)
    assert line == (
        "cleanroom,agent=gw\\ 1,device=br\\,1,group=a\\=b,topic=plant/s/a/l/br\\,1 "
        'door=true,seq=9i,state="say \\"hi\\"\\\\",t=2 5'
    )


def test_telegraf_turns_a_real_agents_samples_into_one_point_each(run: FlatRun) -> None:
    consumer = telegraf_consumer()
    got = samples(run)
    assert got, "the run published no flat sample"
    for topic, msg in got:
        [line] = line_protocol(consumer, topic, msg)
        key, body, ts = line.rsplit(" ", 2)
        assert int(ts) == msg["ts"]  # the acquisition time, to the nanosecond
        assert (
            key == f"cleanroom,agent={msg['agent']},device={msg['device']},group={msg['group']},topic={topic}"
        )
        fields = dict(f.split("=", 1) for f in body.split(","))
        assert fields.pop("seq") == f"{msg['seq']}i"
        assert set(fields) == {t for t, v in msg["values"].items() if v is not None}  # bad readings: no field
        for tag, text in fields.items():
            value = msg["values"][tag]
            if isinstance(value, bool):
                assert text == str(value).lower()
            elif isinstance(value, str):
                assert text == json.dumps(value)
            else:  # the short decimal the agent published, as a float field
                assert float(text) == value and len(text) <= len(repr(float(value)))
    # what the consumer does not subscribe to: events and retained per-tag messages have another shape
    others = [(t, m) for t, m, _ in run.flat("plant/") if "values" not in m]
    assert others and all(line_protocol(consumer, t, m) == [] for t, m in others)


# --------------------------------------------------------------------------- PostgreSQL


@dataclass
class Postgres:
    """A throwaway PostgreSQL server on a Unix socket in a temporary folder."""

    bindir: Path
    root: Path
    as_user: list[str]

    @property
    def data(self) -> Path:
        return self.root / "data"

    def psql(self, script: str) -> str:
        """Run ``script`` with psql (stopping at the first error); its unaligned output."""
        path = self.root / "script.sql"
        path.write_text(script)
        done = subprocess.run(
            [
                "psql",
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.root),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-f",
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"psql failed: {done.stderr}"
        return done.stdout

    def ctl(self, *args: str) -> None:
        done = subprocess.run(
            [*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            log = self.root / "server.log"
            pytest.fail(f"pg_ctl {args[-1]} failed: {done.stderr}\n{log.read_text() if log.exists() else ''}")


def start_postgres() -> Postgres:
    """initdb + pg_ctl from the machine's PostgreSQL, as the ``postgres`` user when run as root
    (the server refuses to run as root). No server: a failure saying so, never a skip."""
    initdbs = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not initdbs or shutil.which("psql") is None:
        pytest.fail(
            "PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb and psql): "
            "apt-get install postgresql"
        )
    root = Path(tempfile.mkdtemp(prefix="pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    pg = Postgres(initdbs[-1].parent, root, as_user)
    init = subprocess.run(
        [
            *as_user,
            str(pg.bindir / "initdb"),
            "-D",
            str(pg.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed: {init.stderr}")
    options = f"-k {root} -c listen_addresses='' -F"
    pg.ctl("-o", options, "-l", str(root / "server.log"), "-w", "-t", "60", "start")
    return pg


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    pg = start_postgres()
    try:
        yield pg
    finally:
        pg.ctl("-m", "immediate", "-w", "stop")
        shutil.rmtree(pg.root, ignore_errors=True)


def test_the_timescale_recipe_stores_every_reading_once(run: FlatRun, postgres: Postgres) -> None:
    schema, hypertable, batch = fenced("timescaledb.md", "sql")
    assert "create_hypertable" in hypertable  # the one statement that needs the extension
    postgres.psql(schema)
    postgres.psql(schema)  # the schema can be applied again (an upgrade, a restarted bridge)
    got = samples(run)
    capture = postgres.root / "capture.jsonl"
    capture.write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for _, m in got))
    load = batch.replace("'capture.jsonl'", f"'{capture}'")
    readings = sum(m["n"] for _, m in got)
    assert postgres.psql(load).strip() == str(readings)
    # at least once: the same messages again (a re-send after an outage) add nothing
    assert postgres.psql(load).strip() == "0"
    rows = postgres.psql(
        "SELECT device, tag, seq, coalesce(value::text, ''), coalesce(text_value, ''), quality,"
        " coalesce(reason, ''), (extract(epoch FROM ts) * 1000000)::bigint FROM readings ORDER BY seq;"
    )
    stored = {int(r.split("|")[2]): r.split("|") for r in rows.splitlines() if r}
    assert len(stored) == readings
    for _, msg in got:
        for i, (tag, value) in enumerate(msg["values"].items()):
            device, name, _, number, text, quality, reason, ts_us = stored[msg["seq"] + i]
            assert (device, name, int(ts_us)) == (msg["device"], tag, msg["ts"] // 1000)
            mark = msg.get("quality", {}).get(tag, {})
            assert (quality, reason) == (mark.get("quality", "good"), mark.get("reason") or "")
            if isinstance(value, bool):
                assert float(number) == int(value)
            elif isinstance(value, int | float):
                assert float(number) == value
            elif isinstance(value, str):
                assert text == value
            else:
                assert number == "" and quality == "bad"

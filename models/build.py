"""Rebuild the shipped models from simulator data, reproducibly (`python models/build.py`).

1. Generate fault-free training data (``data/train.yaml``, seed 100) and held-out
   evaluation data with every process fault kind (``data/eval.yaml``, seed 900: other
   devices, other random streams).
2. Train one PCA model per device kind through ``cleanroom-agent models train``.
3. Evaluate each through ``cleanroom-agent models evaluate`` (the agent's own scoring
   path) against the GMP rule baseline in ``data/limits-<kind>.yaml``, record the
   metrics in the manifest and write plots to ``eval/``.

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

HERE = Path(__file__).resolve().parent

KINDS = {
    "bioreactor": {
        "hours": 240,
        "period_s": 30,
        "signals": "temperature_c,ph,do_pct,agitation_rpm,air_flow_slpm,o2_flow_slpm,co2_flow_slpm,"
        "n2_flow_slpm,heater_pct,gas_supply_bar,vcd_e6_per_ml,viability_pct",
        "units": "temperature_c=degC,ph=pH,do_pct=%,agitation_rpm=rpm,air_flow_slpm=slpm,o2_flow_slpm=slpm,"
        "co2_flow_slpm=slpm,n2_flow_slpm=slpm,heater_pct=%,gas_supply_bar=bar,vcd_e6_per_ml=1e6/mL,"
        "viability_pct=%",
        "train": [
            "--period",
            "60s",
            "--window",
            "30",
            "--raise-after",
            "2",
            "--clear-after",
            "5",
            "--skip-start",
            "3h",
        ],
    },
    "incubator": {
        "hours": 168,
        "period_s": 5,
        "signals": "temperature_c,co2_pct,rh_pct,co2_supply_bar,heater_pct,co2_valve_pct",
        "units": "temperature_c=degC,co2_pct=%,rh_pct=%,co2_supply_bar=bar,heater_pct=%,co2_valve_pct=%",
        "train": ["--period", "10s", "--window", "30", "--raise-after", "2", "--clear-after", "6"],
    },
    "particle_counter": {
        "hours": 168,
        "period_s": 60,
        "signals": "count_0_3um,count_0_5um,count_1_0um,count_5_0um,flow_lpm",
        "units": "count_0_3um=counts,count_0_5um=counts,count_1_0um=counts,count_5_0um=counts,flow_lpm=L/min",
        "train": ["--period", "60s", "--window", "10", "--raise-after", "1", "--clear-after", "3"],
    },
}
TRAIN_SEED = 100
EVAL_SEED = 900


def generate(scenario: Path, kind: str, seed: int, out: Path) -> None:
    from simulators.process.generate import generate as run
    from simulators.process.scenario import load_scenario

    spec = KINDS[kind]
    scn = load_scenario(scenario)
    scn = scn.model_copy(update={"devices": [d for d in scn.devices if d.kind == kind]})
    run(scn, float(spec["hours"]), seed, out, period_s=float(spec["period_s"]))  # type: ignore[arg-type]


def cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--log-level", "WARNING", "models", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cleanroom-models")
    parser.add_argument("--kind", choices=sorted(KINDS), action="append", help="only these kinds")
    parser.add_argument("--skip-generate", action="store_true", help="reuse data already in --work")
    args = parser.parse_args()
    for kind in args.kind or sorted(KINDS):
        spec = KINDS[kind]
        train_dir, eval_dir = args.work / kind / "train", args.work / kind / "eval"
        if not args.skip_generate:
            generate(HERE / "data" / "train.yaml", kind, TRAIN_SEED, train_dir)
            generate(HERE / "data" / "eval.yaml", kind, EVAL_SEED, eval_dir)
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
            "--notes",
            f"simulator data: models/data/train.yaml seed {TRAIN_SEED}; evaluated on models/data/eval.yaml "
            f"seed {EVAL_SEED}",
            *spec["train"],  # type: ignore[misc]
        )
        metrics = cli(
            "evaluate",
            "--model",
            str(HERE / f"{model_id}.model.yaml"),
            "--data",
            str(eval_dir),
            "--limits",
            str(HERE / "data" / f"limits-{kind.replace('_', '-')}.yaml"),
            "--plots",
            str(HERE / "eval" / model_id),
            "--record",
        )
        (HERE / "eval" / model_id / "metrics.json").write_text(metrics.replace(f"{HERE}/", "models/"))
        summary = json.loads(metrics)
        keys = ("faults", "detected", "f1", "false_alarms_per_device_week", "delay_median_s")
        print(model_id, {k: summary[k] for k in keys})
    return 0


if __name__ == "__main__":
    sys.exit(main())

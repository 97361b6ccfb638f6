"""Benchmark of the default sweep: ``python -m qpexp.bench sweep [--quick] [--skip-nocache]``.

Runs ``qpexp sweep=frontier`` three times in a fresh folder and reports, for each:

- ``cold``: empty stage cache: the real cost of the sweep (wall time);
- ``rerun``: the same command again: every record is complete, nothing trains (the overhead floor);
- ``cache=false``: every point trains its own baseline and pruned model, for comparison.

Per run: wall seconds; ``train_s``, the training actually done (sum over points of
``train_seconds/<stage>`` for the stages that were not cache hits); ``train_s_no_cache``, what the
same points would train without sharing (sum of all their ``train_seconds/*``); and
``overhead_per_point_s`` = (wall x n_jobs - train_s) / points: per point, the worker time spent on
anything but training (process start-up and imports, Hydra, W&B, data, evaluation, measuring,
waiting on a lock or for the last job). ``--quick`` cuts every training budget (baseline 30 epochs,
prune 3 x 5, QAT 5) to see the overheads in a couple of minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qpexp.bench import emit

QUICK = ["baseline.epochs=30", "prune.finetune_epochs=5", "quant.epochs=5"]
STAGES = ("baseline", "prune", "qat")


def run_sweep(workdir: Path, name: str, extra: list[str], timeout: int) -> dict:
    sweep_dir = workdir / name
    args = [sys.executable, "-m", "qpexp.cli", "sweep=frontier", f"hydra.sweep.dir={sweep_dir}", *extra]
    load0 = os.getloadavg()[0]
    start = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    paths = list(sweep_dir.glob("*/record.json"))
    records = [json.loads(p.read_text()) for p in paths]
    ok = [r for r in records if r.get("status") == "ok"]
    fresh = [r for r, p in zip(records, paths) if r.get("status") == "ok" and p.stat().st_mtime >= start]
    n_jobs = int(next((a.split("=", 1)[1] for a in extra if a.startswith("hydra.launcher.n_jobs=")), 2))
    trained = sum(
        r.get(f"train_seconds/{s}", 0.0) for r in fresh for s in STAGES if r.get(f"cache/{s}_hit") is False
    )  # a record kept from an earlier run trained nothing now
    unshared = sum(r.get(f"train_seconds/{s}", 0.0) for r in ok for s in STAGES)
    points = len(records)
    summary = {}
    if (sweep_dir / "frontier.json").exists():
        summary = json.loads((sweep_dir / "frontier.json").read_text())
    return {
        "run": name,
        "points": points,
        "points_run": len(fresh),
        "failed": points - len(ok),
        "wall_s": wall,
        "train_s": trained,
        "train_s_no_cache": unshared,
        "pipeline_s": sum(r.get("seconds/total", 0.0) for r in fresh),
        "overhead_per_point_s": (wall * n_jobs - trained) / max(points, 1),
        "load_1min": f"{load0:.1f}->{os.getloadavg()[0]:.1f}",
        "best_1pt": summary.get("best_ratio_within_1pt"),
        "best_2pt": summary.get("best_ratio_within_2pt"),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m qpexp.bench sweep", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny training budgets (overheads only)")
    p.add_argument("--skip-nocache", action="store_true", help="skip the cache=false run (the slowest)")
    p.add_argument("--dir", help="work folder (default: a fresh temporary one)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per sweep")
    a, extra = p.parse_known_args()
    extra = [*(QUICK if a.quick else []), "logger=wandb", *extra]
    workdir = Path(a.dir or tempfile.mkdtemp(prefix="qpexp-bench-sweep-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cache = f"cache_dir={workdir / 'cache'}"
    rows = [run_sweep(workdir, "cold", [cache, *extra], a.timeout)]
    rows.append(run_sweep(workdir, "cold", [cache, *extra], a.timeout) | {"run": "rerun"})
    if not a.skip_nocache:
        rows.append(
            run_sweep(workdir, "nocache", ["cache=false", *extra], a.timeout) | {"run": "cache=false"}
        )
    cold = rows[0]
    figures = {
        "sweep_wall_s": cold["wall_s"],
        "sweep_train_s": cold["train_s"],
        "sweep_overhead_per_point_s": cold["overhead_per_point_s"],
        "rerun_wall_s": rows[1]["wall_s"],
        "points": cold["points"],
        "quick": a.quick,
        "cpus": os.cpu_count(),
        "best_ratio_within_1pt": cold["best_1pt"],
        "best_ratio_within_2pt": cold["best_2pt"],
        "workdir": str(workdir),
    }
    if not a.skip_nocache:
        figures["nocache_wall_s"] = rows[2]["wall_s"]
        figures["cache_speedup"] = rows[2]["wall_s"] / cold["wall_s"]
    title = (
        f"qpexp sweep=frontier{' --quick' if a.quick else ''}: {cold['points']} points, {os.cpu_count()} cpus"
    )
    emit(rows, figures, title)


if __name__ == "__main__":
    main()

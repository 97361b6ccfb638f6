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

``--profile``: where a point's time goes on a warm worker. The same sweep runs in ONE process with
Hydra's basic launcher (every point after the first in an already warm process, as in a reused loky
worker), with timers around the pipeline's parts; prints per part the seconds per point over the
warm points (all but the first), in CPU seconds of the process (robust on a shared machine; W&B's
own service process is not in them) and wall seconds, and the overhead per point: the point's time
(its share of the sweep's time outside the points included) minus its training (``fit``, what
``train_seconds/*`` counts).
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
from qpexp.cli import main as qpexp_main
from qpexp.run.status import ACCURACY_STANDS

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
    ok = [r for r in records if r.get("status") in ACCURACY_STANDS]  # finished (deployed or not)
    fresh = [r for r, p in zip(records, paths) if r in ok and p.stat().st_mtime >= start]
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


# (label, module, attribute): the parts timed by ``--profile``; "a > b" is a part inside part a
PARTS = [
    ("point (run_job)", "qpexp.cli", "run_job"),
    ("Hydra job (setup + point)", "hydra._internal.core_plugins.basic_launcher", "run_job"),
    ("validate config", "qpexp.run.schema", "validate"),
    ("validate config", "qpexp.run.pipeline", "validate"),
    ("complete/base record (git, versions)", "qpexp.run.pipeline", "complete_record"),
    ("complete/base record (git, versions)", "qpexp.run.pipeline", "base_record"),
    ("W&B init (make_tracker)", "qpexp.track.loggers", "make_tracker"),
    ("W&B summary, layers, finish", "qpexp.track.loggers", "Tracker.summary"),
    ("W&B summary, layers, finish", "qpexp.track.loggers", "Tracker.log_layers"),
    ("W&B summary, layers, finish", "qpexp.track.loggers", "Tracker.finish"),
    ("write record", "qpexp.run.pipeline", "write_record"),
    ("pipeline.run", "qpexp.run.pipeline", "Pipeline.run"),
    ("run > data", "qpexp.run.pipeline", "Pipeline.data"),
    ("run > build model", "qpexp.run.pipeline", "make_model"),
    ("run > quantize_ (fx)", "qpexp.run.pipeline", "quantize_"),
    ("run > stages", "qpexp.run.pipeline", "Pipeline._stage"),
    ("stages > cache load", "qpexp.run.cache", "Entry.load_or_discard"),
    ("stages > cache save", "qpexp.run.cache", "Entry.save"),
    ("stages > fit (= training time)", "qpexp.run.pipeline", "fit"),
    ("fit > Trainer()", "lightning.pytorch", "Trainer.__init__"),
    ("fit > checkpoint writes", "lightning.pytorch.callbacks", "ModelCheckpoint._save_checkpoint"),
    ("fit > validation loops", "lightning.pytorch.loops.evaluation_loop", "_EvaluationLoop.run"),
    ("stages > evaluate val+test", "qpexp.run.pipeline", "evaluate"),
    ("stages > measure", "qpexp.run.pipeline", "Pipeline.measure"),
    ("measure > MACs (FlopCounterMode)", "qpexp.run.pipeline", "model_macs"),
    ("sweep start: check every point", "qpexp.sweep.callbacks", "FrontierCallback.on_multirun_start"),
    ("sweep end: frontier files, W&B run", "qpexp.sweep.callbacks", "FrontierCallback.on_multirun_end"),
]


def profile_child() -> None:
    """Run ``qpexp`` (argv after the output path) in this process with timers on :data:`PARTS`;
    write ``[{part: [seconds, calls]}, ...]`` (one dict per point, then the sweep's other time)."""
    import functools
    import importlib

    out = sys.argv[1]
    points: list[dict] = []
    outside: dict = {}

    def timed(label, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if label == PARTS[0][0]:
                points.append({})
            whole_sweep = label.startswith("sweep ")
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                acc = points[-1] if points and not whole_sweep else outside
                w, cpu, n = acc.get(label, (0.0, 0.0, 0))
                acc[label] = (w + time.perf_counter() - t, cpu + time.process_time() - c, n + 1)

        return wrapper

    for label, mod, attr in PARTS:
        owner = importlib.import_module(mod)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, timed(label, getattr(owner, name)))
    sys.argv = ["qpexp", *sys.argv[2:]]

    t0, c0 = time.perf_counter(), time.process_time()
    try:
        qpexp_main()
    finally:
        outside["sweep"] = (time.perf_counter() - t0, time.process_time() - c0, 1)
        Path(out).write_text(json.dumps([*points, outside]))


def run_profile(workdir: Path, extra: list[str], timeout: int) -> tuple[list[dict], dict]:
    out = workdir / "profile.json"
    sweep_dir = workdir / "profile"
    args = [sys.executable, "-c", "from qpexp.bench.sweep import profile_child; profile_child()", str(out)]
    args += ["sweep=frontier", f"hydra.sweep.dir={sweep_dir}", "hydra/launcher=basic", *extra]
    proc = subprocess.run(args, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    *points, outside = json.loads(out.read_text())
    warm = points[1:] or points
    point = PARTS[0][0]
    fit = "stages > fit (= training time)"

    def per_point(pts, label, i):  # i: 0 wall, 1 CPU, 2 calls
        return sum(p.get(label, (0.0, 0.0, 0))[i] for p in pts) / max(len(pts), 1)

    rows = [
        {
            "part": label,
            "cpu s/point": per_point(warm, label, 1),
            "wall s/point": per_point(warm, label, 0),
            "calls/point": per_point(warm, label, 2),
            "first point cpu s": per_point(points[:1], label, 1),
        }
        for label in dict.fromkeys(label for label, _, _ in PARTS)
        if not label.startswith("sweep ")
    ]
    # the sweep's time outside the points: Hydra's job setup between points, multirun start and end
    between = [outside["sweep"][i] - sum(p.get(point, (0.0, 0.0, 0))[i] for p in points) for i in (0, 1)]
    n = max(len(points), 1)
    for label in ("sweep start: check every point", "sweep end: frontier files, W&B run"):
        w, cpu, _ = outside.get(label, (0.0, 0.0, 0))
        rows.append({"part": label + " (/ points)", "cpu s/point": cpu / n, "wall s/point": w / n})
    rows.append(
        {
            "part": "outside points (all of the above, Hydra)",
            "cpu s/point": between[1] / n,
            "wall s/point": between[0] / n,
        }
    )
    overhead = [p.get(point, (0.0, 0.0))[i] - p.get(fit, (0.0, 0.0))[i] for p in warm for i in (1,)]
    figures = {
        "profile_points": len(points),
        "profile_overhead_per_point_cpu_s": sum(overhead) / len(overhead) + between[1] / n,
        "profile_overhead_per_point_wall_s": per_point(warm, point, 0)
        - per_point(warm, fit, 0)
        + between[0] / n,
        "profile_fit_per_point_cpu_s": per_point(warm, fit, 1),
        "profile_sweep_wall_s": outside["sweep"][0],
    }
    return rows, figures


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m qpexp.bench sweep", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny training budgets (overheads only)")
    p.add_argument("--skip-nocache", action="store_true", help="skip the cache=false run (the slowest)")
    p.add_argument("--dir", help="work folder (default: a fresh temporary one)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per sweep")
    p.add_argument("--profile", action="store_true", help="where a point's time goes on a warm worker")
    a, extra = p.parse_known_args()
    extra = [*(QUICK if a.quick else []), "logger=wandb", *extra]
    workdir = Path(a.dir or tempfile.mkdtemp(prefix="qpexp-bench-sweep-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cache = f"cache_dir={workdir / 'cache'}"
    if a.profile:
        rows, figures = run_profile(workdir, [f"cache_dir={workdir / 'profile_cache'}", *extra], a.timeout)
        figures |= {"quick": a.quick, "workdir": str(workdir)}
        emit(
            rows, figures, f"qpexp sweep=frontier{' --quick' if a.quick else ''}: one warm process, per point"
        )
        return
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

"""The frontier aggregation on hand-made records: rows, Pareto flags, seed means, summary numbers,
failed and missing points, reference fronts, the plot, the W&B run and the command line."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import wandb_offline_runs

from qpexp.callbacks import worker_threads
from qpexp.frontier import hypervolume, hypervolume_above, pareto_flags, read_reference, write_frontier

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DENSE_BITS = 166_720


def _config(bits, ratio, scope, seed, group="g", kind="wandb"):
    return {
        "seed": seed,
        "threads": None,
        "cache_dir": "outputs/cache",
        "data": {"name": "mnist1d", "seed": seed},
        "model": {"_target_": "qpexp.models.cnn1d", "channels": 25},
        "baseline": {"epochs": 150, "lr": 0.01},
        "trainer": {"deterministic": False},
        "prune": {"ratio": ratio, "scope": scope, "structure": "unstructured"},
        "quant": {"bits_w": bits, "bits_a": 8},
        "logger": {"kind": kind, "project": "qpexp-test", "group": group, "mode": None},
    }


def _record(bits, ratio, scope, seed, acc, cr, base_acc, bops=None, **kw):
    return {
        "status": "ok",
        "deploy/checks": "int+onnx",  # deployed and checked: the status stands as ok
        "seed": seed,
        "config": _config(bits, ratio, scope, seed, **kw),
        "baseline/val_acc": base_acc,
        "baseline/test_acc": base_acc,
        "final/test_acc": acc,
        "final/val_acc": acc,
        "final/compression_ratio": cr,
        "final/size_bits": DENSE_BITS / cr,
        "dense/size_bits": DENSE_BITS,
        "final/sparsity": ratio,
        "final/macs": 1000,
        "final/bops": bops if bops is not None else 1000 * bits * 8,
        "prune/targets": [0.2, ratio],
        "cache/baseline_hit": True,
    }


def _write(root: Path, name: str, rec: dict | None, hydra_cfg: dict | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    if rec is not None:
        (d / "record.json").write_text(json.dumps(rec))
    if hydra_cfg is not None:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "config.yaml").write_text(json.dumps(hydra_cfg))  # JSON is YAML
    return d


def wait_wandb_runs(root: Path, n: int, timeout: float = 60.0) -> list[dict]:
    """The offline runs under ``root`` once W&B's service has written them (it writes asynchronously
    after ``finish`` returns; a process's exit waits for it)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = wandb_offline_runs(root)
        if (len(runs) >= n and all(r["job_type"] for r in runs)) or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _brute_pareto(points, lower_is_better=False):
    """Written from the definition: p is dominated when some q is at least as good in both objectives
    and not identical to it (so better in one); of identical points only the first counts."""
    sign = -1 if lower_is_better else 1
    valid = [(i, (a, sign * x)) for i, (a, x) in enumerate(points) if a is not None and x is not None]
    flags, seen = [False] * len(points), set()
    for i, p in valid:
        dominated = any(q[0] >= p[0] and q[1] >= p[1] and q != p for _, q in valid)
        flags[i] = not dominated and p not in seen
        seen.add(p)
    return flags


@pytest.fixture
def sweep(tmp_path):
    """Two seeds of a 2x2 grid, one failed point and one killed (record-less) point."""
    root = tmp_path / "sweep"
    accs = {(4, 0.5): 0.93, (4, 0.8): 0.85, (2, 0.5): 0.80, (2, 0.8): 0.60}
    ratios = {(4, 0.5): 9.0, (4, 0.8): 12.0, (2, 0.5): 13.0, (2, 0.8): 16.0}
    for seed, base in ((0, 0.94), (1, 0.96)):
        for (bits, ratio), acc in accs.items():
            rec = _record(bits, ratio, "global", seed, acc + 0.01 * seed, ratios[(bits, ratio)], base)
            _write(root, f"quant.bits_w={bits},prune.ratio={ratio},seed={seed}", rec)
    failed = {
        "status": "failed",
        "error": "RuntimeError: fail_at=qat: deliberate failure (test hook)",
        "config": _config(8, 0.5, "layer", 0),
    }
    _write(root, "quant.bits_w=8,prune.ratio=0.5,prune.scope=layer", failed)
    _write(
        root, "quant.bits_w=8,prune.ratio=0.8,prune.scope=layer", None, hydra_cfg=_config(8, 0.8, "layer", 0)
    )
    return root


def test_csv_rows_flags_and_summary(sweep):
    summary = write_frontier([sweep], sweep, wandb=False, quiet=True)
    rows = _rows(sweep / "frontier.csv")
    runs = [r for r in rows if r["point"] == "run"]
    dense = [r for r in rows if r["point"] == "dense"]
    assert len(runs) == 10  # 8 ok + 1 failed + 1 missing: nothing dropped
    # every record key is a column, nested ones flattened; lists kept as JSON
    for r in runs:
        rec_path = sweep.parent / r["run_dir"] / "record.json"
        if not rec_path.exists():
            assert r["status"] == "missing" and "no record.json" in r["error"]
            assert r["quant.bits_w"] == "8" and r["prune.scope"] == "layer"  # axes from .hydra/config.yaml
            continue
        rec = json.loads(rec_path.read_text())
        assert r["status"] == rec["status"]
        if rec["status"] == "failed":
            assert "fail_at=qat" in r["error"] and r["pareto"] == "False"
            continue
        assert float(r["final/test_acc"]) == rec["final/test_acc"]
        assert float(r["final/compression_ratio"]) == rec["final/compression_ratio"]
        assert r["config.quant.bits_w"] == str(rec["config"]["quant"]["bits_w"])
        assert json.loads(r["prune/targets"]) == rec["prune/targets"]
        assert r["quant.bits_w"] == str(rec["config"]["quant"]["bits_w"]) and r["seed"] == str(rec["seed"])
    # data.seed follows seed: not an axis; the dense reference: one row per baseline (seed)
    assert "data.seed" not in rows[0] and "config.data.seed" in rows[0]
    assert sorted(float(r["final/test_acc"]) for r in dense) == [0.94, 0.96]
    assert all(float(r["final/compression_ratio"]) == 1.0 and r["quant.bits_w"] == "32" for r in dense)
    assert all(float(r["final/bops"]) == 1000 * 32 * 32 for r in dense)
    # Pareto flags: brute force over the ok rows
    ok = [r for r in rows if r["status"] == "ok"]
    for flag, col, lower in (
        ("pareto", "final/compression_ratio", False),
        ("pareto_bops", "final/bops", True),
    ):
        expect = _brute_pareto([(float(r["final/test_acc"]), float(r[col])) for r in ok], lower)
        assert [r[flag] == "True" for r in ok] == expect, flag
    # summary: dense = mean of the two baselines; configs are seed means
    assert summary["points"] == 10 and summary["points_ok"] == 8 and summary["points_failed"] == 2
    assert summary["dense_acc"] == pytest.approx(0.95) and summary["dense_n"] == 2
    # w4 global 0.5 has mean 0.935: within 2 points of 0.95, not within 1 (only dense itself is)
    assert summary["best_ratio_within_1pt"] == pytest.approx(1.0)
    assert summary["best_ratio_within_2pt"] == pytest.approx(9.0)
    assert summary["best_within_2pt/config"] == "w4 global 0.5" and summary["best_within_2pt/n"] == 2
    assert len(summary["failed"]) == 2
    saved = json.loads((sweep / "frontier.json").read_text())
    assert saved["hypervolume"] == pytest.approx(summary["hypervolume"])
    front = {f["config"]: f for f in summary["front"]}
    w4 = front["w4 global 0.5"]
    assert w4["n"] == 2 and w4["acc"] == pytest.approx(0.935)
    assert w4["acc_std"] == pytest.approx(math.sqrt(2 * 0.005**2))  # sample std of 0.93, 0.94


def test_within_points_and_hypervolume_by_hand():
    # dense 0.95: 0.94 is within 1 point (inclusive), 0.93 within 2
    pts = [(0.95, 1.0), (0.94, 8.0), (0.93, 16.0), (0.50, 64.0)]
    hv = hypervolume(pts, 0.95, window=0.05)
    # y_ref = 90: [0,3] x [90,94] + [3,4] x [90,93]; 0.50 lies below the window, ratio 1 adds nothing
    assert hv == pytest.approx(3 * 4 + 1 * 3)
    assert hypervolume([(0.99, 2.0)], 0.95) == pytest.approx(1 * 9)
    assert hypervolume([], 0.95) == 0.0


def test_hypervolume_staircase_by_hand():
    # x = log2 ratio, y = acc points; reference (0, 86): a 3-step staircase, one point dominated
    pts = [(0.94, 4.0), (0.92, 16.0), (0.90, 8.0), (0.88, 2.0)]
    # (0.90, 8x) and (0.88, 2x) lie under (0.92, 16x): [0,2] x [86,94] + [2,4] x [86,92]
    assert hypervolume_above(pts, 0.86) == pytest.approx(2 * 8 + 2 * 6)
    assert hypervolume_above([(0.90, 2.0), (0.88, 8.0)], 0.86) == pytest.approx(1 * 4 + 2 * 2)
    # the relative one is the same area above the front's own dense - 5 points
    assert hypervolume(pts, 0.95) == pytest.approx(2 * 4 + 2 * 2)


def test_relative_and_absolute_hypervolume_in_summary(tmp_path):
    root = tmp_path / "s"
    _write(root, "a", _record(4, 0.5, "global", 0, 0.94, 4.0, 0.95, kind="none"))
    _write(root, "b", _record(2, 0.5, "global", 0, 0.92, 16.0, 0.95, kind="none"))
    ref = tmp_path / "peer.csv"
    ref.write_text(
        "method,target_sparsity,bits_w,test_acc,compression_ratio\n"
        "fp32_dense,0,32,0.91,1\nqat,0,4,0.90,2\nprune+qat,0.5,4,0.88,8\n"
    )
    s = write_frontier([root], tmp_path / "out", reference=ref, wandb=False, quiet=True)
    # relative: each front above its own dense - 5 points (qpexp 90, peer 86)
    assert s["hypervolume"] == s["hypervolume_relative"] == pytest.approx(2 * 4 + 2 * 2)
    assert s["reference/hypervolume_relative"] == pytest.approx(1 * 4 + 2 * 2)
    # absolute: both above one shared point, ratio 1 and min(0.95, 0.91) - 0.05 = 0.86
    assert s["hv_reference_point"] == {"compression_ratio": 1.0, "test_acc": pytest.approx(0.86)}
    assert s["hypervolume_absolute"] == pytest.approx(2 * 8 + 2 * 6)
    assert s["reference/hypervolume_absolute"] == pytest.approx(1 * 4 + 2 * 2)
    saved = json.loads((tmp_path / "out" / "frontier.json").read_text())
    assert saved["hv_reference_point"]["test_acc"] == pytest.approx(0.86)
    # a shared point given explicitly (e.g. to compare several invocations)
    s2 = write_frontier([root], tmp_path / "out2", wandb=False, quiet=True, hv_reference_acc=0.9)
    assert s2["hypervolume_absolute"] == pytest.approx(2 * 4 + 2 * 2)
    assert "reference/hypervolume_absolute" not in s2


def test_pareto_ties_by_hand():
    # a tie in accuracy: the higher ratio dominates (the example)
    assert pareto_flags([(0.90, 4.0), (0.90, 8.0)]) == [False, True]
    # a tie in ratio: the higher accuracy dominates
    assert pareto_flags([(0.90, 8.0), (0.92, 8.0), (0.95, 2.0)]) == [False, True, True]
    # identical points count once: the first of them is flagged
    assert pareto_flags([(0.9, 8.0), (0.9, 8.0), (0.8, 16.0), (0.9, 8.0)]) == [True, False, True, False]
    # BOPs (lower is better): equal acc and fewer BOPs dominates; a duplicate counts once
    bops = [(0.9, 100.0), (0.9, 50.0), (0.95, 200.0), (0.95, 200.0), (0.95, 300.0)]
    assert pareto_flags(bops, higher_better_x=False) == [False, True, True, False, False]
    assert pareto_flags([(None, 8.0), (0.9, 8.0), (0.9, 8.0)]) == [False, True, False]


def test_pareto_flags_random_against_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        pts = [
            (rng.choice([0.5, 0.7, 0.9, rng.random()]), rng.choice([1.0, 4.0, rng.random() * 20]))
            for _ in range(9)
        ]
        assert pareto_flags(pts) == _brute_pareto(pts)
        assert pareto_flags(pts, higher_better_x=False) == _brute_pareto(pts, lower_is_better=True)
    assert pareto_flags([(None, None), (0.9, 2.0)]) == [False, True]


def test_png_and_reference_front(sweep, tmp_path):
    ref = tmp_path / "peer.csv"
    ref.write_text(
        "method,scope,target_sparsity,bits_w,bits_a,n,test_acc,acc_std,compression_ratio\n"
        "fp32_dense,none,0,32,32,3,0.915,0.005,1\n"
        "qat,none,0,4,8,3,0.9077,0.0136,6.4582\n"
        "prune+qat,global,0.5,4,8,3,0.8987,0.0057,7.9614\n"
        "prune+qat,global,0.75,2,8,3,0.373,0.03,16.3\n"
    )
    r = read_reference(ref)
    assert r["dense_acc"] == pytest.approx(0.915) and len(r["points"]) == 4
    summary = write_frontier([sweep], tmp_path / "out", reference=ref, wandb=False, quiet=True)
    png = (tmp_path / "out" / "frontier.png").read_bytes()
    assert png[:8] == PNG_MAGIC
    import matplotlib.image

    img = matplotlib.image.imread(tmp_path / "out" / "frontier.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert summary["reference/best_ratio_within_1pt"] == pytest.approx(6.4582)
    assert summary["reference/best_ratio_within_2pt"] == pytest.approx(7.9614)
    # another frontier.csv works as a reference too
    r2 = read_reference(tmp_path / "out" / "frontier.csv")
    assert r2["dense_acc"] == pytest.approx(0.95) and len(r2["points"]) == 10


def test_wandb_frontier_run_holds_table_and_summary(sweep):
    summary = write_frontier([sweep], sweep, quiet=True)  # the points logged to W&B: so does the frontier
    (run,) = wait_wandb_runs(sweep / "wandb", 1)
    assert run["job_type"] == "frontier" and run["group"] == "g" and run["project"] == "qpexp-test"
    assert {"frontier/table/_type", "frontier/plot/_type"} <= run["history_keys"]
    assert run["summary"]["frontier/best_ratio_within_1pt"] == pytest.approx(summary["best_ratio_within_1pt"])
    assert run["summary"]["frontier/hypervolume"] == pytest.approx(summary["hypervolume"])
    assert run["summary"]["frontier/hypervolume_absolute"] == pytest.approx(summary["hypervolume_absolute"])
    assert run["summary"]["frontier/hv_reference_acc"] == pytest.approx(0.95 - 0.05)
    assert run["summary"]["frontier/hv_reference_point"]["test_acc"] == pytest.approx(0.95 - 0.05)
    # the frontier table itself (the run holds the dashboard's tables too, named by their content hash)
    tables = [f for f in run["files"] if str(f).endswith(".table.json") and "frontier/table_" in str(f)]
    assert tables, run["files"]
    table = json.loads((sweep / "wandb").glob("offline-run-*").__next__().joinpath(tables[0]).read_text())
    assert len(table["data"]) == 12 and "final/test_acc" in table["columns"] and "pareto" in table["columns"]


def test_points_without_wandb_get_no_frontier_run(tmp_path):
    root = tmp_path / "s"
    _write(root, "a", _record(4, 0.5, "global", 0, 0.9, 9.0, 0.95, kind="none"))
    write_frontier([root], root, quiet=True)
    assert not (root / "wandb").exists()
    assert (root / "frontier.csv").exists() and (root / "frontier.png").exists()


def test_cli_merges_sweeps(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "p1", _record(4, 0.5, "global", 0, 0.93, 9.0, 0.95, kind="none"))
    _write(b, "p1", _record(2, 0.5, "global", 0, 0.80, 13.0, 0.95, kind="none"))
    exe = [sys.executable, "-c", "from qpexp.frontier import cli; raise SystemExit(cli())"]
    proc = subprocess.run([*exe, str(a), str(b)], capture_output=True, text=True)
    assert proc.returncode == 2 and "--out is required" in proc.stderr
    out = tmp_path / "merged"
    proc = subprocess.run(
        [*exe, str(a), str(b), "--out", str(out), "--no-wandb"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    rows = _rows(out / "frontier.csv")
    assert sorted(r["run_dir"] for r in rows if r["point"] == "run") == ["a/p1", "b/p1"]
    assert len([r for r in rows if r["point"] == "dense"]) == 1  # the same baseline: one dense row
    assert "best ratio within 1 pt" in proc.stdout and "Pareto front" in proc.stdout


def test_worker_threads_share_the_cores():
    assert worker_threads(2, cores=2) == 1
    assert worker_threads(2, cores=16) == 8
    assert worker_threads(1, cores=4) == 4
    assert worker_threads(-1, cores=4) == 1  # joblib: one worker per core
    assert worker_threads(-2, cores=4) == 1  # 3 workers on 4 cores
    assert worker_threads(8, cores=2) == 1
    assert worker_threads(None, cores=3) == 3


def test_threads_per_worker_only_in_multirun(monkeypatch):
    from omegaconf import OmegaConf

    from qpexp.callbacks import SweepProgress

    def cfg(mode, threads=None):
        return OmegaConf.create({"threads": threads, "hydra": {"mode": mode, "launcher": {"n_jobs": 2}}})

    monkeypatch.delenv("QPEXP_THREADS", raising=False)
    SweepProgress().on_job_start(cfg("RunMode.RUN"))
    assert "QPEXP_THREADS" not in os.environ  # a single run keeps all cores
    SweepProgress().on_job_start(cfg("RunMode.MULTIRUN", threads=3))
    assert "QPEXP_THREADS" not in os.environ  # an explicit threads= wins
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    SweepProgress().on_job_start(cfg("RunMode.MULTIRUN"))
    assert os.environ["QPEXP_THREADS"] == "3"  # 6 cores shared by n_jobs=2 workers
    monkeypatch.delenv("QPEXP_THREADS")
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one thread each
    SweepProgress().on_job_start(cfg("RunMode.MULTIRUN"))
    assert os.environ["QPEXP_THREADS"] == "1"
    monkeypatch.setenv("QPEXP_THREADS", "7")
    SweepProgress().on_job_start(cfg("RunMode.MULTIRUN"))
    assert os.environ["QPEXP_THREADS"] == "7"  # the user's setting wins


def test_seeds_of_one_config_group_across_settings_that_change_nothing(tmp_path):
    """Sweeps run with another cache folder or resume-checkpoint interval are the same config: their
    seeds average together (mean of 0.90 and 0.80 by hand), and neither setting becomes an axis."""
    from qpexp.frontier import collect

    a = _record(4, 0.5, "global", 0, 0.90, 9.0, 0.95, kind="none")
    b = _record(4, 0.5, "global", 1, 0.80, 9.0, 0.95, kind="none")
    a["config"]["checkpoint_every_s"], b["config"]["checkpoint_every_s"] = None, 10
    b["config"]["cache_dir"] = "elsewhere/cache"
    _write(tmp_path / "s0", "p", a)
    _write(tmp_path / "s1", "p", b)
    rows, axes = collect([tmp_path / "s0", tmp_path / "s1"])
    assert "checkpoint_every_s" not in axes and "cache_dir" not in axes
    from qpexp.frontier import groups

    (mean,) = [g for g in groups(rows, axes) if g["point"] == "run"]
    assert mean["n"] == 2 and mean["acc"] == pytest.approx(0.85)


def test_records_from_before_a_key_existed_group_with_its_old_value(tmp_path):
    """A record written before ``quant.narrow_range``, ``quant.rounding*`` and ``distill.*`` existed
    and one that sets them to the values those older runs computed with are one config: the seeds
    average together (0.90 and 0.80 by hand) and none of the keys becomes an axis; a record that sets
    one of them to another value is another config."""
    from qpexp.frontier import collect, groups

    old = _record(4, 0.5, "global", 0, 0.90, 9.0, 0.95, kind="none")
    new = _record(4, 0.5, "global", 1, 0.80, 9.0, 0.95, kind="none")
    for k in ("narrow_range", "rounding", "rounding_batches", "rounding_iters"):
        old["config"]["quant"].pop(k, None)
    old["config"].pop("distill", None)
    new["config"]["quant"].update(
        narrow_range=True, rounding="nearest", rounding_batches=8, rounding_iters=500
    )
    new["config"]["distill"] = {"alpha": 0.0, "temperature": 4.0}
    _write(tmp_path / "s0", "p", old)
    _write(tmp_path / "s1", "p", new)
    rows, axes = collect([tmp_path / "s0", tmp_path / "s1"])
    assert not [a for a in axes if a.startswith(("quant.narrow", "quant.rounding", "distill."))], axes
    (mean,) = [g for g in groups(rows, axes) if g["point"] == "run"]
    assert mean["n"] == 2 and mean["acc"] == pytest.approx(0.85)

    full = _record(4, 0.5, "global", 2, 0.70, 9.0, 0.95, kind="none")
    full["config"]["quant"]["narrow_range"] = False
    _write(tmp_path / "s2", "p", full)
    rows, axes = collect([tmp_path / "s0", tmp_path / "s1", tmp_path / "s2"])
    assert "quant.narrow_range" in axes
    assert sorted(g["n"] for g in groups(rows, axes) if g["point"] == "run") == [1, 2]

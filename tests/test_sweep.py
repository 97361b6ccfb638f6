"""A small sweep end to end: 5 points in parallel (2 workers), tiny budgets, one deliberately failing.

The sweep is defined the way users define one: a sweep file (``sweep=tiny``, found through
``--config-dir``) that sets the multirun mode and the points, here as ``experiment`` options so that
the 5 points need not form a full grid.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, read_record, wandb_offline_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POINTS = {  # experiment option -> (bits_w, scope, fail_at)
    "a": (4, "global", None),
    "b": (8, "global", None),
    "c": (2, "layer", None),
    "d": (4, "layer", None),
    "e": (8, "layer", "qat"),
}


def _write_conf(root: Path) -> Path:
    conf = root / "conf"
    (conf / "sweep").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "sweep" / "tiny.yaml").write_text(
        "# @package _global_\n"
        "hydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n      experiment: a,b,c,d,e\n"
        "logger:\n  group: tinysweep\n"
    )
    for name, (bits, scope, fail) in POINTS.items():
        text = f"# @package _global_\nquant:\n  bits_w: {bits}\nprune:\n  scope: {scope}\n"
        if fail:
            text += f"fail_at: {fail}\n"
        (conf / "experiment" / f"{name}.yaml").write_text(text)
    return conf


def _run(tmp: Path, conf: Path) -> subprocess.CompletedProcess:
    args = [
        "--config-dir",
        str(conf),
        "sweep=tiny",
        *TINY,  # logger=none for the points (faster); the frontier's own W&B run is forced on
        "+hydra.callbacks.frontier.wandb=true",
        "export.enabled=false",
        "prune.ratio=0.5",
        "hydra.launcher.n_jobs=2",
        f"cache_dir={tmp / 'cache'}",
        f"hydra.sweep.dir={tmp / 'sweep'}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "QPEXP_THREADS"}  # threads come from n_jobs
    proc = subprocess.run(
        [sys.executable, "-m", "qpexp.cli", *args],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _point_dirs(sweep: Path) -> dict[str, Path]:
    out = {}
    for rec in sweep.glob("*/record.json"):
        overrides = (rec.parent / ".hydra" / "overrides.yaml").read_text().splitlines()
        exp = next(line.split("=", 1)[1].strip() for line in overrides if "experiment=" in line)
        out[exp] = rec.parent
    return out


def _cache_state(cache: Path) -> dict[str, float]:
    return {str(p.relative_to(cache)): p.stat().st_mtime for p in cache.glob("*/meta.json")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    conf = _write_conf(tmp)
    first = _run(tmp, conf)
    dirs = _point_dirs(tmp / "sweep")
    records = {k: read_record(d) for k, d in dirs.items()}
    cache_after_first = _cache_state(tmp / "cache")
    mtimes = {k: (d / "record.json").stat().st_mtime for k, d in dirs.items()}
    time.sleep(1.1)
    second = _run(tmp, conf)
    return {
        "tmp": tmp,
        "sweep": tmp / "sweep",
        "first": first,
        "second": second,
        "dirs": dirs,
        "records": records,
        "cache_after_first": cache_after_first,
        "record_mtimes": mtimes,
    }


def test_points_complete_and_the_failing_one_is_reported(sweep):
    recs = sweep["records"]
    assert sorted(recs) == sorted(POINTS)
    assert recs["e"]["status"] == "failed" and "fail_at=qat" in recs["e"]["error"]
    for name in "abcd":
        r = recs[name]
        assert r["status"] == "not_deployed", r.get("error")  # export off: no deployment check ran
        bits, scope, _ = POINTS[name]
        assert r["config"]["quant"]["bits_w"] == bits and r["config"]["prune"]["scope"] == scope
        assert r["final/bits_w"] == bits
        # parallel workers share the cores: 2 workers -> cores // 2 torch threads each
        assert r["threads"] == max(1, (os.cpu_count() or 1) // 2)
    out = sweep["first"].stdout
    assert "[sweep] 5 points, 2 in parallel" in out
    assert "[sweep] 5/5 done, 1 failed" in out
    assert all(f"[sweep] {i}/5 done" in out for i in range(1, 6))


def test_shared_stages_trained_once(sweep):
    recs = {k: r for k, r in sweep["records"].items() if r["status"] in ("ok", "not_deployed")}
    cache = sweep["tmp"] / "cache"
    # one baseline for the whole sweep, one pruned model per scope (the ratio is fixed)
    assert len(list(cache.glob("baseline-*/meta.json"))) == 1
    assert len(list(cache.glob("prune-*/meta.json"))) == 2
    assert sum(not r["cache/baseline_hit"] for r in recs.values()) == 1
    assert len({r["artifacts/baseline"] for r in recs.values()}) == 1
    for scope in ("global", "layer"):
        trained = [
            r for r in recs.values() if r["config"]["prune"]["scope"] == scope and not r["cache/prune_hit"]
        ]
        assert len(trained) <= 1
    assert all(r["cache/qat_hit"] is False for r in recs.values())  # each point its own QAT


def test_second_run_trains_nothing(sweep):
    # the complete records were kept as they were; no cache entry was written again or added
    for name, d in sweep["dirs"].items():
        if sweep["records"][name]["status"] in ("ok", "not_deployed"):
            assert (d / "record.json").stat().st_mtime == sweep["record_mtimes"][name]
            assert read_record(d) == sweep["records"][name]
    assert _cache_state(sweep["tmp"] / "cache") == sweep["cache_after_first"]
    # the failing point is tried again and fails in the same stage, reusing baseline and prune
    again = read_record(sweep["dirs"]["e"])
    assert again["status"] == "failed" and "fail_at=qat" in again["error"]
    out = sweep["second"].stdout
    assert "[sweep] 5/5 done, 1 failed (4 reused)" in out


def test_frontier_csv_matches_records(sweep):
    with (sweep["sweep"] / "frontier.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    runs = {Path(r["run_dir"]).name: r for r in rows if r["point"] == "run"}
    assert len(runs) == 5
    for d in sweep["dirs"].values():
        row, rec = runs[d.name], read_record(d)
        assert row["status"] == rec["status"]
        if rec["status"] not in ("ok", "not_deployed"):
            assert row["error"] == rec["error"] and row["pareto"] == "False"
            continue
        for key in (
            "final/test_acc",
            "final/compression_ratio",
            "final/bops",
            "final/size_bits",
            "final/sparsity",
        ):
            assert math.isclose(float(row[key]), rec[key]), key
        assert row["quant.bits_w"] == str(rec["config"]["quant"]["bits_w"])
        assert row["prune.scope"] == rec["config"]["prune"]["scope"]
        assert row["cache/baseline_hit"] == str(rec["cache/baseline_hit"])
    (dense,) = [r for r in rows if r["point"] == "dense"]
    base = next(r for r in sweep["records"].values() if r["status"] in ("ok", "not_deployed"))
    assert math.isclose(float(dense["final/test_acc"]), base["baseline/test_acc"])
    assert float(dense["final/compression_ratio"]) == 1.0
    # Pareto flags against a brute force written from the definition over the ok rows: dominated by
    # a point at least as good in both objectives and not identical; identical points count once.
    # The accuracy objective is the selection metric, the validation accuracy (frontier.select)
    ok = [r for r in rows if r["status"] in ("ok", "not_deployed")]
    for flag, col, lower in (
        ("pareto", "final/compression_ratio", False),
        ("pareto_bops", "final/bops", True),
    ):
        pts = [(float(r["final/val_acc"]), -float(r[col]) if lower else float(r[col])) for r in ok]
        for i, (r, p) in enumerate(zip(ok, pts)):
            dominated = any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts)
            on_front = not dominated and p not in pts[:i]
            assert (r[flag] == "True") == on_front, (flag, r["run_dir"])
    summary = json.loads((sweep["sweep"] / "frontier.json").read_text())
    assert summary["points"] == 5 and summary["points_failed"] == 1
    assert math.isclose(summary["dense_acc"], base["baseline/test_acc"])
    assert summary["failed"][0]["error"] == sweep["records"]["e"]["error"]


def test_frontier_png_is_an_image(sweep):
    png = sweep["sweep"] / "frontier.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and min(img.shape[:2]) > 200


def test_frontier_wandb_run_holds_the_table(sweep):
    runs = [r for r in wandb_offline_runs(sweep["sweep"] / "wandb") if r["job_type"] == "frontier"]
    assert len(runs) == 2  # one per multirun (the second run aggregated again)
    run = runs[-1]
    assert run["group"] == "tinysweep"
    assert "frontier/table/_type" in run["history_keys"]
    assert "frontier/best_ratio_within_1pt" in run["summary"] and "frontier/hypervolume" in run["summary"]
    (table,) = [f for f in run["files"] if str(f).endswith(".table.json") and "frontier/table_" in str(f)]
    data = json.loads(next((sweep["sweep"] / "wandb").glob(f"offline-run-*/{table}")).read_text())
    assert len(data["data"]) == 6 and "final/test_acc" in data["columns"]  # 5 points + the dense row


def _enter(args):
    """One worker asking the cache for a stage: trains it when missing (slowly), else reuses it."""
    root, barrier = args
    from qpexp.cache import StageCache

    barrier.wait(timeout=300)  # all workers ask at the same moment
    with StageCache(root, root).entry("baseline", "k") as entry:
        if entry.complete:
            return "reused"
        time.sleep(0.5)
        entry.save({"w": 1}, {"val_acc": 0.5})
        return "trained"


def test_parallel_workers_train_a_missing_stage_once(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(3) as pool:
        barrier = manager.Barrier(3)
        results = pool.map(_enter, [(tmp_path, barrier)] * 3, chunksize=1)
    assert sorted(results) == ["reused", "reused", "trained"]
    meta = json.loads((tmp_path / "baseline-k" / "meta.json").read_text())
    assert meta["val_acc"] == 0.5 and set(meta) == {"val_acc", "sha256"}  # + the checksum of model.pt


def test_default_sweep_definition():
    """``sweep=frontier``: multirun by itself, the required grid, a fixed folder, every point valid."""
    from conftest import compose

    from qpexp.schema import validate
    from qpexp.sweepcheck import sweep_points

    cfg = compose(["sweep=frontier"])
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweep.dir == "outputs/sweeps/frontier"  # re-running reuses records and cache
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert sorted(int(b) for b in params["quant.bits_w"]) == [2, 4, 8]
    ratios = [float(r) for r in params["prune.ratio"]]
    assert len(ratios) >= 3 and all(0.5 <= r <= 0.95 for r in ratios)
    assert sorted(params["prune.scope"]) == ["global", "layer"]
    assert cfg.data.name == "mnist1d" and cfg.model._target_.endswith("cnn1d")
    # the measured recipe (README: the default sweep's ablation)
    assert cfg.prune.structure == "channel" and cfg.prune.lr == 0.01
    assert cfg.quant.narrow_range is False and cfg.quant.first_bits == 8
    assert cfg.quant.epochs == 64 and cfg.quant.lr == 0.02 and cfg.quant.label_smoothing == 0.0
    assert cfg.threads is None  # derived per worker from hydra.launcher.n_jobs
    assert cfg.logger.group  # the sweep's W&B group
    points = sweep_points(cfg)
    assert len(points) == 18
    for point in points:
        validate(compose(["sweep=frontier", *point]))


def test_sweep_check_composes_every_point_as_hydra_does():
    """The sweep check builds each distinct defaults list once and applies the points' values on a
    copy; the configs must equal Hydra's own composition of each point (``load_sweep_config``), also
    with a config-group axis, a second value axis and an added (`+`) dict override in the mix."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from qpexp.cli import config_dir
    from qpexp.sweepcheck import point_configs, sweep_points

    def plain(c):
        d = OmegaConf.to_container(c, resolve=False)
        d.pop("hydra", None)
        return d

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        from hydra import compose as hcompose

        for extra in ({}, {"model": "cnn1d,mlp", "quant.lr": "0.1,0.02", "+quant.overrides": "{conv1: 8}"}):
            cfg = hcompose(config_name="config", overrides=["sweep=frontier"], return_hydra_config=True)
            with open_dict(cfg):
                cfg.hydra.sweeper.params.update(extra)
            points = sweep_points(cfg)
            assert len(points) == 18 * (4 if extra else 1)
            loader = GlobalHydra.instance().config_loader()
            got = list(point_configs(cfg, points))
            assert [p for p, _ in got] == points
            for point, mine in got[:: 5 if extra else 1]:  # Hydra's composition: 0.4 s a point
                assert plain(mine) == plain(loader.load_sweep_config(cfg, list(point))), point
            if extra:  # the axes really differ between points
                assert {OmegaConf.select(c, "model._target_") for _, c in got} == {
                    "qpexp.models.cnn1d",
                    "qpexp.models.mlp",
                }
                assert {c.quant.lr for _, c in got} == {0.1, 0.02}

"""Issue 6: faults injected for real — kills, divergence, concurrent writers, crafted pickles, bad
configs and data across a multirun, W&B without a network."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose, read_record, run_cli

from qpexp.io import UnsafeFileError, atomic_write_json, safe_torch_load
from qpexp.pipeline import Pipeline, write_record

COMPARED = ("baseline/", "prune/", "qat/", "final/", "layers/", "size/", "dense/")


def numbers(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k.startswith(COMPARED) and not k.endswith("_seconds")}


# -- resume after SIGKILL --------------------------------------------------------------------------
def test_sigkill_mid_stage_then_resume_gives_same_record(tmp_path):
    args = [
        "logger=none", "cache=false", "export.enabled=false", "baseline.epochs=3", "prune.steps=2",
        "prune.finetune_epochs=10", "quant.epochs=2", "quant.calib_batches=2",
        "checkpoint_every_s=0",  # a checkpoint every epoch: the test kills the run once one exists
    ]  # fmt: skip
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run_cli([*args, f"hydra.run.dir={ref_dir}"], cwd=tmp_path)
    env = {**os.environ, "QPEXP_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qpexp.cli", *args, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ckpt = run_dir / "prune" / "work" / "last.ckpt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), f"the prune stage never checkpointed (exit code {proc.poll()})"
    proc.send_signal(signal.SIGKILL)  # mid-stage: prune has 20 epochs, at least one is done
    proc.wait()
    assert not (run_dir / "record.json").exists()
    assert not (run_dir / "prune" / "meta.json").exists()  # the stage had not completed
    assert safe_torch_load(ckpt)["epoch"] < 2 * 10 - 1  # killed mid-stage: the resume has epochs left
    run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)  # same command again: resumes
    ref, rec = read_record(ref_dir), read_record(run_dir)
    assert (
        rec["status"] == "not_deployed" and rec["cache/baseline_hit"]
    )  # baseline reused from the run folder
    assert numbers(rec) == numbers(ref)


def test_checkpoint_interval_and_resume_from_an_older_epoch(tmp_path, monkeypatch):
    """``checkpoint_every_s``: 0 writes the resume checkpoint at every epoch end, a long interval none
    within a short stage; a stage resumed from an older epoch's checkpoint (what a kill between two
    sparse checkpoints leaves) replays the epochs after it and gives an uninterrupted run's record."""
    import shutil

    from lightning.pytorch.callbacks import ModelCheckpoint

    from qpexp import pipeline

    saved, kept = [], tmp_path / "epoch1.ckpt"
    save = ModelCheckpoint._save_checkpoint

    def spy(self, trainer, filepath):
        save(self, trainer, filepath)
        saved.append(trainer.current_epoch)
        if trainer.current_epoch == 1:
            shutil.copy(filepath, kept)

    monkeypatch.setattr(ModelCheckpoint, "_save_checkpoint", spy)
    resumed_from = []
    load = pipeline.safe_torch_load

    def load_spy(path, *a, **k):
        resumed_from.append(Path(path))
        return load(path, *a, **k)

    monkeypatch.setattr(pipeline, "safe_torch_load", load_spy)
    args = [
        *TINY,
        "cache=false",
        "export.enabled=false",
        "baseline.epochs=4",
        "prune.ratio=0",
        "quant.bits_w=32",
    ]
    every = Pipeline(compose([*args, "checkpoint_every_s=0"]), tmp_path / "every").run()
    assert saved == [0, 1, 2, 3] and kept.exists()
    saved.clear()
    rare = Pipeline(compose([*args, "checkpoint_every_s=3600"]), tmp_path / "rare").run()
    assert saved == []
    work = tmp_path / "resumed" / "baseline" / "work"
    work.mkdir(parents=True)
    shutil.copy(kept, work / "last.ckpt")  # killed after epoch 1's checkpoint, two epochs later
    resumed = Pipeline(compose([*args, "checkpoint_every_s=3600"]), tmp_path / "resumed").run()
    assert saved == [] and safe_torch_load(kept)["epoch"] == 1
    assert [p.parent for p in resumed_from if p.name == "last.ckpt"] == [work]  # it did resume, once
    assert numbers(rare) == numbers(every) == numbers(resumed)
    assert numbers(every)["baseline/best_epoch"] >= 0


def test_multirun_rerun_only_incomplete_points(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["--multirun", *TINY, "export.enabled=false", f"cache_dir={tmp_path / 'cache'}",
            "quant.bits_w=4,8", f"hydra.sweep.dir={sweep}", "hydra.launcher.n_jobs=1"]  # fmt: skip
    run_cli(args, cwd=tmp_path)
    recs = sorted(sweep.glob("*/record.json"))
    assert len(recs) == 2
    done = json.loads(recs[0].read_text())
    stamp = recs[0].stat().st_mtime_ns
    recs[1].unlink()  # one point lost its record (e.g. killed before writing it)
    run_cli(args, cwd=tmp_path)
    assert recs[0].stat().st_mtime_ns == stamp  # complete point untouched
    assert json.loads(recs[0].read_text()) == done
    assert json.loads(recs[1].read_text())["status"] == "not_deployed"  # incomplete point re-ran


# -- divergence ------------------------------------------------------------------------------------
def test_divergence_fails_point_and_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(
        ["--multirun", *TINY, "export.enabled=false", "prune.ratio=0", "quant.bits_w=32", "cache=false",
         "baseline.lr=0.001,1e30", f"hydra.sweep.dir={sweep}", "hydra.launcher.n_jobs=1"],
        cwd=tmp_path,
    )  # fmt: skip
    recs = {
        json.loads(r.read_text())["config"]["baseline"]["lr"]: json.loads(r.read_text())
        for r in sweep.glob("*/record.json")
    }
    bad, good = recs[1e30], recs[0.001]
    assert bad["status"] == "failed" and "loss became" in bad["error"] and "DivergenceError" in bad["error"]
    assert good["status"] == "not_deployed"


# -- concurrent writers ----------------------------------------------------------------------------
def _worker(args):
    i, bits, root = args
    os.environ["QPEXP_THREADS"] = "1"
    cfg = compose([*TINY, "export.enabled=false", f"cache_dir={root / 'cache'}", f"quant.bits_w={bits}"])
    run_dir = root / "sweep" / f"point{i}"
    rec = Pipeline(cfg, run_dir).run()
    write_record(run_dir, rec)
    return i


def test_eight_concurrent_workers_share_cache_and_sweep_dir(tmp_path):
    jobs = [(i, b, tmp_path) for i, b in enumerate([2, 3, 4, 5, 6, 7, 8, 16])]
    with mp.get_context("spawn").Pool(8) as pool:
        assert sorted(pool.map(_worker, jobs)) == list(range(8))
    recs = [read_record(tmp_path / "sweep" / f"point{i}") for i in range(8)]
    assert all(r["status"] == "not_deployed" for r in recs)
    assert sum(not r["cache/baseline_hit"] for r in recs) == 1  # one trained, seven waited and reused
    assert sum(not r["cache/prune_hit"] for r in recs) == 1
    assert len({r["artifacts/baseline"] for r in recs}) == 1
    assert len({r["baseline/test_acc"] for r in recs}) == 1
    entries = sorted((tmp_path / "cache").glob("*/meta.json"))
    assert len(entries) == 1 + 1 + 8  # baseline, prune, one QAT per bit width
    for meta in entries:
        json.loads(meta.read_text())  # every entry complete and valid
        safe_torch_load(meta.parent / "model.pt")
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # no temporary leftovers


def test_atomic_write_never_exposes_partial_file(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})

    class Boom:
        pass

    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": Boom()})  # fails while serializing
    assert json.loads(path.read_text()) == {"a": 1}  # the old complete file is still there
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# -- crafted pickles -------------------------------------------------------------------------------
class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_in_cache_refused(tmp_path):
    marker = tmp_path / "pwned"
    cfg = compose([*TINY, "export.enabled=false", f"cache_dir={tmp_path / 'cache'}"])
    pipe = Pipeline(cfg, tmp_path / "run")
    entry = tmp_path / "cache" / f"baseline-{pipe.keys['baseline']}"
    entry.mkdir(parents=True)
    torch.save({"model": Evil(marker)}, entry / "model.pt")
    atomic_write_json(entry / "meta.json", {"val_acc": 1.0})
    with pytest.raises(UnsafeFileError, match="weights_only"):
        pipe.run()
    assert not marker.exists()  # nothing in the pickle ran


def test_malicious_resume_checkpoint_refused(tmp_path):
    marker = tmp_path / "pwned"
    cfg = compose([*TINY, "export.enabled=false", "cache=false"])
    work = tmp_path / "run" / "baseline" / "work"
    work.mkdir(parents=True)
    torch.save({"state_dict": Evil(marker)}, work / "last.ckpt")
    with pytest.raises(UnsafeFileError):
        Pipeline(cfg, tmp_path / "run").run()
    assert not marker.exists()


# -- bad configs and data across a multirun --------------------------------------------------------
@pytest.mark.parametrize(
    "sweep_args, needle",
    [
        (["quant.bits_w=4,64"], "quant.bits_w=64"),
        (["prune.ration=0.5"], "ration"),
        (["+prune.ration=0.5"], "ration"),
        (["prune.ratio=0.5,1.5"], "prune.ratio=1.5"),
        (["quant.bits_w=4,four"], "quant.bits_w"),
        (["prune.scope=global,everywhere"], "prune.scope"),
        (["model=cnn1d,resnet"], "resnet"),
        (["data=npz", "data.path=/nonexistent/x.npz"], "/nonexistent/x.npz"),
    ],
)
def test_bad_multirun_refused_before_any_point_trains(tmp_path, sweep_args, needle):
    sweep = tmp_path / "sweep"
    start = time.time()
    proc = run_cli(
        ["--multirun", *TINY, f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}", *sweep_args],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0, proc.stdout
    assert needle in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("qpexp: error:") == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not list(sweep.glob("*/record.json")) and not (tmp_path / "cache").exists()
    assert time.time() - start < 60


# -- one line for each error a newcomer meets ------------------------------------------------------
@pytest.mark.parametrize(
    "args, needles",
    [
        (["data=npz"], ["'data.path'", "required"]),
        (["data=npz", "data.path=/nonexistent/x.npz"], ["data.path", "/nonexistent/x.npz", "not found"]),
        (["baseline.epochs=abc"], ["'baseline.epochs'", "'abc'"]),
        (["model._target_=qpexp.models.nope"], ["model._target_", "qpexp.models.nope"]),
        (["prune.criterion=magnitude"], ["prune.criterion", "magnitude"]),
        (["prune.ration=0.5"], ["prune.ration"]),  # Hydra's own composition errors, too
        (["data=foo"], ["data/foo", "mnist1d"]),
        (["quant.bits_w=[4"], ["quant.bits_w=[4"]),
    ],
)
def test_config_error_is_one_line_before_lightning(tmp_path, args, needles):
    # PYTHONPROFILEIMPORTTIME lists every module imported (on stderr): Lightning must not be among them
    proc = run_cli(
        [*args, "logger=none", f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path,
        env={"PYTHONPROFILEIMPORTTIME": "1"},
        check=False,
    )
    imports = [ln for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    rest = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("import time:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(rest) == 1 and rest[0].startswith("qpexp: error: "), rest
    assert all(n in rest[0] for n in needles), rest[0]
    assert imports and not any(ln.split("|")[-1].strip().startswith("lightning") for ln in imports)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "record.json").exists()


@pytest.mark.parametrize("args", [["data=npz"], ["data=foo"]])
def test_config_error_traceback_with_hydra_full_error(tmp_path, args):
    proc = run_cli(
        [*args, "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env={"HYDRA_FULL_ERROR": "1"},
        check=False,
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "qpexp: error:" not in proc.stderr, proc.stderr[-3000:]
    assert ("data.path" if args == ["data=npz"] else "data/foo") in proc.stderr


# -- W&B without a network -------------------------------------------------------------------------
def test_wandb_online_without_network_falls_back(tmp_path):
    env = {
        "WANDB_MODE": "online",
        "WANDB_API_KEY": "0" * 40,
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # nothing listens there
    }
    run_dir = tmp_path / "run"
    proc = run_cli(
        [*TINY, "logger=wandb", "logger.init_timeout=3", "export.enabled=false", f"hydra.run.dir={run_dir}",
         f"cache_dir={tmp_path / 'c'}"],
        cwd=tmp_path, env=env, timeout=240,
    )  # fmt: skip
    assert read_record(run_dir)["status"] == "not_deployed"
    assert "logging offline instead" in proc.stderr + proc.stdout
    assert list(run_dir.glob("wandb/offline-run-*"))

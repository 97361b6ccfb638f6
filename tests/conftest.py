"""Shared test helpers: tiny budgets, isolated output/cache/data folders, Hydra composition."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# tiny training budgets that still exercise every stage
TINY = [
    "baseline.epochs=2",
    "prune.steps=2",
    "prune.finetune_epochs=1",
    "quant.epochs=1",
    "quant.calib_batches=2",
    "logger=none",
]


@pytest.fixture(autouse=True, scope="session")
def _env(tmp_path_factory):
    data = Path(os.environ.get("QPEXP_DATA_DIR", tmp_path_factory.mktemp("data")))
    os.environ["QPEXP_DATA_DIR"] = str(data)
    os.environ["WANDB_MODE"] = os.environ.get("QPEXP_TEST_WANDB_MODE", "offline")
    os.environ["WANDB_SILENT"] = "true"
    os.environ.setdefault("QPEXP_THREADS", "1")
    yield


def compose(overrides: list[str]):
    """The composed config (with its hydra node) for ``overrides``."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from qpexp.cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hcompose(config_name="config", overrides=overrides, return_hydra_config=True)


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None, check: bool = True):
    """Run ``qpexp ARGS`` in a subprocess (the real console entry point)."""
    e = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "qpexp.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=e,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"qpexp {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def read_record(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "record.json").read_text())


def wandb_offline_runs(root: Path) -> list[dict]:
    """Read back what W&B stored in each offline run under ``root`` (its binary transaction log).

    Returns one dict per run: ``group``, ``job_type``, ``project``, ``summary`` (key -> value),
    ``history_keys`` (keys logged with ``run.log``) and ``files`` (media files in the run folder).
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for path in sorted(Path(root).rglob("offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", path
        pos, block, buf, chunks = 7, 32768, b"", []
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # block trailer padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            chunk = data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind == 1:
                chunks.append(chunk)
            elif kind == 2:
                buf = chunk
            elif kind == 3:
                buf += chunk
            elif kind == 4:
                chunks.append(buf + chunk)
        info = {"group": None, "job_type": None, "project": None, "summary": {}, "history_keys": set()}
        for chunk in chunks:
            rec = pb.Record()
            rec.ParseFromString(chunk)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                info.update(group=rec.run.run_group, job_type=rec.run.job_type, project=rec.run.project)
            elif kind == "summary":
                for item in rec.summary.update:
                    info["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "history":
                info["history_keys"].update(
                    item.key or "/".join(item.nested_key) for item in rec.history.item
                )
        info["files"] = [p.relative_to(path.parent) for p in path.parent.rglob("*") if p.is_file()]
        runs.append(info)
    return runs

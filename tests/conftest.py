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
        [sys.executable, "-m", "qpexp.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"qpexp {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_record(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "record.json").read_text())

"""One baseline epoch on full MNIST through qpexp's stage against a plain torch loop:
``python -m qpexp.bench epoch [--models lenet300,lenet5_caffe] [--rounds 2] [--threads 1]``.

Both sides train the same initial model on the same tensors (the 55,000 training images of
``data=mnist``, batch 100, shuffled per epoch) with the same optimizer (the stages' AdamW, lr 1e-2)
and then evaluate the 5,000 validation images once, as a baseline epoch does:

- ``qpexp``: :class:`qpexp.train.stages.BaselineStage` through :func:`qpexp.run.pipeline.fit` (Lightning's
  loop, the epoch checkpoint, the mask keeper, the best-epoch copy: everything a run pays);
- ``plain``: ``for x, y in batches: loss.backward(); opt.step()`` then one ``no_grad`` pass;
- ``lightning``: the floor any LightningModule pays: a bare module (the loss, the optimizer, no
  logging, no checkpoint) under a bare ``Trainer`` with automatic optimization.

The three alternate, ``--rounds`` times each, in one process; ``ratio`` is the median qpexp time
over the median plain time (the goal: at most 1.1), ``over_lightning`` the median qpexp time over
the bare Lightning module's: what qpexp itself adds. Needs ``qpexp-data mnist`` first.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from qpexp import models
from qpexp.bench import emit
from qpexp.data import ArrayDataModule
from qpexp.data.mnist import mnist
from qpexp.run.pipeline import fit, quiet_lightning
from qpexp.train.optim import adamw
from qpexp.train.stages import BaselineStage

LR = 1e-2


def _data():
    dm = ArrayDataModule(source=mnist, name="mnist", val_fraction=1 / 12, seed=0)
    dm.setup()
    return dm


def plain_epoch(model: torch.nn.Module, dm) -> float:
    start = time.perf_counter()
    opt = adamw(model.parameters(), lr=LR)
    model.train()
    for x, y in dm.loader("train"):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in dm.loader("val"))
    assert correct >= 0
    return time.perf_counter() - start


class _Bare(L.LightningModule):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return (self.model(x).argmax(1) == y).sum()

    def configure_optimizers(self):
        return adamw(self.model.parameters(), lr=LR)


def lightning_epoch(model: torch.nn.Module, dm) -> float:
    start = time.perf_counter()
    bare = {"enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    with quiet_lightning():  # as on qpexp's side: no banners
        trainer = L.Trainer(
            max_epochs=1, logger=False, accelerator="cpu", devices=1, num_sanity_val_steps=0, **bare
        )
        trainer.fit(_Bare(model), datamodule=dm)
    return time.perf_counter() - start


def qpexp_epoch(model: torch.nn.Module, dm) -> float:
    stage = BaselineStage(model, num_classes=10, lr=LR, epochs=1)
    with tempfile.TemporaryDirectory() as work:
        return fit(stage, dm, 1, Path(work), None, {})


def bench_model(name: str, dm, rounds: int) -> dict:
    torch.manual_seed(0)
    init = getattr(models, name)((1, 28, 28), 10)
    sides = {"plain": plain_epoch, "lightning": lightning_epoch, "qpexp": qpexp_epoch}
    times = {side: [] for side in sides}
    for _ in range(rounds):
        for side, run in sides.items():
            times[side].append(run(copy.deepcopy(init), dm))
    plain, bare, ours = (statistics.median(times[side]) for side in sides)
    return {
        "model": name,
        "plain_s": plain,
        "lightning_s": bare,
        "qpexp_s": ours,
        "ratio": ours / plain,
        "over_lightning": ours / bare,
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m qpexp.bench epoch", description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="lenet300,lenet5_caffe")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dm = _data()
    rows = [bench_model(m, dm, a.rounds) for m in a.models.split(",")]
    figures = {f"{r['model']}_ratio": round(r["ratio"], 3) for r in rows}
    figures |= {f"{r['model']}_over_lightning": round(r["over_lightning"], 3) for r in rows}
    figures |= {f"{r['model']}_plain_s": round(r["plain_s"], 2) for r in rows}
    emit(rows, figures, f"one baseline epoch on MNIST (55,000 images), {a.threads} thread(s)")


if __name__ == "__main__":
    main()

"""Time of the per-layer analyses on the MNIST-1D CNN: ``python -m qpexp.bench sensitivity``.

On the default data's validation split (500 samples) and the paper's CNN (untrained: the cost does
not depend on the weights' values), 70% global L1 masks: ``analysis=sensitivity`` (each of the 4
layers quantized alone to {2, 3, 4, 8} bits, per-tensor LSQ as the frontier, and pruned alone to
{0.5, 0.75, 0.9}) and ``quant.bits_w=auto``'s assignment (sizes at 2..8 bits, loss increases with
8-bit activations calibrated on 10 training batches, the exact solver). Median of ``--rounds``
wall-clock times, one thread by default. The issue's target: the analysis under 30 s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from itertools import islice

import torch

from qpexp.bench import emit
from qpexp.core import PruneConfig, QuantConfig, QuantSpec, prune_step
from qpexp.core.analysis.mixed import assign_bits
from qpexp.core.analysis.sensitivity import prune_sensitivity, quant_sensitivity
from qpexp.data import ArrayDataModule, mnist1d
from qpexp.models import cnn1d


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m qpexp.bench sensitivity", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from functools import partial

    dm = ArrayDataModule(partial(mnist1d, num_samples=5000, seed=42), name="mnist1d", val_fraction=0.125)
    dm.prepare()
    val = list(dm.loader("val"))
    calib = list(islice(dm.loader("train", shuffle=False), 10))
    model = cnn1d(dm.input_shape, dm.num_classes)
    prune_step(model, PruneConfig(ratio=0.7, scope="global"), target=0.7)
    q = QuantConfig(
        QuantSpec(4, granularity="tensor", symmetric=True, range="lsq"),
        QuantSpec(8, granularity="tensor", symmetric=False, range="lsq"),
    )
    example = val[0][0][:1]
    budget = 166_720 // 14

    def analysis():
        quant_sensitivity(model, val, q, (2, 3, 4, 8), example)
        prune_sensitivity(model, val, PruneConfig(), (0.5, 0.75, 0.9))

    def auto():
        assign_bits(model, val, q, budget, example=example, calib=calib)

    rows, figures = [], {}
    for name, fn in (("analysis=sensitivity", analysis), ("quant.bits_w=auto (assignment)", auto)):
        times = []
        for _ in range(a.rounds):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        rows.append({"what": name, "median_s": med, "min_s": min(times), "rounds": a.rounds})
        figures["sensitivity_s" if name.startswith("analysis") else "assignment_s"] = med
    figures["val_samples"] = sum(len(y) for _, y in val)
    emit(rows, figures, f"per-layer analyses on the MNIST-1D CNN ({a.threads} thread(s))")


if __name__ == "__main__":
    main()

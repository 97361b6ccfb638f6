"""Pruning costs and gains, side by side in one process (one thread by default).

1. One training step (Adam, batch 100) on the MNIST-1D CNN and MLP at 50% unstructured sparsity:
   dense; qpexp's masks (``MaskKeeper`` after ``opt.step()``: one fused multiply); and
   ``torch.nn.utils.prune`` (``l1_unstructured``: a forward pre-hook recomputes ``weight = orig * mask``
   every forward, and autograd goes through that product). The ``MaskKeeper() call alone`` row times
   just the re-masking, as a fraction of a dense step: a floor for qpexp's overhead that machine
   noise cannot hide.
2. Channel pruning at ratio 0.5 (fraction of conv/linear weights removed, qpexp's definition) on 2D
   CNNs: LeNet-5 on 1x28x28 and a small VGG-like net on 3x32x32 (global and layer scope). The masked
   model is physically pruned with Torch-Pruning; inference latency (eval, no grad) at batch 1 and 64
   is reported as a ratio to the dense model, next to the MAC ratio and parameter ratio. Torch-Pruning's
   own "pruning ratio 0.5" removes half the *channels* of every layer, i.e. about 75% of the weights:
   the VGG row at qpexp ratio 0.75, layer scope, is that setting.

Variants are interleaved round by round so machine noise hits them alike; each figure is the median
over rounds of the per-call time, as a ratio to the dense model.
Usage: ``python -m qpexp.bench prune [--rounds 15] [--steps 20] [--threads 1]``.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torch.nn.utils.prune as tprune
from torch import nn

from qpexp.bench import emit, step_args
from qpexp.core.accounting import count_params, model_macs
from qpexp.core.prune import MaskKeeper, PruneConfig, prunable_layers, prune_step
from qpexp.core.prune.channel import channel_prune_step, physically_prune
from qpexp.models import cnn1d, lenet5, mlp

BATCH = 100


def vgg_small(num_classes: int = 10) -> nn.Sequential:
    """A small VGG-like CNN for 3x32x32 images (about 290k parameters)."""
    layers: list[tuple[str, nn.Module]] = []
    cin = 3
    plan = [(32, False), (32, True), (64, False), (64, True), (128, False), (128, True)]
    for i, (cout, pool) in enumerate(plan):
        layers += [
            (f"conv{i + 1}", nn.Conv2d(cin, cout, 3, padding=1)),
            (f"bn{i + 1}", nn.BatchNorm2d(cout)),
            (f"relu{i + 1}", nn.ReLU()),
        ]
        if pool:
            layers.append((f"pool{i + 1}", nn.MaxPool2d(2)))
        cin = cout
    layers += [("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
    layers.append(("fc", nn.Linear(cin, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def timed(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def interleave(fns: dict, rounds: int, n: int, base: str) -> dict[str, tuple[float, float]]:
    """Median seconds per call and median ratio to ``base``, over interleaved rounds."""
    for f in fns.values():
        timed(f, max(2, n // 4))  # warm-up
    times = {k: [] for k in fns}
    ratios = {k: [] for k in fns}
    for _ in range(rounds):
        this = {k: timed(f, n) for k, f in fns.items()}
        for k, v in this.items():
            times[k].append(v)
            ratios[k].append(v / this[base])
    return {k: (statistics.median(times[k]), statistics.median(ratios[k])) for k in fns}


# -- 1. masked training step -----------------------------------------------------------------------
def train_step(model: nn.Module, x, y, keeper: MaskKeeper | None = None):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if keeper is not None:
            keeper()

    return step


def bench_masked_step(name: str, model: nn.Module, rounds: int, steps: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 40, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    dense = copy.deepcopy(model)
    ours = copy.deepcopy(model)
    prune_step(ours, PruneConfig(ratio=0.5, scope="layer"), 0.5)
    hooked = copy.deepcopy(model)
    for _, m in prunable_layers(hooked):
        tprune.l1_unstructured(m, "weight", amount=0.5)
    keeper = MaskKeeper(ours)
    steps_fn = {
        "dense": train_step(dense, x, y),
        "qpexp masks (MaskKeeper after step)": train_step(ours, x, y, keeper),
        "torch.nn.utils.prune hooks": train_step(hooked, x, y),
        "MaskKeeper() call alone": keeper,  # its ratio: the added fraction of a dense step
    }
    res = interleave(steps_fn, rounds, steps, "dense")
    for m in (ours, hooked):  # both really are 50% sparse after all those steps
        zeros = sum(int((mod.weight == 0).sum()) for _, mod in prunable_layers(m))
        assert zeros >= sum(round(0.5 * mod.weight.numel()) for _, mod in prunable_layers(m))
    return [
        {"part": "train step b100", "model": name, "variant": k, "ms": 1e3 * t, "x dense": r}
        for k, (t, r) in res.items()
    ]


# -- 2. channel pruning: latency vs MACs -----------------------------------------------------------
@torch.no_grad()
def bench_channels(name: str, build, shape, scope: str, rounds: int, ratio: float = 0.5):
    torch.manual_seed(0)
    dense = build().eval()
    example = torch.randn(1, *shape)
    pruned = copy.deepcopy(dense)
    with torch.enable_grad():
        cfg = PruneConfig(ratio=ratio, scope=scope, structure="channel")
        channel_prune_step(pruned, cfg, ratio, example=example)
    physically_prune(pruned, example)
    pruned.eval()
    p0, p1 = count_params(dense)[0], count_params(pruned)[0]
    w0 = sum(m.weight.numel() for _, m in prunable_layers(dense))
    w1 = sum(m.weight.numel() for _, m in prunable_layers(pruned))
    m0, m1 = model_macs(dense, example)["macs"], model_macs(pruned, example)["macs"]
    rows, fig = [], {}
    key = f"{name}_{scope}_{ratio}"
    fig[f"{key}/weights_ratio"] = round(w1 / w0, 3)
    fig[f"{key}/params_ratio"] = round(p1 / p0, 3)
    fig[f"{key}/macs_ratio"] = round(m1 / m0, 3)
    for batch in (1, 64):
        x = torch.randn(batch, *shape)
        n = 50 if batch == 1 else 5
        res = interleave({"dense": lambda x=x: dense(x), "pruned": lambda x=x: pruned(x)}, rounds, n, "dense")
        t, r = res["pruned"]
        rows.append(
            {
                "part": f"channel {ratio} {scope}",
                "model": name,
                "variant": f"batch {batch}",
                "ms": 1e3 * t,
                "x dense": r,
                "MACs x": m1 / m0,
                "params x": p1 / p0,
            }
        )
        fig[f"{key}/latency_ratio_b{batch}"] = round(r, 3)
    return rows, fig


def main(argv: list[str] | None = None) -> None:
    a = step_args("prune", __doc__, argv)
    rows = bench_masked_step("cnn1d", cnn1d((40,), 10), a.rounds, a.steps)
    rows += bench_masked_step("mlp", mlp((40,), 10), a.rounds, a.steps)
    figures = {}
    short = {
        "qpexp masks (MaskKeeper after step)": "qpexp",
        "torch.nn.utils.prune hooks": "torch_hooks",
        "MaskKeeper() call alone": "keeper_call",
    }
    for r in rows:
        if r["variant"] in short:
            figures[f"{r['model']}/{short[r['variant']]}/x_dense"] = round(r["x dense"], 3)
    nets = [
        ("lenet5", lambda: lenet5((1, 28, 28), 10), (1, 28, 28)),
        ("vgg_small", vgg_small, (3, 32, 32)),
    ]
    runs = [(net, scope, 0.5) for net in nets for scope in ("global", "layer")]
    runs.append((nets[1], "layer", 0.75))  # half the channels of every layer: Torch-Pruning's "ratio 0.5"
    for (name, build, shape), scope, ratio in runs:
        r, f = bench_channels(name, build, shape, scope, max(5, a.rounds // 2), ratio)
        rows += r
        figures.update(f)
    title = (
        f"Pruning: masked training step (50% unstructured, batch {BATCH}) and channel pruning at ratio 0.5, "
        f"{a.threads} thread(s), medians of interleaved rounds"
    )
    emit(rows, figures, title)


if __name__ == "__main__":
    main()

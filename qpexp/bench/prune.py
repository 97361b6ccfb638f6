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

3. Real architectures at 3x32x32, full size: ResNet-20, MobileNetV2 (CIFAR) and VGG-16 (BN), each
   channel-pruned by qpexp (L1 group importance, global scope, ``--ratio`` of the prunable weights
   removed, masks then physical removal) and by Torch-Pruning's own ``tp.pruner.MagnitudePruner``
   (``GroupMagnitudeImportance(p=1)``, global pruning, the classifier ignored) at the **same ratio
   of weights removed**: Torch-Pruning's ``pruning_ratio`` counts channels, so it is found by
   bisection until its model has as many prunable weights left as qpexp's (within 1%). Parameters,
   MACs (per sample, FlopCounterMode's count) and inference latency at batch 1 and 64 (eval, no
   grad) of dense, qpexp and Torch-Pruning models, side by side, plus each pruner's wall time.

Variants are interleaved round by round so machine noise hits them alike; each figure is the median
over rounds of the per-call time, as a ratio to the dense model.
Usage: ``python -m qpexp.bench prune [--rounds 15] [--steps 20] [--threads 1] [--part all|step|channels|archs]
[--archs resnet20,mobilenetv2,vgg16] [--ratio 0.5] [--arch-rounds 5]``.
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

import qpexp.models as models
from qpexp.bench import _fmt, emit, step_args
from qpexp.core.accounting import count_params, model_macs
from qpexp.core.prune import MaskKeeper, PruneConfig, prunable_layers, prunable_weights, prune_step
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


# -- 3. real architectures: qpexp vs Torch-Pruning's own pruner at the same ratio -------------------
def _weights(model: nn.Module) -> int:
    return sum(getattr(m, p).numel() for _, m, p in prunable_weights(model))


def _flop_macs(model: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        model(x[:1])
    return fc.get_total_flops() // 2


def _tp_prune(dense: nn.Module, x: torch.Tensor, channel_ratio: float) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(dense)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.enable_grad():
        pruner = tp.pruner.MagnitudePruner(
            model,
            x[:1],
            importance=tp.importance.GroupMagnitudeImportance(p=1),
            pruning_ratio=channel_ratio,
            global_pruning=True,
            ignored_layers=[classifier],
        )
        pruner.step()
    return model.eval()


def _tp_same_ratio(dense: nn.Module, x: torch.Tensor, weights_left: int) -> tuple[nn.Module, float, int]:
    """Torch-Pruning at the channel ratio whose model keeps ``weights_left`` prunable weights (+-1%)."""
    lo, hi, best = 0.0, 0.95, None
    for i in range(12):
        r = (lo + hi) / 2
        model = _tp_prune(dense, x, r)
        left = _weights(model)
        if best is None or abs(left - weights_left) < abs(_weights(best[0]) - weights_left):
            best = (model, r, i + 1)
        if abs(left - weights_left) <= 0.01 * weights_left:
            break
        lo, hi = (r, hi) if left > weights_left else (lo, r)
    return best


@torch.no_grad()
def bench_arch(name: str, ratio: float, rounds: int) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    shape = (3, 32, 32)
    dense = getattr(models, name)(shape, 10).eval()
    x = torch.randn(1, *shape)
    t = time.perf_counter()
    ours = copy.deepcopy(dense)
    with torch.enable_grad():
        channel_prune_step(
            ours, PruneConfig(ratio=ratio, scope="global", structure="channel"), ratio, example=x
        )
    physically_prune(ours, x)
    ours.eval()
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs, tp_ratio, tries = _tp_same_ratio(dense, x, _weights(ours))
    t_tp = (time.perf_counter() - t) / tries  # one Torch-Pruning run (the bisection makes several)
    variants = {
        "dense": dense,
        f"qpexp L1 global {ratio}": ours,
        f"Torch-Pruning ch. ratio {tp_ratio:.3f}": theirs,
    }
    lat = {}
    for batch, n in ((1, 10), (64, 1)):
        xb = torch.randn(batch, *shape)
        res = interleave({k: (lambda m=m, xb=xb: m(xb)) for k, m in variants.items()}, rounds, n, "dense")
        lat[batch] = res
    rows, fig = [], {}
    p0, m0, w0 = count_params(dense)[0], _flop_macs(dense, x), _weights(dense)
    for key, (k, m) in zip(("dense", "qpexp", "torch_pruning"), variants.items()):
        p, macs, w = count_params(m)[0], _flop_macs(m, x), _weights(m)
        rows.append({
            "model": name, "pruner": k, "params": p, "params x": p / p0, "weights removed": 1 - w / w0,
            "MMACs": macs / 1e6, "MACs x": macs / m0,
            "ms b1": 1e3 * lat[1][k][0], "x dense b1": lat[1][k][1],
            "ms b64": 1e3 * lat[64][k][0], "x dense b64": lat[64][k][1],
            "prune s": {"dense": 0.0, "qpexp": t_ours, "torch_pruning": t_tp}[key],
        })  # fmt: skip
        fig[f"{name}/{key}/params"] = p
        fig[f"{name}/{key}/macs"] = macs
        fig[f"{name}/{key}/latency_ms_b1"] = round(1e3 * lat[1][k][0], 3)
        fig[f"{name}/{key}/latency_ms_b64"] = round(1e3 * lat[64][k][0], 2)
        if key != "dense":
            fig[f"{name}/{key}/weights_removed"] = round(1 - w / w0, 4)
            fig[f"{name}/{key}/macs_ratio"] = round(macs / m0, 3)
            fig[f"{name}/{key}/latency_ratio_b1"] = round(lat[1][k][1], 3)
            fig[f"{name}/{key}/latency_ratio_b64"] = round(lat[64][k][1], 3)
    fig[f"{name}/torch_pruning/channel_ratio"] = round(tp_ratio, 4)
    return rows, fig


def _extra(ap) -> None:
    ap.add_argument("--part", choices=("all", "step", "channels", "archs"), default="all")
    ap.add_argument("--archs", default="resnet20,mobilenetv2,vgg16")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of prunable weights removed (part 3)")
    ap.add_argument("--arch-rounds", type=int, default=5, help="timing rounds per batch size (part 3)")


def _table(title: str, rows: list[dict]) -> None:
    """Print one table without the JSON line (``emit`` prints the last table and the JSON)."""
    print(title)
    cols = list(rows[0])
    width = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    print("  ".join("-" * width[c] for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(width[c]) for c in cols))
    print()


def main(argv: list[str] | None = None) -> None:
    a = step_args("prune", __doc__, argv, _extra)
    sections, figures = [], {}
    if a.part in ("all", "step"):
        rows = bench_masked_step("cnn1d", cnn1d((40,), 10), a.rounds, a.steps)
        rows += bench_masked_step("mlp", mlp((40,), 10), a.rounds, a.steps)
        short = {
            "qpexp masks (MaskKeeper after step)": "qpexp",
            "torch.nn.utils.prune hooks": "torch_hooks",
            "MaskKeeper() call alone": "keeper_call",
        }
        for r in rows:
            if r["variant"] in short:
                figures[f"{r['model']}/{short[r['variant']]}/x_dense"] = round(r["x dense"], 3)
        sections.append((f"Masked training step (50% unstructured, batch {BATCH})", rows))
    if a.part in ("all", "channels"):
        nets = [
            ("lenet5", lambda: lenet5((1, 28, 28), 10), (1, 28, 28)),
            ("vgg_small", vgg_small, (3, 32, 32)),
        ]
        runs = [(net, scope, 0.5) for net in nets for scope in ("global", "layer")]
        runs.append((nets[1], "layer", 0.75))  # half the channels of every layer: Torch-Pruning's "ratio 0.5"
        rows = []
        for (name, build, shape), scope, ratio in runs:
            r, f = bench_channels(name, build, shape, scope, max(5, a.rounds // 2), ratio)
            rows += r
            figures.update(f)
        sections.append(("Channel pruning of small CNNs: latency vs MACs", rows))
    if a.part in ("all", "archs"):
        rows = []
        for name in a.archs.split(","):
            r, f = bench_arch(name, a.ratio, a.arch_rounds)
            rows += r
            figures.update(f)
        sections.append((
            f"Channel pruning of real architectures at 3x32x32: qpexp vs Torch-Pruning's MagnitudePruner, "
            f"{a.ratio} of the prunable weights removed",
            rows,
        ))  # fmt: skip
    print(f"Pruning benchmarks, {a.threads} thread(s), medians of interleaved rounds\n")
    for title, rows in sections[:-1]:
        _table(title, rows)
    emit(sections[-1][1], figures, sections[-1][0])


if __name__ == "__main__":
    main()

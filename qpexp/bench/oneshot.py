"""One-shot compression costs (issue 24), side by side in one process: ``python -m qpexp.bench oneshot``.

Every method runs on the core functions (no Lightning, no pipeline) on the MNIST-1D CNN and the
MNIST-1D transformer (the built-in models at their config defaults), with **untrained** seeded
weights: a method's cost does not depend on the weights' values (GPTQ's and SparseGPT's column
loops, Wanda's scores and AdaRound's fixed number of Adam steps do the same work on any weights).
Calibration batches: the first ``--batches`` unshuffled batches of ``--batch-size`` MNIST-1D training
samples (the default data, standardized; 8 x 100 as ``prune.calib_batches``), inputs only.

Methods (``--methods``; 50%: every prunable weight at that fraction; ``2:4``: N:M, n=2 of m=4):

* ``magnitude_50``: ``|W|``, the lowest 50% of each layer (``layer_masks``): the reference, no calibration;
* ``wanda_50`` / ``wanda_2:4``: :meth:`Wanda.calibrate` (one pass, input norms only), then per weight
  its scores ``|W| x ||X_j||`` ranked within each output row (``row_masks``, the paper's comparison)
  or within N:M groups (``nm_mask``);
* ``sparsegpt_50`` / ``sparsegpt_2:4``: :func:`sparsegpt_prune_` (sequential calibration: one pass over
  the batches per weight, on the already-pruned earlier weights; block 128, damping 0.01);
* ``gptq_4bit`` / ``gptq_3bit``: :func:`gptq_` (sequential, block 128, damping 0.01, no act-order) on the
  model prepared by ``quantize_`` with weights only (per output channel, symmetric, min/max; no
  activation quantizers); self-attention's packed ``in_proj_weight``, quantized in the graph, is
  rounded too (calibrated on the attention's input: no input quantizer);
* ``adaround_4bit``: :func:`adaround_`'s loop (its forward order and input collection, then
  ``round_layer`` with ``--iters`` Adam steps per layer) with a timer around each part; refused on
  models that quantize raw weights in the graph (the transformer), as ``adaround_`` refuses them;
* ``calib_xtx`` (not a method: the yardstick of the calibration itself): :func:`calibrate_` in one
  pass with ``X^T X`` and the norms for every weight, compressing nothing.

Figures per model and method, medians over ``--rounds`` rounds (a round runs every method once on
a fresh copy of each model, in an order rotated from round to round, so machine noise hits them
alike): ``s_per_layer`` (the median over layers of each layer's median compression time, its
calibration excluded), ``compress_s`` (the sum over layers), ``total_s`` (the whole call:
calibration, compression, the rest), ``calib_s`` (the calibration passes: ``calibrate_``'s
``calib_seconds``; AdaRound: its per-layer input collection), ``forward_s`` (one plain forward of
the same model over the same batches, timed in the same call just before: ``calibrate_``'s
``forward_seconds``) and ``calib_x_forward`` (the median of the per-round ratios ``calib_s /
forward_s``: about the number of weights for a sequential calibration, 1 plus the statistics' cost
for one pass). ``peak_extra_bytes``: in one run under ``torch.profiler`` (``profile_memory``)
before the rounds, the peak of the bytes torch's CPU allocator holds above what it held when the
method started (calibration statistics, inverse Hessians, weight copies, collected inputs and
activations all count; the model copy made before does not); AdaRound's memory run takes
``min(--iters, 10)`` steps per layer (its peak does not grow with the steps). That run is also the
warm-up that keeps first-call costs out of the rounds; ``--no-memory`` makes it a plain run. One
thread by default.
Usage: ``python -m qpexp.bench oneshot [--rounds 3] [--batches 8] [--batch-size 100] [--iters 500]
[--models cnn1d,transformer] [--methods ...] [--threads 1] [--quick] [--no-memory]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from functools import partial
from itertools import islice

import torch
from torch import nn

from qpexp.bench import emit
from qpexp.core.prune import prunable_weights, set_mask
from qpexp.core.prune.criteria import Target
from qpexp.core.prune.criteria.wanda import Wanda, row_masks
from qpexp.core.prune.nm import nm_mask
from qpexp.core.prune.sparsegpt import sparsegpt_prune_
from qpexp.core.prune.unstructured import layer_masks
from qpexp.core.quant import QuantConfig, QuantSpec, quantize_
from qpexp.core.quant.adaround import _forward_order, _layer_inputs, round_layer
from qpexp.core.quant.calibrate import calibrate_
from qpexp.core.quant.gptq import gptq_
from qpexp.core.quant.graph import graph_quantizers
from qpexp.data import ArrayDataModule, mnist1d
from qpexp.models import cnn1d, transformer

MODELS = {"cnn1d": cnn1d, "transformer": transformer}
METHODS = ("magnitude_50", "wanda_50", "wanda_2:4", "sparsegpt_50", "sparsegpt_2:4",
           "gptq_4bit", "gptq_3bit", "adaround_4bit", "calib_xtx")  # fmt: skip
MEM_ITERS = 10  # AdaRound steps per layer in the memory run


# -- the methods: each takes a fresh model and returns its per-layer compression seconds ----------
def _magnitude(model: nn.Module, batches, a) -> dict:
    layers = {}
    for name, m, pname in prunable_weights(model):
        start = time.perf_counter()
        w = getattr(m, pname).detach()
        set_mask(m, layer_masks({name: w.abs()}, {name: 0.5}, 0.0)[name], pname)
        layers[name] = time.perf_counter() - start
    return {"layers": layers, "calib": "none"}


def _wanda(model: nn.Module, batches, a, nm: tuple[int, int] | None = None) -> dict:
    crit = Wanda()
    rec = crit.calibrate(model, batches)
    layers = {}
    for name, m, pname in prunable_weights(model):
        start = time.perf_counter()
        scores = crit(Target(name, getattr(m, pname)))
        set_mask(m, nm_mask(scores, *nm) if nm else row_masks(scores, 0.5), pname)
        layers[name] = time.perf_counter() - start
    return {"layers": layers, "calib": "one pass", **_calib_of(rec)}


def _sparsegpt(model: nn.Module, batches, a, nm: tuple[int, int] | None = None) -> dict:
    ratios = {n: 0.5 for n, _, _ in prunable_weights(model)}
    rec = sparsegpt_prune_(model, batches, ratios, nm, sequential=True)
    layers = {n: d["compress_seconds"] for n, d in rec["layers"].items()}
    return {"layers": layers, "calib": "sequential", **_calib_of(rec)}


def _gptq(model: nn.Module, batches, a) -> dict:
    rec = gptq_(model, batches, sequential=True)
    layers = {n: d["compress_seconds"] for n, d in rec["layers"].items()}
    return {"layers": layers, "calib": "sequential", **_calib_of(rec)}


def _adaround(model: nn.Module, batches, a) -> dict:
    """``adaround_``'s loop with a timer around each layer's input collection and rounding."""
    forward = _forward(model, batches)
    model.eval()
    layers, calib = {}, 0.0
    for name, q in _forward_order(model, batches[0]):
        if q.wq is None:
            continue
        start = time.perf_counter()
        x = _layer_inputs(model, q, batches)
        calib += time.perf_counter() - start
        start = time.perf_counter()
        round_layer(q, x, iters=a.iters)
        layers[name] = time.perf_counter() - start
    return {"layers": layers, "calib": "sequential", "calib_s": calib, "forward_s": forward}


def _calib_xtx(model: nn.Module, batches, a) -> dict:
    rec = calibrate_(model, batches, lambda site, stats: None, sequential=False, hessian=True)
    return {"layers": {}, "calib": "one pass", **_calib_of(rec)}


def _calib_of(rec: dict) -> dict:
    return {"calib_s": rec["calib_seconds"], "forward_s": rec["forward_seconds"]}


@torch.no_grad()
def _forward(model: nn.Module, batches) -> float:
    """Seconds of one plain forward (eval mode, no grad) over ``batches``."""
    was = model.training
    model.eval()
    start = time.perf_counter()
    for x in batches:
        model(x)
    model.train(was)
    return time.perf_counter() - start


def _weight_quant(bits: int) -> QuantConfig:
    w = QuantSpec(bits=bits, granularity="channel", symmetric=True, range="minmax")
    return QuantConfig(weight=w, act=QuantSpec(bits=32))


RUN = {
    "magnitude_50": (_magnitude, None),
    "wanda_50": (_wanda, None),
    "wanda_2:4": (partial(_wanda, nm=(2, 4)), None),
    "sparsegpt_50": (_sparsegpt, None),
    "sparsegpt_2:4": (partial(_sparsegpt, nm=(2, 4)), None),
    "gptq_4bit": (_gptq, 4),
    "gptq_3bit": (_gptq, 3),
    "adaround_4bit": (_adaround, 4),
    "calib_xtx": (_calib_xtx, None),
}  # method -> (function, weight bits of the quantized copy it runs on, or None: the float model)


def prepared(model: nn.Module, method: str, example: torch.Tensor) -> nn.Module | None:
    """A fresh copy of ``model`` for ``method`` (quantized where it quantizes; not timed), or None
    where the method refuses the model (AdaRound on raw weights quantized in the graph)."""
    bits = RUN[method][1]
    m = copy.deepcopy(model)
    if bits is None:
        return m
    quantize_(m, _weight_quant(bits), example)
    if method.startswith("adaround") and any(getattr(q, "is_weight", False) for _, q in graph_quantizers(m)):
        return None
    return m


def run_once(model: nn.Module, method: str, batches, a) -> dict:
    """One timed run of ``method`` on a fresh copy; adds ``total_s`` (the call's wall time)."""
    m = prepared(model, method, batches[0][:1])
    if m is None:
        return {}
    start = time.perf_counter()
    out = RUN[method][0](m, batches, a)
    out["total_s"] = time.perf_counter() - start
    return out


# -- peak memory ------------------------------------------------------------------------------------
def peak_extra_bytes(model: nn.Module, method: str, batches, a) -> int | None:
    """Peak bytes torch's CPU allocator holds above its level at the start of ``method`` (one run
    under ``torch.profiler`` with ``profile_memory``; AdaRound at ``min(iters, 10)`` steps), or None
    where the method refuses the model or this torch's profiler gives no allocation events."""
    from torch.profiler import ProfilerActivity, profile

    m = prepared(model, method, batches[0][:1])
    if m is None:
        return None
    low = argparse.Namespace(**{**vars(a), "iters": min(a.iters, MEM_ITERS)})
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _fd2_silenced():  # kineto logs every start and stop on the process's stderr
        prof.start()
    try:
        RUN[method][0](m, batches, low)
    finally:
        with _fd2_silenced():
            prof.stop()
    return _peak(prof)


@contextlib.contextmanager
def _fd2_silenced():
    """File descriptor 2 to /dev/null for the duration (C++ logging bypasses ``sys.stderr``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak(prof) -> int | None:
    """The highest running sum of the allocation events' sizes (frees are negative), in time order."""
    try:
        from torch._C._profiler import _EventType

        stack = list(prof.profiler.kineto_results.experimental_event_tree())
    except (ImportError, AttributeError):  # a torch without the event tree
        return None
    sizes = []
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    held = peak = 0
    for _, size in sorted(sizes):
        held += size
        peak = max(peak, held)
    return peak


# -- rounds, figures, table -------------------------------------------------------------------------
def measure(models: dict[str, nn.Module], methods: list[str], batches, a) -> dict[tuple[str, str], list]:
    """``--rounds`` rounds; in each, every model's methods once, in an order rotated from round to
    round (no method always runs first)."""
    runs: dict[tuple[str, str], list] = {(mn, me): [] for mn in models for me in methods}
    for r in range(a.rounds):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for mn, model in models.items():
            for me in order:
                runs[(mn, me)].append(run_once(model, me, batches, a))
    return runs


def warm_up(
    models: dict[str, nn.Module], methods: list[str], batches, a
) -> dict[tuple[str, str], int | None]:
    """One untimed run of every method before the rounds (first-call costs out of the figures): the
    profiled memory run, or with ``--no-memory`` a plain run at ``min(iters, 10)`` AdaRound steps.
    Returns the peaks measured."""
    low = argparse.Namespace(**{**vars(a), "iters": min(a.iters, MEM_ITERS)})
    peaks = {}
    for mn, model in models.items():
        for me in methods:
            if a.no_memory:
                run_once(model, me, batches, low)
            else:
                peaks[(mn, me)] = peak_extra_bytes(model, me, batches, a)
    return peaks


def summarize(runs: list[dict]) -> dict:
    """Medians over rounds (see the module doc); ``{"refused": True}`` where the method refused."""
    if not runs[0]:
        return {"refused": True}
    med = statistics.median
    names = list(runs[0]["layers"])
    out = {"layers": len(names), "calib": runs[0]["calib"], "total_s": med(r["total_s"] for r in runs)}
    if names:
        out["s_per_layer"] = med(med(r["layers"][n] for r in runs) for n in names)
        out["compress_s"] = med(sum(r["layers"].values()) for r in runs)
    if "calib_s" in runs[0]:
        out["calib_s"] = med(r["calib_s"] for r in runs)
        out["forward_s"] = med(r["forward_s"] for r in runs)
        out["calib_x_forward"] = med(r["calib_s"] / r["forward_s"] for r in runs)
    return out


def _row(model: str, method: str, s: dict) -> dict:
    peak = s.get("peak_extra_bytes")
    return {
        "model": model,
        "method": method,
        "layers": s.get("layers", "refused"),
        "calib": s.get("calib", "-"),
        "calib s": s.get("calib_s", "-"),
        "fwd s": s.get("forward_s", "-"),
        "calib x fwd": s.get("calib_x_forward", "-"),
        "s/layer (median)": s.get("s_per_layer", "-"),
        "compress s": s.get("compress_s", "-"),
        "total s": s.get("total_s", "-"),
        "peak extra KiB": "-" if peak is None else peak / 1024,
    }


def calib_batches(n: int, batch_size: int) -> list[torch.Tensor]:
    """The first ``n`` unshuffled MNIST-1D training batches (the default data, standardized), inputs only."""
    dm = ArrayDataModule(partial(mnist1d, num_samples=5000, seed=42), name="mnist1d", batch_size=batch_size)
    dm.prepare()
    return [x for x, _ in islice(dm.loader("train", shuffle=False), n)]


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m qpexp.bench oneshot", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=8, help="calibration batches")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--iters", type=int, default=500, help="AdaRound's Adam steps per layer")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true", help="skip the profiled memory run")
    ap.add_argument("--quick", action="store_true", help="1 round, 2 batches of 20, AdaRound 2 steps (tests)")
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.batches, a.batch_size, a.iters = 1, 2, 20, 2
    for key, known in (("models", MODELS), ("methods", METHODS)):
        chosen = getattr(a, key).split(",")
        unknown = [c for c in chosen if c not in known]
        if unknown:
            ap.error(f"--{key}: unknown {unknown}; choose among {','.join(known)}")
        setattr(a, key, chosen)
    return a


def main(argv: list[str] | None = None) -> None:
    a = _args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    batches = calib_batches(a.batches, a.batch_size)
    models = {}
    for name in a.models:
        torch.manual_seed(0)
        models[name] = MODELS[name](tuple(batches[0].shape[1:]), 10)
    peaks = warm_up(models, a.methods, batches, a)
    runs = measure(models, a.methods, batches, a)
    rows, figures = [], {}
    for (mn, me), r in runs.items():
        s = summarize(r)
        if (mn, me) in peaks and not s.get("refused"):
            s["peak_extra_bytes"] = peaks[(mn, me)]
        rows.append(_row(mn, me, s))
        figures.update({f"{mn}/{me}/{k}": v for k, v in s.items()})
    figures.update({"rounds": a.rounds, "calib_batches": a.batches, "batch_size": a.batch_size,
                    "adaround_iters": a.iters, "threads": a.threads, "weights": "untrained"})  # fmt: skip
    title = (
        f"One-shot compression on the core functions, untrained weights, {a.batches} calibration batches "
        f"of {a.batch_size}, {a.threads} thread(s), median of {a.rounds} interleaved round(s)"
    )
    emit(rows, figures, title)


if __name__ == "__main__":
    main()

"""AdaRound (Nagel et al. 2020): learned up/down rounding of weights for post-training quantization.

Layer by layer in forward order, for a prepared (``quantize_``) and calibrated model in eval mode:
the layer's inputs are taken from the model whose earlier layers are already rounded (and whose
activations are fake-quantized), and a soft rounding variable ``V`` per weight is learned so that the
layer's output with ``W~ = S (clamp(floor(W/S) + h(V) + Z, qmin, qmax) - Z)`` matches its output with
the float weight ``W`` on the same inputs. ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``
(the rectified sigmoid, zeta=1.1, gamma=-0.1); the loss is the squared output error plus
``reg * sum(1 - |2h - 1|^beta)`` with ``beta`` annealed from 20 to 2 after a 20% warm-up without it,
minimised with Adam. Then every weight is rounded to ``floor(W/S) + [V >= 0]`` and written back as
``S (q - Z)`` (kept inside the original range, so that a min/max weight quantizer recomputes the same
scale: the elements that set the range keep their value and their nearest code), and the layer's own
quantizer is checked to give exactly those codes. Pruned weights (``weight_mask``) stay zero. A
layer whose hard rounding reconstructs worse than nearest rounding (soft variables not settled after
too few iterations) keeps nearest rounding.

Supports the linear weight scheme (min/max or LSQ ranges, per tensor or per channel) on conv/linear
layers (:class:`QuantLayer`); raw weight parameters quantized in the graph and other schemes raise
``ValueError`` naming ``quant.rounding``.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from qpexp.core.quant.graph import graph_quantizers
from qpexp.core.quant.layers import quant_layers
from qpexp.core.quant.linear import LinearQuantizer
from qpexp.core.quant.qparams import hold_range, range_setters

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _layer_out(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, layer.bias)
    return layer._conv_forward(x, w, layer.bias)


def _qparams(wq: LinearQuantizer, w: torch.Tensor):
    """The weight quantizer's scale and zero point for ``w``, shaped to broadcast against it."""
    scale, zero = wq.qparams(w)
    shape = [1] * w.dim()
    if wq.per_channel:
        shape[wq.ch_axis] = -1
    return scale.detach().reshape(shape).clone(), zero.reshape(shape).to(w.dtype)


def _reduce_dims(wq: LinearQuantizer, w: torch.Tensor) -> tuple[int, ...]:
    """The dimensions a weight quantizer's range is taken over (all but the channel axis per channel)."""
    return tuple(d for d in range(w.dim()) if d != wq.ch_axis) if wq.per_channel else tuple(range(w.dim()))


def _range_setters(wq: LinearQuantizer, w: torch.Tensor) -> torch.Tensor | None:
    """Elements whose value sets a min/max weight quantizer's range (None for LSQ: its scale is learned)."""
    if wq.range == "lsq":
        return None
    return range_setters(w, _reduce_dims(wq, w), wq.symmetric)


class _Grid:
    """A layer's float weight ``w`` on its quantizer's grid: scale, zero point, code range, the
    nearest codes, ``floor(w / S)`` and the pruning mask."""

    def __init__(self, layer: nn.Module, wq: LinearQuantizer):
        w = layer.weight.detach().clone()
        wq(w)  # an LSQ quantizer takes its initial step from the first weight it sees
        self.w = w
        self.scale, self.zero = _qparams(wq, w)
        self.qmin, self.qmax = wq.qmin, wq.qmax
        self.mask = getattr(layer, "weight_mask", None)
        self.nearest = wq.int_repr(w)
        self.base = torch.floor(w * (1.0 / self.scale))

    def initial_v(self) -> nn.Parameter:
        """``V`` with ``h(V) = rest``: the float weight's own position between its two grid points."""
        rest = (self.w * (1.0 / self.scale) - self.base).clamp(0.0, 1.0)
        return nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1).clamp(-20, 20))

    def soft(self, h: torch.Tensor) -> torch.Tensor:
        """The weight rounded up by ``h`` (in [0, 1]) from ``floor(w / S)``; pruned weights zero."""
        ws = (torch.clamp(self.base + h + self.zero, self.qmin, self.qmax) - self.zero) * self.scale
        return ws if self.mask is None else ws * self.mask

    def weight(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes - self.zero) * self.scale


def _beta_at(t: float, beta: tuple[float, float], warmup: float) -> float | None:
    """The regulariser's exponent at training progress ``t`` (cosine from ``beta[0]`` to
    ``beta[1]`` after the warm-up; None during the warm-up: no regulariser)."""
    if t < warmup:
        return None
    return beta[1] + 0.5 * (beta[0] - beta[1]) * (1 + math.cos(math.pi * (t - warmup) / (1 - warmup)))


def _learn(layer, x, target, grid: _Grid, v: nn.Parameter, iters, lr, reg, beta, warmup, batch_size, seed):
    """Adam on ``V``: the squared output error on random batches of ``x`` plus the annealed
    rounding regulariser."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([v], lr=lr)
    n = len(x)
    with torch.enable_grad():  # callers may run under no_grad (calibration)
        for i in range(iters):
            idx = torch.randperm(n, generator=g)[:batch_size] if n > batch_size else slice(None)
            h = rectified_sigmoid(v)
            out = _layer_out(layer, x[idx], grid.soft(h))
            loss = (out - target[idx]).pow(2).flatten(1).sum(1).mean()
            b = _beta_at(i / iters, beta, warmup)
            if b is not None:
                loss = loss + reg * (1 - (2 * h - 1).abs().pow(b)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def _hard_codes(layer, wq, x, target, grid: _Grid, v: nn.Parameter):
    """The learned codes (``floor(w / S) + [V >= 0]``; pruned weights the code of zero, range setters
    their nearest code), or the nearest codes where those reconstruct better. Returns the codes
    (float), the range setters, the output errors ``{"nearest", "adaround"}`` and whether nearest
    rounding was kept."""
    w, zero, nearest = grid.w, grid.zero, grid.nearest
    codes = torch.clamp(grid.base + (v >= 0).to(w.dtype) + zero, grid.qmin, grid.qmax)
    if grid.mask is not None:  # pruned weights: the code of zero
        codes = torch.where(grid.mask.bool(), codes, zero.expand_as(codes))
    keep = _range_setters(wq, w)
    if keep is not None:
        codes = torch.where(keep, nearest.to(w.dtype), codes)
    # hard rounding can land worse than nearest when the soft variables did not settle (too few
    # iterations): then the layer keeps nearest rounding
    err = {
        name: float((_layer_out(layer, x, grid.weight(c)) - target).pow(2).mean())
        for name, c in (("nearest", nearest.to(w.dtype)), ("adaround", codes))
    }
    kept_nearest = err["adaround"] > err["nearest"]
    if kept_nearest:
        codes = nearest.to(w.dtype)
    return codes, keep, err, kept_nearest


@torch.no_grad()
def _write_back(layer, wq, grid: _Grid, codes: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Write ``S (codes - Z)`` into the layer's weight (kept inside the original range, so that a
    min/max quantizer recomputes the same scale) and check that its quantizer gives exactly
    ``codes``; returns them as int32."""
    w, mask = grid.w, grid.mask
    new = grid.weight(codes)
    if keep is not None:  # inside the original range: the same min/max, the same scale
        new = hold_range(w, new, keep, _reduce_dims(wq, w), wq.symmetric)
    if mask is not None:
        new = new * mask
    layer.weight.copy_(new)
    codes = codes.to(torch.int32)
    got = wq.int_repr(layer.weight)
    if not torch.equal(got, codes):
        bad = int((got != codes).sum())
        raise RuntimeError(f"adaround: the weight quantizer gives {bad} codes other than the learned ones")
    return codes


def round_layer(
    qlayer: nn.Module,
    x: torch.Tensor,
    iters: int = 500,
    lr: float = 1e-2,
    reg: float = 0.01,
    beta: tuple[float, float] = (20.0, 2.0),
    warmup: float = 0.2,
    batch_size: int = 512,
    seed: int = 0,
) -> dict:
    """Learn the rounding of ``qlayer``'s weight on its (already fake-quantized) inputs ``x``, write it
    back and return ``{"codes", "nearest", "mse_nearest", "mse_adaround", "kept_nearest"}`` (the output
    errors on ``x`` against the float weight's output)."""
    layer, wq = qlayer.layer, qlayer.wq
    if not isinstance(wq, LinearQuantizer):
        raise ValueError(
            f"quant.rounding=adaround supports the linear weight scheme only; got {type(wq).__name__}"
        )
    if getattr(wq, "per_group", False):
        raise ValueError(
            "quant.granularity=group is not supported with quant.rounding=adaround: use quant.rounding=gptq or nearest"
        )
    grid = _Grid(layer, wq)
    v = grid.initial_v()
    with torch.no_grad():
        target = _layer_out(layer, x, grid.w)
    _learn(layer, x, target, grid, v, iters, lr, reg, beta, warmup, batch_size, seed)
    codes, keep, err, kept_nearest = _hard_codes(layer, wq, x, target, grid, v)
    codes = _write_back(layer, wq, grid, codes, keep)
    return {
        "codes": codes,
        "nearest": grid.nearest,
        "mse_nearest": err["nearest"],
        "mse_adaround": min(err["nearest"], err["adaround"]),
        "kept_nearest": kept_nearest,
    }


def _forward_order(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module]]:
    order: list[str] = []
    layers = dict(quant_layers(model))
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
        for n, m in layers.items()
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return [(n, layers[n]) for n in order]


@torch.no_grad()
def _layer_inputs(model: nn.Module, qlayer: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """``qlayer``'s inputs on ``batches`` after its input quantizer (the model in eval mode)."""
    xs: list[torch.Tensor] = []
    hook = qlayer.register_forward_pre_hook(lambda mod, args: xs.append(args[0].detach()))
    try:
        for x in batches:
            model(x)
    finally:
        hook.remove()
    x = torch.cat(xs)
    return qlayer.aq(x) if qlayer.aq is not None else x


def adaround_(model: nn.Module, batches: list[torch.Tensor], iters: int = 500, **kwargs) -> dict:
    """Round every quantized conv/linear weight of the calibrated ``model`` with AdaRound, in place.

    ``batches``: calibration inputs (a few training batches). Returns, per layer,
    ``{name: {"changed": fraction of codes other than nearest rounding, "mse_nearest", "mse_adaround"}}``
    (the layer's output error against its float weight on the same inputs), ``"seconds"`` and
    ``"nearest_only"``: the weights quantized in the graph (raw parameters such as attention's
    ``in_proj_weight``), which keep nearest rounding, as under GPTQ.
    """
    raw = [n for n, q in graph_quantizers(model) if getattr(q, "is_weight", False)]
    start = time.perf_counter()
    was = model.training
    model.eval()
    out: dict = {}
    try:
        for name, q in _forward_order(model, batches[0]):
            if q.wq is None:
                continue
            x = _layer_inputs(model, q, batches)
            r = round_layer(q, x, iters=iters, **kwargs)
            out[name] = {
                "changed": float((r["codes"] != r["nearest"]).float().mean()),
                "mse_nearest": r["mse_nearest"],
                "mse_adaround": r["mse_adaround"],
                "kept_nearest": r["kept_nearest"],
            }
    finally:
        model.train(was)
    out["seconds"] = time.perf_counter() - start
    out["nearest_only"] = raw
    return out

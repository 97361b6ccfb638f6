"""GPTQ (Frantar et al. 2023): one-shot weight quantization with error feedback through the inverse Hessian.

For a weight ``W`` (``rows x d``) and its inputs' proxy Hessian ``H = X^T X / n``
(:mod:`qpexp.core.quant.calibrate`), the columns are quantized one after the other; the error of column
``j``, ``e = (w_j - q_j) / [H^-1]_jj``, is fed into the columns not yet quantized,
``W[:, j:] -= e [H^-1]_{j, j:}``, which is the least-squares optimal update of the remaining weights
(the OBS step). As in the paper's Algorithm 1: ``H`` is damped by ``damp * mean(diag H)`` on its
diagonal, ``H^-1`` is taken in its upper Cholesky form (``chol(H^-1)^T``, whose rows are the rows of
``H^-1`` restricted to the remaining columns, rescaled), updates inside a block of ``block`` columns
are applied at once, and the rest of the matrix is updated once per block (lazy batch updates);
``act_order`` quantizes the columns in order of decreasing ``diag H``. Input columns that are always
zero on the calibration data (``diag H = 0``) get ``H_jj = 1``: they are rounded to nearest, with
no feedback.

The codes are qpexp's own weight quantizer's (:class:`~qpexp.core.quant.linear.LinearQuantizer`,
per tensor or per output channel, symmetric or not, min/max or LSQ ranges): the scale and zero point
come from the layer's quantizer on the float weight, every column is rounded onto that grid, and the
result is written back as ``S (q - Z)`` such that the layer's own quantizer gives exactly those
codes (checked), so ``size_bits``, the integer file and ONNX see them. With a min/max range the
elements that set the range keep their nearest code (and their value), so the quantizer recomputes
the same scale; pruned weights (``weight_mask``) keep the code of zero. A layer whose GPTQ output
error on the calibration inputs (``tr(dW H dW^T)``) exceeds nearest rounding's keeps nearest
rounding.

Per-group scales (``granularity=group``, :func:`_gptq_groups`): as the GPTQ reference code, each
group's scale and zero point come from its columns' current, error-updated values when the loop
reaches the group's first column (the group's range setters keep their code and their value);
with ``act_order`` the groups are static, their grids taken from the float weight up front (the
reference's ``static_groups``), since act-order visits a group's columns out of order.

Imports only torch.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from qpexp.core.quant import groups as G
from qpexp.core.quant.adaround import _qparams, _range_setters
from qpexp.core.quant.calibrate import LayerStats, Site, calibrate_, sites
from qpexp.core.quant.graph import graph_quantizers
from qpexp.core.quant.linear import LinearQuantizer
from qpexp.core.quant.qparams import hold_range, range_setters


def inverse_hessian_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` (dead columns: ``H_jj = 1``), float64."""
    h = h.double().clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(damp * float(diag.mean()))
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True)


def gptq_columns(w: torch.Tensor, h: torch.Tensor, quant, block: int = 128, damp: float = 0.01,
                 act_order: bool = False, group_size: int = 0, group_start=None) -> torch.Tensor:  # fmt: skip
    """GPTQ's Algorithm 1 on ``w`` (``rows x d``) with Hessian ``h`` (``d x d``): returns the quantized
    weight (float64, same column order as ``w``). ``quant(j, col)`` quantizes column ``j`` (its index
    in ``w``) given its current, error-updated values and returns the quantized values.

    ``group_start(j, cur)`` (with ``group_size``, not with ``act_order``) is called when the loop
    reaches column ``j``, the first of a group, with ``cur``: the current, error-updated values of the
    group's columns ``j .. j + group_size - 1`` (every update from the columns before ``j`` applied,
    the pending lazy block update included), before column ``j`` is quantized."""
    if group_start is not None and (act_order or group_size < 1):
        raise ValueError("gptq_columns: group_start needs group_size >= 1 and no act_order")
    w = w.double().clone()
    d = w.shape[1]
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(d)
    w, h = w[:, perm], h[perm][:, perm]
    u = inverse_hessian_upper(h, damp)
    q = torch.zeros_like(w)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if group_start is not None and (i1 + i) % group_size == 0:
                b = min(i1 + i + group_size, d)
                cur = w1[:, i : min(b, i2) - i1]
                if b > i2:  # the group runs past this block: its pending update so far (err1 is 0 from i on)
                    cur = torch.cat([cur, w[:, i2:b] - err1 @ u[i1:i2, i2:b]], 1)
                group_start(i1 + i, cur)
            col = w1[:, i]
            qc = quant(int(perm[i1 + i]), col).double()
            q[:, i1 + i] = qc
            e = (col - qc) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    out = torch.empty_like(q)
    out[:, perm] = q
    return out


def output_error(dw: torch.Tensor, h: torch.Tensor) -> float:
    """Mean squared output error ``tr(dW H dW^T)`` of a weight change ``dW`` on inputs with ``H``."""
    dw = dw.double()
    return float(((dw @ h.double()) * dw).sum())


def _grid(wq: LinearQuantizer, w: torch.Tensor):
    """Scale and zero point as ``(out, 1)`` or ``(1, 1)`` float64 columns, and the nearest codes."""

    wq(w)  # an LSQ quantizer takes its initial step from the first weight it sees
    scale, zero = _qparams(wq, w)
    rows = w.shape[0] if wq.per_channel else 1
    return scale.reshape(rows, 1).double(), zero.reshape(rows, 1).double(), wq.int_repr(w)


def _write_back(wq: LinearQuantizer, weight: torch.Tensor, w: torch.Tensor, codes: torch.Tensor,
                scale: torch.Tensor, zero: torch.Tensor, setters, mask) -> None:  # fmt: skip
    """Store ``S (q - Z)`` (range setters: their own value, others inside the original range) and
    check that the layer's quantizer gives exactly ``codes``."""
    shape = w.shape
    w2 = w.reshape(shape[0], -1)
    new = ((codes.double() - zero) * scale).to(w.dtype)
    if setters is not None:
        dims = 1 if wq.per_channel else (0, 1)
        new = hold_range(w2, new, setters.reshape(shape[0], -1), dims, wq.symmetric)
    if mask is not None:
        new = new * mask.reshape(shape[0], -1)
    weight.copy_(new.reshape(shape))
    got = wq.int_repr(weight).reshape(shape[0], -1)
    if not torch.equal(got, codes.to(torch.int32)):
        raise RuntimeError(
            f"gptq: the weight quantizer gives {int((got != codes).sum())} codes other than GPTQ's"
        )


def _group_grid(wq: LinearQuantizer, w2: torch.Tensor, group_size: int) -> dict:
    """A weight's ``(rows, K)`` view ``w2`` (its own dtype) on per-group grids of ``group_size``
    columns, computed by the layer's quantizer: per element (``(rows, K)``) the scale and zero point
    (float64), the nearest code, and whether it sets its group's min/max range."""
    c, k = w2.shape
    wg = G.padded(w2, group_size)  # zero padding changes no range (module doc of groups)
    scale, zero = wq._weight_qparams(wg)
    code = torch.round(wg * (1.0 / scale).reshape(-1, 1)) + zero.reshape(-1, 1)  # int_repr's arithmetic
    code = code.clamp(wq.qmin, wq.qmax)
    full = lambda v: G.expand(v.reshape(-1), c, k, group_size)  # noqa: E731
    return {
        "scale": full(scale.double()),
        "zero": full(zero.double()),
        "codes": G.unpadded(code, c, k).to(torch.int32),
        "setters": G.unpadded(range_setters(wg, (1,), wq.symmetric), c, k),
    }


def _gptq_groups(site: Site, stats: LayerStats, block: int, damp: float, act_order: bool) -> dict:
    """GPTQ onto per-group grids (``granularity=group``), as the reference implementation: without
    ``act_order`` the scale (and zero point) of a group comes from the *current* (error-updated)
    values of its columns when the loop reaches its first column (pruned positions read as 0); the
    elements that set that range keep their code and their value, so that the layer's min/max
    quantizer recomputes the same scale from the written weight. With ``act_order`` the groups are
    static (the reference's ``static_groups``): every group's grid comes from the float weight up
    front, as per channel. Nearest rounding (float weight's grids) is kept where it is better."""
    wq, weight = site.wq, site.weight
    t0 = time.perf_counter()
    w = weight.detach().clone()
    wq(w)
    rows, gs = w.shape[0], wq.group_size
    w2 = w.reshape(rows, -1)
    k = w2.shape[1]
    mask = getattr(site.owner, f"{site.pname}_mask", None)
    mask2 = None if mask is None else mask.reshape(rows, -1).to(w.dtype)
    dead = torch.zeros_like(w2, dtype=torch.bool) if mask2 is None else mask2 == 0
    near = _group_grid(wq, w2, gs)
    # the grids GPTQ quantizes on: static (act_order) or set group by group in ``start``
    grid = {key: v.clone() for key, v in near.items()}
    value = w2.clone()  # what a range setter is written back as
    codes = torch.empty_like(near["codes"])
    h_all = stats.mean_hessian()
    g = stats.hessian.shape[0]
    per = rows // g
    for gi in range(g):
        r = slice(gi * per, (gi + 1) * per)

        def start(p, cur, r=r):
            cols = slice(p, p + cur.shape[1])
            cw = cur.to(w.dtype)
            if mask2 is not None:
                cw = cw * mask2[r, cols]
            sub = _group_grid(wq, cw, cur.shape[1])
            for key, v in sub.items():
                grid[key][r, cols] = v
            value[r, cols] = cw

        def quant(j, col, r=r):
            s, z = grid["scale"][r, j], grid["zero"][r, j]
            c = torch.clamp(torch.round(col / s) + z, wq.qmin, wq.qmax)
            fixed = torch.where(dead[r, j], z, grid["codes"][r, j].double())
            c = torch.where(grid["setters"][r, j] | dead[r, j], fixed, c)
            codes[r, j] = c.to(codes.dtype)
            return (c - z) * s

        gptq_columns(w2[r], h_all[gi], quant, block, damp, act_order, gs, None if act_order else start)
    errors = {}
    for key, c, gr in (("nearest", near["codes"], near), ("gptq", codes, grid)):
        deq = (c.double() - gr["zero"]) * gr["scale"]
        errors[key] = sum(
            output_error(deq[gi * per : (gi + 1) * per] - w2[gi * per : (gi + 1) * per], h_all[gi])
            for gi in range(g)
        )
    kept_nearest = errors["gptq"] > errors["nearest"]
    final, gr, val = (near["codes"], near, w2) if kept_nearest else (codes, grid, value)
    new = ((final.double() - gr["zero"]) * gr["scale"]).to(w.dtype)
    pad = lambda v: G.padded(v, gs)  # noqa: E731  (per group: each row of the padded view)
    new = G.unpadded(hold_range(pad(val), pad(new), pad(gr["setters"]), (1,), wq.symmetric), rows, k)
    if mask2 is not None:
        new = new * mask2
    weight.copy_(new.reshape(w.shape))
    got = wq.int_repr(weight).reshape(rows, -1)
    if not torch.equal(got, final.to(torch.int32)):
        raise RuntimeError(
            f"gptq: the weight quantizer gives {int((got != final).sum())} codes other than GPTQ's (groups)"
        )
    return {
        "changed": float((final != near["codes"]).float().mean()),
        "mse_nearest": errors["nearest"] / rows,
        "mse_gptq": min(errors.values()) / rows,
        "kept_nearest": bool(kept_nearest),
        "gptq_seconds": time.perf_counter() - t0,
        "groups": rows * G.n_groups(k, gs),
    }


@torch.no_grad()
def gptq_layer_(site: Site, stats: LayerStats, block: int = 128, damp: float = 0.01,
                act_order: bool = False) -> dict:  # fmt: skip
    """Quantize ``site``'s weight with GPTQ onto its quantizer's grid, in place (see the module doc)."""

    wq = site.wq
    if not isinstance(wq, LinearQuantizer):
        raise ValueError(
            f"quant.rounding=gptq supports the linear weight scheme only; got {type(wq).__name__}"
        )
    if wq.per_group:
        return _gptq_groups(site, stats, block, damp, act_order)
    start = time.perf_counter()
    weight = site.weight
    w = weight.detach().clone()
    scale, zero, nearest = _grid(wq, w)
    rows = w.shape[0]
    nearest = nearest.reshape(rows, -1)
    mask = getattr(site.owner, f"{site.pname}_mask", None)
    setters = _range_setters(wq, w)
    pinned = torch.zeros_like(nearest, dtype=torch.bool)
    fixed = nearest.clone()
    if setters is not None:
        pinned |= setters.reshape(rows, -1)
    if mask is not None:
        dead = mask.reshape(rows, -1) == 0
        pinned |= dead
        fixed = torch.where(dead, zero.expand_as(fixed).to(fixed.dtype), fixed)
    codes = torch.empty_like(nearest)
    h_all = stats.mean_hessian()
    g = stats.hessian.shape[0]
    per = rows // g
    w2 = w.reshape(rows, -1)
    for gi in range(g):
        r = slice(gi * per, (gi + 1) * per)
        s, z = (scale[r], zero[r]) if scale.shape[0] > 1 else (scale, zero)

        def quant(j, col, r=r, s=s, z=z):
            c = torch.clamp(torch.round(col / s[:, 0]) + z[:, 0], wq.qmin, wq.qmax)
            c = torch.where(pinned[r, j], fixed[r, j].double(), c)
            codes[r, j] = c.to(codes.dtype)
            return (c - z[:, 0]) * s[:, 0]

        gptq_columns(w2[r], h_all[gi], quant, block, damp, act_order)
    errors = {}
    for key, c in (("nearest", nearest), ("gptq", codes)):
        deq = (c.double() - zero) * scale
        errors[key] = sum(
            output_error(deq[gi * per : (gi + 1) * per] - w2[gi * per : (gi + 1) * per], h_all[gi])
            for gi in range(g)
        )
    kept_nearest = errors["gptq"] > errors["nearest"]
    final = nearest if kept_nearest else codes
    _write_back(wq, weight, w, final, scale, zero, setters, mask)
    return {
        "changed": float((final != nearest).float().mean()),
        "mse_nearest": errors["nearest"] / rows,
        "mse_gptq": min(errors.values()) / rows,
        "kept_nearest": bool(kept_nearest),
        "gptq_seconds": time.perf_counter() - start,
    }


def gptq_(model: nn.Module, batches: list[torch.Tensor], block: int = 128, damp: float = 0.01,
          act_order: bool = False, sequential: bool = True) -> dict:  # fmt: skip
    """GPTQ on every quantized conv/linear weight of the calibrated ``model``, in place, from its
    inputs on ``batches`` (each layer's inputs after its input quantizer, measured on the model whose
    earlier layers are already quantized when ``sequential``). Weights quantized in the graph (raw
    parameters) are rounded too when the quantization pass linked their product to its input (a
    single ``F.linear`` on the whole quantized weight: self-attention's packed ``in_proj_weight``;
    :class:`~qpexp.core.quant.graph.LinearInput`), onto their own quantizer's grid; the others
    (cross-attention's chunks of ``in_proj_weight``, recurrent weights, ...) keep nearest rounding
    and are listed under ``"nearest_only"`` (their quantizers' names). Returns
    :func:`~qpexp.core.quant.calibrate.calibrate_`'s record."""

    raw = [(n, q) for n, q in graph_quantizers(model) if getattr(q, "is_weight", False)]

    def compress(site: Site, stats: LayerStats):
        if site.wq is None:
            return {"skipped": "not quantized"}
        return gptq_layer_(site, stats, block, damp, act_order)

    def quantized(s: Site) -> bool:
        return s.wq is not None

    found = [s for s in sites(model) if quantized(s)]
    out = calibrate_(model, batches, compress, sequential=sequential, names={s.name for s in found})
    done = {id(s.wq) for s in found if s.name in out["layers"]}
    out["nearest_only"] = [n for n, q in raw if id(q) not in done]
    return out

"""Issue 3: the quantizers, exact against independent references: the textbook formulas written out
in numpy below (qparams from min/max, round half to even, clamp, ``S (q - Z)``) and hand-computed
examples; never against torch's own fake-quantize kernels that the code calls."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from qpexp.core.prune.masks import set_mask
from qpexp.core.quant import QuantConfig, QuantSpec, fold_batchnorm_, quant_layers, quantize_
from qpexp.core.quant.layers import warn_symmetric_nonnegative
from qpexp.core.quant.linear import (
    FUSED_MAX_NUMEL,
    LinearQuantizer,
    affine_qparams,
    affine_qparams_scalar,
    fake_quant,
    fake_quant_scalar,
    int_range,
)
from qpexp.core.quant.log import CompandingQuantizer, Pow2Quantizer
from qpexp.models import cnn1d

BITS = (2, 3, 4, 5, 6, 7, 8, 16)
# one shape served by torch's fused kernel (< FUSED_MAX_NUMEL elements), one by the vectorized chain
SHAPES = {"small": (16, 3, 5), "large": (FUSED_MAX_NUMEL // 20 + 1, 4, 5)}


def exact(a, b):
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def weight_q(bits, symmetric=True, per_channel=False, channels=1, range_="minmax"):
    spec = QuantSpec(
        bits=bits, symmetric=symmetric, granularity="channel" if per_channel else "tensor", range=range_
    )
    return LinearQuantizer(spec, is_weight=True, channels=channels)


def act_q(bits=8, symmetric=False, range_="minmax", decay=0.9):
    return LinearQuantizer(
        QuantSpec(bits=bits, symmetric=symmetric, range=range_, ema_decay=decay), is_weight=False
    )


# -- the reference: the textbook affine quantizer in numpy (float32 throughout) ----------------------
F32 = np.float32
MIN_SCALE = F32(np.finfo(np.float32).tiny) * F32(2**24)  # qpexp's floor on S: keeps 1/S finite


def np_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Narrow signed ``[-(2^(b-1)-1), 2^(b-1)-1]`` when symmetric, unsigned ``[0, 2^b-1]`` otherwise."""
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def np_qparams_from_range(lo, hi, bits: int, symmetric: bool):
    """Scale and zero point for the range [lo, hi].

    Symmetric: ``S = max(|lo|, |hi|) / qmax``, ``Z = 0``. Asymmetric: the range is widened to contain
    0, ``S = (hi - lo) / (2^b - 1)``, ``Z = qmin - round(lo / S)`` (so 0 is exactly representable)."""
    lo, hi = np.asarray(lo, F32), np.asarray(hi, F32)
    qmin, qmax = np_range(bits, symmetric)
    if symmetric:
        scale = np.maximum(np.maximum(np.abs(lo), np.abs(hi)) / F32(qmax), MIN_SCALE)
        return scale.astype(F32), np.zeros(scale.shape, F32)
    lo, hi = np.minimum(lo, F32(0)), np.maximum(hi, F32(0))
    scale = np.maximum((hi - lo) / F32(qmax - qmin), MIN_SCALE).astype(F32)
    zero = np.clip(F32(qmin) - np.rint(lo / scale), qmin, qmax).astype(F32)
    return scale, zero


def np_qparams(x, bits: int, symmetric: bool, axis: int | None = None):
    """:func:`np_qparams_from_range` of ``x``'s own min/max (per tensor, or per channel along ``axis``)."""
    x = np.asarray(x, F32)
    if axis is None:
        lo, hi = x.min(), x.max()
    else:
        flat = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
        lo, hi = flat.min(1), flat.max(1)
    return np_qparams_from_range(lo, hi, bits, symmetric)


def np_fake_quant(x, scale, zero, qmin: int, qmax: int, axis: int | None = None):
    """``x_hat = S (clamp(round(x/S) + Z, qmin, qmax) - Z)`` with round half to even; returns
    ``(x_hat, codes, ste_mask)``: the straight-through gradient is 1 where the unclamped code lies in
    [qmin, qmax] and 0 elsewhere. ``x/S`` is taken as ``x * (1/S)`` in float32 (qpexp's documented
    convention, that of torch's kernels; the two differ only on a few rounding edges)."""
    x = np.asarray(x, F32)
    scale, zero = np.asarray(scale, F32), np.asarray(zero, F32)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    r = np.rint(x * (F32(1) / scale)) + zero
    q = np.clip(r, F32(qmin), F32(qmax))
    return ((q - zero) * scale).astype(F32), q.astype(np.int64), (r >= qmin) & (r <= qmax)


def t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def test_reference_on_hand_computed_examples():
    """The reference itself, by hand: 2-bit symmetric and asymmetric, ties to even."""
    x = np.array([-1.0, -0.5, 0.2, 0.5, 1.5, 1.0], F32)
    # symmetric 2 bits: codes {-1, 0, 1}, S = max|x| / 1 = 1.5; x/S = -0.67, -0.33, 0.13, 0.33, 1, 0.67
    s, z = np_qparams(x, 2, True)
    assert (float(s), float(z)) == (1.5, 0.0)
    y, q, m = np_fake_quant(x, s, z, -1, 1)
    assert q.tolist() == [-1, 0, 0, 0, 1, 1] and y.tolist() == [-1.5, 0, 0, 0, 1.5, 1.5] and m.all()
    # asymmetric 2 bits on [-1, 2]: S = 3/3 = 1, Z = 0 - round(-1) = 1; 0.5 and 2.5 round to even
    x = np.array([-1.0, 0.0, 0.5, 1.5, 2.0, 2.5, -2.0], F32)
    s, z = np_qparams_from_range(-1.0, 2.0, 2, False)
    assert (float(s), float(z)) == (1.0, 1.0)
    y, q, m = np_fake_quant(x, s, z, 0, 3)
    assert q.tolist() == [0, 1, 1, 3, 3, 3, 0] and y.tolist() == [-1, 0, 0, 2, 2, 2, -1]
    assert m.tolist() == [True, True, True, True, True, True, False]  # -2 -> code -1: clamped
    # an all-positive range is widened to contain 0: [0, 3] at 2 bits, S = 1, Z = 0
    assert tuple(map(float, np_qparams_from_range(1.0, 3.0, 2, False))) == (1.0, 0.0)


# -- linear: equal to the textbook formula, on the fused-kernel path and on the chain path ---------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_full_signed_range_with_a_learned_step(bits, per_channel):
    """``narrow_range=False``: codes in ``[-2^(b-1), 2^(b-1)-1]`` (2 bits: {-2, -1, 0, 1}), ``Z = 0``,
    against the numpy formula at the learned step; the same step with the narrow range never reaches
    ``-2^(b-1)``."""
    full, narrow = (
        LinearQuantizer(
            QuantSpec(
                bits=bits,
                symmetric=True,
                granularity="channel" if per_channel else "tensor",
                range="lsq",
                narrow_range=nr,
            ),
            is_weight=True,
            channels=3,
        )
        for nr in (False, True)
    )
    assert (full.qmin, full.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert int_range(2, True, narrow=False) == (-2, 1)  # by hand: 4 levels
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(bits)) * 2
    for q in (full, narrow):
        q(x)  # initializes the step
        with torch.no_grad():
            q.scale.copy_(torch.tensor([0.9, 0.5, 0.7][: q.scale.numel()]) * 2 / 2**bits)  # some codes clamp
    axis = 0 if per_channel else None
    s = full.scale.detach().numpy()
    want, codes, _ = np_fake_quant(x.numpy(), s, 0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, axis)
    exact(full(x).detach(), t(want))
    exact(full.int_repr(x), t(codes.astype(np.int32)))
    assert int(codes.min()) == -(2 ** (bits - 1))  # the extra level is used
    assert int(narrow.int_repr(x).min()) == -(2 ** (bits - 1)) + 1
    assert full.n_qparams() == narrow.n_qparams()  # the same storage: Z = 0 implicit either way


def test_full_range_is_refused_where_it_means_nothing():
    for spec in (
        QuantSpec(bits=4, symmetric=False, narrow_range=False),
        QuantSpec(bits=4, scheme="log", symmetric=True, narrow_range=False),
    ):
        with pytest.raises(ValueError, match="quant.narrow_range=false needs a symmetric linear"):
            quantize_(cnn1d((40,), 10), QuantConfig(weight=spec))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("size", ["small", "large"])
def test_linear_per_tensor_matches_formula(bits, symmetric, size):
    x = torch.randn(SHAPES[size], generator=torch.Generator().manual_seed(bits)) * 3 + 0.5
    x.requires_grad_(True)
    q = weight_q(bits, symmetric)
    s, z = np_qparams(x.detach().numpy(), bits, symmetric)
    scale, zero = q.qparams(x.detach())
    exact(scale, t(s).reshape(1))
    exact(zero, t(z).reshape(1).to(torch.int32))
    want, codes, mask = np_fake_quant(x.detach().numpy(), s, z, *np_range(bits, symmetric))
    y = q(x)
    exact(y, t(want))
    exact(q.int_repr(x.detach()), t(codes).to(torch.int32))
    g = torch.randn_like(x)
    exact(torch.autograd.grad(y, x, g)[0], g * t(mask))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("size", ["small", "large"])
def test_linear_per_channel_matches_formula(bits, symmetric, size):
    shape = SHAPES[size]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(bits)) * torch.linspace(
        0.1, 5, shape[0]
    ).reshape(-1, 1, 1)
    x.requires_grad_(True)
    q = weight_q(bits, symmetric, per_channel=True, channels=shape[0])
    s, z = np_qparams(x.detach().numpy(), bits, symmetric, axis=0)
    scale, zero = q.qparams(x.detach())
    assert scale.shape == zero.shape == (shape[0],)
    exact(scale, t(s))
    exact(zero, t(z).to(torch.int32))
    want, codes, mask = np_fake_quant(x.detach().numpy(), s, z, *np_range(bits, symmetric), axis=0)
    y = q(x)
    exact(y, t(want))
    exact(q.int_repr(x.detach()), t(codes).to(torch.int32))
    g = torch.randn_like(x)
    exact(torch.autograd.grad(y, x, g)[0], g * t(mask))


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quant_clamps_like_the_formula(size, per_channel):
    """Fixed qparams with much of the input outside the range: forward and STE mask by the formula."""
    shape = SHAPES[size]
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 4).requires_grad_(True)
    n = shape[0] if per_channel else 1
    scale = torch.rand(n, generator=torch.Generator().manual_seed(2)) * 0.05 + 0.01
    zero = torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    y = fake_quant(x, scale, zero, 0, 15, 0 if per_channel else None)
    want, _, mask = np_fake_quant(
        x.detach().numpy(), scale.numpy(), zero.numpy(), 0, 15, 0 if per_channel else None
    )
    exact(y, t(want))
    gx = torch.autograd.grad(y.sum(), x)[0]
    exact(gx, t(mask).float())
    assert 0 < float(gx.mean()) < 1  # both clamped and unclamped elements were exercised


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_int_repr_dequantizes_to_forward(bits, per_channel):
    x = torch.randn(6, 4, 3) * 2 - 0.3
    q = weight_q(bits, symmetric=False, per_channel=per_channel, channels=6)
    codes = q.int_repr(x)
    assert int(codes.min()) >= q.qmin and int(codes.max()) <= q.qmax
    scale, zero = q.qparams(x)
    shape = (-1, 1, 1) if per_channel else ()
    exact((codes - zero.reshape(shape)).float() * scale.reshape(shape), q(x))


# -- linear: ranges and zero points ----------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", ["positive", "negative", "mixed", "zero", "tiny_positive"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_asymmetric_zero_exactly_representable(bits, case, per_channel):
    g = torch.Generator().manual_seed(bits)
    base = {
        "positive": torch.rand(4, 50, generator=g) * 3 + 0.5,
        "negative": -(torch.rand(4, 50, generator=g) * 3 + 0.5),
        "mixed": torch.randn(4, 50, generator=g) * 2 + 0.7,
        "zero": torch.zeros(4, 50),
        "tiny_positive": torch.rand(4, 50, generator=g) * 1e-6 + 1e-7,
    }[case]
    x = base.clone()
    x[:, ::7] = 0.0  # zeros inside every channel
    q = weight_q(bits, symmetric=False, per_channel=per_channel, channels=4)
    y = q(x)
    exact(y[:, ::7], torch.zeros_like(y[:, ::7]))  # 0 -> exactly 0
    scale, zero = q.qparams(x)
    assert bool(((zero >= q.qmin) & (zero <= q.qmax)).all())
    s, z = np_qparams(x.numpy(), bits, False, axis=0 if per_channel else None)
    exact(scale, t(s).reshape(scale.shape))
    exact(zero, t(z).reshape(zero.shape).to(torch.int32))
    exact(y, t(np_fake_quant(x.numpy(), s, z, 0, 2**bits - 1, 0 if per_channel else None)[0]))


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_narrow_range(bits):
    qmin, qmax = int_range(bits, symmetric=True)
    assert (qmin, qmax) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    x = (torch.randn(200) * 3).clamp(-7, 7)
    x[0], x[1] = -7.5, 7.5  # the extremes map to -qmax and qmax, never to -2^(b-1)
    q = weight_q(bits, symmetric=True)
    codes = q.int_repr(x)
    scale, zero = q.qparams(x)
    assert int(codes.min()) == qmin and int(codes.max()) == qmax
    exact(zero, torch.zeros(1, dtype=torch.int32))
    exact(scale, torch.tensor([7.5]) / qmax)
    assert q.n_qparams() == (1, 0)  # Z = 0 is implicit
    assert weight_q(bits, symmetric=False).n_qparams() == (1, 1)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_qparams_tensor_and_scalar_paths_match_formula(bits, symmetric):
    """Both the tensor qparams and the activation quantizer's Python-number fast path equal the
    formula, over ranges spanning 11 decades and the degenerate ones."""
    g = torch.Generator().manual_seed(bits)
    ranges = torch.randn(200, 2, generator=g) * torch.logspace(-8, 3, 200).reshape(-1, 1)
    ranges = torch.cat(
        [ranges, torch.tensor([[0.0, 0.0], [0.0, 1e-30], [-3.0, 0.0], [1.0, 2.0], [-2.0, -1.0]])]
    )
    lo, hi = ranges.min(1).values, ranges.max(1).values
    s, z = np_qparams_from_range(lo.numpy(), hi.numpy(), bits, symmetric)
    scale, zero = affine_qparams(lo, hi, bits, symmetric)
    exact(scale, t(s))
    exact(zero, t(z).to(torch.int32))
    for i in range(len(lo)):
        got = affine_qparams_scalar(lo[i].item(), hi[i].item(), bits, symmetric)
        assert got == (float(s[i]), int(z[i])), (lo[i], hi[i])


@pytest.mark.parametrize("n", [40, FUSED_MAX_NUMEL + 40])
def test_scalar_fake_quant_matches_formula(n):
    x = (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_(True)
    scale = float(np.float32(0.0173))
    y = fake_quant_scalar(x, scale, 37, 0, 63)
    want, _, mask = np_fake_quant(x.detach().numpy(), scale, 37, 0, 63)
    exact(y, t(want))
    exact(torch.autograd.grad(y.sum(), x)[0], t(mask).float())
    assert 0 < mask.sum() < n


def test_loading_a_state_refreshes_the_activation_qparams():
    q = act_q(bits=8)
    q.train()
    q(torch.tensor([-1.0, 1.0]))
    state = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.tensor([-5.0, 5.0]))  # the range grows
    q.load_state_dict(state)  # back to [-1, 1]
    q.eval()
    x = torch.tensor([0.5, 3.0])
    # S = 2/255 rounds up in float32, so 1/S = 127.49999 and Z = round(127.49999) = 127, not 128
    s, z = np_qparams_from_range(-1.0, 1.0, 8, False)
    assert (float(s), float(z)) == (float(F32(2) / F32(255)), 127.0)
    exact(q(x), t(np_fake_quant(x.numpy(), s, z, 0, 255)[0]))
    # the same through a parent model's load_state_dict (how checkpoints and best-epoch selection load)
    m = cnn1d((40,), 10)
    quantize_(m, QuantConfig())
    m.train()
    seen = []
    hook = m.conv2.register_forward_pre_hook(lambda mod, i: seen.append(i[0].detach().clone()))
    m(torch.randn(8, 40))
    hook.remove()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.randn(8, 40) * 10)
    m.load_state_dict(state)
    m.eval()
    h = torch.randn(8, 25, 19).relu() * 3
    s, z = np_qparams(seen[0].numpy(), 8, False)  # the range of the one calibration batch
    exact(m.conv2.aq(h), t(np_fake_quant(h.numpy(), s, z, 0, 255)[0]))


def test_affine_qparams_all_zero_range_keeps_scale_finite():
    scale, zero = affine_qparams(torch.zeros(3), torch.zeros(3), 4, symmetric=False)
    assert bool(torch.isfinite(1.0 / scale).all())
    exact(zero, torch.zeros(3, dtype=torch.int32))


# -- STE, EMA, running min/max ---------------------------------------------------------------------
@pytest.mark.parametrize("n", [40, FUSED_MAX_NUMEL + 40])
def test_ste_gradient_is_one_inside_the_clamp_range_zero_outside(n):
    q = act_q(bits=4)
    calib = torch.linspace(-1, 1, 101)
    q.train()
    q(calib)
    q.eval()
    # by hand: [-1, 1] at 4 bits asymmetric: S = 2/15 (0.13333334 in float32, a little above 2/15),
    # so 1/S = 7.4999996 and Z = 7; the codes 0..15 cover x in [-7 S, 8 S] = [-0.9333, 1.0667];
    # rounding widens that by S/2 on each side
    s, z = F32(2) / F32(15), 7
    assert float(F32(1) / s) < 7.5
    assert (float(q.scale), int(q.zero_point)) == (float(s), z)
    x = torch.linspace(-3, 3, n).requires_grad_(True)
    (grad,) = torch.autograd.grad(q(x).sum(), x)
    r = np.rint(x.detach().numpy() * (F32(1) / s)) + z  # the unclamped code
    inside = (r >= 0) & (r <= 15)
    exact(grad, t(inside).float())
    xs = x.detach().numpy()
    assert inside[(xs > -0.9333 - float(s) / 2 + 1e-3) & (xs < 1.0667 + float(s) / 2 - 1e-3)].all()
    assert not inside[(xs < -1.0) | (xs > 1.134)].any()
    assert 0 < int(inside.sum()) < n  # both cases present
    assert float(s) == float(q.scale)  # eval mode froze the range


def test_activation_minmax_is_running_and_frozen_in_eval():
    q = act_q(bits=8)
    q.train()
    q(torch.tensor([-1.0, 2.0]))
    q(torch.tensor([-0.5, 3.0]))
    exact(q.min_val, torch.tensor([-1.0]))
    exact(q.max_val, torch.tensor([3.0]))
    q.eval()
    q(torch.tensor([-10.0, 10.0]))
    exact(q.max_val, torch.tensor([3.0]))
    s, z = np_qparams_from_range(-1.0, 3.0, 8, False)  # S = 4/255, Z = round(63.75) = 64
    assert float(z) == 64
    exact(q.scale, t(s).reshape(1))
    exact(q.zero_point, t(z).reshape(1).to(torch.int32))


@pytest.mark.parametrize("range_", ["minmax", "ema"])
@pytest.mark.parametrize("n", [40, FUSED_MAX_NUMEL + 40])
def test_training_step_activation_matches_formula_clamped_or_not(range_, n):
    """Training mode, batch after batch: the output and the straight-through gradient equal the formula
    on the range observed so far (the running min/max, or the EMA), both on batches where no code is
    clamped (the unclamped fast path) and on batches where some are (a min/max range's zero point
    can round the top code of its max to ``qmax + 1``; an EMA range lags the batch)."""
    decay = F32(0.9)
    q = act_q(bits=4, range_=range_, decay=float(decay))
    q.train()
    g = torch.Generator().manual_seed(n)
    lo = hi = None
    seen = {"clamped": 0, "unclamped": 0}
    for i in range(60):
        x = torch.randn(n, generator=g) * (1 + i % 5) + float(torch.randn((), generator=g))
        if i == 0:  # by hand: [-1.5, 13.5] at 4 bits: S = 1, Z = 0 - rint(-1.5) = 2, 13.5 -> 14 + 2 = 16
            x = torch.linspace(-1.5, 13.5, n)
        x.requires_grad_(True)
        bl, bh = F32(x.detach().min()), F32(x.detach().max())
        if lo is None:
            lo, hi = bl, bh
        elif range_ == "ema":
            lo, hi = lo * decay + bl * F32(1 - decay), hi * decay + bh * F32(1 - decay)
        else:
            lo, hi = min(lo, bl), max(hi, bh)
        s, z = np_qparams_from_range(lo, hi, 4, False)
        want, _, mask = np_fake_quant(x.detach().numpy(), s, z, 0, 15)
        y = q(x)
        exact(y, t(want))
        gy = torch.randn(n, generator=g)
        exact(torch.autograd.grad(y, x, gy)[0], gy * t(mask))
        seen["unclamped" if mask.all() else "clamped"] += 1
    assert seen["clamped"] > 0 and seen["unclamped"] > 0, seen


def test_ema_range_update():
    decay = 0.8
    q = act_q(bits=8, range_="ema", decay=decay)
    q.train()
    b1, b2, b3 = torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0]), torch.tensor([0.5, 4.0])
    q(b1)
    exact(q.min_val, torch.tensor([-1.0]))  # first batch initializes
    exact(q.max_val, torch.tensor([2.0]))
    lo, hi = F32(-1.0), F32(2.0)
    d, e = F32(decay), F32(1 - decay)
    for b in (b2, b3):
        q(b)
        lo = lo * d + F32(b.min()) * e  # min <- decay min + (1 - decay) batch min, in float32
        hi = hi * d + F32(b.max()) * e
        exact(q.min_val, t(np.array([lo])))
        exact(q.max_val, t(np.array([hi])))
    # by hand: lo = (-1 * .8 - 3 * .2) * .8 + 0.5 * .2 = -1.02, hi = (2 * .8 + .2) * .8 + .8 = 2.24
    assert math.isclose(lo, -1.02, rel_tol=1e-6) and math.isclose(hi, 2.24, rel_tol=1e-6)
    s, z = np_qparams_from_range(lo, hi, 8, False)
    exact(q.scale, t(s).reshape(1))
    exact(q.zero_point, t(z).reshape(1).to(torch.int32))


def test_eval_before_calibration_is_refused():
    q = act_q()
    q.eval()
    with pytest.raises(RuntimeError, match="calibration"):
        q(torch.randn(4))


# -- LSQ (Esser et al. 2020) -----------------------------------------------------------------------
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_step_init(per_channel, bits):
    w = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0))
    q = weight_q(bits, symmetric=True, per_channel=per_channel, channels=5, range_="lsq")
    q(w)
    qp = 2 ** (bits - 1) - 1
    mean_abs = w.abs().mean((1, 2)) if per_channel else w.abs().mean().reshape(1)
    exact(q.scale.detach(), 2 * mean_abs / math.sqrt(qp))


def test_lsq_unsigned_activation_init_uses_qp_of_the_unsigned_range():
    x = torch.rand(100) * 3  # post-ReLU: Z = 0, Q_P = 2^b - 1 (the paper's unsigned case)
    q = act_q(bits=4, range_="lsq")
    q.train()
    y = q(x)
    exact(q.zero_point, torch.zeros(1, dtype=torch.int32))
    exact(q.scale.detach(), 2 * x.abs().mean().reshape(1) / math.sqrt(15))
    exact(y.detach(), t(np_fake_quant(x.numpy(), q.scale.detach().numpy(), 0, 0, 15)[0]))


def lsq_scale_grad(x, g, s, qn, qp):
    """Per-element dL/ds of LSQ (Esser et al. 2020, eq. 3) before the gradient scale:
    ``g * (round(x/s) - x/s)`` inside the range, ``-g Q_N`` below, ``g Q_P`` above.

    ``round(x/s) - x/s`` is evaluated as ``(round(x/s) s - x) / s`` with ``round(x/s) s - x`` rounded
    once (a fused multiply-subtract, computed exactly in float64): torch's kernel is compiled that way.
    """
    inv = 1.0 / s
    xq = torch.round(x * inv)
    below, above = xq < -qn, xq > qp
    diff = (xq.clamp(-qn, qp).double() * s.double() - x.double()).float()
    per_elem = torch.where(below, g * -qn, torch.where(above, g * qp, g * diff * inv))
    return per_elem, ~below & ~above


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_gradients_per_tensor_match_formula(bits):
    """Forward: the textbook formula at the learned step. dx: STE mask; ds = sum g * (round(x/s) - x/s)
    inside, -Q_N / Q_P below / above, times 1/sqrt(N Q_P) (Esser et al. 2020, eq. 3 and section 2.2),
    computed by hand."""
    x = (torch.randn(30, 7, generator=torch.Generator().manual_seed(bits)) * 1.5).requires_grad_(True)
    q = weight_q(bits, symmetric=True, range_="lsq")
    q(x.detach())  # initializes the step
    with torch.no_grad():
        q.scale.copy_(x.abs().max() / q.qmax * 0.5)  # push some values outside the range
    g = torch.randn_like(x)
    y = q(x)
    qn, qp = 2 ** (bits - 1) - 1, 2 ** (bits - 1) - 1
    want, _, mask = np_fake_quant(x.detach().numpy(), q.scale.detach().numpy(), 0, -qn, qp)
    exact(y.detach(), t(want))
    gx, gs = torch.autograd.grad(y, (x, q.scale), g)
    s = q.scale.detach()
    grad_scale = 1.0 / math.sqrt(x.numel() * qp)
    assert q.grad_factor(x) == grad_scale
    per_elem, inside = lsq_scale_grad(x.detach(), g, s, qn, qp)
    exact(inside, t(mask))
    exact(gx, g * inside)
    exact(gs, (per_elem * grad_scale).sum().reshape(1))
    assert bool(inside.any()) and not bool(inside.all())  # both branches exercised


def test_lsq_gradients_per_channel_match_formula():
    x = (torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0)) * 1.5).requires_grad_(True)
    q = weight_q(3, symmetric=True, per_channel=True, channels=4, range_="lsq")
    q(x.detach())
    g = torch.randn_like(x)
    y = q(x)
    exact(y.detach(), t(np_fake_quant(x.detach().numpy(), q.scale.detach().numpy(), 0, -3, 3, axis=0)[0]))
    gx, gs = torch.autograd.grad(y, (x, q.scale), g)
    qn, qp = 3, 3
    s = q.scale.detach().reshape(-1, 1, 1)
    grad_scale = 1.0 / math.sqrt(x.numel() / 4 * qp)
    per_elem, inside = lsq_scale_grad(x.detach(), g, s, qn, qp)
    exact(gx, g * inside)
    exact(gs, (per_elem * grad_scale).sum((1, 2)))


# -- log quantizers: references from the definitions -----------------------------------------------
def np_pow2(x, bits: int, axis: int | None = None):
    """Power-of-two quantization (Miyashita et al. 2016) by its definition: ``sign(x) 2^k`` with
    ``k = round(log2 |x|)`` limited to the ``L = 2^(b-1) - 1`` exponents ``k_max - L + 1 .. k_max``,
    ``k_max = round(log2 max|x|)`` (per tensor, or per channel along ``axis``); a value whose exponent
    rounds below the range is 0. Computed in float64."""
    x = np.asarray(x, np.float64)
    a = np.abs(x)
    m = a.max() if axis is None else np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1).max(1)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        m = m.reshape(shape)
    kmax = np.rint(np.log2(m))
    kmin = kmax - (2 ** (bits - 1) - 1) + 1
    with np.errstate(divide="ignore"):
        k = np.rint(np.log2(a))
    return np.where((a == 0) | (k < kmin), 0.0, np.sign(x) * np.exp2(np.minimum(k, kmax)))


def mu_law(x, mu: float):
    """The mu-law compressor ``F(x) = sign(x) ln(1 + mu |x|) / ln(1 + mu)`` on [-1, 1] and its inverse."""
    return np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)


def mu_law_inv(y, mu: float):
    return np.sign(y) * ((1 + mu) ** np.abs(y) - 1) / mu


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_pow2_matches_the_definition(bits, per_channel):
    x = torch.randn(6, 200, generator=torch.Generator().manual_seed(bits)) * torch.logspace(-2, 1, 6).reshape(
        -1, 1
    )
    x[:, 0] = 0.0
    q = Pow2Quantizer(
        QuantSpec(bits=bits, scheme="log", granularity="channel" if per_channel else "tensor"), True, 6
    )
    y = q(x)
    want = np_pow2(x.numpy(), bits, axis=0 if per_channel else None)
    exact(y, t(want.astype(np.float32)))
    levels = 2 ** (bits - 1) - 1
    for row in want if per_channel else [want]:
        assert 1 < len(np.unique(np.abs(row))) <= levels + 1  # at most L magnitudes and 0


def test_pow2_rounds_in_the_log_domain_and_flushes_small_values_to_zero():
    q = Pow2Quantizer(QuantSpec(bits=3, scheme="log"), True)  # 3 levels: 2^k for k in {kmax-2..kmax}
    x = torch.tensor([4.0, 3.0, 2.9, 1.5, 1.4, 0.75, 0.7, 0.5, -3.0, 0.36, 0.3, 0.0])
    # kmax = round(log2 4) = 2 -> levels 4, 2, 1; log2(2.9) = 1.54 -> 4; log2(1.4) = 0.49 -> 1;
    # log2(0.75) = -0.42 -> 1; log2(0.7) = -0.51 -> 2^-1, below kmin = 0 -> 0
    want = torch.tensor([4.0, 4.0, 4.0, 2.0, 1.0, 1.0, 0.0, 0.0, -4.0, 0.0, 0.0, 0.0])
    exact(q(x), want)
    exact(q.int_repr(x), torch.tensor([3, 3, 3, 2, 1, 1, 0, 0, -3, 0, 0, 0], dtype=torch.int32))
    exact(t(np_pow2(x.numpy(), 3).astype(np.float32)), want)  # the reference agrees with the hand values


def test_log_ste_gradient_is_identity():
    x = torch.randn(50).requires_grad_(True)
    for cls, scheme in ((Pow2Quantizer, "log"), (CompandingQuantizer, "companding")):
        q = cls(QuantSpec(bits=4, scheme=scheme), True)
        exact(torch.autograd.grad(q(x).sum(), x)[0], torch.ones(50))


def test_companding_by_hand():
    """3 bits: a = 2^2 - 1 = 3 levels per sign, mu-law with mu = 1 on x / max|x| (max|x| = 1 here):
    code = round(3 log2(1 + |x|)), value = 2^(code/3) - 1, so the levels are 0, 0.2599, 0.5874, 1."""
    x = torch.tensor([1.0, 0.5, 0.26, 0.2, 0.1, 0.0, -0.7, -0.15])
    # 3 log2(1.5) = 1.75 -> 2; 3 log2(1.26) = 1.0003 -> 1; 3 log2(1.2) = 0.79 -> 1; 3 log2(1.1) = 0.41
    # -> 0; 3 log2(1.7) = 2.30 -> 2; 3 log2(1.15) = 0.60 -> 1
    q = CompandingQuantizer(QuantSpec(bits=3, scheme="companding"), True)
    exact(q.int_repr(x), torch.tensor([3, 2, 1, 1, 0, 0, -2, -1], dtype=torch.int32))
    lv = [0.0, 2 ** (1 / 3) - 1, 2 ** (2 / 3) - 1, 1.0]
    want = torch.tensor([lv[3], lv[2], lv[1], lv[1], 0.0, 0.0, -lv[2], -lv[1]])
    torch.testing.assert_close(q(x), want, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scale", [1e-3, 2.0, 300.0])
def test_companding_is_mu_law_with_mu_1(bits, scale):
    """Codes ``round(a F(x / M))`` with the mu-law compressor F (mu = 1), ``a = 2^(b-1) - 1`` and
    ``M = max|x|``; values ``M F^-1(code / a)``: uniform in the compressed domain, the top level M."""
    x = torch.randn(300, generator=torch.Generator().manual_seed(bits)) * scale
    q = CompandingQuantizer(QuantSpec(bits=bits, scheme="companding"), True)
    a = 2 ** (bits - 1) - 1
    xn = x.double().numpy()
    m = np.abs(xn).max()
    codes = np.rint(a * mu_law(xn / m, 1.0))
    exact(q.int_repr(x), t(codes.astype(np.int32)))
    assert np.abs(codes).max() == a
    want = m * mu_law_inv(codes / a, 1.0)
    # float32 rounding of 2^(code/a) - 1 (cancellation near 0): a couple of ulps of M
    torch.testing.assert_close(q(x), t(want.astype(np.float32)), atol=2.5e-7 * m, rtol=4e-7)
    exact(q(x)[x.abs().argmax()].abs(), x.abs().max())  # the top level is max|x|
    if a > 1:  # levels are denser near zero: the gaps grow with |code|
        lv = mu_law_inv(np.arange(a + 1) / a, 1.0)
        assert (np.diff(np.diff(lv)) > 0).all()


# -- model preparation ------------------------------------------------------------------------------
def test_bn_folding_gives_the_same_outputs():
    torch.manual_seed(0)
    m = cnn1d((40,), 10, batchnorm=True)
    for bn in (m.bn1, m.bn2, m.bn3):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    set_mask(m.conv2, (torch.rand_like(m.conv2.weight) > 0.5).float())
    m.eval()
    x = torch.randn(64, 40)
    before = m(x)
    w, b = m.conv1.weight.detach().clone(), m.conv1.bias.detach().clone()
    bn = m.bn1
    factor = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    assert fold_batchnorm_(m) == 3
    assert not any(isinstance(mod, nn.BatchNorm1d) for mod in m.modules())
    exact(m.conv1.weight.detach(), w * factor.reshape(-1, 1, 1))
    exact(m.conv1.bias.detach(), (b - bn.running_mean) * factor + bn.bias.detach())
    assert bool((m.conv2.weight[m.conv2.weight_mask == 0] == 0).all())  # pruned stays zero
    # same function up to float reassociation (w*f then conv vs conv then *f)
    torch.testing.assert_close(m(x), before, atol=1e-5, rtol=1e-5)


def test_quantize_folds_bn_before_wrapping():
    m = cnn1d((40,), 10, batchnorm=True)
    quantize_(m, QuantConfig())
    assert not any(isinstance(mod, nn.BatchNorm1d) for mod in m.modules())


def test_first_last_and_override_bits():
    m = cnn1d((40,), 10)
    cfg = QuantConfig(
        weight=QuantSpec(bits=4, granularity="channel", symmetric=True),
        first_bits=8,
        last_bits=6,
        overrides={"conv2": 2, "conv3": 32},
    )
    quantize_(m, cfg)
    layers = dict(quant_layers(m))
    assert [n for n in layers] == ["conv1", "conv2", "conv3", "fc"]
    assert layers["conv1"].wq.bits == 8 and layers["fc"].wq.bits == 6 and layers["conv2"].wq.bits == 2
    assert layers["conv3"].wq is None  # 32: left in float
    assert all(q.aq.bits == 8 for q in layers.values())
    assert layers["conv2"].wq.qmax == 1 and layers["conv1"].wq.qmax == 127


def test_override_patterns_are_fnmatch():
    m = cnn1d((40,), 10)
    quantize_(m, QuantConfig(overrides={"conv*": 8}))
    layers = dict(quant_layers(m))
    assert [layers[n].wq.bits for n in ("conv1", "conv2", "conv3", "fc")] == [8, 8, 8, 4]


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg, key",
    [
        (QuantConfig(weight=QuantSpec(bits=9)), "quant.bits_w=9"),
        (QuantConfig(weight=QuantSpec(bits=1)), "quant.bits_w=1"),
        (QuantConfig(act=QuantSpec(bits=12)), "quant.bits_a=12"),
        (QuantConfig(weight=QuantSpec(scheme="floaty")), "quant.scheme='floaty'"),
        (QuantConfig(act=QuantSpec(scheme="floaty")), "quant.act.scheme='floaty'"),
        (QuantConfig(weight=QuantSpec(granularity="row")), "quant.granularity='row'"),
        (QuantConfig(act=QuantSpec(granularity="channel")), "quant.act.granularity='channel'"),
        (QuantConfig(weight=QuantSpec(range="percentile")), "quant.range='percentile'"),
        (QuantConfig(first_bits=11), "quant.first_bits=11"),
        (QuantConfig(last_bits=0), "quant.last_bits=0"),
        (QuantConfig(overrides={"conv1": 10}), "quant.overrides['conv1']=10"),
    ],
)
def test_bad_config_is_refused_naming_the_key(cfg, key):
    with pytest.raises(ValueError) as e:
        quantize_(cnn1d((40,), 10), cfg)
    assert key in str(e.value)


def test_override_pattern_matching_no_layer_is_refused():
    with pytest.raises(ValueError, match=r"quant.overrides pattern 'dense\*' matches no layer"):
        quantize_(cnn1d((40,), 10), QuantConfig(overrides={"dense*": 8}))


def test_pipeline_config_errors_name_the_flat_key():
    from conftest import compose

    from qpexp.schema import ConfigError, validate

    for override, key in (
        ("quant.bits_w=9", "quant.bits_w=9"),
        ("quant.act.scheme=nope", "quant.act.scheme"),
    ):
        with pytest.raises(ConfigError, match=key):
            validate(compose([override]))


def test_symmetric_activation_on_never_negative_input_warns():
    torch.manual_seed(0)
    m = cnn1d((40,), 10)
    quantize_(m, QuantConfig(act=QuantSpec(bits=8, symmetric=True)))
    m.train()
    m(torch.randn(32, 40))
    with pytest.warns(UserWarning, match="quant.act.symmetric=true on inputs that are never negative"):
        names = warn_symmetric_nonnegative(m)
    assert names == ["conv2", "conv3", "fc"]  # after ReLUs; conv1 sees the signed input
    m2 = cnn1d((40,), 10)
    quantize_(m2, QuantConfig())  # asymmetric activations: no warning
    m2.train()
    m2(torch.randn(32, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_symmetric_nonnegative(m2) == []

"""Issue 3: the quantizers, exact against references (torch's fused kernels, hand-computed formulas)."""

from __future__ import annotations

import math
import warnings

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
# one shape served by torch's fused kernel, one by the vectorized chain
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


# -- linear: equal to torch's fused fake-quantize kernels -----------------------------------------
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("size", ["small", "large"])
def test_linear_per_tensor_equals_torch(bits, symmetric, size):
    x = torch.randn(SHAPES[size], generator=torch.Generator().manual_seed(bits)) * 3 + 0.5
    x.requires_grad_(True)
    q = weight_q(bits, symmetric)
    scale, zero = q.qparams(x.detach())
    y = q(x)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zero, q.qmin, q.qmax)
    exact(y, ref)
    g = torch.randn_like(x)
    exact(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("size", ["small", "large"])
def test_linear_per_channel_equals_torch(bits, symmetric, size):
    shape = SHAPES[size]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(bits)) * torch.linspace(
        0.1, 5, shape[0]
    ).reshape(-1, 1, 1)
    x.requires_grad_(True)
    q = weight_q(bits, symmetric, per_channel=True, channels=shape[0])
    scale, zero = q.qparams(x.detach())
    assert scale.shape == zero.shape == (shape[0],)
    y = q(x)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zero, 0, q.qmin, q.qmax)
    exact(y, ref)
    g = torch.randn_like(x)
    exact(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quant_clamps_like_torch(size, per_channel):
    """Fixed qparams with much of the input outside the range: forward and STE mask equal torch's."""
    shape = SHAPES[size]
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 4).requires_grad_(True)
    n = shape[0] if per_channel else 1
    scale = torch.rand(n, generator=torch.Generator().manual_seed(2)) * 0.05 + 0.01
    zero = torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    y = fake_quant(x, scale, zero, 0, 15, 0 if per_channel else None)
    if per_channel:
        ref = torch.fake_quantize_per_channel_affine(x, scale, zero, 0, 0, 15)
    else:
        ref = torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 15)
    exact(y, ref)
    gx, gref = torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0]
    exact(gx, gref)
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
    # the range is widened to contain 0: S = (max(hi,0) - min(lo,0)) / (2^b - 1), Z = -round(min/S)
    lo = x.amin(1) if per_channel else x.min().reshape(1)
    hi = x.amax(1) if per_channel else x.max().reshape(1)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    ref_scale = ((hi - lo) / (2**bits - 1)).clamp_min(torch.finfo(torch.float32).tiny * 2**24)
    exact(scale, ref_scale)
    exact(zero, (-torch.round(lo / ref_scale)).to(torch.int32))


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
def test_scalar_qparams_equal_tensor_qparams(bits, symmetric):
    """The activation quantizer's Python-number fast path computes the same float32 numbers."""
    g = torch.Generator().manual_seed(bits)
    ranges = torch.randn(200, 2, generator=g) * torch.logspace(-8, 3, 200).reshape(-1, 1)
    ranges = torch.cat(
        [ranges, torch.tensor([[0.0, 0.0], [0.0, 1e-30], [-3.0, 0.0], [1.0, 2.0], [-2.0, -1.0]])]
    )
    lo, hi = ranges.min(1).values, ranges.max(1).values
    scale, zero = affine_qparams(lo, hi, bits, symmetric)
    for i in range(len(lo)):
        s, z = affine_qparams_scalar(lo[i].item(), hi[i].item(), bits, symmetric)
        assert (s, z) == (scale[i].item(), int(zero[i])), (lo[i], hi[i])


@pytest.mark.parametrize("n", [40, FUSED_MAX_NUMEL + 40])
def test_scalar_fake_quant_equals_torch(n):
    x = (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_(True)
    scale = float(torch.tensor(0.0173))
    y = fake_quant_scalar(x, scale, 37, 0, 63)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, 37, 0, 63)
    exact(y, ref)
    exact(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])


def test_loading_a_state_refreshes_the_activation_qparams():
    q = act_q(bits=8)
    q.train()
    q(torch.tensor([-1.0, 1.0]))
    state = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.tensor([-5.0, 5.0]))  # the range grows
    q.load_state_dict(state)  # back to [-1, 1]
    q.eval()
    x = torch.tensor([0.5, 3.0])
    exact(q(x), torch.fake_quantize_per_tensor_affine(x, state["scale"], state["zero_point"], 0, 255))
    # the same through a parent model's load_state_dict (how checkpoints and best-epoch selection load)
    m = cnn1d((40,), 10)
    quantize_(m, QuantConfig())
    m.train()
    m(torch.randn(8, 40))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.randn(8, 40) * 10)
    m.load_state_dict(state)
    m.eval()
    h = torch.randn(8, 25, 19).relu() * 3
    aq = m.conv2.aq
    exact(
        aq(h),
        torch.fake_quantize_per_tensor_affine(
            h, state["conv2.aq.scale"], state["conv2.aq.zero_point"], 0, 255
        ),
    )


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
    scale, zero = float(q.scale), int(q.zero_point)
    x = torch.linspace(-3, 3, n).requires_grad_(True)
    (grad,) = torch.autograd.grad(q(x).sum(), x)
    r = torch.round(x.detach() * (1.0 / q.scale)) + zero  # the unclamped code
    inside = (r >= q.qmin) & (r <= q.qmax)
    exact(grad, inside.float())
    assert 0 < int(inside.sum()) < n  # both cases present
    assert scale == float(q.scale)  # eval mode froze the range


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
    scale, zero = affine_qparams(torch.tensor([-1.0]), torch.tensor([3.0]), 8, False)
    exact(q.scale, scale)
    exact(q.zero_point, zero)


def test_ema_range_update():
    decay = 0.8
    q = act_q(bits=8, range_="ema", decay=decay)
    q.train()
    b1, b2, b3 = torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0]), torch.tensor([0.5, 4.0])
    q(b1)
    exact(q.min_val, torch.tensor([-1.0]))  # first batch initializes
    exact(q.max_val, torch.tensor([2.0]))
    lo, hi = torch.tensor([-1.0]), torch.tensor([2.0])
    for b in (b2, b3):
        q(b)
        lo = lo * decay + b.min() * (1 - decay)
        hi = hi * decay + b.max() * (1 - decay)
        exact(q.min_val, lo)
        exact(q.max_val, hi)
    scale, zero = affine_qparams(lo, hi, 8, False)
    exact(q.scale, scale)
    exact(q.zero_point, zero)


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
    q(x)
    exact(q.zero_point, torch.zeros(1, dtype=torch.int32))
    exact(q.scale.detach(), 2 * x.abs().mean().reshape(1) / math.sqrt(15))


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
    """dx: STE mask; ds = sum g * (round(x/s) - x/s) inside, -Q_N / Q_P below / above, times
    1/sqrt(N Q_P) (Esser et al. 2020, eq. 3 and section 2.2), computed by hand."""
    x = (torch.randn(30, 7, generator=torch.Generator().manual_seed(bits)) * 1.5).requires_grad_(True)
    q = weight_q(bits, symmetric=True, range_="lsq")
    q(x.detach())  # initializes the step
    with torch.no_grad():
        q.scale.copy_(x.abs().max() / q.qmax * 0.5)  # push some values outside the range
    g = torch.randn_like(x)
    y = q(x)
    gx, gs = torch.autograd.grad(y, (x, q.scale), g)
    qn, qp = -q.qmin, q.qmax
    s = q.scale.detach()
    grad_scale = 1.0 / math.sqrt(x.numel() * qp)
    assert q.grad_factor(x) == grad_scale
    per_elem, inside = lsq_scale_grad(x.detach(), g, s, qn, qp)
    exact(gx, g * inside)
    exact(gs, (per_elem * grad_scale).sum().reshape(1))
    assert bool(inside.any()) and not bool(inside.all())  # both branches exercised


def test_lsq_gradients_per_channel_match_formula():
    x = (torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0)) * 1.5).requires_grad_(True)
    q = weight_q(3, symmetric=True, per_channel=True, channels=4, range_="lsq")
    q(x.detach())
    g = torch.randn_like(x)
    gx, gs = torch.autograd.grad(q(x), (x, q.scale), g)
    qn, qp = -q.qmin, q.qmax
    s = q.scale.detach().reshape(-1, 1, 1)
    grad_scale = 1.0 / math.sqrt(x.numel() / 4 * qp)
    per_elem, inside = lsq_scale_grad(x.detach(), g, s, qn, qp)
    exact(gx, g * inside)
    exact(gs, (per_elem * grad_scale).sum((1, 2)))


# -- log quantizers --------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_pow2_levels_are_exact_powers_of_two(bits, per_channel):
    x = torch.randn(6, 200, generator=torch.Generator().manual_seed(bits)) * torch.logspace(-2, 1, 6).reshape(
        -1, 1
    )
    x[:, 0] = 0.0
    q = Pow2Quantizer(
        QuantSpec(bits=bits, scheme="log", granularity="channel" if per_channel else "tensor"), True, 6
    )
    y = q(x)
    nz = y[y != 0]
    mant, _ = torch.frexp(nz.abs())
    exact(mant, torch.full_like(mant, 0.5))  # |y| = 2^k exactly
    assert bool((y[:, 0] == 0).all())
    levels = 2 ** (bits - 1) - 1
    m = x.abs().amax(1, keepdim=True) if per_channel else x.abs().max()
    kmax = torch.round(torch.log2(m))
    k = torch.log2(nz.abs())
    kmax_each = (kmax.expand_as(y) if per_channel else kmax.expand(y.shape))[y != 0]
    assert bool((k <= kmax_each).all()) and bool((k >= kmax_each - (levels - 1)).all())
    for row in y if per_channel else [y]:
        assert len(torch.unique(row.abs())) <= levels + 1  # L magnitudes and 0


def test_pow2_rounds_in_the_log_domain_and_flushes_small_values_to_zero():
    q = Pow2Quantizer(QuantSpec(bits=3, scheme="log"), True)  # 3 levels: 2^k for k in {kmax-2..kmax}
    x = torch.tensor([4.0, 3.0, 2.9, 1.5, 1.4, 0.75, 0.7, 0.5, -3.0, 0.36, 0.3, 0.0])
    # kmax = round(log2 4) = 2 -> levels 4, 2, 1; log2(2.9) = 1.54 -> 4; log2(1.4) = 0.49 -> 1;
    # log2(0.75) = -0.42 -> 1; log2(0.7) = -0.51 -> 2^-1, below kmin = 0 -> 0
    want = torch.tensor([4.0, 4.0, 4.0, 2.0, 1.0, 1.0, 0.0, 0.0, -4.0, 0.0, 0.0, 0.0])
    exact(q(x), want)
    exact(q.int_repr(x), torch.tensor([3, 3, 3, 2, 1, 1, 0, 0, -3, 0, 0, 0], dtype=torch.int32))


def test_log_ste_gradient_is_identity():
    x = torch.randn(50).requires_grad_(True)
    for cls, scheme in ((Pow2Quantizer, "log"), (CompandingQuantizer, "companding")):
        q = cls(QuantSpec(bits=4, scheme=scheme), True)
        exact(torch.autograd.grad(q(x).sum(), x)[0], torch.ones(50))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_companding_codes_and_decode_formula(bits):
    x = torch.randn(300, generator=torch.Generator().manual_seed(bits)) * 2
    q = CompandingQuantizer(QuantSpec(bits=bits, scheme="companding"), True)
    a = 2 ** (bits - 1) - 1
    m = x.abs().max()
    codes = q.int_repr(x)
    exact(codes, (torch.sign(x) * torch.round(a * torch.log2(1 + x.abs() / m))).to(torch.int32))
    assert int(codes.abs().max()) == a
    exact(q(x), torch.sign(codes) * m * (torch.exp2(codes.abs() / a) - 1))
    exact(q(x)[x.abs().argmax()].abs(), m)  # the top level is max|x|
    # levels are denser near zero: the gaps grow with |code|
    lv = m * (torch.exp2(torch.arange(a + 1) / a) - 1)
    assert bool((torch.diff(torch.diff(lv)) > 0).all()) or a == 1


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

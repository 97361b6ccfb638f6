"""Issue 10: quantization at graph level (torch.fx) and export of any traceable model.

References are independent of the code under test: the unfolded eval model, torch's own
``nn.MultiheadAttention`` with hand-quantized weights, integer formulas computed by hand with numpy,
onnxruntime, and an fx trace of the prepared model (quantizers as leaves) to inspect the graph.
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qpexp.core.accounting import layer_views, size_bits
from qpexp.core.quant import QuantConfig, QuantSpec, convert, quantize_
from qpexp.core.quant import graph as G
from qpexp.core.quant import graph_export as GE
from qpexp.core.quant.export import load
from qpexp.deploy.emit import onnx_graph_model

OFF = QuantSpec(bits=32)


def _bn_stats(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


class Block(nn.Module):
    def __init__(self, c: int, depthwise: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=c if depthwise else 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y += x
        return F.relu(y)


class ResNetish(nn.Module):
    """Residual blocks with BN (one depthwise), a conv -> BN across a Sequential boundary, a
    concatenation of slices, average pooling."""

    def __init__(self, c: int = 8, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False))
        self.stem_bn = nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(Block(c), Block(c, depthwise=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c + c // 2, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem_bn(self.stem(x))))
        z = torch.cat([x, x[:, : x.shape[1] // 2]], dim=1)
        return self.fc(self.pool(z).flatten(1))


class TinyTransformer(nn.Module):
    """Pre-LN encoder: nn.MultiheadAttention, GELU MLP, class token (cat), mean over nothing else."""

    def __init__(self, length: int = 12, dim: int = 16, heads: int = 2, classes: int = 5):
        super().__init__()
        self.embed = nn.Linear(1, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, length + 1, dim) * 0.1)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        t = self.embed(x.unsqueeze(-1))
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        h = self.ln1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.fc2(self.act(self.fc1(self.ln2(t))))
        return self.head(t[:, 0])


def calibrate(model: nn.Module, x: torch.Tensor, batches: int = 4) -> nn.Module:
    model.train()
    with torch.no_grad():
        for xb in x.chunk(batches):
            model(xb)
    return model.eval()


def resnetish(bits_w=8, x=None, seed=0):
    torch.manual_seed(seed)
    m = ResNetish()
    _bn_stats(m, seed)
    x = torch.randn(64, 3, 6, 6) if x is None else x
    quantize_(m, QuantConfig(weight=QuantSpec(bits_w, granularity="channel", symmetric=True)), example=x[:2])
    return calibrate(m, x), x


def transformer(bits_w=8, seed=0):
    torch.manual_seed(seed)
    m = TinyTransformer()
    x = torch.randn(64, 12)
    quantize_(m, QuantConfig(weight=QuantSpec(bits_w, granularity="channel", symmetric=True)), example=x[:2])
    return calibrate(m, x), x


# -- BatchNorm folding ------------------------------------------------------------------------------
def test_bn_folded_in_every_conv_bn_pair_of_a_residual_model():
    torch.manual_seed(0)
    m = ResNetish()
    _bn_stats(m)
    ref_model = copy.deepcopy(m).eval()
    bns = [n for n, mod in m.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    x = torch.randn(16, 3, 6, 6)
    quantize_(m, QuantConfig(weight=OFF, act=OFF), example=x[:2])
    assert (
        sorted(m._qpexp_quant_info["folded_bn"]) == sorted(bns) and len(bns) == 5
    )  # stem_bn across a Sequential
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), ref_model(x), atol=1e-5, rtol=1e-5)


def test_bn_not_folded_when_the_conv_output_is_used_elsewhere():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    m = Two()
    _bn_stats(m)
    ref = copy.deepcopy(m).eval()
    x = torch.randn(4, 2, 3, 3)
    quantize_(m, QuantConfig(weight=OFF, act=OFF), example=x)
    assert isinstance(m.bn, nn.BatchNorm2d) and m._qpexp_quant_info["folded_bn"] == []
    assert "BatchNorm2d" in m._qpexp_quant_info["float_ops"]  # left in float, and said so
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), ref(x), atol=1e-6, rtol=1e-6)


# -- quantizers in the graph --------------------------------------------------------------------------
def _quantized(node: fx.Node, modules) -> bool:
    return node.op == "call_module" and G.is_quantizer(modules[node.target])


def _graph(model):
    return GE.export_graph(model), dict(model.named_modules())


def test_adds_cats_pooling_carry_quantizers():
    m, _ = resnetish()
    graph, modules = _graph(m)
    adds = [
        n
        for n in graph.nodes
        if n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add)
    ]
    cats = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.cat]
    pools = [n for n in graph.nodes if n.op == "call_function" and n.target is F.adaptive_avg_pool2d]
    assert len(adds) == 2 and len(cats) == 1 and len(pools) == 1
    for n in adds + pools:
        tensors = [a for a in n.all_input_nodes]
        assert tensors and all(_quantized(a, modules) for a in tensors), n.format_node()
    # concatenation: one quantizer on the output, i.e. one shared scale for every input
    (user,) = cats[0].users
    assert _quantized(user, modules)
    assert "cat_q" in m._qpexp_quant_info["graph_quantizers"]


def test_attention_matmuls_and_in_proj_weight_carry_quantizers():
    m, _ = transformer()
    graph, modules = _graph(m)
    mms = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.matmul]
    assert len(mms) == 2  # q @ k^T and attn @ v
    for n in mms:
        assert all(_quantized(a, modules) for a in n.args[:2]), n.format_node()
    linears = [
        n for n in graph.nodes if n.op == "call_function" and n.target in (F.linear, torch._C._nn.linear)
    ]
    for n in linears:  # every projection, the attention's packed in_proj_weight included
        assert _quantized(n.args[0], modules) and _quantized(n.args[1], modules), n.format_node()
    assert any(n.args[1].target == "attn.in_proj_weight_wq" for n in linears)
    info = m._qpexp_quant_info
    assert info["raw_weights"] == ["attn.in_proj_weight"] and info["traceable"] == ["attn"]
    assert info["float_ops"] == ["GELU", "LayerNorm", "softmax"]


def test_in_proj_weight_quantized_like_torch_mha_with_hand_quantized_weights():
    torch.manual_seed(1)
    m = TinyTransformer()
    ref = copy.deepcopy(m.attn).eval()  # torch's own implementation

    def hand(w):  # symmetric 4-bit per output row: q = round(w / s), s = max|w| / 7
        s = w.abs().amax(1, keepdim=True) / 7
        return torch.clamp(torch.round(w / s), -7, 7) * s

    with torch.no_grad():
        ref.in_proj_weight.copy_(hand(m.attn.in_proj_weight))
        ref.out_proj.weight.copy_(hand(m.attn.out_proj.weight))
    x = torch.randn(8, 12)
    quantize_(m, QuantConfig(weight=QuantSpec(4, granularity="channel", symmetric=True), act=OFF), example=x)
    m.eval()
    h = torch.randn(3, 7, 16)
    with torch.no_grad():
        got = m.attn(h, h, h, need_weights=False)[0]  # the call the model makes (its traced graph)
        want = ref(h, h, h, need_weights=False)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # code that reads .weight keeps working; the accounting counts in_proj_weight at 4 bits
    assert isinstance(m.attn.out_proj.weight, nn.Parameter) and m.fc1.weight.shape == (32, 16)
    views = {v.name: v for v in layer_views(m)}
    assert views["attn.in_proj_weight"].bits_w == 4
    _, rows, _ = size_bits(m, detail=True)
    assert rows["attn.in_proj_weight"]["format"] != "float"


def test_in_proj_weight_stays_prunable_with_its_mask():
    from qpexp.core.prune.masks import MaskKeeper, set_mask

    torch.manual_seed(0)
    m = TinyTransformer()
    mask = (torch.rand_like(m.attn.in_proj_weight) > 0.5).float()
    set_mask(m.attn, mask, "in_proj_weight")
    x = torch.randn(32, 12)
    quantize_(m, QuantConfig(), example=x[:2])
    calibrate(m, x)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    keep = MaskKeeper(m)
    m.train()
    m(x).sum().backward()
    opt.step()
    keep()
    assert m.attn.in_proj_weight_mask is not None
    assert bool((m.attn.in_proj_weight[mask == 0] == 0).all())


def test_transformer_encoder_layer_forward_after_quantize():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=True, activation="gelu")
    model = nn.Sequential(
        nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(), nn.Linear(16 * 5, 3)
    )
    float_model = copy.deepcopy(model).eval()
    x = torch.randn(32, 5, 16)
    quantize_(model, QuantConfig(), example=x[:2])
    info = model._qpexp_quant_info
    assert "0.layers.0.self_attn.in_proj_weight" in info["raw_weights"]
    calibrate(model, x)
    with torch.no_grad():  # eval + no_grad: torch's fused fast path would skip every quantizer
        got, ref = model(x), float_model(x)
    assert got.shape == ref.shape and 0 < float((got - ref).abs().max()) < 0.5
    q = model[0].layers[0].self_attn.in_proj_weight_wq
    assert q.bits == 4


def test_state_dict_round_trip():
    m, x = transformer(bits_w=4, seed=3)
    state = m.state_dict()
    assert "attn.in_proj_weight_wq.scale" in state and "attn.matmul_q0.min_val" in state
    torch.manual_seed(99)
    fresh = TinyTransformer()
    quantize_(fresh, QuantConfig(weight=QuantSpec(4, granularity="channel", symmetric=True)), example=x[:2])
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), m(x))
    twin = copy.deepcopy(m)  # deep copies keep the installed graphs, with their own quantizers
    assert type(twin) is type(m) and twin.attn.in_proj_weight_wq is not m.attn.in_proj_weight_wq
    with torch.no_grad():
        assert torch.equal(twin(x), m(x))


def test_sequential_models_keep_the_per_layer_path():
    from qpexp.models import cnn1d

    m = cnn1d((40,), 10, batchnorm=True)
    quantize_(m, QuantConfig(), example=torch.randn(2, 40))
    assert type(m) is nn.Sequential and m._qpexp_quant_info["graph_quantizers"] == []
    assert len(m._qpexp_quant_info["folded_bn"]) == 3


def test_sequential_with_average_pooling_keeps_its_children(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    _bn_stats(m)
    x = torch.randn(64, 3, 6, 6)
    quantize_(m, QuantConfig(), example=x[:2])
    assert len(m) == 6 and isinstance(m[-1].layer, nn.Linear) and isinstance(m, nn.Sequential)
    assert m._qpexp_quant_info["graph_quantizers"] == ["3.input_q"]  # the pooling input
    calibrate(m, x)
    with torch.no_grad():
        assert torch.equal(convert(m, tmp_path / "m.npz", arithmetic="float")(x), m(x))


def test_call_it_was_not_traced_for_runs_float_with_a_warning():
    m, _ = transformer()
    h = torch.randn(2, 13, 16)
    with pytest.warns(UserWarning, match="not quantized for"):
        m.attn(h, h + 1, h)  # cross attention: traced only as self attention


def test_untraceable_model_falls_back_and_export_says_so(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = x * 2
            return self.b(self.a(x) + x)

    m = Branchy()
    x = torch.randn(16, 4)
    with pytest.warns(UserWarning, match="cannot trace"):
        quantize_(m, QuantConfig(), example=x)
    assert m._qpexp_quant_info["graph"] == "untraced"
    calibrate(m, x)
    from qpexp.deploy import deploy

    dm = SimpleNamespace(
        splits={"test": (x, torch.zeros(16, dtype=torch.long))}, batch_size=8, eval_batch_size=8
    )
    out = deploy(m, dm, tmp_path, SimpleNamespace(onnx=True, latency_batches=2), {})
    assert "cannot trace" in out["deploy/error"] and out["deploy/simulated_only"] is True


def test_untraceable_submodule_becomes_a_float_leaf():
    class Odd(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.odd, self.b = nn.Linear(4, 4), Odd(), nn.Linear(4, 2)

        def forward(self, x):
            y = self.a(x)
            return self.b(self.odd(y) + y)

    m = Net()
    quantize_(m, QuantConfig(), example=torch.randn(2, 4))
    info = m._qpexp_quant_info
    assert info["untraced"] == ["odd"] and "Odd (untraced: odd)" in info["float_ops"]
    assert "add_q0" in info["graph_quantizers"]


# -- the integer file -------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [resnetish, transformer])
@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_graph_file_round_trip_is_exact(tmp_path, build, suffix):
    m, x = build(bits_w=4)
    path = tmp_path / f"m{suffix}"
    exact = convert(m, path, arithmetic="float")
    with torch.no_grad():
        assert torch.equal(exact(x), m(x))
        integer = load(path, arithmetic="integer")
        assert float((integer(x) - m(x)).abs().max()) < 0.05  # a code may flip on a rounding edge
        assert (integer(x).argmax(1) == m(x).argmax(1)).float().mean() >= 0.98


def test_graph_file_refuses_calls_outside_the_allow_list():
    with pytest.raises(ValueError, match="not allowed"):
        GE._resolve("torch.load")
    with pytest.raises(ValueError, match="not allowed"):
        GE._resolve("os.system")
    with pytest.raises(ValueError, match="not allowed"):
        GE._check_method("numpy")
    nodes = [
        {"op": "input", "name": "x"},
        {"op": "call", "fn": "builtins.eval", "args": {"$t": ["1"]}, "kwargs": {"$d": []}},
        {"op": "output", "args": {"$n": 0}},
    ]
    with pytest.raises(ValueError, match="builtins.eval"):
        GE.load_graph_model(nodes)


def _single_linear(bits_a=8):
    torch.manual_seed(0)

    class One(nn.Module):  # not a Sequential: the graph path
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(x)

    m = One()
    x = torch.randn(200, 6) * 2 + 0.3
    quantize_(
        m,
        QuantConfig(weight=QuantSpec(8, granularity="channel", symmetric=True), act=QuantSpec(bits_a)),
        example=x[:2],
    )
    calibrate(m, x, 1)
    return m, x


def _hand_reference(m, x):
    """``y = S_x S_w sum (q_x - Z_x) q_w + b`` with numpy, codes computed by hand."""
    w = m.fc.weight.detach().numpy().astype(np.float64)
    b = m.fc.bias.detach().numpy().astype(np.float64)
    s_w = np.abs(w).max(1) / 127
    q_w = np.clip(np.round(w / s_w[:, None]), -127, 127)
    xn = x.numpy().astype(np.float64)
    lo, hi = min(xn.min(), 0.0), max(xn.max(), 0.0)
    s_x = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(255))
    z_x = np.clip(-np.round(np.float32(lo) / s_x), 0, 255)
    q_x = np.clip(np.round(xn * np.float64(np.float32(1) / s_x)) + z_x, 0, 255)
    return ((q_x - z_x) @ q_w.T) * (s_x * s_w) + b


def test_single_layer_against_a_hand_integer_reference(tmp_path):
    from qpexp.deploy import ort_session

    m, x = _single_linear()
    want = _hand_reference(m, x)
    integer = convert(m, tmp_path / "m.npz", arithmetic="integer")
    with torch.no_grad():
        np.testing.assert_allclose(integer(x).numpy(), want, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(m(x).numpy(), want, atol=1e-5, rtol=1e-5)
    qm, info = onnx_graph_model(load(tmp_path / "m.npz", "float"), x[:2])
    assert info["weight_containers"] == ["uint8"] and info["simulated"] == []  # u8u8
    got = ort_session(qm).run(None, {"input": x.numpy()})[0]
    lsb = float(m.fc.aq.scale) * float(m.fc.weight.abs().max() / 127)  # onnxruntime rounds the bias to it
    np.testing.assert_allclose(got, want, atol=lsb + 1e-5, rtol=1e-5)


# -- ONNX -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [resnetish, transformer])
@pytest.mark.parametrize("bits_w", [8, 4])
def test_onnx_matches_the_fake_quantized_model(tmp_path, build, bits_w):
    from qpexp.deploy import integer_kernels, ort_session

    m, xc = build(bits_w=bits_w)
    x = torch.randn(400, *xc.shape[1:])
    gm = convert(m, tmp_path / "m.npz", arithmetic="float")
    qm, info = onnx_graph_model(gm, x[:2])
    assert info["simulated"] == [] and set(info["weight_containers"]) == {"uint8" if bits_w == 8 else "int4"}
    sess = ort_session(qm, 1, tmp_path / "opt.onnx")
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = m(x).numpy()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.98
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
    if bits_w == 8:
        assert integer_kernels(tmp_path / "opt.onnx")  # onnxruntime runs integer kernels


def test_deploy_any_model(tmp_path):
    from qpexp.deploy import deploy

    m, _ = resnetish(bits_w=8)
    x = torch.randn(300, 3, 6, 6)
    with torch.no_grad():
        y = m(x).argmax(1)  # labels the fake-quantized model gets right: accuracy 1.0
    dm = SimpleNamespace(splits={"test": (x, y)}, batch_size=100, eval_batch_size=100)
    out = deploy(m, dm, tmp_path, SimpleNamespace(onnx=True, latency_batches=2), {"final/test_acc": 1.0})
    assert "deploy/error" not in out, out.get("deploy/error")
    assert out["deploy/format"] == "graph" and out["deploy/simulated_only"] is False
    assert out["deploy/roundtrip_max_abs_diff"] == 0.0 and out["deploy/roundtrip_codes_equal"] is True
    assert abs(out["deploy/onnx_acc_diff"]) <= 0.02 and out["deploy/onnx_integer_kernels"] > 0


def test_log_scheme_has_no_onnx_form_but_round_trips(tmp_path):
    from qpexp.deploy import deploy

    torch.manual_seed(0)
    m = ResNetish()
    x = torch.randn(64, 3, 6, 6)
    quantize_(m, QuantConfig(weight=QuantSpec(4, scheme="log", granularity="channel")), example=x[:2])
    calibrate(m, x)
    dm = SimpleNamespace(
        splits={"test": (x, torch.zeros(64, dtype=torch.long))}, batch_size=32, eval_batch_size=32
    )
    out = deploy(m, dm, tmp_path, SimpleNamespace(onnx=True, latency_batches=2), {})
    assert out["deploy/roundtrip_max_abs_diff"] == 0.0 and out["deploy/simulated_only"] is True
    assert "log" in out["deploy/simulated_reason"] and "deploy/error" not in out


def test_float_ops_listed_and_counted_as_float():
    m, _ = transformer()
    assert G.float_ops(m) == ["GELU", "LayerNorm", "softmax"]
    total, rows, other = size_bits(m, detail=True)
    ln = sum(p.numel() for n, p in m.named_parameters() if n.startswith(("ln1", "ln2")))
    floats = ln + m.cls.numel() + m.pos.numel()  # in_proj_bias counts with in_proj_weight
    graph_q = sum(
        32 * sum(q.n_qparams())
        for _, q in G.graph_quantizers(m)
        if not q.is_weight and q is not m.attn.in_proj_weight_wq._qpexp_input_q
    )
    assert other == 32 * floats + graph_q
    assert math.isclose(
        total, sum(r["weight_bits"] + r["qparam_bits"] + r["bias_bits"] for r in rows.values()) + other
    )


def test_warnings_free_prepare_of_builtin_style_models():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resnetish()
        transformer()


# -- every built-in model through QAT w4a8 and PTQ w8a8, the integer file and ONNX ------------------
@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    from test_vision import cifar_fixture

    root = cifar_fixture(tmp_path_factory.mktemp("cifar"), n=20)
    return ["data=vision", "data.name=cifar10", f"data.path={root}"]


MODES = {
    "qat_w4a8": ["quant.bits_w=4", "quant.bits_a=8", "quant.epochs=1"],
    "ptq_w8a8": ["quant.bits_w=8", "quant.bits_a=8", "quant.epochs=0"],
}


def _arch_matrix():
    from test_archs import ARCHS

    data = ["cifar", "mnist1d", "digits"]
    return [(a, m, data[(i + j) % 3]) for i, a in enumerate(ARCHS) for j, m in enumerate(MODES)]


@pytest.mark.parametrize("arch,mode,data", _arch_matrix())
def test_every_model_quantizes_and_exports_end_to_end(tmp_path_factory, cifar, arch, mode, data):
    from conftest import compose
    from test_archs import DATA, TINY_MODEL

    from qpexp.pipeline import Pipeline

    cache = tmp_path_factory.getbasetemp() / f"qcache-{arch}-{data}"  # the two modes share the baseline
    over = [f"model={arch}", *(f"model.{k}={v}" for k, v in TINY_MODEL[arch].items())]
    cfg = compose([
        "baseline.epochs=1", "prune.ratio=0", "logger=none", "quant.calib_batches=2",
        "export.latency_batches=2", f"cache_dir={cache}", *over, *(cifar if data == "cifar" else DATA[data]),
        *MODES[mode],
    ])  # fmt: skip
    rec = Pipeline(cfg, tmp_path_factory.mktemp("run")).run()
    assert "deploy/error" not in rec, rec.get("deploy/error")
    # near-tie logits of a one-epoch model can move the accuracy by more than 0.2 points: the status
    # then says so (deploy_mismatch), with the accuracy kept
    gap = abs(rec["deploy/onnx_test_acc"] - rec["final/test_acc"])
    gap_int = abs(rec["deploy/int_test_acc"] - rec["final/test_acc"])  # the integer file counts too
    assert rec["deploy/checks"] == "int+onnx"
    assert rec["status"] == ("ok" if max(gap, gap_int) <= 0.002 + 1e-12 else "deploy_mismatch")
    assert rec["deploy/format"] == "graph"
    assert rec["deploy/roundtrip_max_abs_diff"] == 0.0 and rec["deploy/roundtrip_codes_equal"] is True
    assert rec["deploy/simulated_only"] is False
    assert rec["deploy/onnx_weight_container"] == ("int4" if mode == "qat_w4a8" else "uint8")
    # one epoch on tiny widths: logits sit near ties, and onnxruntime's QuantizeLinear divides by S
    # where the fake quantizer multiplies by 1/S, so a value on a rounding edge takes the next code.
    # So the runtime is compared where that cannot matter: on every test sample whose argmax is clear
    # (top-1 ahead of the runner-up by a tenth of the logit range), ORT must agree with the
    # fake-quantized model; the integer file's own accuracy is the fake-quantized model's exactly.
    clear = rec["deploy/onnx_clear_fraction"]
    info = (
        clear,
        rec["deploy/onnx_argmax_agree_clear"],
        rec["deploy/onnx_logit_rel_err"],
        rec["deploy/onnx_argmax_agree"],
    )
    assert rec["deploy/onnx_argmax_agree_clear"] == 1.0, info
    # a one-epoch model whose logits barely separate the classes has few clear samples: its logits
    # themselves must then match, within 5% of the largest logit
    assert clear >= 0.2 or rec["deploy/onnx_logit_rel_err"] <= 0.05, info
    assert rec["deploy/int_test_acc"] == rec["final/test_acc"]
    floats = set(filter(None, rec["quant/float_ops"].split(",")))
    assert floats == ({"GELU", "LayerNorm", "softmax"} if arch == "transformer" else set())


@pytest.mark.parametrize("structure", ["unstructured", "channel"])
def test_user_model_through_target_every_stage(tmp_path, structure):
    """A residual block with a depthwise conv, LayerNorm and attention, defined in a test module and
    selected only through ``model._target_``: prune (channel pruning removes heads), QAT, the
    integer file and ONNX."""
    from conftest import compose

    from qpexp.pipeline import Pipeline

    prune = ["prune=default", "prune.scope=global"] if structure == "unstructured" else ["prune=channel"]
    cfg = compose([
        "model=custom", "model._target_=user_models.UserNet", "+model.width=8", "data=mnist1d",
        "data.source.num_samples=600", "baseline.epochs=1", "prune.steps=1", "prune.finetune_epochs=1",
        "quant.epochs=1", "quant.calib_batches=2", "export.latency_batches=2", "logger=none",
        f"cache_dir={tmp_path / 'cache'}", *prune,
    ])  # fmt: skip
    rec = Pipeline(cfg, tmp_path / "run").run()
    assert rec["status"] == "ok" and "deploy/error" not in rec, rec.get("deploy/error")
    assert rec["final/sparsity"] > 0.3 and rec["quant/float_ops"] == "LayerNorm,softmax"
    assert rec["deploy/roundtrip_max_abs_diff"] == 0.0 and rec["deploy/roundtrip_codes_equal"] is True
    assert rec["deploy/onnx_argmax_agree"] >= 0.9 and rec["deploy/simulated_only"] is False

"""quant.bias_bits and quant.table_bits: biases and codebook centroids stored below fp32, checked against
hand-computed roundings, numpy's float16 and sizes counted by hand."""

import numpy as np
import pytest
import torch
from torch import nn

from qpexp.core.accounting import size_bits
from qpexp.core.quant import QuantConfig, QuantSpec, quantize_
from qpexp.core.quant.bias import BiasQuantizer


def _codebook(bits=2, table_bits=32):
    return QuantSpec(
        bits=bits, scheme="codebook", granularity="tensor", range="minmax", table_bits=table_bits
    )


def _linear(bias):
    lin = nn.Linear(2, len(bias))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0]] * len(bias)))  # one centroid value: exact in any table
        lin.bias.copy_(torch.tensor(bias))
    return lin


def test_int8_bias_rounds_by_hand():
    # max|b| = 1.27 -> S = 0.01; 0.304 / 0.01 = 30.4 -> 30 -> 0.30; -1.27 -> -127; 0.004 -> 0
    q = BiasQuantizer(8)
    out = q(torch.tensor([0.304, -1.27, 0.004]))
    assert torch.allclose(out, torch.tensor([0.30, -1.27, 0.0]), atol=1e-7)
    assert q.storage_bits(3) == 3 * 8 + 32
    assert torch.equal(q(torch.zeros(4)), torch.zeros(4))  # all-zero bias: scale 1, codes 0


def test_fp16_bias_matches_numpy_half():
    b = torch.tensor([0.1, 1 / 3, -2.71828, 65504.0])
    out = BiasQuantizer(16)(b)
    ref = np.array([0.1, 1 / 3, -2.71828, 65504.0], np.float32).astype(np.float16).astype(np.float32)
    assert np.array_equal(out.numpy(), ref)
    assert BiasQuantizer(16).storage_bits(4) == 64


def test_bias_gradient_passes_straight_through():
    b = torch.tensor([0.304, -1.27, 0.004], requires_grad=True)
    (BiasQuantizer(8)(b) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert b.grad.tolist() == [1.0, 2.0, 3.0]


def test_layer_output_and_size_with_int8_bias():
    lin = _linear([0.304, -1.27, 0.004])
    model = nn.Sequential(lin)
    quantize_(model, QuantConfig(_codebook(2), QuantSpec(bits=32), bias_bits=8))
    x = torch.tensor([[2.0, 1.0]])  # w x = 1 for every row
    assert torch.allclose(model(x), torch.tensor([[1.30, -0.27, 1.0]]), atol=1e-6)
    # 6 weights, all nonzero, 2-bit codes: dense layout, 6 * 2 + 2-bit flag = 14; codebook 3 x 32;
    # bias 3 x 8 + 32-bit scale
    total, rows, _ = size_bits(model, detail=True)
    assert rows["0"]["bias_bits"] == 3 * 8 + 32
    assert rows["0"]["qparam_bits"] == 3 * 32
    assert total == 14 + 96 + 56


def _half_table_model():
    """One row of weights [0.1, 1/3] under a 2-bit float16 codebook: each weight its own centroid."""
    lin = _linear([0.0])
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, 1 / 3]]))
    return quantize_(nn.Sequential(lin), QuantConfig(_codebook(2, table_bits=16), QuantSpec(bits=32)))


def test_float16_codebook_table_and_size():
    model = _half_table_model()
    y = model(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # reads back the two weights' table entries
    half = np.array([0.1, 1 / 3], np.float32).astype(np.float16).astype(np.float32)
    assert np.array_equal(y[:, 0].detach().numpy(), half)
    q = model[0].wq
    assert q.centroids.dtype == torch.float32  # latent centroids stay fp32, the table is rounded
    _, rows, _ = size_bits(model, detail=True)
    assert rows["0"]["qparam_bits"] == 3 * 16  # 2^2 - 1 centroids at 16 bits
    assert rows["0"]["bias_bits"] == 32  # bias_bits left at 32


def test_centroid_gradient_passes_the_float16_rounding():
    model = _half_table_model()
    model(torch.tensor([[1.0, 1.0]])).sum().backward()
    g = model[0].wq.centroids.grad
    assert sorted(g.tolist()) == [0.0, 1.0, 1.0]  # each used centroid gets d/dw = x = 1


@pytest.mark.parametrize(
    "cfg, needle",
    [
        (QuantConfig(QuantSpec(bits=4), QuantSpec(bits=8), bias_bits=8), "quant.bias_bits=8"),
        (QuantConfig(_codebook(4), QuantSpec(bits=32), bias_bits=4), "quant.bias_bits=4"),
        (QuantConfig(QuantSpec(bits=4, table_bits=16), QuantSpec(bits=8)), "quant.table_bits=16"),
        (QuantConfig(_codebook(4, table_bits=8), QuantSpec(bits=32)), "quant.table_bits=8"),
    ],
)
def test_bad_settings_name_the_key(cfg, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        cfg.validate()


def test_bad_settings_refused_before_training(tmp_path):
    from conftest import TINY, compose

    from qpexp.errors import ConfigError
    from qpexp.run.pipeline import Pipeline

    with pytest.raises(ConfigError, match=r"quant\.bias_bits=8") as e:  # the default scheme is linear
        Pipeline(compose([*TINY, f"cache_dir={tmp_path}", "quant.bias_bits=8"]), tmp_path / "run")
    assert str(e.value).count("\n") == 0
    assert not any(tmp_path.iterdir())


def test_pipeline_records_the_stored_biases_and_table(tmp_path):
    from conftest import TINY, compose

    from qpexp.run.pipeline import Pipeline, make_model

    over = [
        "quant=codebook",
        "quant.bits_w=4",
        "quant.bias_bits=8",
        "quant.table_bits=16",
        "export.enabled=false",
    ]
    pipe = Pipeline(compose([*TINY, f"cache_dir={tmp_path / 'cache'}", *over]), tmp_path / "run")
    rec = pipe.run()
    layers = sorted({k.split("/")[1] for k in rec if k.startswith("size/") and k.endswith("/bias_bits")})
    assert layers
    dense = make_model(pipe.cfg, pipe.data())  # no channel pruning here: the widths stay
    widths = {n: m.bias.numel() for n, m in dense.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d))}
    for name in layers:
        assert rec[f"size/{name}/bias_bits"] == widths[name] * 8 + 32  # int8 entries + one fp32 scale
        assert rec[f"size/{name}/qparam_bits"] == 15 * 16  # 2^4 - 1 centroids in float16

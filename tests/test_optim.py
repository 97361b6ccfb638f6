"""The stages' optimizer: the multi-tensor AdamW update equals torch's single-tensor loop bit for bit."""

import copy

import torch
import torch.nn.functional as F

from qpexp.core.quant import QuantConfig, QuantSpec, quantize_
from qpexp.models import cnn1d
from qpexp.optim import adamw


def test_adamw_equals_the_single_tensor_loop_on_a_quantized_model():
    """On a QAT model (learned step sizes: one-element parameters beside the weights) with weight
    decay, 30 steps of qpexp's AdamW and of torch's reference loop (``foreach=False``) give the same
    parameters, compared exactly."""
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, symmetric=True, range="lsq", narrow_range=False)
    act = QuantSpec(bits=8, symmetric=False)
    model = quantize_(cnn1d((40,), 10), QuantConfig(weight=spec, act=act))
    x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
    models = [model, copy.deepcopy(model)]
    start = model.conv1.layer.weight.detach().clone()
    opts = [
        adamw(models[0].parameters(), lr=1e-2, weight_decay=0.05),
        torch.optim.AdamW(models[1].parameters(), lr=1e-2, weight_decay=0.05, foreach=False),
    ]
    for _ in range(30):
        for m, opt in zip(models, opts):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()
    got, want = dict(models[0].named_parameters()), dict(models[1].named_parameters())
    assert any(n.endswith("wq.scale") for n in got)
    for n, p in want.items():
        torch.testing.assert_close(got[n], p, atol=0, rtol=0, msg=n)
    assert not torch.equal(got["conv1.layer.weight"].detach(), start)  # training moved the weights

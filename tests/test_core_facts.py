"""The facts the core defines once (issue 9, "one place for each fact"), checked on hand-computed cases."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qpexp.core.accounting import layer_views, relative_entries, relative_index_padding, tensor_bits
from qpexp.core.modules import CONV_LINEAR, clone_state
from qpexp.core.quant import QuantConfig, QuantSpec, quantize_
from qpexp.core.quant.export import dequantize_linear, model_ir
from qpexp.core.quant.layers import is_quant_layer


def test_relative_layout_by_hand():
    # kept positions 0, 20, 21 of 24: gaps 0, 19, 0; the gap of 19 needs one filler (15) then 19 - 16 = 3
    keep = np.zeros(24, bool)
    keep[[0, 20, 21]] = True
    d, pos = relative_entries(keep)
    assert d.tolist() == [0, 15, 3, 0] and pos.tolist() == [0, 16, 20, 21]
    w = torch.from_numpy(keep.astype(np.float32))
    assert relative_index_padding(w) == 1
    # 8-bit codes: dense 24*8 = 192, bitmask 3*8 + 24 = 48, relative (3 + 1) * (8 + 4) = 48; +2 flag bits
    t = tensor_bits(w, 8)
    assert t["bits"] == 48 + 2 and t["format"] in ("bitmask", "relative")
    assert tensor_bits(torch.ones(24), 8) == {"bits": 192 + 2, "format": "dense", "n": 24, "nnz": 24}


def test_dequantize_linear_by_hand():
    w = {
        "shape": [2, 2],
        "ch_axis": 0,
        "per_channel": True,
        "codes": np.array([[-2, 1], [3, 0]], np.int32),
        "scale": np.array([0.5, 0.25], np.float32),
        "zero_point": np.array([1, -1], np.int32),
    }
    assert dequantize_linear(w).tolist() == [[-1.5, 0.0], [1.0, 0.25]]
    w.update(per_channel=False, scale=np.array([2.0], np.float32), zero_point=None)
    assert dequantize_linear(w).tolist() == [[-4.0, 2.0], [6.0, 0.0]]


def test_quant_layer_and_layer_types():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3))
    assert [type(m) for m in model if isinstance(m, CONV_LINEAR)] == [nn.Conv1d, nn.Linear]
    quantize_(model, QuantConfig(QuantSpec(4), QuantSpec(8)))
    assert [is_quant_layer(m) for m in model] == [True, False, False, True]
    assert [v.name for v in layer_views(model)] == ["0", "3"]
    model(torch.randn(5, 1, 4))  # calibrate
    assert [op["op"] for op in model_ir(model)] == ["Conv1d", "ReLU", "Flatten", "Linear"]


def test_clone_state_is_a_snapshot():
    model = nn.Linear(2, 2)
    state = clone_state(model)
    with torch.no_grad():
        model.weight.add_(1)
    assert torch.equal(state["weight"] + 1, model.weight) and not state["weight"].requires_grad

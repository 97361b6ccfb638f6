"""Convert phase: a fake-quantized model becomes a real integer model in one file, and back.

``convert(model, path)`` walks a (nested) ``nn.Sequential`` of conv/linear layers (plain or wrapped
by ``quantize_``), ReLU, max-pooling, Flatten, Reshape, BatchNorm, Dropout and Identity, and stores:

* each quantized weight as integer codes (8 bits: one ``int8``/``uint8`` per code; other widths
  bit-packed, ``code - qmin`` in ``b`` bits, little-endian), laid out like the accounting in
  :mod:`qpexp.core.accounting` does it: ``dense``, ``bitmask`` (1 bit per position, then the stored
  codes) or ``relative`` (4-bit gaps between stored positions, a filler entry per 16-position run
  without one, Deep Compression style), ``rowcol`` (a bit per row and per column saying which hold a
  stored position, then the relative layout over those rows and columns only), and with ``convert(..., nm=(n, m))`` ``nm`` (per group of
  ``m`` columns the rank of its kept set among the ``C(m, n)``, then its ``n`` codes), the cheapest
  one. A pruned layer (a ``weight_mask`` that is
  not all ones) always uses a sparse layout over its *mask*, so the pruning layout comes back
  exactly, including kept weights that quantized to zero; other layers store the nonzero codes;
* scales (``float32``, per tensor or per output channel) and zero points (``int32``; symmetric
  quantizers have ``Z = 0`` implicitly, none stored); the log schemes' per-tensor/channel ``max|x|``;
* each activation quantizer's scale and zero point (or ``max|x|``);
* biases, BatchNorm tensors and unquantized weights as ``float32``.

The file holds one JSON header (the architecture, every quantizer's settings, and where each tensor
lies; zlib-compressed UTF-8) and one byte blob with the tensors back to back (byte aligned, nothing
else): ``.pt`` is ``{"format": str, "header": uint8 tensor, "blob": uint8 tensor}`` and loads with
``torch.load(weights_only=True)``; ``.npz`` holds the uint8 arrays ``header`` and ``blob`` and loads
with ``numpy.load(allow_pickle=False)``.

``load(path)`` rebuilds a runnable :class:`IntegerModel`; its weight codes are exactly the
fake-quantized model's. ``arithmetic="float"`` dequantizes codes with the fake-quantize kernel's own
arithmetic and reproduces the fake-quantized model bit for bit: every activation code and every
logit. ``arithmetic="integer"`` (default) computes each conv/linear layer whose operands are both
linear-quantized as an exact integer accumulation ``sum (q_x - Z_x)(q_w - Z_w)`` (held in float64,
checked to stay below 2^53), rescaled once by ``S_x S_w`` and added to the float bias: logits match
within float rounding, except that a value sitting on a rounding edge can flip one activation code
downstream (``qpexp.deploy`` counts such flips). Log/companding layers dequantize in either mode.

Why ``file bytes * 8`` differs from ``size_bits``: the accounting counts the payload only (codes in
the cheapest layout, a format flag per weight tensor (2 bits; 3 for rowcol and N:M), 32 bits per scale, stored zero point,
bias and other float). The file adds the JSON header (architecture, settings, tensor offsets), the
container (zip entries of ``.pt``/``.npz``), up to 7 bits of padding per packed tensor (every tensor
starts on a byte), and, for pruned layers, the codes of kept weights that quantized to zero (the
accounting's layout covers nonzero codes only; the file keeps the pruning mask); it stores the
format flag in the header rather than as 2 or 3 bits. :func:`package_stats` breaks the bytes down.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qpexp.core.modules import CONV, CONV_LINEAR
from qpexp.core.quant import graph_export
from qpexp.core.quant.layers import is_quant_layer
from qpexp.core.quant.log import _bcast
from qpexp.core.quant.package import (  # noqa: F401 (the file's shared pieces, importable from here as before)
    EXACT_INT,
    LOG_SCHEMES,
    _act_ir,
    _Blob,
    _decode_segment,
    _decode_weight,
    _encode_weight,
    _log_quantizer,
    _np,
    _weight_ir,
    dequantize_linear,
    pack_bits,
    package_stats,
    read_package,
    save_package,
    unpack_bits,
)

FORMAT = "qpexp.intmodel/1"


# -- walking the model ----------------------------------------------------------------------------
def _flat_children(model: nn.Module, prefix: str = ""):
    """Leaf modules in forward order: nested Sequentials flattened, quantization wrappers kept whole."""
    if not isinstance(model, nn.Sequential):
        raise NotImplementedError(
            f"convert: only nn.Sequential models are supported (got {type(model).__name__})"
        )
    for name, m in model.named_children():
        full = f"{prefix}{name}"
        if isinstance(m, nn.Sequential):
            yield from _flat_children(m, full + ".")
        else:
            yield full, m


def _tuple(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v]


def _conv_linear_op(name: str, layer: nn.Module, wq, aq) -> dict:
    """A conv/linear layer: its geometry, weight (codes under ``wq``, else float), bias, input quantizer."""
    op = {"name": name, "op": type(layer).__name__}
    if isinstance(layer, CONV):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise NotImplementedError(f"convert: {name}: only numeric zero padding is supported")
        op.update(
            stride=_tuple(layer.stride),
            padding=_tuple(layer.padding),
            dilation=_tuple(layer.dilation),
            groups=int(layer.groups),
        )
    op["weight"] = _weight_ir(layer, wq)
    op["bias"] = None if layer.bias is None else _np(layer.bias.float())
    op["act"] = _act_ir(aq)
    return op


def _max_pool_op(name: str, layer: nn.Module) -> dict:
    if layer.return_indices:
        raise NotImplementedError(f"convert: {name}: max pooling with return_indices")
    nd = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(layer)]

    def rep(v, nd=nd):
        return list(v) if isinstance(v, (tuple, list)) else [v] * nd

    return {
        "name": name,
        "op": type(layer).__name__,
        "kernel_size": rep(layer.kernel_size),
        "stride": rep(layer.stride or layer.kernel_size),
        "padding": rep(layer.padding),
        "dilation": rep(layer.dilation),
        "ceil_mode": bool(layer.ceil_mode),
    }


def _batch_norm_op(name: str, layer: nn.Module) -> dict:
    if not layer.track_running_stats:
        raise NotImplementedError(f"convert: {name}: BatchNorm without running statistics")
    return {
        "name": name,
        "op": "BatchNorm",
        "eps": float(layer.eps),
        "mean": _np(layer.running_mean.float()),
        "var": _np(layer.running_var.float()),
        "gamma": None if layer.weight is None else _np(layer.weight.float()),
        "beta": None if layer.bias is None else _np(layer.bias.float()),
    }


def _layer_op(name: str, layer: nn.Module, wq, aq) -> dict | None:
    """One leaf module's op description (None: Identity and Dropout, which compute nothing)."""
    if isinstance(layer, CONV_LINEAR):
        return _conv_linear_op(name, layer, wq, aq)
    if isinstance(layer, nn.ReLU):
        return {"name": name, "op": "ReLU"}
    if isinstance(layer, (nn.Identity, nn.Dropout)):
        return None
    if isinstance(layer, nn.Flatten):
        return {"name": name, "op": "Flatten", "start_dim": layer.start_dim, "end_dim": layer.end_dim}
    if type(layer).__name__ == "Reshape" and hasattr(layer, "shape"):
        return {"name": name, "op": "Reshape", "shape": [int(s) for s in layer.shape]}
    if isinstance(layer, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        return _max_pool_op(name, layer)
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return _batch_norm_op(name, layer)
    raise NotImplementedError(f"convert: {name}: module type {type(layer).__name__} is not supported")


def model_ir(model: nn.Module, quantized: bool = True) -> list[dict]:
    """The model as a list of op descriptions with numpy tensors (what the file stores, decoded).

    ``quantized=False`` describes the float model under the quantizers (latent weights, no
    activation quantization): the fp32 reference for deployment comparisons.
    """
    ops = []
    for name, m in _flat_children(model):
        layer, wq, aq = m, None, None
        if is_quant_layer(m):
            layer, wq, aq = m.layer, m.wq, m.aq
            if not quantized:
                wq = aq = None
        op = _layer_op(name, layer, wq, aq)
        if op is not None:
            ops.append(op)
    return ops


# -- bit packing and sparse layouts ---------------------------------------------------------------


# -- the file -------------------------------------------------------------------------------------


def encode(ops: list[dict], nm: tuple[int, int] | None = None) -> tuple[str, np.ndarray]:
    """(JSON header, byte blob) for an op list from :func:`model_ir`; ``nm=(n, m)``: weights may
    take the N:M layout (:func:`~qpexp.core.quant.package._encode_weight`)."""
    blob = _Blob()
    out = []
    for op in ops:
        o = {}
        for k, v in op.items():
            if k == "weight":
                o[k] = _encode_weight(v, blob, nm)
            elif k == "act" and v is not None:
                o[k] = {
                    kk: (blob.add_array(vv) if isinstance(vv, np.ndarray) else vv) for kk, vv in v.items()
                }
            elif isinstance(v, np.ndarray):
                o[k] = blob.add_array(v)
            else:
                o[k] = v
        out.append(o)
    header = json.dumps({"format": FORMAT, "ops": out}, separators=(",", ":"))
    data = np.frombuffer(b"".join(blob.parts), dtype=np.uint8).copy()
    return header, data


def decode(header: str, blob: np.ndarray) -> list[dict]:
    """Inverse of :func:`encode`: the op list with numpy tensors."""
    meta = json.loads(header)
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file (format={meta.get('format')!r})")
    ops = []
    for o in meta["ops"]:
        op = {}
        for k, v in o.items():
            if k == "weight":
                op[k] = _decode_weight(v, blob, o.get("name"))
            elif k == "act" and v is not None:
                op[k] = {
                    kk: (_decode_segment(blob, vv) if isinstance(vv, dict) else vv) for kk, vv in v.items()
                }
            elif isinstance(v, dict) and "offset" in v:
                op[k] = _decode_segment(blob, v)
            else:
                op[k] = v
        ops.append(op)
    return ops


# -- the runnable integer model -------------------------------------------------------------------
class _Reshape(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)


class IntegerLayer(nn.Module):
    """A conv/linear layer running from integer codes (see the module doc for the two arithmetics).

    Buffers: ``weight_codes`` (int32), the weight's ``w_scale``/``w_zero`` (linear) or ``w_max``
    (log schemes), ``bias``, the input quantizer's ``a_scale``/``a_zero`` or ``a_max``, and
    ``weight_mask`` (bool) for pruned layers. ``last_act_codes`` holds the input codes of the last
    call when ``keep_codes`` is set.
    """

    def __init__(self, op: dict, arithmetic: str = "integer"):
        super().__init__()
        self.name, self.kind = op["name"], op["op"]
        self.conv_args = (
            {k: op[k] for k in ("stride", "padding", "dilation", "groups")} if self.kind != "Linear" else {}
        )
        w, a = op["weight"], op["act"]
        self.w_scheme, self.a_scheme = w["scheme"], (a or {}).get("scheme")
        self.w_spec = {k: v for k, v in w.items() if not isinstance(v, np.ndarray)}
        self.a_spec = {k: v for k, v in (a or {}).items() if not isinstance(v, np.ndarray)}
        self.keep_codes = False
        self.last_act_codes: torch.Tensor | None = None
        t = torch.from_numpy
        self.register_buffer("bias", None if op["bias"] is None else t(op["bias"]).float())
        if w["mask"] is not None:
            self.register_buffer("weight_mask", t(w["mask"]))
        shape = w["shape"]
        bshape = [1] * len(shape)
        bshape[w.get("ch_axis", 0)] = -1
        if self.w_scheme == "float":
            self.register_buffer("w_hat", t(w["values"]).float())
        else:
            codes = t(w["codes"]).to(torch.int32)
            self.register_buffer("weight_codes", codes)
            if self.w_scheme == "linear" and w.get("group_size") is not None:
                # per group: the flat scales (and zero points), C * G of them; dequantized arithmetic
                self.register_buffer("w_scale", t(np.asarray(w["scale"], np.float32).reshape(-1)))
                zp = w.get("zero_point")
                self.register_buffer("w_zero", torch.zeros(()) if zp is None else t(zp.reshape(-1)).float())
                self.register_buffer("w_hat", t(dequantize_linear(w)))
            elif self.w_scheme == "linear":
                scale = t(w["scale"]).float().reshape(bshape if w["per_channel"] else [])
                zero = (
                    t(w["zero_point"]).float().reshape(bshape if w["per_channel"] else [])
                    if w.get("zero_point") is not None
                    else torch.zeros(())
                )
                self.register_buffer("w_scale", scale)
                self.register_buffer("w_zero", zero)
                self.register_buffer("w_hat", t(dequantize_linear(w)))
            else:
                self.wlog = _log_quantizer(w, True, shape[0])
                m = t(w["max_abs"]).float()
                self.register_buffer("w_max", m)
                with torch.no_grad():
                    self.register_buffer(
                        "w_hat",
                        self.wlog.dequantize(
                            codes.float(), _bcast(m, codes, w["per_channel"], w.get("ch_axis", 0))
                        ),
                    )
        if self.a_scheme == "linear":
            self.register_buffer("a_scale", t(a["scale"]).float().reshape(()))
            zero = a.get("zero_point")
            self.register_buffer("a_zero", torch.zeros(()) if zero is None else t(zero).float().reshape(()))
        elif self.a_scheme is not None:
            self.alog = _log_quantizer(a, False, 1)
            self.register_buffer("a_max", t(a["max_abs"]).float())
        self.integer = (  # per-group scales vary along the sum: those layers dequantize
            arithmetic == "integer"
            and self.w_scheme == "linear"
            and self.a_scheme in ("linear", None)
            and w.get("group_size") is None
        )
        if arithmetic not in ("integer", "float"):
            raise ValueError(f"arithmetic={arithmetic!r}: use 'integer' or 'float'")
        if self.integer:
            self._check_exact()

    def _check_exact(self) -> None:
        w = self.weight_codes.double() - self.w_zero.double()
        fan_in = w[0].numel()
        amax = max(abs(self.a_spec["qmin"]), abs(self.a_spec["qmax"])) if self.a_scheme else None
        if amax is not None and fan_in * amax * float(w.abs().max()) >= EXACT_INT:
            self.integer = False  # the accumulation would not be exact in float64: dequantize instead

    def _conv(self, x, w, b):
        if self.kind == "Linear":
            return F.linear(x, w, b)
        fn = {"Conv1d": F.conv1d, "Conv2d": F.conv2d, "Conv3d": F.conv3d}[self.kind]
        return fn(x, w, b, **self.conv_args)

    def act_codes(self, x: torch.Tensor) -> torch.Tensor | None:
        """Integer codes of the input (the fake-quantized model's ``aq.int_repr``)."""
        if self.a_scheme == "linear":
            r = torch.round(x * (1.0 / self.a_scale)) + self.a_zero
            return r.clamp(self.a_spec["qmin"], self.a_spec["qmax"])
        if self.a_scheme is not None:
            return self.alog.codes(x, _bcast(self.a_max.clamp_min(1e-30), x, self.alog.per_channel, 0))
        return None

    def accumulate(self, x: torch.Tensor, q: torch.Tensor | None = None):
        """The integer path: ``(acc, mult)`` with ``acc = sum (q_x - Z_x)(q_w - Z_w)`` (exact integers,
        held in float64) and ``mult = S_x S_w`` per output channel; ``y = acc * mult + bias``."""
        if q is None:
            q = self.act_codes(x)
        xi = x.double() if q is None else q.double() - self.a_zero.double()
        acc = self._conv(xi, self.weight_codes.double() - self.w_zero.double(), None)
        a_scale = self.a_scale.double() if q is not None else torch.ones((), dtype=torch.float64)
        return acc, (a_scale * self.w_scale.double()).reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.act_codes(x)
        if self.keep_codes:
            self.last_act_codes = None if q is None else q.to(torch.int32)
        if self.integer:
            acc, mult = self.accumulate(x, q)
            shape = [1, -1] + [1] * (acc.dim() - 2)
            y = (acc * (mult.reshape(shape) if mult.numel() > 1 else mult.reshape([]))).float()
            return y if self.bias is None else y + self.bias.reshape(shape)
        if self.a_scheme == "linear":
            x = (q - self.a_zero) * self.a_scale
        elif self.a_scheme is not None:
            x = self.alog.dequantize(q, _bcast(self.a_max.clamp_min(1e-30), x, self.alog.per_channel, 0))
        return self._conv(x, self.w_hat, self.bias)

    def extra_repr(self) -> str:
        w = f"w{self.w_spec.get('bits', 32)} {self.w_scheme} ({self.w_spec.get('layout')})"
        a = f"a{self.a_spec['bits']} {self.a_scheme}" if self.a_scheme else "a32"
        return f"{self.kind}, {w}, {a}, arithmetic={'integer' if self.integer else 'float'}"


class _BatchNorm(nn.Module):
    def __init__(self, op: dict):
        super().__init__()
        t = lambda a: None if a is None else torch.from_numpy(a).float()  # noqa: E731
        self.eps = op["eps"]
        for k in ("mean", "var", "gamma", "beta"):
            self.register_buffer(k, t(op[k]))

    def forward(self, x):
        return F.batch_norm(x, self.mean, self.var, self.gamma, self.beta, False, 0.0, self.eps)


class IntegerModel(nn.Sequential):
    """The model rebuilt from a converted file (inference only)."""

    def integer_layers(self) -> list[IntegerLayer]:
        return [m for m in self if isinstance(m, IntegerLayer)]


def build(ops: list[dict], arithmetic: str = "integer") -> IntegerModel:
    mods = []
    for op in ops:
        kind = op["op"]
        if "weight" in op:
            m = IntegerLayer(op, arithmetic)
        elif kind == "ReLU":
            m = nn.ReLU()
        elif kind == "Flatten":
            m = nn.Flatten(op["start_dim"], op["end_dim"])
        elif kind == "Reshape":
            m = _Reshape(op["shape"])
        elif kind in ("MaxPool1d", "MaxPool2d", "MaxPool3d"):
            m = getattr(nn, kind)(
                op["kernel_size"], op["stride"], op["padding"], op["dilation"], ceil_mode=op["ceil_mode"]
            )
        elif kind == "BatchNorm":
            m = _BatchNorm(op)
        else:
            raise ValueError(f"unknown op {kind!r} in the file")
        mods.append((op["name"].replace(".", "_"), m))
    model = IntegerModel(OrderedDict(mods))
    return model.eval()


# -- the two verbs --------------------------------------------------------------------------------
def uses_graph_format(model: nn.Module) -> bool:
    """Whether :func:`convert` writes ``model`` as a graph (:mod:`.graph_export`): every model but a
    plain ``nn.Sequential`` without graph-level quantizers, which keeps this per-op format."""
    return not isinstance(model, nn.Sequential) or getattr(type(model), "_qpexp_specs", None) is not None


def convert(
    model: nn.Module,
    path: str | Path | None = None,
    arithmetic: str = "integer",
    graph: bool | None = None,
    nm: tuple[int, int] | None = None,
):
    """Convert a prepared, calibrated model into an integer model and return it.

    With ``path`` (``.pt`` or ``.npz``) the file is written first and the returned model is read
    back from it; without, it is built from the same bytes in memory. ``graph=None`` picks the
    format (:func:`uses_graph_format`): an :class:`IntegerModel` of this module's op list for
    ``nn.Sequential`` models, else a graph file and its ``fx.GraphModule``
    (:mod:`qpexp.core.quant.graph_export`); ``graph=True`` forces the graph format. ``nm=(n, m)``
    (an N:M-pruned model): weights whose every group of ``m`` keeps at most ``n`` may be stored in
    the N:M layout, where it is the cheapest (as :func:`~qpexp.core.accounting.tensor_bits` counts).
    """
    if graph or (graph is None and uses_graph_format(model)):
        return graph_export.convert_graph(model, path, arithmetic, nm)
    was = model.training
    model.eval()
    try:
        ops = model_ir(model)
    finally:
        model.train(was)
    header, blob = encode(ops, nm)
    if path is None:
        return build(decode(header, blob), arithmetic)
    return load(save_package(header, blob, path), arithmetic)


def load(path: str | Path, arithmetic: str = "integer"):
    """Rebuild the runnable integer model from a file written by :func:`convert` (either format)."""
    header, blob = read_package(path)
    if json.loads(header).get("format") != FORMAT:
        return graph_export.load_graph_model(graph_export.decode_graph(header, blob), arithmetic)
    return build(decode(header, blob), arithmetic)


def load_ops(path: str | Path) -> list[dict]:
    """The file's contents, decoded: one dict per op with numpy tensors (full integer codes, qparams,
    masks) — what an exporter to another runtime (e.g. ONNX) starts from."""
    header, blob = read_package(path)
    return decode(header, blob)


__all__ = [
    "convert",
    "uses_graph_format",
    "load",
    "load_ops",
    "model_ir",
    "encode",
    "decode",
    "package_stats",
    "IntegerModel",
]

"""Convert and export any traceable prepared model: the integer file as a graph, and ONNX QDQ.

The per-op list of :mod:`qpexp.core.quant.export` covers ``nn.Sequential`` models; this module
covers every model ``quantize_`` could trace (residual networks, MobileNets, transformers, a
user's model). One mechanism, no per-model code:

**The file** (``format: qpexp.intgraph/1``, same container as the op list: a zlib-compressed JSON
header and one byte blob, ``.npz`` or ``.pt``, no pickle). The prepared model is traced with
torch.fx down to torch functions (:class:`qpexp.core.quant.graph.Tracer`, ``mode="export"``:
only quantizers are leaves; BatchNorm in eval mode becomes ``F.batch_norm``). Each node becomes
one JSON entry:

* ``input``; ``const`` (a parameter or buffer used as is: biases, LayerNorm, position embeddings,
  unfolded BatchNorm, float32 in the blob);
* ``qweight``: a weight quantizer applied to a parameter (a conv/linear weight or a raw weight
  such as ``in_proj_weight``): integer codes in the layout the accounting chooses (dense, bitmask,
  relative indices, N:M when asked; a pruned weight over its mask), scales, zero points, exactly as
  the op-list format stores a layer's weight;
* ``quant``: an activation quantizer (scale, zero point, range; log schemes their ``max|x|``);
* ``call`` / ``method``: a torch function or tensor method, by name, with its arguments (node
  references and JSON literals: numbers, strings, slices, dtypes, tuples, lists).

What a file may call is one exact table, :mod:`qpexp.core.quant.allowlist`, used by the writer
and the reader: ``(namespace, name)`` function pairs, tensor method names (arithmetic dunders
only from an explicit set, on tensor nodes only), ``getattr`` only for ``GETATTR_OK``, literals
from closed sets. Every node is checked when the file is read, before anything is built or
called; the error names the node. Nothing in a file can run other code (``docs/security.md``). :func:`load_graph` rebuilds an
``fx.GraphModule``: ``arithmetic="float"`` dequantizes with the fake-quantize kernel's arithmetic
and reproduces the prepared model's logits bit for bit; ``arithmetic="integer"`` computes every
``F.linear``/``F.conv*``/``matmul`` whose operands are linear-quantized as an exact integer
accumulation (float64, checked below 2^53) rescaled by ``S_x S_w`` (or ``S_a S_b``).

**ONNX** (:func:`qpexp.deploy.emit.onnx_graph_model`; the ONNX side lives in :mod:`qpexp.deploy`): the loaded graph exported with ``torch.onnx.export(...,
dynamo=False)`` (TorchScript exporter: every torch op it knows, Softmax, LayerNormalization, Gelu,
Reshape, ...), where each ``quant`` node emits ``QuantizeLinear``/``DequantizeLinear`` (a ``Clip``
first when the range is narrower than the container) and each ``qweight`` emits its codes as an
integer initializer behind ``DequantizeLinear`` (per channel on the quantizer's axis). A
post-pass sets the exact containers (INT4/UINT4 for widths up to 4, INT8/UINT8, INT16/UINT16)
and bumps the opset to 21. 8-bit signed weight codes are stored as uint8 with zero point 128
(``q + 128``; "u8u8"): onnxruntime's u8s8 QLinearConv saturates int16 pairs in ``vpmaddubsw`` on
AVX2 CPUs without VNNI and gives wrong results, u8u8 is exact and still fuses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from qpexp.core.quant import allowlist as A
from qpexp.core.quant import package as P
from qpexp.core.quant.graph import TraceFailure, _trace_with_retries, is_quantizer, prepare_info, root_site
from qpexp.core.quant.linear import LinearQuantizer, fake_quant_scalar
from qpexp.core.quant.log import _bcast

FORMAT = "qpexp.intgraph/1"

# -- what a file may call: the table of :mod:`qpexp.core.quant.allowlist` (writer and reader) -----
GETATTR_OK = A.GETATTR_OK


def _fn_name(fn) -> str:
    name = A.name_of(fn)
    if name is None:
        mod, fname = getattr(fn, "__module__", None), getattr(fn, "__name__", repr(fn))
        raise NotImplementedError(
            f"convert: function {mod}.{fname} is not in the allow-list of the file format "
            "(qpexp.core.quant.allowlist.ALLOWED_FUNCTIONS)"
        )
    return name


def _resolve(qualified: str):
    return A.function(qualified)


def _check_method(name: str) -> str:
    return A.method(name)


# -- arguments <-> JSON ---------------------------------------------------------------------------
def _enc(a, index: dict, where: str):
    if isinstance(a, fx.Node):
        return {"$n": index[a]}
    if isinstance(a, bool) or a is None or isinstance(a, (int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"$f": repr(a)}
    if isinstance(a, tuple):
        return {"$t": [_enc(x, index, where) for x in a]}
    if isinstance(a, list):
        return [_enc(x, index, where) for x in a]
    if isinstance(a, dict):
        return {"$d": [[k, _enc(v, index, where)] for k, v in a.items()]}
    if isinstance(a, slice):
        return {"$s": [_enc(x, index, where) for x in (a.start, a.stop, a.step)]}
    if a is Ellipsis:
        return {"$e": 1}
    if isinstance(a, torch.dtype) and str(a).removeprefix("torch.") in A.DTYPES:
        return {"$dt": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device) and A.DEVICE.fullmatch(str(a)):
        return {"$dev": str(a)}
    if isinstance(a, torch.memory_format) and str(a).removeprefix("torch.") in A.MEMORY_FORMATS:
        return {"$mf": str(a).removeprefix("torch.")}
    raise NotImplementedError(f"convert: {where}: argument of type {type(a).__name__} cannot be stored")


def _dec(a, nodes: list):
    return A.decode_arg(a, nodes)


# -- the prepared model as a node list ------------------------------------------------------------
def _attr(model, target):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def export_graph(model: nn.Module) -> fx.Graph:
    """The prepared model (eval mode) traced down to torch functions, quantizers as leaves."""
    was = model.training
    model.eval()
    try:
        try:
            ranks = prepare_info(model).get("ranks") or {}
            graph, leaves = _trace_with_retries(
                model, root_site(model, ranks), "export", set(), "", False, ranks=ranks
            )
        except TraceFailure as e:
            raise NotImplementedError(f"convert: {e}") from e
    finally:
        model.train(was)
    if leaves:
        raise NotImplementedError(f"convert: cannot trace {sorted(leaves)} down to torch functions")
    return graph


def _const_entry(model: nn.Module, modules: dict, n: fx.Node, quantized: bool) -> dict | None:
    """A ``get_attr`` node as a ``const`` (None: a parameter only weight quantizers read, stored as
    their ``qweight`` when quantized)."""
    users = list(n.users)
    weight_only = users and all(
        u.op == "call_module" and getattr(modules[u.target], "is_weight", False) for u in users
    )
    if weight_only and quantized:
        return None  # stored as the qweight of its quantizer
    t = _attr(model, n.target).detach()
    arr = P._np(t.float() if t.is_floating_point() else t)
    return {"op": "const", "name": n.target, "value": arr}


def _quantizer_entry(
    model: nn.Module, modules: dict, n: fx.Node, index: dict, quantized: bool
) -> dict | None:
    """A quantizer's ``call_module`` node as a ``qweight`` (on a parameter) or a ``quant`` entry;
    with ``quantized=False`` it has no entry and stands for its input."""
    q = modules[n.target]
    if not is_quantizer(q):
        raise NotImplementedError(f"convert: {n.target}: module {type(q).__name__} was not traced")
    src = n.args[0]
    if not quantized:
        index[n] = index[src]
        return None
    if not getattr(q, "is_weight", False):
        return {"op": "quant", "name": n.target, "input": index[src], "act": P._act_ir(q)}
    if not (isinstance(src, fx.Node) and src.op == "get_attr"):
        raise NotImplementedError(f"convert: {n.target}: a weight quantizer on a computed tensor")
    owner, _, pname = src.target.rpartition(".")
    owner_m = _attr(model, owner) if owner else model
    shim = SimpleNamespace(
        weight=_attr(model, src.target), weight_mask=getattr(owner_m, f"{pname}_mask", None)
    )
    return {
        "op": "qweight",
        "name": src.target,
        "quantizer": n.target,
        "weight": P._weight_ir(shim, q),
    }


def _call_entry(n: fx.Node, index: dict, where: str) -> dict:
    """A ``call_function``/``call_method`` node as a ``call``/``method`` entry, checked against the
    allow-list of the file format."""
    if n.op == "call_function":
        if n.target is getattr and n.args[1] not in GETATTR_OK:
            raise NotImplementedError(f"convert: {where}: getattr {n.args[1]!r}")
        op, fn = "call", _fn_name(n.target)
    else:
        if n.target not in A.ALLOWED_METHODS:
            raise NotImplementedError(
                f"convert: {where}: tensor method {n.target!r} is not in the allow-list of the "
                "file format (qpexp.core.quant.allowlist.ALLOWED_METHODS)"
            )
        op, fn = "method", n.target
    return {
        "op": op,
        "fn": fn,
        "args": _enc(n.args, index, where),
        "kwargs": _enc(dict(n.kwargs), index, where),
    }


def _node_entry(model: nn.Module, modules: dict, n: fx.Node, index: dict, quantized: bool) -> dict | None:
    """One node's entry in the node list (None: it has no entry of its own)."""
    where = f"node {n.name}"
    if n.op == "get_attr":
        return _const_entry(model, modules, n, quantized)
    if n.op == "placeholder":
        return {"op": "input", "name": n.target}
    if n.op == "call_module":
        return _quantizer_entry(model, modules, n, index, quantized)
    if n.op in ("call_function", "call_method"):
        return _call_entry(n, index, where)
    if n.op == "output":
        return {"op": "output", "args": _enc(n.args[0], index, where)}
    raise NotImplementedError(f"convert: {where}: op {n.op}")


def graph_ir(model: nn.Module, quantized: bool = True) -> list[dict]:
    """The node list with numpy tensors (what the file stores, decoded). ``quantized=False``: the
    float model under the quantizers (latent weights, no activation quantization)."""
    graph = export_graph(model)
    modules = dict(model.named_modules())
    index: dict[fx.Node, int] = {}
    out: list[dict] = []
    was = model.training
    model.eval()
    try:
        for n in graph.nodes:
            entry = _node_entry(model, modules, n, index, quantized)
            if entry is None:
                continue
            index[n] = len(out)
            out.append(entry)
    finally:
        model.train(was)
    try:
        A.check_nodes(out)  # what the reader will check: a file the writer makes always loads
    except ValueError as e:
        raise NotImplementedError(f"convert: {e}") from e
    return out


def encode_graph(nodes: list[dict], nm: tuple[int, int] | None = None) -> tuple[str, np.ndarray]:
    blob = P._Blob()
    out = []
    for node in nodes:
        o = {}
        for k, v in node.items():
            if k == "weight":
                o[k] = P._encode_weight(v, blob, nm)
            elif k == "act":
                o[k] = {
                    kk: (blob.add_array(vv) if isinstance(vv, np.ndarray) else vv) for kk, vv in v.items()
                }
            elif isinstance(v, np.ndarray):
                o[k] = blob.add_array(v)
            else:
                o[k] = v
        out.append(o)
    header = json.dumps({"format": FORMAT, "nodes": out}, separators=(",", ":"))
    return header, np.frombuffer(b"".join(blob.parts), dtype=np.uint8).copy()


def decode_graph(header: str, blob: np.ndarray) -> list[dict]:
    meta = json.loads(header)
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file (format={meta.get('format')!r})")
    A.check_nodes(meta.get("nodes"))  # every node, before any segment is decoded or anything built
    nodes = []
    for o in meta["nodes"]:
        node = {}
        for k, v in o.items():
            if k == "weight":
                node[k] = P._decode_weight(v, blob, o.get("name"))
            elif k == "act":
                node[k] = {
                    kk: (P._decode_segment(blob, vv) if isinstance(vv, dict) else vv) for kk, vv in v.items()
                }
            elif isinstance(v, dict) and "offset" in v and k == "value":
                node[k] = P._decode_segment(blob, v)
            else:
                node[k] = v
        nodes.append(node)
    return nodes


# -- the runnable model ---------------------------------------------------------------------------
class _QDQ(torch.autograd.Function):
    """In ONNX export: ``[Clip] -> QuantizeLinear -> DequantizeLinear`` (container marked for the post-pass)."""

    @staticmethod
    def forward(
        ctx, x, scale: float, zero: int, qmin: int, qmax: int, elem: str, lo: int, hi: int, shift: int
    ):
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale, zero, qmin, qmax, elem, lo, hi, shift):
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op(
            "Constant", value_t=torch.tensor(zero + shift, dtype=torch.int32)
        )  # retyped by the post-pass
        if (qmin, qmax) != (lo, hi):
            f32 = np.float32
            cmin = g.op(
                "Constant", value_t=torch.tensor(float(f32(scale) * f32(qmin - zero)), dtype=torch.float32)
            )
            cmax = g.op(
                "Constant", value_t=torch.tensor(float(f32(scale) * f32(qmax - zero)), dtype=torch.float32)
            )
            x = g.op("Clip", x, cmin, cmax)
        q = g.op("QuantizeLinear", x, s, z, qpexp_elem_s=elem, qpexp_zero_i=zero)
        return g.op("DequantizeLinear", q, s, z, qpexp_elem_s=elem, qpexp_zero_i=zero)


class _DQ(torch.autograd.Function):
    """In ONNX export: ``DequantizeLinear(codes initializer)`` (container marked for the post-pass)."""

    @staticmethod
    def forward(ctx, codes, w_hat, scale, zero, axis: int, elem: str):
        return w_hat.clone()

    @staticmethod
    def symbolic(g, codes, w_hat, scale, zero, axis, elem):
        attrs = {"qpexp_elem_s": elem}
        if axis is not None and axis >= 0:
            attrs["axis_i"] = axis
        return g.op("DequantizeLinear", codes, scale, zero, **attrs)


class _GroupDQ(torch.autograd.Function):
    """In ONNX export: a per-group weight as ``DequantizeLinear(axis=0)`` on its ``(C * G, g)``
    padded codes (:func:`~qpexp.core.quant.package.group_padded`), ``Reshape (C, G g)``, ``Slice``
    to ``K`` columns, ``Reshape`` to the weight's shape with the channel axis first, ``Transpose``
    where the channel axis is another (exact: the same ``(q - Z) S`` per element)."""

    @staticmethod
    def forward(ctx, codes, w_hat, scale, zero, elem: str, c: int, k: int, moved, perm):
        return w_hat.clone()

    @staticmethod
    def symbolic(g, codes, w_hat, scale, zero, elem, c, k, moved, perm):
        def ints(v):
            return g.op("Constant", value_t=torch.tensor(v, dtype=torch.int64))

        y = g.op("DequantizeLinear", codes, scale, zero, axis_i=0, qpexp_elem_s=elem)
        y = g.op("Reshape", y, ints([c, -1]))
        y = g.op("Slice", y, ints([0]), ints([k]), ints([1]))
        y = g.op("Reshape", y, ints(list(moved)))
        if perm is not None:
            y = g.op("Transpose", y, perm_i=list(perm))
        return y


class IntQuant(nn.Module):
    """An activation quantizer from the file: fake quantization with the stored scale and zero point
    (torch's kernel: the prepared model's numbers), or the log scheme's codes."""

    def __init__(self, act: dict):
        super().__init__()
        self.spec = {k: v for k, v in act.items() if not isinstance(v, np.ndarray)}
        self.scheme = act["scheme"]
        self.quantized = True
        if self.scheme == "linear":
            self.scale = float(np.float32(act["scale"].reshape(-1)[0]))
            self.zero = 0 if act.get("zero_point") is None else int(act["zero_point"].reshape(-1)[0])
            self.qmin, self.qmax = int(act["qmin"]), int(act["qmax"])
            self.elem, _, self.shift = P.container(act["bits"], self.qmin < 0)
            lo, hi = P.CONTAINER_RANGE[self.elem]
            self.lo, self.hi = lo - self.shift, hi - self.shift  # the container's range, unshifted
        else:
            self.alog = P._log_quantizer(act, False, 1)
            self.register_buffer("a_max", torch.from_numpy(act["max_abs"]).float())

    def forward(self, x):
        if not self.quantized:
            return x
        if self.scheme != "linear":
            m = _bcast(self.a_max.clamp_min(1e-30), x, self.alog.per_channel, 0)
            return self.alog.dequantize(self.alog.codes(x, m), m)
        if torch.onnx.is_in_onnx_export():
            return _QDQ.apply(
                x, self.scale, self.zero, self.qmin, self.qmax, self.elem, self.lo, self.hi, self.shift
            )
        # the prepared quantizer's own function: the same kernel choice, the same output strides
        return fake_quant_scalar(x, self.scale, self.zero, self.qmin, self.qmax)

    def codes(self, x):
        """Integer codes minus the zero point of a value this quantizer produced (exact)."""
        return torch.round(x.double() / self.scale)

    def extra_repr(self):
        return f"{self.scheme}, bits={self.spec['bits']}"


class IntWeight(nn.Module):
    """A quantized weight from the file: codes, scales and zero points; returns the dequantized
    weight (the fake-quantize kernel's ``(q - Z) S``)."""

    def __init__(self, w: dict):
        super().__init__()
        self.spec = {k: v for k, v in w.items() if not isinstance(v, np.ndarray)}
        self.scheme = w["scheme"]
        self.quantized = True
        t = torch.from_numpy
        shape = w["shape"]
        self.axis = int(w.get("ch_axis", 0)) if w.get("per_channel") else None
        self.group_size = w.get("group_size") if self.scheme == "linear" else None
        if self.scheme == "float":
            self.register_buffer("w_hat", t(w["values"]).float())
            return
        codes = t(np.asarray(w["codes"])).to(torch.int32)
        self.register_buffer("codes", codes)
        if w.get("mask") is not None:
            self.register_buffer("mask", t(w["mask"]))
        bshape = [1] * len(shape)
        if self.axis is not None:
            bshape[self.axis] = -1
        if self.group_size is not None:
            self._init_groups(w, codes)
        elif self.scheme == "linear":
            scale = t(w["scale"]).float().reshape(bshape if self.axis is not None else [])
            zero = (
                t(w["zero_point"]).float().reshape(scale.shape)
                if w.get("zero_point") is not None
                else torch.zeros(())
            )
            self.register_buffer("w_scale", scale)
            self.register_buffer("w_zero", zero)
            self.register_buffer("w_hat", (codes.float() - zero) * scale)
            # the ONNX container: codes - qmin fit; 8-bit signed codes go as uint8 + 128 (u8u8)
            self.elem, _, shift = P.container(w["bits"], w["qmin"] < 0)
            self.register_buffer("onnx_codes", (codes + shift).to(torch.int32))
            n = int(scale.numel())
            zero_i = zero.reshape(-1).round().to(torch.int32).expand(n).clone() + shift
            per = self.axis is not None
            self.register_buffer("onnx_zero", zero_i if per else zero_i.reshape([]))
            self.register_buffer(
                "onnx_scale", scale.reshape(-1).clone() if per else scale.reshape([]).clone()
            )
        else:
            self.wlog = P._log_quantizer(w, True, shape[0])
            m = t(w["max_abs"]).float()
            self.register_buffer("w_max", m)
            with torch.no_grad():
                self.register_buffer(
                    "w_hat",
                    self.wlog.dequantize(codes.float(), _bcast(m, codes, w["per_channel"], self.axis or 0)),
                )

    def _init_groups(self, w: dict, codes: torch.Tensor) -> None:
        """Per-group scales: the flat ``C * G`` scales and zero points, the dequantized weight and
        the ONNX form's padded codes (:class:`_GroupDQ`)."""
        t = torch.from_numpy
        shape, ax, gs = w["shape"], int(w.get("ch_axis", 0)), int(w["group_size"])
        scale = t(np.asarray(w["scale"], np.float32).reshape(-1))
        zp = w.get("zero_point")
        zero = torch.zeros(scale.shape) if zp is None else t(zp.reshape(-1)).float()
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zero", zero)
        self.register_buffer("w_hat", t(P.dequantize_linear(w)))
        self.elem, _, shift = P.container(w["bits"], w["qmin"] < 0)
        padded = P.group_padded(np.asarray(w["codes"]), None if zp is None else zp, shape, ax, gs)
        self.register_buffer("onnx_codes", t(padded + shift).to(torch.int32))
        self.register_buffer("onnx_zero", zero.round().to(torch.int32) + shift)
        self.register_buffer("onnx_scale", scale.clone())
        self.group_geometry = P.group_geometry(shape, ax)

    def forward(self):
        if self.quantized and self.group_size is not None and torch.onnx.is_in_onnx_export():
            return _GroupDQ.apply(
                self.onnx_codes, self.w_hat, self.onnx_scale, self.onnx_zero, self.elem, *self.group_geometry
            )
        if self.quantized and self.scheme == "linear" and torch.onnx.is_in_onnx_export():
            axis = -1 if self.axis is None else self.axis
            return _DQ.apply(self.onnx_codes, self.w_hat, self.onnx_scale, self.onnx_zero, axis, self.elem)
        return self.w_hat

    def extra_repr(self):
        return f"{self.scheme}, bits={self.spec.get('bits', 32)}, layout={self.spec.get('layout')}"


INT_OPS = {"linear", "conv1d", "conv2d", "conv3d", "matmul", "bmm", "mm"}


class IntAccum(nn.Module):
    """``F.linear``/``F.conv*``/``matmul`` on linear-quantized operands as an exact integer
    accumulation (float64 holds every integer below 2^53) rescaled once by the two scales."""

    def __init__(self, fn, a: nn.Module, b: nn.Module):
        super().__init__()
        self.fn = fn
        self.a, self.b = a, b  # IntQuant or IntWeight (not registered again: no state of their own)

    def forward(self, x, w, *rest, **kwargs):
        xa = self.a.codes(x)
        if isinstance(self.b, IntWeight):
            wb = self.b.codes.double() - self.b.w_zero.double()
            sb = self.b.w_scale.double()
        else:
            wb, sb = self.b.codes(w), torch.tensor(self.b.scale, dtype=torch.float64)
        bias = rest[0] if rest else kwargs.pop("bias", None)
        acc = (
            self.fn(xa, wb, None, *rest[1:], **kwargs)
            if bias is not None or rest
            else self.fn(xa, wb, **kwargs)
        )
        name = getattr(self.fn, "__name__", "")
        sa = torch.tensor(self.a.scale, dtype=torch.float64)
        if isinstance(self.b, IntWeight) and self.b.axis is not None:
            if name == "linear" or name.startswith("conv"):
                shape = [1, -1] + [1] * (acc.dim() - 2) if name.startswith("conv") else [-1]
            else:  # x @ W with W per output column
                shape = [-1]
            y = acc * (sa * sb.reshape(-1)).reshape(shape)
        else:
            y = acc * (sa * sb.reshape([]))
        if float(acc.abs().max()) >= P.EXACT_INT:
            raise OverflowError("integer accumulation above 2^53")
        y = y.float()
        if bias is not None:
            y = y + (bias.reshape(1, -1, *([1] * (y.dim() - 2))) if name.startswith("conv") else bias)
        return y


def load_graph_model(nodes: list[dict], arithmetic: str = "float") -> fx.GraphModule:
    """The runnable model of a decoded node list (an ``fx.GraphModule`` over allow-listed calls)."""
    if arithmetic not in ("float", "integer"):
        raise ValueError(f"arithmetic={arithmetic!r}: use 'integer' or 'float'")
    A.check_nodes(nodes)
    root = nn.Module()
    graph = fx.Graph()
    env: list = []
    qmods: dict[int, nn.Module] = {}
    for i, node in enumerate(nodes):
        op = node["op"]
        if op == "input":
            env.append(graph.placeholder(str(node["name"]).replace(".", "_") or f"input{i}"))
        elif op == "const":
            root.register_buffer(f"c{i}", torch.from_numpy(np.asarray(node["value"]).copy()))
            env.append(graph.get_attr(f"c{i}"))
        elif op == "qweight":
            qmods[i] = IntWeight(node["weight"])
            root.add_module(f"w{i}", qmods[i])
            env.append(graph.call_module(f"w{i}", ()))
        elif op == "quant":
            qmods[i] = IntQuant(node["act"])
            root.add_module(f"q{i}", qmods[i])
            env.append(graph.call_module(f"q{i}", (env[node["input"]],)))
        elif op in ("call", "method"):
            args, kwargs = _dec(node["args"], env), _dec(node["kwargs"], env)
            if op == "method":
                env.append(graph.call_method(_check_method(node["fn"]), tuple(args), dict(kwargs)))
                continue
            fn = _resolve(node["fn"])
            if fn is getattr and args[1] not in GETATTR_OK:
                raise ValueError(f"the file reads attribute {args[1]!r}")
            acc = _integer_op(fn, node, nodes, qmods) if arithmetic == "integer" else None
            if acc is not None:
                root.add_module(f"acc{i}", acc)
                env.append(graph.call_module(f"acc{i}", tuple(args), dict(kwargs)))
            else:
                env.append(graph.call_function(fn, tuple(args), dict(kwargs)))
        elif op == "output":
            graph.output(_dec(node["args"], env))
            env.append(None)
        else:
            raise ValueError(f"unknown node {op!r} in the file")
    gm = fx.GraphModule(root, graph, class_name="IntegerGraphModel")
    return gm.eval()


def _integer_op(fn, node, nodes, qmods) -> IntAccum | None:
    name = getattr(fn, "__name__", "")
    if name not in INT_OPS:
        return None
    refs = [a["$n"] for a in node["args"]["$t"][:2] if isinstance(a, dict) and "$n" in a]
    if len(refs) != 2:
        return None
    a, b = (qmods.get(r) for r in refs)
    linear_q = isinstance(a, IntQuant) and a.scheme == "linear"
    ok_b = (isinstance(b, IntWeight) and b.scheme == "linear") or (
        isinstance(b, IntQuant) and b.scheme == "linear"
    )
    if not (linear_q and ok_b):
        return None
    if isinstance(b, IntWeight) and b.group_size is not None:
        return None  # per-group scales vary along the sum: dequantized arithmetic
    if isinstance(b, IntWeight) and b.axis is not None:
        # per-channel scales must lie on the output axis of the product
        ndim = b.codes.dim()
        out_axis = 0 if name == "linear" or name.startswith("conv") else ndim - 1
        if b.axis != out_axis:
            return None
    return IntAccum(fn, a, b)


def set_quantized(gm: nn.Module, quantized: bool) -> None:
    """``False``: activation quantizers pass through and weights are their dequantized values (the
    float reference model for latency)."""
    for m in gm.modules():
        if isinstance(m, (IntQuant, IntWeight)):
            m.quantized = quantized


# -- the file -------------------------------------------------------------------------------------
def convert_graph(
    model: nn.Module,
    path: str | Path | None = None,
    arithmetic: str = "float",
    nm: tuple[int, int] | None = None,
):
    """Write the prepared model as a graph file (``.npz``/``.pt``) and return the loaded model;
    ``nm=(n, m)``: weights may take the N:M layout (as :func:`qpexp.core.quant.export.convert`)."""
    header, blob = encode_graph(graph_ir(model), nm)
    if path is None:
        return load_graph_model(decode_graph(header, blob), arithmetic)
    P.save_package(header, blob, path)
    return load_graph(path, arithmetic)


def load_graph(path: str | Path, arithmetic: str = "float") -> fx.GraphModule:
    header, blob = P.read_package(path)
    return load_graph_model(decode_graph(header, blob), arithmetic)


def is_graph_file(path: str | Path) -> bool:
    header, _ = P.read_package(path)
    return json.loads(header).get("format") == FORMAT


def act_quantizer_of(model: nn.Module):
    """Every activation quantizer of the prepared model, for calibration checks."""
    return [m for m in model.modules() if isinstance(m, LinearQuantizer) and not m.is_weight]

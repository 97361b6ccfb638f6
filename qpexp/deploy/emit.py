"""The ONNX QDQ models of the integer file, one per format: :func:`onnx_model` writes the per-op
list (:mod:`qpexp.core.quant.export`) node by node; :func:`onnx_graph_model` exports a loaded graph
(:mod:`qpexp.core.quant.graph_export`) with ``torch.onnx.export`` and sets the exact containers in a
post-pass. Both take their element types from the one table, :func:`qpexp.core.quant.package.container`.

Per-op list: weights enter the graph as integer initializers behind DequantizeLinear (per output
channel via ``axis=0``); each layer's input goes through QuantizeLinear/DequantizeLinear (a Clip
first when the quantizer's range is narrower than its container's). Pooling, Flatten and Reshape
commute with quantization, so they run on the quantized tensor (Q right after the ReLU, DQ right
before the consumer): onnxruntime then fuses DQ -> Conv -> ReLU -> Q into QLinearConv.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import nn

from qpexp.core.quant import package as P
from qpexp.core.quant.export import dequantize_linear
from qpexp.core.quant.graph_export import IntQuant, IntWeight, set_quantized
from qpexp.core.quant.package import CONTAINER_RANGE, container

COMMUTES_WITH_Q = ("Flatten", "Reshape", "MaxPool1d", "MaxPool2d", "MaxPool3d")


def _elem(name: str) -> int:
    from onnx import TensorProto as TP

    return getattr(TP, name)


def _code_range(name: str, shift: int) -> tuple[int, int]:
    """The codes (before the shift) that a container holds."""
    lo, hi = CONTAINER_RANGE[name]
    return lo - shift, hi - shift


def _int_tensor(name: str, values: np.ndarray, elem: int, shape):
    from onnx import helper

    return helper.make_tensor(name, elem, list(shape), np.asarray(values, np.int64).reshape(-1).tolist())


class _Graph:
    """The nodes, initializers and container info of an ONNX graph under construction."""

    def __init__(self):
        self.nodes, self.inits = [], []
        self.info = {"weight_containers": [], "act_containers": [], "simulated": []}

    def const(self, name, arr):
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op, inputs, outputs, **attrs):
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, **attrs))
        return outputs[0]


# -- the per-op list ------------------------------------------------------------------------------
def onnx_model(ops: list[dict], input_shape: tuple[int, ...], quantized: bool = True, opset: int = 21):
    """An ONNX model of the op list from :func:`qpexp.core.quant.export.load_ops` (or ``model_ir``).

    ``quantized=False`` uses dequantized (float) weights and no activation quantization.
    Returns ``(ModelProto, info)``; ``info`` lists the containers and why a width is simulated.
    Raises NotImplementedError for a scheme ONNX QDQ cannot express (log, companding).
    """
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper

    g = _Graph()
    q_at = _q_positions(ops, quantized)
    cur, pending_dq = "input", None
    for i, op in enumerate(ops):
        name = op["name"].replace(".", "_")
        if i in q_at:  # quantize here; the DQ sits right before the layer
            cur, pending_dq = _act_q(g, ops[q_at[i]]["act"], op["name"], name, cur)
        if "weight" in op:
            if quantized and op["act"] is not None:
                cur = g.node("DequantizeLinear", [cur, *pending_dq], [f"{name}_xdq"])
            cur = _layer(g, op, name, cur, quantized)
        else:
            cur = _plain_op(g, op, name, cur)
    g.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        g.nodes,
        "qpexp",
        [helper.make_tensor_value_info("input", TP.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info("logits", TP.FLOAT, ["N", None])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qpexp")
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model, g.info


def _q_positions(ops: list[dict], quantized: bool) -> dict[int, int]:
    """Where each quantized layer's Q goes: after the last op that does not commute with quantization."""
    q_at: dict[int, int] = {}
    for i, op in enumerate(ops):
        if "weight" in op and quantized and op["act"] is not None:
            j = i
            a = op["act"]
            byte_sized = a["scheme"] == "linear" and container(a["bits"], a["qmin"] < 0)[1] >= 8
            while (
                byte_sized and j > 0 and ops[j - 1]["op"] in COMMUTES_WITH_Q
            ):  # ORT lacks 4-bit Reshape etc.
                j -= 1
            q_at[j] = i
    return q_at


def _act_q(g: _Graph, a: dict, layer: str, name: str, cur: str) -> tuple[str, tuple[str, str]]:
    """``[Clip] -> QuantizeLinear`` of a layer's input activation; returns the output and the DQ's
    (scale, zero point) inputs."""
    if a["scheme"] != "linear":
        raise NotImplementedError(f"ONNX QDQ cannot express {a['scheme']} activation codes ({layer})")
    ename, cbits, shift = container(a["bits"], a["qmin"] < 0)
    g.info["act_containers"].append(ename.lower())
    if cbits != a["bits"]:
        g.info["simulated"].append(f"{a['bits']}-bit activations run in {ename.lower()}")
    s = float(a["scale"].reshape(-1)[0])
    z = 0 if a["zero_point"] is None else int(a["zero_point"].reshape(-1)[0])
    if (a["qmin"], a["qmax"]) != _code_range(ename, shift):  # narrower than the container: clip (exact)
        cmin = g.const(f"{name}_clip_lo", np.float32(np.float32(s) * np.float32(a["qmin"] - z)))
        cmax = g.const(f"{name}_clip_hi", np.float32(np.float32(s) * np.float32(a["qmax"] - z)))
        cur = g.node("Clip", [cur, cmin, cmax], [f"{name}_clipped"])
    sn = g.const(f"{name}_a_scale", np.float32(s))
    g.inits.append(_int_tensor(f"{name}_a_zero", [z + shift], _elem(ename), []))
    cur = g.node("QuantizeLinear", [cur, sn, f"{name}_a_zero"], [f"{name}_xq"])
    return cur, (sn, f"{name}_a_zero")


def _layer(g: _Graph, op: dict, name: str, cur: str, quantized: bool) -> str:
    """A conv (Conv) or linear (MatMul [+ Add]) layer on ``cur``."""
    w = op["weight"]
    wname = _weight(g, op, name, quantized)
    bias = [g.const(f"{name}_b", op["bias"].astype(np.float32))] if op["bias"] is not None else []
    if op["op"] == "Linear":
        # x @ W^T: the weight is stored transposed ([in, out], channel axis 1)
        cur = g.node("MatMul", [cur, wname], [f"{name}_mm"])
        return g.node("Add", [cur, bias[0]], [f"{name}_y"]) if bias else cur
    return g.node(
        "Conv",
        [cur, wname, *bias],
        [f"{name}_y"],
        kernel_shape=list(w["shape"][2:]),
        strides=op["stride"],
        pads=list(op["padding"]) * 2,
        dilations=op["dilation"],
        group=op["groups"],
    )


def _plain_op(g: _Graph, op: dict, name: str, cur: str) -> str:
    """ReLU, Flatten, Reshape, max pooling or BatchNorm on ``cur``."""
    kind = op["op"]
    if kind == "ReLU":
        return g.node("Relu", [cur], [f"{name}_y"])
    if kind == "Flatten":
        if op["end_dim"] != -1:
            raise NotImplementedError(f"ONNX export: Flatten with end_dim={op['end_dim']}")
        return g.node("Flatten", [cur], [f"{name}_y"], axis=op["start_dim"])
    if kind == "Reshape":
        shp = g.const(f"{name}_shape", np.array([0, *op["shape"]], np.int64))
        return g.node("Reshape", [cur, shp], [f"{name}_y"])
    if kind.startswith("MaxPool"):
        return g.node(
            "MaxPool",
            [cur],
            [f"{name}_y"],
            kernel_shape=op["kernel_size"],
            strides=op["stride"],
            pads=list(op["padding"]) * 2,
            dilations=op["dilation"],
            ceil_mode=int(op["ceil_mode"]),
        )
    if kind == "BatchNorm":
        c = op["mean"].shape[0]
        gamma = op["gamma"] if op["gamma"] is not None else np.ones(c, np.float32)
        beta = op["beta"] if op["beta"] is not None else np.zeros(c, np.float32)
        parts = (("g", gamma), ("b", beta), ("m", op["mean"]), ("v", op["var"]))
        args = [g.const(f"{name}_{k}", v) for k, v in parts]
        return g.node("BatchNormalization", [cur, *args], [f"{name}_y"], epsilon=op["eps"])
    raise NotImplementedError(f"ONNX export: op {kind}")


def _weight(g: _Graph, op: dict, name: str, quantized: bool) -> str:
    w = op["weight"]
    t = op["op"] == "Linear"  # MatMul takes W^T
    if not quantized or w["scheme"] == "float":
        if w["scheme"] == "float":
            vals = w["values"].astype(np.float32)
        elif w["scheme"] == "linear":
            vals = dequantize_linear(w)
        else:
            raise NotImplementedError(f"ONNX export: float view of {w['scheme']} weights")
        return g.const(f"{name}_w", np.ascontiguousarray(vals.T) if t else vals)
    if w["scheme"] != "linear":
        raise NotImplementedError(f"ONNX QDQ cannot express {w['scheme']} weight codes ({op['name']})")
    ename, cbits, shift = container(w["bits"], w["qmin"] < 0)
    elem = _elem(ename)
    g.info["weight_containers"].append(ename.lower())
    if cbits != w["bits"]:
        g.info["simulated"].append(f"{w['bits']}-bit weights run in {ename.lower()}")
    if w.get("group_size") is not None:
        return _group_weight(g, w, name, t, elem, shift)
    n_ch = w["shape"][0]
    codes = w["codes"].T if t else w["codes"]
    g.inits.append(_int_tensor(f"{name}_wq", codes.astype(np.int64) + shift, elem, codes.shape))
    scale = w["scale"].astype(np.float32).reshape(-1)
    zero = np.zeros(scale.shape, np.int64) if w.get("zero_point") is None else w["zero_point"].reshape(-1)
    zero = zero.astype(np.int64) + shift
    attrs = {}
    if w["per_channel"]:
        attrs["axis"] = 1 if t else w["ch_axis"]
        sname = g.const(f"{name}_w_scale", scale.reshape(n_ch))
        g.inits.append(_int_tensor(f"{name}_w_zero", zero, elem, [n_ch]))
    else:
        sname = g.const(f"{name}_w_scale", np.float32(scale[0]))
        g.inits.append(_int_tensor(f"{name}_w_zero", zero[:1], elem, []))
    return g.node("DequantizeLinear", [f"{name}_wq", sname, f"{name}_w_zero"], [f"{name}_w"], **attrs)


def _group_weight(g: _Graph, w: dict, name: str, t: bool, elem: int, shift: int) -> str:
    """A per-group weight: DequantizeLinear (``axis=0``) on its ``(C * G, g)`` padded codes, Reshape
    to ``(C, G g)``, Slice to ``K`` columns, Reshape to the weight's shape (channel axis first), and a
    Transpose where the channel axis is another or MatMul takes ``W^T`` (exact in any opset >= 13)."""
    shape, ax, gs = w["shape"], int(w.get("ch_axis", 0)), int(w["group_size"])
    zp = w.get("zero_point")
    padded = P.group_padded(w["codes"], zp, shape, ax, gs)
    g.inits.append(_int_tensor(f"{name}_wq", padded + shift, elem, padded.shape))
    scale = np.asarray(w["scale"], np.float32).reshape(-1)
    zero = (np.zeros(scale.shape, np.int64) if zp is None else zp.reshape(-1).astype(np.int64)) + shift
    sname = g.const(f"{name}_w_scale", scale)
    g.inits.append(_int_tensor(f"{name}_w_zero", zero, elem, [scale.size]))
    y = g.node("DequantizeLinear", [f"{name}_wq", sname, f"{name}_w_zero"], [f"{name}_w_groups"], axis=0)
    c, k, moved, perm = P.group_geometry(shape, ax)
    i64 = lambda v: np.asarray(v, np.int64)  # noqa: E731
    y = g.node("Reshape", [y, g.const(f"{name}_w_rows", i64([c, -1]))], [f"{name}_w_rows_y"])
    starts, ends, axes = (g.const(f"{name}_w_{k_}", i64(v)) for k_, v in (("s", [0]), ("e", [k]), ("a", [1])))
    y = g.node("Slice", [y, starts, ends, axes], [f"{name}_w_sliced"])
    y = g.node("Reshape", [y, g.const(f"{name}_w_shape", i64(moved))], [f"{name}_w_moved"])
    perm = perm or list(range(len(shape)))
    if t:  # MatMul takes W^T of the (C_out, C_in) weight
        perm = [perm[i] for i in (1, 0)] if len(shape) == 2 else perm
    if perm != list(range(len(shape))):
        return g.node("Transpose", [y], [f"{name}_w"], perm=perm)
    return g.node("Identity", [y], [f"{name}_w"])


# -- the graph format -----------------------------------------------------------------------------
def onnx_graph_model(gm: nn.Module, example: torch.Tensor, quantized: bool = True, opset: int = 21):
    """The ONNX model of a loaded graph (:func:`qpexp.core.quant.graph_export.load_graph`): exported
    with ``torch.onnx.export(..., dynamo=False)`` (TorchScript exporter: every torch op it knows,
    Softmax, LayerNormalization, Gelu, Reshape, ...), where each ``quant`` node emits
    ``QuantizeLinear``/``DequantizeLinear`` (a ``Clip`` first when the range is narrower than the
    container) and each ``qweight`` its codes as an integer initializer behind ``DequantizeLinear``;
    a post-pass sets the exact containers and bumps the opset to 21. Returns ``(ModelProto, info)``;
    info lists the containers and what runs at a wider width than its codes."""
    import onnx
    from onnx import helper

    info = _graph_info(gm, quantized)
    model = _torch_export(gm, example, quantized, opset)
    _PostPass(model).run()
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", opset)])
    model.ir_version = 10
    model.producer_name = "qpexp"
    onnx.checker.check_model(model)
    return model, info


def _graph_info(gm: nn.Module, quantized: bool) -> dict:
    """The containers of the graph's quantizers and what runs wider than its codes."""
    info = {"weight_containers": [], "act_containers": [], "simulated": []}
    for m in gm.modules():
        if isinstance(m, IntQuant) and quantized:
            if m.scheme != "linear":
                raise NotImplementedError(f"ONNX QDQ cannot express {m.scheme} activation codes")
            info["act_containers"].append(m.elem.lower())
            if container(m.spec["bits"], m.qmin < 0)[1] != m.spec["bits"]:
                info["simulated"].append(f"{m.spec['bits']}-bit activations run in {m.elem.lower()}")
        if isinstance(m, IntWeight) and quantized and m.scheme != "float":
            if m.scheme != "linear":
                raise NotImplementedError(f"ONNX QDQ cannot express {m.scheme} weight codes")
            elem, cbits, _ = container(m.spec["bits"], m.spec["qmin"] < 0)
            info["weight_containers"].append(elem.lower())
            if cbits != m.spec["bits"]:
                info["simulated"].append(f"{m.spec['bits']}-bit weights run in {elem.lower()}")
    return info


def _torch_export(gm: nn.Module, example: torch.Tensor, quantized: bool, opset: int):
    import onnx

    set_quantized(gm, quantized)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                gm,
                (example,),
                buf,
                dynamo=False,
                opset_version=min(opset, 20),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                do_constant_folding=False,
            )
    finally:
        set_quantized(gm, True)
    return onnx.load_from_string(buf.getvalue())


class _PostPass:
    """Sets the containers the symbolic functions marked (``qpexp_elem`` attributes) on the exported
    model: each marked node's zero point (and a weight DQ's codes) retyped, on its own copy of an
    initializer the exporter deduplicated behind Identity nodes; then drops the dead Identities."""

    def __init__(self, model):
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
        self.identity = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}

    def run(self) -> None:
        done = set()
        for k, n in enumerate(self.model.graph.node):
            marks = {a.name: a for a in n.attribute if a.name.startswith("qpexp_")}
            if not marks:
                continue
            elem = _elem(marks["qpexp_elem"].s.decode())
            for a in marks.values():
                n.attribute.remove(a)
            slots = [2] + ([0] if n.op_type == "DequantizeLinear" and n.input[0] not in self.consts else [])
            for slot in slots:
                if slot == 0 and not (n.input[0] in self.inits or n.input[0] in self.identity):
                    continue  # an activation's DQ: its input is the Q's output
                n.input[slot] = self.own(n.input[slot], str(k))
                if n.input[slot] not in done:
                    self.retype(n.input[slot], elem)
                    done.add(n.input[slot])
        # the deduplication Identity nodes nothing reads any more (their initializers were copied)
        graph = self.model.graph
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        for n in [n for n in graph.node if n.op_type == "Identity" and n.output[0] not in used]:
            graph.node.remove(n)

    def retype(self, name: str, elem: int) -> None:
        from onnx import helper, numpy_helper

        if name in self.inits:
            arr = numpy_helper.to_array(self.inits[name]).astype(np.int64)
            self.inits[name].CopyFrom(
                helper.make_tensor(name, elem, list(arr.shape), arr.reshape(-1).tolist())
            )
        elif name in self.consts:
            attr = next(a for a in self.consts[name].attribute if a.name == "value")
            arr = numpy_helper.to_array(attr.t).astype(np.int64)
            attr.t.CopyFrom(helper.make_tensor(name, elem, list(arr.shape), arr.reshape(-1).tolist()))
        else:
            raise RuntimeError(f"ONNX post-pass: {name} is neither an initializer nor a constant")

    def own(self, name: str, suffix: str) -> str:
        """The node's own copy of an initializer the exporter deduplicated behind Identity nodes."""
        import onnx

        src = name
        while src in self.identity:
            src = self.identity[src]
        if src == name or src not in self.inits:
            return name
        copy = onnx.TensorProto()
        copy.CopyFrom(self.inits[src])
        copy.name = f"{name}__{suffix}"
        self.model.graph.initializer.append(copy)
        self.inits[copy.name] = self.model.graph.initializer[-1]
        return copy.name

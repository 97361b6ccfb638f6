"""Deployment check after QAT: the integer model file, its round trip, and an ONNX QDQ model in
onnxruntime next to the float model's ONNX.

``deploy(model, dm, out_dir, cfg, record)`` returns record keys:

* ``deploy/file_bytes``: real bytes of ``deploy/model.qpx.npz`` (:mod:`qpexp.core.quant.export`),
  with ``deploy/payload_bytes``, ``deploy/header_bytes``, ``deploy/container_bytes`` and
  ``deploy/accounted_payload_bits`` (the accounting's formulas applied to what the file stores);
* ``deploy/roundtrip_max_abs_diff``: max |logits| difference on the test split between the model
  read back from the file (codes dequantized with the fake-quantize kernel's arithmetic) and the
  fake-quantized model: 0.0 when the round trip is exact; ``deploy/roundtrip_codes_equal``: every
  weight code and every input-activation code on the test split equals the fake-quantized model's;
  ``deploy/int_arith_max_abs_diff``, ``deploy/int_arith_act_code_flips`` (fraction of activation
  codes that differ) and ``deploy/int_test_acc`` for the same file run with integer accumulation
  (float rounding differs from the float conv, so a value on a rounding edge can flip a code);
* where the scheme is expressible as ONNX QuantizeLinear/DequantizeLinear (linear weights and
  activations): ``deploy/onnx_test_acc``, ``deploy/onnx_acc_diff`` (minus ``final/test_acc``),
  ``deploy/onnx_argmax_agree`` (fraction of test samples where ORT and the fake-quantized model
  predict the same class),
  ``deploy/onnx_latency_ms`` and ``deploy/fp32_onnx_latency_ms`` (median per call, batch
  ``deploy/latency_batch_size``, interleaved, ORT without thread spinning),
  ``deploy/onnx_integer_kernels`` (integer-arithmetic nodes, e.g. QLinearConv, in ORT's optimized
  graph; ``deploy/onnx_bias_int32``: ORT rounded the float biases to int32 at scale ``S_x S_w`` to
  fuse them, the only numerical liberty it takes), ``deploy/onnx_weight_container`` /
  ``deploy/onnx_act_container`` (ONNX element types);
* ``deploy/simulated_only``: False only when an ONNX model ran in onnxruntime with every weight and
  activation in a type of exactly its width (int8/uint8, int4/uint4, int16/uint16). 3-bit codes in
  int4 or 6-bit codes in int8 containers, log/companding codes, or no ONNX run at all give True, and
  ``deploy/simulated_reason`` says why.

Weights enter the ONNX graph as integer initializers behind DequantizeLinear (per output channel
via ``axis=0``); each layer's input goes through QuantizeLinear/DequantizeLinear (a Clip first when
the quantizer's range is narrower than its container's). Pooling, Flatten and Reshape commute with
quantization, so they run on the quantized tensor (Q right after the ReLU, DQ right before the
consumer): onnxruntime then fuses DQ -> Conv -> ReLU -> Q into QLinearConv.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qpexp.core.quant.codebook import no_integer_form
from qpexp.core.quant.export import (
    convert,
    dequantize_linear,  # the one definition (the integer model's too)
    load,
    load_ops,
    model_ir,
    package_stats,
    uses_graph_format,
)
from qpexp.core.quant.layers import is_quant_layer
from qpexp.deploy.common import (  # noqa: F401 (qpexp.deploy's names, as before)
    INTEGER_OPS,
    _latency,
    _predictions,
    integer_kernels,
    onnx_results,
    ort_session,
)
from qpexp.deploy.graph import deploy_graph

FILE_NAME = "model.qpx.npz"
COMMUTES_WITH_Q = ("Flatten", "Reshape", "MaxPool1d", "MaxPool2d", "MaxPool3d")


# -- ONNX -----------------------------------------------------------------------------------------
def _container(bits: int, signed: bool):
    """(ONNX element type, its bit width, code shift) of the QDQ type that holds ``bits``-bit codes.

    8-bit codes always travel as uint8: signed codes are shifted by +128 together with their zero
    point, which dequantizes to exactly the same values. onnxruntime fuses DQ -> Conv -> Q into
    QLinearConv, and its u8s8 kernels on x86 CPUs without VNNI (AVX2, AVX-512F) add pairs of
    u8 x s8 products in saturating int16 (``vpmaddubsw``): 255 x 127 x 2 overflows, the logits move
    and accuracy drops (10 points on the 8-bit MNIST-1D CNN with onnxruntime 1.32). u8u8 kernels
    widen first and are exact on every CPU.
    """
    from onnx import TensorProto as TP

    if bits <= 4:
        return (TP.INT4, 4, 0) if signed else (TP.UINT4, 4, 0)
    if bits <= 8:
        return TP.UINT8, 8, 128 if signed else 0
    return (TP.INT16, 16, 0) if signed else (TP.UINT16, 16, 0)


def _code_range(elem: int, shift: int) -> tuple[int, int]:
    """The codes (before the shift) that a container holds."""
    from onnx import TensorProto as TP

    lo, hi = {
        TP.INT4: (-8, 7),
        TP.UINT4: (0, 15),
        TP.UINT8: (0, 255),
        TP.INT16: (-(2**15), 2**15 - 1),
        TP.UINT16: (0, 2**16 - 1),
    }[elem]
    return lo - shift, hi - shift


def _int_tensor(name: str, values: np.ndarray, elem: int, shape):
    from onnx import helper

    return helper.make_tensor(name, elem, list(shape), np.asarray(values, np.int64).reshape(-1).tolist())


def onnx_model(ops: list[dict], input_shape: tuple[int, ...], quantized: bool = True, opset: int = 21):
    """An ONNX model of the op list from :func:`qpexp.core.quant.export.load_ops` (or ``model_ir``).

    ``quantized=False`` uses dequantized (float) weights and no activation quantization.
    Returns ``(ModelProto, info)``; ``info`` lists the containers and why a width is simulated.
    Raises NotImplementedError for a scheme ONNX QDQ cannot express (log, companding).
    """
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    nodes, inits = [], []
    info = {"weight_containers": [], "act_containers": [], "simulated": []}

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op, inputs, outputs, **attrs):
        nodes.append(helper.make_node(op, inputs, outputs, **attrs))
        return outputs[0]

    # where each quantized layer's Q goes: after the last op that does not commute with quantization
    q_at: dict[int, int] = {}
    for i, op in enumerate(ops):
        if "weight" in op and quantized and op["act"] is not None:
            j = i
            a = op["act"]
            byte_sized = a["scheme"] == "linear" and _container(a["bits"], a["qmin"] < 0)[1] >= 8
            while (
                byte_sized and j > 0 and ops[j - 1]["op"] in COMMUTES_WITH_Q
            ):  # ORT lacks 4-bit Reshape etc.
                j -= 1
            q_at[j] = i
    cur = "input"
    for i, op in enumerate(ops):
        name, kind = op["name"].replace(".", "_"), op["op"]
        if i in q_at:  # quantize here; the DQ sits right before the layer
            a = ops[q_at[i]]["act"]
            if a["scheme"] != "linear":
                raise NotImplementedError(
                    f"ONNX QDQ cannot express {a['scheme']} activation codes ({op['name']})"
                )
            elem, cbits, shift = _container(a["bits"], a["qmin"] < 0)
            info["act_containers"].append(TP.DataType.Name(elem).lower())
            if cbits != a["bits"]:
                info["simulated"].append(
                    f"{a['bits']}-bit activations run in {TP.DataType.Name(elem).lower()}"
                )
            s = float(a["scale"].reshape(-1)[0])
            z = 0 if a["zero_point"] is None else int(a["zero_point"].reshape(-1)[0])
            if (a["qmin"], a["qmax"]) != _code_range(
                elem, shift
            ):  # narrower than the container: clip (exact)
                cmin = const(f"{name}_clip_lo", np.float32(np.float32(s) * np.float32(a["qmin"] - z)))
                cmax = const(f"{name}_clip_hi", np.float32(np.float32(s) * np.float32(a["qmax"] - z)))
                cur = node("Clip", [cur, cmin, cmax], [f"{name}_clipped"])
            sn = const(f"{name}_a_scale", np.float32(s))
            inits.append(_int_tensor(f"{name}_a_zero", [z + shift], elem, []))
            cur = node("QuantizeLinear", [cur, sn, f"{name}_a_zero"], [f"{name}_xq"])
            pending_dq = (sn, f"{name}_a_zero")
        if "weight" in op:
            w = op["weight"]
            if quantized and op["act"] is not None:
                cur = node("DequantizeLinear", [cur, *pending_dq], [f"{name}_xdq"])
            wname = _weight(op, name, quantized, info, inits, nodes, const)
            bias = [const(f"{name}_b", op["bias"].astype(np.float32))] if op["bias"] is not None else []
            if kind == "Linear":
                # x @ W^T: the weight is stored transposed ([in, out], channel axis 1)
                cur = node("MatMul", [cur, wname], [f"{name}_mm"])
                if bias:
                    cur = node("Add", [cur, bias[0]], [f"{name}_y"])
            else:
                pads = list(op["padding"]) * 2
                cur = node(
                    "Conv",
                    [cur, wname, *bias],
                    [f"{name}_y"],
                    kernel_shape=list(w["shape"][2:]),
                    strides=op["stride"],
                    pads=pads,
                    dilations=op["dilation"],
                    group=op["groups"],
                )
        elif kind == "ReLU":
            cur = node("Relu", [cur], [f"{name}_y"])
        elif kind == "Flatten":
            if op["end_dim"] != -1:
                raise NotImplementedError(f"ONNX export: Flatten with end_dim={op['end_dim']}")
            cur = node("Flatten", [cur], [f"{name}_y"], axis=op["start_dim"])
        elif kind == "Reshape":
            shp = const(f"{name}_shape", np.array([0, *op["shape"]], np.int64))
            cur = node("Reshape", [cur, shp], [f"{name}_y"])
        elif kind.startswith("MaxPool"):
            pads = list(op["padding"]) * 2
            cur = node(
                "MaxPool",
                [cur],
                [f"{name}_y"],
                kernel_shape=op["kernel_size"],
                strides=op["stride"],
                pads=pads,
                dilations=op["dilation"],
                ceil_mode=int(op["ceil_mode"]),
            )
        elif kind == "BatchNorm":
            c = op["mean"].shape[0]
            g = op["gamma"] if op["gamma"] is not None else np.ones(c, np.float32)
            b = op["beta"] if op["beta"] is not None else np.zeros(c, np.float32)
            args = [
                const(f"{name}_{k}", v) for k, v in (("g", g), ("b", b), ("m", op["mean"]), ("v", op["var"]))
            ]
            cur = node("BatchNormalization", [cur, *args], [f"{name}_y"], epsilon=op["eps"])
        else:
            raise NotImplementedError(f"ONNX export: op {kind}")
    nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        nodes,
        "qpexp",
        [helper.make_tensor_value_info("input", TP.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info("logits", TP.FLOAT, ["N", None])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qpexp")
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model, info


def _weight(op, name, quantized, info, inits, nodes, const) -> str:
    from onnx import TensorProto as TP
    from onnx import helper

    w = op["weight"]
    t = op["op"] == "Linear"  # MatMul takes W^T
    if not quantized or w["scheme"] == "float":
        if w["scheme"] == "float":
            vals = w["values"].astype(np.float32)
        elif w["scheme"] == "linear":
            vals = _dequant_linear(w)
        else:
            raise NotImplementedError(f"ONNX export: float view of {w['scheme']} weights")
        return const(f"{name}_w", np.ascontiguousarray(vals.T) if t else vals)
    if w["scheme"] != "linear":
        raise NotImplementedError(f"ONNX QDQ cannot express {w['scheme']} weight codes ({op['name']})")
    elem, cbits, shift = _container(w["bits"], w["qmin"] < 0)
    info["weight_containers"].append(TP.DataType.Name(elem).lower())
    if cbits != w["bits"]:
        info["simulated"].append(f"{w['bits']}-bit weights run in {TP.DataType.Name(elem).lower()}")
    n_ch = w["shape"][0]
    codes = w["codes"].T if t else w["codes"]
    inits.append(_int_tensor(f"{name}_wq", codes.astype(np.int64) + shift, elem, codes.shape))
    scale = w["scale"].astype(np.float32).reshape(-1)
    zero = np.zeros(scale.shape, np.int64) if w.get("zero_point") is None else w["zero_point"].reshape(-1)
    zero = zero.astype(np.int64) + shift
    attrs = {}
    if w["per_channel"]:
        attrs["axis"] = 1 if t else w["ch_axis"]
        sname = const(f"{name}_w_scale", scale.reshape(n_ch))
        inits.append(_int_tensor(f"{name}_w_zero", zero, elem, [n_ch]))
    else:
        sname = const(f"{name}_w_scale", np.float32(scale[0]))
        inits.append(_int_tensor(f"{name}_w_zero", zero[:1], elem, []))
    nodes.append(
        helper.make_node("DequantizeLinear", [f"{name}_wq", sname, f"{name}_w_zero"], [f"{name}_w"], **attrs)
    )
    return f"{name}_w"


def _dequant_linear(w: dict) -> np.ndarray:
    return dequantize_linear(w)


# -- round trip -----------------------------------------------------------------------------------
@torch.no_grad()
def _roundtrip(model, path: Path, x: torch.Tensor, y: torch.Tensor, batch: int) -> dict:
    """The file's model against the fake-quantized one on ``x``: with the fake-quantize kernel's
    arithmetic (must be bit-exact: codes and logits) and with integer accumulation (logits within
    float rounding; an activation code can flip where a value sits on a rounding edge)."""
    exact = load(path, arithmetic="float")
    integer = load(path, arithmetic="integer")
    wrappers = [m for m in model.modules() if is_quant_layer(m)]
    codes_equal = True
    for wrapper, layer in zip(wrappers, exact.integer_layers()):
        if wrapper.wq is not None:
            codes_equal &= torch.equal(wrapper.wq.int_repr(wrapper.layer.weight), layer.weight_codes)
    seen: list[torch.Tensor] = []
    hooks = [
        w.register_forward_pre_hook(lambda m, inp: seen.append(m.aq.int_repr(inp[0])))
        for w in wrappers
        if w.aq is not None
    ]
    for layer in (*exact.integer_layers(), *integer.integer_layers()):
        layer.keep_codes = True

    def codes(m):
        return [la.last_act_codes for la in m.integer_layers() if la.last_act_codes is not None]

    diff = diff_int = 0.0
    correct = flips = total = 0
    try:
        for i in range(0, len(y), batch):
            xb = x[i : i + batch]
            seen.clear()
            ref = model(xb)
            got, got_int = exact(xb), integer(xb)
            mine, mine_int = codes(exact), codes(integer)
            codes_equal &= len(mine) == len(seen) and all(torch.equal(a, b) for a, b in zip(seen, mine))
            flips += sum(int((a != b).sum()) for a, b in zip(seen, mine_int))
            total += sum(a.numel() for a in seen)
            diff = max(diff, float((got - ref).abs().max()))
            diff_int = max(diff_int, float((got_int - ref).abs().max()))
            correct += int((got_int.argmax(1) == y[i : i + batch]).sum())
    finally:
        for h in hooks:
            h.remove()
    return {
        "deploy/roundtrip_max_abs_diff": diff,
        "deploy/roundtrip_codes_equal": bool(codes_equal),
        "deploy/int_arith_max_abs_diff": diff_int,
        "deploy/int_arith_act_code_flips": flips / max(total, 1),
        "deploy/int_test_acc": correct / max(len(y), 1),
    }


# -- the stage ------------------------------------------------------------------------------------
def deploy(model: torch.nn.Module, dm, out_dir: str | Path, cfg, record: dict) -> dict:
    """Convert, check the round trip, and run the ONNX QDQ model in onnxruntime (see module doc)."""
    reason = no_integer_form(model)
    if reason is not None:  # reported plainly: no file, no runtime, not an error of the point
        return {"deploy/simulated_only": True, "deploy/simulated_reason": reason}
    if uses_graph_format(model) or not _op_list_ok(model):  # any model but a plain Sequential
        return deploy_graph(model, dm, out_dir, cfg, record)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILE_NAME
    x, y = dm.splits["test"]
    eval_batch = getattr(dm, "eval_batch_size", 1000)
    was = model.training
    model.eval()
    out: dict = {"deploy/path": str(path)}
    try:
        try:
            convert(model, path)
        except Exception as e:  # NotImplementedError: a construction the file format cannot hold
            return {
                **out,
                "deploy/error": f"{type(e).__name__}: {e}",
                "deploy/simulated_only": True,
                "deploy/simulated_reason": str(e),
            }
        stats = package_stats(path)
        out.update({f"deploy/{k}": v for k, v in stats.items()})
        out.update(_roundtrip(model, path, x, y, eval_batch))
        try:
            out.update(_onnx_check(model, path, x, y, dm, cfg, out_dir, record))
        except Exception as e:  # the runtime refused or crashed: a visible failure, not a lost point
            out.update({"deploy/error": f"ONNX: {type(e).__name__}: {e}", "deploy/simulated_only": True})
    finally:
        model.train(was)
    return out


def deploy_checks(out: dict) -> str:
    """What deployment check ran: ``int+onnx`` (the integer file's round trip and onnxruntime),
    ``int`` (the file's round trip only: no ONNX form, or ``export.onnx=false``), ``none``."""
    ran_int = "deploy/int_test_acc" in out
    ran_onnx = "deploy/onnx_test_acc" in out
    return "int+onnx" if ran_int and ran_onnx else "int" if ran_int else "onnx" if ran_onnx else "none"


def deploy_status(out: dict, final_acc: float | None, max_acc_diff: float = 0.002) -> tuple[str, str | None]:
    """The point's status after deployment and why.

    ``deploy_error``: the export or the runtime failed (``deploy/error``). ``not_deployed``: no check
    ran (``deploy/checks`` is ``none``). ``deploy_mismatch``: the file read back does not give the
    fake-quantized model's codes (``deploy/roundtrip_codes_equal`` false), or the integer file's
    test accuracy (``deploy/int_test_acc``) or onnxruntime's (``deploy/onnx_test_acc``) differs
    from ``final_acc`` by more than ``max_acc_diff`` (0.2 points). Else ``ok``: every check that ran
    passed (``deploy/checks`` and ``deploy/simulated_only`` say which ran and in what containers).
    """
    if "deploy/error" in out:
        return "deploy_error", out["deploy/error"]
    if deploy_checks(out) == "none":
        return "not_deployed", "no deployment check ran"
    if out.get("deploy/roundtrip_codes_equal") is False:
        return "deploy_mismatch", "the integer file's codes differ from the fake-quantized model's"
    for key, what in (("deploy/int_test_acc", "integer file"), ("deploy/onnx_test_acc", "onnxruntime")):
        acc = out.get(key)
        if acc is not None and final_acc is not None and abs(acc - final_acc) > max_acc_diff + 1e-12:
            return "deploy_mismatch", (
                f"{what} test accuracy {acc:.4f} differs from the fake-quantized model's "
                f"{final_acc:.4f} by more than {max_acc_diff:g}"
            )
    return "ok", None


def _op_list_ok(model) -> bool:
    """Whether the per-op format holds this Sequential (else the graph format does)."""
    try:
        model_ir(model, quantized=False)
    except NotImplementedError:
        return False
    return True


def _onnx_check(model, path: Path, x, y, dm, cfg, out_dir: Path, record: dict) -> dict:
    if not getattr(cfg, "onnx", True):
        return {
            "deploy/simulated_only": True,
            "deploy/simulated_reason": "export.onnx=false: no runtime executed the model",
        }

    ops = load_ops(path)
    input_shape = tuple(x.shape[1:])
    try:
        qmodel, info = onnx_model(ops, input_shape, quantized=True)
    except NotImplementedError as e:
        return {"deploy/simulated_only": True, "deploy/simulated_reason": f"no ONNX runtime form: {e}"}
    fmodel, _ = onnx_model(model_ir(model, quantized=False), input_shape, quantized=False)
    qpath, fpath = out_dir / "model.qdq.onnx", out_dir / "model.fp32.onnx"
    qpath.write_bytes(qmodel.SerializeToString())
    fpath.write_bytes(fmodel.SerializeToString())
    threads = torch.get_num_threads()
    opt_path = out_dir / "model.qdq.ort-optimized.onnx"
    qs = ort_session(qmodel, threads, opt_path)
    kernels = integer_kernels(opt_path)
    bias_quantized = bool(kernels)
    if not kernels:
        # ORT rounds float biases to int32 (scale S_x S_w) so that it can fuse integer kernels; where it
        # fuses none (sub-8-bit or narrow-range activations) that rounding only adds error: keep them float
        qs = ort_session(qmodel, threads, opt_path, disabled=["WeightBiasQuantization"])
    return onnx_results(
        model, qs, ort_session(fmodel, threads), x, y, dm, cfg, record, info, qpath, kernels, bias_quantized
    )

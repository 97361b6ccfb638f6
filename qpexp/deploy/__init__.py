"""Deployment check after QAT, one path for both file formats: the integer model file, its round
trip, and an ONNX QDQ model in onnxruntime next to the float model's ONNX.

``deploy(model, dm, out_dir, cfg, record)`` picks the format (:func:`qpexp.core.quant.export.uses_graph_format`:
the per-op list for a plain ``nn.Sequential``, else the graph format, ``deploy/format = "graph"``),
then runs the same steps on either: convert, :func:`package_stats`, one round trip
(:func:`_roundtrip`), one ONNX check (:func:`_onnx_check`, emitters in :mod:`qpexp.deploy.emit`).
It returns record keys:

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
  graph; ``deploy/onnx_bias_int32``: ORT rounded the float biases to int32 at scale ``S_x S_w``
  because that fused more integer kernels than keeping them float; the only numerical liberty
  it takes, and only where it buys a kernel), ``deploy/onnx_weight_container`` /
  ``deploy/onnx_act_container`` (ONNX element types);
* ``deploy/simulated_only``: False only when an ONNX model ran in onnxruntime with every weight and
  activation in a type of exactly its width (int8/uint8, int4/uint4, int16/uint16). 3-bit codes in
  int4 or 6-bit codes in int8 containers, log/companding codes, or no ONNX run at all give True, and
  ``deploy/simulated_reason`` says why.


A model that cannot be converted or run gives ``deploy/error`` (never a silent success).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qpexp.core.quant import graph_export as GE
from qpexp.core.quant.codebook import no_integer_form
from qpexp.core.quant.export import convert, load, load_ops, model_ir, uses_graph_format
from qpexp.core.quant.layers import is_quant_layer
from qpexp.core.quant.package import package_stats
from qpexp.deploy.common import (  # noqa: F401 (qpexp.deploy's names, as before)
    INTEGER_OPS,
    _latency,
    clear_agreement,
    integer_kernels,
    onnx_results,
    ort_session,
)
from qpexp.deploy.emit import COMMUTES_WITH_Q, onnx_graph_model, onnx_model  # noqa: F401

FILE_NAME = "model.qpx.npz"


# -- the two formats: what differs between them ---------------------------------------------------
class _LayerProbe:
    """Per-op list: weight codes of each quantized layer, and each layer's input activation codes
    (the prepared model's ``aq.int_repr`` against the file model's ``last_act_codes``)."""

    def __init__(self, model, path: Path, exact, integer):
        self.wrappers = [m for m in model.modules() if is_quant_layer(m)]
        self.exact, self.integer = exact, integer
        self.seen: list[torch.Tensor] = []
        self.hooks = [
            w.register_forward_pre_hook(lambda m, inp: self.seen.append(m.aq.int_repr(inp[0])))
            for w in self.wrappers
            if w.aq is not None
        ]
        for layer in (*exact.integer_layers(), *integer.integer_layers()):
            layer.keep_codes = True

    def weight_codes_equal(self) -> bool:
        equal = True
        for wrapper, layer in zip(self.wrappers, self.exact.integer_layers()):
            if wrapper.wq is not None:
                equal &= torch.equal(wrapper.wq.int_repr(wrapper.layer.weight), layer.weight_codes)
        return equal

    def clear(self) -> None:
        self.seen.clear()

    def codes(self) -> tuple[list, list, list]:
        """(prepared, file float, file integer) activation codes of the last batch."""

        def of(m):
            return [la.last_act_codes for la in m.integer_layers() if la.last_act_codes is not None]

        return self.seen, of(self.exact), of(self.integer)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


class _GraphProbe:
    """Graph format: each ``qweight`` node's codes against its quantizer's, and each activation
    quantizer's output (by name) in the prepared model and in the two file models."""

    def __init__(self, model, path: Path, exact, integer):
        self.params, self.modules = dict(model.named_parameters()), dict(model.named_modules())
        self.nodes = GE.decode_graph(*GE.P.read_package(path))
        self.names = sorted({n["name"] for n in self.nodes if n["op"] == "quant"})
        self.stores: tuple[dict, dict, dict] = ({}, {}, {})  # prepared, file float, file integer
        self.hooks = [
            self.modules[n].register_forward_hook(
                lambda m, i, o, n=n: self.stores[0].setdefault(n, []).append(o)
            )
            for n in self.names
        ]
        for store, gm in zip(self.stores[1:], (exact, integer)):
            for i, node in enumerate(self.nodes):
                if node["op"] == "quant":
                    self.hooks.append(
                        gm.get_submodule(f"q{i}").register_forward_hook(
                            lambda m, i_, o, n=node["name"], s=store: s.setdefault(n, []).append(o)
                        )
                    )

    def weight_codes_equal(self) -> bool:
        equal = True
        for node in self.nodes:
            if node["op"] == "qweight":
                codes = self.modules[node["quantizer"]].int_repr(self.params[node["name"]])
                equal &= bool((codes == torch.from_numpy(node["weight"]["codes"])).all())
        return equal

    def clear(self) -> None:
        for s in self.stores:
            s.clear()

    def codes(self) -> tuple[list, list, list]:
        return tuple([o for n in self.names for o in s.get(n, [])] for s in self.stores)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


class _Format:
    def __init__(self, record: dict, convert, probe, qdq, fp32):
        self.record, self.convert, self.probe, self.qdq, self.fp32 = record, convert, probe, qdq, fp32


_OPS = _Format(
    record={},
    convert=lambda model, path, nm=None: convert(model, path, graph=False, nm=nm),
    probe=_LayerProbe,
    qdq=lambda path, x: onnx_model(load_ops(path), tuple(x.shape[1:]), quantized=True),
    fp32=lambda model, path, x: onnx_model(
        model_ir(model, quantized=False), tuple(x.shape[1:]), quantized=False
    ),
)
_GRAPH = _Format(
    record={"deploy/format": "graph"},
    convert=lambda model, path, nm=None: GE.convert_graph(model, path, nm=nm),
    probe=_GraphProbe,
    qdq=lambda path, x: onnx_graph_model(GE.load_graph(path, "float"), x[:2], quantized=True),
    fp32=lambda model, path, x: onnx_graph_model(GE.load_graph(path, "float"), x[:2], quantized=False),
)


def _op_list_ok(model) -> bool:
    """Whether the per-op format holds this Sequential (else the graph format does)."""
    try:
        model_ir(model, quantized=False)
    except NotImplementedError:
        return False
    return True


def _format(model, graph: bool | None) -> _Format:
    if graph is None:
        graph = uses_graph_format(model) or not _op_list_ok(model)  # any model but a plain Sequential
    return _GRAPH if graph else _OPS


# -- round trip -----------------------------------------------------------------------------------
@torch.no_grad()
def _roundtrip(model, path: Path, x: torch.Tensor, y: torch.Tensor, batch: int, probe=None) -> dict:
    """The file's model against the fake-quantized one on ``x``: with the fake-quantize kernel's
    arithmetic (must be bit-exact: codes and logits) and with integer accumulation (logits within
    float rounding; an activation code can flip where a value sits on a rounding edge)."""
    exact, integer = load(path, arithmetic="float"), load(path, arithmetic="integer")
    p = (probe or _format(model, None).probe)(model, path, exact, integer)
    codes_equal = p.weight_codes_equal()
    diff = diff_int = 0.0
    correct = flips = total = 0
    try:
        for i in range(0, len(y), batch):
            xb = x[i : i + batch]
            p.clear()
            ref = model(xb)
            got, got_int = exact(xb), integer(xb)
            seen, mine, mine_int = p.codes()
            codes_equal &= len(mine) == len(seen) and all(torch.equal(a, b) for a, b in zip(seen, mine))
            flips += sum(int((a != b).sum()) for a, b in zip(seen, mine_int))
            total += sum(a.numel() for a in seen)
            diff = max(diff, float((got - ref).abs().max()))
            diff_int = max(diff_int, float((got_int - ref).abs().max()))
            correct += int((got_int.argmax(1) == y[i : i + batch]).sum())
    finally:
        p.close()
    return {
        "deploy/roundtrip_max_abs_diff": diff,
        "deploy/roundtrip_codes_equal": bool(codes_equal),
        "deploy/int_arith_max_abs_diff": diff_int,
        "deploy/int_arith_act_code_flips": flips / max(total, 1),
        "deploy/int_test_acc": correct / max(len(y), 1),
    }


# -- ONNX -----------------------------------------------------------------------------------------
def _onnx_check(
    model, path: Path, x, y, dm, cfg, out_dir: Path, record: dict, fmt: _Format | None = None
) -> dict:
    if not getattr(cfg, "onnx", True):
        return {
            "deploy/simulated_only": True,
            "deploy/simulated_reason": "export.onnx=false: no runtime executed the model",
        }
    fmt = fmt or _format(model, None)
    try:
        qmodel, info = fmt.qdq(path, x)
    except NotImplementedError as e:
        return {"deploy/simulated_only": True, "deploy/simulated_reason": f"no ONNX runtime form: {e}"}
    fmodel, _ = fmt.fp32(model, path, x)
    qpath, fpath = out_dir / "model.qdq.onnx", out_dir / "model.fp32.onnx"
    qpath.write_bytes(qmodel.SerializeToString())
    fpath.write_bytes(fmodel.SerializeToString())
    threads = torch.get_num_threads()
    qs, kernels, bias_int32 = bias_rule(qmodel, threads, out_dir / "model.qdq.ort-optimized.onnx")
    return onnx_results(
        model, qs, ort_session(fmodel, threads), x, y, dm, cfg, record, info, qpath, kernels, bias_int32
    )


def bias_rule(qmodel, threads: int, opt_path: Path):
    """The one rule for float biases: onnxruntime rounds them to int32 at scale ``S_x S_w``
    (``WeightBiasQuantization``) so that it can fuse integer kernels (QLinearConv, QGemm). Keep that
    only where it fuses more integer kernels than the same model with float biases; else the
    rounding only adds error (0.56 points on a 4-bit ResNet-20) and the biases stay float.
    Returns (session, its integer kernels, whether the biases are int32)."""
    qs = ort_session(qmodel, threads, opt_path)
    kernels = integer_kernels(opt_path)
    plain_path = opt_path.with_suffix(".float-bias.onnx")
    plain = ort_session(qmodel, threads, plain_path, disabled=["WeightBiasQuantization"])
    plain_kernels = integer_kernels(plain_path)
    if len(kernels) > len(plain_kernels):
        return qs, kernels, True
    return plain, plain_kernels, False


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


# -- the stage ------------------------------------------------------------------------------------
def deploy(
    model: torch.nn.Module,
    dm,
    out_dir: str | Path,
    cfg,
    record: dict,
    graph: bool | None = None,
    nm: tuple[int, int] | None = None,
) -> dict:
    """Convert, check the round trip, and run the ONNX QDQ model in onnxruntime (see module doc).
    ``graph=None`` picks the file format; ``True`` forces the graph format, ``False`` the op list.
    ``nm=(n, m)``: the file may store weights in the N:M layout (an N:M-pruned model)."""
    reason = no_integer_form(model)
    if reason is not None:  # reported plainly: no file, no runtime, not an error of the point
        return {"deploy/simulated_only": True, "deploy/simulated_reason": reason}
    fmt = _format(model, graph)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILE_NAME
    x, y = dm.splits["test"]
    was = model.training
    model.eval()
    out: dict = {"deploy/path": str(path), **fmt.record}
    try:
        try:
            fmt.convert(model, path, nm)
        except Exception as e:  # NotImplementedError: a construction the file format cannot hold
            return {
                **out,
                "deploy/error": f"{type(e).__name__}: {e}",
                "deploy/simulated_only": True,
                "deploy/simulated_reason": str(e),
            }
        out.update({f"deploy/{k}": v for k, v in package_stats(path).items()})
        for what, check in (
            (
                "round trip",
                lambda: _roundtrip(model, path, x, y, getattr(dm, "eval_batch_size", 1000), fmt.probe),
            ),
            ("ONNX", lambda: _onnx_check(model, path, x, y, dm, cfg, out_dir, record, fmt)),
        ):
            try:
                out.update(check())
            except (
                Exception
            ) as e:  # the file model or the runtime failed: a visible failure, not a lost point
                out.update(
                    {"deploy/error": f"{what}: {type(e).__name__}: {e}", "deploy/simulated_only": True}
                )
                break
    finally:
        model.train(was)
    return out

"""What the deployment check uses for either file format (:mod:`qpexp.deploy`):
onnxruntime sessions, the integer kernels ORT chose, and the ``deploy/onnx_*`` record keys."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

INTEGER_OPS = {
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "MatMulInteger",
    "ConvInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QLinearAdd",
    "QLinearMul",
    "MatMulNBits",
    "DynamicQuantizeLinear",
}


def ort_session(
    model, threads: int = 1, optimized_path: str | Path | None = None, disabled: list[str] | None = None
):
    """An onnxruntime CPU session with ``threads`` intra-op threads and no spinning thread pool;
    ``disabled`` names graph transformers to skip."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled or []
    )


def integer_kernels(optimized_path: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(optimized_path)).graph.node if n.op_type in INTEGER_OPS]


def _logits(run, x: torch.Tensor, batch: int) -> torch.Tensor:
    out = [torch.as_tensor(np.asarray(run(x[i : i + batch]))).float() for i in range(0, len(x), batch)]
    return torch.cat(out) if out else torch.zeros(0, 0)


# a sample's argmax is "clear" when its top-1 logit leads the runner-up by at least this fraction of
# the sample's logit range: a value on a rounding edge cannot flip it
CLEAR_MARGIN = 0.1


def clear_agreement(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(fraction of samples with a clear argmax in ``ref``, argmax agreement of ``got`` on them)."""
    if ref.numel() == 0 or ref.shape[1] < 2:
        return 0.0, 1.0
    top2 = ref.topk(2, dim=1).values
    spread = (ref.max(1).values - ref.min(1).values).clamp_min(1e-12)
    clear = (top2[:, 0] - top2[:, 1]) >= CLEAR_MARGIN * spread
    if not clear.any():
        return 0.0, 1.0
    agree = (got.argmax(1)[clear] == ref.argmax(1)[clear]).float().mean()
    return float(clear.float().mean()), float(agree)


def _latency(sessions: dict, xb: np.ndarray, n: int) -> dict[str, float]:
    """Median ms per call of each session, calls interleaved (same machine state for all)."""
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {"input": xb})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(n):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"input": xb})
            times[k].append(1e3 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def onnx_results(model, qs, fs, x, y, dm, cfg, record, info, qpath, kernels, bias_int32: bool) -> dict:
    """Run the QDQ session ``qs`` on the test split beside the fake-quantized ``model``, time it
    against the float session ``fs``: the ``deploy/onnx_*`` record keys (per-layer and graph formats)."""
    batch = min(len(y), getattr(dm, "batch_size", 100))
    eval_batch = getattr(dm, "eval_batch_size", 1000)
    got = _logits(lambda xb: qs.run(None, {"input": xb.numpy()})[0], x, eval_batch)
    with torch.no_grad():
        ref_logits = _logits(model, x, eval_batch)
    pred, ref = got.argmax(1), ref_logits.argmax(1)
    clear, agree_clear = clear_agreement(got, ref_logits)
    acc = int((pred == y).sum()) / max(len(y), 1)
    lat = _latency({"q": qs, "f": fs}, x[:batch].numpy(), max(int(getattr(cfg, "latency_batches", 50)), 1))
    simulated = info["simulated"]
    out = {
        "deploy/onnx_path": str(qpath),
        "deploy/onnx_test_acc": acc,
        "deploy/onnx_argmax_agree": int((pred == ref).sum()) / max(len(y), 1),
        "deploy/onnx_clear_fraction": clear,  # samples whose argmax no rounding edge can flip
        "deploy/onnx_argmax_agree_clear": agree_clear,
        # the largest logit difference, in units of the fake-quantized model's largest |logit|
        "deploy/onnx_logit_rel_err": float(
            (got - ref_logits).abs().max() / ref_logits.abs().max().clamp_min(1e-12)
        )
        if ref_logits.numel()
        else 0.0,
        "deploy/onnx_latency_ms": lat["q"],
        "deploy/fp32_onnx_latency_ms": lat["f"],
        "deploy/latency_batch_size": batch,
        "deploy/onnx_integer_kernels": len(kernels),
        "deploy/onnx_bias_int32": bias_int32,
        "deploy/onnx_weight_container": ",".join(sorted(set(info["weight_containers"]))) or "float",
        "deploy/onnx_act_container": ",".join(sorted(set(info["act_containers"]))) or "float",
        "deploy/simulated_only": bool(simulated),
    }
    if simulated:
        out["deploy/simulated_reason"] = "; ".join(sorted(set(simulated)))
    if "final/test_acc" in record:
        out["deploy/onnx_acc_diff"] = acc - record["final/test_acc"]
    return out

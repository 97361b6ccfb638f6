"""Deployment check of a model in the graph format (:mod:`qpexp.core.quant.graph_export`): every
model but a plain ``nn.Sequential`` (which :mod:`qpexp.deploy` handles op by op).

The same record keys as :func:`qpexp.deploy.deploy`:

* ``deploy/file_bytes`` and its breakdown, ``deploy/format = "graph"``;
* ``deploy/roundtrip_max_abs_diff`` (file model with the fake-quantize arithmetic against the
  prepared model: 0.0 when exact), ``deploy/roundtrip_codes_equal`` (every weight code of the file
  equals the prepared quantizer's, and every activation quantizer's output on the test split is
  the same); ``deploy/int_arith_max_abs_diff``, ``deploy/int_arith_act_code_flips``,
  ``deploy/int_test_acc`` for integer accumulation;
* ONNX QDQ in onnxruntime: ``deploy/onnx_test_acc``, ``deploy/onnx_acc_diff``,
  ``deploy/onnx_argmax_agree``, latencies, ``deploy/onnx_integer_kernels``, containers,
  ``deploy/simulated_only`` / ``deploy/simulated_reason``;
* a model that cannot be converted or run: ``deploy/error`` (never a silent success).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qpexp.core.quant import graph_export as GE
from qpexp.deploy.common import integer_kernels, onnx_results, ort_session

FILE_NAME = "model.qpx.npz"


@torch.no_grad()
def _roundtrip(model, path: Path, x: torch.Tensor, y: torch.Tensor, batch: int) -> dict:
    exact = GE.load_graph(path, "float")
    integer = GE.load_graph(path, "integer")
    codes_equal = True
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    # weight codes: each qweight node against its quantizer's codes of the parameter
    header_nodes = GE.decode_graph(*GE.E.read_package(path))
    for node in header_nodes:
        if node["op"] == "qweight":
            wq = modules[node["quantizer"]]
            codes = wq.int_repr(params[node["name"]])
            codes_equal &= bool((codes == torch.from_numpy(node["weight"]["codes"])).all())
    # activation quantizers: outputs of the prepared model's and of the file's, by name
    seen: dict[str, list] = {}
    got_exact: dict[str, list] = {}
    got_int: dict[str, list] = {}
    hooks = []
    names = {n["name"] for n in header_nodes if n["op"] == "quant"}
    for name in names:
        hooks.append(
            modules[name].register_forward_hook(lambda m, i, o, n=name: seen.setdefault(n, []).append(o))
        )
    for store, gm in ((got_exact, exact), (got_int, integer)):
        for i, node in enumerate(header_nodes):
            if node["op"] == "quant":
                q = gm.get_submodule(f"q{i}")
                hooks.append(
                    q.register_forward_hook(
                        lambda m, i_, o, n=node["name"], s=store: s.setdefault(n, []).append(o)
                    )
                )
    diff = diff_int = 0.0
    correct = flips = total = 0
    try:
        for i in range(0, len(y), batch):
            xb = x[i : i + batch]
            for d in (seen, got_exact, got_int):
                d.clear()
            ref = model(xb)
            a, b = exact(xb), integer(xb)
            for name in names:
                ref_o, ex_o, in_o = seen.get(name, []), got_exact.get(name, []), got_int.get(name, [])
                codes_equal &= len(ref_o) == len(ex_o) and all(torch.equal(p, q) for p, q in zip(ref_o, ex_o))
                flips += sum(int((p != q).sum()) for p, q in zip(ref_o, in_o))
                total += sum(p.numel() for p in ref_o)
            diff = max(diff, float((a - ref).abs().max()))
            diff_int = max(diff_int, float((b - ref).abs().max()))
            correct += int((b.argmax(1) == y[i : i + batch]).sum())
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


def _onnx_check(model, path: Path, x, y, dm, cfg, out_dir: Path, record: dict) -> dict:
    if not getattr(cfg, "onnx", True):
        return {
            "deploy/simulated_only": True,
            "deploy/simulated_reason": "export.onnx=false: no runtime executed the model",
        }
    gm = GE.load_graph(path, "float")
    try:
        qmodel, info = GE.onnx_graph_model(gm, x[:2], quantized=True)
    except NotImplementedError as e:
        return {"deploy/simulated_only": True, "deploy/simulated_reason": f"no ONNX runtime form: {e}"}
    fmodel, _ = GE.onnx_graph_model(gm, x[:2], quantized=False)
    qpath, fpath = out_dir / "model.qdq.onnx", out_dir / "model.fp32.onnx"
    qpath.write_bytes(qmodel.SerializeToString())
    fpath.write_bytes(fmodel.SerializeToString())
    threads = torch.get_num_threads()
    opt_path = out_dir / "model.qdq.ort-optimized.onnx"
    qs = ort_session(qmodel, threads, opt_path)
    kernels = integer_kernels(opt_path)
    # onnxruntime rounds float biases to int32 at scale S_x S_w so that it can fuse integer kernels;
    # where that fuses nothing more (4-bit weights: no int4 conv kernels), it only adds error
    # (0.56 points on a 4-bit ResNet-20): keep the biases float then
    plain = ort_session(
        qmodel, threads, opt_path.with_suffix(".float-bias.onnx"), disabled=["WeightBiasQuantization"]
    )
    plain_kernels = integer_kernels(opt_path.with_suffix(".float-bias.onnx"))
    bias_int32 = len(kernels) > len(plain_kernels)
    if not bias_int32:
        qs, kernels = plain, plain_kernels
    return onnx_results(
        model, qs, ort_session(fmodel, threads), x, y, dm, cfg, record, info, qpath, kernels, bias_int32
    )


def deploy_graph(model: torch.nn.Module, dm, out_dir: str | Path, cfg, record: dict) -> dict:
    """Convert to the graph format, check the round trip, run the ONNX QDQ model in onnxruntime."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILE_NAME
    x, y = dm.splits["test"]
    eval_batch = getattr(dm, "eval_batch_size", 1000)
    was = model.training
    model.eval()
    out: dict = {"deploy/path": str(path), "deploy/format": "graph"}
    try:
        try:
            GE.convert_graph(model, path)
        except Exception as e:  # a construction the graph format cannot hold: a visible failure
            return {
                **out,
                "deploy/error": f"{type(e).__name__}: {e}",
                "deploy/simulated_only": True,
                "deploy/simulated_reason": str(e),
            }
        out.update({f"deploy/{k}": v for k, v in GE.graph_package_stats(path).items()})
        try:
            out.update(_roundtrip(model, path, x, y, eval_batch))
            out.update(_onnx_check(model, path, x, y, dm, cfg, out_dir, record))
        except Exception as e:  # the file model or the runtime failed: a visible failure
            out.update({"deploy/error": f"{type(e).__name__}: {e}", "deploy/simulated_only": True})
    finally:
        model.train(was)
    return out

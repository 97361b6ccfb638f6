"""One QAT training step vs the fp32 step, side by side in one process (batch 100, one thread).

Variants on the MNIST-1D CNN and MLP: fp32; qpexp QAT (w8a8, w4a8: per-channel symmetric weights,
per-tensor asymmetric activations, min/max ranges; lsq w4a8: the default sweep's setting, one
learned step size per weight tensor, 8-bit min/max activations); torch.ao.quantization eager QAT with the fbgemm
QAT qconfig (fused fake-quant observers, per-channel weights, conv+ReLU fused). torch.ao's default
QAT mappings lack ``Conv1d`` / ``ConvReLU1d``: without them the CNN's conv weights are silently never
fake-quantized, so custom mappings are supplied and checked.

Every variant trains with the stages' optimizer (:func:`qpexp.optim.adamw`), so the figure is
what a QAT stage pays over a float stage per step. Variants are interleaved round by round (a round times ``--steps`` steps of each variant, in an
order rotated from round to round), so machine noise hits them alike; each figure is the median over rounds of the per-step time, reported
as a ratio to fp32 of the same model in the same round. The ratios use the thread's CPU time (time
spent waiting for a core on a shared machine is left out); wall-clock ratios are printed beside. Usage: ``python -m qpexp.bench qat [--rounds 15] [--steps 20]``.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from qpexp.bench import emit, step_args
from qpexp.core.quant import QuantConfig, QuantSpec, quantize_
from qpexp.models import cnn1d, mlp
from qpexp.train.optim import adamw

BATCH = 100


def qpexp_qat(model: nn.Module, bits_w: int, bits_a: int = 8, lsq: bool = False) -> nn.Module:
    """Per-channel symmetric min/max weights, or (``lsq``) the default sweep's one learned step size
    per weight tensor on the full signed range, the first layer's weights at 8 bits; per-tensor
    asymmetric min/max activations."""
    weight = QuantSpec(bits=bits_w, granularity="channel", symmetric=True, range="minmax")
    first = None
    if lsq:
        weight = QuantSpec(bits=bits_w, granularity="tensor", symmetric=True, range="lsq", narrow_range=False)
        first = 8
    act = QuantSpec(bits=bits_a, granularity="tensor", symmetric=False, range="minmax")
    return quantize_(copy.deepcopy(model), QuantConfig(weight=weight, act=act, first_bits=first))


def torch_ao_qat(model: nn.Module) -> nn.Module:
    """torch.ao eager-mode QAT with mappings that include Conv1d and ConvReLU1d."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.ao.nn.intrinsic as nni
        import torch.ao.nn.intrinsic.qat as nniqat
        import torch.ao.nn.qat as nnqat
        import torch.ao.quantization as tq

        m = copy.deepcopy(model).train()
        names = [n for n, _ in m.named_children()]
        pairs = [
            [a, b]
            for a, b in zip(names, names[1:])
            if isinstance(m.get_submodule(a), (nn.Conv1d, nn.Conv2d, nn.Linear))
            and isinstance(m.get_submodule(b), nn.ReLU)
        ]
        tq.fuse_modules_qat(m, pairs, inplace=True)
        wrapped = nn.Sequential(tq.QuantStub(), m, tq.DeQuantStub())
        wrapped.qconfig = tq.get_default_qat_qconfig("fbgemm")
        mapping = dict(tq.get_default_qat_module_mappings())
        mapping[nn.Conv1d] = nnqat.Conv1d
        mapping[nni.ConvReLU1d] = nniqat.ConvReLU1d
        tq.prepare_qat(wrapped, mapping=mapping, inplace=True)
    qat_layers = [
        n
        for n, mod in wrapped.named_modules()
        if hasattr(mod, "weight_fake_quant") and isinstance(mod, (nn.Conv1d, nn.Linear))
    ]
    n_layers = sum(isinstance(mod, (nn.Conv1d, nn.Linear)) for mod in model.modules())
    if len(qat_layers) != n_layers:
        raise RuntimeError(f"torch.ao QAT fake-quantizes only {qat_layers} of {n_layers} layers")
    return wrapped


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def time_steps(step, n: int) -> tuple[float, float]:
    """(wall, CPU) seconds per step. The thread's CPU time leaves out time the thread waited for a
    core, so it stays meaningful on a shared machine; it is the figure the ratios use."""
    t, c = time.perf_counter(), time.thread_time()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n, (time.thread_time() - c) / n


def bench_model(name: str, model: nn.Module, rounds: int, steps: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 40, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    variants = {
        "fp32": copy.deepcopy(model),
        "qpexp w8a8": qpexp_qat(model, 8),
        "qpexp w4a8": qpexp_qat(model, 4),
        "qpexp lsq w4a8": qpexp_qat(model, 4, lsq=True),
        "torch.ao w8a8": torch_ao_qat(model),
    }
    stepper = {k: make_step(m, x, y) for k, m in variants.items()}
    for s in stepper.values():  # warm-up (also calibrates the observers)
        time_steps(s, 5)
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    ratio: dict[str, list[float]] = {k: [] for k in variants}
    ratio_wall: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no variant always runs first
        this = {k: time_steps(stepper[k], steps) for k in order}
        for k, (w, c) in this.items():
            wall[k].append(w)
            cpu[k].append(c)
            ratio[k].append(c / this["fp32"][1])
            ratio_wall[k].append(w / this["fp32"][0])
    med = statistics.median
    return [
        {
            "model": name,
            "variant": k,
            "cpu ms/step": 1e3 * med(cpu[k]),
            "x fp32 (cpu)": med(ratio[k]),
            "wall ms/step": 1e3 * med(wall[k]),
            "x fp32 (wall)": med(ratio_wall[k]),
        }
        for k in variants
    ]


def main(argv: list[str] | None = None) -> None:
    a = step_args("qat", __doc__, argv)
    rows = bench_model("cnn1d", cnn1d((40,), 10), a.rounds, a.steps)
    rows += bench_model("mlp", mlp((40,), 10), a.rounds, a.steps)
    figures = {}
    for r in rows:
        key = f"{r['model']}/{r['variant'].replace(' ', '_')}"
        figures[f"{key}/x_fp32"] = round(r["x fp32 (cpu)"], 3)
        figures[f"{key}/x_fp32_wall"] = round(r["x fp32 (wall)"], 3)
    for m in ("cnn1d", "mlp"):
        ao = figures[f"{m}/torch.ao_w8a8/x_fp32"]
        figures[f"{m}/qpexp_w8a8_vs_torch.ao"] = round(figures[f"{m}/qpexp_w8a8/x_fp32"] / ao, 3)
    title = (
        f"QAT training step vs fp32, batch {BATCH}, {a.threads} thread(s), "
        f"median of {a.rounds} interleaved rounds"
    )
    emit(rows, figures, title)


if __name__ == "__main__":
    main()

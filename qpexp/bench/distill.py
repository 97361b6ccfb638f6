"""The cost of distillation per training step: teacher on the fly vs a precomputed logit table.

On the MNIST-1D CNN (batch 100, one thread), side by side in one process and interleaved round by
round: a plain training step (cross-entropy), a distillation step with the teacher run on the batch
(what qpexp does), and one that gathers the teacher's logits from a table computed once for the whole
training set (which would need each batch's sample indices), for a float student (prune fine-tuning)
and a w4a8 fake-quantized one (QAT). Figures: median per-step CPU time over rounds, and the ratio to
the plain step (for the teacher's forward alone: to the float student's plain step). Usage: ``python -m qpexp.bench distill [--rounds 15] [--steps 20]``.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F

from qpexp.bench import emit, step_args
from qpexp.bench.qat import qpexp_qat
from qpexp.models import cnn1d
from qpexp.train.distill import distill_loss, make_teacher

BATCH, N_TRAIN = 100, 4000


def main(argv: list[str] | None = None) -> None:
    a = step_args("distill", __doc__, argv)
    x_all = torch.randn(N_TRAIN, 1, 40)
    y_all = torch.randint(0, 10, (N_TRAIN,))
    teacher = make_teacher(cnn1d(input_shape=(1, 40), num_classes=10))
    start = time.process_time()
    with torch.no_grad():
        table = torch.cat([teacher(x_all[i : i + 1000]) for i in range(0, N_TRAIN, 1000)])
    table_s = time.process_time() - start
    students = {"float": cnn1d(input_shape=(1, 40), num_classes=10)}
    students["w4a8"] = qpexp_qat(students["float"], 4)
    steps, times = {}, {}
    for kind, model in students.items():
        for mode in ("plain", "on_the_fly", "table"):
            m = copy.deepcopy(model).train()
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)

            def step(i, m=m, opt=opt, mode=mode):
                lo = (i * BATCH) % N_TRAIN
                idx = torch.arange(lo, lo + BATCH)
                x, y = x_all[idx], y_all[idx]
                s = m(x)
                if mode == "plain":
                    loss = F.cross_entropy(s, y, label_smoothing=0.1)
                else:
                    if mode == "on_the_fly":
                        with torch.no_grad():
                            t = teacher(x)
                    else:
                        t = table[idx]
                    loss = distill_loss(s, t, y, 0.5, 4.0, 0.1)
                opt.zero_grad()
                loss.backward()
                opt.step()

            steps[(kind, mode)] = step
            times[(kind, mode)] = []
            step(0)  # warm-up (and the quantizers' first calibration)

    def teacher_forward(i):
        lo = (i * BATCH) % N_TRAIN
        with torch.no_grad():
            teacher(x_all[lo : lo + BATCH])

    steps[("teacher", "forward")], times[("teacher", "forward")] = teacher_forward, []
    keys = list(steps)
    for r in range(a.rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            t0 = time.process_time()
            for i in range(a.steps):
                steps[k](i)
            times[k].append((time.process_time() - t0) / a.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows, figures = [], {"table_build_ms": 1e3 * table_s}
    for kind, mode in keys:
        ratio = med[(kind, mode)] / med[("float" if kind == "teacher" else kind, "plain")]
        rows.append({"student": kind, "step": mode, "ms/step": 1e3 * med[(kind, mode)], "vs plain": ratio})
        figures[f"{kind}/{mode}_ms"] = 1e3 * med[(kind, mode)]
        figures[f"{kind}/{mode}_ratio"] = ratio
    emit(
        rows, figures, f"distillation step cost, MNIST-1D CNN, batch {BATCH}, {a.threads} thread(s), CPU time"
    )


if __name__ == "__main__":
    main()

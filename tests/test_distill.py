"""Issue 11: knowledge distillation from the cached dense baseline (distill.alpha, distill.temperature)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, compose
from torch import nn

from qpexp.distill import Distiller, distill_loss, make_teacher
from qpexp.pipeline import Pipeline
from qpexp.schema import ConfigError
from qpexp.stages import Stage


def hand_loss(s, t, y, alpha, temp, ls):
    """The Hinton et al. loss written out: CE with label smoothing from log-probabilities, KL as a sum."""
    c = s.shape[1]
    logp = torch.log(torch.softmax(s, 1))
    target = torch.full_like(logp, ls / c)
    target[torch.arange(len(y)), y] += 1 - ls
    ce = -(target * logp).sum(1).mean()
    pt = torch.softmax(t / temp, 1)
    ps = torch.softmax(s / temp, 1)
    kl = (pt * (torch.log(pt) - torch.log(ps))).sum(1).mean()
    return (1 - alpha) * ce + alpha * temp**2 * kl


@pytest.mark.parametrize(
    "alpha, temp, ls", [(0.0, 4.0, 0.1), (0.5, 4.0, 0.1), (0.9, 2.0, 0.0), (1.0, 1.0, 0.0)]
)
def test_loss_is_the_hinton_formula(alpha, temp, ls):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    got = distill_loss(s, t, y, alpha, temp, ls)
    torch.testing.assert_close(got, hand_loss(s, t, y, alpha, temp, ls), rtol=1e-5, atol=1e-6)
    assert float(distill_loss(t, t, y, 1.0, temp)) == pytest.approx(0.0, abs=1e-6)  # student = teacher


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def test_stage_training_step_uses_the_teacher():
    teacher = make_teacher(_net(1))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student = _net(2)
    stage = Stage(student, 4, label_smoothing=0.1, distiller=Distiller(teacher, 0.7, 3.0))
    assert not any(p is q for p in stage.parameters() for q in teacher.parameters())  # not trained
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    stage.on_train_epoch_start()
    loss = stage.training_step((x, y), 0)
    with torch.no_grad():
        t = teacher(x)
    s = student(x)  # train mode, as in the step: BatchNorm uses the batch's statistics either way
    torch.testing.assert_close(loss, hand_loss(s, t, y, 0.7, 3.0, 0.1), rtol=1e-5, atol=1e-6)


def test_precomputed_teacher_logits_travel_with_their_batches():
    """The table of teacher logits: each shuffled training batch carries its own samples' rows, and a
    stage given them uses them instead of running the teacher."""
    from qpexp.data import TensorLoader
    from qpexp.distill import precompute

    teacher = make_teacher(_net(1))
    g = torch.Generator().manual_seed(0)

    class DM:  # the hook an in-memory data module offers
        teacher_logits = None
        splits = {"train": (torch.randn(250, 8, generator=g), torch.randint(0, 4, (250,), generator=g))}

    dm = DM()
    assert precompute(teacher, dm, chunk=100)
    x_all, y_all = dm.splits["train"]
    loader = TensorLoader(x_all, y_all, 64, shuffle=True, seed=3, extra=dm.teacher_logits)
    loader.set_epoch(2)
    seen = 0
    for x, y, t in loader:
        with torch.no_grad():
            torch.testing.assert_close(t, teacher(x), rtol=1e-5, atol=1e-5)
        seen += len(y)
    assert seen == 250
    other = torch.randn(64, 4, generator=g)  # not the teacher's logits: the stage must use these
    stage = Stage(_net(2), 4, label_smoothing=0.1, distiller=Distiller(teacher, 0.5, 2.0))
    stage.on_train_epoch_start()
    x, y = x_all[:64], y_all[:64]
    loss = stage.training_step((x, y, other), 0)
    torch.testing.assert_close(loss, hand_loss(stage.model(x), other, y, 0.5, 2.0, 0.1), rtol=1e-5, atol=1e-6)


def test_student_with_alpha_one_moves_toward_the_teacher():
    """Labels that disagree with the teacher: with alpha=1 the student learns the teacher's answers."""
    teacher = make_teacher(_net(1))
    student = _net(2)
    stage = Stage(student, 4, distiller=Distiller(teacher, 1.0, 2.0))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    with torch.no_grad():
        pt = teacher(x).argmax(1)
    y = (pt + 1) % 4  # every label differs from the teacher's prediction

    def agree():
        student.eval()
        with torch.no_grad():
            a = float((student(x).argmax(1) == pt).float().mean())
        student.train()
        return a

    before = agree()
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    stage.on_train_epoch_start()
    for _ in range(200):
        opt.zero_grad()
        stage.training_step((x, y), 0).backward()
        opt.step()
    assert agree() > max(before, 0.9)
    assert not teacher.training  # still in eval mode after the stage trained


def keys(tmp_path: Path, overrides: list[str]) -> dict[str, str]:
    cfg = compose([*TINY, f"cache_dir={tmp_path / 'cache'}", *overrides])
    return Pipeline(cfg, tmp_path / "run").keys


def test_cache_keys_change_only_when_distilling(tmp_path):
    off = keys(tmp_path, [])
    assert keys(tmp_path, ["distill.alpha=0", "distill.temperature=2"]) == off  # off: settings ignored
    on = keys(tmp_path, ["distill.alpha=0.5"])
    assert on["baseline"] == off["baseline"]  # the teacher is never retrained
    assert on["prune"] != off["prune"] and on["qat"] != off["qat"]
    assert keys(tmp_path, ["distill.alpha=0.5", "distill.temperature=2"])["prune"] != on["prune"]
    no_prune = keys(tmp_path, ["prune.ratio=0", "distill.alpha=0.5"])
    assert no_prune["qat"] != keys(tmp_path, ["prune.ratio=0"])["qat"]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["distill.alpha=1.5"], "distill.alpha"),
        (["distill.alpha=-0.1"], "distill.alpha"),
        (["distill.temperature=0"], "distill.temperature"),
        (["distill.alpha=0.5", "baseline.enabled=false"], "baseline.enabled"),
        (["+distill.alhpa=0.5"], "alhpa"),
    ],
)
def test_bad_distill_config_refused_before_training(tmp_path, overrides, key):
    cfg = compose([*TINY, f"cache_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Pipeline(cfg, tmp_path / "run")
    assert not any(tmp_path.iterdir())


def test_pipeline_records_distillation(tmp_path):
    cfg = compose([*TINY, f"cache_dir={tmp_path / 'cache'}", "export.enabled=false", "distill.alpha=0.5"])
    rec = Pipeline(cfg, tmp_path / "run").run()
    assert rec["distill/alpha"] == 0.5 and rec["distill/temperature"] == 4.0
    assert rec["distill/teacher_test_acc"] == rec["baseline/test_acc"]  # the teacher is the baseline
    assert rec["distill/precomputed"] is True  # MNIST-1D: the teacher's logits computed once
    assert rec["status"] == "not_deployed" and "qat/test_acc" in rec


def test_ddp_two_cpu_ranks_distill_and_adaround_identical(tmp_path):
    """``trainer=ddp`` (2 CPU processes, gloo): distillation in the prune stage and AdaRound PTQ leave
    both ranks with bit-identical models (the teacher is the same baseline on every rank; AdaRound
    rounds on the same first batches everywhere)."""
    from conftest import read_record, run_cli

    args = [*TINY, "export.enabled=false", "data.val_fraction=0.15", "distill.alpha=0.5", "quant.epochs=0"]
    args += ["quant.rounding=adaround", "quant.rounding_iters=20", "quant.rounding_batches=2"]
    dump = tmp_path / "dump"
    run_cli(
        [*args, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         f"cache_dir={tmp_path / 'c'}", f"hydra.run.dir={tmp_path / 'ddp'}"],
        cwd=tmp_path, env={"QPEXP_DDP_DUMP": str(dump)},
    )  # fmt: skip
    rec = read_record(tmp_path / "ddp")
    assert (
        rec["status"] == "not_deployed" and rec["ddp/world_size"] == 2 and rec["quant/rounding"] == "adaround"
    )
    assert rec["distill/teacher_test_acc"] == rec["baseline/test_acc"]
    for stage in ("prune", "qat"):
        a = torch.load(dump / f"{stage}-rank0.pt", weights_only=True)
        b = torch.load(dump / f"{stage}-rank1.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage

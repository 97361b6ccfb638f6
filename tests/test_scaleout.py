"""Issue 12: SLURM through submitit (tested with submitit's local executor), the Optuna sweeper,
W&B sweep files, GPU/DDP trainer configs with cross-rank reductions, sweep progress.

Expensive tests (each a few real processes on tiny budgets): the submitit sweep with a kill and a
re-submission, the Optuna search interrupted and continued, two-process gloo collectives and a
two-process Lightning DDP pipeline against a single-process one.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TINY, compose, read_record, run_cli

from qpexp.schema import plain_config, validate

SWEEPS = ROOT / "sweeps"
COMPARED = ("baseline/", "prune/", "qat/", "final/", "layers/", "size/", "dense/")


def numbers(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k.startswith(COMPARED) and "seconds" not in k}


def _task(cfg) -> dict:
    out = plain_config(cfg)
    for k in ("sweep", "experiment"):
        out.pop(k, None)
    return out


# -- launcher and trainer configs -----------------------------------------------------------------
def test_slurm_preset_composes_with_requeue_and_array_limits():
    cfg = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2"])
    lc = cfg.hydra.launcher
    assert lc._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (lc.partition, lc.gpus_per_node, lc.tasks_per_node) == ("gpu", 2, 1)
    assert lc.timeout_min == 240 and lc.cpus_per_task == 4 and lc.array_parallelism == 64
    assert lc.max_num_timeout == 3 and lc.additional_parameters.requeue is True
    assert lc.signal_delay_s == 120
    # the task config is the default one: the launcher changes where points run, not what they are
    assert _task(cfg) == _task(compose([]))
    local = compose(["hydra/launcher=submitit_local"]).hydra.launcher
    assert local._target_.endswith("LocalLauncher") and "n_jobs" not in local
    pool = compose([]).hydra.launcher
    assert pool._target_.endswith("JoblibLauncher") and pool.n_jobs == 2 and pool.backend == "loky"


def test_gpu_and_ddp_trainer_configs():
    from qpexp.distributed import requested_world

    gpu = validate(compose(["trainer=gpu"])).trainer
    assert (gpu.accelerator, gpu.devices) == ("gpu", 1)
    ddp = compose(["trainer=ddp"]).trainer
    assert (ddp.strategy, ddp.devices, ddp.accelerator) == ("ddp", 2, "auto")
    validate(compose(["trainer=ddp", "trainer.devices=4"]))
    assert requested_world({"strategy": "ddp", "devices": 4, "num_nodes": 2}) == 8
    assert requested_world({"strategy": "ddp", "devices": [0, 1]}) == 2
    assert requested_world({"strategy": "ddp_spawn", "devices": 4}) == 1  # Lightning's own launcher
    assert requested_world({"accelerator": "gpu", "devices": 1}) == 1
    assert requested_world({"deterministic": False}) == 1


def test_rank_shard_splits_batches_evenly_in_lockstep():
    from qpexp.distributed import RankShard, shard_train_loader

    class Loader(list):
        sampler = "the sampler"

    batches = Loader(range(7))  # 7 batches, 3 ranks: 3 each, wrapped as DistributedSampler pads
    shards = [list(RankShard(batches, 3, r)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 0], [2, 5, 1]]
    assert {len(RankShard(batches, 3, r)) for r in range(3)} == {3}
    assert set(itertools.chain(*shards)) == set(range(7))
    assert RankShard(batches, 3, 0).sampler == "the sampler"  # Lightning's set_epoch passes through

    class Trainer:
        world_size, global_rank = 2, 1

        class _accelerator_connector:  # noqa: N801
            use_distributed_sampler = True

    assert list(shard_train_loader(batches, Trainer())) == [1, 3, 5, 0]
    Trainer._accelerator_connector.use_distributed_sampler = False
    assert shard_train_loader(batches, Trainer()) is batches
    assert shard_train_loader(batches, None) is batches


# -- progress -------------------------------------------------------------------------------------
def test_started_ranks_import_this_qpexp_past_a_qpexp_folder_in_the_working_directory(tmp_path, monkeypatch):
    """A rank qpexp starts runs ``python -m qpexp.run.ranks`` in the working directory. A folder named
    ``qpexp`` there (a run directory) is found as a namespace package before an editable install's
    finder is asked (CI failed so: the rank died at import, rank 0 waited for it). The rank's
    environment puts the folder holding the qpexp that started it first."""
    from qpexp.run.ranks import rank_env

    (tmp_path / "qpexp").mkdir()  # the decoy: a run directory
    monkeypatch.delenv("PYTHONPATH", raising=False)  # as an installed (editable or not) qpexp runs
    env = rank_env({"RANK": "1"})
    code = "import qpexp, qpexp.run.ranks; print(qpexp.__file__)"
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert Path(p.stdout.strip()) == ROOT / "qpexp" / "__init__.py"
    assert env["RANK"] == "1" and env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)


def test_progress_counts_done_failed_running(tmp_path, monkeypatch):
    from qpexp.callbacks import progress_bar_enabled, progress_line, set_sweep_total, sweep_counts

    state = tmp_path / ".qpexp"
    state.mkdir()
    (state / "progress.json").write_text(json.dumps({"run_id": "r1", "total": 5, "start": time.time() - 3}))
    (state / "progress-r1.log").write_text(
        "0 running\n1 running\n0 ok\n2 running\n1 failed\n3 running\n3 reused\n4 running\n"
    )
    c = sweep_counts(state)
    assert (c["total"], c["done"], c["failed"], c["running"], c["reused"]) == (5, 3, 1, 2, 1)
    assert progress_line(c).startswith("[sweep] 3/5 done, 1 failed (1 reused), 2 running, ")
    set_sweep_total(tmp_path, 9)
    assert sweep_counts(state)["total"] == 9
    # the Lightning progress bar: forced by QPEXP_PROGRESS, else off in CI/tests and non-terminals
    monkeypatch.setenv("QPEXP_PROGRESS", "1")
    assert progress_bar_enabled()
    monkeypatch.setenv("QPEXP_PROGRESS", "0")
    assert not progress_bar_enabled()
    monkeypatch.delenv("QPEXP_PROGRESS")
    monkeypatch.setenv("CI", "true")
    assert not progress_bar_enabled()


# -- W&B sweep files ------------------------------------------------------------------------------
def _wandb_grid(spec: dict) -> list[dict]:
    """Every point W&B's grid method produces: the product of each parameter's ``values`` (and
    ``value`` constants); W&B's own order does not matter here."""
    names = sorted(spec["parameters"])
    axes = [p.get("values", [p.get("value")]) for p in (spec["parameters"][n] for n in names)]
    return [dict(zip(names, combo)) for combo in itertools.product(*axes)]


def _agent_command(spec: dict, point: dict) -> list[str]:
    """The command a W&B agent runs for ``point``: wandb's own argument formatting
    (``create_sweep_command_args``) and its ``${...}`` substitution rule (wandb_agent._command_run)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    sweep_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})
    sweep_vars.update(env=["/usr/bin/env"], program=[spec["program"]], interpreter=["python"])
    out = []
    for c in create_sweep_command(list(spec["command"])):
        c = str(c)
        out += (sweep_vars.get(c[2:-1]) or []) if c.startswith("${") and c.endswith("}") else [c]
    return out


@contextmanager
def composer():
    """``compose`` under one Hydra initialization (many points, one setup)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from qpexp.cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        yield lambda overrides: hcompose(config_name="config", overrides=overrides, return_hydra_config=True)


def _point_run_dir(overrides: list[str]) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from qpexp.cli import point_dirname

    parsed = OverridesParser.create().parse_overrides(overrides)
    task = [o for o in parsed if not o.is_hydra_override()]
    exclude = next(o for o in parsed if o.key_or_group.endswith("override_dirname.exclude_keys")).value()
    return point_dirname(",".join(sorted(o.input_line for o in task if o.key_or_group not in exclude)))


def _check_wandb_point(spec: dict, point: dict, frontier: dict, compose_point) -> Path:
    """The agent's command for ``point``, composed and validated; returns the point's run folder."""
    cmd = _agent_command(spec, point)
    assert cmd[:2] == ["/usr/bin/env", "qpexp"]
    overrides = cmd[2:]
    assert overrides[: len(point)] == [f"{k}={v}" for k, v in point.items()]
    cfg = compose_point(overrides)
    typed = validate(cfg)  # qpexp's schema: every point is a config qpexp runs
    for k, v in point.items():
        section, key = k.split(".")
        assert typed[section][key] == v, (k, v)
    assert cfg.logger.mode == "online"  # an agent's run must reach the sweep
    task = _task(cfg)
    for section in ("prune", "quant", "export", "baseline", "data", "model"):  # the frontier's training
        ref = dict(frontier[section])
        ref.update({k.split(".")[1]: v for k, v in point.items() if k.startswith(section + ".")})
        assert task[section] == ref, section
    run_dir = Path(cfg.hydra.run.dir)
    assert run_dir.name == _point_run_dir(overrides)
    assert run_dir.name == ",".join(sorted(f"{k}={v}" for k, v in point.items()))  # the swept keys
    return run_dir


@pytest.mark.parametrize("name", ["frontier_grid", "frontier_random"])
def test_wandb_sweep_points_compose_into_valid_configs(name):
    spec = yaml.safe_load((SWEEPS / "wandb_agent" / f"{name}.yaml").read_text())
    assert {"program", "method", "metric", "parameters", "command"} <= set(spec)
    assert "${args_no_hyphens}" in spec["command"]
    assert spec["metric"] == {"name": "final/val_acc", "goal": "maximize"}  # chosen on validation
    if spec["method"] == "grid":
        points = _wandb_grid(spec)
        assert len(points) == 3 * 3 * 2
    else:  # random: every categorical value and both ends of each distribution, one axis at a time
        base = {k: p["values"][0] if "values" in p else p["min"] for k, p in spec["parameters"].items()}
        points = [base] + [
            {**base, k: v}
            for k, p in spec["parameters"].items()
            for v in (p["values"][1:] if "values" in p else [p["max"]])
        ]
    frontier = _task(compose(["sweep=frontier", "quant.bits_w=2", "prune.ratio=0.5", "prune.scope=global"]))
    with composer() as compose_point:
        dirs = {_check_wandb_point(spec, point, frontier, compose_point) for point in points}
    assert len(dirs) == len(points)  # one folder per point, all in one sweep folder for qpexp-frontier
    assert len({d.parent for d in dirs}) == 1 and str(next(iter(dirs)).parent).startswith(
        "outputs/sweeps/wandb_"
    )


def test_wandb_sweep_files_pass_wandbs_own_schema_and_grid():
    """With W&B's ``sweeps`` package (``wandb[sweeps]``; not a dependency: it pins numpy 1.x): no
    schema violation, and its grid is the product expanded above."""
    sweeps = pytest.importorskip("sweeps")
    if not hasattr(sweeps, "schema_violations_from_proposed_config"):  # `python -m pytest`: ./sweeps/
        pytest.skip("W&B's sweeps package is not installed (found the repository's sweeps/ folder)")
    for name in ("frontier_grid", "frontier_random"):
        spec = yaml.safe_load((SWEEPS / "wandb_agent" / f"{name}.yaml").read_text())
        assert sweeps.schema_violations_from_proposed_config(spec) == []
    spec = yaml.safe_load((SWEEPS / "wandb_agent" / "frontier_grid.yaml").read_text())
    runs = []
    while len(runs) < 40:
        (run,) = sweeps.next_runs(spec, runs, n=1) or [None]
        if run is None:
            break
        run.state = sweeps.RunState.finished
        runs.append(run)
    got = sorted(sorted((k, v["value"]) for k, v in r.config.items()) for r in runs)
    assert got == sorted(sorted(p.items()) for p in _wandb_grid(spec))


# -- Optuna: config, failures ---------------------------------------------------------------------
def test_optuna_sweep_config_and_search_space():
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from hydra_plugins.qpexp_optuna_sweeper.optuna_sweeper import check_points, parse_space

    cfg = compose(["sweep=optuna"])
    sw = cfg.hydra.sweeper
    assert sw._target_.endswith("QpexpOptunaSweeper")
    assert list(sw.objectives) == ["final/val_acc", "final/compression_ratio"]  # chosen on validation
    assert list(sw.directions) == ["maximize", "maximize"]
    assert sw.sampler._target_ == "optuna.samplers.NSGAIISampler"
    assert sw.storage == f"sqlite:///{cfg.hydra.sweep.dir}/optuna.db"
    space, fixed = parse_space([f"{k}={v}" for k, v in sw.params.items()])
    assert space["quant.bits_w"] == CategoricalDistribution((2, 3, 4, 6, 8))
    assert space["prune.scope"] == CategoricalDistribution(("global", "layer"))
    assert space["prune.criterion"] == CategoricalDistribution(("l1", "taylor"))
    assert space["prune.ratio"] == FloatDistribution(0.3, 0.9, step=0.05)
    assert fixed == []
    points = check_points([f"{k}={v}" for k, v in sw.params.items()])
    seen = {k: {p.split("=", 1)[1] for pt in points for p in pt if p.startswith(k + "=")} for k in space}
    assert seen["prune.ratio"] == {str(round(0.3 + 0.05 * i, 2)) for i in range(13)}
    assert seen["quant.bits_w"] == {"2", "3", "4", "6", "8"}
    for pt in points:  # the training of sweep=frontier with the point's axes
        validate(compose(["sweep=optuna", *pt]))


def test_sweeper_reads_objectives_from_the_record_and_fails_bad_points():
    from hydra.core.utils import JobReturn, JobStatus

    from hydra_plugins.qpexp_optuna_sweeper.optuna_sweeper import QpexpOptunaSweeper

    sw = QpexpOptunaSweeper(
        ["final/test_acc", "final/compression_ratio"], ["maximize", "maximize"], {}, None, "s", 1, 1
    )

    def ret(value=None, status=JobStatus.COMPLETED):
        r = JobReturn()
        r.status, r._return_value = status, value
        return r

    ok = {"status": "ok", "final/test_acc": 0.9, "final/compression_ratio": 8.0}
    assert sw.values(ret(ok)) == ([0.9, 8.0], "ok")
    assert sw.values(ret({**ok, "status": "deploy_mismatch"}))[0] == [0.9, 8.0]  # accuracy stands
    for bad in (
        {**ok, "status": "failed", "error": "RuntimeError: boom"},
        {**ok, "final/test_acc": float("nan")},
        {"status": "ok", "final/test_acc": 0.9},
        "not a record",
    ):
        values, why = sw.values(ret(bad))
        assert values is None and why
    assert sw.values(ret(RuntimeError("x"), JobStatus.FAILED))[0] is None


# -- Optuna: a search interrupted and continued ---------------------------------------------------
def _optuna_trials(db: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="qpexp", storage=f"sqlite:///{db}").get_trials(deepcopy=True)


def test_optuna_search_interrupted_then_continued(tmp_path):
    from optuna.trial import TrialState

    sweep = tmp_path / "sweep"
    args = [
        "sweep=optuna", *TINY, "quant.epochs=2", "hydra/launcher=basic",
        "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1", f"hydra.sweep.dir={sweep}",
        f"cache_dir={tmp_path / 'cache'}", "quant.bits_w=choice(2,4)", "prune.ratio=choice(0.5,0.7)",
        "prune.criterion=choice(l1)", "fail_at=choice(never,qat)",
    ]  # fmt: skip
    import optuna

    sweep.mkdir()  # the study exists already, with its first trials queued: the search asks for them
    study = optuna.create_study(
        storage=f"sqlite:///{sweep / 'optuna.db'}", study_name="qpexp", directions=["maximize", "maximize"]
    )
    for bits, ratio, fail in ((4, 0.5, "never"), (2, 0.7, "qat"), (2, 0.5, "never")):
        study.enqueue_trial(
            {
                "quant.bits_w": bits,
                "prune.ratio": ratio,
                "prune.scope": "global",
                "prune.criterion": "l1",
                "fail_at": fail,
            }
        )
    env = {**os.environ, "QPEXP_THREADS": "1"}
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qpexp.cli", *args], cwd=tmp_path, env=env, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    db = sweep / "optuna.db"
    deadline, trials = time.time() + 600, []
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.3)
        if db.exists():
            try:
                trials = _optuna_trials(db)
            except Exception:  # the study is being created
                continue
            if any(t.state.is_finished() for t in trials) and any(
                t.state == TrialState.RUNNING for t in trials
            ):
                os.killpg(proc.pid, signal.SIGKILL)  # the whole search, mid-trial
                break
    proc.wait()
    log.close()
    first = _optuna_trials(db)
    assert any(t.state == TrialState.RUNNING for t in first), (tmp_path / "first.log").read_text()[-3000:]
    done_before = {t.number: t for t in first if t.state.is_finished()}
    assert done_before

    out = run_cli(args, cwd=tmp_path, env={"QPEXP_THREADS": "1"}).stdout
    trials = _optuna_trials(db)
    assert [t.number for t in trials] == [0, 1, 2]  # the interrupted trial ran again under its number
    assert all(t.state.is_finished() for t in trials)
    for n, t in done_before.items():  # the earlier trials are in the study as they were
        assert (trials[n].state, trials[n].values, trials[n].datetime_complete) == (
            t.state, t.values, t.datetime_complete
        )  # fmt: skip
    states = set()
    for t in trials:
        rec = read_record(Path(t.user_attrs["run_dir"]))
        assert rec["config"]["fail_at"] == t.params["fail_at"]
        assert rec["config"]["quant"]["bits_w"] == t.params["quant.bits_w"]
        if t.params["fail_at"] == "qat":  # failed points are failed trials: no values, not zeros
            assert t.state == TrialState.FAIL and t.values is None
            assert rec["status"] == "failed" and "fail_at=qat" in t.user_attrs["error"]
        else:
            assert t.state == TrialState.COMPLETE
            assert t.values == [rec["final/val_acc"], rec["final/compression_ratio"]]
        states.add(t.state)
    assert [t.params["fail_at"] for t in trials] == ["never", "qat", "never"]  # the queued trials
    assert states == {TrialState.FAIL, TrialState.COMPLETE}
    new = 3 - len(done_before) - 1
    assert f"{len(done_before)} finished, 1 interrupted (run again), {new} new trial(s)" in out
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["trials"]["complete"] + results["trials"]["fail"] == 3
    assert {p["number"] for p in results["pareto"]} <= {t.number for t in trials if t.values}
    rows = list(csv.DictReader((sweep / "frontier.csv").open()))
    assert sum(r["point"] == "run" for r in rows) == 3


# -- DDP: the reductions between two real gloo ranks ----------------------------------------------
def _gloo_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_reductions(rank, Path(out_dir)), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _data():
    g = torch.Generator().manual_seed(123)
    scale = torch.linspace(0.5, 3.0, 8)[:, None, None]  # batches of different ranges
    return list(zip(torch.randn(8, 32, 40, generator=g) * scale, torch.randint(0, 10, (8, 32), generator=g)))


QUANT_CASES = {  # (weight spec, activation spec) keyword arguments for QuantSpec
    "minmax": ({"bits": 4, "granularity": "channel", "symmetric": True}, {"bits": 8}),
    "ema": ({"bits": 4}, {"bits": 8, "range": "ema"}),
    "lsq": ({"bits": 4, "range": "lsq", "symmetric": True}, {"bits": 8, "range": "lsq"}),
    "log": ({"bits": 4, "scheme": "log"}, {"bits": 8, "scheme": "log", "symmetric": True}),
}


def _model(case: str | None = None):
    from qpexp.core import QuantConfig, QuantSpec, quantize_
    from qpexp.models import cnn1d

    torch.manual_seed(0)
    model = cnn1d((40,), 10)
    if case:
        w, a = QUANT_CASES[case]
        quantize_(model, QuantConfig(weight=QuantSpec(**w), act=QuantSpec(**a)))
    return model


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _reductions(rank: int, out_dir: Path) -> dict:
    import qpexp.distributed as D
    from qpexp.cache import StageCache
    from qpexp.core import PruneConfig, prune_step
    from qpexp.core.prune import make_criterion

    batches, res = _data(), {}
    # Taylor: this rank's share of 2 global batches, averaged per batch; then the masks
    model = _model()
    grads = D.reduce_weight_grads(model, batches, 2)
    res["grads"] = grads
    cfg = PruneConfig(ratio=0.5, scope="global", criterion="taylor")
    prune_step(model, cfg, 0.5, make_criterion(cfg), grads)
    res["masks"] = {k: v for k, v in _state(model).items() if k.endswith("_mask")}
    # masks: a rank that has other masks gets rank 0's
    if rank == 1:
        model.conv1.weight_mask.view(-1)[:5] = 1 - model.conv1.weight_mask.view(-1)[:5]
    res["mask_differ"] = D.sync_masks(model)
    res["masks_synced"] = {k: v for k, v in _state(model).items() if k.endswith("_mask")}
    res["pruned_zero"] = bool((model.conv1.weight[model.conv1.weight_mask == 0] == 0).all())
    # quantizers: calibration on this rank's batches, reduced; then one training step on another batch
    for case in QUANT_CASES:
        m = _model(case)
        m.train()
        for x, _ in D.rank_batches(batches, 2):
            m(x)
        res[f"{case}/calib_pre"] = _state(m)
        D.sync_quant_state(m, init=True)
        res[f"{case}/calib"] = _state(m)
        m(batches[4 + rank][0])  # a QAT step's forward: each rank's own batch
        res[f"{case}/step_pre"] = _state(m)
        D.sync_quant_state(m)
        res[f"{case}/step"] = _state(m)
        res[f"{case}/forward"] = m.eval()(batches[7][0]).detach()  # the models compute alike
    # the end of a stage: same models agree; a differing rank takes rank 0's
    m = _model("minmax")
    res["finish_same"] = D.finish_stage("s1", m)
    if rank == 1:
        with torch.no_grad():
            m.fc.layer.weight.add_(1.0)
    res["finish_differ"] = D.finish_stage("s2", m)
    res["after_finish"] = _state(m)
    # the cache: rank 0 decides and writes; the other follows
    cache = StageCache(out_dir / "cache", out_dir / "run")
    hits = []
    for _ in range(2):
        with D.stage_entry(cache, "baseline", "k1") as entry:
            loaded = entry.load_or_discard()
            hits.append(loaded is not None)
            if loaded is None:
                entry.save({"model": _state(_model()), "rank": torch.tensor(rank)}, {"val_acc": 0.5})
            else:
                res["cached_rank"] = int(loaded[0]["rank"])
    res["cache_hits"] = hits
    return res


def _close(a, b, atol=1e-6) -> bool:
    return all(torch.allclose(x.float(), y.float(), atol=atol, rtol=1e-5) for x, y in zip(a, b))


def test_reductions_across_two_gloo_ranks(tmp_path):
    """Each rank sees different data; after each reduction both ranks hold bit-identical state, equal
    to what one process computes on the global batch (min/max exactly, averages to float rounding)."""
    from qpexp.core.prune import PruneConfig, make_criterion, prune_step
    from qpexp.core.prune.criteria.taylor import weight_grads
    from qpexp.core.quant.linear import affine_qparams

    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_gloo_rank, args=(r, 2, str(tmp_path / "init"), str(tmp_path))) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    batches = _data()

    def same(key):
        a, b = r0[key], r1[key]
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            return all(same_t(a[k], b[k]) for k in a)
        return same_t(a, b)

    def same_t(a, b):
        if isinstance(a, list):
            return all(torch.equal(x, y) for x, y in zip(a, b))
        return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

    # Taylor gradients: identical on both ranks and those of the global batches (b0+b1, b2+b3)
    assert same("grads") and same("masks")
    glob = [
        (torch.cat([batches[i][0], batches[i + 1][0]]), torch.cat([batches[i][1], batches[i + 1][1]]))
        for i in (0, 2)
    ]
    ref = weight_grads(_model(), glob, 2)
    for name, gs in ref.items():
        assert len(r0["grads"][name]) == 2 and _close(r0["grads"][name], gs), name
    ref_model = _model()
    cfg = PruneConfig(ratio=0.5, scope="global", criterion="taylor")
    prune_step(ref_model, cfg, 0.5, make_criterion(cfg), ref)
    ref_masks = {k: v for k, v in ref_model.state_dict().items() if k.endswith("_mask")}
    agree = sum(int((r0["masks"][k] == v).sum()) for k, v in ref_masks.items())
    total = sum(v.numel() for v in ref_masks.values())
    assert agree >= total - 2  # the same masks as one process (a tie at the threshold may flip)
    # masks: rank 1's 5 flipped entries replaced by rank 0's, its weights zeroed where masked
    assert (r0["mask_differ"], r1["mask_differ"]) == (0, 5)
    assert same("masks_synced")
    assert all(torch.equal(r1["masks_synced"][k], r0["masks"][k]) for k in r0["masks"])
    assert r1["pruned_zero"]
    # quantizer state: bit-identical after calibration and after a step, for every observer kind
    first_in = torch.cat([batches[i][0] for i in range(4)])  # the global calibration data
    for case in QUANT_CASES:
        for stage in ("calib", "step"):
            if (case, stage) != ("lsq", "step"):  # a learned step does not move in a forward
                assert not same(f"{case}/{stage}_pre"), (case, stage)  # the ranks saw different data
            assert same(f"{case}/{stage}"), (case, stage)
        assert same(f"{case}/forward"), case
        pre = (r0[f"{case}/calib_pre"], r1[f"{case}/calib_pre"])
        post = r0[f"{case}/calib"]
        for k in post:
            if k.endswith("aq.min_val"):
                assert torch.equal(post[k], torch.minimum(pre[0][k], pre[1][k])), (case, k)
            if k.endswith("aq.max_val") or k.endswith("aq.max_abs"):
                assert torch.equal(post[k], torch.maximum(pre[0][k], pre[1][k])), (case, k)
        step_pre = (r0[f"{case}/step_pre"], r1[f"{case}/step_pre"])
        for k, v in r0[f"{case}/step"].items():
            if k.endswith("aq.min_val") and case != "lsq":  # EMA too: min over ranks of the same update
                assert torch.equal(v, torch.minimum(step_pre[0][k], step_pre[1][k])), (case, k)
            if k.endswith("aq.max_val") and case != "lsq":
                assert torch.equal(v, torch.maximum(step_pre[0][k], step_pre[1][k])), (case, k)
    # the first layer sees the data itself: its range is exactly the global calibration data's
    mm = r0["minmax/calib"]
    assert mm["conv1.aq.min_val"].item() == first_in.min().item()
    assert mm["conv1.aq.max_val"].item() == first_in.max().item()
    s, z = affine_qparams(mm["conv1.aq.min_val"], mm["conv1.aq.max_val"], 8, False)
    assert torch.equal(mm["conv1.aq.scale"], s) and torch.equal(mm["conv1.aq.zero_point"], z)
    # EMA after the step: decay * (min of the first batches) + (1 - decay) * min of both step batches
    ema = r0["ema/step"]["conv1.aq.min_val"].item()
    step_min = min(batches[4][0].min().item(), batches[5][0].min().item())
    assert math.isclose(ema, 0.9 * r0["ema/calib"]["conv1.aq.min_val"].item() + 0.1 * step_min, rel_tol=1e-6)
    # LSQ: the step initialized from the global first batch (rank 0's b0 and rank 1's b1)
    lsq = r0["lsq/calib"]["conv1.aq.scale"].item()
    first = torch.cat([batches[0][0], batches[1][0]])
    assert math.isclose(lsq, (2 * first.abs().mean() / math.sqrt(255)).item(), rel_tol=1e-5)
    # end of stage and cache
    assert r0["finish_same"] == r1["finish_same"] == {"ddp/s1_identical": True}
    assert r0["finish_differ"] == {"ddp/s2_identical": False} and same("after_finish")
    assert r0["cache_hits"] == r1["cache_hits"] == [False, True]
    assert r0["cached_rank"] == r1["cached_rank"] == 0  # rank 0 wrote the entry
    assert not list((tmp_path / "cache").rglob("*.tmp"))


# -- DDP: the pipeline in two Lightning processes -------------------------------------------------
# 3400 training samples (val_fraction 0.15 of 4000): 17 global batches of 200, no padded batch
DDP_ARGS = [
    *TINY,
    "export.enabled=false",
    "prune.criterion=taylor",
    "prune.taylor_batches=2",
    "data.val_fraction=0.15",
]


def test_a_started_rank_that_dies_before_joining_fails_the_run_at_once(tmp_path):
    """Rank 0 does not wait out the collective timeout (6 h by default) for a rank that died at start:
    the run fails within seconds, its record says so, and nothing was trained."""
    hook = tmp_path / "hook"
    hook.mkdir()  # Python runs sitecustomize at start: rank 1 exits 7 before importing qpexp
    (hook / "sitecustomize.py").write_text("import os\nif os.environ.get('RANK') == '1':\n    os._exit(7)\n")
    path = os.pathsep.join([str(ROOT), str(hook)])
    t0 = time.monotonic()
    p = run_cli(
        [*DDP_ARGS, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         f"cache_dir={tmp_path / 'c'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env={"PYTHONPATH": path, "QPEXP_DDP_TIMEOUT_S": "900"}, check=False, timeout=300,
    )  # fmt: skip
    assert time.monotonic() - t0 < 240, "rank 0 waited for a dead rank"
    rec = read_record(tmp_path / "run")
    assert p.returncode != 0 and rec["status"] == "failed"
    assert "rank(s) [(1, 7)]" in rec["error"] and "exited before joining" in rec["error"], rec["error"]
    assert "baseline/test_acc" not in rec and not list((tmp_path / "c").glob("*/meta.json"))


def test_ddp_pipeline_two_cpu_ranks_match_single_process(tmp_path):
    """``trainer=ddp`` with 2 CPU processes (gloo), each training on its share of the batches, against
    one process with the same global batch (``data.batch_size`` x 2): both ranks hold bit-identical
    models (masks, quantizer state) after pruning and QAT, rank 0 alone wrote the cache, and the
    record equals the single-process one within a tolerance: the same pruned fraction, accuracies within
    0.02 (measured: baseline equal, pruned model 1 validation sample apart, QAT about 1 point, since a
    rank's fake quantizers use its own running range within a step until the step's reduction), sizes
    within 0.1% (a few weights quantize to zero or not)."""
    dump = tmp_path / "dump"
    run_cli(
        [*DDP_ARGS, "data.batch_size=200", f"cache_dir={tmp_path / 'c1'}", f"hydra.run.dir={tmp_path / 'single'}"],
        cwd=tmp_path,
    )  # fmt: skip
    ddp = run_cli(
        [*DDP_ARGS, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         f"cache_dir={tmp_path / 'c2'}", f"hydra.run.dir={tmp_path / 'ddp'}"],
        cwd=tmp_path, env={"QPEXP_DDP_DUMP": str(dump)},
    )  # fmt: skip
    assert "DDP: rank 0 of 2 (gloo)" in ddp.stdout
    rec, ref = read_record(tmp_path / "ddp"), read_record(tmp_path / "single")
    assert rec["status"] == "not_deployed" and rec["ddp/world_size"] == 2
    assert rec["ddp/baseline_identical"] and rec["ddp/prune_identical"] and rec["ddp/qat_identical"]
    for stage in ("baseline", "prune", "qat"):  # every tensor of the two ranks' models, bit for bit
        a = torch.load(dump / f"{stage}-rank0.pt", weights_only=True)
        b = torch.load(dump / f"{stage}-rank1.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    qat = torch.load(dump / "qat-rank0.pt", weights_only=True)
    assert any(k.endswith("weight_mask") for k in qat) and any(k.endswith("aq.max_val") for k in qat)
    # rank 0 alone wrote the cache: one entry per stage, complete, no leftovers
    entries = sorted(p.parent.name.split("-")[0] for p in (tmp_path / "c2").glob("*/meta.json"))
    assert entries == ["baseline", "prune", "qat"]
    assert not list((tmp_path / "c2").rglob("*.tmp")) and not list((tmp_path / "c2").rglob("*.ckpt"))
    # the record against one process with the same global batch
    a, b = numbers(rec), numbers(ref)
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith(("_acc", "/val_acc", "/test_acc")):
            assert abs(a[k] - b[k]) <= 0.02, (k, a[k], b[k])
        elif "huffman" in k:  # entropy-coded sizes follow the codes' frequencies: a few codes differ
            if isinstance(a[k], float):  # (the chosen layout, a string, may differ with them)
                assert a[k] == pytest.approx(b[k], rel=5e-2), k
        elif k.startswith("size/"):  # one small layer: a weight rounded to zero or not moves it by an entry
            assert a[k] == pytest.approx(b[k], rel=1e-2), k
        elif k.endswith(
            ("size_bits", "compression_ratio", "zero_fraction", "nonzero_params", "paper_ratio")
        ) or k.startswith("final/paper_"):
            assert a[k] == pytest.approx(b[k], rel=1e-3), k
        elif isinstance(a[k], (int, float)) and not isinstance(a[k], bool):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
        else:
            assert a[k] == b[k], k


# -- submitit: separate jobs, a shared cache, a kill, a re-submission ------------------------------
POINTS = {"a": (4, 1), "b": (8, 1), "c": (2, 8)}  # experiment -> (bits_w, QAT epochs)


def _submitit_conf(root: Path) -> Path:
    conf = root / "conf"
    (conf / "sweep").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "sweep" / "tiny.yaml").write_text(
        "# @package _global_\nhydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n      experiment: a,b,c\n"
    )
    for name, (bits, epochs) in POINTS.items():
        (conf / "experiment" / f"{name}.yaml").write_text(
            f"# @package _global_\nquant:\n  bits_w: {bits}\n  epochs: {epochs}\n"
        )
    return conf


def _submitit_args(tmp: Path, conf: Path) -> list[str]:
    return [
        "--config-dir", str(conf), "sweep=tiny", *(a for a in TINY if not a.startswith("quant.epochs")),
        "logger=csv", "export.enabled=false", "checkpoint_every_s=0",  # a checkpoint every epoch: killed after one
        "prune.ratio=0.5", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20",
        "hydra.launcher.cpus_per_task=1", f"cache_dir={tmp / 'cache'}", f"hydra.sweep.dir={tmp / 'sweep'}",
    ]  # fmt: skip


def _dirs(sweep: Path) -> dict[str, Path]:
    out = {}
    for f in sweep.glob("*/.hydra/overrides.yaml"):
        exp = [line.split("=", 1)[1].strip() for line in f.read_text().splitlines() if "experiment=" in line]
        if exp:
            out[exp[0]] = f.parent.parent
    return out


@pytest.fixture(scope="module")
def submitit_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("submitit")
    conf = _submitit_conf(tmp)
    args = _submitit_args(tmp, conf)
    sweep, cache = tmp / "sweep", tmp / "cache"
    env = {**os.environ, "QPEXP_THREADS": "1", "QPEXP_PROGRESS_INTERVAL": "0.5"}
    first_log = tmp / "first.log"
    with first_log.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qpexp.cli", *args], cwd=tmp, env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline, killed_at = time.time() + 900, None
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
            d = _dirs(sweep)
            ab_done = all((d.get(k, tmp / "none") / "record.json").exists() for k in "ab")
            ckpts = list(cache.glob("qat-*/work/last.ckpt"))
            if ab_done and ckpts:  # c alone is training QAT, a checkpoint is written: kill the sweep
                os.killpg(proc.pid, signal.SIGKILL)  # every job and the sweep itself, as a node failure
                killed_at = ckpts[0]
                break
        proc.wait()
    assert killed_at is not None, first_log.read_text()[-4000:]
    time.sleep(0.5)
    killed_epoch = torch.load(killed_at, weights_only=False)["epoch"]
    d = _dirs(sweep)
    before = {
        "records": {k: read_record(d[k]) for k in "ab"},
        "mtimes": {k: (d[k] / "record.json").stat().st_mtime_ns for k in "ab"},
        "c_record": (d["c"] / "record.json").exists(),
        "baseline_meta": {p: p.stat().st_mtime_ns for p in cache.glob("baseline-*/meta.json")},
        "jobs": [p for p in (sweep / ".submitit").iterdir() if p.is_dir() and p.name.isdigit()],
    }
    second = run_cli(args, cwd=tmp, env={"QPEXP_THREADS": "1", "QPEXP_PROGRESS_INTERVAL": "0.5"}, timeout=900)
    return {
        "tmp": tmp, "sweep": sweep, "cache": cache, "dirs": _dirs(sweep), "before": before,
        "killed_epoch": killed_epoch, "first_log": first_log.read_text(), "second": second,
    }  # fmt: skip


def test_submitit_points_run_as_separate_jobs_sharing_the_cache(submitit_sweep):
    s = submitit_sweep
    assert len(s["before"]["jobs"]) == 3  # three submitit jobs (one folder per job id) in the first run
    assert "one submitit local job each" in s["first_log"]
    recs = {k: read_record(d) for k, d in s["dirs"].items()}
    assert sorted(recs) == ["a", "b", "c"] and all(r["status"] == "not_deployed" for r in recs.values())
    for k, (bits, epochs) in POINTS.items():
        assert recs[k]["final/bits_w"] == bits and recs[k]["config"]["quant"]["epochs"] == epochs
        assert recs[k]["threads"] == 1  # hydra.launcher.cpus_per_task
    # one baseline and one pruned model for the three jobs: one trained each, the others waited
    cache = s["cache"]
    assert len(list(cache.glob("baseline-*/meta.json"))) == 1
    assert len(list(cache.glob("prune-*/meta.json"))) == 1
    assert sum(not r["cache/baseline_hit"] for r in recs.values()) <= 1
    assert sum(r["cache/baseline_hit"] for r in recs.values()) >= 2
    assert sum(not r["cache/prune_hit"] for r in recs.values()) <= 1
    assert len({r["artifacts/baseline"] for r in recs.values()}) == 1
    assert len({r["baseline/test_acc"] for r in recs.values()}) == 1
    assert s["before"]["baseline_meta"] == {
        p: p.stat().st_mtime_ns for p in cache.glob("baseline-*/meta.json")
    }


def test_submitit_killed_job_resumes_and_resubmission_reruns_only_incomplete(submitit_sweep):
    s = submitit_sweep
    assert not s["before"]["c_record"]  # c was killed mid-QAT
    assert s["killed_epoch"] < POINTS["c"][1] - 1  # with epochs left to resume
    for k in "ab":  # complete points were reused as they were
        assert (s["dirs"][k] / "record.json").stat().st_mtime_ns == s["before"]["mtimes"][k]
        assert read_record(s["dirs"][k]) == s["before"]["records"][k]
    # c resumed from its QAT checkpoint: the second run trained only the epochs after it
    rows = list(csv.DictReader((s["dirs"]["c"] / "csv" / "metrics.csv").open()))
    epochs = sorted({int(float(r["epoch"])) for r in rows if r.get("qat/train/loss")})
    assert epochs == list(range(s["killed_epoch"] + 1, POINTS["c"][1])), epochs
    rec = read_record(s["dirs"]["c"])
    assert rec["cache/baseline_hit"] and rec["cache/prune_hit"] and not rec["cache/qat_hit"]
    out = s["second"].stdout
    assert "[sweep] 3/3 done, 0 failed (2 reused), 0 running" in out
    assert "running" in out and "[sweep] 0/3 done" in out  # the sweep process reports the jobs' progress


def test_submitit_frontier_aggregates_the_jobs(submitit_sweep):
    rows = list(csv.DictReader((submitit_sweep["sweep"] / "frontier.csv").open()))
    runs = [r for r in rows if r["point"] == "run"]
    assert len(runs) == 3 and {r["status"] for r in runs} == {"not_deployed"}
    recs = {read_record(d)["final/test_acc"] for d in submitit_sweep["dirs"].values()}
    assert {float(r["final/test_acc"]) for r in runs} == recs


class _Job:
    """A submitit job as qpexp's SLURM launcher sees it: done or not, then a result or none."""

    def __init__(self, job_id: str, result=None, polls: int = 0):
        self.job_id, self.result, self.polls = job_id, result, polls

    def done(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def results(self):
        from submitit.core.utils import UncompletedJobError

        if self.result is None:
            raise UncompletedJobError(f"Job {self.job_id} has not produced any output (state: NODE_FAIL)")
        return [self.result]


def test_lost_job_is_a_failed_point_and_the_sweep_goes_on(tmp_path, capsys):
    """qpexp's SLURM launcher (hydra/launcher=slurm) waits for every job: a job that ended without a
    result (a lost node) becomes a failed record in its point's folder and a failed outcome in the
    progress line, not submitit's exception; a record the point wrote before its job was lost is kept."""
    from qpexp.sweep.callbacks import progress_line, sweep_counts
    from qpexp.sweep.lost import lost_point, point_dir, wait_all

    sweep = tmp_path / "sweep"
    cfgs = [
        compose([f"hydra.sweep.dir={sweep}", f"quant.bits_w={b}", "hydra.mode=MULTIRUN"]) for b in (2, 4, 8)
    ]
    state = sweep / ".qpexp"
    state.mkdir(parents=True)
    (state / "progress.json").write_text(json.dumps({"run_id": "r1", "total": 3, "start": time.time()}))
    (state / "progress-r1.log").write_text("0 running\n1 running\n2 running\n")
    kept = {"status": "not_deployed", "final/test_acc": 0.5}
    point_dir(cfgs[2]).mkdir(parents=True)
    (point_dir(cfgs[2]) / "record.json").write_text(json.dumps(kept))  # written, then the job was lost
    jobs = [_Job("7_0", result={"status": "not_deployed"}, polls=3), _Job("7_1", polls=1), _Job("7_2")]

    def lost(i, job):
        return lost_point(cfgs[i], i, f"SLURM job {job.job_id} ended NODE_FAIL without a result", f"p{i}")

    out = wait_all(jobs, lost, poll_s=0.01)
    assert out[0] == {"status": "not_deployed"} and out[2] == kept  # in submission order
    assert out[1]["status"] == "failed"
    assert out[1]["error"] == "SLURM job 7_1 ended NODE_FAIL without a result"
    assert out[1]["config"]["quant"]["bits_w"] == 4  # the frontier's axes for a point that never started
    assert read_record(point_dir(cfgs[1])) == out[1] and read_record(point_dir(cfgs[2])) == kept
    printed = capsys.readouterr().out
    assert "[sweep] #1 p1: SLURM job 7_1 ended NODE_FAIL without a result: failed; re-submit" in printed
    assert "[sweep] #2 p2: SLURM job 7_2 ended NODE_FAIL without a result: its record was written" in printed
    # the progress: the lost jobs ended (the one that wrote its record counts as done), job 0 still runs
    assert progress_line(sweep_counts(state)).startswith("[sweep] 2/3 done, 1 failed, 1 running")

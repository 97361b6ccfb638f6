"""Issue 23: qpexp against a real SLURM controller: a one-node cluster on this machine
(tests/slurm/cluster.sh: munged, slurmctld, slurmd on localhost), brought up once per session.

- a sweep with ``hydra/launcher=slurm``: one job array, the baseline trained once, the frontier;
- the same sweep interrupted: one job requeued mid-QAT by SLURM (``scontrol requeue``: killed and
  put back, as SLURM's own preemption does), one whose ``--time`` runs out mid-QAT (SLURM's USR2
  ahead of the limit, submitit's checkpoint and requeue); both resume from their QAT checkpoints to
  the records of the uninterrupted sweep, number for number;
- a node lost while jobs are queued (``scontrol update nodename=... state=down``): the running job
  ends ``NODE_FAIL``, the sweep names its point as failed (console, progress line, record, frontier),
  the queued one runs once the node is back; the same command again runs only the lost point;
- ``sweep=optuna`` with trials as SLURM jobs: the search process killed mid-study and started again
  continues the study to its number of trials without running the completed ones again;
- ``trainer=ddp`` with ranks started by SLURM (``srun --ntasks-per-node=2``) and by ``torchrun``:
  bit-identical ranks, and the same models and record as when qpexp starts the ranks itself.

Marked ``slurm``; they skip (with the reason) only where slurm-wlm and munge cannot be installed.
Run them alone: ``pytest tests/test_slurm.py -m slurm``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, read_record, run_cli
from test_scaleout import DDP_ARGS, numbers

pytestmark = pytest.mark.slurm
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
CANNOT_INSTALL = 3  # cluster.sh's exit status when slurm-wlm/munge are missing and cannot be installed


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster for this session; ``$SLURM_CONF`` points every client at it."""
    # outside pytest's basetemp (which a later pytest session may delete) and short (munge's socket)
    d = Path(tempfile.mkdtemp(prefix="qpexp-slurm-"))
    up = subprocess.run([str(CLUSTER), "up", str(d)], capture_output=True, text=True, timeout=900)
    if up.returncode == CANNOT_INSTALL:
        pytest.skip(f"no SLURM cluster: {up.stderr.strip()}")
    assert up.returncode == 0, f"cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(d / "slurm.conf")
    try:
        yield d
    finally:
        subprocess.run([str(CLUSTER), "down", str(d)], capture_output=True, timeout=120)
        shutil.rmtree(d, ignore_errors=True)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=60).stdout


def jobs() -> dict[str, dict]:
    """The controller's jobs (``scontrol show job -o``), by ``<array job>_<task>`` (or job id)."""
    out = {}
    for line in sh("scontrol", "show", "job", "-o").splitlines():
        job = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" in job:
            key = f"{job['ArrayJobId']}_{job['ArrayTaskId']}" if job.get("ArrayTaskId") else job["JobId"]
            out[key] = job
    return out


def jobcomp(cluster: Path) -> list[dict]:
    """SLURM's job completion log: one line per job run that ended (a requeued run included)."""
    path = cluster / "jobcomp.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in lines]


def _when(stamp: str) -> float:
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))


# -- a sweep as a job array -----------------------------------------------------------------------
POINTS = {
    "a": (4, 48),
    "b": (8, 480),
}  # experiment -> (bits_w, QAT epochs): a's QAT outlasts a requeue on a loaded machine; b's outlasts the
# wait for SLURM's time-limit signal, which slurmctld sends at its next periodic time-limit check (up
# to a minute after the limit is shortened: with 96 epochs an idle machine finished b first)


def _sweep_conf(root: Path, name: str = "pair", points: dict = POINTS) -> Path:
    """A config dir with sweep ``name`` over one experiment per point (``bits_w``, QAT epochs)."""
    conf = root / "conf"
    (conf / "sweep").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "sweep" / f"{name}.yaml").write_text(
        "# @package _global_\nhydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n"
        f"      experiment: {','.join(points)}\n"
    )
    for name, (bits, epochs) in points.items():
        (conf / "experiment" / f"{name}.yaml").write_text(
            f"# @package _global_\nquant:\n  bits_w: {bits}\n  epochs: {epochs}\n"
        )
    return conf


def _sweep_args(root: Path, conf: Path, sweep: Path, cache: Path) -> list[str]:
    return [
        "--config-dir", str(conf), "sweep=pair", "baseline.epochs=2", "prune.steps=1",
        "prune.finetune_epochs=1", "quant.calib_batches=2", "logger=csv", "export.enabled=false",
        "checkpoint_every_s=0", "prune.ratio=0.5", "hydra/launcher=slurm", "hydra.launcher.mem_gb=1",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
        "hydra.launcher.signal_delay_s=170", f"cache_dir={cache}", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip


def _points(sweep: Path) -> dict[str, Path]:
    out = {}
    for f in sweep.glob("*/.hydra/overrides.yaml"):
        exp = [line.split("=", 1)[1].strip() for line in f.read_text().splitlines() if "experiment=" in line]
        if exp:
            out[exp[0]] = f.parent.parent
    return out


ENV = {"QPEXP_THREADS": "1", "QPEXP_PROGRESS_INTERVAL": "1"}


@pytest.fixture(scope="module")
def sweep(slurm_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-sweep")
    conf = _sweep_conf(root)
    sweep, cache = root / "sweep", root / "cache"
    before = set(jobs())
    t0 = time.time()
    out = run_cli(_sweep_args(root, conf, sweep, cache), cwd=root, env=ENV, timeout=600).stdout
    seconds = time.time() - t0
    new = {k: v for k, v in jobs().items() if k not in before}
    return {
        "root": root,
        "conf": conf,
        "sweep": sweep,
        "cache": cache,
        "out": out,
        "jobs": new,
        "seconds": seconds,
    }


def test_slurm_sweep_is_one_job_array_sharing_the_baseline(sweep, slurm_cluster):
    print(f"\n[slurm] uninterrupted 2-point sweep: {sweep['seconds']:.0f} s")
    js = sweep["jobs"]
    assert len(js) == 2 and len({j["ArrayJobId"] for j in js.values()}) == 1  # one array, one job a point
    assert sorted(j["ArrayTaskId"] for j in js.values()) == ["0", "1"]
    assert {j["JobState"] for j in js.values()} == {"COMPLETED"}
    assert {j["Restarts"] for j in js.values()} == {"0"}
    assert {j["TimeLimit"] for j in js.values()} == {"00:10:00"}  # hydra.launcher.timeout_min
    ids = {j["JobId"] for j in js.values()}
    done = [c for c in jobcomp(slurm_cluster) if c["JobId"] in ids]
    assert sorted(c["JobState"] for c in done) == ["COMPLETED", "COMPLETED"]
    recs = {k: read_record(d) for k, d in _points(sweep["sweep"]).items()}
    assert sorted(recs) == ["a", "b"] and {r["status"] for r in recs.values()} == {"not_deployed"}
    for k, (bits, epochs) in POINTS.items():
        assert recs[k]["final/bits_w"] == bits and recs[k]["config"]["quant"]["epochs"] == epochs
        assert recs[k]["threads"] == 1  # hydra.launcher.cpus_per_task
    # the baseline trained once: one job trained it, the other waited on its lock and reused it
    assert len(list(sweep["cache"].glob("baseline-*/meta.json"))) == 1
    assert sorted(r["cache/baseline_hit"] for r in recs.values()) == [False, True]
    assert len({r["baseline/test_acc"] for r in recs.values()}) == 1
    out = sweep["out"]
    assert "[sweep] 2 points, one submitit SLURM job each" in out
    assert "[sweep] 2/2 done, 0 failed, 0 running" in out and "[sweep] 0/2 done" in out
    rows = list(csv.DictReader((sweep["sweep"] / "frontier.csv").open()))
    runs = [r for r in rows if r["point"] == "run"]
    assert len(runs) == 2 and {r["status"] for r in runs} == {"not_deployed"}
    assert {float(r["final/test_acc"]) for r in runs} == {r["final/test_acc"] for r in recs.values()}
    # the frontier was written after the last job's record (SLURM's EndTime comes a few seconds
    # later: the job's process exits after submitit has written its result)
    last = max((d / "record.json").stat().st_mtime for d in _points(sweep["sweep"]).values())
    assert (sweep["sweep"] / "frontier.csv").stat().st_mtime >= last


# -- the same sweep interrupted: a requeue and a time limit, mid-QAT ------------------------------
def _copy_stages(src: Path, dst: Path, stages=("baseline", "prune")) -> None:
    """The uninterrupted sweep's cached stages (not QAT): the interrupted jobs go straight to QAT."""
    dst.mkdir(parents=True)
    for stage in stages:
        for entry in src.glob(f"{stage}-*"):
            if entry.is_dir():
                shutil.copytree(entry, dst / entry.name)


def _ckpt_epoch(path: Path) -> int | None:
    try:
        return int(torch.load(path, weights_only=False, map_location="cpu")["epoch"])
    except Exception:  # not there yet, or being written
        return None


def _interrupt(tasks: dict, entries: dict, cache: Path, seen: dict) -> None:
    """One poll: requeue a's job mid-QAT; shorten b's --time mid-QAT (SLURM then signals it) and
    give it its limit back once submitit has requeued it; note each point's checkpoint epoch while
    its job waits to run again (the epochs the resumed run must not train again)."""
    js = jobs()
    for k, task in tasks.items():
        job = js.get(task)
        if job is None:
            continue
        seen.setdefault(k, {}).setdefault("first_start", job["StartTime"])
        ckpt = cache / entries[k] / "work" / "last.ckpt"
        s = seen[k]
        if "interrupted" not in s and job["JobState"] == "RUNNING" and _ckpt_epoch(ckpt) is not None:
            if k == "a":  # SLURM's requeue (an admin's, or preemption with PreemptMode=REQUEUE)
                sh("scontrol", "requeue", task)
            else:  # the limit now ends a minute or two from here: USR2 (signal_delay_s) comes at once
                elapsed = time.time() - _when(job["StartTime"])
                sh("scontrol", "update", f"JobId={task}", f"TimeLimit={int(elapsed // 60) + 2}")
            s["interrupted"] = time.time()
        if "interrupted" in s and "resume_from" not in s and job["JobState"] == "PENDING":
            s["resume_from"] = _ckpt_epoch(ckpt)  # the job's process is gone: its last checkpoint
            if k == "b":  # the resumed run gets the sweep's --time again
                sh("scontrol", "update", f"JobId={task}", "TimeLimit=10")


@pytest.fixture(scope="module")
def interrupted(sweep, slurm_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-requeue")
    sweep2, cache2 = root / "sweep", root / "cache"
    _copy_stages(sweep["cache"], cache2)
    ref = {k: read_record(d) for k, d in _points(sweep["sweep"]).items()}
    entries = {k: Path(r["artifacts/qat"]).name for k, r in ref.items()}
    before, seen = set(jobs()), {}
    log = (root / "sweep.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qpexp.cli", *_sweep_args(root, sweep["conf"], sweep2, cache2)],
        cwd=root, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    tasks, deadline = {}, time.time() + 600
    try:
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.3)
            if not tasks:
                arrays = sorted(k for k in jobs() if k not in before and "_" in k)
                tasks = dict(zip("ab", arrays)) if len(arrays) == 2 else {}
            if tasks:
                _interrupt(tasks, entries, cache2, seen)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    return {
        "sweep": sweep2, "cache": cache2, "ref": ref, "ref_jobs": sweep["jobs"], "tasks": tasks,
        "seen": seen, "jobs": jobs(), "out": (root / "sweep.log").read_text(), "rc": proc.returncode,
    }  # fmt: skip


def test_requeued_and_timed_out_jobs_resume_to_the_uninterrupted_records(interrupted, slurm_cluster):
    s = interrupted
    assert s["rc"] == 0, s["out"][-4000:]
    tasks, seen = s["tasks"], s["seen"]
    for k in "ab":
        assert "interrupted" in seen.get(k, {}), (k, seen, s["out"][-3000:])
        job = s["jobs"][tasks[k]]
        assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", job  # one requeue, one resumed run
    # b: SLURM's signal ahead of --time reached submitit, which counted a time-out and requeued it
    logs = "".join(p.read_text() for p in (s["sweep"] / ".submitit" / tasks["b"]).glob("*_log.*"))
    assert "Caught signal SIGUSR2" in logs and "this job is timed-out" in logs, logs[-3000:]
    assert re.search(r"Requeued job \S+ \(2 remaining timeouts\)", logs), logs[-3000:]
    # a: killed by SLURM's requeue (no signal for submitit), run again by SLURM
    logs_a = "".join(p.read_text() for p in (s["sweep"] / ".submitit" / tasks["a"]).glob("*_log.*"))
    assert "Caught signal SIGUSR2" not in logs_a
    recs = {k: read_record(d) for k, d in _points(s["sweep"]).items()}
    assert sorted(recs) == ["a", "b"]
    for k, (_, epochs) in POINTS.items():
        rec = recs[k]
        assert rec["status"] == "not_deployed" and rec["cache/baseline_hit"] and rec["cache/prune_hit"]
        assert not rec["cache/qat_hit"]
        # resumed from its QAT checkpoint: the resumed run trained the epochs after it, once each
        start = seen[k]["resume_from"]
        assert start is not None and start < epochs - 1, (k, start)
        rows = list(csv.DictReader((_points(s["sweep"])[k] / "csv" / "metrics.csv").open()))
        trained = [int(float(r["epoch"])) for r in rows if r.get("qat/train/loss")]
        assert trained == list(range(start + 1, epochs)), (k, start, trained)
        # the same numbers as the uninterrupted sweep's record for this point
        assert numbers(rec) == numbers(s["ref"][k]), k
    assert len(list(s["cache"].glob("qat-*/meta.json"))) == 2 and not list(s["cache"].rglob("*.tmp"))
    out = s["out"]
    assert "[sweep] 2/2 done, 0 failed, 0 running" in out
    # what a requeue costs: the point's result came this much later than in the uninterrupted sweep
    ref_jobs = {j["ArrayTaskId"]: j for j in s["ref_jobs"].values()}
    for i, k in enumerate("ab"):
        job, ref = s["jobs"][tasks[k]], ref_jobs[str(i)]
        took = _when(job["EndTime"]) - _when(seen[k]["first_start"])
        lost = took - (_when(ref["EndTime"]) - _when(ref["StartTime"]))
        hold = _when(job["StartTime"]) - seen[k]["interrupted"]
        print(
            f"\n[slurm] {k}: interrupted and resumed in {took:.0f} s, {lost:.0f} s later than uninterrupted "
            f"(requeue to restart {hold:.0f} s)"
        )


# -- a node lost while jobs are queued: the sweep reports it, a re-submission completes it ---------
LOST = {"c": (4, 48), "d": (6, 8)}  # c runs first and loses its node mid-QAT; d waits in the queue
NODE_FAIL_LINE = re.compile(r"\[sweep\] #0 experiment=c .*: SLURM job (\S+) ended NODE_FAIL without a result")


def _lost_args(root: Path, conf: Path, sweep: Path, cache: Path) -> list[str]:
    args = ["sweep=lost" if a == "sweep=pair" else a for a in _sweep_args(root, conf, sweep, cache)]
    return [
        *args, "hydra.launcher.array_parallelism=1",  # one point at a time: d is queued while c runs
        # --no-requeue: the preset's --requeue would have SLURM put c back in the queue itself (it
        # would resume from its checkpoint once the node is back, as a requeued job does)
        "~hydra.launcher.additional_parameters.requeue", "+hydra.launcher.additional_parameters.no_requeue=true",
    ]  # fmt: skip


def sacct(job: str) -> dict[str, str]:
    """SLURM's accounting (slurmdbd): each job's (array task's) last state."""
    out = sh("sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", job)
    return dict(line.split("|", 1) for line in out.splitlines() if line)


def _lose_node(proc, log: Path, cache: Path, node: str, before: set) -> dict:
    """Poll the first sweep: once c runs with a QAT checkpoint, its node goes down; once the sweep
    has reported c lost, note what it reported and bring the node back."""
    s: dict = {}
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.3)
        js = jobs()
        if "tasks" not in s:
            arrays = sorted(k for k in js if k not in before and "_" in k)
            if len(arrays) == 2:
                s["tasks"] = dict(zip("cd", arrays))
            continue
        ckpts = list(cache.glob("qat-*/work/last.ckpt"))  # c's: d has not started
        if "down" not in s and js[s["tasks"]["c"]]["JobState"] == "RUNNING" and ckpts:
            if _ckpt_epoch(ckpts[0]) is not None:
                sh("scontrol", "update", f"nodename={node}", "state=down", "reason=qpexp-test-lost-node")
                s.update(down=time.time(), ckpt=ckpts[0])
        out = log.read_text()
        if "down" in s and "report" not in s and NODE_FAIL_LINE.search(out) and "1 failed, 0 running" in out:
            s.update(
                report=out,
                seen=time.time() - s["down"],
                jobs_down=js,
                nodes=sh("sinfo", "-h", "-N", "-o", "%T %E"),
            )
            s["resume_from"] = _ckpt_epoch(s["ckpt"])  # c's process is gone: its last checkpoint
            sh("scontrol", "update", f"nodename={node}", "state=resume")
    return s


@pytest.fixture(scope="module")
def lost_node(sweep, slurm_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-lost")
    conf = _sweep_conf(root, "lost", LOST)
    sweep2, cache2 = root / "sweep", root / "cache"
    _copy_stages(sweep["cache"], cache2)  # the baseline and the pruned model: the jobs go straight to QAT
    args = _lost_args(root, conf, sweep2, cache2)
    node = sh("sinfo", "-h", "-N", "-o", "%N").split()[0]
    before, log_path = set(jobs()), root / "first.log"
    t0 = time.time()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qpexp.cli", *args],
            cwd=root, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            s = _lose_node(proc, log_path, cache2, node, before)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
    s.update(rc=proc.returncode, first=log_path.read_text(), first_seconds=time.time() - t0)
    s["first_records"] = {
        k: read_record(d) for k, d in _points(sweep2).items() if (d / "record.json").exists()
    }
    s["first_frontier"] = json.loads((sweep2 / "frontier.json").read_text()) if s["rc"] == 0 else None
    s["mtimes"] = {k: (d / "record.json").stat().st_mtime_ns for k, d in _points(sweep2).items()}
    before, t0 = set(jobs()), time.time()
    second = run_cli(args, cwd=root, env=ENV, timeout=600, check=False)
    s.update(
        second=second, second_seconds=time.time() - t0, second_jobs=[k for k in jobs() if k not in before]
    )
    s.update(sweep=sweep2, cache=cache2, points=_points(sweep2))
    return s


def test_lost_node_reported_and_completed_by_resubmission(lost_node):
    s = lost_node
    assert s["rc"] == 0 and "report" in s, s["first"][-4000:]
    print(f"\n[slurm] lost node: first sweep {s['first_seconds']:.0f} s (NODE_FAIL seen {s['seen']:.0f} s after the down), "
          f"re-submission {s['second_seconds']:.0f} s")  # fmt: skip
    c, d = s["tasks"]["c"], s["tasks"]["d"]
    # while the node was down: c's job ended NODE_FAIL (SLURM's accounting), d waited in the queue
    assert s["nodes"].split()[0] == "down"
    assert sacct(c.split("_")[0]) == {c: "NODE_FAIL", d: "COMPLETED"}
    assert s["jobs_down"][d]["JobState"] == "PENDING"
    # ... and the sweep said so at once: c's point by name with its job and state, the progress line
    # counting it failed (not running), its folder holding a failed record with the reason
    assert NODE_FAIL_LINE.search(s["report"]).group(1) == c
    assert "re-submit the same command to run it again" in s["report"]
    assert "[sweep] 1/2 done, 1 failed, 0 running" in s["report"]
    failed = s["first_records"]["c"]
    assert (
        failed["status"] == "failed" and failed["error"] == f"SLURM job {c} ended NODE_FAIL without a result"
    )
    # the node back, d ran and the sweep ended: c listed as failed in the frontier, d on it
    first = s["first"]
    assert "[sweep] 2/2 done, 1 failed, 0 running" in first
    assert s["first_records"]["d"]["status"] == "not_deployed"
    fr = s["first_frontier"]
    assert [(Path(f["run_dir"]).name, f["status"], f["error"]) for f in fr["failed"]] == [
        (s["points"]["c"].name, "failed", failed["error"])
    ]
    assert f"FAILED: {fr['failed'][0]['run_dir']}: SLURM job {c} ended NODE_FAIL" in first
    # the same command again: c alone ran (d's complete record was reused), resuming its QAT checkpoint
    out = s["second"].stdout
    assert s["second"].returncode == 0, out[-3000:] + s["second"].stderr[-3000:]
    assert "[sweep] 2/2 done, 0 failed (1 reused), 0 running" in out and "without a result" not in out
    assert len(s["second_jobs"]) == 2
    assert sacct(s["second_jobs"][0].split("_")[0]) == dict.fromkeys(s["second_jobs"], "COMPLETED")
    recs = {k: read_record(p) for k, p in s["points"].items()}
    assert recs["d"] == s["first_records"]["d"]
    assert (s["points"]["d"] / "record.json").stat().st_mtime_ns == s["mtimes"]["d"]
    rec = recs["c"]
    assert rec["status"] == "not_deployed" and rec["cache/baseline_hit"] and rec["cache/prune_hit"]
    start, epochs = s["resume_from"], LOST["c"][1]
    assert start is not None and start < epochs - 1, start
    rows = list(csv.DictReader((s["points"]["c"] / "csv" / "metrics.csv").open()))
    assert [int(float(r["epoch"])) for r in rows if r.get("qat/train/loss")] == list(range(start + 1, epochs))
    # the final front has every point
    runs = [r for r in csv.DictReader((s["sweep"] / "frontier.csv").open()) if r["point"] == "run"]
    assert sorted((Path(r["run_dir"]).name, r["status"]) for r in runs) == sorted(
        (p.name, "not_deployed") for p in s["points"].values()
    )
    assert json.loads((s["sweep"] / "frontier.json").read_text())["failed"] == []


# -- Optuna trials as SLURM jobs: the search process killed and started again ----------------------
OPTUNA_BITS = (2, 3, 4, 8)  # the four trials, queued in the study in this order (no duplicate points)


def _optuna_args(root: Path) -> list[str]:
    return [
        "sweep=optuna", "baseline.epochs=2", "prune.steps=1", "prune.finetune_epochs=1", "quant.epochs=8",
        "quant.calib_batches=2", "logger=none", "hydra/launcher=slurm", "hydra.launcher.mem_gb=1",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10", "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2", f"quant.bits_w=choice({','.join(map(str, OPTUNA_BITS))})",
        "prune.ratio=choice(0.5)", "prune.scope=choice(global)", "prune.criterion=choice(l1)",
        f"cache_dir={root / 'cache'}", f"hydra.sweep.dir={root / 'sweep'}",
    ]  # fmt: skip


def _study(db: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="qpexp", storage=f"sqlite:///{db}")


def _kill_mid_study(proc, db: Path, before: set) -> dict:
    """Poll the first search: once two trials are finished and the next two run as SLURM jobs (the
    search's second job array), kill the search process (SIGKILL: no handler runs); its jobs run on."""
    from optuna.trial import TrialState

    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.3)
        try:
            states = [t.state for t in _study(db).get_trials(deepcopy=False)]
        except Exception:  # the study is being created
            continue
        new = {k: j for k, j in jobs().items() if k not in before}
        arrays = sorted({j["ArrayJobId"] for j in new.values() if j.get("ArrayJobId")}, key=int)
        second = sorted(
            k for k, j in new.items() if j["JobState"] == "RUNNING" and j.get("ArrayJobId") == arrays[-1]
        )
        if states.count(TrialState.COMPLETE) == 2 and states.count(TrialState.RUNNING) == 2:
            if len(arrays) == 2 and len(second) == 2:
                os.killpg(proc.pid, signal.SIGKILL)
                return {"killed": time.time(), "killed_jobs": second}
    return {}


def _killed_search(root: Path, args: list[str]) -> dict:
    """The study created with the four trials queued, the search started and killed mid-study: when,
    its jobs running then, the trials as it left them."""
    import optuna

    db = root / "sweep" / "optuna.db"
    db.parent.mkdir()
    study = optuna.create_study(
        storage=f"sqlite:///{db}", study_name="qpexp", directions=["maximize", "maximize"]
    )
    for bits in OPTUNA_BITS:
        study.enqueue_trial(
            {"quant.bits_w": bits, "prune.ratio": 0.5, "prune.scope": "global", "prune.criterion": "l1"}
        )
    before, t0 = set(jobs()), time.time()
    with (root / "first.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qpexp.cli", *args],
            cwd=root, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            k = _kill_mid_study(proc, db, before)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert k, (root / "first.log").read_text()[-4000:]
    k.update(
        db=db, after_s=k["killed"] - t0, trials={t.number: t for t in _study(db).get_trials(deepcopy=True)}
    )
    return k


def test_optuna_trials_on_slurm_continue_after_the_search_is_killed(slurm_cluster, tmp_path):
    from optuna.trial import TrialState

    args = _optuna_args(tmp_path)
    k = _killed_search(tmp_path, args)
    db, first = k["db"], k["trials"]
    done = {n for n, t in first.items() if t.state == TrialState.COMPLETE}
    assert sorted(t.state.name for t in first.values()) == ["COMPLETE", "COMPLETE", "RUNNING", "RUNNING"]
    mtimes = {n: (Path(first[n].user_attrs["run_dir"]) / "record.json").stat().st_mtime_ns for n in done}
    before2, t1 = set(jobs()), time.time()
    second = run_cli(args, cwd=tmp_path, env=ENV, timeout=600)
    print(
        f"\n[slurm] optuna: killed after {k['after_s']:.0f} s, the search started again took {time.time() - t1:.0f} s"
    )
    out = second.stdout + second.stderr
    assert "2 finished, 2 interrupted (run again), 0 new trial(s)" in out, out[-3000:]
    # the killed search's jobs ran on to the end; the search started again submitted one array of two
    # jobs, for the two interrupted trials only
    killed = k["killed_jobs"]
    assert sacct(killed[0].split("_")[0]) == dict.fromkeys(killed, "COMPLETED")
    new = sorted(j for j in jobs() if j not in before2)
    assert len(new) == 2 and sacct(new[0].split("_")[0]) == dict.fromkeys(new, "COMPLETED")
    trials = _study(db).get_trials(deepcopy=True)
    assert [t.number for t in trials] == [0, 1, 2, 3] and {t.state for t in trials} == {TrialState.COMPLETE}
    assert [t.params["quant.bits_w"] for t in trials] == list(OPTUNA_BITS)
    for n in done:  # the completed trials as they were: not run again, their points' records untouched
        assert (trials[n].values, trials[n].datetime_complete) == (
            first[n].values,
            first[n].datetime_complete,
        )
        assert (Path(trials[n].user_attrs["run_dir"]) / "record.json").stat().st_mtime_ns == mtimes[n]
    for t in trials:
        rec = read_record(Path(t.user_attrs["run_dir"]))
        assert (
            rec["status"] == "not_deployed" and rec["config"]["quant"]["bits_w"] == t.params["quant.bits_w"]
        )
        assert t.values == [rec["final/val_acc"], rec["final/compression_ratio"]]
    # each point's QAT trained once (one cache entry each), the baseline and the pruned model once
    cache = tmp_path / "cache"
    assert [len(list(cache.glob(f"{st}-*/meta.json"))) for st in ("baseline", "prune", "qat")] == [1, 1, 4]
    assert "[sweep] 2/2 done, 0 failed" in out and "[optuna] 4 complete, 0 failed" in out
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["trials"] == {"complete": 4, "fail": 0, "running": 0}


# -- DDP ranks started by the cluster -------------------------------------------------------------
def _ddp(tmp: Path, name: str, launch: list[str], ranks_by: str) -> dict:
    """``trainer=ddp`` over 2 CPU ranks (gloo), the ranks started by ``launch`` (SLURM, torchrun) or,
    with ``launch=[]``, by qpexp itself; every rank dumps its model after each stage."""
    run_dir, cache, dump = tmp / name, tmp / f"{name}-cache", tmp / f"{name}-dump"
    args = [
        *DDP_ARGS, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        f"cache_dir={cache}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    cmd = [*launch, "-m", "qpexp.cli", *args] if launch else [sys.executable, "-m", "qpexp.cli", *args]
    env = {**os.environ, "QPEXP_THREADS": "1", "QPEXP_DDP_DUMP": str(dump)}
    p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{ranks_by}: {p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return {"rec": read_record(run_dir), "dump": dump, "cache": cache, "out": p.stdout + p.stderr}


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp-qpexp")
    return _ddp(tmp, "qpexp", [], "qpexp")


def _same_as_qpexp_started(run: dict, ref: dict) -> None:
    rec = run["rec"]
    assert rec["status"] == "not_deployed" and rec["ddp/world_size"] == 2
    assert rec["ddp/baseline_identical"] and rec["ddp/prune_identical"] and rec["ddp/qat_identical"]
    for stage in ("baseline", "prune", "qat"):  # both ranks bit-identical, and equal to qpexp's ranks
        a = torch.load(run["dump"] / f"{stage}-rank0.pt", weights_only=True)
        b = torch.load(run["dump"] / f"{stage}-rank1.pt", weights_only=True)
        r = torch.load(ref["dump"] / f"{stage}-rank0.pt", weights_only=True)
        assert a.keys() == b.keys() == r.keys(), stage
        assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], r[k]) for k in a), stage
    assert numbers(rec) == numbers(ref["rec"])  # the same record, number for number
    # rank 0 alone wrote the cache: one complete entry per stage, nothing half-written
    entries = sorted(p.parent.name.split("-")[0] for p in run["cache"].glob("*/meta.json"))
    assert entries == ["baseline", "prune", "qat"]
    assert not list(run["cache"].rglob("*.tmp")) and not list(run["cache"].rglob("*.ckpt"))


def test_ddp_ranks_started_by_slurm_tasks(slurm_cluster, ddp_reference, tmp_path):
    srun = ["srun", "--label", "-N1", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=2G", sys.executable]
    run = _ddp(tmp_path, "srun", srun, "srun")
    # SLURM started both ranks (srun labels each line with its task): qpexp started none
    assert re.search(r"^0: .*DDP: rank 0 of 2 \(gloo\)", run["out"], re.M), run["out"][-3000:]
    assert re.search(r"^1: .*DDP: rank 1 of 2 \(gloo\)", run["out"], re.M), run["out"][-3000:]
    _same_as_qpexp_started(run, ddp_reference)


def test_ddp_ranks_started_by_torchrun(ddp_reference, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
        "--master-addr=127.0.0.1", f"--master-port={port}",
    ]  # fmt: skip
    run = _ddp(tmp_path, "torchrun", torchrun, "torchrun")
    assert "DDP: rank 0 of 2 (gloo)" in run["out"] and "DDP: rank 1 of 2 (gloo)" in run["out"]
    _same_as_qpexp_started(run, ddp_reference)

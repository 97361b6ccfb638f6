"""Sweep points whose cluster job ended without a result.

A SLURM job can end without running its point to the end: its node was lost (``NODE_FAIL``, when
the job may not be requeued), it was cancelled, ran out of memory, or ran out of time after its last
requeue. submitit then has no result for it, and hydra-submitit-launcher, which waits for the jobs
in order, raises at the first such job: the sweep process stops there, no longer waits for the
jobs still queued, writes no frontier, and its progress line counts the job as running forever.

qpexp's SLURM launcher (``hydra/launcher=slurm``, ``hydra_plugins/qpexp_submitit_launcher``) waits
for every job with :func:`wait_all` instead, and makes each such job's point a failed point with
:func:`lost_point`: a failed record naming the job and its SLURM state in the point's folder (the
frontier lists it with that reason; a re-submitted sweep runs it again, a failed record not being a
complete one), its outcome in the sweep's progress log (``[sweep] 2/3 done, 1 failed``) and one
console line. The job's return is the record, as for any point that failed, so the sweep goes on to
its frontier and the Optuna sweeper tells the trial as failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig

from qpexp.io import atomic_write_json, read_json
from qpexp.run.schema import plain_config
from qpexp.run.status import ACCURACY_STANDS
from qpexp.sweep.callbacks import append_progress

log = logging.getLogger("qpexp")


def point_dir(cfg: DictConfig) -> Path:
    """The folder of the sweep point whose composed config (Hydra's sweep config) is ``cfg``."""
    return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)


def _finished_record(run_dir: Path) -> dict | None:
    """The point's record if it finished (its job ended after writing it), else None."""
    try:
        rec = read_json(run_dir / "record.json")
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("status") in ACCURACY_STANDS else None


def lost_point(cfg: DictConfig, num: int, why: str, label: str = "") -> dict:
    """The record of sweep point ``num`` (composed config ``cfg``, overrides ``label``) whose job
    ended without a result, ``why`` saying how: the record the point wrote if it finished, else a
    failed record (``status: failed``, ``error: why``, the point's ``config``) written to its folder.
    The outcome goes to the sweep's progress log, and one line names the point on the console."""
    run_dir = point_dir(cfg)
    rec = _finished_record(run_dir)
    if rec is None:
        rec = {"status": "failed", "error": why}
        try:
            rec["config"] = plain_config(cfg)
        except Exception as e:  # the frontier then reads the point's .hydra/config.yaml, if it started
            log.debug("lost point %s: config not resolved: %s", num, e)
        atomic_write_json(run_dir / "record.json", rec)
        note = "failed; re-submit the same command to run it again"
    else:
        note = f"its record was written ({rec['status']}): kept"
    append_progress(Path(str(cfg.hydra.sweep.dir)) / ".qpexp", num, rec["status"])
    print(f"[sweep] #{num} {label or run_dir.name}: {why}: {note}", flush=True)
    return rec


def wait_all(jobs: Sequence, on_lost: Callable[[int, object], object], poll_s: float = 1.0) -> list:
    """The first task's result of each submitit job, in submission order, each taken as soon as its
    job ends; for a job that ended without a result (submitit's ``UncompletedJobError``),
    ``on_lost(index, job)``. A job whose function raised re-raises here, as submitit's
    ``results()`` does."""
    from submitit.core.utils import UncompletedJobError

    out: list = [None] * len(jobs)
    left = list(range(len(jobs)))
    while left:
        for i in [i for i in left if jobs[i].done()]:
            left.remove(i)
            try:
                out[i] = jobs[i].results()[0]
            except UncompletedJobError:
                out[i] = on_lost(i, jobs[i])
        if left:
            time.sleep(poll_s)
    return out

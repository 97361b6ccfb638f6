"""Hydra callbacks: validate every sweep point before the first trains; aggregate the frontier at the end."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("qpexp")


class FrontierCallback(Callback):
    """Before a multirun: validate every point. After it: ``qpexp.frontier.write_frontier`` on the
    sweep folder (frontier.csv, frontier.png, frontier.json and the frontier W&B run).

    Options (``+hydra.callbacks.frontier.reference=CSV``, ``+hydra.callbacks.frontier.wandb=true``):
    ``reference``, a CSV front drawn beside qpexp's (default ``$QPEXP_FRONTIER_REFERENCE``; a missing
    file is skipped with a warning); ``wandb``, None logs the frontier W&B run when the points logged
    to W&B, True/False force it.
    """

    def __init__(self, reference: str | None = None, wandb: bool | None = None):
        """``reference``: a CSV front drawn beside qpexp's (default: ``$QPEXP_FRONTIER_REFERENCE``);
        ``wandb``: None logs the frontier W&B run when the points logged to W&B."""
        self.reference = reference or os.environ.get("QPEXP_FRONTIER_REFERENCE") or None
        self.wandb = wandb

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """Validate every point (schema and data) before the first one trains; exit 2 on any problem:
        one ``qpexp: error:`` line, then one line per further invalid point."""
        import sys

        from qpexp.errors import full_error
        from qpexp.sweepcheck import check_sweep

        n, problems = check_sweep(config, raise_first=full_error())
        if problems:
            head = f"qpexp: error: {len(problems)} of {n} sweep points invalid, nothing was run"
            if len(problems) == 1:
                print(f"{head}: {problems[0]}", file=sys.stderr)
            else:
                print(f"{head}:", file=sys.stderr)
                for p in problems:
                    print(f"  - {p}", file=sys.stderr)
            sys.exit(2)
        log.info("sweep: %d points validated", n)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from qpexp.frontier import write_frontier

        sweep_dir = Path(config.hydra.sweep.dir)
        reference = self.reference
        if reference and not Path(reference).is_file():
            log.warning("frontier reference %s not found; drawing qpexp's front alone", reference)
            reference = None
        summary = write_frontier([sweep_dir], sweep_dir, reference=reference, wandb=self.wandb)
        print(f"[sweep] frontier: {summary['files']['csv']}, {summary['files']['png']}", flush=True)


def worker_threads(n_jobs, cores: int | None = None) -> int:
    """Torch threads for each of a sweep's parallel workers: the cores shared out, at least one.

    ``n_jobs`` follows joblib: -1 means one worker per core, -2 all cores but one, and so on.
    """
    cores = cores or os.cpu_count() or 1
    try:
        n = int(n_jobs)
    except (TypeError, ValueError):
        n = 1
    workers = n if n > 0 else max(cores + 1 + n, 1)
    return max(cores // max(workers, 1), 1)


def _multirun(config: DictConfig) -> bool:
    return "MULTIRUN" in str(OmegaConf.select(config, "hydra.mode"))


class SweepProgress(Callback):
    """Sweep progress and per-worker threads.

    At the start of a multirun it counts the points (as the basic sweeper expands them) into
    ``<sweep dir>/.qpexp/progress.json``; each finishing job appends its outcome to this run's log
    there and prints ``[sweep] 7/18 done, 1 failed (3 reused), 42 s``; a point whose complete
    record was reused counts as done. Each job that has no ``threads`` set (and no
    ``$QPEXP_THREADS``) gets cores / ``hydra.launcher.n_jobs`` torch threads, so parallel workers
    do not oversubscribe the cores.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        total = None
        if "BasicSweeper" in str(OmegaConf.select(config, "hydra.sweeper._target_") or ""):
            try:
                from qpexp.sweepcheck import sweep_points

                total = len(sweep_points(config))
            except Exception as e:  # progress is a convenience: never stop a sweep over it
                log.debug("sweep progress: cannot count points: %s", e)
        state = sweep_dir / ".qpexp"
        state.mkdir(parents=True, exist_ok=True)
        info = {"run_id": uuid.uuid4().hex[:12], "total": total, "start": time.time()}
        tmp = state / f"progress.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, state / "progress.json")
        n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs")
        threads = config.get("threads") or os.environ.get("QPEXP_THREADS") or worker_threads(n_jobs)
        print(
            f"[sweep] {total if total is not None else '?'} points, {n_jobs or 1} in parallel, "
            f"{threads} torch thread(s) each -> {sweep_dir}",
            flush=True,
        )

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if not _multirun(config):
            return  # a single run keeps all cores
        if config.get("threads") is None and not os.environ.get("QPEXP_THREADS"):
            n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs")
            os.environ["QPEXP_THREADS"] = str(worker_threads(n_jobs))

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        try:
            self._report(config, job_return)
        except Exception as e:  # progress is a convenience: never fail a job over it
            log.debug("sweep progress: %s", e)

    def _report(self, config: DictConfig, job_return) -> None:
        from filelock import FileLock
        from hydra.core.utils import JobStatus

        from qpexp.frontier import ACCURACY_STANDS

        sweep_dir = Path(OmegaConf.select(config, "hydra.sweep.dir") or "")
        state = sweep_dir / ".qpexp"
        if not _multirun(config) or not (state / "progress.json").exists():
            return  # a single run, or a sweep started without this callback
        info = json.loads((state / "progress.json").read_text())
        status = "failed"
        if job_return.status == JobStatus.COMPLETED:
            rv = job_return.return_value
            status = rv.get("status", "ok") if isinstance(rv, dict) else "ok"
            run_dir = Path(OmegaConf.select(config, "hydra.runtime.output_dir") or "")
            rec = run_dir / "record.json"
            if status in ACCURACY_STANDS and rec.exists() and rec.stat().st_mtime < info["start"]:
                status = "reused"
        num = OmegaConf.select(config, "hydra.job.num")
        logfile = state / f"progress-{info['run_id']}.log"
        with FileLock(str(logfile) + ".lock"):
            with logfile.open("a") as f:
                f.write(f"{num} {status}\n")
            lines = logfile.read_text().split()
        outcomes = lines[1::2]
        done, failed = len(outcomes), sum(o not in (*ACCURACY_STANDS, "reused") for o in outcomes)
        reused = sum(o == "reused" for o in outcomes)
        total = info.get("total")
        msg = f"[sweep] {done}/{total if total is not None else '?'} done, {failed} failed"
        if reused:
            msg += f" ({reused} reused)"
        print(f"{msg}, {time.time() - info['start']:.0f} s", flush=True)

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

from qpexp.errors import full_error
from qpexp.run.progress import progress_bar_enabled  # noqa: F401 (qpexp.callbacks' name, as before)
from qpexp.sweep.check import check_sweep, sweep_points
from qpexp.sweep.frontier import ACCURACY_STANDS, write_frontier
from qpexp.sweep.values import SIZES
from qpexp.train.ddp import env_rank

log = logging.getLogger("qpexp")


class FrontierCallback(Callback):
    """Before a multirun: validate every point. After it: ``qpexp.frontier.write_frontier`` on the
    sweep folder (frontier.csv, frontier.png, frontier.json and the frontier W&B run).

    Options (``+hydra.callbacks.frontier.reference=CSV``, ``+hydra.callbacks.frontier.wandb=true``):
    ``reference``, a CSV front drawn beside qpexp's (default ``$QPEXP_FRONTIER_REFERENCE``; a missing
    file is skipped with a warning); ``wandb``, None logs the frontier W&B run when the points logged
    to W&B, True/False force it; ``size`` (``hydra.callbacks.frontier.size=huffman``), the ratio axis:
    ``honest`` (``final/compression_ratio``) or ``huffman`` (``final/compression_ratio_huffman``).
    """

    def __init__(self, reference: str | None = None, wandb: bool | None = None, size: str = "honest"):
        """``reference``: a CSV front drawn beside qpexp's (default: ``$QPEXP_FRONTIER_REFERENCE``);
        ``wandb``: None logs the frontier W&B run when the points logged to W&B."""
        self.reference = reference or os.environ.get("QPEXP_FRONTIER_REFERENCE") or None
        self.wandb = wandb
        if size not in SIZES:  # before any point trains
            raise ValueError(f"hydra.callbacks.frontier.size={size!r} is unknown: use one of {sorted(SIZES)}")
        self.size = size

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """Validate every point (schema and data) before the first one trains; exit 2 on any problem:
        one ``qpexp: error:`` line, then one line per further invalid point."""
        import sys

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
        sweep_dir = Path(config.hydra.sweep.dir)
        reference = self.reference
        if reference and not Path(reference).is_file():
            log.warning("frontier reference %s not found; drawing qpexp's front alone", reference)
            reference = None
        fcfg = config.get("frontier") or {}
        summary = write_frontier(
            [sweep_dir],
            sweep_dir,
            reference=reference,
            wandb=self.wandb,
            size=self.size,
            select=fcfg.get("select", "final/val_acc"),
            include_failed_deploy=bool(fcfg.get("include_failed_deploy", False)),
        )
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


def job_threads(config: DictConfig) -> int | None:
    """Torch threads for one sweep job that sets none itself: the launcher's ``cpus_per_task``
    (submitit), else SLURM's ``$SLURM_CPUS_PER_TASK``, else the cores shared out among joblib's
    ``n_jobs`` workers; None (all cores) when none of them says."""
    cpus = OmegaConf.select(config, "hydra.launcher.cpus_per_task")
    if cpus:
        return int(cpus)
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs")
    return worker_threads(n_jobs) if n_jobs is not None else None


def _multirun(config: DictConfig) -> bool:
    return "MULTIRUN" in str(OmegaConf.select(config, "hydra.mode"))


def _state_dir(config: DictConfig) -> Path:
    return Path(OmegaConf.select(config, "hydra.sweep.dir") or "") / ".qpexp"


def set_sweep_total(sweep_dir: str | Path, total: int | None) -> None:
    """Tell the progress report how many points this sweep runs (a sweeper that knows it late)."""
    path = Path(sweep_dir) / ".qpexp" / "progress.json"
    if path.exists():
        info = json.loads(path.read_text())
        info["total"] = total
        tmp = path.with_name(f"progress.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)


def append_progress(state: Path, num, status: str) -> bool:
    """Append ``<job num> <status>`` to the progress log of the sweep whose state folder is ``state``
    (``running`` as a job starts, its outcome as it ends); False for a sweep started without
    :class:`SweepProgress` (no ``progress.json``)."""
    from filelock import FileLock

    if not (state / "progress.json").exists():
        return False
    info = json.loads((state / "progress.json").read_text())
    logfile = state / f"progress-{info['run_id']}.log"
    with FileLock(str(logfile) + ".lock"):
        with logfile.open("a") as f:
            f.write(f"{num} {status}\n")
    return True


def sweep_counts(state: Path) -> dict | None:
    """Progress of the sweep whose state folder is ``state``: total, done, failed, reused, running
    and seconds, from ``progress.json`` and this run's log (None before the sweep started)."""
    try:
        info = json.loads((state / "progress.json").read_text())
    except (OSError, ValueError):
        return None
    started, ended = set(), {}
    logfile = state / f"progress-{info['run_id']}.log"
    if logfile.exists():
        for line in logfile.read_text().splitlines():
            num, _, status = line.partition(" ")
            if status == "running":
                started.add(num)
            elif status:
                ended[num] = status

    outcomes = list(ended.values())
    return {
        "total": info.get("total"),
        "done": len(outcomes),
        "failed": sum(o not in (*ACCURACY_STANDS, "reused") for o in outcomes),
        "reused": sum(o == "reused" for o in outcomes),
        "running": len(started - set(ended)),
        "seconds": time.time() - info["start"],
    }


def progress_line(c: dict) -> str:
    """``[sweep] 7/18 done, 1 failed (3 reused), 2 running, 42 s``."""
    total = c["total"] if c["total"] is not None else "?"
    msg = f"[sweep] {c['done']}/{total} done, {c['failed']} failed"
    if c["reused"]:
        msg += f" ({c['reused']} reused)"
    return f"{msg}, {c['running']} running, {c['seconds']:.0f} s"


class _Watcher:
    """In the sweep's own process: prints the progress line whenever it changes (for launchers whose
    jobs print elsewhere, e.g. submitit's log files)."""

    def __init__(self, state: Path, interval: float):
        import threading

        self.state, self.interval = state, interval
        self.stop = threading.Event()
        self.last = None
        self.thread = threading.Thread(target=self._loop, name="qpexp-sweep-progress", daemon=True)
        self.thread.start()

    def poll(self, final: bool = False) -> None:
        c = sweep_counts(self.state)
        if c is None:
            return
        key = (c["done"], c["failed"], c["running"], c["total"])
        if key != self.last or final:
            self.last = key
            print(progress_line(c), flush=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.poll()
            except Exception as e:  # progress is a convenience: never stop a sweep over it
                log.debug("sweep progress: %s", e)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.poll(final=True)


class SweepProgress(Callback):
    """Sweep progress and per-worker threads.

    At the start of a multirun it counts the points (as the basic sweeper expands them; a sweeper
    with ``n_trials`` counts those) into ``<sweep dir>/.qpexp/progress.json``; each job appends its
    start and its outcome to this run's log there, and the progress is printed as
    ``[sweep] 7/18 done, 1 failed (3 reused), 2 running, 42 s``: by each finishing job (joblib's
    workers print to the console), and by the sweep's own process whenever it changes for launchers
    whose jobs print elsewhere (submitit; every ``$QPEXP_PROGRESS_INTERVAL`` seconds, default 5). A
    point whose complete record was reused counts as done. Each job that has no ``threads`` set (and
    no ``$QPEXP_THREADS``) gets :func:`job_threads` torch threads, so parallel workers do not
    oversubscribe the cores.
    """

    def __init__(self):
        self.watcher: _Watcher | None = None

    def __getstate__(self):  # submitit pickles the callbacks into its jobs: not the watcher thread
        return {**self.__dict__, "watcher": None}

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        total = None
        sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_") or "")
        try:
            if "BasicSweeper" in sweeper:
                total = len(sweep_points(config))
            elif OmegaConf.select(config, "hydra.sweeper.n_trials") is not None:
                total = int(OmegaConf.select(config, "hydra.sweeper.n_trials"))
        except Exception as e:  # progress is a convenience: never stop a sweep over it
            log.debug("sweep progress: cannot count points: %s", e)
        state = sweep_dir / ".qpexp"
        state.mkdir(parents=True, exist_ok=True)
        info = {"run_id": uuid.uuid4().hex[:12], "total": total, "start": time.time()}
        tmp = state / f"progress.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, state / "progress.json")
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_") or "")
        threads = config.get("threads") or os.environ.get("QPEXP_THREADS") or job_threads(config) or "all"
        if "submitit" in launcher:
            kind = "SLURM" if "Slurm" in launcher else "local"
            how = f"one submitit {kind} job each"
            interval = float(os.environ.get("QPEXP_PROGRESS_INTERVAL", 5))
            self.watcher = _Watcher(state, interval)
        else:
            how = f"{OmegaConf.select(config, 'hydra.launcher.n_jobs') or 1} in parallel"
        print(
            f"[sweep] {total if total is not None else '?'} points, {how}, "
            f"{threads} torch thread(s) each -> {sweep_dir}",
            flush=True,
        )

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if not _multirun(config):
            return  # a single run keeps all cores
        if config.get("threads") is None and not os.environ.get("QPEXP_THREADS"):
            n = job_threads(config)
            if n:
                os.environ["QPEXP_THREADS"] = str(n)
        try:
            self._log(config, "running")
        except Exception as e:  # progress is a convenience: never fail a job over it
            log.debug("sweep progress: %s", e)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        try:
            self._report(config, job_return)
        except Exception as e:  # progress is a convenience: never fail a job over it
            log.debug("sweep progress: %s", e)

    def _log(self, config: DictConfig, status: str) -> Path | None:
        """Append ``<job num> <status>`` to this run's log (rank 0 of a DDP job only)."""
        state = _state_dir(config)
        if not _multirun(config) or env_rank() != 0:
            return None  # a single run or a DDP rank other than 0
        num = OmegaConf.select(config, "hydra.job.num")
        return state if append_progress(state, num, status) else None

    def _report(self, config: DictConfig, job_return) -> None:
        from hydra.core.utils import JobStatus

        state = _state_dir(config)
        if not (state / "progress.json").exists():
            return
        info = json.loads((state / "progress.json").read_text())
        status = "failed"
        if job_return.status == JobStatus.COMPLETED:
            rv = job_return.return_value
            status = rv.get("status", "ok") if isinstance(rv, dict) else "ok"
            run_dir = Path(OmegaConf.select(config, "hydra.runtime.output_dir") or "")
            rec = run_dir / "record.json"
            if status in ACCURACY_STANDS and rec.exists() and rec.stat().st_mtime < info["start"]:
                status = "reused"
        if self._log(config, status) is not None:
            print(progress_line(sweep_counts(state)), flush=True)

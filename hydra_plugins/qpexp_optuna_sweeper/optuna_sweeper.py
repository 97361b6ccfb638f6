"""Multi-objective search with Optuna as a Hydra sweeper (``qpexp sweep=optuna``).

Why not ``hydra-optuna-sweeper``: its last release (1.3.0) requires ``optuna<3``, and optuna 2.10
cannot open SQLite storage with SQLAlchemy 2 (``AssertionError`` in ``get_current_version``), so its
storage, and with it a search that continues after an interruption, does not work with today's
packages. This sweeper is small and uses optuna's ask-and-tell interface:

- the search space is written in Hydra's sweep syntax (``choice``, ``range``, ``interval``,
  ``tag(log, interval(...))``) in ``hydra.sweeper.params`` or on the command line;
- each batch of ``n_jobs`` trials is run by the configured launcher (joblib, submitit, ...) as
  ordinary sweep points, in sweep folders named by their overrides (the stage cache and complete
  records work as in any sweep);
- the app returns the point's record; the objectives are read from it (``objectives``, record keys);
  a point whose status is not one of :data:`qpexp.frontier.ACCURACY_STANDS`, whose job raised, or
  whose objectives are missing or not finite is told to optuna as **failed**, never as zero;
- the study lives in ``storage`` (SQLite in the sweep folder). Run the same command again and the
  search continues: trials an interrupted search left running are run again (their points resume
  from the stage checkpoints or reuse their complete records) and told under their own numbers, then
  new trials are asked until the study holds ``n_trials`` finished ones. A lock file keeps a second
  search out of the same folder while one runs.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from qpexp.sweep.callbacks import set_sweep_total
from qpexp.sweep.frontier import ACCURACY_STANDS
from qpexp.sweep.space import check_points, parse_space, value_str  # noqa: F401 (this module's names too)

log = logging.getLogger("qpexp")


def complete_params(trial, space: dict):
    """``trial`` with a value for every axis of ``space``: an interrupted search can leave a trial
    running before all its parameters were suggested (they are stored one by one)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    for name, d in space.items():
        if name in trial.params:
            continue
        if isinstance(d, CategoricalDistribution):
            trial.suggest_categorical(name, d.choices)
        elif isinstance(d, IntDistribution):
            trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
        else:
            trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)
    return trial


# -- the sweeper ----------------------------------------------------------------------------------
class QpexpOptunaSweeper(Sweeper):
    def __init__(
        self,
        objectives,
        directions,
        sampler,
        storage,
        study_name: str,
        n_trials: int,
        n_jobs: int,
        params=None,
    ):
        self.objectives = list(objectives)
        self.directions = list(directions)
        if len(self.objectives) != len(self.directions):
            raise ValueError(
                f"hydra.sweeper: {len(self.objectives)} objectives but {len(self.directions)} directions"
            )
        self.sampler_cfg = (
            OmegaConf.to_container(sampler, resolve=True) if OmegaConf.is_config(sampler) else sampler
        )
        self.storage = storage
        self.study_name = study_name
        self.n_trials = int(n_trials)
        self.n_jobs = max(int(n_jobs), 1)
        self.params = params or {}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def _sampler(self, offset: int):
        from hydra.utils import instantiate

        cfg = dict(self.sampler_cfg or {})
        if not cfg:
            return None
        if cfg.get("seed") is not None:
            cfg["seed"] = int(cfg["seed"]) + offset
        return instantiate(cfg)

    def values(self, ret) -> tuple[list[float] | None, str]:
        """The objectives from a job's return value, or None and why the trial failed."""
        from hydra.core.utils import JobStatus

        if ret.status != JobStatus.COMPLETED:
            return None, f"job raised: {ret._return_value!r}"
        rec = ret.return_value
        if not isinstance(rec, dict):
            return None, f"the app returned {type(rec).__name__}, not a record"
        status = rec.get("status")
        if status not in ACCURACY_STANDS:
            return None, f"status {status}: {rec.get('error') or rec.get('status_reason') or ''}".strip()
        out = []
        for key in self.objectives:
            v = rec.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                return None, f"objective {key} is {v!r}"
            out.append(float(v))
        return out, status

    def sweep(self, arguments: list[str]) -> Any:
        import optuna
        from filelock import FileLock, Timeout
        from optuna.trial import Trial, TrialState

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        params = [f"{k}={v}" for k, v in self.params.items()]
        space, fixed = parse_space([*params, *arguments])
        if not space:
            raise ValueError("hydra.sweeper.params: no search space (choice/range/interval) given")
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.sweep_dir / "optuna.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RuntimeError(f"another optuna search runs in {self.sweep_dir}") from None
        try:
            study = optuna.create_study(
                storage=self.storage,
                study_name=self.study_name,
                directions=self.directions,
                load_if_exists=True,
            )
            if [d.name.lower() for d in study.directions] != [d.lower() for d in self.directions]:
                raise ValueError(
                    f"study {self.study_name!r} in {self.storage} optimizes {study.directions}, "
                    f"not {self.directions}: use another sweep folder or hydra.sweeper.study_name"
                )
            trials = study.get_trials(deepcopy=False)
            study.sampler = self._sampler(len(trials)) or study.sampler
            stale = [t for t in trials if t.state == TrialState.RUNNING]  # an interrupted search's
            finished = sum(t.state.is_finished() for t in trials)
            new = max(self.n_trials - finished - len(stale), 0)
            set_sweep_total(self.sweep_dir, len(stale) + new)
            log.info(
                "optuna: study %r in %s: %d finished, %d interrupted (run again), %d new trial(s)",
                self.study_name, self.storage, finished, len(stale), new,
            )  # fmt: skip
            job_idx = len(trials)
            pending = [complete_params(Trial(study, t._trial_id), space) for t in stale]
            while pending or new > 0:
                batch = []
                while pending and len(batch) < self.n_jobs:
                    batch.append(pending.pop(0))
                while new > 0 and len(batch) < self.n_jobs:
                    batch.append(study.ask(space))
                    new -= 1
                overrides = [
                    fixed + [f"{k}={value_str(t.params[k])}" for k in space if k in t.params] for t in batch
                ]
                returns = self.launcher.launch(overrides, initial_job_idx=job_idx)
                job_idx += len(returns)
                for trial, ret in zip(batch, returns):
                    self._tell(study, trial, ret)
            self._write_results(study)
        finally:
            lock.release()

    def _tell(self, study, trial, ret) -> None:
        from optuna.trial import TrialState

        values, why = self.values(ret)
        run_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
        run_dir = run_dir or ret.working_dir or ""  # the point's folder (its record)
        trial.set_user_attr("run_dir", str(run_dir))
        if values is None:
            trial.set_user_attr("error", why[:2000])
            study.tell(trial, state=TrialState.FAIL)
            log.warning("optuna: trial %d failed (%s)", trial.number, why)
            print(f"[optuna] trial {trial.number} failed: {why[:200]}", flush=True)
        else:
            trial.set_user_attr("status", why)
            study.tell(trial, values)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in zip(self.objectives, values))
            print(f"[optuna] trial {trial.number}: {shown}", flush=True)

    def _write_results(self, study) -> None:
        from optuna.trial import TrialState

        done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        front = study.best_trials if done else []
        results = {
            "name": "optuna",
            "study": study.study_name,
            "storage": self.storage,
            "objectives": dict(zip(self.objectives, self.directions)),
            "trials": {
                s.name.lower(): sum(t.state == s for t in study.get_trials(deepcopy=False))
                for s in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)
            },
            "pareto": [
                {"number": t.number, "params": t.params, "values": dict(zip(self.objectives, t.values))}
                for t in sorted(front, key=lambda t: t.number)
            ],
        }
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")
        print(
            f"[optuna] {results['trials']['complete']} complete, {results['trials']['fail']} failed; "
            f"{len(front)} on the Pareto front -> {self.sweep_dir / 'optimization_results.yaml'}",
            flush=True,
        )

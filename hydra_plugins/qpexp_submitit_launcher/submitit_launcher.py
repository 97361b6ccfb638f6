"""hydra-submitit-launcher's SLURM launcher, waiting for every job and reporting the lost ones
(``hydra/launcher=slurm``, ``conf/hydra/launcher/slurm.yaml``).

The upstream launcher submits the points as one job array, then waits for the jobs in order, and
raises at the first job that ended without a result (a lost node, ``scancel``, out of memory, a
time limit after the last requeue): the sweep process stops, the jobs still queued are no longer
waited for and no frontier is written. This one submits the same array (the same ``sbatch`` file,
the same keys) and waits for every job, taking each result as its job ends; a job without a result
makes its point a failed point (:mod:`qpexp.sweep.lost`): a failed record with the job's SLURM state
in the point's folder, its outcome in the progress line, a console line. The sweep goes on to its
frontier, which lists the point with that reason; running the same command again runs it again.

submitit sees that a job ended through ``sacct`` (SLURM's accounting, slurmdbd): on a cluster
without accounting a job that ends without a result is never seen as ended, and the sweep waits.

Imports nothing heavy: Hydra imports every module under ``hydra_plugins`` at each start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf

from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as UpstreamSlurmLauncher

log = logging.getLogger(__name__)


class SlurmLauncher(UpstreamSlurmLauncher):
    """``hydra/launcher=slurm``: upstream's job array, every job waited for, lost jobs failed points."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from qpexp.sweep.lost import wait_all

        jobs = self._submit(job_overrides, initial_job_idx)
        return wait_all(jobs, lambda i, job: self._lost(job_overrides[i], initial_job_idx + i, job))

    def _submit(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
        """The points as one submitit job array: upstream's ``launch`` up to its wait (1.2.0)."""
        import submitit

        assert self.config is not None
        assert len(job_overrides) > 0
        init_keys = {"submitit_folder", "max_num_timeout"}
        init = {f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k == "max_num_timeout"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR, folder=self.params["submitit_folder"], **init
        )
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                x if x in baseparams else f"{self._EXECUTOR}_{x}": y
                for x, y in self.params.items()
                if x not in init_keys
            }
        )
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        job_params: list[Any] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append(
                (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
            )
        return executor.map_array(self, *zip(*job_params))

    def _lost(self, overrides: Sequence[str], num: int, job) -> JobReturn:
        """The return of point ``num``, whose job ended without a result: its failed record."""
        from qpexp.sweep.lost import lost_point, point_dir

        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        why = f"SLURM job {job.job_id} ended {job.state} without a result"
        record = lost_point(cfg, num, why, label=" ".join(filter_overrides(overrides)))
        return JobReturn(
            overrides=list(overrides),
            hydra_cfg=cfg,
            working_dir=str(point_dir(cfg)),
            task_name=str(OmegaConf.select(cfg, "hydra.job.name") or ""),
            status=JobStatus.COMPLETED,
            _return_value=record,
        )

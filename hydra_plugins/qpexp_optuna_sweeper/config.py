"""The sweeper's config (``hydra/sweeper=qpexp_optuna``), registered in Hydra's ConfigStore.

Imports nothing heavy: Hydra imports every module under ``hydra_plugins`` at each start.
"""

from dataclasses import dataclass, field
from typing import Any  # noqa: UP035 (OmegaConf reads these types)

from hydra.core.config_store import ConfigStore


@dataclass
class QpexpOptunaSweeperConf:
    _target_: str = "hydra_plugins.qpexp_optuna_sweeper.optuna_sweeper.QpexpOptunaSweeper"
    _recursive_: bool = False  # the sampler arrives as its config (instantiated per search, seed offset)
    # record keys the search optimizes, read from each point's record (what the app returns): the
    # validation accuracy, never the test split (report the chosen trials' final/test_acc once)
    objectives: list[str] = field(default_factory=lambda: ["final/val_acc", "final/compression_ratio"])
    directions: list[str] = field(default_factory=lambda: ["maximize", "maximize"])
    # any optuna sampler; its seed is offset by the trials already in the study (a continued search
    # does not repeat the first one's random draws)
    sampler: dict[str, Any] = field(
        default_factory=lambda: {"_target_": "optuna.samplers.NSGAIISampler", "seed": 0, "population_size": 8}
    )
    # SQLite in the sweep folder: a search run again with the same folder continues the same study
    storage: str | None = "sqlite:///${hydra.sweep.dir}/optuna.db"
    study_name: str = "qpexp"
    # trials the study should hold when this search ends (a continued search runs only the rest)
    n_trials: int = 12
    # trials asked for and launched together (the launcher runs them in parallel)
    n_jobs: int = 2
    # search space in Hydra's sweep syntax: choice(...), range(start, stop, step), interval(low, high),
    # tag(log, interval(...)); anything else is a fixed override. The command line adds to it.
    params: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/sweeper", name="qpexp_optuna", node=QpexpOptunaSweeperConf, provider="qpexp"
)

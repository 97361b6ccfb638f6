"""Hydra callbacks: validate every sweep point before the first trains; aggregate the frontier at the end."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("qpexp")


class FrontierCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from qpexp.frontier import write_frontier

        sweep_dir = Path(config.hydra.sweep.dir)
        write_frontier([sweep_dir], sweep_dir)

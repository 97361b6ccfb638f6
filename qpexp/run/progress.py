"""Whether a run shows Lightning's progress bar."""

from __future__ import annotations

import os
import sys

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from qpexp.train.ddp import rank


def progress_bar_enabled() -> bool:
    """Lightning's progress bar for a single run in a terminal; off in sweeps, CI, tests and on DDP
    ranks other than 0. ``$QPEXP_PROGRESS`` (1/0) decides when set."""
    forced = os.environ.get("QPEXP_PROGRESS")
    if forced is not None:
        return forced.strip().lower() not in ("", "0", "false", "no", "off")
    if os.environ.get("CI") or os.environ.get("PYTEST_CURRENT_TEST"):
        return False
    if rank() != 0:
        return False
    try:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return False
    except Exception:  # not inside a Hydra app (a notebook): the terminal decides
        pass
    return bool(getattr(sys.stderr, "isatty", lambda: False)())

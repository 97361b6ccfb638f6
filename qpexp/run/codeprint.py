"""The code behind each cached stage: a fingerprint for its cache key, and the git state for the record.

A stage's fingerprint is the qpexp version plus a sha256 over the source of the modules that
determine what the stage produces (:data:`STAGE_SOURCES`, paths inside the ``qpexp`` package; a
folder stands for every ``.py`` file under it). Editing any of them (a new channel-scoring rule, a
changed training loop) changes the stage's cache key, so the stage trains again instead of reusing a
model made by the old code. Later stages chain: the prune key holds the baseline key, the QAT key the
key of the stage before it, so a change behind the baseline retrains everything after it too.

Not covered: a model or data module outside the ``qpexp`` package (``model._target_=mypkg.Net``)
and the installed libraries (their versions are in the record's ``versions``). ``cache_code_fingerprint=false``
computes the keys without the fingerprint, as before it existed: entries cached by older code are then
reused on purpose.

Imports only the standard library.
"""

from __future__ import annotations

import hashlib
import subprocess
from functools import cache
from pathlib import Path

from qpexp import __version__

PACKAGE = Path(__file__).resolve().parents[1]  # the qpexp package (this file is qpexp/run/codeprint.py)

# what every training stage runs: the pipeline and stage loops, data, models, optimizer, DDP, distillation
COMMON = (
    "__init__.py",
    "_aliases.py",
    "run/pipeline.py",
    "run/build.py",
    "run/rank_cache.py",
    "train",
    "data",
    "models",
    "core/__init__.py",
    "core/modules.py",
    "core/resolve.py",
    "core/evaluate.py",
)
STAGE_SOURCES: dict[str, tuple[str, ...]] = {
    "baseline": COMMON,
    # masks, criteria, schedules, channel removal, one-shot methods and their calibration; scope=auto's
    # sensitivity; the accounting behind targets
    "prune": (
        *COMMON,
        "core/prune",
        "core/quant/calibrate.py",
        "core/quant/gptq.py",
        "core/analysis",
        "core/accounting.py",
    ),
    # quantizers, fake-quantize kernels, AdaRound, GPTQ; bits_w=auto's assignment (analysis, accounting)
    "qat": (
        *COMMON,
        "core/quant",
        "core/analysis",
        "core/accounting.py",
        "run/analysis.py",
    ),
}


def source_files(stage: str, root: Path | None = None) -> list[Path]:
    """The ``.py`` files behind ``stage`` under ``root`` (the package by default; sorted, each once)."""
    root = PACKAGE if root is None else root
    files: set[Path] = set()
    for rel in STAGE_SOURCES[stage]:
        p = root / rel
        if p.is_dir():
            files.update(f for f in p.rglob("*.py") if "__pycache__" not in f.parts)
        elif p.is_file():
            files.add(p)
        else:
            raise FileNotFoundError(f"codeprint.STAGE_SOURCES[{stage!r}]: {p} does not exist")
    return sorted(files)


def sources_digest(files: list[Path], root: Path | None = None) -> str:
    """sha256 over each file's path (relative to ``root``, the package by default) and content, in
    the given order: ``path NUL content NUL`` per file."""
    root = PACKAGE if root is None else root
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()


@cache
def stage_fingerprint(stage: str) -> str:
    """``<qpexp version>+<first 16 hex digits of the stage's sources digest>`` (once per process)."""

    return f"{__version__}+{sources_digest(source_files(stage, PACKAGE), PACKAGE)[:16]}"


def code_fingerprints() -> dict[str, str]:
    return {stage: stage_fingerprint(stage) for stage in STAGE_SOURCES}


def git_state(path: Path = PACKAGE) -> tuple[str | None, bool | None]:
    """(HEAD's sha, whether tracked files differ from it) of the checkout holding ``path``; (None, None)
    without git or outside a checkout (an installed package): never raises."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    sha = (git("rev-parse", "HEAD") or "").strip() or None
    if sha is None:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return sha, (bool(status.strip()) if status is not None else None)

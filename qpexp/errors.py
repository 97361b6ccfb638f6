"""The errors a user can fix (a config value, a data file) and how the ``qpexp`` command reports them.

Each is reported as one line, ``qpexp: error: ...``, naming the key (and the file), with exit status
2; the traceback only with ``HYDRA_FULL_ERROR=1``. Imports nothing heavy: a bad config is refused
before torch's training stack or Lightning is loaded.
"""

from __future__ import annotations

import os
import sys
import traceback

# the user's own HYDRA_FULL_ERROR, saved while ``qpexp.cli.main`` sets it so that Hydra re-raises
SAVED_FULL_ERROR = "QPEXP_USER_HYDRA_FULL_ERROR"
_HINTS = (", set env var HYDRA_FULL_ERROR=1 to see chained exception",)
_NOISE = ("object_type=", "reference_type=", "See https://hydra.cc/")


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key."""


class DataError(ValueError):
    """Bad data: the message names the file and the array."""


def full_error() -> bool:
    """Whether the user asked for full tracebacks (``HYDRA_FULL_ERROR=1``)."""
    return os.environ.get(SAVED_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR", "")) == "1"


def is_user_error(e: BaseException) -> bool:
    """A config, override, composition or data error: reported in one line, not as a crash."""
    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(e, (ConfigError, DataError, CompactHydraException, OmegaConfBaseException))


def _bad_override() -> str | None:
    """The first command-line override Hydra's grammar rejects (its parse error names no key)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in sys.argv[1:]:
        if arg.startswith("-"):
            continue
        try:
            parser.parse_override(arg)
        except Exception:
            return arg
    return None


def error_line(e: BaseException) -> str:
    """``e`` as one line: Hydra's and OmegaConf's multi-line messages joined, their hints dropped."""
    from hydra.errors import InstantiationException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    text = str(e).split("\nConfig search path:")[0]
    if isinstance(e.__cause__, OmegaConfBaseException) and not isinstance(e, OmegaConfBaseException):
        text += "\n" + str(e.__cause__)
    for hint in _HINTS:
        text = text.replace(hint, "")
    key, parts, listing = None, [], False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(_NOISE):
            continue
        if line.startswith("full_key:"):
            key = key or line.partition(":")[2].strip()
            continue
        if listing and raw.startswith("\t"):  # "Available options in 'data':" and its tab-indented items
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line
            continue
        listing = line.endswith(":")
        if parts and parts[-1].endswith((".", ":")):
            parts[-1] += " " + line
        else:
            parts.append(line)
    msg = "; ".join(parts) or type(e).__name__
    if isinstance(e, OverrideParseException):
        bad = _bad_override()
        if bad:
            msg = f"override {bad!r}: {msg}"
    elif key and isinstance(e, InstantiationException) and key not in msg:
        msg = f"{key}: {msg}"
    elif key and isinstance(e, OmegaConfBaseException) and key not in msg:
        msg = f"config key {key!r}: {msg}"
    return msg


def report(e: BaseException, code: int = 2):
    """Print ``qpexp: error: <one line>`` and exit ``code``; re-raise under ``HYDRA_FULL_ERROR=1``.

    Call it from an ``except`` block. Errors that are not the user's (bugs) keep their traceback.
    """
    if full_error():
        raise e
    if not is_user_error(e):
        traceback.print_exception(type(e), e, e.__traceback__)
        sys.exit(1)
    print(f"qpexp: error: {error_line(e)}", file=sys.stderr, flush=True)
    sys.exit(code)

"""Resolve a short name or a dotted path to a class: how a new quantizer or criterion plugs in."""

from __future__ import annotations

import importlib


def resolve(name: str, builtins: dict[str, str], key: str):
    """Return the object named by ``name``: a builtin short name or ``package.module.Object``.

    ``builtins`` maps short names to dotted paths, so importing one strategy never imports the others.
    ``key`` is the config key, used in the error message.
    """
    path = builtins.get(name, name)
    if "." not in path:
        raise ValueError(f"{key}={name!r} is not one of {sorted(builtins)} (or a dotted path to a class)")
    mod, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{key}={name!r}: cannot import {path!r} ({e})") from e

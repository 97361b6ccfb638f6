"""The Optuna sweeper's search space from Hydra's override syntax, and the points that check it before
a search (:func:`qpexp.sweep.check.sweep_points`). Here, not in the plugin, so that the plugin
imports qpexp and never the reverse. ``optuna`` is imported where a distribution is built."""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep


def parse_space(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(``{key: optuna distribution}``, fixed overrides) from override strings."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space: dict[str, Any] = {}
    fixed: list[str] = []
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.get_key_element()
        if not o.is_sweep_override():
            fixed.append(o.input_line)
            continue
        v = o.value()
        if isinstance(v, ChoiceSweep):
            space[key] = CategoricalDistribution(tuple(v.list))
        elif isinstance(v, RangeSweep):
            values = list(o.sweep_iterator())
            if all(isinstance(x, int) for x in (v.start, v.stop, v.step)):
                space[key] = IntDistribution(int(values[0]), int(values[-1]), step=int(v.step))
            else:
                space[key] = FloatDistribution(float(values[0]), float(values[-1]), step=float(v.step))
        elif isinstance(v, IntervalSweep):
            log_scale = "log" in (v.tags or set())
            if isinstance(v.start, int) and isinstance(v.end, int):
                space[key] = IntDistribution(v.start, v.end, log=log_scale)
            else:
                space[key] = FloatDistribution(float(v.start), float(v.end), log=log_scale)
        else:
            raise ValueError(f"{o.input_line}: unsupported sweep for the optuna sweeper")
    return space, fixed


def value_str(v) -> str:
    """A suggested value as a Hydra override value."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(round(v, 10))
    s = str(v)
    if any(c in s for c in " ,()[]{}'\"=:"):
        return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return s


def check_points(overrides: list[str]) -> list[list[str]]:
    """Points that put every value of the search space into some config (for validation before the
    search starts): all axes at their first value (low end), then each other choice, range value or
    interval end, one axis at a time."""
    from optuna.distributions import CategoricalDistribution

    space, fixed = parse_space(overrides)

    def values(d) -> list:
        if isinstance(d, CategoricalDistribution):
            return list(d.choices)
        if getattr(d, "step", None) and not getattr(d, "log", False):
            n = int(round((d.high - d.low) / d.step))
            if n <= 64:
                return [d.low + i * d.step for i in range(n + 1)]
        return [d.low, d.high]

    axes = {k: values(d) for k, d in space.items()}
    base = {k: v[0] for k, v in axes.items()}
    points = [base]
    for k, vs in axes.items():
        points += [{**base, k: v} for v in vs[1:]]
    return [fixed + [f"{k}={value_str(v)}" for k, v in p.items()] for p in points]

"""Check every point of a multirun before the first one trains.

Expands the sweep exactly as Hydra's basic sweeper does (the sweep file's ``hydra.sweeper.params``
first, then the command line), composes each point's config, validates it against the typed schema
and loads each distinct data config once. Returns the list of problems, each naming the point.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def sweep_points(config: DictConfig) -> list[list[str]]:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    overrides = [f"{k}={v}" for k, v in params.items()]
    overrides += list(OmegaConf.select(config, "hydra.overrides.task") or [])
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [point for batch in BasicSweeper.split_arguments(parsed, None) for point in batch]


def check_sweep(config: DictConfig) -> tuple[int, list[str]]:
    """(number of points, problems). Composition, schema and data errors are all collected."""
    from hydra.core.global_hydra import GlobalHydra

    from qpexp.data import DataError
    from qpexp.schema import ConfigError, plain_config, validate

    loader = GlobalHydra.instance().config_loader()
    points = sweep_points(config)
    problems: list[str] = []
    seen_data: dict[str, str | None] = {}
    for point in points:
        label = " ".join(point) or "(no overrides)"
        try:
            cfg = loader.load_sweep_config(config, list(point))
            typed = validate(cfg)
        except ConfigError as e:
            problems.append(f"{label}: {e}")
            continue
        except Exception as e:  # composition errors: unknown group option, bad override syntax
            problems.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0]}")
            continue
        key = str(plain_config(cfg).get("data"))
        if key not in seen_data:
            seen_data[key] = None
            try:
                from hydra.utils import instantiate

                instantiate(typed.data).prepare()
            except (DataError, ValueError, OSError) as e:
                seen_data[key] = str(e)
        if seen_data[key]:
            problems.append(f"{label}: {seen_data[key]}")
    return len(points), problems

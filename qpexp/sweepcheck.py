"""Check every point of a multirun before the first one trains.

Expands the sweep exactly as Hydra's basic sweeper does (the sweep file's ``hydra.sweeper.params``
first, then the command line), composes each point's config, validates it against the typed schema,
loads each distinct data config once and builds each distinct model on it (checked on a batch; the
channel-pruning dry run when the point prunes channels). Returns the list of problems, each naming the
point.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def sweep_points(config: DictConfig) -> list[list[str]]:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    overrides = [f"{k}={v}" for k, v in params.items()]
    overrides += list(OmegaConf.select(config, "hydra.overrides.task") or [])
    if "qpexp_optuna_sweeper" in str(OmegaConf.select(config, "hydra.sweeper._target_") or ""):
        from hydra_plugins.qpexp_optuna_sweeper.optuna_sweeper import check_points

        return check_points(overrides)  # every value of the search space in some point
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [point for batch in BasicSweeper.split_arguments(parsed, None) for point in batch]


def check_sweep(config: DictConfig, raise_first: bool = False) -> tuple[int, list[str]]:
    """(number of points, problems): composition, schema and data errors, each as one line naming
    the point and the key. ``raise_first`` re-raises the first one instead (``HYDRA_FULL_ERROR=1``)."""
    from hydra.core.global_hydra import GlobalHydra

    from qpexp.errors import ConfigError, error_line
    from qpexp.schema import check_data_path, plain_config, validate

    loader = GlobalHydra.instance().config_loader()
    points = sweep_points(config)
    problems: list[str] = []
    seen_data: dict[str, str | None] = {}
    seen_model: dict[str, str | None] = {}
    modules: dict = {}
    for point in points:
        label = " ".join(point) or "(no overrides)"
        try:  # composition (unknown group option, bad override), schema, data path and targets
            cfg = loader.load_sweep_config(config, list(point))
            typed = validate(cfg)
        except Exception as e:
            if raise_first:
                raise
            problems.append(f"{label}: {error_line(e)}")
            continue
        plain = plain_config(cfg)
        key = str(plain.get("data"))
        if key not in seen_data:
            seen_data[key] = None
            try:
                from hydra.utils import instantiate

                check_data_path(typed.data)
                modules[key] = instantiate(typed.data).prepare()
            except Exception as e:  # bad arrays, an unreadable file, a bad data option
                if raise_first:
                    raise
                seen_data[key] = error_line(e)
        if seen_data[key]:
            problems.append(f"{label}: {seen_data[key]}")
            continue
        # the model, built and run on the data (and dry-run channel pruning), once per distinct combination
        channel = typed.prune.ratio > 0 and typed.prune.structure == "channel"
        mkey = f"{key}|{plain.get('model')}|{channel}"
        if mkey not in seen_model:
            seen_model[mkey] = None
            try:
                from qpexp.build import check_channel_pruning, make_model

                dm = modules[key]
                model = make_model(typed.model, dm)
                if channel:
                    check_channel_pruning(model, dm.splits["val"][0][:1])
            except ConfigError as e:
                if raise_first:
                    raise
                seen_model[mkey] = error_line(e)
        if seen_model[mkey]:
            problems.append(f"{label}: {seen_model[mkey]}")
    return len(points), problems

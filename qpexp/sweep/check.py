"""Check every point of a multirun before the first one trains.

Expands the sweep exactly as Hydra's basic sweeper does (the sweep file's ``hydra.sweeper.params``
first, then the command line), composes each point's config, validates it against the typed schema,
loads each distinct data config once and builds each distinct model on it (checked on a batch; the
channel-pruning dry run when the point prunes channels). Returns the list of problems, each naming the
point.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from qpexp.errors import ConfigError, error_line
from qpexp.run.build import check_channel_pruning, make_model
from qpexp.run.schema import check_data_path, plain_config, validate
from qpexp.sweep.space import check_points


def sweep_points(config: DictConfig) -> list[list[str]]:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    overrides = [f"{k}={v}" for k, v in params.items()]
    overrides += list(OmegaConf.select(config, "hydra.overrides.task") or [])
    if "qpexp_optuna_sweeper" in str(OmegaConf.select(config, "hydra.sweeper._target_") or ""):
        return check_points(overrides)  # every value of the search space in some point
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [point for batch in BasicSweeper.split_arguments(parsed, None) for point in batch]


def _split_overrides(loader, point: list[str]):
    """(the config-group overrides as written, the value overrides) if every other override sets a
    plain scalar value of an existing key (no ``+``/``~``, no ``hydra.`` key, no dict or list value),
    else None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups, values = [], []
    for o in OverridesParser.create().parse_overrides(point):
        if o.package is None and loader.repository.group_exists(o.key_or_group.replace(".", "/")):
            groups.append(o.input_line)
        elif (
            o.package is not None
            or o.is_add()
            or o.is_force_add()
            or o.is_delete()
            or o.is_hydra_override()
            or isinstance(o.value(), (dict, list))
        ):
            return None
        else:
            values.append(o)
    return tuple(groups), values


def point_configs(config: DictConfig, points: list[list[str]]):
    """Yield ``(point, composed config or the exception)`` per point, as Hydra's sweep composition
    gives them. Points with the same config-group overrides that differ from an already composed
    point only in the values of the same plain keys take its config with their values applied by
    Hydra's own override step (composition is the same up to there): the defaults list is built
    once per distinct set of groups and keys, not per point."""
    import copy

    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    composed: dict[tuple, DictConfig] = {}
    for point in points:
        try:
            split = _split_overrides(loader, list(point))
            sig = None if split is None else (split[0], tuple(sorted(o.key_or_group for o in split[1])))
            values = None if split is None else split[1]
            if sig is not None and sig in composed:
                cfg = copy.deepcopy(composed[sig])
                ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
            else:
                cfg = loader.load_sweep_config(config, list(point))
                if sig is not None:
                    composed[sig] = copy.deepcopy(cfg)
        except Exception as e:
            yield point, e
            continue
        yield point, cfg


def check_sweep(config: DictConfig, raise_first: bool = False) -> tuple[int, list[str]]:
    """(number of points, problems): composition, schema and data errors, each as one line naming
    the point and the key. ``raise_first`` re-raises the first one instead (``HYDRA_FULL_ERROR=1``)."""
    points = sweep_points(config)
    problems: list[str] = []
    seen_data: dict[str, str | None] = {}
    seen_model: dict[str, str | None] = {}
    modules: dict = {}
    for point, cfg in point_configs(config, points):
        label = " ".join(point) or "(no overrides)"
        try:  # composition (unknown group option, bad override), schema, data path and targets
            if isinstance(cfg, Exception):
                raise cfg
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

"""W&B views: config axes on every point run, native frontier charts, and a saved workspace.

- :func:`point_axes`: the config axes of a point (``bits_w``, ``ratio``, ``scope``, ...) as TOP-LEVEL
  config keys, so a W&B workspace can group, filter and plot by them (the nested config stays too);
  :func:`qpexp.tracking.make_tracker` adds them to every point run.
- :func:`frontier_charts`: what the frontier run logs beside its table and image: a table of every
  front's config means (``frontier/points``), scatters coloured by weight bits and by front, and one
  line per Pareto front (``wandb.plot.line_series``).
- ``qpexp-wandb-workspace``: a saved W&B workspace for a project (``wandb-workspaces``), when online:
  the frontier scatter across sweeps, parallel coordinates over bits/ratio/scope -> accuracy/ratio,
  per-layer sparsity bars, and the sensitivity heatmap where a run logged one. Offline it refuses in
  one line (exit 2); ``--dry-run`` prints the workspace spec without a server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ACC, RATIO, BOPS = "final/test_acc", "final/compression_ratio", "final/bops"
# top-level config key -> (section, key) in the nested config
AXIS_KEYS = {
    "bits_w": ("quant", "bits_w"),
    "bits_a": ("quant", "bits_a"),
    "ratio": ("prune", "ratio"),
    "scope": ("prune", "scope"),
    "criterion": ("prune", "criterion"),
    "structure": ("prune", "structure"),
    "schedule": ("prune", "schedule"),
    "target_ratio": ("quant", "target_ratio"),  # quant.bits_w=auto
    "granularity": ("quant", "granularity"),
    "quant_scheme": ("quant", "scheme"),
    "quant_range": ("quant", "range"),
    "quant_epochs": ("quant", "epochs"),
    "dataset": ("data", "name"),
}
POINTS_TABLE = "frontier/points"  # logged by the frontier run (frontier_charts)
FRONTS_CHART = "frontier/fronts"  # line_series: its table lands under "frontier/fronts_table"
LAYERS_TABLE = "layers/sparsity_table"  # logged by every point run (qpexp.tracking.Tracker.log_layers)
SENSITIVITY_TABLE = "sensitivity/table"  # columns layer, setting, acc_drop (a heatmap where present)
ONLINE_MODES = ("online", "run", "shared")


# -- point runs ------------------------------------------------------------------------------------
def point_axes(config: dict, sweep: str | None = None) -> dict:
    """The config axes of one point as flat top-level keys (values as in the nested config)."""
    cfg = config or {}
    out = {}
    for key, (section, name) in AXIS_KEYS.items():
        sec = cfg.get(section)
        if isinstance(sec, dict) and name in sec:
            out[key] = sec[name]
    if out.get("target_ratio") is None:  # an axis of quant.bits_w=auto only
        out.pop("target_ratio", None)
    model = cfg.get("model")
    if isinstance(model, dict) and model.get("_target_"):
        out["arch"] = str(model["_target_"]).rsplit(".", 1)[-1]
    quant = cfg.get("quant") if isinstance(cfg.get("quant"), dict) else {}
    if quant:
        out["mixed_precision"] = bool(
            quant.get("bits_w") == "auto"
            or quant.get("overrides")
            or quant.get("first_bits") is not None
            or quant.get("last_bits") is not None
        )
    bits, ratio = out.get("bits_w"), out.get("ratio")
    if bits is not None or ratio is not None:
        out["dense"] = (bits is None or bits != "auto" and bits >= 32) and not ratio
    if sweep:
        out["sweep"] = sweep
    return out


# -- the frontier run's charts ---------------------------------------------------------------------
def _bits_label(bits) -> str:
    if bits is None:
        return "?"
    try:
        b = float(bits)
    except (TypeError, ValueError):
        return str(bits)
    return "fp32" if b >= 32 else f"w{b:g}"


POINT_COLUMNS = [
    "front",
    "config",
    "bits",
    "bits_w",
    "ratio",
    "scope",
    "n",
    "test_acc",
    "acc_std",
    "compression_ratio",
    "bops",
    "latency_ms",
    "size_bits",
    "pareto",
    "status",
]


def points_rows(view: dict) -> list[list]:
    """One row per config mean of every front (sweeps and reference) of a dashboard view."""
    rows = []
    for f in view.get("fronts", []):
        for g in f["groups"]:
            ax = g.get("axes") or {}
            rows.append(
                [
                    f["name"],
                    g["label"],
                    _bits_label(g.get("bits")),
                    g.get("bits"),
                    ax.get("prune.ratio", ax.get("target_sparsity")),
                    g.get("scope") if g.get("scope") is None else str(g.get("scope")),
                    g.get("n"),
                    g.get("acc"),
                    g.get("acc_std"),
                    g.get("ratio"),
                    g.get("bops"),
                    g.get("latency_ms"),
                    g.get("size_bits"),
                    bool(g.get("pareto")),
                    ",".join(g.get("statuses") or []),
                ]
            )
    return rows


def fronts_series(view: dict) -> tuple[list[list[float]], list[list[float]], list[str]]:
    """Each front's Pareto points sorted by ratio: (xs, ys, names) for ``wandb.plot.line_series``."""
    xs, ys, keys = [], [], []
    for f in view.get("fronts", []):
        front = sorted(
            (g for g in f["groups"] if g.get("pareto") and g.get("ratio")), key=lambda g: g["ratio"]
        )
        if front:
            xs.append([g["ratio"] for g in front])
            ys.append([g["acc"] for g in front])
            keys.append(f["name"])
    return xs, ys, keys


def frontier_charts(view: dict | None) -> dict:
    """Native W&B charts of a dashboard view (see :func:`qpexp.dashboard.build_view`), to ``run.log``."""
    import wandb

    if not view:
        return {}
    table = wandb.Table(columns=POINT_COLUMNS, data=points_rows(view), allow_mixed_types=True)
    axis = {"x-axis-title": "compression ratio", "y-axis-title": "test accuracy"}
    out = {
        POINTS_TABLE: table,
        # the area-under-curve preset draws one point mark per row coloured by a column (groupKeys);
        # the scatter preset colours by y only
        "frontier/scatter_by_bits": wandb.plot_table(
            "wandb/area-under-curve/v0",
            table,
            {"x": "compression_ratio", "y": "test_acc", "groupKeys": "bits"},
            {"title": "config means, coloured by weight bits", **axis},
        ),
        "frontier/scatter_by_front": wandb.plot_table(
            "wandb/area-under-curve/v0",
            table,
            {"x": "compression_ratio", "y": "test_acc", "groupKeys": "front"},
            {"title": "config means, coloured by front", **axis},
        ),
    }
    xs, ys, keys = fronts_series(view)
    if keys:
        out[FRONTS_CHART] = wandb.plot.line_series(
            xs,
            ys,
            keys=keys,
            title="Pareto fronts (test acc vs compression ratio)",
            xname="compression ratio",
        )
    return out


# -- the workspace ---------------------------------------------------------------------------------
def build_workspace(
    entity: str,
    project: str,
    name: str = "qpexp: compression trade-offs",
    groups=(),
    layers=(),
    sensitivity: str | None = None,
):
    """A ``wandb_workspaces`` Workspace (not saved) with the reviewer's panels; see the module doc."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    sections = [_frontier_section(wr, ws), _tradeoffs_section(wr, ws), _layer_section(wr, ws, layers)]
    if sensitivity:
        sections.append(_sensitivity_section(wr, ws, sensitivity))
    filters = [expr.Metric("Group").isin(list(groups))] if groups else ""
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=sections,
        runset_settings=ws.RunsetSettings(
            filters=filters, pinned_columns=[f"summary:{ACC}", f"summary:{RATIO}"]
        ),
    )


def _table_chart(wr, title, table_key, preset, fields, strings=None):
    """A custom chart (Vega ``preset``) over the logged table ``table_key``."""
    return wr.CustomChart(
        query={"summaryTable": {"tableKey": table_key}},
        chart_name=preset,
        chart_fields=fields,
        chart_strings={"title": title, **(strings or {})},
    )


def _frontier_section(wr, ws):
    """Every point's accuracy against its ratio, the fronts' config means and the Pareto fronts."""
    axis = {"x-axis-title": "compression ratio", "y-axis-title": "test accuracy"}
    return ws.Section(
        name="Frontier across sweeps",
        is_open=True,
        panels=[
            wr.ScatterPlot(
                title="test accuracy vs compression ratio (every point run)",
                x=wr.SummaryMetric(RATIO),
                y=wr.SummaryMetric(ACC),
                log_x=True,
            ),
            _table_chart(
                wr,
                "config means of every front, by front (frontier runs)",
                POINTS_TABLE,
                "wandb/area-under-curve/v0",
                {"x": "compression_ratio", "y": "test_acc", "groupKeys": "front"},
                axis,
            ),
            _table_chart(
                wr,
                "config means, by weight bits (frontier runs)",
                POINTS_TABLE,
                "wandb/area-under-curve/v0",
                {"x": "compression_ratio", "y": "test_acc", "groupKeys": "bits"},
                axis,
            ),
            _table_chart(
                wr,
                "Pareto fronts",
                f"{FRONTS_CHART}_table",
                "wandb/lineseries/v0",
                {"step": "step", "lineKey": "lineKey", "lineVal": "lineVal"},
                {"xname": "compression ratio"},
            ),
        ],
    )


def _tradeoffs_section(wr, ws):
    """The config axes against accuracy and compression, and accuracy against BOPs."""
    return ws.Section(
        name="Trade-offs",
        is_open=True,
        panels=[
            wr.ParallelCoordinatesPlot(
                title="bits / ratio / scope -> accuracy / compression",
                columns=[
                    wr.ParallelCoordinatesPlotColumn(metric=wr.Config("bits_w"), display_name="weight bits"),
                    wr.ParallelCoordinatesPlotColumn(metric=wr.Config("ratio"), display_name="pruning ratio"),
                    wr.ParallelCoordinatesPlotColumn(metric=wr.Config("scope"), display_name="scope"),
                    wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(ACC), display_name="test acc"),
                    wr.ParallelCoordinatesPlotColumn(
                        metric=wr.SummaryMetric(RATIO), display_name="compression ratio", log=True
                    ),
                ],
            ),
            wr.ScatterPlot(
                title="test accuracy vs BOPs (every point run)",
                x=wr.SummaryMetric(BOPS),
                y=wr.SummaryMetric(ACC),
                log_x=True,
            ),
        ],
    )


def _layer_section(wr, ws, layers):
    """The pruned fraction per layer of every point run (when ``layers`` are named) and the table's."""
    layer_panels = []
    if layers:
        layer_panels.append(
            wr.BarPlot(
                title="pruned fraction per layer (every point run)",
                metrics=[wr.SummaryMetric(f"layers/{n}/sparsity") for n in layers],
                orientation="v",
            )
        )
    layer_panels.append(
        _table_chart(
            wr,
            "realized sparsity per layer",
            LAYERS_TABLE,
            "wandb/bar/v0",
            {"label": "layer", "value": "sparsity"},
        )
    )
    return ws.Section(name="Per-layer sparsity", is_open=True, panels=layer_panels)


def _sensitivity_section(wr, ws, sensitivity: str):
    """The accuracy drop per layer and setting, from the table ``sensitivity``."""
    return ws.Section(
        name="Sensitivity",
        is_open=True,
        panels=[
            _table_chart(
                wr,
                "accuracy drop per layer and setting",
                sensitivity,
                "wandb/confusion_matrix/v1",
                {"Actual": "layer", "Predicted": "setting", "nPredictions": "acc_drop"},
            )
        ],
    )


def workspace_spec(workspace) -> dict:
    """The workspace as the JSON W&B stores (what ``save`` sends), built without a server."""
    return json.loads(workspace._to_model().model_dump_json(by_alias=True, exclude_none=True))


def _local_hints(sweep_dirs) -> tuple[list[str], list[str], bool]:
    """Layer names, W&B groups and whether a sensitivity table exists, from local sweep folders."""
    layers, groups, sens = [], [], False
    for d in sweep_dirs:
        d = Path(d)
        for rec_path in sorted(d.rglob("record.json")):
            try:
                rec = json.loads(rec_path.read_text())
            except ValueError:
                continue
            for k in rec:
                if k.startswith("layers/") and k.endswith("/sparsity"):
                    n = k[len("layers/") : -len("/sparsity")]
                    if n not in layers:
                        layers.append(n)
                sens = sens or k.startswith("sensitivity/")
            g = ((rec.get("config") or {}).get("logger") or {}).get("group") or d.name
            if g not in groups:
                groups.append(g)
    return layers, groups, sens


def _remote_hints(api, path: str) -> tuple[list[str], bool]:
    """Layer names and whether a sensitivity table exists, from a few of the project's runs."""
    layers, sens = [], False
    for i, run in enumerate(api.runs(path, per_page=50)):
        if i >= 50:
            break
        keys = list(run.summary.keys())
        for k in keys:
            if k.startswith("layers/") and k.endswith("/sparsity"):
                n = k[len("layers/") : -len("/sparsity")]
                if n not in layers:
                    layers.append(n)
        sens = sens or any(k == SENSITIVITY_TABLE for k in keys)
    return layers, sens


def _parser() -> argparse.ArgumentParser:
    """The ``qpexp-wandb-workspace`` command line."""
    p = argparse.ArgumentParser(
        prog="qpexp-wandb-workspace",
        description="Create a saved W&B workspace for a qpexp project (needs W&B online: WANDB_MODE=online "
        "and `wandb login`; sync offline sweeps first with `wandb sync`).",
    )
    p.add_argument("--project", default="qpexp", help="W&B project (default qpexp)")
    p.add_argument("--entity", help="W&B entity (default: the API key's default entity)")
    p.add_argument("--name", default="qpexp: compression trade-offs", help="the workspace's name")
    p.add_argument("--group", action="append", default=[], help="only these W&B groups (sweeps); repeatable")
    p.add_argument("--sweep", action="append", default=[], help="a local sweep folder: its layers and group")
    p.add_argument(
        "--layers", help="comma-separated layer names for the per-layer bars (default: discovered)"
    )
    p.add_argument(
        "--sensitivity",
        nargs="?",
        const=SENSITIVITY_TABLE,
        help=f"add the sensitivity heatmap of this table key (default {SENSITIVITY_TABLE}; discovered online)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the workspace spec (JSON); save nothing")
    return p


def cli(argv=None) -> int:
    """``qpexp-wandb-workspace``: print the workspace's spec (``--dry-run``) or save it online; 0, or 2
    when W&B is not online or refuses."""
    a = _parser().parse_args(argv)
    layers = [x for x in (a.layers or "").split(",") if x]
    groups = list(a.group)
    sensitivity = a.sensitivity
    if a.sweep:
        ll, gg, ss = _local_hints(a.sweep)
        layers = layers or ll
        groups = groups or gg
        sensitivity = sensitivity or (SENSITIVITY_TABLE if ss else None)
    mode = os.environ.get("WANDB_MODE", "offline")  # qpexp's default: offline unless WANDB_MODE says so
    if a.dry_run:
        w = build_workspace(a.entity or "ENTITY", a.project, a.name, groups, layers, sensitivity)
        print(json.dumps(workspace_spec(w), indent=1))
        return 0
    if mode not in ONLINE_MODES:
        print(
            f"qpexp-wandb-workspace: W&B is {mode} (WANDB_MODE={os.environ.get('WANDB_MODE', 'unset')}): "
            "nothing saved; `wandb sync` the sweep, then rerun with WANDB_MODE=online after `wandb login` "
            "(or --dry-run)",
            file=sys.stderr,
        )
        return 2
    return _save(a, groups, layers, sensitivity)


def _save(a: argparse.Namespace, groups: list[str], layers: list[str], sensitivity: str | None) -> int:
    """Build the workspace (layers and the sensitivity table found in the project's runs when not given),
    save it and print its URL; 2 and one line on stderr when W&B refuses."""
    try:
        import wandb

        api = wandb.Api(timeout=30)
        entity = a.entity or api.default_entity
        if not layers or sensitivity is None:
            rl, rs = _remote_hints(api, f"{entity}/{a.project}")
            layers = layers or rl
            sensitivity = sensitivity or (SENSITIVITY_TABLE if rs else None)
        w = build_workspace(entity, a.project, a.name, groups, layers, sensitivity)
        w.save()
    except Exception as e:  # no key, no server, no project: one line, not a traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"qpexp-wandb-workspace: W&B refused: {type(e).__name__}: {msg}", file=sys.stderr)
        return 2
    print(w.url)
    return 0


if __name__ == "__main__":
    sys.exit(cli())

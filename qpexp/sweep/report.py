"""``qpexp-report DIR... [--out REPRODUCTION.md]``: published numbers against qpexp's, from the records.

Reads every ``record.json`` under the folders given (as :mod:`qpexp.frontier` finds them), files each
under its experiment (``hydra.runtime.choices.experiment`` of the point's ``.hydra/hydra.yaml``, else
of the sweep's ``multirun.yaml``), computes each row of the published table
(``qpexp/reproduction.yaml``, or ``--table``) per seed and writes a markdown report: per row the
paper, the setting, the published number, qpexp's mean +- std over seeds (sample std, n - 1), the
seeds; per experiment the command that ran it (the sweep's overrides), the wall time and the
versions; and the plots (lottery curve, the three fronts) as PNG files beside it. Rows without
records say "not run here". Nothing in it is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from qpexp.run.config_defaults import config_dir
from qpexp.sweep import results
from qpexp.sweep.frontier import ACCURACY_STANDS, _flatten, _point_dirs

TABLE = Path(__file__).parent.parent / "reproduction.yaml"


# -- reading -------------------------------------------------------------------------------------
def _hydra_info(point: Path) -> tuple[str | None, list[str] | None]:
    """(experiment, command overrides) of a point: its own hydra.yaml, else the nearest multirun.yaml."""
    exp = None
    cands = [point / ".hydra" / "hydra.yaml"] + [p / "multirun.yaml" for p in point.parents]
    for f in cands:
        if not f.is_file():
            continue
        h = OmegaConf.load(f)
        h = h.hydra if "hydra" in h else h
        exp = exp or OmegaConf.select(h, "runtime.choices.experiment", default=None)
        if f.name == "multirun.yaml":  # the sweep's own command line
            task = list(OmegaConf.select(h, "overrides.task", default=[]) or [])
            extra = list(OmegaConf.select(h, "overrides.hydra", default=[]) or [])
            return exp, task + extra
    return exp, None


def load_records(dirs) -> dict[str, list[dict]]:
    """Finished records (status whose accuracy stands) per experiment name; each gets ``_command``."""
    out: dict[str, list[dict]] = defaultdict(list)
    for d in dirs:
        root = Path(d)
        if not root.exists():
            raise FileNotFoundError(f"qpexp-report: {d} does not exist")
        for point in _point_dirs(root.resolve()):
            path = point / "record.json"
            if not path.is_file():
                continue
            try:
                rec = json.loads(path.read_text())
            except ValueError:
                continue
            if rec.get("status") not in ACCURACY_STANDS:
                continue
            exp, cmd = _hydra_info(point)
            if exp is None:
                continue
            rec["_command"] = reproduce_command(rec, cmd or [f"experiment={exp}"])
            rec["_flat"] = _flatten(rec.get("config") or {})
            out[exp].append(rec)
    return out


# the settings outside the experiment that decide which cached stages a run reuses, or trains
CACHE_SETTINGS = ("cache", "cache_dir", "cache_code_fingerprint")


def reproduce_command(rec: dict, overrides: list[str]) -> str:
    """``qpexp OVERRIDES`` plus the record's cache settings the overrides leave out (the cache folder
    it read and filled: a rerun against another folder trains its stages anew)."""
    config = rec.get("config") or {}
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    extra = []
    for k in CACHE_SETTINGS:  # true is the default of cache and cache_code_fingerprint
        v = config.get(k)
        if k not in given and v is not None and v is not True:
            extra.append(f"{k}={str(v).lower() if isinstance(v, bool) else v}")
    return "qpexp " + " ".join([*overrides, *extra])


# -- one value per record ----------------------------------------------------------------------------
def _matches(rec: dict, where: dict | None) -> bool:
    return all(rec["_flat"].get(k) == v for k, v in (where or {}).items())


def curve(rec: dict) -> list[tuple[float, float]]:
    """(sparsity, test acc) of every pruning step (``prune/curve/<step>/*``), in step order."""
    steps = sorted({int(k.split("/")[2]) for k in rec if k.startswith("prune/curve/")})
    return [(rec[f"prune/curve/{s}/sparsity"], rec[f"prune/curve/{s}/test_acc"]) for s in steps]


def value(rec: dict, metric: dict) -> float | None:
    """The metric of one record (see ``reproduction.yaml``), or None when the record lacks it."""
    if "curve_at" in metric:
        pts = curve(rec)
        if not pts:
            return None
        return 100 * min(pts, key=lambda p: abs(p[0] - metric["curve_at"]))[1]
    v = rec.get(metric.get("key", "final/test_acc"))
    if not isinstance(v, (int, float)):
        return None
    how = metric.get("as", "value")
    per = rec.get(metric["per"]) if "per" in metric else None
    if how == "percent":
        return 100 * v
    if how in ("error", "kept"):
        return 100 * (1 - v)
    if how == "times_pruned":
        return 1 / (1 - v) if v < 1 else math.inf
    if how == "fewer":
        return 100 * (1 - v / per)
    if how == "times":
        return per / v
    return float(v)


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def config_means(recs: list[dict]) -> list[dict]:
    """The sweep's configs (records equal in everything but the seed): seed means of validation acc
    (what picks a config), test acc (what is reported for it) and ratio."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in recs:
        ident = {k: v for k, v in r["_flat"].items() if k not in ("seed", "data.seed")}
        groups[json.dumps(ident, sort_keys=True, default=str)].append(r)
    out = []
    for rs in groups.values():
        accs = [100 * r["final/test_acc"] for r in rs]
        vals = [100 * r.get("final/val_acc", math.nan) for r in rs]
        out.append({
            "records": rs, "acc": mean_std(accs), "accs": accs, "val": mean_std(vals)[0],
            "ratio": mean_std([r["final/compression_ratio"] for r in rs])[0],
            "size_bits": mean_std([r["final/size_bits"] for r in rs]),
        })  # fmt: skip
    return out


def row_values(recs: list[dict], metric: dict) -> tuple[list[float], list[int], str]:
    """Per-seed values of a row, their seeds, and a note (which config / sparsity it is)."""
    recs = [r for r in recs if _matches(r, metric.get("where"))]
    if "best_at_ratio" in metric:
        ok = [g for g in config_means(recs) if g["ratio"] >= metric["best_at_ratio"]]
        if not ok:
            return [], [], f"no config reaches {metric['best_at_ratio']}x"
        ok = [g for g in ok if not math.isnan(g["val"])]  # picked on validation, never on test
        if not ok:
            return [], [], "no final/val_acc in the records to choose a config by"
        g = max(ok, key=lambda g: g["val"])
        r0 = g["records"][0]["_flat"]
        what = ", ".join(f"{k}={r0.get(k)}" for k in ("prune.ratio", "quant.bits_w") if k in r0)
        note = f"{what}, {g['ratio']:.1f}x, chosen on validation ({g['val']:.2f}%)"
        return g["accs"], [r["seed"] for r in g["records"]], note
    vals, seeds = [], []
    for r in sorted(recs, key=lambda r: r.get("seed", 0)):
        v = value(r, metric)
        if v is not None:
            vals.append(v)
            seeds.append(r.get("seed"))
    note = ""
    if "curve_at" in metric and recs and curve(recs[0]):
        s = min(curve(recs[0]), key=lambda p: abs(p[0] - metric["curve_at"]))[0]
        note = f"step at {100 * s:.1f}% sparse"
    return vals, seeds, note


# -- plots ---------------------------------------------------------------------------------------
def plot_lottery(recs: list[dict], spec: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = spec.get("split_by", "prune.criterion")
    by: dict = defaultdict(list)
    for r in recs:
        by[r["_flat"].get(split)].append(r)
    if not by:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = list(
        {r.get("seed"): 100 * r["baseline/test_acc"] for r in recs}.values()
    )  # one baseline per seed
    dm, ds = mean_std(dense)
    ax.axhline(dm, color="black", lw=1, label=f"dense ({dm:.1f} +- {ds:.1f}%, n={len(dense)})")
    ax.axhspan(dm - ds, dm + ds, color="black", alpha=0.08)
    for (name, rs), color in zip(
        sorted(by.items(), key=lambda kv: str(kv[0])), ("tab:blue", "tab:red", "tab:green")
    ):
        curves = [curve(r) for r in rs if curve(r)]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        xs = [100 * mean_std([c[i][0] for c in curves])[0] for i in range(n)]
        ms = [mean_std([100 * c[i][1] for c in curves]) for i in range(n)]
        label = spec.get("labels", {}).get(name, str(name))
        ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3, color=color,
                    label=f"{label} (n={len(curves)} seeds)")  # fmt: skip
    if spec.get("published_dense") is not None:
        ax.axhline(spec["published_dense"], color="grey", ls=":", lw=1, label="published dense (~66%)")
    if spec.get("published_peak") is not None:
        ax.plot([85, 90], [spec["published_peak"]] * 2, color="grey", lw=3, alpha=0.6,
                label="published: ~74% at 85-90% sparse")  # fmt: skip
    ax.set_xlabel("sparsity (% of weights pruned)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MNIST-1D lottery ticket: MLP 40-500-500-10, iterative pruning with rewinding")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_fronts(by_exp: dict[str, list[dict]], spec: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    dense = []
    for (exp, label), color in zip(spec["experiments"].items(), ("tab:blue", "tab:orange", "tab:green")):
        recs = by_exp.get(exp, [])
        if not recs:
            continue
        dense += [(r["dense/size_bits"], 100 * r["baseline/test_acc"]) for r in recs]
        gs = sorted(config_means(recs), key=lambda g: g["size_bits"][0])
        xs = [g["size_bits"][0] / 8192 for g in gs]
        ax.errorbar(xs, [g["acc"][0] for g in gs], yerr=[g["acc"][1] for g in gs], marker="o", capsize=3,
                    color=color, label=f"{label} ({len(gs)} configs x {len(recs) // max(len(gs), 1)} seeds)")  # fmt: skip
        drawn = True
    if dense:
        acc = mean_std([a for _, a in dense])
        ax.errorbar([dense[0][0] / 8192], [acc[0]], yerr=[acc[1]], marker="*", ms=12, color="black",
                    label=f"dense fp32 ({acc[0]:.1f}%)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("model size (KiB, final/size_bits: weights, indices, scales, biases)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MNIST-1D CNN: prune + quantize vs quantize only vs prune only")
    ax.grid(alpha=0.3, which="both")
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


# -- the report ----------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:.2f}" if abs(x) < 100 else f"{x:.1f}"


def _versions(recs: list[dict]) -> str:
    vs = {json.dumps(r.get("versions", {}), sort_keys=True) for r in recs}
    v = json.loads(sorted(vs)[0]) if vs else {}
    keys = ("qpexp", "torch", "lightning", "hydra-core", "python")
    text = ", ".join(f"{k} {v[k]}" for k in keys if k in v)
    shas = sorted({(r.get("git_sha") or "?")[:8] for r in recs})
    return text + f"; git {', '.join(shas)}" + (" (records differ in versions)" if len(vs) > 1 else "")


def describe(exp: str) -> str:
    """The experiment config's own header comment (what it runs and why), without the package line."""
    path = Path(config_dir()) / "experiment" / f"{exp}.yaml"
    if not path.is_file():
        return ""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text.startswith(("@package", "Run:", "GPU row:")):
            lines.append(text)
    return " ".join(lines)


def budget(recs: list[dict]) -> str:
    """The training budget the records ran with (from their configs)."""
    f = recs[0]["_flat"]
    if "baseline.epochs" not in f:
        return "-"
    parts = [f"baseline {f.get('baseline.epochs')} epochs at lr {f.get('baseline.lr')}"]
    if any(r["_flat"].get("prune.ratio", 0) for r in recs):
        parts.append(
            f"pruning {f.get('prune.steps')} x {f.get('prune.finetune_epochs')} epochs at lr {f.get('prune.lr')}"
        )
    if any(r["_flat"].get("quant.bits_w", 32) != 32 for r in recs):
        parts.append(f"QAT {f.get('quant.epochs')} epochs at lr {f.get('quant.lr')}")
    return "; ".join(parts)


def build(dirs, out: Path, table: Path = TABLE, figures: Path | None = None) -> str:
    spec = OmegaConf.to_container(OmegaConf.load(table))
    by_exp = load_records(dirs)
    out = Path(out)
    figures = Path(figures) if figures else out.parent / "docs" / "reproduction"
    figures.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Reproduction: published numbers against qpexp's",
        "",
        f"Generated by `qpexp-report {' '.join(str(d) for d in dirs)} --out {out}` from the runs'",
        "`record.json` files and the published table `qpexp/reproduction.yaml` (sources:",
        "`../shared/anchors/PUBLISHED.md`); nothing below is typed by hand. qpexp's column is the mean +- the",
        "sample standard deviation (n - 1) over the seeds listed. **cpu** rows were run for this report;",
        "**gpu** rows are configurations for GPU users, filled in only where records exist.",
        "",
        "| paper | setting | published | qpexp (mean +- std) | seeds | device | experiment | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [_table_line(row, by_exp.get(row["experiment"], [])) for row in spec["rows"]]
    lines += ["", "## Plots", ""]
    lines += _plot_lines(spec.get("plots", {}), by_exp, figures, out)
    lines += ["## Experiments", ""]
    for exp in dict.fromkeys(r["experiment"] for r in spec["rows"]):
        gpu = any(r["device"] == "gpu" for r in spec["rows"] if r["experiment"] == exp)
        lines += _experiment_lines(exp, by_exp.get(exp, []), gpu)
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def _table_line(row: dict, recs: list[dict]) -> str:
    """One published row against qpexp's mean +- std over ``recs`` (its experiment's records)."""
    exp = row["experiment"]
    vals, seeds, note = row_values(recs, row["metric"]) if recs else ([], [], "")
    pub = row.get("published_text") or (_fmt(row["published"]) if row.get("published") is not None else "-")
    if vals:
        m, s = mean_std(vals)
        ours = f"{_fmt(m)} +- {_fmt(s)}"
    else:
        ours = "not run here" if not recs else "-"  # run, but no record has the value: the note says why
    seed_txt = ", ".join(str(x) for x in seeds) if seeds else "-"
    if row.get("previous_text"):  # the number this row showed before its fix, kept beside the new one
        note = "; ".join(t for t in (note, f"previously {row['previous_text']}") if t)
    return (
        f"| {row['paper']} | {row['setting']} | {pub} | {ours} | {seed_txt} | {row['device']} | "
        f"[`{exp}`](#{exp}) | {note} |"
    )


def _plot_lines(plots: dict, by_exp: dict, figures: Path, out: Path) -> list[str]:
    """The lottery and fronts figures (drawn into ``figures``), linked relative to ``out``."""

    def link(p: Path) -> str:
        return Path(os.path.relpath(p, out.parent)).as_posix()

    lines: list[str] = []
    if "lottery" in plots:
        p = figures / "lottery_mnist1d.png"
        if plot_lottery(by_exp.get(plots["lottery"]["experiment"], []), plots["lottery"], p):
            lines += [
                "Test accuracy of every pruning step's model (its best validation epoch) against its",
                "sparsity, mean +- std over seeds; the dense line is the same runs' baseline.",
                "",
                f"![lottery ticket]({link(p)})",
                "",
            ]
    if "fronts" in plots:
        p = figures / "fronts_mnist1d.png"
        if plot_fronts(by_exp, plots["fronts"], p):
            lines += [
                "Each config's test accuracy (mean +- std over seeds) against its size as the accounting",
                "counts it (`final/size_bits`: codes at their width, sparse index formats, scales, biases).",
                "",
                f"![fronts]({link(p)})",
                "",
            ]
    return lines


def _experiment_lines(exp: str, recs: list[dict], gpu: bool) -> list[str]:
    """An experiment's section: its commands, records, budget, wall time and versions, or how to run it."""
    lines = [f"### {exp}", ""]
    if describe(exp):
        lines += [describe(exp), ""]
    if not recs:
        extra = " data.path=ROOT trainer=gpu" if gpu else ""
        return lines + [
            f"Not run here. Command: `qpexp experiment={exp}{extra}` (`conf/experiment/{exp}.yaml`).",
            "",
        ]
    cmds = sorted({r["_command"] for r in recs})
    secs = [r.get("seconds/total", 0.0) for r in recs]
    seeds = sorted({r.get("seed") for r in recs})
    return lines + [
        f"- command: {', '.join(f'`{c}`' for c in cmds)}",
        f"- records: {len(recs)}, seeds {', '.join(str(s) for s in seeds)}",
        f"- budget: {budget(recs)}",
        f"- wall time: {sum(secs):.0f} s in all, {sum(secs) / len(secs):.0f} s per run "
        "(`seconds/total`; stages reused from the cache count their loading time only)",
        f"- versions: {_versions(recs)}",
        "",
    ]


def cli(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qpexp-report", description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="*", help="folders holding runs (record.json files), searched recursively")
    ap.add_argument(
        "--results",
        action="store_true",
        help="instead: regenerate the tables of docs/results.md (between its markers) from the committed "
        "sweeps under docs/results/records (qpexp.sweep.results)",
    )
    ap.add_argument("--out", default="REPRODUCTION.md", help="the markdown file to write")
    ap.add_argument(
        "--figures", default=None, help="folder for the PNG plots (default: docs/reproduction beside --out)"
    )
    ap.add_argument(
        "--table", default=str(TABLE), help="the published table (default: qpexp/reproduction.yaml)"
    )
    ap.add_argument(
        "--add", metavar="SWEEP_DIR", help="with --results: first copy this finished sweep's records"
    )
    ap.add_argument("--name", help="with --add: the records' folder name (default: the sweep folder's name)")
    a = ap.parse_args(argv)
    if a.results:
        return _results(a.add, a.name)
    if not a.dirs:
        ap.error("give the folders holding runs, or --results")
    try:
        build(a.dirs, Path(a.out), Path(a.table), Path(a.figures) if a.figures else None)
    except FileNotFoundError as e:
        print(f"qpexp-report: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}")
    return 0


def _results(add: str | None, name: str | None) -> int:
    try:
        if add:
            print(f"copied {results.add_sweep(Path(add), name or Path(add).name)}")
        page = results.write()
    except (FileNotFoundError, ValueError) as e:
        print(f"qpexp-report: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())

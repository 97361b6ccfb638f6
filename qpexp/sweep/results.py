"""``qpexp-report --results``: the docs' result tables, generated from committed records.

Every folder under ``docs/results/records/`` is one sweep as it ran: its ``multirun.yaml`` (the
command) and one folder per point holding its ``record.json`` (no models). For each, the frontier is
computed as :mod:`qpexp.frontier` computes it, once chosen on validation (``final/val_acc``, the
default) and once on test (``final/test_acc``, how the numbers were chosen before), and written as
markdown tables between the markers of ``docs/results.md``:

    <!-- qpexp-report:results:begin -->  ...generated...  <!-- qpexp-report:results:end -->

Nothing between the markers is typed by hand; ``tests/test_results_page.py`` rebuilds it from the
records and compares it with the committed page.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import OmegaConf

from qpexp.sweep import frontier as fr

RECORDS = Path("docs/results/records")
PAGE = Path("docs/results.md")
BEGIN, END = "<!-- qpexp-report:results:begin -->", "<!-- qpexp-report:results:end -->"
SELECTS = (fr.VAL, fr.ACC)
AXIS_TEXT = {
    "honest": "honest total at fixed width (`final/compression_ratio`)",
    "huffman": "honest total with the codes and indices Huffman-coded (`final/compression_ratio_huffman`)",
}


def _shown(path: Path) -> str:
    """``path`` relative to the checkout (so the page reads the same wherever it is generated)."""
    root = Path(__file__).resolve().parents[2]  # qpexp/sweep/results.py -> the checkout
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def _ratio(x) -> str:
    return "" if x is None else f"{x:.2f}x"


def command(sweep: Path) -> str:
    """The sweep's command line, from its ``multirun.yaml`` (the sweep folder override left out)."""
    h = OmegaConf.load(sweep / "multirun.yaml").hydra
    task = [o for o in OmegaConf.select(h, "overrides.task", default=[]) or []]
    return "qpexp " + " ".join(str(o) for o in task)


def ratio_axis(sweep: Path) -> str:
    """The sweep's ratio axis as it ran (``hydra.callbacks.frontier.size`` in its ``multirun.yaml``):
    ``honest`` (fixed-width codes) unless the sweep asked for ``huffman``."""
    h = OmegaConf.load(sweep / "multirun.yaml").hydra
    return str(OmegaConf.select(h, "callbacks.frontier.size", default="honest") or "honest")


def frontier_numbers(sweep: Path, select: str) -> tuple[dict, list[dict]]:
    """(summary, config groups) of one sweep's records, chosen on ``select``, on the sweep's ratio axis."""
    rows, axes = fr.collect([sweep])
    gs = fr.groups(rows, axes, select, suffix=fr.SIZES[ratio_axis(sweep)])
    return fr.summarize(rows, gs, fr.HV_WINDOW, select), gs


def headline_table(sweep: Path) -> list[str]:
    lines = [
        "| chosen on | dense (chosen on / test) | best ratio within 1 pt | its config | its val / test acc "
        "| within 2 pt | its config | its val / test acc | hypervolume (chosen on) | hypervolume (test) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for select in SELECTS:
        s, _ = frontier_numbers(sweep, select)
        cells = [f"`{select}`", f"{_pct(s.get('dense_select_acc'))} / {_pct(s.get('dense_acc'))}"]
        for k in (1, 2):
            cells += [
                _ratio(s.get(f"best_ratio_within_{k}pt")),
                s.get(f"best_within_{k}pt/config", ""),
                f"{_pct(s.get(f'best_ratio_within_{k}pt_val_acc'))} / "
                f"{_pct(s.get(f'best_ratio_within_{k}pt_test_acc'))}",
            ]
        cells += [f"{s.get('hypervolume', 0):.2f}", f"{s.get('hypervolume_test', 0):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def front_table(sweep: Path) -> list[str]:
    """Every config (seed means), Pareto on validation marked; test accuracy reported beside."""
    _, gs = frontier_numbers(sweep, fr.VAL)
    lines = [
        "| config | seeds | val acc % | test acc % (± std) | ratio | Pareto (val) | deployment |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in sorted(gs, key=lambda g: (-(g["ratio"] or 0), -g["sel"])):
        std = f" ± {100 * g['acc_std']:.2f}" if g["n"] > 1 else ""
        lines.append(
            f"| {fr._describe(g)} | {g['n']} | {_pct(g['val_acc'])} | {_pct(g['acc'])}{std} "
            f"| {_ratio(g['ratio'])} | {'yes' if g['pareto'] else ''} | {_deployment(g)} |"
        )
    return lines


def _deployment(g: dict) -> str:
    """The statuses of a config's seeds: ``ok``, ``not deployed``, or the failed checks (off the front)."""
    if g.get("point") == "dense":
        return "-"
    statuses = g.get("statuses") or []
    if statuses == ["ok"]:
        return "ok"
    if statuses == ["not_deployed"]:
        return "not deployed"
    return ", ".join(statuses) + ("" if g.get("eligible", True) else " (off the front)")


def budget(sweep: Path) -> str:
    """The training budget the sweep's points ran with, from their recorded configs: every value a
    swept setting took; the quantization description from the first point's."""
    rows, _ = fr.collect([sweep])
    runs = [r for r in rows if r["point"] == "run" and r.get("config.baseline.epochs") is not None]
    if not runs:
        return "Budget: not recorded."
    c = runs[0]

    def g(k):
        """The setting's value, or every value the sweep's points took ("3e-4 / 1e-4"), in order."""
        seen = list(dict.fromkeys(fr._fmt(r.get(f"config.{k}")) for r in runs))
        return " / ".join(seen)

    first = c.get("config.quant.first_bits")
    val = c.get("config.data.source.val_samples")
    split = (
        f"validation {val:,} independent samples"
        if val
        else f"validation {fr._fmt(c.get('config.data.val_fraction'))} of train"
    )
    prune = (
        "no pruning"
        if not c.get("config.prune.ratio")
        else f"pruning ({g('prune.structure')}) {g('prune.steps')} steps x {g('prune.finetune_epochs')} "
        f"fine-tune epochs at lr {g('prune.lr')}"
    )
    bits = c.get("config.quant.bits_w")
    train = f"QAT {g('quant.epochs')} epochs at lr {g('quant.lr')}" if c.get("config.quant.epochs") else "PTQ"
    width = "at the swept width" if first is None else f"{fr._fmt(first)}-bit weights"
    over = [
        f"{k.split('overrides.', 1)[1]} {fr._fmt(v)}-bit"
        for k, v in c.items()
        if k.startswith("config.quant.overrides.")
    ]
    scheme = c.get("config.quant.scheme")
    quant = (
        "float weights (no quantization)"
        if isinstance(bits, (int, float)) and bits >= 32
        else f"{train}{'' if scheme in (None, 'linear') else f' ({scheme} weights)'}; first layer {width}"
        + (f"; per-layer widths: {', '.join(over)}" if over else "")
    )
    return (
        f"Budget: baseline {g('baseline.epochs')} epochs at lr {g('baseline.lr')}; {prune}; {quant}; {split}."
    )


def section(sweep: Path) -> list[str]:
    s, _ = frontier_numbers(sweep, fr.VAL)
    return [
        f"### `{sweep.name}`",
        "",
        f"Command: `{command(sweep)}`; {s['points']} points, {s['points_failed']} failed, "
        f"{s.get('points_deploy_mismatch', 0) + s.get('points_deploy_error', 0)} whose deployment check "
        f"failed, {s.get('points_not_deployed', 0)} not deployed; records: `{_shown(sweep)}`. "
        f"Ratio: {AXIS_TEXT[ratio_axis(sweep)]}.",
        "",
        budget(sweep),
        "",
        *headline_table(sweep),
        "",
        *front_table(sweep),
        "",
    ]


def generate(records: Path = RECORDS) -> str:
    records = Path(records)
    sweeps = (
        sorted(p for p in records.iterdir() if (p / "multirun.yaml").is_file()) if records.is_dir() else []
    )
    body = ["_Generated by `qpexp-report --results` from the records below; do not edit by hand._", ""]
    if not sweeps:
        body.append(f"No sweep's records are committed under `{_shown(records)}` yet.")
    for sweep in sweeps:
        body += section(sweep)
    return "\n".join(body).rstrip() + "\n"


def add_sweep(sweep_dir: Path, name: str, records: Path = RECORDS) -> Path:
    """Copy a finished sweep's command (``multirun.yaml``) and every point's ``record.json`` (no
    models, no checkpoints) into ``records/name``; refuses a sweep with an unfinished point."""
    sweep_dir, dest = Path(sweep_dir), Path(records) / name
    if not (sweep_dir / "multirun.yaml").is_file():
        raise FileNotFoundError(f"--add {sweep_dir}: no multirun.yaml (not a sweep folder)")
    points = [
        p for p in sorted(sweep_dir.iterdir()) if (p / ".hydra").is_dir() or (p / "record.json").is_file()
    ]
    missing = [p.name for p in points if not (p / "record.json").is_file()]
    if missing or not points:
        raise FileNotFoundError(
            f"--add {sweep_dir}: {len(missing)} point(s) without record.json: {missing[:3]}"
        )
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(sweep_dir / "multirun.yaml", dest / "multirun.yaml")
    for p in points:
        (dest / p.name).mkdir()
        shutil.copy2(p / "record.json", dest / p.name / "record.json")
    return dest


def splice(page_text: str, generated: str, page: Path = PAGE) -> str:
    """``page_text`` with the text between the markers replaced by ``generated``."""
    if BEGIN not in page_text or END not in page_text:
        raise ValueError(f"{page}: the markers {BEGIN} and {END} are missing")
    head, rest = page_text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{generated}{END}{tail}"


def write(records: Path = RECORDS, page: Path = PAGE) -> Path:
    page = Path(page)
    page.write_text(splice(page.read_text(), generate(records), page))
    return page

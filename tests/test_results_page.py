"""Every table of docs/results.md comes from committed records (issue 20, section 3): rebuilt here
from ``docs/results/records`` and compared with the committed page; and the generator itself checked
on a hand-made sweep whose numbers are worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpexp.sweep import results

ROOT = Path(__file__).resolve().parents[1]


def test_committed_page_matches_its_records():
    page = (ROOT / "docs" / "results.md").read_text()
    rebuilt = results.splice(page, results.generate(ROOT / "docs" / "results" / "records"))
    assert rebuilt == page, "docs/results.md is stale: run `qpexp-report --results` and commit it"


def _point(
    root: Path, name: str, bits: int, val: float, test: float, ratio: float, huffman=None, prune_lr=None
) -> None:
    d = root / name
    d.mkdir(parents=True)
    cfg = {
        "seed": 0,
        "data": {"name": "mnist1d"},
        "model": {"channels": 25},
        "baseline": {"epochs": 150},
        "trainer": {},
        "prune": {"ratio": 0.5, "scope": "global", **({"lr": prune_lr} if prune_lr else {})},
        "quant": {"bits_w": bits},
    }
    rec = {
        "status": "ok",
        "seed": 0,
        "config": cfg,
        "baseline/val_acc": 0.95,
        "baseline/test_acc": 0.94,
        "final/val_acc": val,
        "final/test_acc": test,
        "final/compression_ratio": ratio,
        "dense/size_bits": 1000.0,
    }
    if huffman is not None:
        rec["final/compression_ratio_huffman"] = huffman
    (d / "record.json").write_text(json.dumps(rec))
    (d / ".hydra").mkdir()


def test_add_sweep_and_tables_by_hand(tmp_path):
    sweep = tmp_path / "runs" / "s"
    _point(sweep, "a", 2, 0.945, 0.930, 16.0)  # within 1 pt of dense on val (0.95)
    _point(sweep, "b", 4, 0.935, 0.950, 8.0)  # within 1 pt of dense on test (0.94), not on val
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - sweep=frontier\n    - seed=0\n"
    )
    dest = results.add_sweep(sweep, "mine", tmp_path / "records")
    assert sorted(p.name for p in dest.iterdir()) == ["a", "b", "multirun.yaml"]
    assert not (dest / "a" / ".hydra").exists()  # records only
    text = results.generate(tmp_path / "records")
    assert "Command: `qpexp sweep=frontier seed=0`" in text
    lines = text.splitlines()
    val_row = next(x for x in lines if x.startswith("| `final/val_acc`"))
    test_row = next(x for x in lines if x.startswith("| `final/test_acc`"))
    # on val: a (16x, val 94.50, test 93.00); on test: a's 93.00 is 1 pt below 94.00, so still a (16x)
    assert val_row.split(" | ")[1:5] == ["95.00 / 94.00", "16.00x", "w2 global 0.5", "94.50 / 93.00"]
    assert test_row.split(" | ")[1:3] == ["94.00 / 94.00", "16.00x"]
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{results.BEGIN}\nold\n{results.END}\nend\n")
    results.write(tmp_path / "records", page)
    assert page.read_text() == f"intro\n{results.BEGIN}\n{text}{results.END}\nend\n"


def test_unfinished_sweep_is_refused(tmp_path):
    sweep = tmp_path / "s"
    _point(sweep, "a", 2, 0.9, 0.9, 4.0)
    (sweep / "b" / ".hydra").mkdir(parents=True)  # a point that never wrote its record
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    with pytest.raises(FileNotFoundError, match="1 point"):
        results.add_sweep(sweep, "x", tmp_path / "records")


def test_a_huffman_sweep_is_tabled_on_its_huffman_ratio(tmp_path):
    """A sweep that ran with hydra.callbacks.frontier.size=huffman is ranked, and its ratios shown,
    on final/compression_ratio_huffman, and the section says which axis it is."""
    sweep = tmp_path / "s"
    _point(sweep, "a", 4, 0.945, 0.930, 16.0, huffman=20.0)
    _point(sweep, "b", 5, 0.948, 0.940, 14.0, huffman=22.0)  # behind a at fixed width, ahead Huffman-coded
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  callbacks:\n    frontier:\n      size: huffman\n  overrides:\n    task: [seed=0]\n"
    )
    text = results.generate(results.add_sweep(sweep, "h", tmp_path / "records").parent)
    assert "`final/compression_ratio_huffman`" in text
    val_row = next(x for x in text.splitlines() if x.startswith("| `final/val_acc`"))
    assert val_row.split(" | ")[2:4] == ["22.00x", "w5 global 0.5"]  # b: 22x Huffman-coded, within 1 pt
    rows = [x for x in text.splitlines() if x.startswith("| w")]
    assert [r.split(" | ")[4] for r in rows] == ["22.00x", "20.00x"]


def test_budget_line_shows_every_value_a_swept_setting_took(tmp_path):
    sweep = tmp_path / "s"
    _point(sweep, "a", 4, 0.94, 0.93, 8.0, prune_lr=0.0003)
    _point(sweep, "b", 4, 0.94, 0.93, 8.0, prune_lr=0.0001)
    _point(sweep, "c", 4, 0.94, 0.93, 8.0, prune_lr=0.0003)
    line = results.budget(sweep)
    assert "baseline 150 epochs" in line  # one value: shown once
    assert "at lr 0.0003 / 0.0001;" in line  # the point order, each value once

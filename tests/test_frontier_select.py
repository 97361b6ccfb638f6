"""Choose on validation, report test once (issue 20, section 2): the frontier's Pareto flags, best
ratio within N points and hypervolume are decided on ``frontier.select`` (default ``final/val_acc``,
dense too), and the TEST accuracy of what was chosen is reported beside it. A hand-built sweep in which
validation and test disagree, every expected number worked out by hand below."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from qpexp.frontier import cli, write_frontier

DENSE_BITS = 166_720
DENSE_VAL, DENSE_TEST = 0.95, 0.94

# (name, bits, scope, ratio, val acc, test acc, status)
POINTS = [
    ("A", 2, "global", 20.0, 0.935, 0.945, "ok"),  # within 2 pt on val; within 1 pt on test
    ("B", 4, "global", 10.0, 0.945, 0.920, "ok"),  # within 1 pt on val, its test 2 pt below dense
    ("C", 8, "global", 5.0, 0.930, 0.950, "ok"),  # dominated on val by B; best test of all
    ("D", 2, "layer", 40.0, 0.950, 0.950, "deploy_mismatch"),  # accuracy stands, deployment failed
    ("E", 4, "layer", 12.0, 0.944, 0.930, "not_deployed"),  # no deployment check: counts
]


def _record(bits, scope, ratio, val, test, status):
    cfg = {
        "seed": 0,
        "data": {"name": "mnist1d", "seed": 0},
        "model": {"_target_": "qpexp.models.cnn1d", "channels": 25},
        "baseline": {"epochs": 150, "lr": 0.01},
        "trainer": {"deterministic": False},
        "prune": {"ratio": 0.5, "scope": scope, "structure": "channel"},
        "quant": {"bits_w": bits, "bits_a": 8, "first_bits": 8, "last_bits": None},
        "logger": {"kind": "none"},
    }
    return {
        "status": status,
        "deploy/checks": "none" if status == "not_deployed" else "int+onnx",
        "seed": 0,
        "config": cfg,
        "baseline/val_acc": DENSE_VAL,
        "baseline/test_acc": DENSE_TEST,
        "final/val_acc": val,
        "final/test_acc": test,
        "final/compression_ratio": ratio,
        "final/size_bits": DENSE_BITS / ratio,
        "dense/size_bits": DENSE_BITS,
        "final/sparsity": 0.5,
        "final/macs": 1000,
        "final/bops": 1000 * bits * 8,
    }


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for name, bits, scope, ratio, val, test, status in POINTS:
        d = root / name
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps(_record(bits, scope, ratio, val, test, status)))
    return root


def _area(front, ref):
    """Hand-written staircase area in (log2 ratio, acc points) above (0, ref points): ``front`` is
    [(ratio, acc points)] sorted by ratio descending, each step covering down to the next ratio."""
    area, best = 0.0, ref
    for i, (r, a) in enumerate(front):
        best = max(best, a)
        nxt = math.log2(front[i + 1][0]) if i + 1 < len(front) else 0.0
        area += (math.log2(r) - nxt) * (best - ref)
    return area


def test_chosen_on_validation_reported_on_test(sweep):
    s = write_frontier([sweep], sweep, quiet=True, wandb=False)
    assert s["select"] == "final/val_acc"
    assert s["dense_select_acc"] == pytest.approx(DENSE_VAL) and s["dense_acc"] == pytest.approx(DENSE_TEST)
    # within 1 pt of dense on val (>= 0.94): B (10x), E (12x; not_deployed counts); D (40x) is a failed
    # deployment, left out. E wins: 12x, reported with ITS test accuracy 0.930
    assert s["best_ratio_within_1pt"] == pytest.approx(12.0)
    assert s["best_ratio_within_1pt_val_acc"] == pytest.approx(0.944)
    assert s["best_ratio_within_1pt_test_acc"] == pytest.approx(0.930)
    # within 2 pt on val (>= 0.93): A 20x (val 0.935), test 0.945
    assert s["best_ratio_within_2pt"] == pytest.approx(20.0)
    assert s["best_ratio_within_2pt_test_acc"] == pytest.approx(0.945)
    # val front: A (20x, 93.5), E (12x, 94.4), B (10x, 94.5); C dominated by B; D off the front
    assert [f["ratio"] for f in s["front"]] == [1.0, 10.0, 12.0, 20.0]  # dense (val 0.95) too
    hv_val = (
        (math.log2(20) - math.log2(12)) * 3.5 + (math.log2(12) - math.log2(10)) * 4.4 + math.log2(10) * 4.5
    )
    assert s["hypervolume"] == pytest.approx(hv_val)
    assert s["hypervolume"] == pytest.approx(_area([(20, 93.5), (12, 94.4), (10, 94.5)], 90.0))
    # the same front at its test accuracies against dense test - 5 = 89: A (94.5 at 20x) covers it all
    assert s["hypervolume_test"] == pytest.approx(math.log2(20) * 5.5)
    rows = {r["run_dir"].split("/")[-1]: r for r in csv.DictReader((sweep / "frontier.csv").open())}
    assert rows["C"]["pareto"] == "False" and rows["B"]["pareto"] == "True"
    assert rows["D"]["pareto"] == "False" and rows["D"]["status"] == "deploy_mismatch"
    assert rows["E"]["not_deployed"] == "True" and rows["A"]["not_deployed"] == "False"
    assert s["points_failed"] == 0 and s["points_not_deployed"] == 1


def test_selecting_on_test_gives_the_test_selected_numbers(sweep):
    s = write_frontier([sweep], sweep, quiet=True, wandb=False, select="final/test_acc")
    # dense test 0.94: within 1 pt (>= 0.93) A 20x (0.945), C 5x, E 12x (0.930); D left out
    assert s["best_ratio_within_1pt"] == pytest.approx(20.0)
    assert s["best_ratio_within_1pt_test_acc"] == pytest.approx(0.945)
    # test front: A (20x, 94.5) dominates B, C (95.0 at 5x) stays: ref 89
    assert s["hypervolume"] == pytest.approx(_area([(20, 94.5), (5, 95.0)], 89.0))


def test_failed_deployments_only_when_asked(sweep):
    s = write_frontier([sweep], sweep, quiet=True, wandb=False, include_failed_deploy=True)
    assert s["best_ratio_within_1pt"] == pytest.approx(40.0)  # D: val 0.95 at 40x
    assert s["best_ratio_within_1pt_test_acc"] == pytest.approx(0.95)


def test_labels_name_a_first_layer_at_another_width(sweep):
    s = write_frontier([sweep], sweep, quiet=True, wandb=False)
    labels = {f["ratio"]: f["config"] for f in s["front"]}
    assert labels[20.0] == "w2 global 0.5, first layer 8-bit"
    assert labels[10.0] == "w4 global 0.5, first layer 8-bit"


def test_cli_select_flag_and_unknown_key(sweep, tmp_path, capsys):
    assert cli([str(sweep), "--no-wandb", "--select", "final/test_acc"]) == 0
    out = capsys.readouterr().out
    assert "selected on final/test_acc" in out
    assert json.loads((sweep / "frontier.json").read_text())["best_ratio_within_1pt"] == pytest.approx(20.0)
    with pytest.raises(ValueError, match="frontier.select='final/nope_acc'"):
        write_frontier([sweep], tmp_path / "out", quiet=True, wandb=False, select="final/nope_acc")


def test_config_key_default_and_bad_value():
    from conftest import compose

    from qpexp.errors import ConfigError
    from qpexp.schema import validate

    assert validate(compose(["logger=none"])).frontier.select == "final/val_acc"
    with pytest.raises(ConfigError, match="frontier.select='final/val_loss'"):
        validate(compose(["logger=none", "frontier.select=final/val_loss"]))


def test_dashboard_labels_not_deployed_and_reports_chosen_test_acc(sweep):
    s = write_frontier([sweep], sweep, quiet=True, wandb=False)
    html = (sweep / "frontier.html").read_text(encoding="utf-8")
    assert "w4 layer 0.5, first layer 8-bit (not deployed)" in html
    # the front's table row carries the chosen config's test accuracy (E: 0.93 at 12x)
    assert '"best_ratio_within_1pt_test_acc":0.93' in html.replace(" ", "")
    assert s["points_not_deployed"] == 1


def test_legacy_ok_without_any_deployment_reads_as_not_deployed():
    from qpexp.sweep.frontier import legacy_status

    old = {"status": "ok", "final/test_acc": 0.9}  # written before deploy/checks: nothing was deployed
    assert legacy_status(old)["status"] == "not_deployed" and old["status"] == "ok"
    deployed = {"status": "ok", "deploy/checks": "int+onnx"}
    assert legacy_status(deployed)["status"] == "ok"
    assert legacy_status({"status": "failed"})["status"] == "failed"

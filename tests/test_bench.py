"""Benchmarks run (``python -m qpexp.bench <name>``) and end with their JSON line; no speed assertions."""

from __future__ import annotations

import json

import pytest
import torch

from qpexp.bench import NAMES


def _bench(module, argv: list[str], capsys) -> tuple[list[str], dict]:
    """Run ``module.main(argv)`` (restoring torch's thread count) and return its table lines and JSON."""
    threads = torch.get_num_threads()
    try:
        module.main(argv)
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    return lines[:-1], json.loads(lines[-1])


TIMES = ("total_s", "s_per_layer", "compress_s", "calib_s", "forward_s", "calib_x_forward")


def test_oneshot_bench_quick_every_method(capsys):
    from qpexp.bench import oneshot

    assert "oneshot" in NAMES
    table, fig = _bench(oneshot, ["--quick", "--models", "cnn1d"], capsys)
    assert len([line for line in table if line.startswith("cnn1d ")]) == len(oneshot.METHODS)
    for method in oneshot.METHODS:
        key = f"cnn1d/{method}"
        assert fig[f"{key}/total_s"] > 0
        assert fig[f"{key}/peak_extra_bytes"] > 0
        if method != "calib_xtx":
            assert fig[f"{key}/layers"] == 4
            assert fig[f"{key}/s_per_layer"] > 0 and fig[f"{key}/compress_s"] >= fig[f"{key}/s_per_layer"]
        if method != "magnitude_50":  # every other method calibrates, against a plain forward
            assert fig[f"{key}/calib_s"] > 0 and fig[f"{key}/forward_s"] > 0
            assert fig[f"{key}/calib_x_forward"] == pytest.approx(
                fig[f"{key}/calib_s"] / fig[f"{key}/forward_s"]
            )  # one round: the median of one ratio
    assert fig["cnn1d/sparsegpt_50/calib"] == "sequential" and fig["cnn1d/wanda_50/calib"] == "one pass"
    assert (fig["rounds"], fig["calib_batches"], fig["batch_size"], fig["weights"]) == (1, 2, 20, "untrained")


def test_oneshot_bench_transformer(capsys):
    """Attention's packed ``in_proj_weight``: pruned by all, rounded by GPTQ, refused by AdaRound."""
    from qpexp.bench import oneshot

    methods = "sparsegpt_2:4,gptq_3bit,adaround_4bit"
    _, fig = _bench(
        oneshot, ["--quick", "--no-memory", "--models", "transformer", "--methods", methods], capsys
    )
    assert fig["transformer/sparsegpt_2:4/layers"] == 18  # 4 blocks x (in_proj, out_proj, fc1, fc2) + 2
    assert fig["transformer/gptq_3bit/layers"] == 18  # in_proj_weight too (one F.linear on it)
    assert fig["transformer/adaround_4bit/refused"] is True
    for key in ("sparsegpt_2:4", "gptq_3bit"):
        assert all(fig[f"transformer/{key}/{t}"] > 0 for t in TIMES)
        assert f"transformer/{key}/peak_extra_bytes" not in fig


def test_oneshot_bench_refuses_unknown_names():
    from qpexp.bench import oneshot

    with pytest.raises(SystemExit):
        oneshot.main(["--methods", "obc"])


def test_epoch_bench_three_sides_on_small_images(capsys, monkeypatch):
    """The epoch row on 240 random 28x28 images (not MNIST): plain loop, bare Lightning, qpexp; the
    ratios are the medians' quotients, as the table says."""
    import numpy as np

    from qpexp.bench import epoch
    from qpexp.data import ArrayDataModule

    rng = np.random.default_rng(0)

    def source():
        x = rng.random((300, 1, 28, 28), dtype=np.float32)
        y = rng.integers(0, 10, 300)
        return {"x_train": x[:240], "y_train": y[:240], "x_test": x[240:], "y_test": y[240:]}

    def small():
        dm = ArrayDataModule(source=source, name="small", val_fraction=1 / 12, seed=0)
        dm.setup()
        return dm

    monkeypatch.setattr(epoch, "_data", small)
    assert "epoch" in NAMES
    table, fig = _bench(epoch, ["--models", "lenet300", "--rounds", "1"], capsys)
    head = next(i for i, line in enumerate(table) if line.startswith("model"))
    columns = ["model", "plain_s", "lightning_s", "qpexp_s", "ratio", "over_lightning", "rounds"]
    assert table[head].split() == columns
    row = dict(zip(columns, table[head + 2].split()))
    assert row["model"] == "lenet300"
    plain, bare, ours = float(row["plain_s"]), float(row["lightning_s"]), float(row["qpexp_s"])
    assert fig["lenet300_ratio"] == pytest.approx(ours / plain, rel=0.01)
    assert fig["lenet300_over_lightning"] == pytest.approx(ours / bare, rel=0.01)

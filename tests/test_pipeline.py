"""Issue 2: the pipeline end to end, the record contract, honest counts and bad input."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, compose, read_record, run_cli, wandb_offline_runs
from torch import nn

from qpexp.core.accounting import size_bits, tensor_bits
from qpexp.core.prune import set_mask
from qpexp.core.quant import QuantConfig, QuantSpec, quantize_
from qpexp.io import safe_torch_load
from qpexp.pipeline import Pipeline
from qpexp.schema import ConfigError

RECORD_KEYS = [
    "baseline/val_acc", "baseline/test_acc", "prune/val_acc", "prune/test_acc", "qat/val_acc", "qat/test_acc",
    "final/val_acc", "final/test_acc", "final/sparsity", "final/params", "final/nonzero_params",
    "final/bits_w", "final/bits_a", "final/size_bits", "dense/size_bits", "final/compression_ratio",
    "final/macs", "final/bops", "seconds/baseline", "seconds/prune", "seconds/qat", "seconds/total",
    "config", "seed", "git_sha", "versions", "status",
]  # fmt: skip


def run_pipeline(tmp_path: Path, overrides: list[str]) -> tuple[dict, Pipeline]:
    cfg = compose([*TINY, f"cache_dir={tmp_path / 'cache'}", "export.enabled=false", *overrides])
    pipe = Pipeline(cfg, tmp_path / "run")
    return pipe.run(), pipe


def make_npz(path: Path, shape=(1, 12, 12), n=300, classes=3, **changes) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, m in (("train", n), ("test", n // 3)):
        y = rng.integers(0, classes, m)
        x = rng.normal(size=(m, *shape)).astype(np.float32)
        flat = x.reshape(m, -1)
        for c in range(classes):  # learnable signal: a band of pixels per class
            flat[y == c, c * 20 : (c + 1) * 20] += 2.0
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


# -- end to end ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [["data=mnist1d", "model=cnn1d"], ["data=digits", "model=lenet5"], ["data=digits", "model=lenet300"]],
)
def test_end_to_end_each_dataset(tmp_path, data):
    rec, pipe = run_pipeline(tmp_path, data)
    assert rec["status"] == "ok"
    for k in RECORD_KEYS:
        if k not in ("config", "git_sha", "versions"):  # added by the CLI around the pipeline
            assert k in rec, k
    assert 0.0 <= rec["final/test_acc"] <= 1.0
    assert rec["final/test_acc"] == rec["qat/test_acc"]
    assert rec["final/bits_w"] == 4 and rec["final/bits_a"] == 8
    assert rec["final/compression_ratio"] == pytest.approx(rec["dense/size_bits"] / rec["final/size_bits"])
    assert rec["final/compression_ratio"] > 4  # 4-bit weights at 50% sparsity


def test_npz_images_any_shape(tmp_path):
    path = make_npz(tmp_path / "imgs.npz")
    for model in ("lenet5", "mlp"):
        rec, _ = run_pipeline(
            tmp_path / model, ["data=npz", f"data.path={path}", f"model={model}", "baseline.epochs=5"]
        )
        assert rec["status"] == "ok" and rec["final/test_acc"] > 0.6  # above chance on a learnable signal


def test_cli_record_summary_and_wandb(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        "logger=wandb",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
        "export.enabled=false",
    ]
    proc = run_cli(args, cwd=tmp_path)
    rec = read_record(run_dir)
    for k in RECORD_KEYS:
        assert k in rec, k
    assert rec["config"]["prune"]["ratio"] == 0.5 and rec["versions"]["torch"]
    for word in ("baseline", "prune", "qat", "final", "ratio"):
        assert word in proc.stdout  # the summary table
    (run,) = wandb_offline_runs(run_dir)  # one W&B run per pipeline run, offline under the run dir
    assert run["project"] == "qpexp"
    for k in ("final/test_acc", "final/size_bits", "final/compression_ratio", "baseline/test_acc"):
        assert run["summary"][k] == rec[k], k
    for k in ("baseline/train/loss", "baseline/val/acc", "prune/val/acc", "qat/val/acc"):
        assert k in run["history_keys"], k  # per-epoch curves under stage-prefixed keys
    assert any("sparsity_table" in str(f) for f in run["files"])


# -- honest counts -------------------------------------------------------------------------------
def test_sparsity_counted_from_saved_model_and_zeros_survive_qat(tmp_path):
    rec, _ = run_pipeline(tmp_path, ["prune.ratio=0.7"])
    pruned = safe_torch_load(Path(rec["artifacts/prune"]) / "model.pt")["model"]
    final = safe_torch_load(Path(rec["artifacts/qat"]) / "model.pt")["model"]
    zeros = total = 0
    for key, mask in pruned.items():
        if not key.endswith("weight_mask"):
            continue
        layer = key[: -len(".weight_mask")]
        w_final = final[f"{layer}.layer.weight"]  # inside the QAT wrapper
        assert torch.equal(w_final[mask == 0], torch.zeros(int((mask == 0).sum())))  # still exactly zero
        zeros += int((w_final == 0).sum())
        total += w_final.numel()
    assert rec["final/sparsity"] == zeros / total
    assert zeros >= round(0.7 * total)  # the requested count; more only if training zeroed weights exactly


def test_size_formula_hand_built():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    model = nn.Sequential(lin)
    dense = size_bits(model)
    assert dense == (32 + 4) * 32
    mask = torch.ones(4, 8)
    mask[:, :6] = 0  # 8 nonzeros remain of 32
    set_mask(lin, mask)
    # float pruned: min(dense 32*32, bitmask 8*32 + 32, relative (8 + pad) * 36) + flag
    # nonzeros at positions 6,7,14,15,22,23,30,31: gaps 7,1,7,1,... <= 16 -> no padding
    assert size_bits(model) == min(32 * 32, 8 * 32 + 32, 8 * 36) + 2 + 4 * 32
    quantize_(model, QuantConfig(QuantSpec(4, granularity="channel", symmetric=True), QuantSpec(8)))
    q = model[0]
    w = q.wq(q.layer.weight).detach()
    nnz = int(w.count_nonzero())
    expected_w = min(32 * 4, nnz * 4 + 32, nnz * (4 + 4)) + 2  # gaps stay <= 16
    qparams = 4 * 32 + (1 + 1) * 32  # 4 weight scales (Z = 0 implicit); activation scale + zero point
    assert size_bits(model) == expected_w + qparams + 4 * 32
    assert tensor_bits(torch.tensor([1.0] + [0.0] * 40 + [1.0]), 8)["format"] in ("bitmask", "relative")
    # relative indices need fillers for a gap of 41 > 16: (2 + 2) * 12 = 48 vs bitmask 2*8 + 42 = 58
    t = tensor_bits(torch.tensor([1.0] + [0.0] * 40 + [1.0]), 8)
    assert t["format"] == "relative" and t["bits"] == (2 + 2) * 12 + 2


def test_same_seed_same_record(tmp_path):
    a, _ = run_pipeline(tmp_path / "a", ["cache=false", "seed=3"])
    b, _ = run_pipeline(tmp_path / "b", ["cache=false", "seed=3"])
    keys = [k for k in a if k.split("/")[0] in ("baseline", "prune", "qat", "final", "layers", "size")]
    keys = [k for k in keys if not k.startswith(("seconds", "train_seconds"))]
    assert keys and {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_stages_switch_off(tmp_path):
    rec, _ = run_pipeline(tmp_path, ["prune.ratio=0", "quant=none"])
    assert "prune/test_acc" not in rec and "qat/test_acc" not in rec
    assert rec["final/test_acc"] == rec["baseline/test_acc"]
    assert rec["final/compression_ratio"] == 1.0 and rec["final/bits_w"] == 32
    rec, _ = run_pipeline(tmp_path / "b", ["quant.bits_w=32"])
    assert "qat/test_acc" not in rec and rec["final/test_acc"] == rec["prune/test_acc"]


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, key",
    [
        ("quant.bits_w=1", "bits"),
        ("quant.bits_w=12", "bits"),
        ("quant.bits_w=4.5", "quant.bits_w"),
        ("quant.bits_w=four", "quant.bits_w"),
        ("prune.ratio=1.0", "prune.ratio"),
        ("prune.ratio=-0.1", "prune.ratio"),
        ("prune.scope=everywhere", "prune.scope"),
        ("+prune.ration=0.5", "ration"),
    ],
)
def test_bad_config_refused_before_training(tmp_path, override, key):
    cfg = compose([*TINY, f"cache_dir={tmp_path}", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Pipeline(cfg, tmp_path / "run")
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_bad_config_cli_exit_code(tmp_path):
    proc = run_cli([*TINY, "prune.ratio=1.5", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "prune.ratio" in proc.stderr and "[0, 1)" in proc.stderr
    assert not (tmp_path / "r" / "record.json").exists()
    proc = run_cli([*TINY, "model=resnet9000", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "resnet9000" in proc.stderr and "cnn1d" in proc.stderr


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"x_test": None}, "missing array"),
        ({"y_train": np.zeros(10, dtype=np.int64)}, "lengths must match"),
        ({"x_train": np.full((300, 1, 12, 12), np.nan, dtype=np.float32)}, "non-finite"),
        ({"y_test": np.full(100, 7)}, "labels must lie in"),
        ({"y_test": np.full(100, -1)}, "labels must lie in"),
        ({"x_test": np.zeros((100, 1, 5, 5), dtype=np.float32)}, "shape"),
        ({"y_train": np.array([{"a": 1}] * 300, dtype=object)}, "pickle"),
    ],
)
def test_bad_npz_refused(tmp_path, changes, message):
    path = make_npz(tmp_path / "bad.npz", **changes)
    cfg = compose([*TINY, "data=npz", f"data.path={path}", f"cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ValueError, match=message) as err:
        Pipeline(cfg, tmp_path / "run").run()
    assert "bad.npz" in str(err.value)
    assert not (tmp_path / "cache").exists()  # refused before any training


def test_missing_npz_file(tmp_path):
    cfg = compose([*TINY, "data=npz", f"data.path={tmp_path / 'nope.npz'}", f"cache_dir={tmp_path / 'c'}"])
    with pytest.raises(ValueError, match="nope.npz.*not found"):
        Pipeline(cfg, tmp_path / "run").run()


def test_wheel_ships_configs(tmp_path):
    """`pip install .` (not editable) must carry conf/ and the sweeps inside the package."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("qpexp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("qpexp/conf/config.yaml", "qpexp/conf/data/mnist1d.yaml", "qpexp/conf/sweep/frontier.yaml"):
        assert f in names, f
    for f in [*root.glob("qpexp/**/*.py"), *root.glob("conf/**/*.yaml")]:
        rel = f.relative_to(root).as_posix()
        rel = "qpexp/" + rel if rel.startswith("conf/") else rel
        assert rel in names, rel  # every module and every config travels


CONF = Path(__file__).parents[1] / "conf"
CHOICES = [
    f"{g}={p.stem}"
    for g in ("experiment", "prune", "quant", "model", "data")
    for p in sorted((CONF / g).glob("*.yaml"))
]


@pytest.mark.parametrize("choice", CHOICES)
def test_every_shipped_config_composes_and_validates(choice):
    from qpexp.schema import validate

    extra = ["data.path=x.npz"] if choice in ("data=npz", "data=vision") else []
    extra += ["model._target_=qpexp.models.mlp"] if choice == "model=custom" else []
    typed = validate(compose([choice, *extra]))
    assert typed.seed == 0 and typed.data._target_.startswith("qpexp.")

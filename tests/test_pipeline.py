"""Issue 2: the pipeline end to end, the record contract, honest counts and bad input."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, compose, read_record, run_cli, wandb_offline_runs
from test_vision import mnist_fixture
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


def run_pipeline(tmp_path: Path, overrides: list[str], cache: Path | None = None) -> tuple[dict, Pipeline]:
    cfg = compose([*TINY, f"cache_dir={cache or tmp_path / 'cache'}", "export.enabled=false", *overrides])
    pipe = Pipeline(cfg, tmp_path / "run")
    return pipe.run(), pipe


# -- the final model, rebuilt from what the run saved, and measured here ---------------------------
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


def rebuild_final(rec: dict, pipe: Pipeline):
    """The run's final model rebuilt from its saved stage files (the last stage's ``model.pt``, the
    prune stage's channel structure), its data module and the dense model's counts."""
    from hydra.utils import instantiate

    from qpexp.core.prune import ensure_masks
    from qpexp.core.prune.channel import restore_structure
    from qpexp.pipeline import make_model
    from qpexp.schema import quant_config

    c = pipe.cfg
    dm = instantiate(c.data)
    dm.prepare()
    model = make_model(c, dm)
    shapes = [m.weight.shape for m in model.modules() if isinstance(m, PRUNABLE)]
    dense = {
        "params": sum(p.numel() for p in model.parameters()),
        "weights": sum(s.numel() for s in shapes),
        # the most weights one channel takes: its filter and its columns of the next layer
        "channel_cost": max(
            (a[1:].numel() + b.numel() // a[0] for a, b in zip(shapes, shapes[1:])), default=0
        ),
    }
    stage = next(s for s in ("qat", "prune", "baseline") if f"artifacts/{s}" in rec)
    if "artifacts/prune" in rec:
        structure = safe_torch_load(Path(rec["artifacts/prune"]) / "model.pt").get("structure")
        if structure:
            restore_structure(model, structure, dm.splits["val"][0][:1])
    if stage == "qat":
        quantize_(model, quant_config(c.quant))
    state = safe_torch_load(Path(rec[f"artifacts/{stage}"]) / "model.pt")["model"]
    ensure_masks(model, state)
    model.load_state_dict(state)
    return model.eval(), dm, dense


@torch.no_grad()
def measured_test_acc(model, dm) -> float:
    """Correct argmax predictions over the test split, counted here."""
    x, y = dm.splits["test"]
    pred = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return int((pred == y).sum()) / len(y)


def layers(model) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """(name, conv/linear layer, its weight quantizer or None) in model order."""
    out, inside = [], set()
    for name, m in model.named_modules():
        if isinstance(getattr(m, "layer", None), PRUNABLE) and hasattr(m, "wq"):
            out.append((name, m.layer, m.wq))
            inside.add(id(m.layer))
        elif isinstance(m, PRUNABLE) and id(m) not in inside:
            out.append((name, m, None))
    return out


def sym_codes(w: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric per-output-channel min/max codes ``round(w / S)``, ``S = max|w_c| / (2^(b-1) - 1)``
    (round half to even, ``w / S`` as ``w * (1/S)`` in float32)."""
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(w.reshape(len(w), -1)).max(1) / np.float32(qmax)
    scale = np.maximum(scale, np.float32(np.finfo(np.float32).tiny) * np.float32(2**24))
    inv = (np.float32(1) / scale).reshape(-1, *[1] * (w.ndim - 1))
    return np.clip(np.rint(w * inv), -qmax, qmax)


def stored_bits(codes: np.ndarray, bits: int) -> int:
    """README: the cheapest of dense ``n b``, bitmask ``nnz b + n`` and relative indices
    ``(nnz + pad) (b + 4)`` (a filler per run of 16 positions without a nonzero), plus a 2-bit flag."""
    flat = codes.reshape(-1)
    n, pos = flat.size, np.flatnonzero(flat)
    gaps = np.diff(pos, prepend=-1)
    pad = int(((gaps - 1) // 16).sum())
    return min(n * bits, len(pos) * bits + n, (len(pos) + pad) * (bits + 4)) + 2


def test_stored_bits_by_hand():
    assert stored_bits(np.ones(10), 4) == 40 + 2  # dense
    assert stored_bits(np.array([1] + [0] * 40 + [1]), 8) == (2 + 2) * 12 + 2  # 2 fillers: gap of 41
    assert stored_bits(np.array([3, 0] * 20), 8) == 20 * 8 + 40 + 2  # bitmask 200 < relative 20 x 12
    assert stored_bits(np.array([0] * 15 + [1]), 2) == 1 * 6 + 2  # relative: one entry, gap 16


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
    """The record against the saved final model, measured here: its test accuracy, its size by the
    README's formula (4-bit symmetric per-channel weights at 50% sparsity, 8-bit asymmetric per-tensor
    activations), the dense model at 32 bits a parameter, and its zeros."""
    rec, pipe = run_pipeline(tmp_path, data)
    assert rec["status"] == "not_deployed"
    for k in RECORD_KEYS:
        if k not in ("config", "git_sha", "versions"):  # added by the CLI around the pipeline
            assert k in rec, k
    model, dm, dense = rebuild_final(rec, pipe)
    assert rec["final/test_acc"] == measured_test_acc(model, dm)
    size = zeros = qzeros = 0
    for _, layer, wq in layers(model):
        assert wq is not None and wq.bits == 4
        w = layer.weight.detach().numpy()
        codes = sym_codes(w, 4)
        # codes at 4 bits; a weight scale per output channel (Z = 0 is implicit); the activation's
        # scale and zero point; the bias in float
        size += stored_bits(codes, 4) + len(w) * 32 + 2 * 32 + layer.bias.numel() * 32
        zeros += int((w == 0).sum())
        qzeros += int((codes == 0).sum())
    assert rec["final/size_bits"] == size
    assert rec["dense/size_bits"] == 32 * dense["params"]
    assert rec["final/compression_ratio"] == pytest.approx(32 * dense["params"] / size, rel=1e-12)
    assert zeros == round(0.5 * dense["weights"])  # global unstructured pruning: exactly round(r N)
    assert rec["final/sparsity"] == pytest.approx(zeros / dense["weights"], rel=1e-12)
    assert rec["final/zero_fraction"] == pytest.approx(qzeros / dense["weights"], rel=1e-12)
    assert rec["final/bits_w"] == 4 and rec["final/bits_a"] == 8


def test_npz_images_any_shape(tmp_path):
    path = make_npz(tmp_path / "imgs.npz")
    for model in ("lenet5", "mlp"):
        rec, _ = run_pipeline(
            tmp_path / model, ["data=npz", f"data.path={path}", f"model={model}", "baseline.epochs=5"]
        )
        assert (
            rec["status"] == "not_deployed" and rec["final/test_acc"] > 0.6
        )  # above chance on a learnable signal


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
    # float pruned: min(dense 32*32, bitmask 8*32 + 32, relative (8 + pad) * 36) + 2-bit flag, or rowcol
    # + 3-bit flag. Nonzeros at positions 6,7,14,15,22,23,30,31: gaps 7,1,7,1,... <= 16 -> no padding;
    # rowcol: 4 rows and columns 6, 7 live, a full 4 x 2 block (gaps 0, 1-bit): 4 + 8 + 3 + 8 * 33
    assert size_bits(model) == min(min(32 * 32, 8 * 32 + 32, 8 * 36) + 2, 4 + 8 + 3 + 8 * 33 + 3) + 4 * 32
    quantize_(model, QuantConfig(QuantSpec(4, granularity="channel", symmetric=True), QuantSpec(8)))
    q = model[0]
    w = q.wq(q.layer.weight).detach()
    nnz = int(w.count_nonzero())
    # each row keeps its channel's max, so every row and both columns stay live and at most one of the
    # 8 block positions quantized to 0: every gap in the block is 0 or 1, no filler at 1-bit gaps
    assert nnz >= 7 and bool((w[:, 6:] != 0).any(0).all())
    expected_w = min(min(32 * 4, nnz * 4 + 32, nnz * (4 + 4)) + 2, 4 + 8 + 3 + nnz * (4 + 1) + 3)
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
    rec, pipe = run_pipeline(tmp_path, ["prune.ratio=0", "quant=none"])
    assert "prune/test_acc" not in rec and "qat/test_acc" not in rec
    model, dm, dense = rebuild_final(rec, pipe)  # the baseline's saved model
    assert rec["final/test_acc"] == measured_test_acc(model, dm)
    assert rec["final/size_bits"] == rec["dense/size_bits"] == 32 * dense["params"]
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
def test_every_shipped_config_composes_and_validates(choice, tmp_path):
    from qpexp.schema import validate

    # validation checks that data.path exists (its content is the data module's business)
    vision = (
        choice.startswith("experiment=")
        and "override /data: vision" in (CONF / "experiment" / f"{choice.split('=')[1]}.yaml").read_text()
    )
    extra = [f"data.path={tmp_path}"] if choice in ("data=npz", "data=vision") or vision else []
    extra += ["model._target_=qpexp.models.mlp"] if choice == "model=custom" else []
    typed = validate(compose([choice, *extra]))
    assert typed.seed == 0 and typed.data._target_.startswith("qpexp.")


# -- every preset runs through the pipeline ---------------------------------------------------------
# data=npz/vision: own tests, own files; the real architectures: tests/test_archs.py and
# tests/test_graph_quant.py run each through every stage at tiny widths
ARCHS = {"resnet20", "resnet32", "resnet56", "vgg11", "vgg16", "mobilenetv2", "transformer"}
# the reproduction experiments (and the GRU they need): tests/test_reproduction.py, on fixture data
RUNNABLE = [
    c
    for c in CHOICES
    # data=mnist and model=lenet5_caffe (28x28 images): tests/test_mnist.py on a fixture wheel;
    # quant=codebook (centroids, not a grid): tests/test_codebook.py
    if c not in ("data=npz", "data=vision", "model=gru", "data=mnist", "model=lenet5_caffe", "quant=codebook")
    and c.split("=")[1] not in ARCHS
    and not c.startswith("experiment=repro_")
]
ON_DATA = {
    "model=lenet5": ["data=digits"],  # LeNet-5 takes images
    "data=digits": ["model=lenet5"],
    "model=custom": ["model._target_=qpexp.models.mlp"],  # any callable: here a built-in one
}


@pytest.fixture(scope="module")
def preset_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("preset_cache")  # one baseline per (data, model) for all presets


@pytest.mark.parametrize("choice", RUNNABLE)
def test_every_preset_runs_through_the_pipeline(tmp_path, preset_cache, choice):
    """Each preset on a tiny budget; the record checked against the saved final model and the
    preset's settings: the test accuracy, the pruned count (exactly round(r N) unstructured, within
    half a channel channelwise), the weight codes (integer multiples of the step at the preset's
    width, or powers of two for log), PTQ leaving the weights alone."""
    over = [choice, *ON_DATA.get(choice, [])]
    data = str(compose(over).data.get("name"))
    if data == "mnist":  # an experiment on full MNIST: 200 fixture images in torchvision's layout
        over.append(f"data.path={mnist_fixture(tmp_path / 'mnist', n=200)}")
    elif data != "digits":  # MNIST-1D: 1,000 samples train 3x faster than 5,000
        over.append("data.source.num_samples=1000")
    rec, pipe = run_pipeline(tmp_path, over, cache=preset_cache)
    assert rec["status"] == "not_deployed"
    c = pipe.cfg
    model, dm, dense = rebuild_final(rec, pipe)
    assert rec["final/test_acc"] == measured_test_acc(model, dm)
    assert rec["dense/params"] == dense["params"] and rec["dense/size_bits"] == 32 * dense["params"]
    found = layers(model)
    # pruning: weights removed (zero, or gone with their channel) of the dense model's
    stored = sum(layer.weight.numel() for _, layer, _ in found)
    removed = dense["weights"] - sum(int(layer.weight.count_nonzero()) for _, layer, _ in found)
    assert rec["final/sparsity"] == pytest.approx(removed / dense["weights"], rel=1e-12)
    ratio = c.prune.ratio
    if ratio == 0:
        assert removed == 0 and "artifacts/prune" not in rec
    else:
        assert rec["prune/stopped_at_step"] == rec["prune/steps_planned"]  # no budget in any preset
        goal = round(ratio * dense["weights"])
        if c.prune.scope == "layer" and c.prune.structure == "unstructured":
            # torch.nn.utils.prune's count, layer by layer: round(amount * numel) of each tensor
            goal = sum(round(ratio * layer.weight.numel()) for _, layer, _ in found)
        if c.prune.structure == "unstructured":
            assert removed == goal
        else:
            assert stored == dense["weights"] - removed  # physically removed, the rest nonzero
            assert abs(removed - goal) <= dense["channel_cost"] / 2
    # quantization: the widths, and the codes of the final weights
    bits = c.quant.bits_w
    if bits == 32:
        assert "artifacts/qat" not in rec and all(wq is None for _, _, wq in found)
        assert rec["final/bits_w"] == 32
        return
    assert rec["final/bits_w"] == bits and rec["final/bits_a"] == c.quant.bits_a
    assert rec["final/quant_mode"] == ("ptq" if c.quant.epochs == 0 else "qat")
    qmax = 2 ** (bits - 1) - 1
    codes = []
    for name, layer, wq in found:
        assert wq is not None and wq.bits == bits, name
        rows = wq(layer.weight).detach().double().reshape(layer.weight.shape[0], -1)
        rows = rows[rows.abs().amax(1) > 0]  # a fully pruned row has no step to read
        if c.quant.scheme == "log":  # sign x 2^k, at most 2^(b-1) - 1 exponents per channel
            mags = rows.abs()
            assert bool((torch.frexp(mags[mags > 0])[0] == 0.5).all()), name
            assert max(len(torch.unique(r[r > 0])) for r in mags) <= qmax, name
            continue
        if c.quant.range == "lsq":  # the learned step of each channel
            step = (
                wq.scale.detach()
                .double()
                .reshape(-1)[layer.weight.abs().reshape(len(layer.weight), -1).amax(1) > 0]
            )
        else:  # min/max: the largest weight of each channel is the top code
            step = rows.abs().amax(1) / qmax
        q = rows / step.reshape(-1, 1)
        assert float((q - q.round()).abs().max()) < 1e-3 and float(q.abs().max()) <= qmax + 1e-3, name
        codes.append(q.round().reshape(-1))
    if codes:  # more distinct codes than one bit fewer could give
        assert len(torch.unique(torch.cat(codes))) > 2 ** (bits - 1) - 1
    if c.quant.epochs == 0:  # PTQ: the latent weights are the input model's, bit for bit
        before = safe_torch_load(Path(rec["artifacts/prune" if ratio else "artifacts/baseline"]) / "model.pt")
        for name, layer, _ in found:
            assert torch.equal(layer.weight, before["model"][f"{name}.weight"]), name


def test_the_default_sweeps_recipe_deploys_its_2_bit_point(tmp_path):
    """One point of ``sweep=frontier`` at tiny budgets, export on: channels removed, the first conv at
    8 bits and the rest at 2 bits with the full signed range ({-2, -1, 0, 1}: the codes the integer
    file holds), the file bit-exact against the fake-quantized model, onnxruntime agreeing, and the
    file's payload equal to the accounting's ``final/size_bits``."""
    from qpexp.core.quant.export import load

    recipe = ["prune.structure=channel", "prune.lr=0.01", "quant.narrow_range=false", "quant.first_bits=8"]
    rec, _ = run_pipeline(
        tmp_path,
        [*recipe, "quant.bits_w=2", "quant.range=lsq", "quant.granularity=tensor", "export.enabled=true"],
    )
    assert rec["status"] == "ok", rec.get("error")
    assert rec["final/params"] < rec["dense/params"]  # channels physically removed
    assert [rec[f"layers/{n}/bits_w"] for n in ("conv1", "conv2", "conv3", "fc")] == [8, 2, 2, 2]
    codes = [la.weight_codes for la in load(rec["deploy/path"], arithmetic="float").integer_layers()][1:]
    assert all(int(c.min()) >= -2 and int(c.max()) <= 1 for c in codes)
    assert any(int(c.min()) == -2 for c in codes)  # the fourth level is used
    assert rec["deploy/roundtrip_codes_equal"] is True and rec["deploy/roundtrip_max_abs_diff"] == 0.0
    assert rec["deploy/onnx_acc_diff"] <= 0.002
    assert rec["deploy/accounted_payload_bits"] == rec["final/size_bits"]


def test_stage_logs_train_and_val_accuracy_counted_by_hand(tmp_path):
    """With lr 0 the model never moves, so the logged epoch accuracies must equal a count over the
    loaders made here: argmax == label, summed over every batch, over the split's size."""
    import numpy as np

    from qpexp import models
    from qpexp.data import ArrayDataModule
    from qpexp.run.pipeline import fit
    from qpexp.train.stages import BaselineStage

    rng = np.random.default_rng(1)
    x = rng.standard_normal((260, 1, 40)).astype(np.float32)
    y = rng.integers(0, 3, 260)
    arrays = {"x_train": x[:200], "y_train": y[:200], "x_test": x[200:], "y_test": y[200:]}
    dm = ArrayDataModule(source=lambda: arrays, name="toy", val_fraction=0.25, batch_size=32)
    dm.setup()
    torch.manual_seed(0)
    model = models.mlp((1, 40), 3)
    stage = BaselineStage(model, num_classes=3, lr=0.0, epochs=1)
    fit(stage, dm, 1, tmp_path, None, {})

    def by_hand(split):
        model.eval()
        with torch.no_grad():
            pairs = [(int((model(xb).argmax(1) == yb).sum()), len(yb)) for xb, yb, *_ in dm.loader(split)]
        return sum(c for c, _ in pairs) / sum(n for _, n in pairs)

    logged = stage.trainer.callback_metrics
    assert float(logged["baseline/val/acc"]) == pytest.approx(by_hand("val"), abs=1e-7)
    assert float(logged["baseline/train/acc"]) == pytest.approx(by_hand("train"), abs=1e-7)
    assert stage.best_val == pytest.approx(by_hand("val"), abs=1e-12)

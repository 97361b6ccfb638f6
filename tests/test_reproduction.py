"""Issue 13: the reproduction configs, the models they need, Han's threshold rule and qpexp-report."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from conftest import compose
from test_vision import cifar_fixture, mnist_fixture
from torch import nn

from qpexp.pipeline import Pipeline
from qpexp.schema import validate

CONF = Path(__file__).parents[1] / "conf"
REPRO = sorted(p.stem for p in (CONF / "experiment").glob("repro_*.yaml"))
TABLE = yaml.safe_load((Path(__file__).parents[1] / "qpexp" / "reproduction.yaml").read_text())
TINY = [
    "baseline.epochs=1",
    "prune.steps=2",
    "prune.finetune_epochs=1",
    "prune.agp_dt=1",
    "quant.epochs=1",
    "quant.calib_batches=2",
    "logger=none",
    "export.enabled=false",
]


def _data_overrides(exp: str, root: Path) -> list[str]:
    """Fixture data in the real on-disk formats for the MNIST and CIFAR rows; 1,000 MNIST-1D samples
    otherwise. Which data set an experiment uses is read from its composed config (an experiment may
    compose another one, as Deep Compression's compose Han et al. 2015's)."""
    data = compose([f"experiment={exp}"]).data
    name = str(data.get("name"))
    if name == "digits":
        return []
    if "cifar" in name:
        return [f"data.path={cifar_fixture(root, n=40)}"]
    if "mnist" in name and name != "mnist1d":  # data=mnist / vision read torchvision's layout under data.path
        return [f"data.path={mnist_fixture(root, n=200)}"]
    return ["data.source.num_samples=1000"]


def test_every_table_row_names_a_shipped_experiment():
    names = {r["experiment"] for r in TABLE["rows"]}
    assert names == set(REPRO)  # every reproduction config has a row, every row a config
    assert all(r["device"] in ("cpu", "gpu") for r in TABLE["rows"])


@pytest.mark.parametrize("exp", REPRO)
def test_repro_config_composes_every_sweep_point(exp, tmp_path):
    """Each experiment is a sweep over at least 3 seeds, and every value of every swept key composes
    into a config the schema accepts."""
    over = [f"experiment={exp}", *_data_overrides(exp, tmp_path)]
    cfg = compose(over)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = dict(cfg.hydra.sweeper.params)
    assert [int(s) for s in str(params["seed"]).split(",")] == [0, 1, 2]
    assert cfg.hydra.sweep.dir == f"outputs/repro/{exp}"
    for key, values in params.items():
        for v in str(values).split(","):
            validate(compose([*over, f"{key}={v}"]))


WIDTH = {"vgg16": 0.125, "resnet56": 0.25, "resnet20": 0.25}


@pytest.mark.parametrize("exp", REPRO)
def test_repro_config_runs_on_a_tiny_budget(exp, tmp_path):
    over = [
        f"experiment={exp}",
        *TINY,
        *_data_overrides(exp, tmp_path / "data"),
        f"cache_dir={tmp_path / 'c'}",
    ]
    arch = compose(over).model._target_.rsplit(".", 1)[1]
    over += [f"model.width={WIDTH[arch]}"] if arch in WIDTH else []
    over += ["model.hidden=[50,50]"] if exp == "repro_lottery_mnist1d" else []
    cfg = compose(over)
    pipe = Pipeline(cfg, tmp_path / "run")
    rec = pipe.run()
    assert rec["status"] == ("ok" if pipe.quant_on and cfg.export.enabled else "not_deployed")
    assert 0 <= rec["final/test_acc"] <= 1
    if cfg.prune.ratio > 0:  # the pruned fraction counted from the model, at the configured target
        if cfg.prune.compact:  # dead units removed after the last step: at least the target
            assert rec["final/sparsity"] >= cfg.prune.ratio - 0.05
        else:
            assert rec["final/sparsity"] == pytest.approx(cfg.prune.ratio, abs=0.05)
        steps = 1 if cfg.prune.schedule == "oneshot" else cfg.prune.steps
        curve = [rec[f"prune/curve/{s}/sparsity"] for s in range(1, steps + 1) if cfg.prune.schedule != "agp"]
        assert curve == sorted(curve)  # every step's model, sparser step by step
        if curve and cfg.prune.structure == "unstructured":  # the last step's model is the one kept
            assert rec[f"prune/curve/{steps}/test_acc"] == rec["prune/test_acc"]
            if cfg.prune.compact:  # dead units removed after the last step: more pruned, same function
                assert rec["prune/sparsity"] >= rec[f"prune/curve/{steps}/sparsity"]
            else:
                assert rec[f"prune/curve/{steps}/sparsity"] == rec["prune/sparsity"]


# -- the models the report needs: parameter counts by hand against the papers' ----------------------
def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_mnist1d_model_param_counts():
    from qpexp.models import cnn1d, gru, mlp

    # GRU (Greydanus 2020: ~5.1k): per direction 3 gates x (W_ih 6x1 + W_hh 6x6 + b_ih 6 + b_hh 6),
    # two directions; head: 2 x 6 x 40 step outputs -> 10
    assert _count(gru((40,), 10)) == 2 * 3 * (6 * 1 + 6 * 6 + 6 + 6) + (2 * 6 * 40 * 10 + 10) == 5134
    assert _count(mlp((40,), 10, hidden=())) == 40 * 10 + 10  # logistic regression
    assert _count(mlp((40,), 10)) == (40 * 100 + 100) + (100 * 100 + 100) + (100 * 10 + 10) == 15210  # ~15k
    assert _count(cnn1d((40,), 10)) == 5210  # the paper's CNN, ~5.2k
    # the configs build exactly these
    from hydra.utils import instantiate

    for name, n in (("gru", 5134), ("logistic", 410), ("mlp", 15210), ("cnn1d", 5210)):
        assert _count(instantiate(compose([f"model={name}"]).model)((40,), 10)) == n


def test_gru_matches_torch_gru_by_hand():
    """The GRU reads one sample per step, both directions, and classifies all steps' outputs."""
    from qpexp.models import gru

    torch.manual_seed(0)
    m = gru((40,), 10)
    x = torch.randn(3, 40)
    out, _ = m.gru(x[:, :, None])  # (N, 40, 12)
    assert torch.allclose(m(x), m.fc(out.reshape(3, -1)))
    with pytest.raises(ValueError, match="1-D signals"):
        gru((1, 8, 8), 10)


# -- Han et al. 2015: threshold = quality x std of each layer ------------------------------------------
def test_han_threshold_rule_by_hand():
    """Layer A = [1, -2, 3, -4], layer C = [0.5, 1, 1.5, 6]; sample stds 3.109 and 2.533. Pruning 3 of
    the 8 weights globally by |w| / std is the rule |w| < q std(layer) with q = 0.5 (any q in
    (0.395, 0.592)): A loses 1, C loses 0.5 and 1. Plain global magnitude would prune 0.5, 1, 1 (and
    leave C's 1.5 over A's 1: the same count, different layers' shares)."""
    from qpexp.core.prune import PruneConfig, get_mask, prune_step

    a, c = [1.0, -2.0, 3.0, -4.0], [0.5, 1.0, 1.5, 6.0]
    q = 0.5
    expected = [[float(abs(w) >= q * statistics.stdev(ws)) for w in ws] for ws in (a, c)]
    assert expected == [[0, 1, 1, 1], [0, 0, 1, 1]]
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(a).reshape(2, 2))
        model[1].weight.copy_(torch.tensor(c).reshape(2, 2))
    cfg = PruneConfig(ratio=3 / 8, scope="global", criterion="std")
    sp = prune_step(model, cfg, 3 / 8)
    assert get_mask(model[0]).reshape(-1).tolist() == expected[0]
    assert get_mask(model[1]).reshape(-1).tolist() == expected[1]
    assert sp == {"0": 0.25, "1": 0.5}  # per-layer pruned fractions: kept 75% and 50%


def test_han_std_over_surviving_weights():
    """An iterative step measures the std over the weights still there (pruned zeros left out)."""
    from qpexp.core.prune.criteria import Target
    from qpexp.core.prune.criteria.std import Std

    w = torch.tensor([0.0, 0.0, 2.0, 4.0, 6.0])
    scores = Std()(Target("x", w))
    assert torch.allclose(scores, w.abs() / statistics.stdev([2.0, 4.0, 6.0]))


# -- qpexp-report on synthetic records -----------------------------------------------------------------
def _sweep(root: Path, exp: str, points: list[dict], task: list[str] | None = None) -> None:
    d = root / exp
    d.mkdir(parents=True)
    task = task or [f"experiment={exp}", "logger=none"]
    (d / "multirun.yaml").write_text(
        yaml.safe_dump(
            {"hydra": {"runtime": {"choices": {"experiment": exp}}, "overrides": {"task": task, "hydra": []}}}
        )
    )
    for i, rec in enumerate(points):
        p = d / f"point{i}"
        p.mkdir()
        base = {
            "status": "ok",
            "versions": {"qpexp": "0.1.0", "torch": "2.x"},
            "git_sha": "abcdef1234",
            "seconds/total": 10.0,
        }
        (p / "record.json").write_text(json.dumps({**base, **rec}))


def test_report_on_synthetic_records(tmp_path):
    from qpexp.report import cli

    runs = tmp_path / "runs"
    # logistic: 30, 32, 34 % -> mean 32.00, sample std 2.00
    _sweep(runs, "repro_mnist1d_logistic", [
        {"seed": s, "final/test_acc": a, "config": {"seed": s, "baseline": {"epochs": 150, "lr": 0.01}}}
        for s, a in ((0, 0.30), (1, 0.32), (2, 0.34))
    ])  # fmt: skip
    # Han LeNet-300-100: fc1 sparsity 0.90 / 0.94 -> kept 10 and 6 % -> 8.00 +- 2.83 (sample std);
    # x fewer weights 1 / (1 - s): s = 0.9, 0.95 -> 10, 20 -> 15.00 +- 7.07
    _sweep(runs, "repro_han_lenet300_digits", [
        {"seed": 0, "final/test_acc": 0.98, "baseline/test_acc": 0.99, "layers/fc1/sparsity": 0.90, "final/sparsity": 0.9, "config": {"seed": 0}},
        {"seed": 1, "final/test_acc": 0.96, "baseline/test_acc": 0.97, "layers/fc1/sparsity": 0.94, "final/sparsity": 0.95, "config": {"seed": 1}},
    ])  # fmt: skip
    # lottery: step sparsities 0.5, 0.86, 0.92: nearest to 0.9 is 0.92 (test acc 0.70 and 0.74 -> 72.00 +- 2.83)
    lot = []
    for s, crit, accs in (
        (0, "l1", (0.6, 0.68, 0.70)),
        (1, "l1", (0.6, 0.69, 0.74)),
        (0, "random", (0.6, 0.6, 0.5)),
    ):
        rec = {
            "seed": s,
            "baseline/test_acc": 0.66,
            "final/test_acc": accs[-1],
            "config": {"seed": s, "prune": {"criterion": crit}},
        }
        for i, (sp, a) in enumerate(zip((0.5, 0.86, 0.92), accs), start=1):
            rec[f"prune/curve/{i}/sparsity"], rec[f"prune/curve/{i}/test_acc"] = sp, a
        lot.append(rec)
    _sweep(runs, "repro_lottery_mnist1d", lot)

    # fronts: at >= 8x the 10x config (acc 80, 82) wins over a more accurate 6x one (90); of the two at
    # >= 8x, the one better on validation (val 0.85 against 0.84) is reported although the other
    # (12x, test 0.88) is better on test
    def front(ratio, bits, accs, val=0.85):
        return [{"seed": s, "final/test_acc": a, "final/val_acc": val, "final/compression_ratio": ratio,
                 "final/size_bits": 1000 / ratio, "dense/size_bits": 1000, "baseline/test_acc": 0.95,
                 "config": {"seed": s, "prune": {"ratio": 0.5}, "quant": {"bits_w": bits}}} for s, a in enumerate(accs)]  # fmt: skip

    _sweep(
        runs, "repro_front_prune_quant",
        front(10.0, 2, (0.80, 0.82)) + front(6.0, 4, (0.90, 0.90)) + front(12.0, 3, (0.88, 0.88), val=0.84),
    )  # fmt: skip
    _sweep(runs, "repro_front_quant_only", front(6.0, 4, (0.90, 0.91)))
    # a failed point is left out, a record of an experiment not in the table is ignored
    _sweep(
        runs, "repro_mnist1d_mlp", [{"seed": 0, "status": "failed", "error": "boom", "config": {"seed": 0}}]
    )
    out = tmp_path / "site" / "REPRODUCTION.md"
    assert cli([str(runs), "--out", str(out)]) == 0
    text = out.read_text()
    rows = {
        line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ") and " | " in line
    }
    assert "| 32.00 +- 2.00 | 0, 1, 2 | cpu |" in rows["MNIST-1D, logistic regression: test accuracy %"]
    assert "| 8.00 +- 2.83 | 0, 1 |" in rows["LeNet-300-100, digits: fc1 kept %"]
    assert "| 15.00 +- 7.07 | 0, 1 |" in rows["LeNet-300-100, digits: x fewer weights"]
    assert "| 2.00 +- 1.41 | 0, 1 |" in rows["LeNet-300-100, digits: dense error %"]  # errors 1 and 3 %
    assert "| 72.00 +- 2.83 | 0, 1 |" in rows["magnitude + rewind, ~90% sparse: test accuracy %"]
    assert "step at 92.0% sparse" in rows["magnitude + rewind, ~90% sparse: test accuracy %"]
    assert "| 50.00 +- 0.00 | 0 |" in rows["random masks + rewind, ~90% sparse: test accuracy %"]
    picked = rows["MNIST-1D CNN, prune + quantize, test accuracy % of the config best on validation at >= 8x"]
    assert (
        "| 81.00 +- 1.41 | 0, 1 |" in picked
        and "quant.bits_w=2, 10.0x, chosen on validation (85.00%)" in picked
    )
    assert (
        "no config reaches 8x"
        in rows["MNIST-1D CNN, quantize only, test accuracy % of the config best on validation at >= 8x"]
    )
    assert "not run here" in rows["MNIST-1D, MLP 40-100-100-10: test accuracy %"]  # its only record failed
    assert "previously 60.97 +- 1.26" in rows["MNIST-1D, MLP 40-100-100-10: test accuracy %"]  # previous_text
    magnitude = rows["magnitude + rewind, ~90% sparse: test accuracy %"]
    assert "step at 92.0% sparse; previously 68.30" in magnitude
    assert "not run here" in rows["VGG-16, CIFAR-10: pruned error %"]  # a GPU row without records
    assert "`qpexp experiment=repro_mnist1d_logistic logger=none`" in text  # the command that ran it
    assert "qpexp 0.1.0, torch 2.x; git abcdef12" in text
    assert "30 s in all, 10 s per run" in text
    assert "- budget: baseline 150 epochs at lr 0.01\n" in text
    for png in ("lottery_mnist1d.png", "fronts_mnist1d.png"):
        f = tmp_path / "site" / "docs" / "reproduction" / png
        assert f.stat().st_size > 1000 and f"](docs/reproduction/{png})" in text


def test_report_missing_dir(tmp_path, capsys):
    from qpexp.report import cli

    assert cli([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_gru_quantized_keeps_its_cell_in_float(tmp_path):
    """model=gru with QAT: the linear head is quantized, the recurrent cell stays float and says so
    (quant/float_ops), and its weights count 32 bits in the size; pruning reaches the cell's matrices."""
    cfg = compose([*TINY, "model=gru", "data.source.num_samples=1000", f"cache_dir={tmp_path / 'c'}"])
    rec = Pipeline(cfg, tmp_path / "run").run()
    assert rec["status"] == "not_deployed" and "GRU" in rec["quant/float_ops"].split(",")
    assert rec["layers/fc/bits_w"] == 4 and rec["layers/gru.weight_hh_l0/bits_w"] == 32
    assert rec["layers/gru.weight_hh_l0/sparsity"] > 0  # global magnitude pruning reached the cell
    cell = 2 * 3 * (6 * 1 + 6 * 6)  # weight_ih and weight_hh of both directions
    head = 2 * 6 * 40 * 10
    assert rec["final/bits_w"] == pytest.approx((32 * cell + 4 * head) / (cell + head))


def test_report_command_names_the_cache_folder_the_records_used(tmp_path):
    """Issue 20: the printed command reproduces the records exactly: the cache folder they read and
    filled (and a cache setting off by default) is in it unless the sweep's overrides gave it."""
    from qpexp.report import cli

    runs = tmp_path / "runs"
    config = {"seed": 0, "cache": True, "cache_dir": "outputs/repro/cache", "cache_code_fingerprint": False}
    _sweep(runs, "repro_mnist1d_logistic", [{"seed": 0, "final/test_acc": 0.3, "config": config}])
    _sweep(runs, "repro_mnist1d_mlp", [{"seed": 0, "final/test_acc": 0.6, "config": {**config, "cache_dir": "c2"}}],
           task=["experiment=repro_mnist1d_mlp", "cache_dir=c2"])  # fmt: skip
    out = tmp_path / "REPRODUCTION.md"
    assert cli([str(runs), "--out", str(out)]) == 0
    text = out.read_text()
    want = "`qpexp experiment=repro_mnist1d_logistic logger=none cache_dir=outputs/repro/cache cache_code_fingerprint=false`"
    assert want in text
    assert "`qpexp experiment=repro_mnist1d_mlp cache_dir=c2 cache_code_fingerprint=false`" in text


# -- issue 21: the rows that missed ------------------------------------------------------------------
def test_mnist1d_mlp_recipe(tmp_path):
    """The MLP row missed (61.0% against the notebook's 65.1%) because of its recipe, not the framework:
    label smoothing 0.1 and cosine decay (qpexp's defaults, tuned for the CNN) cost the MLP 2.3 points
    of validation accuracy, and the old 500-sample carve-out left 3,500 training samples. The experiment
    now trains as the authors' notebook does, and qpexp's baseline stage so configured is a plain torch
    loop, bit for bit: Adam at a constant learning rate, plain cross-entropy, batches of 100 in the data
    module's per-epoch order, the best validation epoch kept."""
    import torch.nn.functional as F

    from qpexp.models import mlp

    cfg = compose(["experiment=repro_mnist1d_mlp"])
    b = cfg.baseline
    assert (b.label_smoothing, b.min_lr_frac, b.lr, b.weight_decay) == (0.0, 1.0, 0.01, 0.0)
    assert cfg.data.batch_size == 100 and b.epochs * 40 == 6000  # 40 batches an epoch: the notebook's steps
    assert cfg.data.source.val_samples > 0  # validation drawn apart: training keeps all 4,000 samples

    seed, epochs = 1, 3
    over = ["experiment=repro_mnist1d_mlp", "logger=none", "data.source.num_samples=1000",
            f"baseline.epochs={epochs}", f"seed={seed}", f"cache_dir={tmp_path / 'c'}"]  # fmt: skip
    pipe = Pipeline(compose(over), tmp_path / "run")
    rec = pipe.run()
    dm = pipe.data()
    (x, y), (xv, yv), (xt, yt) = (dm.splits[s] for s in ("train", "val", "test"))
    assert len(y) == 800  # make_dataset's 80% train split, whole

    def acc(model, x, y):
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    torch.manual_seed(seed)
    model = mlp((40,), 10)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    best = (-1.0, None, -1)
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for i in range(0, len(y), 100):
            batch = order[i : i + 100]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if acc(model, xv, yv) > best[0]:
            best = (acc(model, xv, yv), {k: v.clone() for k, v in model.state_dict().items()}, epoch)
    model.load_state_dict(best[1])
    assert rec["baseline/best_epoch"] == best[2]
    assert rec["baseline/val_acc"] == pytest.approx(best[0], abs=1e-6)
    assert rec["baseline/test_acc"] == pytest.approx(acc(model, xt, yt), abs=1e-6)


def test_frontier_mnist_sweep_is_deep_compression_changed_by_its_axes_only():
    """sweep=frontier_mnist: the experiment repro_deep_compression_lenet5_mnist, with the sweep's
    axes (one seed, ratio x fc codebook bits) and the Huffman-coded ratio axis, every point valid."""
    from omegaconf import OmegaConf

    from qpexp.sweep.check import sweep_points

    cfg, exp = compose(["sweep=frontier_mnist"]), compose(["experiment=repro_deep_compression_lenet5_mnist"])
    assert (
        str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.hydra.sweep.dir == "outputs/sweeps/frontier_mnist"
    )
    assert cfg.hydra.callbacks.frontier.size == "huffman"
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert params == {"seed": ["0"], "quant.bits_w": ["4", "5"], "prune.ratio": ["0.917", "0.97", "0.98"]}
    for key in (
        "data",
        "model",
        "baseline",
        "prune",
        "quant.scheme",
        "quant.overrides",
        "quant.epochs",
        "quant.lr",
    ):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(exp, key), key
    points = sweep_points(cfg)
    assert len(points) == 6
    for point in points:
        typed = validate(compose(["sweep=frontier_mnist", *point]))
        assert typed.data.name == "mnist" and typed.quant.scheme == "codebook"


def test_frontier_mnist_reference_is_the_published_rows():
    """The papers' points drawn beside the MNIST front are the LeNet-5 rows of qpexp/reproduction.yaml
    (one home for a published number): for each paper, its error and its ratios, in the table's order."""
    import csv

    ref = CONF / "sweep" / "references" / "lenet5_mnist_papers.csv"
    assert str(compose(["sweep=frontier_mnist"]).hydra.callbacks.frontier.reference).endswith(
        "sweeps/references/lenet5_mnist_papers.csv"
    )
    points = []
    lenet5 = ("repro_deep_compression_lenet5_mnist", "repro_beyond_lenet5_mnist")
    for paper in dict.fromkeys(r["paper"] for r in TABLE["rows"] if r["experiment"] in lenet5):
        rows = [r for r in TABLE["rows"] if r["paper"] == paper and r["setting"].startswith("LeNet-5, MNIST")]
        error = next(r["published"] for r in rows if r["metric"].get("as") == "error")
        if error is None:  # qpexp's own rows: goals, not published points
            continue
        ratios = [r["published"] for r in rows if "ratio" in r["metric"].get("key", "") and r["published"]]
        points += [(1 - error / 100, ratio) for ratio in ratios]
    rows = list(csv.DictReader(ref.open()))
    assert len(rows) == len(points) == 4
    for r, (acc, ratio) in zip(rows, points):
        assert float(r["compression_ratio"]) == ratio
        assert float(r["test_acc"]) == pytest.approx(acc, abs=1e-12)

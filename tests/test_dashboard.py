"""Dashboards: frontier.html (its embedded data, and the page in a real headless Chromium), the
frontier run's native W&B charts, point runs' config axes and groups, ``wandb sync`` of an offline
sweep, and the ``qpexp-wandb-workspace`` command (built and checked without a server).

Everything runs on hand-written records (two small sweeps and a peer reference CSV in the format of
``../shared/anchors/``); nothing trains. ``QPEXP_SCREENSHOT=docs/frontier.png pytest
tests/test_dashboard.py -k chromium`` also copies the screenshot the browser test makes (the README's).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qpexp.dashboard import build_view, read_csv, typed
from qpexp.frontier import hypervolume_above, write_frontier

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DENSE_BITS = 166_720
# the MNIST-1D CNN's layers: weights, biases, MACs per sample
LAYERS = {
    "conv1": (75, 25, 1000),
    "conv2": (1875, 25, 15000),
    "conv3": (1875, 25, 14000),
    "fc": (1250, 10, 1250),
}
BITS_PENALTY = {2: 3.2, 4: 0.9, 8: 0.3}  # accuracy points lost to quantization
RATIO_PENALTY = {0.5: 0.2, 0.6: 0.6, 0.7: 1.5}  # ... and to pruning
PEER = """method,scope,target_sparsity,bits_w,bits_a,n,test_acc,acc_std,realized_sparsity,size_bits,compression_ratio
fp32_dense,none,0,32,32,3,0.91467,0.0051,0,166720,1
prune_fp32,global,0.5,32,32,3,0.90233,0.0072,0.4999,89869,1.8551
qat,none,0,8,8,3,0.91233,0.0040,0,46704,3.5697
qat,none,0,4,8,3,0.90767,0.0136,0,25815,6.4582
prune+qat,global,0.5,4,8,3,0.89867,0.0057,0.5,20941,7.9614
prune+qat,global,0.7,4,8,3,0.87100,0.0110,0.7,15012,11.106
prune+qat,global,0.5,2,8,3,0.82400,0.0210,0.5,12811,13.014
"""


def _config(bits, ratio, scope, seed, kind="none", name="qpexp"):
    return {
        "seed": seed,
        "name": name,
        "data": {"name": "mnist1d", "seed": seed},
        "model": {"_target_": "qpexp.models.cnn1d", "channels": 25},
        "baseline": {"epochs": 150, "lr": 0.01},
        "trainer": {"deterministic": False},
        "prune": {"ratio": ratio, "scope": scope, "structure": "unstructured", "criterion": "l1"},
        "quant": {"bits_w": bits, "bits_a": 8, "granularity": "tensor", "range": "lsq", "epochs": 40},
        "logger": {"kind": kind, "project": "qpexp-test", "group": None, "mode": None},
    }


def _record(bits, ratio, scope, seed, base_acc, gain=1.0, kind="none"):
    """A point's record: per-layer sparsity, bits and sizes by the README's formula (bitmask or dense)."""
    rec = {"status": "ok", "seed": seed, "config": _config(bits, ratio, scope, seed, kind)}
    total, macs, nnz_all = 0, 0, 0
    for i, (name, (n, bias, m)) in enumerate(LAYERS.items()):
        sp = ratio if scope == "layer" else min(0.95, ratio * (0.55, 1.05, 1.05, 0.95)[i])
        nnz = round(n * (1 - sp))
        weight = min(n * bits, nnz * bits + n) + 2
        rec[f"layers/{name}/sparsity"] = 1 - nnz / n
        rec[f"layers/{name}/bits_w"] = bits
        rec[f"layers/{name}/format"] = "dense" if weight == n * bits + 2 else "bitmask"
        rec[f"size/{name}/weight_bits"] = weight
        rec[f"size/{name}/qparam_bits"] = 32
        rec[f"size/{name}/bias_bits"] = 32 * bias
        total += weight + 32 + 32 * bias
        macs += m
        nnz_all += nnz
    rec["size/other_bits"] = 0
    drop = gain * (BITS_PENALTY[bits] + RATIO_PENALTY[ratio] + (0.4 if scope == "layer" else 0.0))
    acc = round(base_acc - drop / 100 + 0.003 * ((seed * 7 + bits) % 3 - 1), 4)
    rec.update(
        {
            "baseline/val_acc": base_acc,
            "baseline/test_acc": base_acc,
            "final/val_acc": acc,
            "final/test_acc": acc,
            "final/sparsity": 1 - nnz_all / sum(v[0] for v in LAYERS.values()),
            "final/size_bits": total,
            "dense/size_bits": DENSE_BITS,
            "final/compression_ratio": DENSE_BITS / total,
            "final/bits_w": bits,
            "final/bits_a": 8,
            "final/macs": macs,
            "final/bops": macs * bits * 8,
            "deploy/onnx_latency_ms": round(0.35 + 0.02 * bits + 0.1 * (1 - ratio), 4),
            "deploy/fp32_onnx_latency_ms": 1.07,
            "prune/targets": [ratio / 2, ratio],
        }
    )
    return rec


def _write(root: Path, name: str, rec: dict | None, hydra_cfg: dict | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    if rec is not None:
        (d / "record.json").write_text(json.dumps(rec))
    if hydra_cfg is not None:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "config.yaml").write_text(json.dumps(hydra_cfg))  # JSON is YAML
    return d


def make_sweep(root: Path, gain: float = 1.0, seeds=(0, 1), kind: str = "none", extra: bool = True) -> Path:
    """bits {2,4,8} x ratio {0.5,0.6,0.7} x scope {global,layer} (the default frontier's grid), plus a
    failed point, a killed (record-less) one, and one grid point whose deployment did not match."""
    for seed in seeds:
        base = (0.954, 0.946, 0.924)[seed]
        for bits in (2, 4, 8):
            for ratio in (0.5, 0.6, 0.7):
                for scope in ("global", "layer"):
                    rec = _record(bits, ratio, scope, seed, base, gain, kind)
                    if extra and (bits, ratio, scope, seed) == (8, 0.5, "global", 0):  # stays on the front
                        rec.update(
                            status="deploy_mismatch", status_reason="onnx test acc 0.851 vs 0.951 (> 0.2 pt)"
                        )
                    _write(
                        root, f"prune.ratio={ratio},prune.scope={scope},quant.bits_w={bits},seed={seed}", rec
                    )
    if extra:
        failed = {
            "status": "failed",
            "error": "FloatingPointError: loss is nan at epoch 3 <of 40>",
            "config": _config(2, 0.9, "layer", 0, kind),
        }
        _write(root, "prune.ratio=0.9,prune.scope=layer,quant.bits_w=2", failed)
        _write(root, "prune.ratio=0.7,quant.bits_w=3", None, hydra_cfg=_config(3, 0.7, "global", 0, kind))
    return root


def embedded(page: str, element_id: str):
    m = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', page, re.S)
    assert m, element_id
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory):
    """Two sweeps (the second a better method) and the peer reference, merged into one page."""
    tmp = tmp_path_factory.mktemp("dash")
    a = make_sweep(tmp / "frontier")
    b = make_sweep(tmp / "frontier_distill", gain=0.7, extra=False)
    ref = tmp / "peer_frontier.csv"
    ref.write_text(PEER)
    out = tmp / "compare"
    t0 = time.perf_counter()
    summary = write_frontier([a, b], out, reference=ref, wandb=False, quiet=True)
    return {"a": a, "b": b, "ref": ref, "out": out, "summary": summary, "seconds": time.perf_counter() - t0}


def _csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _ok(row: dict) -> bool:
    return row["status"] in ("ok", "deploy_mismatch", "deploy_error") and row["final/test_acc"] != ""


# -- the page's data -------------------------------------------------------------------------------
def test_embedded_data_equals_frontier_csv(two_sweeps):
    out = two_sweeps["out"]
    page = (out / "frontier.html").read_text(encoding="utf-8")
    header, rows = _csv_rows(out / "frontier.csv")
    data = embedded(page, "frontier-csv")
    assert data["columns"] == header and data["rows"] == rows  # every cell, as the CSV has it
    assert two_sweeps["summary"]["files"]["html"] == str(out / "frontier.html")
    # self-contained: plotly.js inline, no external script or stylesheet (the browser test checks
    # that the page requests nothing but itself; plotly's bundle names a CDN for topojson it never needs)
    assert "plotly.js" in page[:200_000] and len(page) > 3_000_000
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=|@import", page)


def test_view_matches_csv_means_fronts_and_summary(two_sweeps):
    out, summary = two_sweeps["out"], two_sweeps["summary"]
    view = embedded((out / "frontier.html").read_text(encoding="utf-8"), "frontier-view")
    header, raw = _csv_rows(out / "frontier.csv")
    rows = [dict(zip(header, r)) for r in raw]
    fronts = {f["name"]: f for f in view["fronts"]}
    assert list(fronts) == ["frontier", "frontier_distill", "reference: peer_frontier"]
    # every ok row (dense rows included) is a member of a config mean of its own sweep's front
    members: dict[int, set] = {}
    for f in view["fronts"]:
        for g in f["groups"]:
            if f["kind"] == "reference":  # rows of the reference CSV, not of frontier.csv
                assert g["members"] == [] and g["method"]
                continue
            accs = [float(rows[i]["final/test_acc"]) for i in g["members"]]
            ratios = [float(rows[i]["final/compression_ratio"]) for i in g["members"]]
            assert g["acc"] == pytest.approx(sum(accs) / len(accs)) and g["n"] == len(accs)
            assert g["ratio"] == pytest.approx(sum(ratios) / len(ratios))
            if len(accs) > 1:
                m = sum(accs) / len(accs)
                assert g["acc_std"] == pytest.approx(
                    math.sqrt(sum((x - m) ** 2 for x in accs) / (len(accs) - 1))
                )
            for i in g["members"]:
                members.setdefault(i, set()).add(f["name"])
    for i, r in enumerate(rows):
        if not _ok(r):
            assert i not in members
        elif r["point"] == "run":
            assert members[i] == {r["run_dir"].split("/")[0]}
        else:  # the one shared baseline is each sweep's dense reference
            assert members[i] == {"frontier", "frontier_distill"}
    # not-ok points listed with their errors (deploy_mismatch too, which also stays on the front)
    not_ok = {r["run_dir"]: r for r in rows if r["point"] == "run" and r["status"] != "ok"}
    assert {f["run_dir"]: f["status"] for f in view["failed"]} == {k: r["status"] for k, r in not_ok.items()}
    assert {f["status"] for f in view["failed"]} == {"failed", "missing", "deploy_mismatch"}
    assert any("loss is nan" in (f["error"] or "") for f in view["failed"])
    # each front's numbers: frontier.py's definitions (checked against the merged summary's)
    table = {t["front"]: t for t in view["table"]}
    merged = table["all sweeps merged (frontier.json)"]
    for k in ("best_ratio_within_1pt", "best_ratio_within_2pt", "hypervolume_absolute", "dense_acc"):
        assert merged[k] == pytest.approx(summary[k])
    ref = table["reference: peer_frontier"]
    assert ref["best_ratio_within_1pt"] == pytest.approx(summary["reference/best_ratio_within_1pt"])
    assert ref["hypervolume_absolute"] == pytest.approx(summary["reference/hypervolume_absolute"])
    assert view["hv_reference_acc"] == pytest.approx(summary["hv_reference_acc"])
    # each sweep's hypervolume against the one shared point: its front chosen on validation (the
    # Pareto configs), at their test accuracy means
    for name in ("frontier", "frontier_distill"):
        means = [(g["acc"], g["ratio"]) for g in fronts[name]["groups"] if g["pareto"]]
        want = hypervolume_above(means, summary["hv_reference_acc"])
        assert table[name]["hypervolume_absolute"] == pytest.approx(want) and want > 0
    # a click's bars: per-layer sparsity and bits, and where the bits go, from the row's own keys
    i = next(i for i, r in enumerate(rows) if r["point"] == "run" and r["status"] == "ok")
    d = view["details"][str(i)]
    assert [layer["name"] for layer in d["layers"]] == list(LAYERS)
    for layer in d["layers"]:
        for key in ("sparsity", "bits_w", "format"):
            assert layer[key] == typed(rows[i][f"layers/{layer['name']}/{key}"])
        for key in ("weight_bits", "qparam_bits", "bias_bits"):
            assert layer[key] == typed(rows[i][f"size/{layer['name']}/{key}"])
    parts = sum(layer["weight_bits"] + layer["qparam_bits"] + layer["bias_bits"] for layer in d["layers"])
    assert parts + d["other_bits"] == pytest.approx(float(rows[i]["final/size_bits"]))


def test_single_sweep_page_numbers_equal_frontier_json(tmp_path):
    root = make_sweep(tmp_path / "s", seeds=(0,))
    summary = write_frontier([root], root, wandb=False, quiet=True)
    view = build_view(root, json.loads((root / "frontier.json").read_text()))
    (row,) = view["table"]  # one front, no merged row
    for k in ("dense_acc", "best_ratio_within_1pt", "best_ratio_within_2pt", "hypervolume_relative"):
        assert row[k] == pytest.approx(summary[k]), k
    assert row["best_within_2pt/config"] == summary["best_within_2pt/config"]
    assert row["hypervolume_absolute"] == pytest.approx(summary["hypervolume_absolute"])
    assert (root / "frontier.html").stat().st_size > 1_000_000
    header, raw = read_csv(root / "frontier.csv")
    assert len(raw) == 18 + 2 + 1  # the grid (one of it deploy_mismatch), failed, missing, one dense row


# -- the page in a browser -------------------------------------------------------------------------
def _chromium():
    from browser import Chromium

    exe = Chromium.find()
    if exe is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    return Chromium(exe, width=1400, height=1000, timeout=120)


def test_page_in_headless_chromium(two_sweeps):
    out = two_sweeps["out"]
    page = out / "frontier.html"
    header, raw = _csv_rows(out / "frontier.csv")
    rows = [dict(zip(header, r)) for r in raw]
    t0 = time.perf_counter()
    with _chromium() as b:
        b.open(page.as_uri(), ready="window.qpexpReady === true")
        loaded = time.perf_counter() - t0
        rep = b.evaluate("qpexpReport()")
        # every point of the CSV is on the page: ok ones plotted, the others listed with their error
        plotted = set(rep["plots"]["plot-ratio"]["rows"])
        assert plotted == {i for i, r in enumerate(rows) if _ok(r)}
        assert set(rep["failed"]) == {
            r["run_dir"] for r in rows if r["point"] == "run" and r["status"] != "ok"
        }
        for g in rep["plots"]["plot-ratio"]["groups"]:  # drawn where the CSV says
            if g["members"]:
                accs = [float(rows[i]["final/test_acc"]) for i in g["members"]]
                ratios = [float(rows[i]["final/compression_ratio"]) for i in g["members"]]
                assert g["y"] == pytest.approx(100 * sum(accs) / len(accs))
                assert g["x"] == pytest.approx(sum(ratios) / len(ratios))
        names = rep["plots"]["plot-ratio"]["names"]
        for want in (
            "frontier (config means)",
            "frontier_distill Pareto front",
            "reference: peer_frontier · qat",
        ):
            assert want in names
        assert any(n.startswith("frontier dense") for n in names)
        assert rep["plots"]["plot-bops"]["rows"] and rep["plots"]["plot-latency"]["rows"]
        assert rep["csvRows"] == len(rows) and len(rep["table"]) == 4
        # the table sorts by a clicked header (descending, then ascending; empty cells last)
        col = b.evaluate(  # the hypervolume against the shared point, found by its header
            "[...document.querySelectorAll('#fronts th')]"
            ".findIndex(th => th.textContent.startsWith('hypervolume (shared point)'))"
        )
        assert col >= 0
        b.evaluate(f"document.querySelectorAll('#fronts th')[{col}].click()")
        down = [float(r[col]) for r in b.evaluate("qpexpReport()")["table"] if r[col] != ""]
        b.evaluate(f"document.querySelectorAll('#fronts th')[{col}].click()")
        up = [float(r[col]) for r in b.evaluate("qpexpReport()")["table"] if r[col] != ""]
        assert down == sorted(down, reverse=True) and up == sorted(up) and len(up) == 4
        # a real mouse click on a point shows its layers (the page opens on another point)
        target = b.evaluate(
            """(() => {
              const gd = document.getElementById('plot-ratio'), L = gd._fullLayout, box = gd.getBoundingClientRect();
              const tr = gd.data.findIndex(t => t.meta && t.meta.role === 'means');
              const gi = gd.data[tr].customdata.findIndex(c => c[1] !== window.qpexpDetail.group &&
                !VIEW.fronts[c[0]].groups[c[1]].dense && VIEW.fronts[c[0]].groups[c[1]].acc > 0.9);
              const k = gi, x = gd.data[tr].x[k], y = gd.data[tr].y[k];
              return {fi: gd.data[tr].customdata[k][0], gi: gd.data[tr].customdata[k][1],
                      px: box.left + L._size.l + L.xaxis.d2p(x), py: box.top + L._size.t + L.yaxis.d2p(y)};
            })()"""
        )
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            b.call(
                "Input.dispatchMouseEvent",
                type=kind,
                x=target["px"],
                y=target["py"],
                button="left" if kind != "mouseMoved" else "none",
                clickCount=1,
            )
            time.sleep(0.2)
        detail = b.evaluate("qpexpReport()")["detail"]
        assert [detail["front"], detail["group"]] == [target["fi"], target["gi"]], target
        assert detail["layers"] == list(LAYERS) and detail["members"]
        assert b.evaluate("document.getElementById('detail-layers').data.length") >= 2
        assert b.evaluate("document.getElementById('detail-size').data.length") == 4
        b.evaluate(
            "const s = document.getElementById('colour-by'); s.value = 'bits'; s.dispatchEvent(new Event('change'))"
        )
        # no console errors, no exceptions, and nothing fetched but the file itself
        assert b.errors() == []
        assert [u for u in b.requests() if not u.startswith(("file:", "data:", "about:"))] == []
        b.evaluate(
            "const c = document.getElementById('colour-by'); c.value = 'front'; c.dispatchEvent(new Event('change'))"
        )
        b.call("Input.dispatchMouseEvent", type="mouseMoved", x=5, y=5)  # no hover label in the screenshot
        b.evaluate("window.scrollTo(0, 0)")
        time.sleep(0.3)
        shot = b.screenshot(out / "frontier.screenshot.png")
    assert shot.read_bytes()[:8] == PNG_MAGIC and shot.stat().st_size > 50_000
    print(f"chromium: page ready in {loaded:.1f} s, test {time.perf_counter() - t0:.1f} s")
    if os.environ.get("QPEXP_SCREENSHOT"):
        dest = Path(os.environ["QPEXP_SCREENSHOT"])
        (dest if dest.is_absolute() else ROOT / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dest if dest.is_absolute() else ROOT / dest)


def test_cli_compares_two_sweeps_and_a_reference(two_sweeps, tmp_path):
    out = tmp_path / "cmp"
    exe = [sys.executable, "-c", "from qpexp.frontier import cli; raise SystemExit(cli())"]
    args = [
        str(two_sweeps["a"]),
        str(two_sweeps["b"]),
        "--out",
        str(out),
        "--reference",
        str(two_sweeps["ref"]),
    ]
    proc = subprocess.run([*exe, *args, "--no-wandb"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    view = embedded((out / "frontier.html").read_text(encoding="utf-8"), "frontier-view")
    assert [f["kind"] for f in view["fronts"]] == ["sweep", "sweep", "reference"]
    # rebuilt from the files alone, the page draws the same
    again = subprocess.run(
        [sys.executable, "-m", "qpexp.dashboard", str(out), "--reference", str(two_sweeps["ref"])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    view2 = embedded((out / "frontier.html").read_text(encoding="utf-8"), "frontier-view")
    assert view2["fronts"] == view["fronts"] and view2["table"] == view["table"]


# -- W&B -------------------------------------------------------------------------------------------
def wandb_records(run_file: Path) -> list:
    """Every record of an offline run's transaction log (``conftest.wandb_offline_runs`` reads a few
    kinds of them; the config and exit records are needed here)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            chunk = chunk if kind == 1 else buf + chunk
            rec = pb.Record()
            rec.ParseFromString(chunk)
            out.append(rec)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
    return out


def offline_run(run_dir: Path, timeout: float = 60) -> dict:
    """The offline W&B run under ``run_dir``: group, job type, top-level config, exit code."""
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
        info = {
            "group": None,
            "job_type": None,
            "config": {},
            "exit_code": None,
            "history": set(),
            "dir": None,
        }
        for f in files:
            info["dir"] = f.parent
            for rec in wandb_records(f):
                kind = rec.WhichOneof("record_type")
                if kind == "run":
                    info.update(group=rec.run.run_group, job_type=rec.run.job_type)
                    for item in rec.run.config.update:
                        info["config"][item.key] = json.loads(item.value_json)
                elif kind == "config":
                    for item in rec.config.update:
                        info["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
                elif kind == "exit":
                    info["exit_code"] = rec.exit.exit_code
                elif kind == "history":
                    info["history"].update(i.key or "/".join(i.nested_key) for i in rec.history.item)
        if info["exit_code"] is not None or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def test_offline_sweep_runs_grouped_complete_and_syncable(tmp_path):
    """Point runs (as ``qpexp`` makes them in a multirun) and the frontier run land in one group, carry
    the config axes at the top level, finish, and ``wandb sync`` (README) finds every one of them."""
    from qpexp.tracking import make_tracker

    sweep = tmp_path / "mysweep"
    points = [(4, 0.5, "global"), (2, 0.7, "layer")]
    for bits, ratio, scope in points:
        rec = _record(bits, ratio, scope, 0, 0.954, kind="wandb")
        d = _write(sweep, f"prune.ratio={ratio},prune.scope={scope},quant.bits_w={bits}", rec)
        tracker = make_tracker(rec["config"]["logger"], d, rec["config"], name=d.name, sweep=sweep.name)
        tracker.summary(rec)
        tracker.log_layers(rec)
        tracker.finish(True)
    summary = write_frontier([sweep], sweep, quiet=True)  # the points logged to W&B: so does the frontier
    assert summary["files"]["wandb"]
    for (bits, ratio, scope), d in zip(
        points, sorted(p for p in sweep.iterdir() if p.name.startswith("prune"))
    ):
        run = offline_run(d)
        assert run["group"] == "mysweep" and run["job_type"] == "pipeline" and run["exit_code"] == 0
        cfg = run["config"]
        assert (cfg["bits_w"], cfg["ratio"], cfg["scope"]) == (bits, ratio, scope)
        assert cfg["sweep"] == "mysweep" and cfg["dense"] is False and cfg["arch"] == "cnn1d"
        assert cfg["quant"]["bits_w"] == cfg["bits_w"]  # the nested config is still there
        assert any(h.startswith("layers/sparsity_table") for h in run["history"]), run["history"]
    frontier = offline_run(sweep)
    assert (
        frontier["group"] == "mysweep" and frontier["job_type"] == "frontier" and frontier["exit_code"] == 0
    )
    # the frontier run's native charts: means coloured by bits and by front, one line per front
    for key in ("table", "points", "scatter_table", "scatter_by_bits_table", "fronts_table"):
        assert f"frontier/{key}/_type" in frontier["history"], (key, frontier["history"])
    viz = {k.split("/", 2)[2]: v for k, v in frontier["config"].items() if k.startswith("_wandb/visualize/")}
    assert viz["frontier/scatter_by_bits"]["panel_config"]["fieldSettings"]["groupKeys"] == "bits"
    assert viz["frontier/scatter"]["panel_config"]["panelDefId"] == "wandb/scatter/v0"
    assert viz["frontier/fronts"]["panel_config"]["panelDefId"] == "wandb/lineseries/v0"
    table = next(frontier["dir"].rglob("frontier/points_*.table.json"))
    t = json.loads(table.read_text())
    assert {"front", "bits", "test_acc", "compression_ratio", "pareto"} <= set(t["columns"])
    assert {r[t["columns"].index("bits")] for r in t["data"]} == {"w2", "w4", "fp32"}
    # README: list the offline runs of a sweep folder and sync them (--dry-run: no server here)
    cmd = f"wandb sync --dry-run $(find {sweep} -type d -name 'offline-run-*')"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120, env=env)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "Would sync 3 run(s)" in text, text


def test_point_axes_top_level():
    from qpexp.wandb_views import point_axes

    cfg = _config(32, 0.0, "global", 1)
    ax = point_axes(cfg, "s")
    assert ax["bits_w"] == 32 and ax["ratio"] == 0.0 and ax["dense"] is True and ax["sweep"] == "s"
    assert ax["criterion"] == "l1" and ax["granularity"] == "tensor" and ax["dataset"] == "mnist1d"
    cfg["quant"]["overrides"] = {"conv*": 8}
    assert point_axes(cfg)["mixed_precision"] is True and "sweep" not in point_axes(cfg)
    assert point_axes({}) == {}


# -- the workspace command -------------------------------------------------------------------------
def _panels(spec: dict) -> dict[str, list[dict]]:
    return {s["name"]: s["panels"] for s in spec["spec"]["section"]["panelBankConfig"]["sections"]}


def test_workspace_panels_and_queries():
    pytest.importorskip("wandb_workspaces")
    from qpexp.wandb_views import build_workspace, workspace_spec

    w = build_workspace("team", "proj", groups=["frontier", "frontier_distill"], layers=list(LAYERS))
    spec = workspace_spec(w)
    assert spec["entity"] == "team" and spec["project"] == "proj"
    panels = _panels(spec)
    assert list(panels) == ["Frontier across sweeps", "Trade-offs", "Per-layer sparsity"]
    scatter = panels["Frontier across sweeps"][0]
    assert scatter["viewType"] == "Scatter Plot" and scatter["config"]["xAxisLogScale"] is True
    assert (scatter["config"]["xAxis"], scatter["config"]["yAxis"]) == (
        "summary:final/compression_ratio",
        "summary:final/test_acc",
    )
    charts = [p for p in panels["Frontier across sweeps"] if p["viewType"] == "Vega2"]

    def table_key(p):
        (q,) = p["config"]["userQuery"]["queryFields"]
        (f,) = [f for f in q["fields"] if f["name"] == "summaryTable"]
        return f["args"][0]["value"]

    assert [table_key(p) for p in charts] == ["frontier/points", "frontier/points", "frontier/fronts_table"]
    assert [p["config"]["fieldSettings"].get("groupKeys") for p in charts[:2]] == ["front", "bits"]
    assert charts[2]["config"]["panelDefId"] == "wandb/lineseries/v0"
    par = panels["Trade-offs"][0]
    assert par["viewType"] == "Parallel Coordinates Plot"
    assert [c["accessor"] for c in par["config"]["columns"]] == [
        "config:bits_w.value",
        "config:ratio.value",
        "config:scope.value",
        "summary:final/test_acc",
        "summary:final/compression_ratio",
    ]
    bars = panels["Per-layer sparsity"]
    assert bars[0]["viewType"] == "Bar Chart"
    assert bars[0]["config"]["metrics"] == [f"summary_metrics.layers/{n}/sparsity" for n in LAYERS]
    assert table_key(bars[1]) == "layers/sparsity_table"
    (runset,) = spec["spec"]["section"]["runSets"]
    (flt,) = runset["filters"]["filters"]
    assert (
        flt["key"]["name"] == "group"
        and flt["op"] == "IN"
        and flt["value"] == ["frontier", "frontier_distill"]
    )
    # the sensitivity heatmap only where a run logged one
    spec2 = workspace_spec(build_workspace("team", "proj", sensitivity="sensitivity/table"))
    heat = _panels(spec2)["Sensitivity"][0]
    assert (
        heat["config"]["panelDefId"] == "wandb/confusion_matrix/v1" and table_key(heat) == "sensitivity/table"
    )
    assert spec2["spec"]["section"]["runSets"][0]["filters"]["filters"] == []


def test_workspace_command_offline_refuses_dry_run_prints(tmp_path):
    pytest.importorskip("wandb_workspaces")
    sweep = make_sweep(tmp_path / "sw", seeds=(0,), extra=False)
    cmd = [sys.executable, "-m", "qpexp.wandb_views"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run([*cmd, "--project", "p"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "offline" in proc.stderr
    proc = subprocess.run(
        [*cmd, "--project", "p", "--entity", "e", "--sweep", str(sweep), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)
    bars = _panels(spec)["Per-layer sparsity"][0]["config"]["metrics"]
    assert bars == [f"summary_metrics.layers/{n}/sparsity" for n in LAYERS]  # layers read from the records
    assert spec["spec"]["section"]["runSets"][0]["filters"]["filters"][0]["value"] == ["sw"]
    text = (ROOT / "pyproject.toml").read_text()
    assert 'qpexp-wandb-workspace = "qpexp.track.wandb_views:cli"' in text

"""Issue 9: stage cache keys (threads, data content, canonical criteria) and damaged cache entries
(checksummed, moved aside and retrained once; a crafted pickle is still refused as unsafe)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, compose

from qpexp.cache import DamagedEntryWarning
from qpexp.io import UnsafeFileError, safe_torch_load
from qpexp.pipeline import Pipeline

BASELINE_ONLY = [*TINY, "prune.ratio=0", "quant=none", "export.enabled=false"]


def keys(tmp_path: Path, overrides: list[str]) -> dict[str, str]:
    cfg = compose([*TINY, f"cache_dir={tmp_path / 'cache'}", *overrides])
    return Pipeline(cfg, tmp_path / "run").keys


# -- keys ------------------------------------------------------------------------------------------
def _write_npz(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(240, 40)).astype(np.float32)
    y = np.arange(240) % 4
    np.savez(path, x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])


def test_npz_changed_under_the_same_path_retrains(tmp_path):
    data = tmp_path / "my.npz"
    _write_npz(data, 0)
    args = [*BASELINE_ONLY, "data=npz", f"data.path={data}", "model=mlp", f"cache_dir={tmp_path / 'cache'}"]
    first = Pipeline(compose(args), tmp_path / "r1").run()
    again = Pipeline(compose(args), tmp_path / "r2").run()
    assert not first["cache/baseline_hit"] and again["cache/baseline_hit"]  # same content: reused
    _write_npz(data, 1)  # new content, same path and shapes
    changed = Pipeline(compose(args), tmp_path / "r3")
    rec = changed.run()
    assert not rec["cache/baseline_hit"]  # trained again on the new content
    assert rec["data/fingerprint"] != first["data/fingerprint"]
    assert rec["artifacts/baseline"] != first["artifacts/baseline"]


def test_npz_content_is_in_every_stage_key(tmp_path):
    data = tmp_path / "my.npz"
    _write_npz(data, 0)
    args = ["data=npz", f"data.path={data}", "model=mlp"]
    before = keys(tmp_path, args)
    _write_npz(data, 1)
    after = keys(tmp_path, args)
    assert all(before[s] != after[s] for s in ("baseline", "prune", "qat"))
    _write_npz(data, 0)  # the first content again: the first keys
    assert keys(tmp_path, args) == before


def test_threads_in_every_stage_key(tmp_path, monkeypatch):
    one, two = keys(tmp_path, ["threads=1"]), keys(tmp_path, ["threads=2"])
    assert all(one[s] != two[s] for s in ("baseline", "prune", "qat"))
    monkeypatch.setenv("QPEXP_THREADS", "2")  # threads=null: the worker's thread count
    assert keys(tmp_path, []) == two


def test_unstructured_l2_shares_l1_entry_channel_does_not(tmp_path):
    l1, l2 = keys(tmp_path, ["prune.criterion=l1"]), keys(tmp_path, ["prune=l2"])
    assert l1 == l2  # |w| either way: the same masks, one entry
    full = keys(tmp_path, ["prune.criterion=qpexp.core.prune.criteria.magnitude.L2"])
    assert full == l1
    ch1 = keys(tmp_path, ["prune.criterion=l1", "prune.structure=channel"])
    ch2 = keys(tmp_path, ["prune.criterion=l2", "prune.structure=channel"])
    assert ch1["prune"] != ch2["prune"] and ch1["baseline"] == ch2["baseline"] == l1["baseline"]
    assert keys(tmp_path, ["prune=taylor"])["prune"] != l1["prune"]


# -- damaged entries -------------------------------------------------------------------------------
def _first_run(tmp_path: Path) -> tuple[list[str], dict, Path]:
    args = [*BASELINE_ONLY, f"cache_dir={tmp_path / 'cache'}"]
    rec = Pipeline(compose(args), tmp_path / "r1").run()
    entry = Path(rec["artifacts/baseline"])
    assert not rec["cache/baseline_hit"] and (entry / "meta.json").exists()
    return args, rec, entry


def test_entry_records_checksum_of_its_files(tmp_path):
    import hashlib

    _, _, entry = _first_run(tmp_path)
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["sha256"] == {"model.pt": hashlib.sha256((entry / "model.pt").read_bytes()).hexdigest()}


@pytest.mark.parametrize("damage", ["truncate", "flip", "truncate_old_entry"])
def test_damaged_entry_moved_aside_and_retrained(tmp_path, damage):
    args, first, entry = _first_run(tmp_path)
    model = entry / "model.pt"
    data = model.read_bytes()
    mid = len(data) // 2
    if damage == "flip":  # one bit pattern changed inside a tensor: only the checksum sees it
        data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
    else:  # a partial copy
        data = data[:mid]
    model.write_bytes(data)
    if damage == "flip":
        safe_torch_load(model)  # still a complete, loadable torch file
    if damage == "truncate_old_entry":  # written before checksums existed
        meta = json.loads((entry / "meta.json").read_text())
        del meta["sha256"]
        (entry / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(DamagedEntryWarning, match=entry.name):
        rec = Pipeline(compose(args), tmp_path / "r2").run()
    assert rec["status"] == "not_deployed" and not rec["cache/baseline_hit"]  # trained again
    aside = Path(rec["cache/baseline_moved_aside"])
    assert aside.parent == entry.parent / "damaged" and aside.name.startswith(entry.name)
    assert (aside / "model.pt").read_bytes() == data  # moved, not deleted
    assert rec["artifacts/baseline"] == str(entry) and (entry / "meta.json").exists()
    assert rec["baseline/test_acc"] == first["baseline/test_acc"]  # the same stage, trained again
    with warnings.catch_warnings():
        warnings.simplefilter("error", DamagedEntryWarning)  # the new entry is intact: reused, no warning
        third = Pipeline(compose(args), tmp_path / "r3").run()
    assert third["cache/baseline_hit"] and "cache/baseline_moved_aside" not in third


def test_old_entry_without_checksum_is_reused(tmp_path):
    args, _, entry = _first_run(tmp_path)
    meta = json.loads((entry / "meta.json").read_text())
    del meta["sha256"]
    (entry / "meta.json").write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DamagedEntryWarning)
        rec = Pipeline(compose(args), tmp_path / "r2").run()
    assert rec["cache/baseline_hit"]


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_with_a_checksum_mismatch_is_still_unsafe(tmp_path):
    args, _, entry = _first_run(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"model": Evil(marker)}, entry / "model.pt")  # meta.json keeps the old checksum
    with pytest.raises(UnsafeFileError, match="weights_only"):
        Pipeline(compose(args), tmp_path / "r2").run()
    assert not marker.exists()  # nothing in the pickle ran
    assert (entry / "model.pt").exists() and not (entry.parent / "damaged").exists()  # refused, not moved


def test_keys_added_later_leave_older_keys_unchanged(tmp_path, monkeypatch):
    """What the QAT key hashes: none of the quant settings added after entries were cached
    (``narrow_range``, ``target_ratio``, ``budget_bits``, ``rounding*``) while they hold the value
    older runs computed with, so those entries stay valid; a setting at another value is hashed."""
    import qpexp.pipeline as pl

    payloads = []
    real = pl.cache_key
    monkeypatch.setattr(pl, "cache_key", lambda p: payloads.append(p) or real(p))

    def quant_hashed(*overrides):
        payloads.clear()
        assert pl.Pipeline(compose([*TINY, f"cache_dir={tmp_path}", *overrides]), tmp_path / "r").keys["qat"]
        (q,) = [p["quant"] for p in payloads if "quant" in p]
        return q

    added = {"narrow_range", "target_ratio", "budget_bits", "rounding", "rounding_batches", "rounding_iters"}
    now = quant_hashed()
    assert not added & set(now) and {"bits_w", "bits_a", "symmetric"} <= set(now)
    assert quant_hashed("quant.narrow_range=false")["narrow_range"] is False
    assert quant_hashed("quant.epochs=0", "quant.rounding=adaround")["rounding"] == "adaround"
    assert quant_hashed("quant.bits_w=auto", "quant.target_ratio=12")["target_ratio"] == 12


def test_prune_key_hashes_auto_batches_only_where_it_acts(tmp_path, monkeypatch):
    """``prune.auto_batches`` (added later) is left out of the prune key for the global and layer
    scopes, which never read it, and for ``scope=auto`` at its default; another value is hashed."""
    import qpexp.pipeline as pl

    payloads = []
    real = pl.cache_key
    monkeypatch.setattr(pl, "cache_key", lambda p: payloads.append(p) or real(p))

    def prune_hashed(*overrides):
        payloads.clear()
        assert pl.Pipeline(compose([*TINY, f"cache_dir={tmp_path}", *overrides]), tmp_path / "r").keys[
            "prune"
        ]
        (p,) = [p["prune"] for p in payloads if "prune" in p]
        return p

    assert "auto_batches" not in prune_hashed() and prune_hashed()["scope"] == "global"
    assert "auto_batches" not in prune_hashed("prune.auto_batches=3")
    assert "auto_batches" not in prune_hashed("prune.scope=auto")
    assert prune_hashed("prune.scope=auto", "prune.auto_batches=3")["auto_batches"] == 3


# -- the code behind a stage (issue 20) ----------------------------------------------------------------
def test_sources_digest_is_sha256_of_paths_and_contents(tmp_path):
    from qpexp.run.codeprint import sources_digest

    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    import hashlib

    want = hashlib.sha256(b"a.py\0x = 1\n\0sub/b.py\0y = 2\n\0").hexdigest()
    assert sources_digest([tmp_path / "a.py", tmp_path / "sub" / "b.py"], tmp_path) == want


def test_stage_sources_cover_what_each_stage_runs():
    from qpexp.run.codeprint import PACKAGE, source_files

    rel = {
        s: {f.relative_to(PACKAGE).as_posix() for f in source_files(s)} for s in ("baseline", "prune", "qat")
    }
    assert {
        "run/pipeline.py",
        "train/stages.py",
        "data/__init__.py",
        "data/mnist.py",
        "models/resnet.py",
    } <= rel["baseline"]
    assert "core/prune/channel.py" in rel["prune"] and "core/prune/channel.py" not in rel["baseline"]
    assert "core/quant/linear.py" in rel["qat"] and "core/quant/linear.py" not in rel["prune"]
    assert rel["baseline"] < rel["prune"] and rel["baseline"] < rel["qat"]


def test_changed_code_retrains_its_stage_unless_fingerprints_are_off(tmp_path, monkeypatch):
    """A copy of the package stands in for the source tree: editing its channel-pruning module changes
    the prune key (the stage trains again) and leaves the baseline's; without fingerprints both reuse."""
    import shutil

    import qpexp.run.codeprint as cp

    src = tmp_path / "src"
    shutil.copytree(cp.PACKAGE, src, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cp, "PACKAGE", src)
    cp.stage_fingerprint.cache_clear()
    args = [*TINY, "quant=none", "export.enabled=false", "prune.steps=1", f"cache_dir={tmp_path / 'cache'}"]
    first = Pipeline(compose(args), tmp_path / "r1").run()
    meta = json.loads((Path(first["artifacts/prune"]) / "meta.json").read_text())
    assert meta["code_fingerprint"] == first["code/fingerprint/prune"] == cp.stage_fingerprint("prune")
    with (src / "core" / "prune" / "channel.py").open("a") as f:
        f.write("\n# a changed scoring rule\n")
    cp.stage_fingerprint.cache_clear()
    assert cp.stage_fingerprint("prune") != meta["code_fingerprint"]
    again = Pipeline(compose(args), tmp_path / "r2").run()
    assert again["cache/baseline_hit"] and not again["cache/prune_hit"]  # only the changed stage
    assert again["artifacts/prune"] != first["artifacts/prune"]
    old = Pipeline(compose([*args, "cache_code_fingerprint=false"]), tmp_path / "r3")
    assert old.keys["prune"] != again["artifacts/prune"].rsplit("-", 1)[1]
    rec = old.run()  # no entry without the fingerprint yet: trained once, then reused by old code too
    with (src / "core" / "prune" / "channel.py").open("a") as f:
        f.write("\n# changed once more\n")
    cp.stage_fingerprint.cache_clear()
    kept = Pipeline(compose([*args, "cache_code_fingerprint=false"]), tmp_path / "r4").run()
    assert kept["cache/prune_hit"] and kept["artifacts/prune"] == rec["artifacts/prune"]
    assert kept["code/fingerprint/prune"] == rec["code/fingerprint/prune"] != cp.stage_fingerprint("prune")

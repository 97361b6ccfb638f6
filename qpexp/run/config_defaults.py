"""Config keys added after records and stage-cache entries were written, with the value every run
before them computed with (no imports beyond the standard library: ``qpexp-frontier`` reads it).

A record without such a key is the same config as one that sets it to that value, so
``qpexp-frontier`` groups them as one; a stage's cache key leaves the key out while it holds that
value, so entries cached before the key existed stay valid.
"""

from __future__ import annotations

from pathlib import Path

ADDED_LATER = {
    "quant.target_ratio": None,  # quant.bits_w=auto
    "quant.budget_bits": None,
    "quant.rounding": "nearest",
    "quant.rounding_batches": 8,
    "quant.rounding_iters": 500,
    "quant.narrow_range": True,
    "distill.alpha": 0.0,
    "distill.temperature": 4.0,
    "prune.auto_batches": 8,  # prune.scope=auto
    # one-shot compression (issue 24)
    "quant.gptq_damp": 0.01,
    "quant.gptq_block": 128,
    "quant.gptq_act_order": False,
    "quant.calib_sequential": True,
    "prune.method": "mask",
    "prune.n": 2,
    "prune.m": 4,
    "prune.calib_batches": 8,
    "prune.calib_sequential": True,
    "prune.damp": 0.01,
    "prune.block": 128,
    "prune.quality": None,  # per-layer qualities
}


def without_added_defaults(section: str, values: dict) -> dict:
    """``values``, one config section (``quant``, ...), without the keys added later that hold the
    value runs had before those keys existed."""
    return {
        k: v
        for k, v in values.items()
        if f"{section}.{k}" not in ADDED_LATER or ADDED_LATER[f"{section}.{k}"] != v
    }


def config_dir() -> str:
    """``qpexp/conf`` in an installed wheel, the repository's top-level ``conf/`` in a checkout."""
    here = Path(__file__).resolve().parent.parent  # qpexp/
    for c in (here / "conf", here.parent / "conf"):
        if (c / "config.yaml").is_file():
            return str(c)
    raise RuntimeError(f"qpexp: no conf/ folder found next to {here}")

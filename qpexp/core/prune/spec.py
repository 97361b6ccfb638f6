"""Flat pruning settings for the core (training settings such as fine-tune epochs live in configs)."""

from __future__ import annotations

from dataclasses import dataclass

from qpexp.core.prune.nm import check_nm

CRITERIA = {
    "l1": "qpexp.core.prune.criteria.magnitude.L1",
    "l2": "qpexp.core.prune.criteria.magnitude.L2",
    "taylor": "qpexp.core.prune.criteria.taylor.Taylor",
    "random": "qpexp.core.prune.criteria.random.Random",
    "fpgm": "qpexp.core.prune.criteria.fpgm.FPGM",
    "std": "qpexp.core.prune.criteria.std.Std",  # Han et al. 2015: |w| / std of the layer
    "wanda": "qpexp.core.prune.criteria.wanda.Wanda",  # Sun et al. 2024: |w| x input norm
}
SCOPES = ("global", "layer", "auto", "row")
STRUCTURES = ("unstructured", "channel", "nm")
METHODS = ("mask", "sparsegpt")  # mask: zero the lowest scores; sparsegpt: OBS mask and weight update
SCHEDULES = ("oneshot", "geometric", "linear", "agp")


@dataclass
class PruneConfig:
    """``ratio``: the fraction of prunable parameters (conv/linear weights) to remove, for every
    structure. ``first_ratio``/``last_ratio``: own ratio for the first/last layer (0 excludes it;
    None: it is part of the ordinary pool); the pool then removes what brings the total to ``ratio``
    (for channels: the first layer's channels, and the channels feeding the last layer). No layer
    keeps fewer than ``min_keep_frac`` of its weights (at least one) or fewer than
    ``min_keep_channels`` channels. ``scope``: ``global`` (one ranking across layers), ``layer`` (the
    same fraction each), ``row`` (the same fraction of every output row, Wanda's comparison group;
    unstructured) or ``auto`` (fractions planned from each layer's measured validation loss on
    ``auto_batches`` batches, :mod:`qpexp.core.prune.auto`); every scope removes the same total.
    ``quality``: per-layer qualities (layer name -> q > 0, unnamed layers 1) for ``scope=global``:
    each layer's scores are divided by its q, so one global threshold t is Han et al.'s rule
    ``|w| < t q_l std_l`` with ``criterion=std``: relative qualities per layer, their common scale t
    set by ``ratio``. ``compact``: after unstructured pruning, remove the units it left dead (no
    consumer reads them, or no input feeds them: :mod:`qpexp.core.prune.compact`), function unchanged."""

    ratio: float = 0.5
    scope: str = "global"
    criterion: str = "l1"
    structure: str = "unstructured"
    schedule: str = "geometric"
    steps: int = 3
    min_keep_frac: float = 0.01
    min_keep_channels: int = 1
    first_ratio: float | None = None
    last_ratio: float | None = None
    taylor_batches: int = 8
    taylor_mode: str = "squared"
    seed: int = 0
    auto_batches: int = 8
    method: str = "mask"
    n: int = 2  # structure=nm: keep n of every m
    m: int = 4
    calib_batches: int = 8  # one-shot methods (wanda, sparsegpt): unlabeled training batches
    calib_sequential: bool = True  # each layer's inputs on the already-pruned earlier layers
    damp: float = 0.01  # sparsegpt: Hessian damping, a fraction of mean(diag H)
    block: int = 128  # sparsegpt: columns per mask-selection block
    quality: dict[str, float] | None = None
    compact: bool = False  # remove the units pruning left dead (qpexp.core.prune.compact)

    def validate(self) -> None:
        number = isinstance(self.ratio, (int, float)) and not isinstance(self.ratio, bool)
        if not number or not 0 <= self.ratio < 1:
            raise ValueError(f"prune.ratio={self.ratio!r} must be a number in [0, 1)")
        for key, r in (("prune.first_ratio", self.first_ratio), ("prune.last_ratio", self.last_ratio)):
            if r is not None and not 0 <= r < 1:
                raise ValueError(f"{key}={r!r} must be null or a number in [0, 1)")
        if self.scope not in SCOPES:
            raise ValueError(f"prune.scope={self.scope!r} is unknown: use one of {SCOPES}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"prune.structure={self.structure!r} is unknown: use one of {STRUCTURES}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"prune.schedule={self.schedule!r} is unknown: use one of {SCHEDULES}")
        if self.criterion not in CRITERIA and "." not in self.criterion:
            raise ValueError(f"prune.criterion={self.criterion!r} is unknown: use one of {sorted(CRITERIA)}")
        if self.criterion == "fpgm" and self.structure != "channel":
            raise ValueError("prune.criterion=fpgm scores whole filters: use it with prune.structure=channel")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"prune.steps={self.steps!r} must be an integer >= 1")
        if not 0 <= self.min_keep_frac <= 1:
            raise ValueError(f"prune.min_keep_frac={self.min_keep_frac!r} must lie in [0, 1]")
        if self.min_keep_channels < 1:
            raise ValueError(f"prune.min_keep_channels={self.min_keep_channels!r} must be >= 1")
        if self.taylor_mode not in ("squared", "abs"):
            raise ValueError(f"prune.taylor_mode={self.taylor_mode!r} must be 'squared' or 'abs'")
        if not isinstance(self.auto_batches, int) or self.auto_batches < 1:
            raise ValueError(f"prune.auto_batches={self.auto_batches!r} must be an integer >= 1")
        self.validate_oneshot()
        self.validate_quality()
        if self.compact and self.structure != "unstructured":
            raise ValueError(
                f"prune.compact removes the units unstructured pruning left dead: it needs "
                f"prune.structure=unstructured (got {self.structure!r})"
            )
        if self.taylor_batches < 1:
            raise ValueError(f"prune.taylor_batches={self.taylor_batches!r} must be >= 1")

    def validate_quality(self) -> None:
        if self.quality is not None:
            if self.scope != "global" or self.structure != "unstructured":
                raise ValueError(
                    "prune.quality (per-layer qualities) needs prune.scope=global and structure=unstructured"
                )
            bad = {k: v for k, v in self.quality.items() if not isinstance(v, (int, float)) or v <= 0}
            if bad:
                raise ValueError(f"prune.quality: every quality must be a number > 0; got {bad}")

    def validate_oneshot(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"prune.method={self.method!r} is unknown: use one of {METHODS}")
        if self.structure == "nm":
            check_nm(self.n, self.m)
            if abs(self.ratio - (1 - self.n / self.m)) > 1e-9:
                raise ValueError(
                    f"prune.ratio={self.ratio!r}: prune.structure=nm with {self.n}:{self.m} prunes "
                    f"{1 - self.n / self.m:g} of every layer; set prune.ratio={1 - self.n / self.m:g}"
                )
            if self.schedule != "oneshot" and self.steps != 1:
                raise ValueError("prune.structure=nm reaches n:m in one step: use prune.schedule=oneshot")
        if self.method == "sparsegpt" and self.structure == "channel":
            raise ValueError(
                "prune.method=sparsegpt prunes single weights: use prune.structure=unstructured or nm"
            )
        if self.scope == "row" and (self.structure == "channel" or self.method != "mask"):
            raise ValueError(
                "prune.scope=row ranks single weights within each output row: it needs "
                "prune.structure=unstructured (or nm, whose groups lie within rows) and prune.method=mask"
            )
        if self.method == "sparsegpt" and self.scope == "auto":
            raise ValueError("prune.method=sparsegpt prunes every layer to its ratio: use prune.scope=layer")
        if self.criterion == "wanda" and self.structure == "channel":
            raise ValueError(
                "prune.criterion=wanda scores single weights: use prune.structure=unstructured or nm"
            )
        if not isinstance(self.calib_batches, int) or self.calib_batches < 1:
            raise ValueError(f"prune.calib_batches={self.calib_batches!r} must be an integer >= 1")
        if not self.damp >= 0:
            raise ValueError(f"prune.damp={self.damp!r} must be >= 0")
        if not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"prune.block={self.block!r} must be an integer >= 1")

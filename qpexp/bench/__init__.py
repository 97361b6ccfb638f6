"""Benchmarks: ``python -m qpexp.bench <name>``; each prints a table and ends with one JSON line."""

import argparse
import json

NAMES = ("qat", "prune", "sweep", "sensitivity", "distill", "epoch", "units", "oneshot")


def emit(rows: list[dict], figures: dict, title: str) -> None:
    """Print ``rows`` as an aligned table, then ``figures`` as one JSON line."""
    print(title)
    if rows:
        cols = list(rows[0])
        width = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
        print("  ".join(c.ljust(width[c]) for c in cols))
        print("  ".join("-" * width[c] for c in cols))
        for r in rows:
            print("  ".join(_fmt(r.get(c)).ljust(width[c]) for c in cols))
    print(json.dumps(figures, sort_keys=True))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def step_args(name: str, doc: str, argv: list[str] | None, extra=None):
    """Common options of the per-step benchmarks (``extra(parser)`` adds a benchmark's own); sets
    torch threads and the seed."""
    import torch

    ap = argparse.ArgumentParser(prog=f"python -m qpexp.bench {name}", description=doc.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    if extra is not None:
        extra(ap)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    return a

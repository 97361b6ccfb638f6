"""Frontier aggregation (placeholder until the frontier module lands)."""


def write_frontier(dirs, out_dir):
    return None


def cli():
    raise SystemExit("qpexp-frontier: not implemented yet")

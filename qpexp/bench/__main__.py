import importlib
import sys

from qpexp.bench import NAMES


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in NAMES:
        raise SystemExit(f"usage: python -m qpexp.bench {{{','.join(NAMES)}}} [args]")
    name = sys.argv.pop(1)
    importlib.import_module(f"qpexp.bench.{name}").main()


if __name__ == "__main__":
    main()

"""Command line: ``python -m vlmkern info`` (build facts) and ``python -m vlmkern bench ...``."""

import json
import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m vlmkern info [--json] | python -m vlmkern bench <op|all> [...]")
        return 0
    if argv[0] == "info":
        from ._build_info import format_info, info

        print(json.dumps(info(), indent=2) if "--json" in argv[1:] else format_info())
        return 0
    if argv[0] == "bench":
        from .bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    print(f"unknown command {argv[0]!r}; try `python -m vlmkern --help`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""CLI: python -m vlmkern.bench <op|all> [--json PATH] [--device cpu|cuda] [--dtype bf16|fp16|fp32]
[--quick] [--no-compile]. Prints an environment header and one table per op."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from vlmkern.bench import REGISTRY, load
from vlmkern.bench.harness import DTYPES, Config, environment, format_env, format_table, run_op


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmkern.bench", description=__doc__)
    p.add_argument("op", choices=[*REGISTRY, "all"], help="op to benchmark, or all")
    p.add_argument("--json", metavar="PATH", help="write the result records to PATH")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (smoke)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile providers")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")

    cfg = Config(args.device, DTYPES[args.dtype], args.quick, not args.no_compile)
    if cfg.compile:
        # Compile in-process: Inductor's worker pool starts in the background and steals the very
        # cores being timed (seen as 8-16 ms stalls on the 2-core CPU machine).
        from torch._inductor import config as inductor_config

        inductor_config.compile_threads = 1
    env = environment(cfg.device)
    how = ("CUDA graph replays, cold L2 (rotating inputs >= 4x L2)" if cfg.device == "cuda"
           else "perf_counter per call, rotating inputs >= 4x LLC")
    header = f"{format_env(env)}\n# {args.dtype}, timing: {how}; times per call in us"

    records, failed = [], []
    for name in (REGISTRY if args.op == "all" else [args.op]):
        mod = load(name)
        t0 = time.perf_counter()
        print(f"\n## {name}", file=sys.stderr, flush=True)
        try:
            recs = run_op(name, mod.cases(cfg), mod.providers(cfg), mod.reference(), cfg,
                          baseline=mod.BASELINE, exact=mod.EXACT,
                          log=lambda s: print(s, file=sys.stderr, flush=True),
                          rooflines=getattr(mod, "ROOFLINES", ()))
        except AssertionError as e:  # a provider disagrees with vlmkern.reference
            # No timings for this op; the other ops still run and the exit status says it.
            print(f"vlmkern.bench {name}: WRONG RESULT, op skipped: {e}", file=sys.stderr)
            print(f"## {name}: WRONG RESULT, no timings ({e})\n", flush=True)
            failed.append(name)
            continue
        print(f"## {name} ({time.perf_counter() - t0:.0f} s)\n{header}")
        print(format_table(recs, mod.BASELINE) + "\n", flush=True)
        records += [{**r, "env": env} for r in recs]

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"# wrote {len(records)} records to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Summarise the ptxas resource report (-Xptxas=-v) of a build log: one row per kernel and arch.

usage: python tools/ptxas_report.py build/build.log   (exit 1 if any kernel spills)
"""

import re
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
USED = re.compile(r"Used (\d+) registers")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
SMEM = re.compile(r"(\d+) bytes smem")


def demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        return out.stdout.splitlines() if out.returncode == 0 else names
    except OSError:
        return names


def parse(lines: list[str]) -> list[dict]:
    rows: list[dict] = []
    for line in lines:
        if m := ENTRY.search(line):
            row = {"kernel": m[1], "arch": m[2], "regs": 0, "stack": 0, "spill": 0, "smem": 0}
            rows.append(row)
        elif rows and (m := USED.search(line)):
            rows[-1]["regs"] = int(m[1])
            if s := SMEM.search(line):
                rows[-1]["smem"] = int(s[1])
        elif rows and (m := FRAME.search(line)):
            rows[-1]["stack"] = int(m[1])
            rows[-1]["spill"] = int(m[2]) + int(m[3])
    return rows


def main(path: str) -> int:
    with open(path, errors="replace") as f:
        rows = parse(f.readlines())
    if not rows:
        print("ptxas report: no kernels in the log (CPU-only build, or built without ptxas -v)")
        return 0
    for row, name in zip(rows, demangle([r["kernel"] for r in rows]), strict=True):
        row["kernel"] = name.replace("vlmkern::", "")
    print(f"{'regs':>4} {'stack':>5} {'spill':>5} {'smem':>6}  {'arch':<7} kernel")
    for r in sorted(rows, key=lambda r: r["kernel"]):
        print(f"{r['regs']:>4} {r['stack']:>5} {r['spill']:>5} {r['smem']:>6}  {r['arch']:<7} "
              f"{r['kernel']}")
    spilling = [r for r in rows if r["spill"]]
    print(f"{len(rows)} kernels, {len(spilling)} with spills")
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "build/build.log"))

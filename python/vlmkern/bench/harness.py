"""Generic benchmark harness: cold-L2 timing (CUDA graphs / perf_counter), copy and mm rooflines,
correctness gate, environment header, table and JSON output. Every per-op bench module uses it."""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COPY = "copy"  # name of the copy-roofline provider row
MM = "torch.mm"  # name of a GEMM bench's roofline provider (same GEMM shapes, nothing else)


@dataclass
class Config:
    """Run-wide settings, from the CLI."""

    device: str
    dtype: torch.dtype
    quick: bool = False
    compile: bool = True


@dataclass
class Case:
    """One benchmarked problem.

    make_inputs() returns a fresh tuple of positional args (one independent input set); every
    provider is called as ``fn(*inputs, **kwargs)``. bytes_moved is what the op must read plus
    write at minimum; flops is optional (GEMM-like ops).
    """

    shape: str
    make_inputs: Callable[[], tuple]
    bytes_moved: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    flops: int | None = None
    cuda_graph: bool = True  # False: time eager calls on CUDA too (model-level cases)


@dataclass
class Timing:
    """Per-call times in microseconds plus how they were taken."""

    samples_us: list[float]
    method: str
    n_sets: int
    note: str = ""

    def quantile(self, q: float) -> float:
        s = sorted(self.samples_us)
        if len(s) == 1:
            return s[0]
        pos = q * (len(s) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_us)


# --------------------------------------------------------------------------------------------
# Cache sizes and input rotation


@contextlib.contextmanager
def env_var(name: str, value: str) -> Iterator[None]:
    """Sets an environment variable the C++ side reads on every call (a provider's kernel
    switch), restored on exit."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def cache_bytes(device: str) -> int:
    """L2 size of GPU 0, or the CPU's last-level cache (sysfs), with a 32 MiB fallback."""
    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).L2_cache_size)
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            with open(os.path.join(base, idx, "size")) as f:
                txt = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


def num_sets(bytes_per_call: int, device: str, max_sets: int = 512) -> int:
    """Independent input sets so that one pass over them touches >= 4x the cache size."""
    want = math.ceil(4 * cache_bytes(device) / max(bytes_per_call, 1))
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        max_sets = min(max_sets, max(2, int(0.4 * free) // max(bytes_per_call, 1)))
    return max(2, min(want, max_sets))


# --------------------------------------------------------------------------------------------
# Timing


def _run_all(fn: Callable, sets: Sequence[tuple], kwargs: dict) -> list:
    return [fn(*s, **kwargs) for s in sets]


def time_cuda(
    fn: Callable, sets: Sequence[tuple], kwargs: dict, reps: int, warmup: int = 3,
    graph: bool = True,
) -> Timing:
    """One pass over all sets captured in a CUDA graph, replayed ``reps`` times, each replay timed
    with CUDA events; per-call time = replay time / len(sets). Event timing of eager passes
    instead when capture fails (the note says why) or ``graph`` is False."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as graph capture wants
        for _ in range(warmup):
            _run_all(fn, sets, kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()

    def eager() -> None:
        _run_all(fn, sets, kwargs)

    method, note, run = "cuda_events", "eager timing (by request)", eager
    cuda_graph, outs = None, None
    if graph:
        method, note, cuda_graph = "cuda_graph", "", torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(cuda_graph):
                outs = _run_all(fn, sets, kwargs)  # kept alive: outputs not recycled in-pass
            run = cuda_graph.replay
        except Exception as e:  # noqa: BLE001 - any capture failure means: time eagerly instead
            torch.cuda.synchronize()
            cuda_graph, outs = None, None
            method = "cuda_events"
            note = f"graph capture failed ({type(e).__name__}); eager timing"

    run()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends, strict=True):
        if cuda_graph is None:  # eager: each pass from an idle GPU, host-side launch cost counted
            torch.cuda.synchronize()
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) * 1e3 / len(sets) for s, e in zip(starts, ends, strict=True)]
    del cuda_graph, outs
    return Timing(samples, method, len(sets), note)


Job = tuple[Callable, Sequence[tuple], dict]  # (fn, input sets, kwargs)


def time_cpu(jobs: dict[str, Job], quick: bool = False, rounds: int = 8) -> dict[str, Timing]:
    """perf_counter around each call, rotating through each job's input sets. Providers are
    interleaved in `rounds` rounds so that load from other processes hits all of them alike
    (ratios stay fair on a shared machine). Reps per provider come from a time budget."""
    budget, lo, hi = (0.25, 5, 48) if quick else (1.2, 16, 320)
    per_round = {}
    for name, (fn, sets, kwargs) in jobs.items():  # warm-up + calibration
        fn(*sets[0], **kwargs)
        t0 = time.perf_counter()
        fn(*sets[1 % len(sets)], **kwargs)
        reps = max(lo, min(hi, int(budget / max(time.perf_counter() - t0, 1e-6))))
        per_round[name] = math.ceil(reps / rounds)
    samples: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, (fn, sets, kwargs) in jobs.items():
            out = samples[name]
            for _ in range(per_round[name]):
                args = sets[len(out) % len(sets)]
                t0 = time.perf_counter()
                fn(*args, **kwargs)
                out.append((time.perf_counter() - t0) * 1e6)
    return {name: Timing(samples[name], "perf_counter", len(jobs[name][1])) for name in jobs}


def time_all(jobs: dict[str, Job], cfg: Config, graph: bool = True) -> dict[str, Timing]:
    """Times every job: one CUDA graph per provider on GPU (eager passes without ``graph``),
    interleaved calls on CPU."""
    if cfg.device == "cuda":
        reps, warmup = (20, 2) if cfg.quick else (100, 5)
        return {name: time_cuda(*job, reps, warmup, graph) for name, job in jobs.items()}
    return time_cpu(jobs, cfg.quick)


def copy_case_sets(bytes_moved: int, n_sets: int, cfg: Config) -> list[tuple]:
    """(src, dst) pairs whose dst.copy_(src) reads and writes bytes_moved in total."""
    elt = torch.empty((), dtype=cfg.dtype).element_size()
    numel = max(1, bytes_moved // (2 * elt))
    return [
        (
            torch.randn(numel, device=cfg.device).to(cfg.dtype),
            torch.empty(numel, device=cfg.device, dtype=cfg.dtype),
        )
        for _ in range(n_sets)
    ]


def copy_fn(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    return dst.copy_(src)


@functools.lru_cache(maxsize=None)
def mm_tflops(device: str) -> float:
    """bf16 torch.mm rate of `device` in TFLOP/s (median), measured once per process, for
    GEMM-like benches' '% of mm': GPU 8192³ timed with CUDA events; CPU 2048³ on all threads."""
    cuda = device == "cuda"
    n, reps = (8192, 20) if cuda else (2048, 5)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3 if cuda else 1):
        torch.mm(a, b, out=out)
    if not cuda:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - t0)
        return 2 * n**3 / statistics.median(times) / 1e12
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]
    for s, e in ev:
        s.record()
        torch.mm(a, b, out=out)
        e.record()
    torch.cuda.synchronize()
    ms = statistics.median(s.elapsed_time(e) for s, e in ev)
    return 2 * n**3 / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------------------------
# Environment header


def _git_commit() -> str:
    """VLMKERN_COMMIT if set (a copy of the tree without .git), else git's short HEAD."""
    if os.environ.get("VLMKERN_COMMIT"):
        return os.environ["VLMKERN_COMMIT"]
    for cwd in (os.getcwd(), os.path.dirname(os.path.abspath(__file__))):
        try:
            sha = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True,
                text=True, timeout=10,
            )
            if sha.returncode == 0 and sha.stdout.strip():
                dirty = subprocess.run(
                    ["git", "diff", "--quiet", "HEAD"], cwd=cwd, capture_output=True, timeout=10
                ).returncode
                return sha.stdout.strip() + ("-dirty" if dirty == 1 else "")
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(device: str) -> dict[str, Any]:
    """The header printed above every table and stored in every JSON record."""
    import vlmkern

    info: dict[str, Any] = {}
    if hasattr(vlmkern, "info"):
        info = dict(vlmkern.info())
    if device == "cuda":
        dev = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        dev_extra = f"sm_{props.major}{props.minor}, L2 {props.L2_cache_size >> 20} MiB"
    else:
        dev = _cpu_model()
        dev_extra = f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus"
    return {
        "device": device,
        "device_name": dev,
        "device_detail": dev_extra,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "vlmkern": info.get("version", getattr(vlmkern, "__version__", "unknown")),
        "vlmkern_cuda_kernels": info.get("cuda_kernels", "unknown"),
        "vlmkern_cuda_archs": info.get("cuda_archs", "unknown"),
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def format_env(env: dict[str, Any]) -> str:
    return (
        f"# {env['device_name']} ({env['device_detail']})\n"
        f"# torch {env['torch']}, CUDA {env['cuda']}, vlmkern {env['vlmkern']} "
        f"(CUDA kernels: {env['vlmkern_cuda_kernels']}, archs: {env['vlmkern_cuda_archs']})\n"
        f"# commit {env['commit']}, {env['date']}"
    )


# --------------------------------------------------------------------------------------------
# Running one op's bench


def check_equal(name: str, case: Case, out: Any, ref: Any, exact: bool) -> None:
    """out vs ref: one tensor, or a tuple of tensors (ops with several outputs) compared in turn."""
    if isinstance(ref, (tuple, list)):
        if not isinstance(out, (tuple, list)) or len(out) != len(ref):
            raise AssertionError(f"{name} on {case.shape}: expected {len(ref)} outputs")
        for i, (o, r) in enumerate(zip(out, ref, strict=True)):
            check_equal(f"{name} output {i}", case, o, r, exact)
        return
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape or out.dtype != ref.dtype:
        got = (tuple(out.shape), out.dtype) if isinstance(out, torch.Tensor) else type(out)
        raise AssertionError(
            f"{name} on {case.shape}: got {got}, reference {(tuple(ref.shape), ref.dtype)}"
        )
    if exact:
        ok = torch.equal(out, ref)
    else:
        # Scaled by the largest |ref|: a bf16 reference that rounds a large intermediate (GEMM
        # output before + pos_embed) is off by ~1 ulp of that intermediate, not of its output.
        scale = ref.float().abs().max().item() if ref.numel() else 1.0
        ok = torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * max(1.0, scale))
    if not ok:
        diff = (out.float() - ref.float()).abs().max().item()
        raise AssertionError(f"{name} on {case.shape}: output differs from reference "
                             f"(max abs diff {diff})")


def run_op(
    op_name: str,
    cases: Sequence[Case],
    providers: dict[str, Callable],
    reference: Callable,
    cfg: Config,
    baseline: str,
    exact: bool = True,
    log: Callable[[str], None] = print,
    rooflines: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Check then time every provider (plus the copy roofline) on every case; return records.
    Providers named in `rooflines` (e.g. MM) compute something else on purpose: not checked."""
    records = []
    for case in cases:
        probe = case.make_inputs()
        ref = reference(*probe, **case.kwargs)
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        if any(r.numel() for r in refs) and not any(r.float().abs().sum().item() > 0 for r in refs):
            raise AssertionError(f"reference output on {case.shape} is all zero: bench is vacuous")
        n_sets = num_sets(case.bytes_moved, cfg.device)
        sets = [probe] + [case.make_inputs() for _ in range(n_sets - 1)]
        jobs: dict[str, Job] = {}
        skipped = []
        for name, fn in providers.items():
            try:
                out = fn(*probe, **case.kwargs)
            except Exception as e:  # noqa: BLE001 - a provider that cannot run is reported
                why = f"{type(e).__name__}: {e}".splitlines()[0]
                log(f"  [skip] {name} on {case.shape}: {why}")
                skipped.append({"op": op_name, "shape": case.shape, "provider": name,
                                "dtype": str(cfg.dtype).replace("torch.", ""),
                                "skipped": why})  # fmt: skip
                continue
            if name not in rooflines:
                check_equal(name, case, out, ref, exact)
            del out
            jobs[name] = (fn, sets, case.kwargs)
        jobs[COPY] = (copy_fn, copy_case_sets(case.bytes_moved, n_sets, cfg), {})
        del probe, ref, sets
        timings = time_all(jobs, cfg, case.cuda_graph)
        del jobs
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
        base = timings.get(baseline)
        copy_med = timings[COPY].median
        mm = timings.get(MM)
        for name, t in timings.items():
            med = t.median
            gemm_row = bool(case.flops) and name != COPY
            rec = {
                "op": op_name,
                "shape": case.shape,
                "provider": name,
                "dtype": str(cfg.dtype).replace("torch.", ""),
                "median_us": med,
                "p20_us": t.quantile(0.2),
                "p80_us": t.quantile(0.8),
                "bytes": case.bytes_moved,
                "gb_s": case.bytes_moved / (med * 1e-6) / 1e9,
                "pct_of_copy": 100.0 * copy_med / med,
                f"speedup_vs_{baseline}": (base.median / med) if base else None,
                "flops": case.flops,
                "tflop_s": (case.flops / (med * 1e-6) / 1e12) if gemm_row else None,
                # of the device's measured bf16 mm rate (8192³ on GPU), and of the same-shape
                # torch.mm row when the bench has one (MM)
                "pct_of_mm": (100.0 * case.flops / (med * 1e-6) / 1e12 / mm_tflops(cfg.device)
                              if gemm_row else None),
                "pct_of_same_mm": (100.0 * mm.median / med) if mm and gemm_row else None,
                "timing": t.method,
                "timing_note": t.note,
                "n_sets": t.n_sets,
                "reps": len(t.samples_us),
            }
            records.append(rec)
            log(f"  {case.shape:<34} {name:<14} {med:10.1f} us")
        records += skipped  # no timings: the table lists them under its rows, with the reason
    return records


# --------------------------------------------------------------------------------------------
# Output


def format_table(records: Sequence[dict[str, Any]], baseline: str) -> str:
    """Plain aligned text table of the records of one op; providers that could not run a case
    (records with a "skipped" reason) are listed after it."""
    skips = [f"- {r['provider']} on {r['shape']}: not run ({r['skipped']})"
             for r in records if "skipped" in r]
    records = [r for r in records if "skipped" not in r]
    key = f"speedup_vs_{baseline}"
    head = ["shape", "provider", "median us", "p20", "p80", "GB/s", "% of copy",
            f"x vs {baseline}"]
    gemm = any(r.get("tflop_s") for r in records)  # compute-bound ops: TFLOP/s, % of mm
    same = any(r.get("pct_of_same_mm") for r in records)
    if gemm:
        head += ["TFLOP/s", "% of mm peak"] + ([f"% of same-shape {MM}"] if same else [])
    rows = []
    notes = []
    for r in records:
        prov = r["provider"]
        if r["timing_note"]:
            prov += "*"
            notes.append(f"* {r['provider']} on {r['shape']}: {r['timing_note']}")
        rows.append([
            r["shape"], prov, f"{r['median_us']:.1f}", f"{r['p20_us']:.1f}",
            f"{r['p80_us']:.1f}", f"{r['gb_s']:.1f}", f"{r['pct_of_copy']:.0f}%",
            f"{r[key]:.2f}x" if r.get(key) else "-",
        ])
        if gemm:
            rows[-1] += [f"{r['tflop_s']:.3g}" if r.get("tflop_s") else "-",
                         f"{r['pct_of_mm']:.0f}%" if r.get("pct_of_mm") else "-"]
            if same:
                rows[-1].append(f"{r['pct_of_same_mm']:.0f}%" if r.get("pct_of_same_mm")
                                else "-")
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    left = {0, 1}

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    lines = [fmt(head), fmt(["-" * w for w in widths])]
    prev = None
    for r, row in zip(records, rows, strict=True):
        if prev is not None and r["shape"] != prev:
            lines.append("")
        prev = r["shape"]
        lines.append(fmt(row))
    lines += notes + skips
    return "\n".join(lines)

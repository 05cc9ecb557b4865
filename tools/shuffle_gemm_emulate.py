"""Dev aid, no GPU needed: a line-by-line numpy emulation of the Hopper gather GEMM
shuffle_gemm_kernel (csrc/cuda/kernels/shuffle_gemm.cuh, helpers in kernels/wgmma_gemm.cuh; host
side in csrc/cuda/shuffle_gemm.cu / .h), per CTA and per thread (256 threads, vectorized with
numpy). It derives ShuffleGemmArgs from ShuffleGemmParams as cuda_shuffle_gemm does (raising
where shuffle_gemm_unsupported refuses), then emulates each thread's 16-byte cp.async chunks of
the A (shuffle index map) and W tiles into byte-addressed shared memory at the code's
sw128_offset, the norm prologue (LayerNorm / RMSNorm in place, at the kernel's points of the
3-stage ring), the wgmma (each stage decoded with an independent implementation of CuTe's
GMMA::Layout_K_SW128_Atom, the k16 steps of mma_tile, fp32 accumulation) and store_tile's
epilogue (bias, or packed Qwen3-VL's 4-tap positions + bias; GMMA's C fragment layout). A
pipeline tracker raises on ring hazards: a copy or a normalize into a stage an in-flight wgmma
reads, a wgmma reading copies not landed or generic writes not fenced + synced, a thread
normalizing a chunk another thread copied. The statistics pre-pass is emulated as
csrc/cuda/kernels/shuffle_layer_norm.cuh computes it (reduction order included).

Checks per case: the A / W tiles the wgmma reads equal the shuffled (and normalized, as the
statistics kernel's write path / Qwen2RMSNorm compute it) rows bit for bit; the accumulators equal
an fp32 matmul of those tiles to ~16 fp32 ulps of sum |a w|; the output is that matmul's epilogue
(rounded from within that tolerance; rounding differences in at most 1% of elements), each
element written once, and within 2x PyTorch's low-precision error of a float64 reference.
Cases: Idefics3 shuffles (r = 2, 3; K and N tails; a padded-batch-stride view), InternVL
(LayerNorm over 4C), Qwen mergers at r = 1 (per-token LayerNorm / RMSNorm, the post-merge
LayerNorm), packed Qwen3-VL positions, and the launcher's refusals. nvcc's default
-fmad=true is assumed to contract the plain `a * b + c` of tap_addend and the statistics kernel
into one FFMA (CONTRACT; the LayerNorm element's roundings are explicit, norm_affine.cuh); rsqrtf
is modelled as the correctly rounded fp32 rsqrt (the GPU's is within 2 ulp). Keep it in step
with the kernel.

usage: PYTHONPATH=python:tests python tools/shuffle_gemm_emulate.py [NAME...]   (~10 s; NAMEs:
run only the cases whose name contains one of them, e.g. "internvl")
"""
import sys
import zlib
from collections import namedtuple
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

kBlockM, kBlockN, kBlockK = 128, 128, 64  # wgmma_gemm.cuh
kThreads = 256
kStageBytes = kBlockM * kBlockK * 2
kStages = 3  # shuffle_gemm.cuh
INT32_MAX = 2**31 - 1
CONTRACT = True  # nvcc -fmad=true: tap_addend's `p += a * b`, the statistics' `sq += d * d`
#                   and `sum * inv_k + eps` compile to one FFMA each
DTYPES = {torch.bfloat16: "kBFloat16", torch.float16: "kFloat16"}


def fmaf_rn(a, b, c):
    """fp32 fma(a, b, c), one rounding: a * b is exact in float64; a * b + c rounded to odd in
    float64 (TwoSum's error picks the odd neighbour), so rounding that to fp32 is exact RNE."""
    a, b, c = (np.asarray(v, np.float32) for v in (a, b, c))
    p, c = a.astype(np.float64) * b, c.astype(np.float64)
    p, c = np.broadcast_arrays(p, c)
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)  # s + err == p + c exactly
    even = (np.asarray(s).view(np.int64) & 1) == 0
    s = np.where((err != 0) & even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def fma32(a, b, c):
    """fp32 `a * b + c` as nvcc compiles it: one FFMA under CONTRACT, else two roundings."""
    if CONTRACT:
        return fmaf_rn(a, b, c)
    a, b, c = (np.asarray(v, np.float32) for v in (a, b, c))
    return (a * b).astype(np.float32) + c


def rsqrt32(x):
    return (1.0 / np.sqrt(np.asarray(x, np.float32).astype(np.float64))).astype(np.float32)


def f32_of(bits, dt):
    """16-bit patterns -> fp32 values of dt."""
    b = np.ascontiguousarray(bits, np.uint16)
    return torch.from_numpy(b.view(np.int16)).view(dt).float().numpy()


def bits_of(x, dt):
    """fp32 -> dt (round to nearest even, as T(float) / from_float<T>) -> 16-bit patterns."""
    x = np.ascontiguousarray(x, np.float32)
    return torch.from_numpy(x).to(dt).view(torch.int16).numpy().view(np.uint16)


def round_t(x, dt):
    return f32_of(bits_of(x, dt), dt)


# ---- device memory: allocations at fake 256-byte aligned addresses, pointers in elements ----

class Buf:
    _next = 1 << 40

    def __init__(self, data: np.ndarray):
        self.data = data
        self.writes = np.zeros(len(data), np.int64)
        self.addr = Buf._next
        Buf._next += (data.nbytes + 255) // 256 * 256 + 256


@dataclass(frozen=True)
class Ptr:
    buf: Buf
    off: int = 0  # elements

    def __add__(self, i):
        return Ptr(self.buf, self.off + int(i))

    @property
    def addr(self):
        return self.buf.addr + self.off * self.buf.data.itemsize


def to_device(t: torch.Tensor) -> Ptr:
    """A pointer to t's first element (data_ptr) inside a copy of t's whole storage."""
    whole = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
    if t.dtype in DTYPES:
        arr = whole.view(torch.int16).numpy().view(np.uint16).copy()
    else:
        arr = whole.numpy().copy()
    return Ptr(Buf(arr), t.storage_offset())


def load(p: Ptr, offs, n=1):
    """p[offs .. offs + n) (n > 1: one vector access, aligned to its size), bounds-checked."""
    idx = p.off + np.asarray(offs, np.int64)
    size = p.buf.data.itemsize
    assert ((idx >= 0) & (idx + n <= len(p.buf.data))).all(), "read out of bounds"
    assert ((p.buf.addr + idx * size) % (n * size) == 0).all(), "misaligned vector read"
    return p.buf.data[idx] if n == 1 else p.buf.data[idx[..., None] + np.arange(n)]


def store(p: Ptr, offs, vals):
    idx = p.off + np.asarray(offs, np.int64)
    assert ((idx >= 0) & (idx < len(p.buf.data))).all(), "write out of bounds"
    p.buf.data[idx] = vals
    np.add.at(p.buf.writes, idx, 1)


def aligned(p, nbytes):
    return (0 if p is None else p.addr) % nbytes == 0


# ---- host side: shuffle_gemm.h / shuffle_gemm.cu ----

@dataclass
class ShuffleGemmParams:
    dtype: object = torch.bfloat16
    x: Ptr | None = None
    batch: int = 0
    h: int = 0
    w: int = 0
    c: int = 0
    r: int = 0
    stride_b: int = 0
    stride_h: int = 0
    stride_w: int = 0
    weight: Ptr | None = None
    n: int = 0
    bias: Ptr | None = None
    out: Ptr | None = None
    device: int = 0
    table: Ptr | None = None
    tap_index: Ptr | None = None
    tap_weight: Ptr | None = None
    norm_mean: Ptr | None = None
    norm_rstd: Ptr | None = None
    norm_weight: Ptr | None = None
    norm_bias: Ptr | None = None
    norm_groups: int = 1
    norm_rms: int = 0


def shuffle_gemm_unsupported(p: ShuffleGemmParams):
    # shuffle_gemm_compiled() and is_sm90(): an sm_90a build on an H100 (emulated)
    if p.r < 1 or p.c < 1 or p.h % p.r != 0 or p.w % p.r != 0:
        return "r must divide H and W"
    k = p.r * p.r * p.c
    if p.c % 8 != 0 or k > INT32_MAX // 2 or p.n < 1 or p.n > INT32_MAX:
        return "C must be a multiple of 8 (16-byte chunks), K and N in the int range"
    if (p.stride_b % 8 != 0 or p.stride_h % 8 != 0 or p.stride_w % 8 != 0 or p.stride_b < 0
            or p.stride_h < 0 or p.stride_w < 0 or not aligned(p.x, 16)):
        return "x's base and token strides must be 16-byte aligned"
    if (not aligned(p.weight, 16) or not aligned(p.out, 4)
            or (p.bias is not None and not aligned(p.bias, 2))):
        return "weight must be 16-byte aligned, out 4-byte aligned"
    if p.table is not None and (p.tap_index is None or p.tap_weight is None):
        return "a position table needs its tap rows and weights"
    if p.norm_rstd is not None:
        if p.table is not None:
            return "a norm and a position table"
        if ((p.norm_mean is not None or p.norm_bias is not None) if p.norm_rms
                else p.norm_mean is None):
            return "an RMSNorm has no mean nor bias; a LayerNorm needs its mean"
        if p.norm_groups < 1 or k % p.norm_groups != 0 or (k // p.norm_groups) % 8 != 0:
            return "the norm's groups must split K into multiples of 8 features"
        if not aligned(p.norm_weight, 16) or not aligned(p.norm_bias, 16):
            return "the norm's weight and bias must be 16-byte aligned"
    m = p.batch * (p.h // p.r) * (p.w // p.r)
    if (m + 127) // 128 * ((p.n + 127) // 128) > INT32_MAX:
        return "more than 2^31 - 1 tiles"
    return None


def cuda_shuffle_gemm(p: ShuffleGemmParams, trace=None):
    """Checks p (ValueError: the launcher's refusal), derives the kernel's arguments as
    cuda_shuffle_gemm does and runs ShuffleGemmVariant::run's grid, CTA by CTA."""
    why = shuffle_gemm_unsupported(p)
    if why is not None:
        raise ValueError(why)
    a = SimpleNamespace()
    a.x, a.weight, a.bias, a.out = p.x, p.weight, p.bias, p.out
    a.grid_rows = p.h // p.r
    a.grid_cols = p.w // p.r
    a.m = p.batch * a.grid_rows * a.grid_cols
    a.stride_b, a.stride_h, a.stride_w = p.stride_b, p.stride_h, p.stride_w
    a.c = p.c
    a.r = p.r
    a.k = p.r * p.r * p.c
    a.n = int(p.n)
    a.k_tiles = (a.k + 63) // 64
    a.n_tiles = (a.n + 127) // 128
    a.pair_stores = int(p.n % 2 == 0)
    a.table, a.tap_index, a.tap_weight = p.table, p.tap_index, p.tap_weight
    a.norm_mean, a.norm_rstd = p.norm_mean, p.norm_rstd
    a.norm_weight, a.norm_bias = p.norm_weight, p.norm_bias
    a.norm_groups = p.norm_groups
    a.norm_group_size = a.k // p.norm_groups if p.norm_groups > 0 else a.k
    a.norm_rms = p.norm_rms
    if a.m == 0:
        return
    # ShuffleGemmVariant::run: m_tiles * n_tiles CTAs, n fastest
    m_tiles = (a.m + kBlockM - 1) // kBlockM
    blocks = m_tiles * a.n_tiles
    assert 0 < blocks <= INT32_MAX
    for bid in range(blocks):
        shuffle_gemm_kernel(a, p.dtype, bid, trace if trace is not None else {})


# ---- shared memory: SharedStorage<T> in the dynamic window, the pipeline's hazards ----

def align_up(v, k):
    return (v + k - 1) // k * k


A_OFF = 0  # alignas(1024) T a[kStages * kBlockM * kBlockK]
B_OFF = align_up(A_OFF + kStages * kBlockM * kBlockK * 2, 1024)  # alignas(1024) T b[...]
RB_OFF = align_up(B_OFF + kStages * kBlockN * kBlockK * 2, 8)  # int64_t row_base[kBlockM]
SIZEOF_STORAGE = align_up(RB_OFF + 8 * kBlockM, 1024)
SMEM_LAUNCH = SIZEOF_STORAGE + 1024  # ShuffleGemmVariant::run's dynamic smem
SMEM_RAW = 16  # the dynamic base: 16-byte aligned only, aligned_smem rounds it up


def sw128_offset(row, k_bytes):  # wgmma_gemm.cuh, as the code computes it
    return ((row >> 3) * 1024 + (row & 7) * 128 + (((k_bytes >> 4) ^ (row & 7)) << 4)
            + (k_bytes & 15))


class Pipeline:
    """Byte-addressed shared memory with cp.async groups (copies land at the wait that retires
    their group, the latest they may), proxy fences, barriers and in-flight wgmma reads. Hazard
    keys: the 16 KiB stages of s.a (0..2) and s.b (3..5)."""

    def __init__(self, base):
        self.smem = np.full(SMEM_RAW + SMEM_LAUNCH, 0xA5, np.uint8)  # garbage, not zeros
        self.base = base
        self.owner = np.full(len(self.smem) // 16, -1, np.int64)  # thread that copied a chunk
        self.open, self.groups = [], []
        self.reading, self.unfenced, self.unsynced = set(), set(), set()
        self.snapshot = None

    def keys(self, addr):
        return {int(k) for k in np.unique((np.asarray(addr) - self.base) // kStageBytes)}

    def pending(self):
        return {k for g in self.groups + [self.open] for dst, _, _ in g for k in self.keys(dst)}

    def cp_async_16(self, dst, data, tid):
        assert not self.keys(dst) & self.reading, "cp.async into a stage a wgmma is reading"
        assert (dst % 16 == 0).all()
        self.open.append((dst, data, tid))

    def commit(self):
        self.groups.append(self.open)
        self.open = []

    def wait(self, n):  # cp.async.wait_group n: every group but the newest n landed
        while len(self.groups) > n:
            for dst, data, tid in self.groups.pop(0):
                self.smem[dst[:, None] + np.arange(16)] = data
                self.owner[dst // 16] = tid
                self.unsynced |= self.keys(dst)

    def ld_st_16(self, addr, tid, vals=None):
        """A thread's own 16-byte chunks (ld / st.shared.v4), generic proxy."""
        keys = self.keys(addr)
        assert not keys & self.reading, "generic access to a stage a wgmma is reading"
        assert not keys & self.pending(), "a chunk read before its copy landed"
        assert (self.owner[addr // 16] == tid).all(), "a chunk another thread copied"
        if vals is None:
            return self.smem[addr[:, None] + np.arange(16)].copy()
        self.smem[addr[:, None] + np.arange(16)] = vals
        self.unfenced |= keys
        self.unsynced |= keys

    def fence_view_async_shared(self):
        self.unfenced = set()

    def syncthreads(self):
        self.unsynced &= self.unfenced  # a write fenced after the barrier is still unseen

    def wgmma_begin(self, keys):
        assert not keys & self.pending(), "wgmma on a stage with copies in flight"
        assert not keys & (self.unfenced | self.unsynced), "wgmma before fence + barrier"
        self.reading |= keys
        self.snapshot = self.smem.copy()

    def warpgroup_wait(self):
        for k in self.reading:
            lo = self.base + k * kStageBytes
            assert np.array_equal(self.smem[lo:lo + kStageBytes],
                                  self.snapshot[lo:lo + kStageBytes]), "stage changed under wgmma"
        self.reading = set()


def gmma_k_sw128_tile(smem, base, stage):
    """The (128, 64) 16-bit bits of stage `stage` of SmemLayout<T, 3> as wgmma reads it, decoded
    from CuTe's definition (independent of sw128_offset):
    GMMA::Layout_K_SW128_Atom<T> = upcast<16>(ComposedLayout<Swizzle<3,4,3>, smem_ptr_flag,
    Layout<Shape<_8,_1024>, Stride<_1024,_1>>>) (bits) = Swizzle<3,4,3> o (8,64):(64,1)
    (elements), the swizzle acting on the element's byte address (swizzle_ptr): bits [7,10)
    XOR into bits [4,7); tile_to_shape(atom, (128, 64, 3)) stacks the atoms column-major:
    ((8,16),(64,1),(1,3)):((64,512),(1,0),(0,8192)) elements."""
    m = np.arange(kBlockM)[:, None]
    k = np.arange(kBlockK)[None, :]
    elem = (m % 8) * 64 + k + (m // 8) * 512 + stage * 8192
    addr = base + 2 * elem
    addr = addr ^ ((addr & (0b111 << 7)) >> 3)  # Swizzle<3,4,3>: YYY at bit 7 -> ZZZ at bit 4
    return smem[addr].astype(np.uint16) | (smem[addr + 1].astype(np.uint16) << 8)


# ---- the kernel: shuffle_gemm.cuh, per CTA, threads vectorized ----

TileOut = namedtuple("TileOut", "addend addend_row_stride out out_batch_stride out_row_stride "
                                "m l d pair_stores table tap_index tap_weight")


def shuffle_gemm_kernel(a, dt, bid, trace):
    tid = np.arange(kThreads)
    n0 = bid % a.n_tiles * kBlockN
    m0 = bid // a.n_tiles * kBlockM
    s_base = (SMEM_RAW + 1023) & ~1023  # aligned_smem
    assert s_base + SIZEOF_STORAGE <= SMEM_RAW + SMEM_LAUNCH
    pipe = Pipeline(s_base)
    smem = pipe.smem
    a_smem, b_smem = s_base + A_OFF, s_base + B_OFF
    assert a_smem % 1024 == 0 and b_smem % 1024 == 0

    def row_base(row):  # s.row_base[row]
        addr = s_base + RB_OFF + 8 * np.asarray(row)
        return smem[addr[..., None] + np.arange(8)].copy().view(np.int64)[..., 0]

    t = tid[tid < kBlockM]  # row m = (b, i, j): its first token (r*i, r*j)
    m, per_image = m0 + t, a.grid_rows * a.grid_cols
    b = m // per_image
    rem = m - b * per_image
    i = rem // a.grid_cols
    j = rem - i * a.grid_cols
    base = np.where(m < a.m, b * a.stride_b + i * a.r * a.stride_h + j * a.r * a.stride_w, -1)
    rb = (s_base + RB_OFF + 8 * t)[:, None] + np.arange(8)
    smem[rb] = base.astype(np.int64).view(np.uint8).reshape(-1, 8)
    pipe.syncthreads()

    def cp_async_16(dst, src, off, valid):  # 16 bytes from src + off, or zero-fill
        data = np.zeros((kThreads, 8), np.uint16)
        if valid.any():
            data[valid] = load(src, off[valid], 8)
        pipe.cp_async_16(dst, data.view(np.uint8), tid)
        return dst

    def issue_a(kt, stage):
        chunk, f = tid & 7, kt * kBlockK + (tid & 7) * 8
        q = f // a.c  # f = (dy r + dx) C + cc
        cc = f - q * a.c
        dy = q // a.r
        dx = q - dy * a.r
        k_off = dy * a.stride_h + dx * a.stride_w + cc
        dsts = []
        for j in range(kBlockM // 32):
            row = (tid >> 3) + 32 * j
            base = row_base(row)
            valid = (f < a.k) & (base >= 0)
            dsts.append(cp_async_16(a_smem + stage * kStageBytes + sw128_offset(row, chunk * 16),
                                    a.x, np.where(valid, base + k_off, 0), valid))
        check_cover(dsts, a_smem + stage * kStageBytes)

    def issue_w(base_, w, d, kp, n0, kt, stage):  # wgmma_gemm.cuh
        chunk, k = tid & 7, kt * kBlockK + (tid & 7) * 8
        dsts = []
        for j in range(kBlockN // 32):
            row = (tid >> 3) + 32 * j
            n = n0 + row
            valid = (n < d) & (k < kp)
            dsts.append(cp_async_16(base_ + stage * kStageBytes + sw128_offset(row, chunk * 16),
                                    w, np.where(valid, n * kp + k, 0), valid))
        check_cover(dsts, base_ + stage * kStageBytes)

    def issue(kt):  # tile kt of A and w -> stage kt % 3, one cp.async group
        if kt < a.k_tiles:
            issue_a(kt, kt % kStages)
            issue_w(b_smem, a.weight, a.n, a.k, n0, kt, kt % kStages)
        pipe.commit()

    norm = a.norm_rstd is not None
    gamma, beta = a.norm_weight, a.norm_bias

    def normalize_a(kt):
        chunk, f = tid & 7, kt * kBlockK + (tid & 7) * 8
        act = f < a.k  # if (f >= a.k) return;
        grp = f // a.norm_group_size
        fg = f - grp * a.norm_group_size
        g = np.zeros((kThreads, 8), np.float32)
        be = np.zeros((kThreads, 8), np.float32)
        if gamma is not None:
            g[act] = f32_of(load(gamma, fg[act], 8), dt)
        if beta is not None:
            be[act] = f32_of(load(beta, fg[act], 8), dt)
        for j in range(kBlockM // 32):
            row = (tid >> 3) + 32 * j
            live = act & (row_base(row) >= 0)  # past M: zero-filled, never stored
            stat = (m0 + row) * a.norm_groups + grp
            rstd = np.zeros(kThreads, np.float32)
            mean = np.zeros(kThreads, np.float32)
            rstd[live] = load(a.norm_rstd, stat[live])
            if not a.norm_rms:
                mean[live] = load(a.norm_mean, stat[live])
            addr = (a_smem + (kt % kStages) * kStageBytes + sw128_offset(row, chunk * 16))[live]
            e = f32_of(pipe.ld_st_16(addr, tid[live]).view(np.uint16), dt)
            mu, rs, gl, bl = mean[live, None], rstd[live, None], g[live], be[live]
            if a.norm_rms:  # weight * (x * rstd).to(dtype), the product rounded again
                y = round_t(e * rs, dt)
                if gamma is not None:
                    y = y * gl
            else:
                y = layer_norm_value(e, mu, rs, gl if gamma is not None else None,
                              bl if beta is not None else None)
            pipe.ld_st_16(addr, tid[live], bits_of(y, dt).view(np.uint8))

    acc = np.zeros((kBlockM, kBlockN), np.float32)
    mt, nt = m0 // kBlockM, n0 // kBlockN

    def mma_tile(sa, sb, kt, kp):
        steps = min(kBlockK // 16, (kp - kt * kBlockK + 15) // 16)
        pipe.wgmma_begin({sa, kStages + sb})
        ta = gmma_k_sw128_tile(smem, a_smem, sa)
        tb = gmma_k_sw128_tile(smem, b_smem, sb)
        for name, key, tile in (("a", (mt, kt), ta), ("b", (nt, kt), tb)):
            seen = trace.setdefault(name, {}).setdefault(key, tile)  # same in every CTA
            assert np.array_equal(seen, tile), f"CTAs read different {name} tiles {key}"
        fa, fb = f32_of(ta, dt), f32_of(tb, dt)
        for wg in range(2):  # TiledMma 2x1x1: warpgroup wg owns rows 64 wg .. 64 wg + 63
            rows = slice(64 * wg, 64 * wg + 64)
            for kb in range(steps):  # one SM90_64x128x16 wgmma
                ks = slice(16 * kb, 16 * kb + 16)
                acc[rows] += fa[rows, ks] @ fb[:, ks].T

    # the main loop, as the kernel orders it
    issue(0)
    issue(1)
    pipe.wait(1)  # group 0: tile 0
    if norm:
        normalize_a(0)
    pipe.fence_view_async_shared()
    pipe.syncthreads()
    for kt in range(a.k_tiles):
        stage = kt % kStages
        mma_tile(stage, stage, kt, a.k)
        issue(kt + 2)
        pipe.wait(1)  # every group but the newest: this thread's copies of tile kt + 1
        if norm and kt + 1 < a.k_tiles:
            normalize_a(kt + 1)
        pipe.warpgroup_wait()
        pipe.fence_view_async_shared()
        pipe.syncthreads()

    trace.setdefault("acc", {})[(mt, nt)] = acc.copy()
    store_tile(acc, m0, n0, TileOut(a.bias, 0, a.out, 0, a.n, a.m, a.m, a.n, a.pair_stores,
                                    a.table, a.tap_index, a.tap_weight), dt)


def check_cover(dsts, stage_base):
    """One tile's copies: 1024 distinct 16-byte chunks filling the 16 KiB stage."""
    d = np.concatenate(dsts)
    assert len(np.unique(d)) == kStageBytes // 16, "two copies into one chunk"
    assert ((d >= stage_base) & (d < stage_base + kStageBytes)).all(), "a copy past its stage"


def layer_norm_value(v, mean, rstd, g, be):
    """norm_affine.cuh (the statistics kernel's write path and the GEMM's prologue): every
    rounding explicit, y = __fmul_rn(__fsub_rn(v, mean), rstd), then __fmaf_rn(y, gamma, beta),
    __fmul_rn(y, gamma) or __fadd_rn(y, beta) (g / be None: no gamma / beta)."""
    y = ((v - mean).astype(np.float32) * rstd).astype(np.float32)
    if g is not None:
        return fmaf_rn(y, g, be) if be is not None else (y * g).astype(np.float32)
    return (y + be).astype(np.float32) if be is not None else y


def c_coord(tid, i):
    """thr.partition_C(identity (128, 128)) value i of thread tid: warpgroup tid / 128 the rows
    64 wg.., then PTX's wgmma .m64nNk16 f32 D fragment: i = 4 j + 2 h + c at row 16 warp +
    lane / 4 + 8 h, column 8 j + 2 (lane % 4) + c."""
    wg, warp, lane = tid // 128, tid % 128 // 32, tid % 32
    row = 64 * wg + 16 * warp + lane // 4 + 8 * (i // 2 % 2)
    return row, 8 * (i // 4) + 2 * (lane % 4) + i % 2


def tap_addend(rows, w, table, bias, n, dt):
    """T(T(sum of the 4 taps in order, fp32) + bias): rows (threads, 4) table row offsets."""
    tv = [f32_of(load(table, rows[:, k] + n), dt) for k in range(4)]
    p = (tv[0] * w[:, 0]).astype(np.float32)
    for k in range(1, 4):
        p = fma32(tv[k], w[:, k], p)
    v = round_t(p, dt)
    if bias is not None:
        v = round_t(v + f32_of(load(bias, n), dt), dt)
    return v


def store_tile(acc, m0, n0, e: TileOut, dt):
    tid = np.arange(kThreads)
    r0 = c_coord(tid, 0)[0]
    out_row, add_row, live, taps = [], [], [], []
    for h in range(2):
        m = m0 + r0 + 8 * h
        b = m // e.l
        r = m - b * e.l
        live.append(m < e.m)
        out_row.append(b * e.out_batch_stride + r * e.out_row_stride)
        add_row.append(r * e.addend_row_stride)
        if e.table is not None:  # (4, M) taps of row m; past M the first table row, weight 0
            rows = np.zeros((kThreads, 4), np.int64)
            w = np.zeros((kThreads, 4), np.float32)
            for k in range(4):
                rows[live[h], k] = load(e.tap_index, k * e.m + m[live[h]]) * e.d
                w[live[h], k] = load(e.tap_weight, k * e.m + m[live[h]])
            taps.append((rows, w))
    for i in range(0, 64, 2):  # acc.size() == 64 per thread
        row, col = c_coord(tid, i)
        h = np.where(row == r0, 0, 1)
        n = n0 + col
        ok = np.where(h == 0, live[0], live[1]) & (n < e.d)
        both = n + 1 < e.d
        v0, v1 = acc[row, col], acc[row, col + 1]
        for hh in range(2):
            sel = ok & (h == hh)
            s1 = sel & both
            if e.table is not None:
                v0[sel] += tap_addend(taps[hh][0][sel], taps[hh][1][sel], e.table, e.addend,
                                      n[sel], dt)
                v1[s1] += tap_addend(taps[hh][0][s1], taps[hh][1][s1], e.table, e.addend,
                                     n[s1] + 1, dt)
            elif e.addend is not None:
                v0[sel] += f32_of(load(e.addend, add_row[hh][sel] + n[sel]), dt)
                v1[s1] += f32_of(load(e.addend, add_row[hh][s1] + n[s1] + 1), dt)
        dst = np.where(h == 0, out_row[0], out_row[1]) + n
        pair = ok & both & bool(e.pair_stores)
        assert ((e.out.addr + 2 * dst[pair]) % 4 == 0).all(), "misaligned pair store"
        store(e.out, dst[ok], bits_of(v0[ok], dt))
        store(e.out, dst[ok & both] + 1, bits_of(v1[ok & both], dt))


# ---- the statistics pre-pass: shuffle_layer_norm.cuh (rows vectorized, 256 threads each) ----

def sln_block_sum(v):
    """v (rows, 256) per-thread fp32 partials -> the block sum as every thread gets it: an xor
    butterfly per warp, lane 0's sums in red[warp], added in warp order."""
    lane = np.arange(kThreads)
    for o in (16, 8, 4, 2, 1):
        v = (v + v[:, lane ^ o]).astype(np.float32)
    s = np.zeros(len(v), np.float32)
    for w in range(kThreads // 32):
        s = (s + v[:, 32 * w]).astype(np.float32)
    return s


def shuffle_layer_norm(a, dt):
    """ShuffleLnArgs a (pointers as Ptr): writes a.mean (unless rms), a.rstd, a.out if any."""
    m = np.arange(a.rows)
    b, i, j = m // (a.gh * a.gw), (m // a.gw) % a.gh, m % a.gw
    row = b * a.stride_b + a.r * i * a.stride_h + a.r * j * a.stride_w
    inv_k = np.float32(1) / np.float32(a.k)
    vecs = (a.k + 8 * kThreads - 1) // (8 * kThreads)
    th = np.arange(kThreads)
    v = np.zeros((a.rows, vecs, kThreads, 8), np.float32)
    s = np.zeros((a.rows, kThreads), np.float32)
    kks = [(u * kThreads + th) * 8 for u in range(vecs)]
    for u, kk in enumerate(kks):
        ok = kk < a.k
        q, cc = kk // a.c, kk % a.c  # chunk (dy * r + dx), channel
        dy, dx = q // a.r, q % a.r
        off = (dy * a.stride_h + dx * a.stride_w + cc)[ok]
        v[:, u, ok] = f32_of(load(a.x, row[:, None] + off[None], 8), dt)
        for t in range(8):
            s[:, ok] = s[:, ok] + v[:, u, ok, t]
    mean = np.zeros(a.rows, np.float32) if a.rms else (sln_block_sum(s) * inv_k).astype(
        np.float32)
    sq = np.zeros((a.rows, kThreads), np.float32)
    for u, kk in enumerate(kks):
        ok = kk < a.k
        for t in range(8):
            d = (v[:, u, ok, t] - mean[:, None]).astype(np.float32)
            sq[:, ok] = fma32(d, d, sq[:, ok])
    rstd = rsqrt32(fma32(sln_block_sum(sq), inv_k, np.float32(a.eps)))
    if a.out is not None:
        for u, kk in enumerate(kks):
            ok = kk < a.k
            g = f32_of(load(a.weight, kk[ok], 8), dt) if a.weight is not None else None
            be = f32_of(load(a.bias, kk[ok], 8), dt) if a.bias is not None else None
            y = layer_norm_value(v[:, u, ok], mean[:, None, None], rstd[:, None, None], g, be)
            store(a.out, (m[:, None] * a.k + kk[ok][None])[..., None] + np.arange(8),
                  bits_of(y, dt))
    if a.mean is not None:
        store(a.mean, m, mean)
    store(a.rstd, m, rstd)


# ---- the cases ----

def _main() -> None:
    import torch.nn.functional as F

    from vlmkern import reference
    from vlmkern.reference.mlp_projector import rms_norm

    def wanted(name):
        """Whether to run case `name`; its random inputs depend on its name alone."""
        if sys.argv[1:] and not any(s in name for s in sys.argv[1:]):
            return False
        torch.manual_seed(zlib.crc32(name.encode()))
        return True

    def dev(t):
        return None if t is None else to_device(t)

    def new_out(m, n, dt):
        buf = Buf(np.full(m * n, 0x7FFF, np.uint16))  # NaN: every element must be written
        return Ptr(buf, 0)

    def read_out(p, m, n, dt):
        assert (p.buf.writes == 1).all(), "an output element written twice or never"
        return torch.from_numpy(p.buf.data.view(np.int16).reshape(m, n).copy()).view(dt)

    def grid_params(x, r, w, bias, dt):
        B, H, W, C = x.shape
        return ShuffleGemmParams(dtype=dt, x=dev(x), batch=B, h=H, w=W, c=C, r=r,
                                 stride_b=x.stride(0), stride_h=x.stride(1),
                                 stride_w=x.stride(2), weight=dev(w), n=w.shape[0],
                                 bias=dev(bias), out=new_out(x.shape[0] * (H // r) * (W // r),
                                                             w.shape[0], dt))

    def stats(x, r, dt, eps, rms=False, gamma=None, beta=None, write=False):
        """The statistics pass on x (B, H, W, C) (rows B (H/r) (W/r)): mean, rstd (fp32 Ptr)
        and, with write, the normalized rows (M, K) bits of its write path."""
        B, H, W, C = x.shape
        rows, k = B * (H // r) * (W // r), r * r * C
        a = SimpleNamespace(x=dev(x), weight=dev(gamma), bias=dev(beta), rows=rows,
                            gh=H // r, gw=W // r, stride_b=x.stride(0), stride_h=x.stride(1),
                            stride_w=x.stride(2), r=r, c=C, k=k, eps=eps, rms=int(rms),
                            out=Ptr(Buf(np.zeros(rows * k, np.uint16))) if write else None,
                            mean=None if rms else Ptr(Buf(np.zeros(rows, np.float32))),
                            rstd=Ptr(Buf(np.zeros(rows, np.float32))))
        shuffle_layer_norm(a, dt)
        xn = a.out.buf.data.reshape(rows, k) if write else None
        return a.mean, a.rstd, xn

    def check_lowprec(name, out, pt, ref64):
        top = ref64.abs().max().item()
        err = (out.double() - ref64).abs().max().item()
        err_pt = (pt.double() - ref64).abs().max().item()
        floor = torch.finfo(out.dtype).eps * max(top, 1e-3)
        assert err <= 2 * err_pt + floor, f"{name}: err {err:.3g} vs PyTorch {err_pt:.3g}"

    def check(name, p, trace, a_bits, w, addend, ref64, pt):
        """a_bits (M, K) the A rows the GEMM must read (bits); addend (M or 1, N) fp32 or
        None; ref64 the float64 reference; pt PyTorch's low-precision chain."""
        dt = p.dtype
        M, K = a_bits.shape
        N = w.shape[0]
        out = read_out(p.out, M, N, dt)
        assert not out.isnan().any(), name
        mt, kt_n, nt = (M + 127) // 128, (K + 63) // 64, (N + 127) // 128
        pa = np.zeros((mt * 128, kt_n * 64), np.uint16)
        pa[:M, :K] = a_bits
        wb = w.view(torch.int16).numpy().view(np.uint16)
        pb = np.zeros((nt * 128, kt_n * 64), np.uint16)
        pb[:N, :K] = wb
        for (i, kt), tile in trace["a"].items():
            assert np.array_equal(tile, pa[128 * i:128 * i + 128, 64 * kt:64 * kt + 64]), \
                f"{name}: A tile ({i}, {kt}) differs"
        for (j, kt), tile in trace["b"].items():
            assert np.array_equal(tile, pb[128 * j:128 * j + 128, 64 * kt:64 * kt + 64]), \
                f"{name}: W tile ({j}, {kt}) differs"
        assert len(trace["a"]) == mt * kt_n and len(trace["b"]) == nt * kt_n
        acc = np.zeros((mt * 128, nt * 128), np.float32)
        for (i, j), t in trace["acc"].items():
            acc[128 * i:128 * i + 128, 128 * j:128 * j + 128] = t
        af, wf = torch.from_numpy(f32_of(a_bits, dt)), w.float()
        ref_acc = (af @ wf.T).numpy()
        scale = (af.abs() @ wf.abs().T).numpy()
        bad = np.abs(acc[:M, :N] - ref_acc) > 2.0**-20 * scale + 1e-30
        assert not bad.any(), f"{name}: accumulators differ from fp32 A @ W^T ({bad.sum()})"
        # the epilogue of the fp32 matmul: the output rounds a value within tol of it
        tol = (2.0**-20 * scale + 1e-30).astype(np.float32)
        add = 0 if addend is None else addend
        lo, mid, hi = (f32_of(bits_of((ref_acc + d + add).astype(np.float32), dt), dt)
                       for d in (-tol, 0, tol))
        got = out.float().numpy()
        assert ((lo <= got) & (got <= hi)).all(), f"{name}: outputs off the fp32 matmul's"
        ndiff = int((got != mid).sum())
        assert ndiff <= max(3, got.size // 100), f"{name}: {ndiff} outputs off by rounding"
        check_lowprec(name, out, pt, ref64)
        print(f"ok {name} ({ndiff} rounding differences in {got.size})", flush=True)

    def bias_of(bias):
        return None if bias is None else bias.float().numpy()[None]

    # 1. Idefics3 / SmolVLM: (B, 1 + H W, C)[:, 1:] as (B, H, W, C) (padded batch stride, offset)
    # (N = 137: odd, single-element stores)
    for dt, r, c, bh, bw, N, bias_on in (
            (torch.bfloat16, 2, 24, 16, 14, 136, True), (torch.bfloat16, 2, 64, 16, 14, 136, True),
            (torch.bfloat16, 2, 72, 16, 14, 137, False), (torch.bfloat16, 3, 24, 24, 21, 136, True),
            (torch.bfloat16, 3, 64, 18, 15, 136, True), (torch.float16, 3, 72, 18, 15, 137, True)):
        name = f"idefics3 r={r} C={c} N={N} {str(dt)[6:]}" + ("" if bias_on else " no-bias")
        if not wanted(name):
            continue
        B, K = 3, r * r * c
        x = torch.randn(B, 1 + bh * bw, c).to(dt)[:, 1:].view(B, bh, bw, c)
        w = (torch.randn(N, K) * K**-0.5).to(dt)
        bias = torch.randn(N).to(dt) if bias_on else None
        p = grid_params(x, r, w, bias, dt)
        trace = {}
        cuda_shuffle_gemm(p, trace)
        xs = reference.pixel_shuffle(x, r).reshape(-1, K)
        M = xs.shape[0]
        assert M % 128 != 0
        ref64 = xs.double() @ w.double().T + (0 if bias is None else bias.double())
        pt = (xs.float() @ w.float().T + (0 if bias is None else bias.float())).to(dt)
        a_bits = xs.contiguous().view(torch.int16).numpy().view(np.uint16)
        check(name, p, trace, a_bits, w, bias_of(bias), ref64, pt)

    # 2. InternVL: shuffle (r = 2), LayerNorm(4C) (groups = 1), Linear
    for dt, c, gamma_on, beta_on in ((torch.bfloat16, 64, True, True),
                                     (torch.bfloat16, 72, True, False),
                                     (torch.float16, 72, True, True),
                                     (torch.bfloat16, 64, False, True)):
        name = (f"internvl C={c} {str(dt)[6:]}" + ("" if gamma_on else " no-gamma")
                + (" beta" if beta_on else " no-beta"))
        if not wanted(name):
            continue
        r, B, H, W, N, eps = 2, 2, 16, 18, 200, 1e-5
        K = r * r * c
        x = (torch.randn(B, 1 + H * W, c) * 1.5 + 0.3).to(dt)[:, 1:].view(B, H, W, c)
        w = (torch.randn(N, K) * K**-0.5).to(dt)
        bias = torch.randn(N).to(dt)
        gamma = (1 + 0.3 * torch.randn(K)).to(dt) if gamma_on else None
        beta = (0.2 * torch.randn(K)).to(dt) if beta_on else None
        mean, rstd, xn = stats(x, r, dt, eps, gamma=gamma, beta=beta, write=True)
        p = grid_params(x, r, w, bias, dt)
        p.norm_mean, p.norm_rstd, p.norm_weight, p.norm_bias = mean, rstd, dev(gamma), dev(beta)
        trace = {}
        cuda_shuffle_gemm(p, trace)
        xs = reference.pixel_shuffle(x, r).reshape(-1, K)
        g64, b64 = (None if t is None else t.double() for t in (gamma, beta))
        ref64 = (F.layer_norm(xs.double(), (K,), g64, b64, eps) @ w.double().T
                 + bias.double())
        ptn = F.layer_norm(xs, (K,), gamma, beta, eps)
        pt = (ptn.float() @ w.float().T + bias.float()).to(dt)
        check(name, p, trace, xn, w, bias_of(bias), ref64, pt)

    # 3. Qwen mergers at r = 1: 4 tokens (M * 4, C) merged into rows (M, 4C) = (1, M, 1, 4C)
    for kind, groups, c in (("layernorm", 4, 40), ("rmsnorm", 4, 72), ("layernorm", 1, 72)):
        name = f"qwen merger {kind} groups={groups} C={c}"
        if not wanted(name):
            continue
        dt, M, N, eps, K = torch.bfloat16, 150, 160, 1e-6, 4 * c
        G = K // groups
        tokens = (torch.randn(M * 4, c) * 2 + 0.5).to(dt)
        rows = tokens.reshape(1, M, 1, K)
        w = (torch.randn(N, K) * K**-0.5).to(dt)
        bias = torch.randn(N).to(dt)
        gamma = (1 + 0.3 * torch.randn(G)).to(dt)
        beta = (0.2 * torch.randn(G)).to(dt) if kind == "layernorm" else None
        stat_rows = rows.reshape(1, M * groups, 1, G)
        rms = kind == "rmsnorm"
        mean, rstd, xn = stats(stat_rows, 1, dt, eps, rms=rms, gamma=gamma, beta=beta,
                               write=not rms)
        p = grid_params(rows, 1, w, bias, dt)
        p.norm_mean, p.norm_rstd, p.norm_weight, p.norm_bias = mean, rstd, dev(gamma), dev(beta)
        p.norm_groups, p.norm_rms = groups, int(rms)
        trace = {}
        cuda_shuffle_gemm(p, trace)
        g64 = stat_rows.reshape(-1, G)
        if rms:  # Qwen2RMSNorm: T(gamma * T(x * rstd)), row-major
            xf = f32_of(g64.view(torch.int16).numpy().view(np.uint16), dt)
            rs = rstd.buf.data[:, None]
            a_rows = bits_of(round_t(xf * rs, dt) * f32_of(
                gamma.view(torch.int16).numpy().view(np.uint16), dt)[None], dt)
            nref = rms_norm(g64.double(), gamma.double(), eps)
            ptn = rms_norm(g64, gamma, eps)
        else:
            a_rows = xn
            nref = F.layer_norm(g64.double(), (G,), gamma.double(), beta.double(), eps)
            ptn = F.layer_norm(g64, (G,), gamma, beta, eps)
        a_bits = a_rows.reshape(M, K)
        ref64 = nref.reshape(M, K) @ w.double().T + bias.double()
        pt = (ptn.reshape(M, K).float() @ w.float().T + bias.float()).to(dt)
        check(name, p, trace, a_bits, w, bias_of(bias), ref64, pt)

    # 4. packed Qwen3-VL at r = 1: patch rows (M, K) as (1, M, 1, K), 4 bilinear taps per row
    for bias_on in (True, False):
        name = "qwen3 positions" + (" bias" if bias_on else " no-bias")
        if not wanted(name):
            continue
        dt, M, K, N, S = torch.bfloat16, 270, 200, 136, 6
        x = torch.randn(M, K).to(dt)
        w = (torch.randn(N, K) * K**-0.5).to(dt)
        bias = torch.randn(N).to(dt) if bias_on else None
        table = torch.randn(S * S, N).to(dt)
        idx = torch.randint(0, S * S, (4, M), dtype=torch.int64)
        wts = torch.rand(4, M, dtype=torch.float32)
        p = grid_params(x.view(1, M, 1, K), 1, w, bias, dt)
        p.table, p.tap_index, p.tap_weight = dev(table), dev(idx), dev(wts)
        trace = {}
        cuda_shuffle_gemm(p, trace)
        tf = table.float().numpy()
        wn = wts.numpy()
        pos = (tf[idx[0].numpy()] * wn[0][:, None]).astype(np.float32)
        for k in range(1, 4):
            pos = fma32(tf[idx[k].numpy()], wn[k][:, None], pos)
        add = round_t(pos, dt)
        if bias is not None:
            add = round_t(add + bias.float().numpy()[None], dt)
        pos64 = sum(table.double()[idx[k]] * wts[k].double()[:, None] for k in range(4))
        ref64 = x.double() @ w.double().T + pos64 + (0 if bias is None else bias.double())
        ptp = sum(table.float()[idx[k]] * wts[k][:, None] for k in range(4)).to(dt)
        pta = ptp if bias is None else (ptp.float() + bias.float()).to(dt)
        pt = (x.float() @ w.float().T + pta.float()).to(dt)
        check(name, p, trace, x.view(torch.int16).numpy().view(np.uint16), w, add, ref64, pt)

    # 5. the launcher's refusals
    if wanted("unsupported"):
        x = torch.randn(2, 4, 4, 16).to(torch.bfloat16)
        w = torch.randn(8, 64).to(torch.bfloat16)
        stat = Ptr(Buf(np.zeros(8, np.float32)))
        bad = {
            "C = 12": dict(x=to_device(torch.randn(2, 4, 4, 12).to(torch.bfloat16)), c=12),
            "r = 3": dict(r=3),
            "x 8 bytes in": dict(x=to_device(torch.randn(600).to(torch.bfloat16)) + 4),
            "odd stride": dict(stride_h=68),
            "table without taps": dict(table=to_device(w)),
            "RMSNorm with a mean": dict(norm_rstd=stat, norm_mean=stat, norm_rms=1),
            "LayerNorm without a mean": dict(norm_rstd=stat),
            "5 groups": dict(norm_rstd=stat, norm_mean=stat, norm_groups=5),
            "misaligned gamma": dict(norm_rstd=stat, norm_mean=stat,
                                     norm_weight=to_device(w) + 1),
        }
        for what, kw in bad.items():
            p = grid_params(x, 2, w, None, torch.bfloat16)
            for k_, v_ in kw.items():
                setattr(p, k_, v_)
            try:
                cuda_shuffle_gemm(p)
            except ValueError as err:
                print(f"ok unsupported: {what}: {err}", flush=True)
                continue
            raise AssertionError(f"unsupported: {what} was accepted")


if __name__ == "__main__":
    _main()

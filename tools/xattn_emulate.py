"""Dev aid, no GPU needed: a line-by-line numpy emulation of cross_attention_fwd_kernel
(csrc/cuda/kernels/cross_attention_fwd.cuh) with lane-level ldmatrix / mma.m16n8k16 fragment
semantics as the PTX ISA defines them, for every CTA shape (kWarps = 4: 64 rows, 2: 32 rows,
8: 128 rows; kWarps = 4 with kMT = 2 m16 tiles per warp: 128 rows). It
checks the kernel's smem address formulas, the threads' 16-byte chunks of a tile copy, fragment
reuse (S accumulators -> P A fragments), masking, segment passes and epilogue against
vlmkern.reference; keep it in step with the kernel when the kernel changes.

usage: PYTHONPATH=python:tests python tools/xattn_emulate.py [NAME...]   (a few small cases,
~2 min; NAMEs: run only the cases whose name contains one of them, e.g. "8 warps")
"""
import math
import sys

import numpy as np
import torch

BN = 64  # keys per K/V tile; the CTA's query rows are 16 * warps


def ldm(smem, rows, cols, trans):
    regs = np.zeros((32, 4, 2), np.float32)
    for i in range(4):
        mat = np.stack([smem[rows[8 * i + j], cols[8 * i + j]:cols[8 * i + j] + 8]
                        for j in range(8)])  # matrix i: row j from lane 8 i + j
        assert mat.shape == (8, 8)
        for L in range(32):
            g, t = L // 4, L % 4
            regs[L, i] = mat[g, 2 * t:2 * t + 2] if not trans else mat[2 * t:2 * t + 2, g]
    return regs


def mma(C, A, B0, B1):
    Am = np.zeros((16, 16), np.float64)
    Bm = np.zeros((16, 8), np.float64)
    for L in range(32):
        g, t = L // 4, L % 4
        Am[g, 2 * t:2 * t + 2] = A[L, 0]
        Am[g + 8, 2 * t:2 * t + 2] = A[L, 1]
        Am[g, 2 * t + 8:2 * t + 10] = A[L, 2]
        Am[g + 8, 2 * t + 8:2 * t + 10] = A[L, 3]
        Bm[2 * t:2 * t + 2, g] = B0[L]
        Bm[2 * t + 8:2 * t + 10, g] = B1[L]
    Cm = Am @ Bm
    for L in range(32):
        g, t = L // 4, L % 4
        C[L, 0:2] += Cm[g, 2 * t:2 * t + 2]
        C[L, 2:4] += Cm[g + 8, 2 * t:2 * t + 2]


def rnd(x, dt):
    return torch.tensor(np.asarray(x, np.float32)).to(dt).float().numpy()


def load_tile(src, d, DP, nrows, threads):
    """src (rows_n, d) rows of q / k / v -> (nrows, DP + 8) smem tile, zero-filled, copied as
    load_tile_async's `threads` threads do: chunk c = it * threads + tid, row c / chunks."""
    rows_n = src.shape[0]
    pitch = DP + 8
    chunks = DP // 8
    assert nrows * chunks % threads == 0
    sm = np.full((nrows, pitch), np.nan, np.float32)  # pad columns stay NaN: must never be read
    for it in range(nrows * chunks // threads):
        for tid in range(threads):
            c = it * threads + tid
            r, ch = c // chunks, c % chunks
            assert np.isnan(sm[r, ch * 8]), "a chunk copied twice"
            if r < rows_n and ch * 8 < d:
                sm[r, ch * 8:ch * 8 + 8] = src[r, ch * 8:ch * 8 + 8]
            else:
                sm[r, ch * 8:ch * 8 + 8] = 0
    assert not np.isnan(sm[:, :DP]).any(), "a chunk never copied"
    return sm


def span_bits(lo, hi, j0):
    a = min(max(lo - j0, 0), 64)
    b = min(max(hi - j0, 0), 64)
    if a >= b:
        return 0
    return ((1 << b) - 1) & ~((1 << a) - 1)


def clamp(lo, hi, lk):
    lo = min(max(lo, 0), lk)
    hi = lo if hi < lo else min(hi, lk)
    return lo, hi


# The segment of packed row `row` (binary search over cu, as find_segment in the kernels) and a
# segment's [begin, end) query and key rows (segment_span).
def find_segment(cu, n, row):
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(cu[mid]) <= row:
            lo = mid
        else:
            hi = mid - 1
    return lo


def seg_bounds(packed, cu_q, cu_k, seg, Sq, Sk):
    if not packed:
        return 0, Sq, 0, Sk
    qb, qe = clamp(int(cu_q[seg]), int(cu_q[seg + 1]), Sq)
    kb, ke = clamp(int(cu_k[seg]), int(cu_k[seg + 1]), Sk)
    return qb, qe, kb, ke


def row_vis(P, valid, b, row, i, lq, lk, seg):
    v = dict(lo=0, hi=0, off=None, use=False)
    if not valid:
        return v
    if P["ranges"] is not None:
        rr = P["ranges"][b, row]
        lo, hi = 1 << 62, 0
        for a, e in rr.tolist():
            a, e = clamp(a, e, lk)
            if a < e:
                lo, hi = min(lo, a), max(hi, e)
        if lo < hi:
            v.update(lo=lo, hi=hi, use=True, off=(b, row))
    elif P["prefix"] is not None:
        pre = min(max(int(P["prefix"][seg]), 0), lk)
        causal = min(i + 1 + lk - lq, lk)
        end = max(pre, causal)
        v["hi"] = max(end, 0)
    else:
        v["hi"] = lk
    if v["lo"] >= v["hi"] and P["uniform"]:
        v.update(lo=0, hi=lk)
    return v


def tile_bits(P, v, j0, lk):
    if not v["use"]:
        return span_bits(v["lo"], v["hi"], j0)
    bits = 0
    for a, e in P["ranges"][v["off"]].tolist():
        a, e = clamp(a, e, lk)
        bits |= span_bits(a, e, j0)
    return bits


def emulate(q, k, v, dt, ranges=None, cu_q=None, cu_k=None, prefix=None, scale=None,
            uniform=False, splits=1, warps=4, mtiles=1, images=1):
    """q (B, Sq, Hq, D), k, v (B, Sk, Hk, D) float tensors (values already in dt). splits > 1
    (not packed): split-KV, each run's partials (fp32) merged as cross_attention_combine_kernel
    does. warps: the kernel's kWarps (32 * warps threads); mtiles: its kMT (m16 tiles per warp:
    CTAs of 16 * mtiles * warps rows). Warp w's tile mt behaves as a 16-row warp w * mtiles + mt
    (its rows, Q fragments, state); with mtiles > 1 each row's tile bits come from the thread
    that owns the row (s_bits), as the kernel does. images: images_per_cta (dense, one window
    per image, no splits): a CTA runs that many batch rows as passes, reloading its Q tile for a
    later image only when q's batch stride is not 0."""
    BM, threads = 16 * warps * mtiles, 32 * warps
    vwarps = warps * mtiles  # 16-row (warp, m16 tile) units
    B, Sq, Hq, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    DP = (D + 15) // 16 * 16
    scale = D ** -0.5 if scale is None else scale
    sl2 = np.float32(scale * 1.4426950408889634)
    q_bcast = q.stride(0) == 0
    qn, kn, vn = (t.float().numpy() for t in (q, k, v))
    P = dict(ranges=None if ranges is None else ranges.long().numpy(), uniform=uniform,
             prefix=None if prefix is None else prefix.long().numpy())
    out = np.full((B, Sq, Hq, D), np.nan, np.float32)
    lse = np.full((B, Hq, Sq), np.nan, np.float32)
    packed = cu_q is not None
    assert splits == 1 or not packed
    o_part = np.full((splits, B, Sq, Hq, D), np.nan, np.float32)
    lse_part = np.full((splits, B, Hq, Sq), np.nan, np.float32)
    mt = (Sq + BM - 1) // BM
    assert images == 1 or (not packed and mt == 1 and splits == 1)
    windows = mt if packed else (B + images - 1) // images * mt
    N = len(cu_q) - 1 if packed else B
    for bx in range(windows):
        for h in range(Hq):
            hk = h // (Hq // Hk)
            if packed:
                b, w0 = 0, bx * BM
            else:
                b, w0 = bx // mt * images, (bx % mt) * BM
            wr = min(Sq - w0, BM)
            sq_ = load_tile(qn[b, w0:w0 + wr, h], D, DP, BM, threads)
            seg, seg_end = (find_segment(cu_q, N, w0), N) if packed else (b, min(b + images, B))
            while seg < seg_end:
                bi = b if packed else seg  # the pass's batch row
                if bi != b and not q_bcast:  # a later image's own queries
                    sq_ = load_tile(qn[bi, w0:w0 + wr, h], D, DP, BM, threads)
                qb, qe, kb_, ke = seg_bounds(packed, cu_q, cu_k, seg, Sq, Sk)
                if packed:
                    if qb >= w0 + BM or qb >= Sq:
                        break
                    if qe <= w0 or qb == qe:
                        seg += 1
                        continue
                lq, lk = qe - qb, ke - kb_
                # per warp, per lane state
                W = [dict() for _ in range(vwarps)]
                span_lo, span_hi = 1 << 62, 0
                for w in range(vwarps):
                    st = W[w]
                    st["row"] = np.zeros((32, 2), np.int64)
                    st["valid"] = np.zeros((32, 2), bool)
                    st["vis"] = [[None, None] for _ in range(32)]
                    for L in range(32):
                        g = L // 4
                        for r in range(2):
                            row = w0 + w * 16 + g + 8 * r
                            val = qb <= row < qe
                            st["row"][L, r], st["valid"][L, r] = row, val
                            vv = row_vis(P, val, bi, row, row - qb, lq, lk, seg)
                            st["vis"][L][r] = vv
                            if mtiles == 1 and vv["lo"] < vv["hi"]:
                                span_lo, span_hi = min(span_lo, vv["lo"]), max(span_hi, vv["hi"])
                own_vis = []  # mtiles > 1: thread tid's row w0 + tid (the kernel's vis[0])
                if mtiles > 1:
                    for tid in range(threads):
                        row = w0 + tid
                        vv = row_vis(P, qb <= row < qe, bi, row, row - qb, lq, lk, seg)
                        own_vis.append(vv)
                        if vv["lo"] < vv["hi"]:
                            span_lo, span_hi = min(span_lo, vv["lo"]), max(span_hi, vv["hi"])
                span_b = span_lo // BN if span_lo < span_hi else 0
                span_e = (span_hi + BN - 1) // BN if span_lo < span_hi else 0
                for z in range(splits):
                    kbb, kbe = span_b, span_e
                    if splits > 1:  # the kernel's run of tiles for blockIdx.z = z
                      run_ = (kbe - kbb + splits - 1) // splits
                      lo_r = kbb + z * run_
                      kbe = min(lo_r + run_, kbe)
                      kbb = min(lo_r, kbe)
                    for w in range(vwarps):
                      st = W[w]
                      st["o"] = np.zeros((32, DP // 8, 4), np.float32)
                      st["m"] = np.full((32, 2), -np.inf, np.float32)
                      st["l"] = np.zeros((32, 2), np.float32)
                    for kb in range(kbb, kbe):
                        j0 = kb * BN
                        n = min(lk - j0, BN)
                        sk = load_tile(kn[bi, kb_ + j0:kb_ + j0 + n, hk], D, DP, BN, threads)
                        sv = load_tile(vn[bi, kb_ + j0:kb_ + j0 + n, hk], D, DP, BN, threads)
                        s_bits = [tile_bits(P, vv, j0, lk) for vv in own_vis]
                        for w in range(vwarps):
                            st = W[w]
                            lanes = np.arange(32)
                            s = np.zeros((32, 8, 4), np.float32)
                            for kc in range(DP // 16):
                                qf = ldm(sq_, w * 16 + (lanes & 15), kc * 16 + (lanes >> 4) * 8,
                                         False)
                                for n2 in range(4):
                                    bk = ldm(sk, n2 * 16 + (lanes & 7) + ((lanes >> 4) << 3),
                                             kc * 16 + ((lanes >> 3) & 1) * 8, False)
                                    mma(s[:, 2 * n2], qf, bk[:, 0], bk[:, 1])
                                    mma(s[:, 2 * n2 + 1], qf, bk[:, 2], bk[:, 3])
                            assert not np.isnan(s).any()
                            if mtiles == 1:
                                bits = [[tile_bits(P, st["vis"][L][r], j0, lk) for r in range(2)]
                                        for L in range(32)]
                            else:  # s_bits[warp * kWarpRows + mt * 16 + g + 8 r]
                                bits = [[s_bits[w * 16 + L // 4 + 8 * r] for r in range(2)]
                                        for L in range(32)]
                            # softmax (quad = lanes 4g..4g+3)
                            for r in range(2):
                                x = np.full((32, 8, 2), -np.inf, np.float32)
                                for L in range(32):
                                    t = L % 4
                                    for nb in range(8):
                                        for e in range(2):
                                            col = nb * 8 + 2 * t + e
                                            if (bits[L][r] >> col) & 1:
                                                x[L, nb, e] = s[L, nb, 2 * r + e] * sl2
                                mx = x.reshape(32, -1).max(1)
                                mx = mx.reshape(8, 4).max(1).repeat(4)
                                m_new = np.maximum(st["m"][:, r], mx)
                                m_use = np.where(m_new == -np.inf, 0, m_new).astype(np.float32)
                                alpha = np.exp2(st["m"][:, r] - m_use)
                                p = np.exp2(x - m_use[:, None, None])
                                s[:, :, 2 * r:2 * r + 2] = p
                                st["l"][:, r] = st["l"][:, r] * alpha + p.reshape(32, -1).sum(1)
                                st["m"][:, r] = m_new
                                st["o"][:, :, 2 * r:2 * r + 2] *= alpha[:, None, None]
                            for kc in range(4):
                                a = np.stack([s[:, 2 * kc, 0:2], s[:, 2 * kc, 2:4],
                                              s[:, 2 * kc + 1, 0:2], s[:, 2 * kc + 1, 2:4]], 1)
                                a = rnd(a, dt)
                                for n2 in range(DP // 16):
                                    bv = ldm(sv, kc * 16 + (lanes & 7) + ((lanes >> 3) & 1) * 8,
                                             n2 * 16 + (lanes >> 4) * 8, True)
                                    mma(st["o"][:, 2 * n2], a, bv[:, 0], bv[:, 1])
                                    mma(st["o"][:, 2 * n2 + 1], a, bv[:, 2], bv[:, 3])
                    # epilogue
                    for w in range(vwarps):
                        st = W[w]
                        for r in range(2):
                            ssum = st["l"][:, r].reshape(8, 4).sum(1).repeat(4)
                            for L in range(32):
                                if not st["valid"][L, r]:
                                    continue
                                t = L % 4
                                inv = 1 / ssum[L] if ssum[L] > 0 else 0
                                row = st["row"][L, r]
                                row_lse = ((st["m"][L, r] + math.log2(ssum[L])) * math.log(2)
                                           if ssum[L] > 0 else -np.inf)
                                for nb in range(DP // 8):
                                    if nb * 8 < D:
                                        c0 = nb * 8 + 2 * t
                                        val_ = st["o"][L, nb, 2 * r:2 * r + 2] * inv
                                        if splits > 1:
                                            o_part[z, bi, row, h, c0:c0 + 2] = val_
                                        else:
                                            out[bi, row, h, c0:c0 + 2] = rnd(val_, dt)
                                if t == 0:
                                    if splits > 1:
                                        lse_part[z, bi, h, row] = row_lse
                                    else:
                                        lse[bi, h, row] = row_lse
                seg += 1
    if splits > 1:  # cross_attention_combine_kernel, per (b, row, head), rows < Sq only
        mx = lse_part.max(0)  # (B, Hq, Sq)
        with np.errstate(invalid="ignore"):
            w = np.where(np.isneginf(mx)[None], 0.0, np.exp(lse_part - mx[None]))
        wsum = w.sum(0)
        inv = np.where(wsum > 0, 1 / np.where(wsum > 0, wsum, 1), 0)
        # o_part (S, B, Sq, Hq, D), weights (S, B, Hq, Sq) -> (S, B, Sq, Hq, 1)
        acc = (w.transpose(0, 1, 3, 2)[..., None] * np.nan_to_num(o_part)).sum(0)
        out = rnd(acc * inv.transpose(0, 2, 1)[..., None], dt)
        lse = np.where(wsum > 0, mx + np.log(np.where(wsum > 0, wsum, 1)), -np.inf)
    return torch.tensor(out), torch.tensor(lse)


def _main() -> None:
    from xattn_testing import check, mllama_mask

    import vlmkern
    from vlmkern import reference

    dt = torch.bfloat16
    torch.manual_seed(0)

    def r(*s):
        return torch.randn(*s).to(dt)

    def wanted(name):
        return not sys.argv[1:] or any(a in name for a in sys.argv[1:])

    def run(name, q, k, v, kw, ekw, gqa_rows=False):
        """Emulates q, k, v (bshd) and checks it against the float64 reference; gqa_rows: a
        decode step (Sq = 1) run as xattn_decode_gqa_as_rows does (the G q heads of each kv
        head as G rows: q (B, G, Hk, D), ranges (B, G, R, 2)), mapped back."""
        if not wanted(name):
            return
        if gqa_rows:
            B, _, Hq, D = q.shape
            Hk = k.shape[2]
            qg = q[:, 0].unflatten(1, (Hk, Hq // Hk)).transpose(1, 2)  # (B, G, Hk, D)
            eg = dict(ekw)
            if eg.get("ranges") is not None:
                eg["ranges"] = eg["ranges"].expand(B, Hq // Hk, -1, 2)
            og, lg = emulate(qg, k, v, dt, **eg)  # (B, G, Hk, D), (B, Hk, G)
            out, lse = og.transpose(1, 2).reshape(B, 1, Hq, D), lg.reshape(B, Hq, 1)
        else:
            out, lse = emulate(q, k, v, dt, **ekw)
        ref, rlse = reference.cross_attention(q.double(), k.double(), v.double(), layout="bshd",
                                              return_lse=True, **kw)
        pt = reference.cross_attention(q, k, v, layout="bshd", compute_dtype=None, **kw)
        assert not out.isnan().any(), name
        check(out.to(dt), ref, pt)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse)), name
        fin = torch.isfinite(rlse)
        if fin.any():
            assert (lse[fin].double() - rlse[fin]).abs().max() < 1e-3, name
        print("ok", name, flush=True)

    def run_ranges(name, q, k, v, rg, splits, **ekw):
        """Mllama ranges in both masked-row modes, without and with split-KV `splits`."""
        for mr in ("zero", "uniform"):
            for n in (1, splits):
                run(f"{name} {mr}" + (f" splits={n}" if n > 1 else ""), q, k, v,
                    {"kv_ranges": rg, "masked_rows": mr},
                    dict(ekw, ranges=rg, uniform=mr == "uniform", splits=n))

    for d in (64, 72, 80, 96, 128):
        run(f"D={d}", r(1, 70, 2, d), r(1, 100, 1, d), r(1, 100, 1, d), {}, {})
    rg = vlmkern.ops.mllama_kv_ranges(mllama_mask(2, 130, 2, 2, seed=5), 20)
    q, k, v = r(2, 130, 4, 64), r(2, 80, 2, 64), r(2, 80, 2, 64)
    for mr in ("zero", "uniform"):
        run(f"ranges {mr}", q, k, v, {"kv_ranges": rg, "masked_rows": mr},
            {"ranges": rg, "uniform": mr == "uniform"})
    pl = torch.tensor([3, 0])
    q, k, v = r(2, 70, 1, 64), r(2, 130, 1, 64), r(2, 130, 1, 64)
    run("prefix-LM", q, k, v, {"mode": "prefix_lm", "prefix_len": pl}, {"prefix": pl})
    # split-KV: uneven runs (5 tiles in 3), empty runs (2 tiles in 4), dead rows in both modes
    run("D=64 splits=3", r(1, 70, 2, 64), r(1, 300, 1, 64), r(1, 300, 1, 64), {}, {"splits": 3})
    run("D=128 splits=2", r(2, 20, 4, 128), r(2, 200, 2, 128), r(2, 200, 2, 128), {},
        {"splits": 2})
    q, k, v = r(2, 130, 4, 64), r(2, 80, 2, 64), r(2, 80, 2, 64)
    for mr in ("zero", "uniform"):
        run(f"ranges {mr} splits=4", q, k, v, {"kv_ranges": rg, "masked_rows": mr},
            {"ranges": rg, "uniform": mr == "uniform", "splits": 4})
    q, k, v = r(2, 70, 1, 64), r(2, 130, 1, 64), r(2, 130, 1, 64)
    run("prefix-LM splits=2", q, k, v, {"mode": "prefix_lm", "prefix_len": pl},
        {"prefix": pl, "splits": 2})
    mid = torch.tensor([200, 460], dtype=torch.int32).repeat(1, 9, 1, 1)  # span = tiles 3..7
    q, k, v = r(1, 9, 2, 64), r(1, 500, 1, 64), r(1, 500, 1, 64)
    run("span mid-sequence splits=2", q, k, v, {"kv_ranges": mid}, {"ranges": mid, "splits": 2})

    # 32-row CTAs (kWarps = 2), the glue's pick for <= 32 rows per window. Q-Former-like: 32 (or
    # fewer) learned queries shared by the batch (batch stride 0), 257 keys (the last tile holds
    # one key), several heads.
    for sq in (1, 7, 32):
        qs = r(1, sq, 3, 64).expand(2, sq, 3, 64)
        run(f"2 warps Q-Former Sq={sq}", qs, r(2, 257, 3, 64), r(2, 257, 3, 64), {},
            {"warps": 2})
    for d in (72, 128):  # GQA heads, padded head dim, rows of both warps
        run(f"2 warps D={d} GQA", r(2, 20, 4, d), r(2, 100, 2, d), r(2, 100, 2, d), {},
            {"warps": 2})
    rg20 = vlmkern.ops.mllama_kv_ranges(mllama_mask(2, 20, 2, 2, seed=5), 20)
    q, k, v = r(2, 20, 4, 64), r(2, 80, 2, 64), r(2, 80, 2, 64)
    run_ranges("2 warps ranges", q, k, v, rg20, 4, warps=2)
    qs = r(1, 32, 2, 64).expand(3, 32, 2, 64)
    run("2 warps Q-Former splits=3", qs, r(3, 300, 2, 64), r(3, 300, 2, 64), {},
        {"splits": 3, "warps": 2})
    for sq in (7, 70):  # 70: forced (VLMKERN_XATTN_BLOCK_M=32), three windows per sequence
        q, k, v = r(2, sq, 1, 64), r(2, 130, 1, 64), r(2, 130, 1, 64)
        run(f"2 warps prefix-LM Sq={sq}", q, k, v, {"mode": "prefix_lm", "prefix_len": pl},
            {"prefix": pl, "warps": 2})
    # Several images per CTA (VLMKERN_XATTN_IMAGES_PER_CTA): B = 5 in CTAs of 2 and 3 images (a
    # short last CTA), broadcast Q-Former queries (Q tile loaded once) and per-image queries
    # (reloaded per pass); Mllama ranges in both masked-row modes (dead rows per image).
    for n in (2, 3):
        qs = r(1, 32, 2, 64).expand(5, 32, 2, 64)
        run(f"2 warps Q-Former images={n}", qs, r(5, 257, 2, 64), r(5, 257, 2, 64), {},
            {"warps": 2, "images": n})
    rg5 = vlmkern.ops.mllama_kv_ranges(mllama_mask(5, 20, 2, 2, seed=6), 20)
    q, k, v = r(5, 20, 4, 80), r(5, 80, 2, 80), r(5, 80, 2, 80)
    for mr in ("zero", "uniform"):
        run(f"2 warps ranges {mr} images=3", q, k, v, {"kv_ranges": rg5, "masked_rows": mr},
            {"ranges": rg5, "uniform": mr == "uniform", "warps": 2, "images": 3})
    run("4 warps Sq=50 images=4", r(5, 50, 2, 128), r(5, 70, 1, 128), r(5, 70, 1, 128), {},
        {"images": 4})

    # Decode GQA as rows: 8 q / 2 kv heads -> 4 rows; sequence 1 sees nothing.
    dr = torch.tensor([[[[10, 40], [150, 190]]], [[[0, 0], [0, 0]]], [[[5, 200], [0, 0]]]],
                      dtype=torch.int32)
    q, k, v = r(3, 1, 8, 128), r(3, 200, 2, 128), r(3, 200, 2, 128)
    run("2 warps decode GQA rows", q, k, v, {}, {"warps": 2}, gqa_rows=True)
    for mr in ("zero", "uniform"):
        run(f"2 warps decode GQA rows ranges {mr} splits=2", q, k, v,
            {"kv_ranges": dr, "masked_rows": mr},
            {"ranges": dr, "uniform": mr == "uniform", "splits": 2, "warps": 2}, gqa_rows=True)

    # 128-row CTAs (kWarps = 8, 256 threads; only forced, VLMKERN_XATTN_BLOCK_M=128; head-dim pads
    # 64 / 96 / 128). Sq 130: the last window holds 2 rows; GQA heads.
    run("8 warps D=64 GQA Sq=130", r(1, 130, 4, 64), r(1, 100, 2, 64), r(1, 100, 2, 64), {},
        {"warps": 8})
    run("8 warps D=96", r(1, 40, 1, 96), r(1, 70, 1, 96), r(1, 70, 1, 96), {}, {"warps": 8})
    run("8 warps D=128 GQA Sq=130", r(1, 130, 2, 128), r(1, 70, 1, 128), r(1, 70, 1, 128), {},
        {"warps": 8})
    # rg: 3 and 106 dead rows in the two sequences' first windows
    q, k, v = r(2, 130, 4, 64), r(2, 80, 2, 64), r(2, 80, 2, 64)
    run_ranges("8 warps ranges", q, k, v, rg, 3, warps=8)
    run("8 warps D=64 splits=3", r(1, 130, 2, 64), r(1, 300, 1, 64), r(1, 300, 1, 64), {},
        {"splits": 3, "warps": 8})
    pl130 = torch.tensor([3, 150])
    q, k, v = r(2, 130, 1, 64), r(2, 200, 1, 64), r(2, 200, 1, 64)
    run("8 warps prefix-LM Sq=130", q, k, v, {"mode": "prefix_lm", "prefix_len": pl130},
        {"prefix": pl130, "warps": 8})

    # 128-row CTAs of 4 warps x 32 rows (kMT = 2; only forced, VLMKERN_XATTN_WARP_ROWS=32; every
    # head-dim pad): each row's tile bits from the thread that owns the row.
    for d, sq in ((64, 130), (72, 40), (80, 130), (96, 40), (128, 130)):
        run(f"4x32 D={d} GQA Sq={sq}", r(1, sq, 4, d), r(1, 100, 2, d), r(1, 100, 2, d), {},
            {"mtiles": 2})
    q, k, v = r(2, 130, 4, 64), r(2, 80, 2, 64), r(2, 80, 2, 64)
    run_ranges("4x32 ranges", q, k, v, rg, 3, mtiles=2)
    run("4x32 D=128 splits=3", r(1, 130, 2, 128), r(1, 300, 1, 128), r(1, 300, 1, 128), {},
        {"splits": 3, "mtiles": 2})
    q, k, v = r(2, 130, 1, 64), r(2, 200, 1, 64), r(2, 200, 1, 64)
    run("4x32 prefix-LM Sq=130", q, k, v, {"mode": "prefix_lm", "prefix_len": pl130},
        {"prefix": pl130, "mtiles": 2})

    def packed(name, cq, ck, shapes):
        """Packed segments on each CTA shape; without splits a row's result does not depend on
        its CTA's other rows (tiles loaded only for them are fully masked for it): every shape
        gives the same bits (a GPU test too)."""
        if not wanted(name):
            return
        q, k, v = r(int(cq[-1]), 2, 64), r(int(ck[-1]), 1, 64), r(int(ck[-1]), 1, 64)
        ref = reference.cross_attention(q.double(), k.double(), v.double(), cu_seqlens_q=cq,
                                        cu_seqlens_k=ck)
        pt = reference.cross_attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck,
                                       compute_dtype=None)
        outs = []
        for shape in shapes:  # kWarps, or (kWarps, kMT)
            warps, mtiles = shape if isinstance(shape, tuple) else (shape, 1)
            outs.append(emulate(q[None], k[None], v[None], dt, cu_q=cq, cu_k=ck, warps=warps,
                                mtiles=mtiles))
            check(outs[-1][0][0].to(dt), ref, pt)
            print(f"ok {name} warps={warps} mtiles={mtiles}", flush=True)
        assert all(torch.equal(a[0], outs[0][0]) and torch.equal(a[1], outs[0][1])
                   for a in outs[1:])
        print(f"ok {name} shapes={shapes} bit-identical", flush=True)

    # 2: forced, segments crossing 32-row windows; an empty segment and one without keys
    packed("packed", torch.tensor([0, 3, 3, 70, 75, 100], dtype=torch.int32),
           torch.tensor([0, 10, 15, 15, 80, 90], dtype=torch.int32), (4, 2))
    # segments crossing the 128-row windows (rows 100..140, 200..262) and the 64-row ones
    packed("8 warps packed", torch.tensor([0, 3, 3, 100, 140, 200, 262], dtype=torch.int32),
           torch.tensor([0, 10, 15, 15, 80, 90, 150], dtype=torch.int32), (8, 4, (4, 2)))
    # fixed-length boundaries (vlmkern.ops.vision_grid): empty segments to the end, rows in the
    # last window's tail
    packed("padded tail packed", torch.tensor([0, 3, 3, 70, 75, 100] + [100] * 40,
                                              dtype=torch.int32),
           torch.tensor([0, 10, 15, 15, 80, 90] + [90] * 40, dtype=torch.int32), (4, (4, 2)))


if __name__ == "__main__":
    _main()

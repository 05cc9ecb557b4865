"""Dev aid, no GPU needed: a line-by-line numpy emulation of the CUDA cross-attention backward
(csrc/cuda/kernels/cross_attention_bwd.cuh: delta, dK / dV and dQ kernels) with the lane-level
ldmatrix / mma.m16n8k16 fragment semantics of tools/xattn_emulate.py. It checks the kernels'
smem address formulas, C -> A fragment reuse, visibility bits (smem per-row masks in dK / dV,
per-thread tile bits in dQ), q-tile skipping, segment passes and epilogues against the float64
reference's autograd gradients (the G3 rule for gradients: ≤ 3× plain PyTorch's bf16 error).
Smem pad columns are NaN and outputs start NaN (packed: 0, as the glue allocates them), so a
read of padding or an unwritten element shows up. Sequential: cp.async stages and barriers (the
dQ kernel's 2-stage K / V pipeline, the forward's) are not emulated. Keep it in step with the
kernels.

usage: PYTHONPATH=python:tests python tools/xattn_bwd_emulate.py [case ...]   (~minutes; cases:
dense_dims ranges prefix_lm packed qformer odd d128_modes fuzz, XBWD_FUZZ_SEED / _ITERS)
"""
import os
import sys

import numpy as np
import torch
from xattn_emulate import (
    BN,
    find_segment,
    ldm,
    load_tile,
    mma,
    rnd,
    row_vis,
    seg_bounds,
    tile_bits,
)

BM, THREADS = 64, 128  # the backward kernels' CTAs: kBlockM rows, kThreads (4 warps)

LOG2E = np.float32(1.4426950408889634)
LANES = np.arange(32)


def mma_abt(a_sm, a_row0, b_sm, DP, nb=8):
    """(32, nb, 4) C fragments of A (16 rows from a_row0, DP) · B (8 nb rows, DP)ᵀ."""
    acc = np.zeros((32, nb, 4), np.float32)
    for kc in range(DP // 16):
        af = ldm(a_sm, a_row0 + (LANES & 15), kc * 16 + (LANES >> 4) * 8, False)
        for n2 in range(nb // 2):
            bf = ldm(b_sm, n2 * 16 + (LANES & 7) + ((LANES >> 4) << 3),
                     kc * 16 + ((LANES >> 3) & 1) * 8, False)
            mma(acc[:, 2 * n2], af, bf[:, 0], bf[:, 1])
            mma(acc[:, 2 * n2 + 1], af, bf[:, 2], bf[:, 3])
    assert not np.isnan(acc).any()
    return acc


def mma_cb(acc, c, b_sm, DP, dt):
    """acc (32, DP / 8, 4) += C (16, 8 nb) (rounded to dt) · B (8 nb rows, DP), B transposed."""
    for kc in range(c.shape[1] // 2):
        a = np.stack([c[:, 2 * kc, 0:2], c[:, 2 * kc, 2:4], c[:, 2 * kc + 1, 0:2],
                      c[:, 2 * kc + 1, 2:4]], 1)
        a = rnd(a, dt)
        for n2 in range(DP // 16):
            bf = ldm(b_sm, kc * 16 + (LANES & 7) + ((LANES >> 3) & 1) * 8,
                     n2 * 16 + (LANES >> 4) * 8, True)
            mma(acc[:, 2 * n2], a, bf[:, 0], bf[:, 1])
            mma(acc[:, 2 * n2 + 1], a, bf[:, 2], bf[:, 3])


def store_row(dst, acc, L, r, mul, D, dt):
    t = L % 4
    for nb in range(acc.shape[1]):
        if nb * 8 < D:
            dst[nb * 8 + 2 * t:nb * 8 + 2 * t + 2] = rnd(acc[L, nb, 2 * r:2 * r + 2] * mul, dt)


def emulate_bwd(q, k, v, out, lse, dout, dt, dlse=None, ranges=None, cu_q=None, cu_k=None,
                prefix=None, scale=None, uniform=False):
    """q (B, Sq, Hq, D), k, v (B, Sk, Hk, D), out / dout (B, Sq, Hq, D) in dt, lse (B, Hq, Sq)
    fp32 -> dq, dk, dv as the three kernels compute them."""
    B, Sq, Hq, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    G = Hq // Hk
    DP = (D + 15) // 16 * 16
    scale = D ** -0.5 if scale is None else scale
    sl2 = np.float32(scale * 1.4426950408889634)
    qn, kn, vn, on, don = (t.float().numpy() for t in (q, k, v, out, dout))
    lsen = lse.float().numpy()
    P = dict(ranges=None if ranges is None else ranges.long().numpy(), uniform=uniform,
             prefix=None if prefix is None else prefix.long().numpy())
    packed = cu_q is not None
    N = len(cu_q) - 1 if packed else B

    # 1. delta
    delta = (on.astype(np.float32) * don).sum(-1, dtype=np.float32).transpose(0, 2, 1)
    if dlse is not None:
        delta = delta - dlse.float().numpy()
    delta = delta.astype(np.float32)  # (B, Hq, Sq)

    fill = 0.0 if packed else np.nan
    dq = np.full((B, Sq, Hq, D), fill, np.float32)
    dk = np.full((B, Sk, Hk, D), fill, np.float32)
    dv = np.full((B, Sk, Hk, D), fill, np.float32)

    # 2. dK / dV
    nt = (Sk + BN - 1) // BN
    for bx in range(nt if packed else B * nt):
        for hk in range(Hk):
            b, w0 = (0, bx * BN) if packed else (bx // nt, (bx % nt) * BN)
            wk = min(Sk - w0, BN)
            s_k = load_tile(kn[b, w0:w0 + wk, hk], D, DP, BN, THREADS)
            s_v = load_tile(vn[b, w0:w0 + wk, hk], D, DP, BN, THREADS)
            seg, seg_end = (find_segment(cu_k, N, w0), N) if packed else (b, b + 1)
            while seg < seg_end:
                qb, qe, kb, ke = seg_bounds(packed, cu_q, cu_k, seg, Sq, Sk)
                if packed:
                    if kb >= w0 + BN or kb >= Sk:
                        break
                    if ke <= w0 or kb == ke:
                        seg += 1
                        continue
                lq, lk = qe - qb, ke - kb
                j0 = w0 - kb
                acc_k = np.zeros((4, 32, DP // 8, 4), np.float32)
                acc_v = np.zeros((4, 32, DP // 8, 4), np.float32)
                for i0 in range(qb, qe, BM):
                    rows = min(qe - i0, BM)
                    s_bits = [0] * BM
                    for tid in range(BM):
                        valid = tid < rows
                        vis = row_vis(P, valid, b, i0 + tid, i0 + tid - qb, lq, lk, seg)
                        s_bits[tid] = tile_bits(P, vis, j0, lk) if valid else 0
                    if not any(s_bits):
                        continue
                    for hq in range(hk * G, (hk + 1) * G):
                        s_q = load_tile(qn[b, i0:i0 + rows, hq], D, DP, BM, THREADS)
                        s_do = load_tile(don[b, i0:i0 + rows, hq], D, DP, BM, THREADS)
                        s_lse = np.zeros(BM, np.float32)
                        s_delta = np.zeros(BM, np.float32)
                        s_lse[:rows] = lsen[b, hq, i0:i0 + rows] * LOG2E
                        s_delta[:rows] = delta[b, hq, i0:i0 + rows]
                        QC = 32 if DP >= 128 else 64  # kQCols
                        for w, part in ((w, part) for w in range(4) for part in range(BM // QC)):
                            sq = s_q[part * QC:(part + 1) * QC]
                            sdo = s_do[part * QC:(part + 1) * QC]
                            s = mma_abt(s_k, w * 16, sq, DP, QC // 8)
                            with np.errstate(over="ignore", invalid="ignore"):
                                for L in range(32):
                                    g, t = L // 4, L % 4
                                    for nb in range(QC // 8):
                                        for e in range(2):
                                            col = part * QC + nb * 8 + 2 * t + e
                                            for r in range(2):
                                                seen = (s_bits[col] >> (w * 16 + g + 8 * r)) & 1
                                                x = s[L, nb, 2 * r + e] * sl2 - s_lse[col]
                                                s[L, nb, 2 * r + e] = np.exp2(x) if seen else 0
                            mma_cb(acc_v[w], s, sdo, DP, dt)
                            dp = mma_abt(s_v, w * 16, sdo, DP, QC // 8)
                            for L in range(32):
                                t = L % 4
                                for nb in range(QC // 8):
                                    for e in range(2):
                                        dl = s_delta[part * QC + nb * 8 + 2 * t + e]
                                        for r in range(2):
                                            pv = s[L, nb, 2 * r + e]
                                            s[L, nb, 2 * r + e] = (pv * (dp[L, nb, 2 * r + e] - dl)
                                                                   if pv != 0 else 0)
                            mma_cb(acc_k[w], s, sq, DP, dt)
                for w in range(4):
                    for L in range(32):
                        g = L // 4
                        for r in range(2):
                            key = w0 + w * 16 + g + 8 * r
                            if key < kb or key >= ke:
                                continue
                            store_row(dk[b, key, hk], acc_k[w], L, r, scale, D, dt)
                            store_row(dv[b, key, hk], acc_v[w], L, r, 1.0, D, dt)
                seg += 1

    # 3. dQ
    mt = (Sq + BM - 1) // BM
    for bx in range(mt if packed else B * mt):
        for h in range(Hq):
            hk = h // G
            b, w0 = (0, bx * BM) if packed else (bx // mt, (bx % mt) * BM)
            wr = min(Sq - w0, BM)
            s_q = load_tile(qn[b, w0:w0 + wr, h], D, DP, BM, THREADS)
            s_do = load_tile(don[b, w0:w0 + wr, h], D, DP, BM, THREADS)
            seg, seg_end = (find_segment(cu_q, N, w0), N) if packed else (b, b + 1)
            while seg < seg_end:
                qb, qe, kb_, ke = seg_bounds(packed, cu_q, cu_k, seg, Sq, Sk)
                if packed:
                    if qb >= w0 + BM or qb >= Sq:
                        break
                    if qe <= w0 or qb == qe:
                        seg += 1
                        continue
                lq, lk = qe - qb, ke - kb_
                st = []
                span_lo, span_hi = 1 << 62, 0
                for w in range(4):
                    ws = dict(row=np.zeros((32, 2), np.int64), valid=np.zeros((32, 2), bool),
                              vis=[[None, None] for _ in range(32)],
                              lse2=np.zeros((32, 2), np.float32), dl=np.zeros((32, 2), np.float32))
                    for L in range(32):
                        g = L // 4
                        for r in range(2):
                            row = w0 + w * 16 + g + 8 * r
                            val = qb <= row < qe
                            vv = row_vis(P, val, b, row, row - qb, lq, lk, seg)
                            ws["row"][L, r], ws["valid"][L, r], ws["vis"][L][r] = row, val, vv
                            if val:
                                ws["lse2"][L, r] = lsen[b, h, row] * LOG2E
                                ws["dl"][L, r] = delta[b, h, row]
                            if vv["lo"] < vv["hi"]:
                                span_lo, span_hi = min(span_lo, vv["lo"]), max(span_hi, vv["hi"])
                    ws["dq"] = np.zeros((32, DP // 8, 4), np.float32)
                    st.append(ws)
                kbb = span_lo // BN if span_lo < span_hi else 0
                kbe = (span_hi + BN - 1) // BN if span_lo < span_hi else 0
                for kbi in range(kbb, kbe):
                    j0 = kbi * BN
                    n = min(lk - j0, BN)
                    s_k = load_tile(kn[b, kb_ + j0:kb_ + j0 + n, hk], D, DP, BN, THREADS)
                    s_v = load_tile(vn[b, kb_ + j0:kb_ + j0 + n, hk], D, DP, BN, THREADS)
                    for w in range(4):
                        ws = st[w]
                        s = mma_abt(s_q, w * 16, s_k, DP)
                        dp = mma_abt(s_do, w * 16, s_v, DP)
                        with np.errstate(over="ignore", invalid="ignore"):
                            for L in range(32):
                                t = L % 4
                                bits = [tile_bits(P, ws["vis"][L][r], j0, lk) for r in range(2)]
                                for nb in range(8):
                                    for r in range(2):
                                        for e in range(2):
                                            seen = (bits[r] >> (nb * 8 + 2 * t + e)) & 1
                                            pv = (np.exp2(s[L, nb, 2 * r + e] * sl2
                                                          - ws["lse2"][L, r]) if seen else 0)
                                            s[L, nb, 2 * r + e] = (
                                                pv * (dp[L, nb, 2 * r + e] - ws["dl"][L, r])
                                                if seen else 0)
                        mma_cb(ws["dq"], s, s_k, DP, dt)
                for w in range(4):
                    ws = st[w]
                    for L in range(32):
                        for r in range(2):
                            if ws["valid"][L, r]:
                                store_row(dq[b, ws["row"][L, r], h], ws["dq"], L, r, scale, D, dt)
                seg += 1
    return tuple(torch.tensor(x).to(dt) for x in (dq, dk, dv))


def _grads(mod, q, k, v, g, glse, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = mod.cross_attention(q, k, v, return_lse=True, **kw)
    loss = (out * g).sum() + (0 if glse is None else (torch.where(torch.isfinite(lse), lse, 0)
                                                      * glse).sum())
    return out, lse, torch.autograd.grad(loss, (q, k, v), allow_unused=True,
                                         materialize_grads=True)


def run_case(name, q, k, v, dt, kw, ekw, with_dlse=False, packed=False):
    """q, k, v (B, Sq, H, D) in dt (packed: B = 1, kw gets the 3-d views)."""
    from xattn_testing import check

    from vlmkern import reference

    sq = (lambda t: t[0]) if packed else (lambda t: t)
    lay = {} if packed else {"layout": "bshd"}
    g = torch.randn(q.shape).to(dt)
    ref_out, ref_lse = reference.cross_attention(*(sq(t).double() for t in (q, k, v)),
                                                 return_lse=True, **lay, **kw)
    ref_lse = ref_lse if not packed else ref_lse[None]
    glse = torch.randn(ref_lse.shape).float() if with_dlse else None
    glse_in = None if glse is None else (glse[0] if packed else glse)
    _, _, rgrads = _grads(reference, *(sq(t).double() for t in (q, k, v)), sq(g).double(),
                          None if glse_in is None else glse_in.double(), **lay, **kw)
    _, _, pgrads = _grads(reference, *(sq(t) for t in (q, k, v)), sq(g),
                          None if glse_in is None else glse_in.float(), compute_dtype=None,
                          **lay, **kw)
    out = (ref_out if not packed else ref_out[None]).to(dt)
    lse = ref_lse.float()
    dlse = None
    if glse is not None:  # the op sees grad_lse only where lse is finite (0 elsewhere)
        dlse = torch.where(torch.isfinite(lse), glse, 0.0)
    grads = emulate_bwd(q, k, v, out, lse, g, dt, dlse=dlse, **ekw)
    errs = []
    for name_, a, r, p in zip("qkv", grads, rgrads, pgrads, strict=True):
        a = sq(a)
        assert not a.isnan().any(), (name, name_)
        top = r.abs().max().item()
        assert top > 0 or r.numel() == 0 or name_ != "v", (name, "trivial reference")
        check(a, r, p, factor=3.0)
        errs.append((a.double() - r).abs().max().item() if a.numel() else 0.0)
    print(f"ok {name}: max|err| dq {errs[0]:.3g} dk {errs[1]:.3g} dv {errs[2]:.3g}", flush=True)
    return errs


def _main(selected) -> None:
    from xattn_testing import mllama_mask

    import vlmkern

    torch.manual_seed(0)
    cases = {}

    def case(fn):
        cases[fn.__name__] = fn
        return fn

    def r(dt, *s):
        return torch.randn(*s).to(dt)

    @case
    def dense_dims():
        for d in (64, 72, 80, 96, 128):
            dt = torch.bfloat16 if d != 80 else torch.float16
            run_case(f"dense D={d} {dt}", r(dt, 1, 70, 2, d), r(dt, 1, 100, 1, d),
                     r(dt, 1, 100, 1, d), dt, {}, {})

    @case
    def ranges():
        dt = torch.bfloat16
        rg = vlmkern.ops.mllama_kv_ranges(mllama_mask(2, 130, 2, 2, seed=5), 20)
        q, k, v = r(dt, 2, 130, 4, 64), r(dt, 2, 80, 2, 64), r(dt, 2, 80, 2, 64)
        for mr in ("zero", "uniform"):
            run_case(f"ranges GQA {mr}", q, k, v, dt, {"kv_ranges": rg, "masked_rows": mr},
                     {"ranges": rg, "uniform": mr == "uniform"}, with_dlse=mr == "uniform")

    @case
    def prefix_lm():
        dt = torch.bfloat16
        pl = torch.tensor([3, 0])
        q, k, v = r(dt, 2, 70, 1, 72), r(dt, 2, 130, 1, 72), r(dt, 2, 130, 1, 72)
        for mr in ("zero", "uniform"):
            run_case(f"prefix-LM Sq<Sk {mr}", q, k, v, dt,
                     {"mode": "prefix_lm", "prefix_len": pl, "masked_rows": mr},
                     {"prefix": pl, "uniform": mr == "uniform"})
        q, k, v = r(dt, 1, 90, 2, 64), r(dt, 1, 90, 2, 64), r(dt, 1, 90, 2, 64)
        pl = torch.tensor([5])
        run_case("prefix-LM square", q, k, v, dt, {"mode": "prefix_lm", "prefix_len": pl},
                 {"prefix": pl}, with_dlse=True)

    @case
    def packed():
        dt = torch.bfloat16
        cq = torch.tensor([0, 3, 3, 70, 75, 100], dtype=torch.int32)
        ck = torch.tensor([0, 10, 15, 15, 80, 90], dtype=torch.int32)
        q, k, v = r(dt, 1, 100, 2, 64), r(dt, 1, 90, 1, 64), r(dt, 1, 90, 1, 64)
        for mr in ("zero", "uniform"):
            run_case(f"packed {mr}", q, k, v, dt,
                     {"cu_seqlens_q": cq, "cu_seqlens_k": ck, "masked_rows": mr},
                     {"cu_q": cq, "cu_k": ck, "uniform": mr == "uniform"}, packed=True,
                     with_dlse=mr == "zero")
        lens = (ck[1:] - ck[:-1]).repeat_interleave(cq[1:] - cq[:-1])
        lo = (torch.rand(100) * lens).long()
        rg = torch.stack([lo, lens], -1).unsqueeze(1).int()  # (total_q, 1, 2)
        run_case("packed ranges", q, k, v, dt,
                 {"cu_seqlens_q": cq, "cu_seqlens_k": ck, "kv_ranges": rg},
                 {"cu_q": cq, "cu_k": ck, "ranges": rg[None]}, packed=True)
        # fixed-length boundaries (vlmkern.ops.vision_grid): empty segments to the end
        tail_q, tail_k = (torch.cat([c, c[-1:].repeat(40)]) for c in (cq, ck))
        run_case("packed padded tail", q, k, v, dt,
                 {"cu_seqlens_q": tail_q, "cu_seqlens_k": tail_k},
                 {"cu_q": tail_q, "cu_k": tail_k}, packed=True)
        pl = torch.tensor([4, 0, 0, 2, 100])
        run_case("packed prefix-LM", q, k, v, dt,
                 {"cu_seqlens_q": cq, "cu_seqlens_k": ck, "mode": "prefix_lm",
                  "prefix_len": pl}, {"cu_q": cq, "cu_k": ck, "prefix": pl}, packed=True)

    @case
    def qformer():
        dt = torch.bfloat16
        base = r(dt, 1, 32, 2, 64)
        q = base.expand(3, -1, -1, -1)
        k, v = r(dt, 3, 70, 2, 64), r(dt, 3, 70, 2, 64)
        run_case("Q-Former shared q (per-batch dq)", q, k, v, dt, {}, {})

    @case
    def odd():
        dt = torch.float16
        run_case("odd Sq=1 Sk=3", r(dt, 1, 1, 1, 96), r(dt, 1, 3, 1, 96), r(dt, 1, 3, 1, 96),
                 dt, {}, {})
        run_case("odd Sq=65 Sk=129 MQA D=128", r(dt, 1, 65, 4, 128), r(dt, 1, 129, 1, 128),
                 r(dt, 1, 129, 1, 128), dt, {}, {}, with_dlse=True)

    @case
    def d128_modes():  # the dK / dV kernel's two 32-row halves (kQCols) under masks
        dt = torch.bfloat16
        rg = vlmkern.ops.mllama_kv_ranges(mllama_mask(1, 100, 2, 2, seed=7), 20)
        q, k, v = r(dt, 1, 100, 2, 128), r(dt, 1, 80, 1, 128), r(dt, 1, 80, 1, 128)
        for mr in ("zero", "uniform"):
            run_case(f"D=128 ranges GQA {mr}", q, k, v, dt, {"kv_ranges": rg, "masked_rows": mr},
                     {"ranges": rg, "uniform": mr == "uniform"}, with_dlse=True)
        cq = torch.tensor([0, 3, 3, 70, 75, 100], dtype=torch.int32)
        ck = torch.tensor([0, 10, 15, 15, 80, 90], dtype=torch.int32)
        q, k, v = r(dt, 1, 100, 1, 128), r(dt, 1, 90, 1, 128), r(dt, 1, 90, 1, 128)
        pl = torch.tensor([4, 0, 0, 2, 100])
        run_case("D=128 packed prefix-LM", q, k, v, dt,
                 {"cu_seqlens_q": cq, "cu_seqlens_k": ck, "mode": "prefix_lm",
                  "prefix_len": pl}, {"cu_q": cq, "cu_k": ck, "prefix": pl}, packed=True)

    @case
    def fuzz():  # random small shapes, GQA groups, head dims and visibility modes
        g = torch.Generator().manual_seed(int(os.environ.get("XBWD_FUZZ_SEED", "1")))

        def ri(lo, hi):
            return int(torch.randint(lo, hi + 1, (1,), generator=g))

        for it in range(int(os.environ.get("XBWD_FUZZ_ITERS", "6"))):
            dt = (torch.bfloat16, torch.float16)[it % 2]
            d = (64, 72, 80, 96, 128)[ri(0, 4)]
            hk, grp = ri(1, 2), ri(1, 3)
            B, Sq, Sk = ri(1, 2), ri(1, 100), ri(2, 140)
            mode = ("full", "ranges", "prefix", "packed")[it % 4]
            mr = ("zero", "uniform")[ri(0, 1)]
            kw, ekw = {"masked_rows": mr}, {"uniform": mr == "uniform"}
            packed = mode == "packed"
            if packed:
                B = 1
                n = ri(1, 4)
                cq = torch.cat([torch.zeros(1), torch.randint(0, 40, (n,), generator=g).cumsum(0)])
                ck = torch.cat([torch.zeros(1), torch.randint(0, 60, (n,), generator=g).cumsum(0)])
                cq, ck = cq.int(), ck.int()
                Sq, Sk = int(cq[-1]), int(ck[-1])
                if Sq == 0 or Sk == 0:
                    continue
                kw.update(cu_seqlens_q=cq, cu_seqlens_k=ck)
                ekw.update(cu_q=cq, cu_k=ck)
            elif mode == "ranges":
                lo = torch.randint(0, Sk, (B, Sq, 2, 1), generator=g)
                ln = torch.randint(0, Sk // 2 + 1, (B, Sq, 2, 1), generator=g)
                rg = torch.cat([lo, (lo + ln).clamp(max=Sk)], -1).int()
                kw["kv_ranges"], ekw["ranges"] = rg, rg
            elif mode == "prefix":
                pl = torch.randint(0, Sk + 1, (B,), generator=g)
                kw.update(mode="prefix_lm", prefix_len=pl)
                ekw["prefix"] = pl
            q = r(dt, B, Sq, hk * grp, d)
            k, v = r(dt, B, Sk, hk, d), r(dt, B, Sk, hk, d)
            run_case(f"fuzz {mode} {mr} B={B} Sq={Sq} Sk={Sk} H={hk * grp}/{hk} D={d} {dt}",
                     q, k, v, dt, kw, ekw, with_dlse=it % 3 == 0, packed=packed)

    names = selected or list(cases)
    for n in names:
        cases[n]()


if __name__ == "__main__":
    _main(sys.argv[1:])

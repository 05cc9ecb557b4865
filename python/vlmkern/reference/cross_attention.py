"""Plain-PyTorch cross-attention (dense scores, boolean visibility), float64 by default: the
ground truth for vlmkern.ops.cross_attention and mllama_kv_ranges, plus HF's dense Mllama mask."""

from __future__ import annotations

import math

import torch


def mllama_kv_ranges(cross_attention_mask: torch.Tensor,
                     num_vision_tokens: int = 1601) -> torch.Tensor:
    """(B, S, M, T) tile mask -> int32 (B, S, ceil(M·T/2), 2) merged [start, end) key ranges."""
    b, s, m, t = cross_attention_mask.shape
    tiles, r = m * t, (m * t + 1) // 2
    vis = (cross_attention_mask == 1).reshape(b, s, tiles)
    pad = torch.zeros(b, s, 1, dtype=torch.bool, device=vis.device)
    prev, nxt = torch.cat([pad, vis[..., :-1]], -1), torch.cat([vis[..., 1:], pad], -1)
    idx = torch.arange(tiles, device=vis.device).expand(b, s, tiles)
    big = torch.full_like(idx, tiles)
    starts = torch.where(vis & ~prev, idx, big).sort(-1).values[..., :r]
    ends = torch.where(vis & ~nxt, idx + 1, big).sort(-1).values[..., :r]
    used = starts < tiles
    out = torch.stack([starts, ends], -1) * num_vision_tokens
    return torch.where(used[..., None], out, 0).to(torch.int32)


def mllama_dense_mask(cross_attention_mask: torch.Tensor, num_vision_tokens: int,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``_prepare_cross_attention_mask``: additive (B, 1, S, M·T·n) mask (rows that see
    nothing all 0) and the (B, 1, S, 1) row mask."""
    b, s = cross_attention_mask.shape[:2]
    mask = cross_attention_mask.repeat_interleave(num_vision_tokens, dim=3).view(b, s, -1)
    inverted = (1.0 - mask.unsqueeze(1)).to(dtype)
    add = inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)
    row = (add != torch.finfo(dtype).min).any(dim=-1).type_as(add)[..., None]
    return add * row, row


def visibility(sq: int, sk: int, ranges: torch.Tensor | None = None,
               prefix_len: int | None = None) -> torch.Tensor:
    """Bool (Sq, Sk) visibility of one sequence: ranges (Sq, R, 2), prefix-LM, or everything."""
    j = torch.arange(sk)
    if ranges is not None:
        r = ranges.long().cpu()
        lo, hi = r[..., 0:1], r[..., 1:2]  # (Sq, R, 1)
        return ((j >= lo) & (j < hi)).any(1) if r.shape[1] else torch.zeros(sq, sk, dtype=bool)
    if prefix_len is not None:
        i = torch.arange(sq)[:, None]
        return (j < prefix_len) | (j <= i + (sk - sq))
    return torch.ones(sq, sk, dtype=torch.bool)


def _attend(q, k, v, vis, scale, masked_rows, compute_dtype):
    """q (Hq, Sq, D), k / v (Hk, Sk, D), vis (Sq, Sk) -> (out (Hq, Sq, D), lse (Hq, Sq))."""
    g = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    vis = vis.to(q.device)
    empty = ~vis.any(-1)
    if masked_rows == "uniform":
        vis = vis | empty[:, None]
    if compute_dtype is None:  # HF eager: scores / P·V in the input dtype, softmax in fp32
        s = (q @ k.transpose(-1, -2)) * scale
        s = s.masked_fill(~vis, torch.finfo(s.dtype).min)
        p = torch.softmax(s, -1, dtype=torch.float32).to(q.dtype)
        out = p @ v
        lse = torch.logsumexp(s.float(), -1)
    else:
        q, k, v = (t.to(compute_dtype) for t in (q, k, v))
        s = (q @ k.transpose(-1, -2)) * scale
        s = s.masked_fill(~vis, -math.inf)
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
        out = p @ v
    dead = ~vis.any(-1)  # rows that see nothing (also "uniform" ones when Sk = 0)
    out = out.masked_fill(dead[:, None], 0.0)
    lse = lse.masked_fill(dead, -math.inf)
    return out, lse


def cross_attention(q, k, v, *, scale=None, kv_ranges=None, cu_seqlens_q=None, cu_seqlens_k=None,
                    masked_rows="zero", mode="full", prefix_len=None, layout="bhsd",
                    return_lse=False, compute_dtype=torch.float64):
    """Same arguments and layouts as ``vlmkern.ops.cross_attention``; computes in compute_dtype
    (None: HF's eager precision) and returns in that dtype (the inputs' dtype for None)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    packed = cu_seqlens_q is not None
    if packed:  # -> per-sequence (1, S, H, D) pieces
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        segs = [(q[cq[n]:cq[n + 1]].unsqueeze(0), k[ck[n]:ck[n + 1]].unsqueeze(0),
                 v[ck[n]:ck[n + 1]].unsqueeze(0), n, (0, cq[n], cq[n + 1]))
                for n in range(len(cq) - 1)]
        ranges = kv_ranges.unsqueeze(0) if kv_ranges is not None and kv_ranges.dim() == 3 \
            else kv_ranges
    else:
        if layout == "bhsd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        segs = [(q[b:b + 1], k[b:b + 1], v[b:b + 1], b, (b, 0, q.shape[1]))
                for b in range(q.shape[0])]
        ranges = kv_ranges
    outs, lses = [], []
    for qs, ks, vs, n, (b, r0, r1) in segs:
        rr = ranges[b, r0:r1] if ranges is not None else None
        pl = int(prefix_len[n]) if mode == "prefix_lm" else None
        vis = visibility(qs.shape[1], ks.shape[1], rr, pl)
        o, lse = _attend(qs[0].transpose(0, 1), ks[0].transpose(0, 1), vs[0].transpose(0, 1),
                         vis, scale, masked_rows, compute_dtype)
        outs.append(o.transpose(0, 1))  # (S, Hq, D)
        lses.append(lse)  # (Hq, S)
    if packed:
        dt = q.dtype if compute_dtype is None else compute_dtype
        out = torch.cat(outs, 0) if outs else q.new_empty(q.shape, dtype=dt)
        lse = torch.cat(lses, 1) if lses else q.new_empty((q.shape[1], 0))
    elif outs:
        out = torch.stack(outs, 0)  # (B, S, Hq, D)
        lse = torch.stack(lses, 0)
        if layout == "bhsd":
            out = out.transpose(1, 2)
    else:  # empty batch
        dt = q.dtype if compute_dtype is None else compute_dtype
        out = q.new_zeros(q.shape, dtype=dt)
        lse = q.new_zeros((0, q.shape[2], q.shape[1]), dtype=torch.float32)
        if layout == "bhsd":
            out = out.transpose(1, 2)
    return (out, lse) if return_lse else out

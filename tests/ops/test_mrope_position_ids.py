"""mrope_position_ids: bit-equality with HF's get_rope_index (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), both
text-after-video rules, every input form, fuzzing against the reference, and the CUDA-only checks
(auto-skipped without a GPU). opcheck, compile and bad inputs: test_mrope_position_ids_checks.py."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mrope_testing import (
    MODELS,
    build_batch,
    hf_call,
    hf_get_rope_index,
    matching_seconds,
    random_rows,
)
from testing_utils import assert_bit_equal, deterministic_mode, no_host_sync

import vlmkern
from vlmkern import reference

op = vlmkern.ops.mrope_position_ids
raw = torch.ops.vlmkern.mrope_position_ids

IMG, VID = "image", "video"
CASES = {  # id: (rows, pad, holes)
    "one-image": ([[3, (IMG, 1, 4, 6), 5]], "left", 0),
    "image-first-last": ([[(IMG, 1, 2, 2), 2, (IMG, 1, 6, 4)]], None, 0),
    "multi-image-sizes": ([[2, (IMG, 1, 8, 4), 3, (IMG, 1, 2, 10), 1, (IMG, 1, 6, 6), 4]], None, 0),
    "left-padded": ([[5, (IMG, 1, 4, 4), 2], [1], [2, (IMG, 1, 2, 6), 1, (IMG, 1, 4, 2), 7]],
                    "left", 0),
    "right-padded": ([[5, (IMG, 1, 4, 4), 2], [9, (IMG, 1, 2, 2), 1]], "right", 0),
    "mask-holes": ([[4, (IMG, 1, 6, 4), 3, (VID, 2, 4, 4), 2], [3, (IMG, 1, 2, 2), 3]], "left", 6),
    "text-only-rows": ([[7], [2, (IMG, 1, 4, 8), 2], [11]], "left", 0),
    "videos": ([[2, (VID, 6, 4, 4), 3, (VID, 2, 8, 6), 1], [4, (VID, 3, 2, 2), 2]], "left", 0),
    "images-and-videos": ([[1, (IMG, 1, 4, 6), 2, (VID, 4, 2, 4), 3, (IMG, 1, 2, 2), 1],
                           [3, (VID, 9, 2, 2), 2, (IMG, 1, 6, 2), 5]], "left", 0),
}  # fmt: skip


def _batch16x8():
    rng = random.Random(1)
    rows = []
    for _ in range(16):
        segs = [rng.randint(2, 20)]
        for _ in range(8):
            h, w = 2 * rng.randint(2, 12), 2 * rng.randint(2, 12)
            segs += [(IMG, 1, h, w), rng.randint(1, 12)]
        rows.append(segs)
    return rows


CASES["batch16x8-images"] = (_batch16x8(), "left", 0)

# Qwen2.5-VL second_per_grid_ts forms: None (= 1), float32 fractions, float64, Python list.
def _cycle(values, n):
    return [values[i % len(values)] for i in range(n)]


SECONDS = {
    "none": None,
    "f32": lambda n: torch.tensor(_cycle([0.5, 2 / 3, 1.0, 0.7, 1.25], n), dtype=torch.float32),
    "f64": lambda n: torch.tensor(_cycle([1 / 3, 0.9, 1.5, 0.1], n), dtype=torch.float64),
    "list": lambda n: _cycle([0.5, 2 / 3, 1.3, 1.0], n),
}


def _seconds(form, batch):
    make = SECONDS[form]
    nv = 0 if batch.video_grid_thw is None else batch.video_grid_thw.shape[0]
    return None if make is None else make(nv)


def _assert_same(got, expected):
    assert_bit_equal(got[0], expected[0])
    assert_bit_equal(got[1], expected[1])
    assert got[0].dtype == torch.int64 and got[1].shape == expected[1].shape


@pytest.mark.parametrize("form", ["types", "input_ids"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("model", MODELS)
def test_matches_hf(model, case, form, device):
    pytest.importorskip("transformers")
    rows, pad, holes = CASES[case]
    batch = build_batch(rows, model=model, pad=pad, holes=holes, seed=len(case))
    hf = hf_get_rope_index(model)
    forms = ["none", "f32", "f64", "list"] if model == "qwen2_5_vl" else ["none"]
    for sform in forms:
        seconds = _seconds(sform, batch)
        expected = hf_call(hf, batch, model, seconds)
        assert expected[0].abs().sum() > 0
        seconds = matching_seconds(model, seconds)
        kw = {"second_per_grid_ts": seconds} if seconds is not None else {}
        if isinstance(seconds, torch.Tensor):
            kw["second_per_grid_ts"] = seconds.to(device)
        got = op(**batch.to(device).kwargs(form), model=model, **kw)
        assert got[0].device.type == device
        _assert_same(got, expected)
        _assert_same(reference.mrope_position_ids(**batch.kwargs(form), model=model, **kw),
                     expected)


@pytest.mark.parametrize("model", MODELS)
def test_matches_hf_int32_types_bool_mask(model, device):
    pytest.importorskip("transformers")
    batch = build_batch(CASES["mask-holes"][0], model=model, holes=4)
    expected = hf_call(hf_get_rope_index(model), batch, model)
    batch.mm_token_type_ids = batch.mm_token_type_ids.int()
    batch.attention_mask = batch.attention_mask.bool()
    _assert_same(op(**batch.to(device).kwargs(), model=model), expected)


@pytest.mark.parametrize("merge", [1, 3])
def test_matches_hf_other_merge_sizes(merge, device):
    pytest.importorskip("transformers")
    rows = [[2, (IMG, 1, 3 * merge, 2 * merge), 3, (VID, 3, merge, 4 * merge), 1], [5]]
    batch = build_batch(rows, model="qwen2_5_vl", merge=merge)
    seconds = torch.tensor([0.75])
    expected = hf_call(hf_get_rope_index("qwen2_5_vl", merge, 3), batch, "qwen2_5_vl", seconds)
    seconds = matching_seconds("qwen2_5_vl", seconds)
    got = op(**batch.to(device).kwargs(), model="qwen2_5_vl", spatial_merge_size=merge,
             second_per_grid_ts=seconds.to(device), tokens_per_second=3)
    _assert_same(got, expected)


def test_text_after_video_rules(device):
    """Video (t=6, 2x2 merged) after 2 text tokens starts at 2: frames at t = 2..7 (Qwen2-VL).
    "hf": text continues at 2 + max(2, 2) = 4; "max_plus_one": at max position 7 + 1 = 8."""
    tt = torch.tensor([[0, 0] + [2] * 24 + [0, 0]], device=device)
    video = torch.tensor([[6, 4, 4]], device=device)
    hf_pos, hf_delta = op(mm_token_type_ids=tt, video_grid_thw=video)
    mp_pos, mp_delta = op(mm_token_type_ids=tt, video_grid_thw=video,
                          text_after_video="max_plus_one")
    assert hf_pos[:, 0, 26:].tolist() == [[4, 5]] * 3
    assert mp_pos[:, 0, 26:].tolist() == [[8, 9]] * 3
    assert torch.equal(hf_pos[:, :, :26], mp_pos[:, :, :26])
    assert hf_pos[0, 0, 2:26].tolist() == [2 + i // 4 for i in range(24)]
    assert hf_delta.item() == 8 - 28 and mp_delta.item() == 10 - 28  # max(7, 5) + 1, 9 + 1
    for rule in ("hf", "max_plus_one"):
        _assert_same(op(mm_token_type_ids=tt, video_grid_thw=video, text_after_video=rule),
                     reference.mrope_position_ids(mm_token_type_ids=tt.cpu(),
                                                  video_grid_thw=video.cpu(),
                                                  text_after_video=rule))


def test_max_plus_one_with_interval_and_images(device):
    """Qwen2.5-VL interval 2.5: frames at +0, +2, +5; max_plus_one continues after the last frame.
    Images (t = 1) advance by max(h', w') under both rules."""
    tt = torch.tensor([[0] + [2] * 12 + [0] + [1] * 6 + [0]], device=device)
    kw = {"mm_token_type_ids": tt, "video_grid_thw": torch.tensor([[3, 4, 4]], device=device),
          "image_grid_thw": torch.tensor([[1, 4, 6]], device=device), "model": "qwen2_5_vl",
          "second_per_grid_ts": torch.tensor([1.25], device=device)}
    pos, _ = op(**kw, text_after_video="max_plus_one")
    assert pos[0, 0, 1:13].tolist() == [1] * 4 + [3] * 4 + [6] * 4
    assert pos[0, 0, 13].item() == 7 and pos[:, 0, 20].tolist() == [7 + 1 + 3] * 3
    hf_pos, _ = op(**kw)
    assert hf_pos[0, 0, 13].item() == 1 + 2 and hf_pos[:, 0, 20].tolist() == [3 + 1 + 3] * 3


def test_qwen3_splits_videos_into_frames(device):
    """Qwen3-VL: a (3, 4, 4) video is three (1, 4, 4) blocks (here separated by timestamps)."""
    tt = torch.tensor([[0] + ([0, 0] + [2] * 4) * 3 + [0]], device=device)
    pos, delta = op(mm_token_type_ids=tt, video_grid_thw=torch.tensor([[3, 4, 4]], device=device),
                    model="qwen3_vl")
    frame_starts = [3, 7, 11]  # text 0..2, frame at 3 (advance 2), text 5, 6, frame at 7, ...
    for f, s in enumerate(frame_starts):
        cols = slice(3 + 6 * f, 7 + 6 * f)
        assert pos[0, 0, cols].tolist() == [s] * 4
        assert pos[1, 0, cols].tolist() == [s, s, s + 1, s + 1]
    assert pos[:, 0, -1].tolist() == [13] * 3 and delta.item() == 14 - 20


def test_padding_is_zero_and_rows_without_tokens(device):
    tt = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0]], device=device)
    mask = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]], device=device)
    pos, delta = op(mm_token_type_ids=tt, attention_mask=mask,
                    image_grid_thw=torch.tensor([[1, 2, 4]], device=device))
    assert pos[:, 0].abs().sum() == 0 and pos[:, 1, 0].abs().sum() == 0
    assert pos[:, 1, 1:].tolist() == [[0, 0, 2], [0, 0, 2], [0, 1, 2]]
    assert delta.tolist() == [[0], [3 - 3]]
    empty = op(mm_token_type_ids=torch.zeros(3, 0, dtype=torch.int64, device=device))
    assert empty[0].shape == (3, 3, 0) and empty[1].tolist() == [[0]] * 3


def test_every_output_element_is_written(device):
    batch = build_batch(CASES["mask-holes"][0], holes=5).to(device)
    with deterministic_mode():
        got = op(**batch.kwargs())
    _assert_same(got, reference.mrope_position_ids(**batch.to("cpu").kwargs()))


def test_raw_op_reads_strided_intervals_and_grids():
    b = build_batch(CASES["videos"][0], model="qwen2_5_vl")
    iv = torch.tensor([2.0, -1.0, 1.5, -1.0, 4 / 3, -1.0], dtype=torch.float32)
    grid = torch.stack([b.video_grid_thw, torch.zeros_like(b.video_grid_thw)], 1).flatten(0, 1)
    args = (b.mm_token_type_ids, b.attention_mask, None)
    strided = raw(*args, grid[::2], iv[::2], 2, 1, 2, False, "max_plus_one")
    dense = raw(*args, b.video_grid_thw, iv[::2].contiguous(), 2, 1, 2, False, "max_plus_one")
    _assert_same(strided, dense)
    expected = reference.mrope_position_ids(**b.kwargs(), model="qwen2_5_vl",
                                            second_per_grid_ts=iv[::2] / 2,
                                            text_after_video="max_plus_one")
    _assert_same(strided, expected)


# --- hypothesis fuzz against the reference -------------------------------------------------------


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values, other memory: transposed storage or a stride-2 slice."""
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "sliced":
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    return t


@settings(derandomize=True, max_examples=60, deadline=None, database=None)
@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(0, 5),
    max_blocks=st.integers(1, 4),
    model=st.sampled_from(MODELS),
    rule=st.sampled_from(["hf", "max_plus_one"]),
    merge=st.sampled_from([1, 2, 3]),
    pad=st.sampled_from(["left", "right", None]),
    holes=st.integers(0, 3),
    form=st.sampled_from(["types", "input_ids"]),
    dtype=st.sampled_from([torch.int64, torch.int32]),
    mask_dtype=st.sampled_from([torch.int64, torch.bool, torch.uint8, torch.int32]),
    layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    seconds=st.sampled_from([None, "f32", "f64"]),
)
def test_fuzz_against_reference(seed, batch, max_blocks, model, rule, merge, pad, holes, form,
                                dtype, mask_dtype, layout, seconds):
    rng = random.Random(seed)
    rows = random_rows(rng, batch, max_blocks, merge=merge)
    b = build_batch(rows, model=model, merge=merge, pad=pad, holes=holes, seed=seed)
    kw = b.kwargs(form)
    key = "mm_token_type_ids" if form == "types" else "input_ids"
    kw[key] = _layout(kw[key].to(dtype), layout)
    if kw["attention_mask"] is not None:
        kw["attention_mask"] = _layout(kw["attention_mask"].to(mask_dtype), layout)
    for key in ("image_grid_thw", "video_grid_thw"):
        if kw[key] is not None:
            kw[key] = _layout(kw[key].to(dtype), layout)
    extra = {"model": model, "text_after_video": rule, "spatial_merge_size": merge}
    if model == "qwen2_5_vl" and seconds is not None and b.video_grid_thw is not None:
        extra["second_per_grid_ts"] = _seconds(seconds, b)
    expected = reference.mrope_position_ids(**kw, **extra)
    _assert_same(op(**kw, **extra), expected)


# --- CUDA only (skipped without a GPU) ----------------------------------------------------------


def _random_cuda_batch(seed, model="qwen2_5_vl", batch=6):
    rows = random_rows(random.Random(seed), batch, 4)
    return build_batch(rows, model=model, holes=2, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["hf", "max_plus_one"])
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("seed", range(6))
def test_cuda_matches_cpu(seed, model, rule):
    b = _random_cuda_batch(seed, model)
    extra = {"model": model, "text_after_video": rule}
    if model == "qwen2_5_vl" and b.video_grid_thw is not None:
        extra["second_per_grid_ts"] = _seconds("f32", b)
    cpu = op(**b.kwargs(), **extra)
    if "second_per_grid_ts" in extra:
        extra["second_per_grid_ts"] = extra["second_per_grid_ts"].cuda()
    _assert_same(op(**b.to("cuda").kwargs(), **extra), cpu)


@pytest.mark.gpu
def test_cuda_long_rows_and_many_rows():
    """Rows much longer than the CTA (many tokens per thread) and more rows than SMs."""
    rng = random.Random(7)
    long_rows = random_rows(rng, 3, 40, max_side=12, max_t=6, text_only_p=0)
    many_rows = random_rows(rng, 300, 3)
    for rows in (long_rows, many_rows):
        b = build_batch(rows, model="qwen2_5_vl", holes=3)
        _assert_same(op(**b.to("cuda").kwargs(), model="qwen2_5_vl"),
                     op(**b.kwargs(), model="qwen2_5_vl"))


@pytest.mark.gpu
@pytest.mark.parametrize("model", MODELS)
def test_cuda_no_host_sync_and_graph_capture(model):
    b = _random_cuda_batch(3, model).to("cuda")
    extra = {"model": model}
    if model == "qwen2_5_vl":
        extra["second_per_grid_ts"] = _seconds("f32", b).cuda()
    with no_host_sync():
        eager = op(**b.kwargs(), **extra)
    _assert_same(eager, op(**b.to("cpu").kwargs(), **{
        k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in extra.items()}))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op(**b.kwargs(), **extra)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = op(**b.kwargs(), **extra)
    for out in static:
        out.fill_(-7)
    graph.replay()
    torch.cuda.synchronize()
    _assert_same(static, eager)
    b.mm_token_type_ids.zero_()  # new data in the captured input: text only
    graph.replay()
    torch.cuda.synchronize()
    _assert_same(static, op(**b.kwargs(), **extra))
    assert not torch.equal(static[0], eager[0])


@pytest.mark.gpu
def test_cuda_runs_on_the_current_stream():
    b = _random_cuda_batch(5)
    expected = op(**b.kwargs())
    kw = b.to("cuda").kwargs()
    src = kw["mm_token_type_ids"]
    kw["mm_token_type_ids"] = torch.zeros_like(src)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # a kernel on another stream would read the zeros
        kw["mm_token_type_ids"].copy_(src)
        got = op(**kw)
    side.synchronize()
    _assert_same(got, expected)


@pytest.mark.gpu
def test_cuda_repeated_runs_are_bit_identical():
    b = _random_cuda_batch(11, batch=16).to("cuda")
    first = op(**b.kwargs())
    for _ in range(20):
        _assert_same(op(**b.kwargs()), first)


@pytest.mark.gpu
def test_cuda_inconsistent_rows_are_marked():
    """Data errors cannot raise on CUDA without a sync: the row is set to -1, rope_delta to 0."""
    tt = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]], device="cuda")
    grid = torch.tensor([[1, 2, 4], [1, 2, 4]], device="cuda")  # row 1's block is 3 tokens, not 2
    pos, delta = op(mm_token_type_ids=tt, image_grid_thw=grid)
    assert (pos[:, 1] == -1).all() and delta[1].item() == 0
    assert pos[:, 0].tolist() == [[0, 1, 1, 3]] * 2 + [[0, 1, 2, 3]]
    assert pos[:, 2].tolist() == [[0, 1, 2, 3]] * 3
    missing = op(mm_token_type_ids=tt[:1], image_grid_thw=grid[:0])
    assert (missing[0] == -1).all()


@pytest.mark.gpu
@pytest.mark.parametrize("interval", [float("nan"), float("inf"), 1e30])
def test_cuda_bad_video_interval_marks_the_row(interval):
    """A non-finite (or int64-overflowing) interval: row -1 and delta 0 on CUDA, as documented;
    the other row is unaffected."""
    tt = torch.tensor([[0, 2, 2, 0], [0, 0, 0, 0]], device="cuda")
    grid = torch.tensor([[2, 2, 2]], device="cuda")  # t = 2: the interval scales frame 1
    pos, delta = op(mm_token_type_ids=tt, video_grid_thw=grid, model="qwen2_5_vl",
                    second_per_grid_ts=torch.tensor([interval], device="cuda"),
                    text_after_video="max_plus_one")
    assert (pos[:, 0] == -1).all() and delta[0].item() == 0
    assert pos[:, 1].tolist() == [[0, 1, 2, 3]] * 3


@pytest.mark.gpu
def test_cuda_negative_video_frames_mark_the_row():
    """Qwen3-VL splits videos into frames: a negative t is a bad grid, not a garbled frame map."""
    tt = torch.tensor([[0, 2, 2, 0]], device="cuda")
    grid = torch.tensor([[-1, 2, 4]], device="cuda")
    pos, delta = op(mm_token_type_ids=tt, video_grid_thw=grid, model="qwen3_vl")
    assert (pos == -1).all() and delta[0].item() == 0


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_past_int32_indexing():
    """3·B·S > 2**31 output elements: positions are written through 64-bit offsets."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs >= 40 GB of GPU memory")
    batch, seq = 4, 2**28
    tt = torch.zeros(batch, seq, dtype=torch.int32, device="cuda")
    tt[3, 10:14] = 1
    pos, delta = op(mm_token_type_ids=tt, image_grid_thw=torch.tensor([[1, 4, 4]], device="cuda"))
    assert pos[2, 3, -3:].tolist() == [seq - 5, seq - 4, seq - 3]
    assert pos[:, 3, 10:14].tolist() == [[10] * 4, [10, 10, 11, 11], [10, 11, 10, 11]]
    assert pos[0, 0, -1].item() == seq - 1 and delta[:, 0].tolist() == [0, 0, 0, -2]

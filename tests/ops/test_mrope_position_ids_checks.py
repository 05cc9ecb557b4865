"""mrope_position_ids: opcheck, torch.compile (no graph break), and bad inputs -- shape / dtype /
device / flag errors on real, meta and fake tensors, data inconsistencies on the CPU. Forward
equality (HF, reference, CUDA) lives in test_mrope_position_ids.py."""

import pytest
import torch
from mrope_testing import build_batch
from testing_utils import assert_bit_equal
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import vlmkern
from vlmkern import reference

op = vlmkern.ops.mrope_position_ids
raw = torch.ops.vlmkern.mrope_position_ids

IMG, VID = "image", "video"
ROWS = [[3, (IMG, 1, 4, 6), 2, (VID, 3, 4, 2), 1], [5], [1, (VID, 2, 2, 2), 2, (IMG, 1, 2, 2), 4]]


def _raw_args(batch, *, intervals=None, split=False, rule="hf", merge=2):
    return (batch.mm_token_type_ids, batch.attention_mask, batch.image_grid_thw,
            batch.video_grid_thw, intervals, merge, 1, 2, split, rule)  # fmt: skip


def _samples():
    b = build_batch(ROWS, holes=2)
    n_videos = b.video_grid_thw.shape[0]
    yield "mask+grids", _raw_args(b)
    yield "intervals-f32", _raw_args(b, intervals=torch.tensor([2.0, 1.5], dtype=torch.float32))
    yield "intervals-f64-max-plus-one", _raw_args(
        b, intervals=torch.full((n_videos,), 0.75, dtype=torch.float64), rule="max_plus_one")
    yield "split-frames", _raw_args(build_batch(ROWS, model="qwen3_vl"), split=True)
    empty = build_batch([])
    yield "empty-batch", (empty.mm_token_type_ids, None, None, None, None, 2, 1, 2, False, "hf")
    nc = build_batch(ROWS, pad="right")
    args = list(_raw_args(nc))
    args[0] = args[0].t().contiguous().t()  # non-contiguous tokens
    args[1] = torch.stack([args[1], args[1]], -1)[..., 0]  # stride-2 mask
    args[2] = args[2].t().contiguous().t()  # column-major grid
    yield "non-contiguous", tuple(args)
    yield "text-only-int32", (torch.zeros(2, 7, dtype=torch.int32), None, None, None, None, 2,
                              151655, 151656, False, "hf")


SAMPLES = dict(_samples())


@pytest.mark.parametrize("sample", SAMPLES)
def test_opcheck(sample):
    torch.library.opcheck(raw.default, SAMPLES[sample])


def test_opcheck_interval_requiring_grad():
    """A float input that requires grad: the outputs are int64, so the op registers no autograd
    formula and its outputs carry no grad_fn (opcheck's autograd registration check agrees)."""
    b = build_batch(ROWS)
    iv = torch.tensor([2.0, 1.5], requires_grad=True)
    torch.library.opcheck(raw.default, _raw_args(b, intervals=iv))
    pos, deltas = raw(*_raw_args(b, intervals=iv))
    assert pos.grad_fn is None and deltas.grad_fn is None


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _positions(tt, mask, images, videos, seconds):
    pos, deltas = op(mm_token_type_ids=tt, attention_mask=mask, image_grid_thw=images,
                     video_grid_thw=videos, model="qwen2_5_vl", second_per_grid_ts=seconds)
    return pos + deltas.view(1, -1, 1), deltas  # some ops around it in the same graph


def test_torch_compile_fullgraph(fresh_dynamo):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_positions, backend=counter, fullgraph=True)
    for n_rows in (1, 2, 3, 4):
        # batch, sequence, image and video counts all change from call to call
        b = build_batch([[1, (IMG, 1, 2, 4), 2, (VID, 2, 2, 2), 1 + k] for k in range(n_rows)])
        seconds = torch.linspace(0.5, 1.5, b.video_grid_thw.shape[0])
        args = (b.mm_token_type_ids, b.attention_mask, b.image_grid_thw, b.video_grid_thw, seconds)
        for got, expected in zip(compiled(*args), _positions(*args), strict=True):
            assert_bit_equal(got, expected)
    assert 1 <= counter.frame_count <= 2
    targets = {str(n.target) for g in counter.graphs for n in g.graph.nodes}
    assert "vlmkern.mrope_position_ids" in targets, sorted(targets)


# --- bad inputs: the real and the fake kernel raise the same errors -----------------------------

ERROR_DEVICES = ["cpu", "meta", "fake", pytest.param("cuda", marks=pytest.mark.gpu)]


def _good(dev_of):
    """Valid raw-op arguments; dev_of(t) puts a tensor on the device under test."""
    b = build_batch(ROWS)
    return [dev_of(b.mm_token_type_ids), dev_of(b.attention_mask), dev_of(b.image_grid_thw),
            dev_of(b.video_grid_thw), None, 2, 1, 2, False, "hf"]  # fmt: skip


def _bad(i, value, *more):
    """Edit: argument i becomes value(args, dev_of); `more` adds further (index, value) pairs."""
    pairs = [(i, value), *zip(more[::2], more[1::2], strict=True)]

    def edit(args, dev_of):
        for j, v in pairs:
            args[j] = v(args, dev_of)

    return edit


BAD = {  # id: (edit of the argument list, message)
    "tokens-1d": (_bad(0, lambda a, d: a[0][0]), r"tokens must be a 2-D tensor \(B, S\)"),
    "tokens-float": (_bad(0, lambda a, d: a[0].float()),
                     r"tokens \(mm_token_type_ids or input_ids\) must be int64 or int32"),
    "tokens-int16": (_bad(0, lambda a, d: a[0].short()), r"tokens .* must be int64 or int32"),
    "mask-shape": (_bad(1, lambda a, d: a[1][:, 1:]), r"attention_mask must have the shape of"),
    "mask-float": (_bad(1, lambda a, d: a[1].float()),
                   r"attention_mask must be bool or an integer dtype"),
    "image-grid-shape": (_bad(2, lambda a, d: a[2][:, :2]),
                         r"image_grid_thw must be a 2-D tensor \(N, 3\)"),
    "image-grid-1d": (_bad(2, lambda a, d: a[2][0]), r"image_grid_thw must be a 2-D tensor"),
    "video-grid-float": (_bad(3, lambda a, d: a[3].float()),
                         r"video_grid_thw must be int64 or int32"),
    "intervals-no-videos": (_bad(4, lambda a, d: d(torch.ones(2)), 3, lambda a, d: None),
                            r"video_intervals is given but video_grid_thw is None"),
    "intervals-shape": (_bad(4, lambda a, d: d(torch.ones(3))),
                        r"video_intervals must have shape \(Nv,\) = \(2,\)"),
    "intervals-dtype": (_bad(4, lambda a, d: d(torch.ones(2, dtype=torch.float16))),
                        r"video_intervals must be float32 or float64"),
    "intervals-split": (_bad(4, lambda a, d: d(torch.ones(2)), 8, lambda a, d: True),
                        r"video_intervals must be None with split_video_frames=True"),
    "merge-0": (_bad(5, lambda a, d: 0), r"spatial_merge_size must be >= 1, got 0"),
    "merge-neg": (_bad(5, lambda a, d: -2), r"spatial_merge_size must be >= 1, got -2"),
    "same-token": (_bad(7, lambda a, d: 1), r"image_token and video_token must differ"),
    "rule": (_bad(9, lambda a, d: "vllm"), r'text_after_video must be "hf" or "max_plus_one"'),
}  # fmt: skip


def _dev_of(dev):
    if dev == "fake":
        mode = FakeTensorMode()
        return lambda t: None if t is None else mode.from_tensor(t)
    return lambda t: None if t is None else t.to(dev)


@pytest.mark.parametrize("dev", ERROR_DEVICES)
@pytest.mark.parametrize("case", BAD)
def test_rejects_bad_arguments(case, dev):
    edit, match = BAD[case]
    dev_of = _dev_of(dev)
    args = _good(dev_of)
    edit(args, dev_of)
    with pytest.raises(RuntimeError, match=match):
        raw(*args)


MIXED = {"attention_mask": 1, "image_grid_thw": 2, "video_grid_thw": 3, "video_intervals": 4}


@pytest.mark.parametrize("name", MIXED)
@pytest.mark.parametrize("dev", ["meta", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_rejects_mixed_devices(name, dev):
    args = _good(lambda t: t)
    args[4] = torch.ones(2)
    one = list(args)
    one[MIXED[name]] = one[MIXED[name]].to(dev)
    with pytest.raises(RuntimeError, match=rf"{name} is on {dev}.* but tokens is on cpu"):
        raw(*one)
    rest = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]
    rest[MIXED[name]] = args[MIXED[name]]
    with pytest.raises(RuntimeError, match=rf"{name} is on cpu but tokens is on {dev}"):
        raw(*rest)


def _types(*rows):
    return torch.tensor(rows)


DATA_ERRORS = {  # id: (kwargs of vlmkern.ops.mrope_position_ids, message)
    "no-image-grid": ({"mm_token_type_ids": _types([0, 1, 1, 0])},
                      r"row 0 has image tokens but image_grid_thw is None"),
    "more-images-than-grids": (
        {"mm_token_type_ids": _types([1, 1, 0, 1, 1], [0, 1, 1, 0, 0]),
         "image_grid_thw": torch.tensor([[1, 2, 4], [1, 2, 4]])},
        r"image_grid_thw has 2 rows but row 1 holds image block #2"),
    "block-too-long": ({"mm_token_type_ids": _types([0, 2, 2, 2, 0]),
                        "video_grid_thw": torch.tensor([[1, 2, 4]])},
                       r"row 0: video block #0 has 3 tokens but video_grid_thw\[0\] = \(1, 2, 4\) "
                       r"needs t\*\(h/m\)\*\(w/m\) = 2"),
    "block-too-short-at-end": ({"mm_token_type_ids": _types([0, 0, 0, 1]),
                                "image_grid_thw": torch.tensor([[1, 4, 4]])},
                               r"row 0: image block #0 has 1 tokens but image_grid_thw\[0\]"),
    "qwen3-frames": ({"mm_token_type_ids": _types([0, 2, 2, 2, 2, 0]), "model": "qwen3_vl",
                      "video_grid_thw": torch.tensor([[2, 2, 4]])},
                     r"video block #0 \(a frame of video_grid_thw\[0\] = \(2, 2, 4\)\) has 4 "),
    "qwen3-too-many-frames": ({"mm_token_type_ids": _types([2, 2, 0, 2, 2, 0, 2, 2]),
                               "model": "qwen3_vl", "video_grid_thw": torch.tensor([[2, 2, 4]])},
                              r"video_grid_thw holds 2 frames in total .* video block #2"),
    "negative-grid": ({"mm_token_type_ids": _types([0, 0]),
                       "image_grid_thw": torch.tensor([[1, -2, 4]])},
                      r"image_grid_thw\[0\] = \(1, -2, 4\) has a negative entry"),
    "overflowing-grid": ({"mm_token_type_ids": _types([0, 1]),
                          "image_grid_thw": torch.tensor([[2**40, 2**40, 2**40]])},
                         r"image_grid_thw\[0\] = .* its token count overflows int64"),
    "nan-interval": ({"mm_token_type_ids": _types([0, 2, 2]), "model": "qwen2_5_vl",
                      "video_grid_thw": torch.tensor([[1, 2, 4]]),
                      "second_per_grid_ts": torch.tensor([float("nan")])},
                     r"video_intervals\[0\] = nan is not finite"),
}  # fmt: skip


CHECKED_BY_REFERENCE = ("no-image-grid", "more-images-than-grids", "block-too-long",
                        "block-too-short-at-end", "qwen3-frames", "qwen3-too-many-frames")


@pytest.mark.parametrize("case", DATA_ERRORS)
def test_cpu_raises_on_inconsistent_data(case):
    kwargs, match = DATA_ERRORS[case]
    with pytest.raises(RuntimeError, match=match):
        op(**kwargs)
    if case in CHECKED_BY_REFERENCE:
        with pytest.raises(ValueError):
            reference.mrope_position_ids(**kwargs)


WRAPPER_ERRORS = {  # id: (kwargs, message)
    "no-tokens": ({}, r"pass mm_token_type_ids or input_ids"),
    "model": ({"model": "qwen2_vl_moe"}, r"model must be one of"),
    "rule": ({"text_after_video": "vllm"}, r"text_after_video must be one of"),
    "seconds-qwen2": ({"second_per_grid_ts": torch.ones(1)},
                      r"second_per_grid_ts is only used with model='qwen2_5_vl'"),
    "seconds-half": ({"second_per_grid_ts": torch.ones(1, dtype=torch.float16),
                      "model": "qwen2_5_vl"}, r"second_per_grid_ts must be float32, float64 or"),
    "tps": ({"tokens_per_second": "2", "model": "qwen2_5_vl"}, r"tokens_per_second must be a"),
}  # fmt: skip


@pytest.mark.parametrize("case", WRAPPER_ERRORS)
def test_wrapper_rejects_bad_arguments(case):
    kwargs, match = WRAPPER_ERRORS[case]
    if case != "no-tokens":
        kwargs = {"mm_token_type_ids": _types([0, 2, 2]),
                  "video_grid_thw": torch.tensor([[1, 2, 4]]), **kwargs}
    with pytest.raises(ValueError, match=match):
        op(**kwargs)

"""The bench's result check (vlmkern.bench.harness.check_equal): exact ops must match bit for bit;
GEMM-like ops get a tolerance scaled by the output's magnitude, which still catches real errors."""

import pytest
import torch

from vlmkern.bench.harness import check_equal


class _Case:
    shape = "tiny"


def test_exact_mismatch_raises():
    ref = torch.arange(6.0).to(torch.bfloat16)
    check_equal("op", _Case, ref.clone(), ref, exact=True)
    with pytest.raises(AssertionError, match="differs from reference"):
        check_equal("op", _Case, ref + 1, ref, exact=True)


def test_tolerance_scales_with_magnitude():
    # One bf16 ulp of a 12-sized intermediate (0.0625) on an output near 1: a reference rounding,
    # not an error. A 10 % of max |ref| error is still caught, and so is a wrong shape.
    ref = torch.tensor([12.0, 1.0, -3.0])
    check_equal("op", _Case, ref + torch.tensor([0.0, 0.0625, 0.0]), ref, exact=False)
    with pytest.raises(AssertionError, match="max abs diff"):
        check_equal("op", _Case, ref + torch.tensor([0.0, 1.2, 0.0]), ref, exact=False)
    with pytest.raises(AssertionError, match="reference"):
        check_equal("op", _Case, ref[:2], ref, exact=False)


def test_wrong_result_skips_the_op_and_fails_the_run(monkeypatch, tmp_path, capsys):
    """An op whose provider disagrees with the reference gets no timings, the next op still runs,
    and the exit status is 1."""
    import sys
    import types

    from vlmkern import bench
    from vlmkern.bench import __main__ as cli
    from vlmkern.bench.harness import Case

    def fake(name, wrong):
        mod = types.ModuleType(name)
        mod.NAME, mod.BASELINE, mod.EXACT = name, "p", True
        mod.cases = lambda cfg: [Case("s", lambda: (torch.ones(4),), bytes_moved=32)]
        mod.providers = lambda cfg: {"p": (lambda x: x + 3) if wrong else (lambda x: x * 2)}
        mod.reference = lambda: (lambda x: x * 2)
        monkeypatch.setitem(sys.modules, f"fake_bench_{name}", mod)
        monkeypatch.setitem(bench.REGISTRY, name, f"fake_bench_{name}")

    fake("wrong", True)
    fake("right", False)
    monkeypatch.setattr(bench, "REGISTRY", {"wrong": bench.REGISTRY["wrong"],
                                            "right": bench.REGISTRY["right"]})
    monkeypatch.setattr(cli, "REGISTRY", bench.REGISTRY)
    assert cli.main(["all", "--device", "cpu", "--quick", "--no-compile"]) == 1
    out = capsys.readouterr().out
    assert "## wrong: WRONG RESULT" in out and "## right (" in out


def test_a_provider_that_cannot_run_is_listed_with_its_reason():
    """A provider raising on a case (e.g. a head dim the CUDA kernel lacks) gets a "skipped"
    record with the reason, and the table names it under the timed rows."""
    from vlmkern.bench.harness import Case, Config, format_table, run_op

    def refuses(x):
        raise ValueError("no kernel for this shape")

    case = Case("tiny", lambda: (torch.ones(64),), bytes_moved=512)
    cfg = Config("cpu", torch.float32, quick=True, compile=False)
    records = run_op("op", [case], {"p": lambda x: x * 2, "q": refuses}, lambda x: x * 2, cfg,
                     baseline="p", log=lambda s: None)  # fmt: skip
    skipped = [r for r in records if "skipped" in r]
    assert [(r["provider"], r["skipped"]) for r in skipped] == [
        ("q", "ValueError: no kernel for this shape")]
    assert {r["provider"] for r in records if "skipped" not in r} >= {"p"}
    table = format_table(records, "p")
    assert table.splitlines()[-1] == "- q on tiny: not run (ValueError: no kernel for this shape)"

"""The parts of the benchmark that need no GPU: footprints, report, heuristic tuning, the
warm-up's plan and its no-GPU path."""

import shutil

import pytest
import torch

from arfusion import bench, heuristics, sizing

HEADER = dict(card="Test GPU", sms=1, driver="0", torch="t", triton="t", date="2026-01-01",
              world_size=4, gpus=1)


def _row(method, tokens, us, world=4, mode="emulation"):
    return dict(method=method, pattern=1, hidden=4096, tokens=tokens, strategy="-", us=us,
                world_size=world, mode=mode, dtype="bfloat16", roofline=None)


def test_footprints_follow_the_formulas():
    fp = bench._footprints(8, 2048, 4096, torch.bfloat16)
    e = 2048 * 4096
    # three rotations of a 16-element signature slot per rank plus one slot of e per rank
    assert fp["trtllm"] == sizing.buffer_bytes(8, e, e, torch.bfloat16) == 3 * 8 * (16 + e) * 2
    assert fp["mnnvl"] < fp["mnnvl_force_oneshot"] == fp["trtllm"]
    assert fp["flashinfer_trtllm"] == 8 * e * 2 + (2 << 20) + 3 * 8 * e * 2


def test_markdown_lists_every_method_and_labels_emulation():
    rows = [_row("arfusion trtllm oneshot", 1, 10.0), _row("arfusion trtllm twoshot", 1, 20.0),
            _row("nccl + compiled epilogue", 1, 30.0, world=1, mode="world-1")]
    rows[0]["roofline"] = 0.5
    md = bench._markdown(HEADER, rows, {"copy_GBps": 3000.0})
    assert "(emulation: the exchange is local HBM traffic, not NVLink)" in md
    assert "world size 1 on one GPU" in md and "3000 GB/s" in md
    assert "| kARResidualRMSNorm | bfloat16 | 4096 | 1 | 10.0 [50%] | 20.0 |" in md


def test_markdown_gives_the_signature_cost_to_a_hundredth():
    rows = [_row("trtllm with signature", 1, 8.256, mode="signature"),
            _row("trtllm without (timing only)", 1, 8.301, mode="signature"),
            _row("trtllm signature cost", 1, -0.05, mode="signature")]
    md = bench._markdown(HEADER, rows, {"copy_GBps": 3000.0})
    assert "4 ranks (emulation), 1 token: what the call signature costs" in md
    assert "| kARResidualRMSNorm | bfloat16 | 4096 | 1 | -0.05 | 8.26 | 8.30 |" in md


def test_warm_up_lists_each_variant_once_longest_first():
    import argparse

    from arfusion.bench import warm

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args("--emulate 2,8 --patterns 1,2 --hidden 4096,8192 --tokens 1,2048 "
                             "--emulation-tokens 1,128".split())
    units = warm.units(args, [torch.bfloat16], "trtllm")
    ranks = [u for u in units if u[0] == "ranks"]
    assert units[:len(ranks)] == ranks and len(set(units)) == len(units)
    assert sorted(u[2:] for u in ranks) == [(w, "trtllm", p, h) for w in (2, 8) for p in (1, 2)
                                            for h in (4096, 8192)]
    assert sorted(u[2:] for u in units[len(ranks):]) == [
        (p, t, h) for p in (1, 2) for t in (1, 128, 2048) for h in (4096, 8192)]
    mps = parser.parse_args("--mps --world-size 4 --emulate 2 --patterns 1 --hidden 4096 "
                            "--tokens 1".split())
    assert [u[2] for u in warm.units(mps, [torch.bfloat16], "trtllm") if u[0] == "ranks"] == [4]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_warm_up_without_a_gpu_leaves_every_unit_to_the_run():
    import argparse

    from arfusion.bench import warm

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args("--world-size 2 --patterns 1 --hidden 256 --tokens 1".split())
    failed = list(warm.fill_caches(args, [torch.bfloat16], "trtllm", 2))
    assert len(failed) == 2 and all(f.startswith("(") for f in failed), failed


def test_tune_writes_the_largest_size_where_oneshot_still_wins(tmp_path):
    rows = []
    for tokens, one, two in [(1, 5.0, 9.0), (8, 6.0, 9.0), (64, 12.0, 10.0)]:
        rows += [_row("arfusion trtllm oneshot", tokens, one),
                 _row("arfusion trtllm twoshot", tokens, two)]
    path = tmp_path / "heuristics.py"
    shutil.copy(heuristics.__file__, path)
    table = bench.tune(rows, 4, HEADER, path)
    assert table[4] == 8 * 4096 * 2
    text = path.read_text()
    assert "    4: 64 << 10,\n" in text  # 8 x 4096 x 2 bytes
    assert "    1: 1 << 62,\n" in text
    assert "Tuned by `python -m arfusion bench --tune`" in text
    namespace: dict = {}
    exec(compile(text, str(path), "exec"), namespace)
    assert namespace["ONESHOT_MAX_BYTES"][4] == 8 * 4096 * 2


def test_roofline_bytes_follow_the_protocol():
    from arfusion.bench.timing import epilogue_bytes, lamport_bytes

    e = 128 * 4096
    # one-shot moves (3N+4)E elements per rank for kARResidualRMSNorm, two-shot about 10E
    assert epilogue_bytes(1, 128, 4096, 2) + lamport_bytes(8, 128, 4096, 2, True) == \
        (3 * 8 + 4) * e * 2
    assert epilogue_bytes(1, 128, 4096, 2) + lamport_bytes(8, 128, 4096, 2, False) == 10 * e * 2
    assert lamport_bytes(1, 128, 4096, 2, True) == 0
    assert epilogue_bytes(0, 128, 4096, 2) == 2 * e * 2  # kAllReduce: read x, write output
    assert epilogue_bytes(3, 16, 64, 2) == 3 * 16 * 64 * 2 + 16 * 64 // 2 + 16 * 64 // 16


def test_host_us_takes_turns_and_reports_the_median_block():
    from arfusion.bench.timing import host_us

    calls = {"a": 0, "b": 0}
    order = []

    def counter(name):
        def fn():
            calls[name] += 1
            if not order or order[-1] != name:
                order.append(name)
        return fn

    got = host_us({"a": counter("a"), "b": counter("b")}, blocks=3, n=10)
    assert set(got) == {"a", "b"} and all(v > 0 for v in got.values())
    assert calls == {"a": 50 + 3 * 10, "b": 50 + 3 * 10}
    assert order == ["a", "b"] * 4  # warm-up, then the blocks alternate


def test_flashinfer_rows_merge_agreement_and_hangs_over_ranks():
    """FlashInfer's rows: the slowest rank's time, differing elements added up over the
    ranks (norm_out's ulp: the largest), a hang on any rank marks the row hung."""
    from arfusion.bench import report

    def fi_row(tokens, us, differ=0, ulp=0):
        return dict(_row("flashinfer oneshot", tokens, us, mode="mps"),
                    agree={"residual_out": [differ, 100], "norm_out ulp vs reference": [ulp, 0]})

    hung = dict(_row("flashinfer oneshot", 128, float("nan"), mode="mps"), hung=True)
    merged = report.merge_ranks([[fi_row(16, 5.0, 1, 1), fi_row(128, 7.0)],
                                 [fi_row(16, 6.0, 2, 0), hung]], 2, "mps")
    assert merged[0]["us"] == 6.0 and not merged[0]["hung"]
    assert merged[0]["agree"] == {"residual_out": [3, 200], "norm_out ulp vs reference": [1, 0]}
    assert merged[1]["hung"]
    md = bench._markdown(HEADER, merged, {"copy_GBps": 3000.0})
    assert "| kARResidualRMSNorm | bfloat16 | 4096 | 16 | 6.0 |" in md
    assert "| kARResidualRMSNorm | bfloat16 | 4096 | 128 | hung |" in md
    assert "| 16 | - | residual_out 3/200, norm_out ulp vs reference 1 |" in md


def test_flashinfer_compare_counts_differing_elements_per_output():
    from arfusion.bench.flashinfer import compare

    ours = {"output": torch.ones(2, 4, dtype=torch.bfloat16),
            "residual_out": torch.ones(2, 4, dtype=torch.bfloat16),
            "quant_out": torch.ones(2, 4).to(torch.float8_e4m3fn),
            "scale_out": torch.ones(2, 1)}
    theirs = {k: v.clone() for k, v in ours.items()}
    theirs["residual_out"][0, 1] = 2.0
    theirs["quant_out"][1] = torch.zeros(4).to(torch.float8_e4m3fn)
    want = {"residual_out": [1, 8], "quant_out": [4, 8], "scale_out": [0, 2]}
    theirs["output"][:] = float("nan")  # FlashInfer writes no all-reduce output there
    for pattern in (1, 2, 10):
        assert compare(theirs, ours, {}, pattern) == want
    theirs["output"][0, 0] = 1.0
    assert compare(theirs, ours, {}, 0)["output"] == [7, 8]

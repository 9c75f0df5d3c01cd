"""`sawint4 bench-serving` on the CPU at smoke-test size: the JSON, table and chart it writes."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from trtllm_sawint4.serving import benchmark  # noqa: E402


def test_smoke_run_writes_points_ratios_and_chart(tmp_path, capsys):
    rc = benchmark.main(["--arch", "tiny", "--device", "cpu", "--formats", "bf16,saw_int4", "--scenarios",
                         "long,short", "--long-input", "120", "--long-output", "4", "--long-concurrency", "3",
                         "--short-input", "12", "--short-output", "5", "--short-concurrency", "1,2",
                         "--kv-budget-gib", "0.001", "--max-step-tokens", "128", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "serving_bench.json").read_text())
    assert data["meta"]["kv_budget_bytes"] == int(0.001 * benchmark.GiB)
    pts = {(p["scenario"], p["concurrency"], p["kv_format"]): p for p in data["points"]}
    assert set(pts) == {(s, c, f) for s, cs in (("long", [3]), ("short", [1, 2])) for c in cs
                        for f in ("bf16", "saw_int4")}
    for (sc, c, fmt), p in pts.items():
        assert p["requests"] == c and p["output_tokens"] == c * p["output_len"]
        assert p["output_tok_s"] > 0 and p["ttft_median_s"] >= 0 and p["preemptions"] == 0
        # where the time went: the slowest steps, with what they computed (the first one holds a prefill)
        slow = p["slowest_steps"]
        assert 1 <= len(slow) <= 3 and slow[0]["ms"] >= p["step_ms_median"] > 0
        assert sum(x["prefill_tokens"] for x in slow) <= c * p["input_len"]
        # kernel variants compiled inside the point (none here: on the CPU the reference ops run)
        assert p["kernel_variants_compiled"] == {}
    # the same budget holds more tokens in 4-bit: 64 / 20 bytes per vector at head_dim 32 (3.76x at 128)
    cap = {f: pts[("short", 1, f)]["kv_capacity_tokens"] for f in ("bf16", "saw_int4")}
    assert cap["saw_int4"] / cap["bf16"] == pytest.approx(64 / 20, rel=0.05)
    ratios = {(r["scenario"], r["concurrency"], r["kv_format"]): r for r in data["ratios"]}
    assert ratios[("short", 2, "bf16")]["x_vs_bf16"] == 1.0
    assert {p["kv_format"] for p in data["profiles"]} == {"bf16", "saw_int4"}
    assert (tmp_path / "serving_bench.png").is_file()
    assert "| short 12/5 | 2 | saw_int4 |" in (tmp_path / "serving_bench.md").read_text()
    assert "saw_int4 short c=2" in capsys.readouterr().out


def test_kernel_categories_and_bad_arguments():
    assert benchmark.kernel_category("_decode_mma_kernel") == "attention"
    assert benchmark.kernel_category("_append_kernel") == "attention"
    assert benchmark.kernel_category("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN") == "gemm"
    assert benchmark.kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert benchmark.kernel_category("void at::native::vectorized_elementwise_kernel<4>") == "other"
    with pytest.raises(SystemExit, match="--formats"):
        benchmark.main(["--arch", "tiny", "--device", "cpu", "--formats", "fp8"])
    with pytest.raises(SystemExit, match="--short-concurrency"):
        benchmark.main(["--arch", "tiny", "--device", "cpu", "--short-concurrency", "0"])
    with pytest.raises(SystemExit, match="--long-input \\+ --long-output = 17408 tokens"):
        benchmark.main(["--arch", "tiny", "--device", "cpu"])  # the real-size defaults on the tiny model
    with pytest.raises(ValueError, match="--arch"):
        benchmark.architecture("gpt-5")


def test_the_profiled_step_runs_the_replayed_steps_plan():
    """The profile's eager step runs on its graph bucket's plan (the schedule and kernel variants the replays
    use), not as an unpadded eager step whose schedule nothing may have compiled before."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_model
    from trtllm_sawint4.serving.api import SamplingParams
    from trtllm_sawint4.serving.engine import PagedEngine

    engine = PagedEngine(tiny_model("llama"), kv_format="saw_int4", tokens_per_block=8, num_blocks=40, max_batch=4,
                         decode_graphs="static", graph_batch_sizes=(4,))
    for i in range(3):
        engine.add_request(f"r{i}", [5 + i] * (3 + 4 * i), SamplingParams(max_tokens=12, ignore_eos=True))
    engine.step()
    while not all(s.remaining == 1 for s in engine.scheduler.running):  # until every sequence decodes
        engine.step()
    before = engine.counters["graph_steps"]
    profile, events = benchmark.profile_decode_step(engine, steps=2)
    assert profile["batch"] == 3 and len(events) == 3 * 3
    assert engine.counters["graph_steps"] - before == 3  # the two timed steps and the profiled one
    assert engine.graphs.last_plan.num_rows == 4  # the bucket's padded plan
    assert engine.graphs.replay  # restored

"""`sawint4 bench-serving`: serving throughput of the paged engine for bf16, int4 and saw_int4 KV caches.

The paper's setup (SAW-INT4, section "serving"), in process: one real-size architecture with random bf16
weights built on the device (Qwen3-8B's config by default; no checkpoint travels), one fixed KV-cache memory
budget for every format -- by default what an 80 GB GPU leaves after the weights (90% of 80 GiB, minus the
weights, minus 4 GiB for activations) -- so a 4-bit cache admits ~3.8x the tokens of a bf16 one. Requests
are random token ids (fixed seed, the same for every format), generate exactly their output length (EOS
ignored), and come from a closed loop of `concurrency` clients: each submits its next request when the
previous one finishes. For each scenario (long: 16k in / 1k out; short: 256 in / 1k out), concurrency and
format it reports output tokens/s, TTFT and TPOT (median, p90), the peak number of running sequences and
the ratios to bf16 measured in the same process; a profile of one steady decode step splits device time
into paged-cache attention kernels, GEMMs and the rest, next to the step's host time.

Runs on the CPU with `--arch tiny` (a CI-sized smoke test); on the GPU every point prints as it finishes
and the JSON under --out is rewritten after each one, so a run cut short by a time limit keeps its points.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1 << 30
FORMATS = ("bf16", "int4", "saw_int4")


# ---- the model ---------------------------------------------------------------------------------
def architecture(name: str):
    """A transformers config of a real architecture (or `tiny` for CPU smoke tests)."""
    import transformers as tf

    if name == "qwen3-8b":
        return tf.Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                              max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                              tie_word_embeddings=False)
    if name == "llama3.1-8b":
        return tf.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                              max_position_embeddings=131072, rope_theta=500_000.0, rms_norm_eps=1e-5,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    if name == "tiny":
        return tf.Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                              max_position_embeddings=4096, tie_word_embeddings=False)
    raise ValueError(f"--arch must be one of qwen3-8b, llama3.1-8b, tiny; got {name!r}")


def random_model(config, device, dtype):
    """The architecture with random weights, built directly on `device` (transformers' own initialisation)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def default_kv_budget(model) -> tuple[int, str]:
    """What an 80 GB GPU leaves for the KV cache after the weights (the paper's H100 setup)."""
    w = weight_bytes(model)
    budget = int(0.9 * 80 * GiB) - w - 4 * GiB
    return budget, (f"90% of an 80 GiB GPU minus {w / GiB:.1f} GiB of weights minus 4 GiB of activations "
                    f"= {budget / GiB:.1f} GiB")


# ---- one measurement ---------------------------------------------------------------------------
@dataclass
class _Req:
    submit: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_point(engine, prompts: list[list[int]], output_len: int, concurrency: int, on_steady=None) -> dict:
    """Closed loop: `concurrency` clients, len(prompts) requests in all; timings of every request.

    on_steady(engine) is called before steps in which every running request decodes; once it returns a list of
    events (the steps it ran itself, e.g. under a profiler) it is not called again, and the time it took is
    left out of every timing (its tokens count, stamped at its start)."""
    from .api import SamplingParams

    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    reqs: dict[str, _Req] = {}
    next_i = 0
    peak = 0
    steps = 0
    paused = 0.0  # time spent in on_steady, excluded from the timings
    step_times = []  # (seconds, prefill tokens, decode tokens, replayed graph) of every step: where time went
    clock = lambda: time.perf_counter() - paused  # noqa: E731
    t0 = clock()

    def submit():
        nonlocal next_i
        rid = f"q{next_i}"
        reqs[rid] = _Req(clock())
        engine.add_request(rid, prompts[next_i], params)
        next_i += 1

    def record(events, now):
        for e in events:
            r = reqs[e.request_id]
            if e.finish_reason in ("error", "abort"):
                raise RuntimeError(f"request {e.request_id} ended with {e.finish_reason}: {e.error}")
            if e.token_ids:
                r.first = r.first or now
                r.last = now
                r.tokens += len(e.token_ids)
            if e.finished and next_i < len(prompts):
                submit()

    for _ in range(min(concurrency, len(prompts))):
        submit()
    while engine.has_unfinished():
        running = engine.scheduler.running
        if on_steady is not None and running and all(s.remaining == 1 for s in running):
            start = time.perf_counter()
            extra = on_steady(engine)
            if extra is not None:
                on_steady = None
                now = clock()
                paused += time.perf_counter() - start
                record(extra, now)
                continue
        c = engine.counters
        before = (c["prefill_tokens"], c["decode_tokens"], c["graph_steps"])
        start = time.perf_counter()
        events = engine.step()
        step_times.append((time.perf_counter() - start, c["prefill_tokens"] - before[0],
                           c["decode_tokens"] - before[1], c["graph_steps"] - before[2]))
        steps += 1
        peak = max(peak, len(engine.scheduler.running))
        record(events, clock())
    wall = clock() - t0
    ttft = [r.first - r.submit for r in reqs.values()]
    tpot = [(r.last - r.first) / (r.tokens - 1) for r in reqs.values() if r.tokens > 1]
    out_tokens = sum(r.tokens for r in reqs.values())
    return dict(requests=len(reqs), output_tokens=out_tokens, wall_s=wall, steps=steps,
                output_tok_s=out_tokens / wall, total_tok_s=(out_tokens + sum(map(len, prompts))) / wall,
                ttft_median_s=statistics.median(ttft), ttft_p90_s=_percentile(ttft, 0.9),
                tpot_median_ms=1e3 * statistics.median(tpot) if tpot else float("nan"),
                tpot_p90_ms=1e3 * _percentile(tpot, 0.9), peak_running=peak, profiled_s=paused,
                step_ms_median=1e3 * statistics.median(t[0] for t in step_times) if step_times else float("nan"),
                slowest_steps=[dict(step=i, ms=1e3 * dt, prefill_tokens=pf, decode_tokens=dc, graph=bool(g))
                               for i, (dt, pf, dc, g) in sorted(enumerate(step_times), key=lambda x: -x[1][0])[:3]])


# ---- the step profile --------------------------------------------------------------------------
ATTENTION_KERNELS = ("_append_kernel", "_decode_kernel", "_decode_mma_kernel", "_reduce_kernel",
                     "_reduce_rotate_kernel", "_q_prep_kernel", "_prefill_kernel")
GEMM_MARKERS = ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "sm100_", "matmul")


def kernel_category(name: str) -> str:
    low = name.lower()
    if any(k in name for k in ATTENTION_KERNELS):
        return "attention"
    if any(m in low for m in GEMM_MARKERS):
        return "gemm"
    return "other"


def profile_decode_step(engine, steps: int = 3) -> tuple[dict, list]:
    """Device time per kernel category of a few steady decode steps, and their host wall time.

    The replayed step (CUDA graph, when the engine captures) gives the wall time; one more step runs eagerly on
    its bucket's plan under the profiler so that every kernel is attributed (graph replays are opaque to some
    profilers)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    batch = len(engine.scheduler.running)
    sync()
    t = time.perf_counter()
    events = []
    for _ in range(steps):
        events += engine.step()
    sync()
    step_ms = 1e3 * (time.perf_counter() - t) / steps
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    # the replayed step's own plan, run eagerly: the kernels (and variants) the graph replays, not an unpadded
    # step's (whose schedule may need a variant nothing compiled before)
    eager = engine.graphs.eager_replays() if engine.graphs is not None else contextlib.nullcontext()
    with eager, profile(activities=acts) as prof:
        events += engine.step()
        sync()
    from torch.autograd import DeviceType

    device_us = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
    per_kernel: dict[str, list] = {}  # name -> [launches, microseconds]
    for e in prof.events():  # device-side events only: kernels, copies, memsets
        if e.device_type != DeviceType.CPU:
            us = getattr(e, "device_time_total", None)
            us = us if us is not None else e.cuda_time_total
            device_us[kernel_category(e.name)] += us
            k = per_kernel.setdefault(e.name[:80], [0, 0.0])
            k[0], k[1] = k[0] + 1, k[1] + us
    total_ms = sum(device_us.values()) / 1e3
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:12]
    out = dict(batch=batch, replayed_step_ms=step_ms, eager_device_ms=total_ms,
               **{f"{k}_ms": v / 1e3 for k, v in device_us.items()},
               device_launches=sum(n for n, _ in per_kernel.values()),
               top_kernels=[dict(name=name, launches=n, ms=us / 1e3) for name, (n, us) in top])
    if total_ms > 0:
        out.update({f"{k}_frac": v / 1e3 / total_ms for k, v in device_us.items()})
        out["host_overhead_ms"] = max(0.0, step_ms - total_ms)
    return out, events


# ---- the whole benchmark -----------------------------------------------------------------------
@dataclass
class Scenario:
    name: str
    input_len: int
    output_len: int
    concurrency: list[int]
    requests_per_client: int = 1
    points: list = field(default_factory=list)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def _graph_widths(engine, input_len: int, output_len: int) -> list[int]:
    """Block-table width buckets a scenario's decode steps will use."""
    if engine.graphs is None:
        return []
    t = engine.spec.tokens_per_block
    widths = set()
    for length in range(input_len + 1, input_len + output_len + 1, t):
        widths.add(engine.graphs.width_bucket(-(-length // t)))
    widths.add(engine.graphs.width_bucket(-(-(input_len + output_len) // t)))
    return sorted(widths)


class _Report:
    def __init__(self, out_dir: Path, meta: dict):
        self.out_dir = out_dir
        self.meta = meta
        self.points: list[dict] = []
        self.profiles: list[dict] = []
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, point: dict) -> None:
        self.points.append(point)
        self.write()

    def write(self) -> None:
        data = dict(meta=self.meta, points=self.points, ratios=ratios(self.points), profiles=self.profiles)
        (self.out_dir / "serving_bench.json").write_text(json.dumps(data, indent=1))


def ratios(points: list[dict]) -> list[dict]:
    """Per (scenario, concurrency): each format's output tokens/s over bf16's and saw_int4's over int4's."""
    by = {(p["scenario"], p["concurrency"], p["kv_format"]): p for p in points}
    out = []
    for (sc, c, fmt), p in sorted(by.items()):
        base = by.get((sc, c, "bf16"))
        row = dict(scenario=sc, concurrency=c, kv_format=fmt)
        if base:
            row["x_vs_bf16"] = p["output_tok_s"] / base["output_tok_s"]
        if fmt == "saw_int4" and (sc, c, "int4") in by:
            row["x_vs_int4"] = p["output_tok_s"] / by[(sc, c, "int4")]["output_tok_s"]
        out.append(row)
    return out


def format_table(points: list[dict]) -> str:
    rs = {(r["scenario"], r["concurrency"], r["kv_format"]): r for r in ratios(points)}
    head = ("| scenario | conc. | format | out tok/s | x bf16 | TTFT med / p90 s | TPOT med / p90 ms | peak running "
            "| preempt. |")
    lines = [head, "|" + "---|" * 9]
    for p in points:
        r = rs.get((p["scenario"], p["concurrency"], p["kv_format"]), {})
        x = f"{r['x_vs_bf16']:.2f}" if "x_vs_bf16" in r else "-"
        lines.append(f"| {p['scenario']} {p['input_len']}/{p['output_len']} | {p['concurrency']} | {p['kv_format']} "
                     f"| {p['output_tok_s']:.1f} | {x} | {p['ttft_median_s']:.3f} / {p['ttft_p90_s']:.3f} "
                     f"| {p['tpot_median_ms']:.2f} / {p['tpot_p90_ms']:.2f} | {p['peak_running']} "
                     f"| {p['preemptions']} |")
    return "\n".join(lines)


def write_chart(points: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scenarios = list(dict.fromkeys(p["scenario"] for p in points))
    fig, axes = plt.subplots(3, len(scenarios), figsize=(5.5 * len(scenarios), 10), squeeze=False)
    for col, sc in enumerate(scenarios):
        for fmt in FORMATS:
            pts = sorted((p for p in points if p["scenario"] == sc and p["kv_format"] == fmt),
                         key=lambda p: p["concurrency"])
            if not pts:
                continue
            xs = [p["concurrency"] for p in pts]
            axes[0][col].plot(xs, [p["output_tok_s"] for p in pts], "o-", label=fmt)
            axes[1][col].plot(xs, [p["ttft_median_s"] for p in pts], "o-", label=fmt)
            axes[2][col].plot(xs, [p["tpot_median_ms"] for p in pts], "o-", label=fmt)
        p0 = next(p for p in points if p["scenario"] == sc)
        axes[0][col].set_title(f"{sc}: {p0['input_len']} in / {p0['output_len']} out")
        for row, label in enumerate(("output tokens/s", "TTFT median (s)", "TPOT median (ms)")):
            axes[row][col].set_ylabel(label)
            axes[row][col].set_xlabel("concurrency")
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].grid(alpha=0.3)
            axes[row][col].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def add_arguments(p) -> None:
    p.add_argument("--arch", default="qwen3-8b", help="qwen3-8b (default), llama3.1-8b, or tiny (CPU smoke test)")
    p.add_argument("--formats", default="bf16,saw_int4,int4",
                   help="KV formats in run order, comma-separated (default bf16,saw_int4,int4: the headline ratio "
                        "first, should a time limit cut the run short)")
    p.add_argument("--scenarios", default="long,short", help="long and/or short (default: both)")
    p.add_argument("--long-input", type=int, default=16384)
    p.add_argument("--long-output", type=int, default=1024)
    p.add_argument("--long-concurrency", default="64", help="comma-separated client counts (default 64)")
    p.add_argument("--short-input", type=int, default=256)
    p.add_argument("--short-output", type=int, default=1024)
    p.add_argument("--short-concurrency", default="1,16,64", help="comma-separated client counts")
    p.add_argument("--requests-per-client", type=int, default=1,
                   help="requests per client in each point (default 1: one request per client)")
    p.add_argument("--kv-budget-gib", type=float, default=None,
                   help="KV-cache memory budget shared by every format (default: what an 80 GB GPU leaves after "
                        "the weights)")
    p.add_argument("--max-step-tokens", type=int, default=8192, help="new tokens per engine step (chunked prefill)")
    p.add_argument("--tokens-per-block", type=int, default=64)
    p.add_argument("--no-graphs", action="store_true", help="run decode steps eagerly (no CUDA graphs)")
    p.add_argument("--no-profile", action="store_true", help="skip the one-step profile")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else ./serving_bench)")


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"sawint4 bench-serving: {name} must be comma-separated ints >= 1, got {text!r}")
    return values


def _warm_up(engine, scenarios, prompts, max_step_tokens: int) -> dict:
    """Launch every kernel variant and capture the decode graphs the scenarios will meet, outside the timed
    loops; one full-size prompt per scenario also grows the allocator to the largest step's activations."""
    from .api import SamplingParams

    widths = sorted({w for sc in scenarios for w in _graph_widths(engine, sc.input_len, sc.output_len)})
    warmed = engine.warm_up(decode_widths=widths or None)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for sc in scenarios:
        engine.generate([prompts[sc.name][0][:min(sc.input_len, max_step_tokens + 17)]], params)
    return warmed


def _bench_format(engine, scenarios, prompts, args, census, report, log) -> None:
    """Warm one format's engine up, then run every (scenario, concurrency) point on it into `report`."""
    fmt = engine.spec.kv_format
    t = time.perf_counter()
    capacity = (engine.cache.allocator.num_blocks - engine.reserved_blocks) * args.tokens_per_block
    longest = max(sc.input_len + sc.output_len for sc in scenarios)
    warmed = _warm_up(engine, scenarios, prompts, args.max_step_tokens)
    warm = time.perf_counter() - t
    compiled = census.snapshot()
    log(f"## {fmt}: {capacity} KV tokens in the budget ({capacity // longest} sequences of {longest}); "
        f"warm-up {warm:.1f} s ({warmed['steps']} steps at batches {warmed['batches']}, "
        f"{engine.graphs.num_captures if engine.graphs else 0} decode graphs)")
    for sc in scenarios:
        for conc in sc.concurrency:
            before = engine.stats()
            profile = None

            def on_steady(eng, _conc=conc):
                """Profile once the batch is as large as the pool lets it be."""
                nonlocal profile
                if len(eng.scheduler.running) < min(_conc, max(1, capacity // longest)):
                    return None
                profile, events = profile_decode_step(eng)
                return events

            res = run_point(engine, prompts[sc.name][:conc * sc.requests_per_client], sc.output_len, conc,
                            on_steady=None if args.no_profile or conc != max(sc.concurrency) else on_steady)
            after = engine.stats()
            missed = census.new_since(compiled)
            compiled = census.snapshot()
            steps = max(1, after["steps"] - before["steps"])
            host = {f"{k}_ms_per_step": 1e3 * (after[f"{k}_s"] - before[f"{k}_s"]) / steps
                    for k in ("schedule", "plan", "forward", "step")}
            report.add(dict(scenario=sc.name, input_len=sc.input_len, output_len=sc.output_len, concurrency=conc,
                            kv_format=fmt, kv_capacity_tokens=capacity, warmup_s=warm,
                            preemptions=after["num_preemptions"] - before["num_preemptions"],
                            graph_steps=after["graph_steps"] - before["graph_steps"],
                            kernel_variants_compiled={k: len(v) for k, v in missed.items()}, **host, **res))
            if profile is not None:
                report.profiles.append(dict(scenario=sc.name, concurrency=conc, kv_format=fmt, **profile))
                report.write()
            _log_point(log, sc, conc, fmt, res, host, missed, profile)


def _log_point(log, sc, conc: int, fmt: str, res: dict, host: dict, missed: dict, profile: dict | None) -> None:
    log(f"{sc.name} {sc.input_len}/{sc.output_len} c={conc} {fmt}: {res['output_tok_s']:.1f} out tok/s, TTFT "
        f"{res['ttft_median_s']:.3f}/{res['ttft_p90_s']:.3f} s, TPOT {res['tpot_median_ms']:.2f}/"
        f"{res['tpot_p90_ms']:.2f} ms, peak running {res['peak_running']}, {res['wall_s']:.1f} s; per step: "
        f"schedule {host['schedule_ms_per_step']:.2f} + plan {host['plan_ms_per_step']:.2f} + forward and "
        f"sampling {host['forward_ms_per_step']:.2f} ms")
    if res["slowest_steps"]:
        w = res["slowest_steps"][0]
        log(f"   slowest step #{w['step']}: {w['ms']:.1f} ms ({w['prefill_tokens']} prefill + "
            f"{w['decode_tokens']} decode tokens{', graph' if w['graph'] else ''}); median step "
            f"{res['step_ms_median']:.2f} ms")
    if missed:
        log("   compiled inside this point (a warm-up miss): " + ", ".join(f"{k} x{len(v)}" for k, v in missed.items()))
    if profile is not None and "attention_frac" in profile:
        log(f"   profile of a decode step at batch {profile['batch']}: replayed {profile['replayed_step_ms']:.2f} ms; "
            f"eager device {profile['eager_device_ms']:.2f} ms = attention {100 * profile['attention_frac']:.0f}% / "
            f"GEMM {100 * profile['gemm_frac']:.0f}% / other {100 * profile['other_frac']:.0f}%, "
            f"{profile['device_launches']} device launches")


def run(args) -> int:
    import torch

    from ..kernels.variants import VariantCensus
    from .engine import PagedEngine

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise SystemExit(f"sawint4 bench-serving: --formats takes {FORMATS}, got {args.formats!r}")
    scenarios = []
    for name in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
        if name not in ("long", "short"):
            raise SystemExit(f"sawint4 bench-serving: --scenarios takes long, short; got {name!r}")
        scenarios.append(Scenario(name, getattr(args, f"{name}_input"), getattr(args, f"{name}_output"),
                                  _ints(getattr(args, f"{name}_concurrency"), f"--{name}-concurrency"),
                                  args.requests_per_client))
    for sc in scenarios:
        if sc.input_len < 1 or sc.output_len < 1:
            raise SystemExit(f"sawint4 bench-serving: --{sc.name}-input/--{sc.name}-output must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":  # the smoke-test sizes: intra-op threads only add synchronisation
        torch.set_num_threads(1)
    out_dir = Path(args.out or os.environ.get("OUT") or "serving_bench")
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    t = time.perf_counter()
    config = architecture(args.arch)
    for sc in scenarios:  # before any model is built: the model's positions bound a request
        if sc.input_len + sc.output_len > config.max_position_embeddings:
            raise SystemExit(f"sawint4 bench-serving: --{sc.name}-input + --{sc.name}-output = "
                             f"{sc.input_len + sc.output_len} tokens, more than --arch {args.arch}'s "
                             f"{config.max_position_embeddings} positions")
    model = random_model(config, device, dtype)
    if args.kv_budget_gib is not None:
        budget, budget_note = int(args.kv_budget_gib * GiB), f"{args.kv_budget_gib} GiB (--kv-budget-gib)"
    elif args.arch == "tiny":
        budget, budget_note = 64 << 20, "64 MiB (the tiny smoke-test model's default)"
    else:
        budget, budget_note = default_kv_budget(model)
        if budget <= 0:
            raise SystemExit("sawint4 bench-serving: this model leaves no KV budget on an 80 GB GPU; "
                             "give --kv-budget-gib")
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if budget + 2 * GiB > free:
            raise SystemExit(f"sawint4 bench-serving: the KV budget ({budget / GiB:.1f} GiB) and 2 GiB of activations "
                             f"do not fit the {free / GiB:.1f} GiB left on {device} after the weights")
    max_conc = max(c for sc in scenarios for c in sc.concurrency)
    longest = max(sc.input_len + sc.output_len for sc in scenarios)
    meta = dict(arch=args.arch, device=str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
                torch=torch.__version__, dtype=str(dtype).removeprefix("torch."),
                weights_gib=weight_bytes(model) / GiB, kv_budget_bytes=budget, kv_budget=budget_note,
                tokens_per_block=args.tokens_per_block, max_step_tokens=args.max_step_tokens,
                cuda_graphs=not args.no_graphs and device.type == "cuda",
                admission="reserve_output (no preemption: a request starts only when prompt + max_tokens fits)",
                requests="random token ids (seeded, identical for every format), EOS ignored, closed loop of "
                         "`concurrency` clients", model_build_s=time.perf_counter() - t)
    report = _Report(out_dir, meta)
    log(f"# {args.arch} ({meta['weights_gib']:.1f} GiB of {meta['dtype']} weights, random) on {meta['device']}; "
        f"KV budget {budget_note}; built in {meta['model_build_s']:.1f} s")
    prompts = {sc.name: _prompts(max(sc.concurrency) * sc.requests_per_client, sc.input_len, config.vocab_size,
                                 args.seed + i) for i, sc in enumerate(scenarios)}

    # which kernel variants Triton compiles inside the timed points: each one stalls the step that meets it
    with VariantCensus() as census:
        for fmt in formats:
            engine = PagedEngine(model, kv_format=fmt, kv_cache_bytes=budget, max_batch=max_conc,
                                 max_step_tokens=args.max_step_tokens, tokens_per_block=args.tokens_per_block,
                                 max_seq_len=longest, prefix_sharing=False, reserve_output=True,
                                 decode_graphs="off" if args.no_graphs else "auto", seed=args.seed)
            _bench_format(engine, scenarios, prompts, args, census, report, log)
            del engine
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    table = format_table(report.points)
    (out_dir / "serving_bench.md").write_text(f"{budget_note}\n\n{table}\n")
    charted = write_chart(report.points, out_dir / "serving_bench.png")
    log("\n" + table)
    for r in ratios(report.points):
        if r["kv_format"] == "saw_int4":
            extra = f", {r['x_vs_int4']:.3f}x int4" if "x_vs_int4" in r else ""
            log(f"saw_int4 {r['scenario']} c={r['concurrency']}: {r.get('x_vs_bf16', float('nan')):.2f}x bf16{extra}")
    log(f"wrote {out_dir / 'serving_bench.json'}, serving_bench.md" + (", serving_bench.png" if charted else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="sawint4 bench-serving", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

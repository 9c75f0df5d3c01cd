"""One serving-benchmark point in process and then through `sawint4 serve`, to show what the server costs.

    python scripts/bench_triton_point.py [--arch qwen3-8b] [--kv-format saw_int4] [--input-len 256]
        [--output-len 256] [--concurrency 16] [--tritonserver-root DIR] [--stub-python PY] [--out DIR]

1. In process: the random-weight model of scripts/serve_random_engine.py, `benchmark.run_point` (a closed
   loop of `concurrency` clients, EOS ignored), then the model is freed.
2. Through the server: `sawint4 serve --engine scripts/serve_random_engine.py:build` with the same
   settings, and `concurrency` HTTP clients in a closed loop over generate_stream (input_ids, stream,
   ignore_eos), each timing its own tokens as they arrive.

Prints both rows and their ratio; writes <out>/triton_point.json. On the CPU, `--arch tiny --device cpu`
is a smoke test of the script itself (the numbers mean nothing there).
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))


def _percentile(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(reqs, wall) -> dict:
    """reqs: (submit, first, last, tokens) per request -> the bench-serving metrics."""
    ttft = [f - s for s, f, _, _ in reqs]
    tpot = [(last - f) / (n - 1) for _, f, last, n in reqs if n > 1]
    out = sum(n for *_, n in reqs)
    return dict(requests=len(reqs), output_tokens=out, wall_s=wall, output_tok_s=out / wall,
                ttft_median_s=statistics.median(ttft), ttft_p90_s=_percentile(ttft, 0.9),
                tpot_median_ms=1e3 * statistics.median(tpot), tpot_p90_ms=1e3 * _percentile(tpot, 0.9))


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def in_process(args, prompts) -> dict:
    import torch

    from serve_random_engine import build
    from trtllm_sawint4.serving.benchmark import run_point

    engine = build(kv_format=args.kv_format, max_batch=args.concurrency, device=args.device, arch=args.arch,
                   kv_budget_gib=args.kv_budget_gib, max_seq_len=args.input_len + args.output_len)
    res = run_point(engine, prompts, args.output_len, args.concurrency)
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def _stream(port, prompt, output_len, timeout=600):
    """One request over generate_stream: (submit, first token, last token, tokens)."""
    body = json.dumps({"input_ids": prompt, "max_tokens": output_len, "ignore_eos": True, "stream": True})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    submit, first, last, n = time.perf_counter(), None, None, 0
    try:
        c.request("POST", "/v2/models/sawint4/generate_stream", body=body, headers={"Connection": "close"})
        for line in c.getresponse():
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            ids = event.get("output_ids", [])
            k = len(ids) if isinstance(ids, list) else 1
            if k:
                now = time.perf_counter()
                first, last, n = first or now, now, n + k
    finally:
        c.close()
    return submit, first, last, n


def through_server(args, prompts) -> tuple[dict, float]:
    http_port, grpc_port, metrics_port = _free_ports(3)
    out = Path(args.out)
    cmd = [sys.executable, "-m", "trtllm_sawint4.cli", "serve", "--engine", f"{HERE / 'serve_random_engine.py'}:build",
           "--kv-format", args.kv_format, "--max-batch", str(args.concurrency), "--http-port", str(http_port),
           "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--quiet",
           "--startup-timeout", str(args.startup_timeout), "--work-dir", str(out / "serve_work"),
           "--stats-file", str(out / "serve_stats.json"),
           "--engine-option", f"arch={args.arch}", "--engine-option", f"max_seq_len={args.input_len + args.output_len}"]
    if args.kv_budget_gib is not None:
        cmd += ["--engine-option", f"kv_budget_gib={args.kv_budget_gib}"]
    for flag in ("device", "tritonserver_root", "stub_python"):
        if getattr(args, flag):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    log = open(out / "serve.log", "wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        while b"sawint4 serve: ready" not in (out / "serve.log").read_bytes():
            if proc.poll() is not None:
                raise SystemExit(f"sawint4 serve exited with {proc.returncode}:\n"
                                 f"{(out / 'serve.log').read_text(errors='replace')[-4000:]}")
            if time.perf_counter() - t0 > args.startup_timeout + 30:
                raise SystemExit("sawint4 serve did not get ready")
            time.sleep(0.5)
        ready_s = time.perf_counter() - t0
        queue = list(enumerate(prompts))
        lock, results = threading.Lock(), {}

        def client():
            while True:
                with lock:
                    if not queue:
                        return
                    i, prompt = queue.pop(0)
                results[i] = _stream(http_port, prompt, args.output_len)

        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        if len(results) != len(prompts):
            raise SystemExit(f"only {len(results)} of {len(prompts)} requests finished")
        return summarize(list(results.values()), wall), ready_s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                print(f"sawint4 serve stopped with status {proc.wait(120)}", flush=True)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="qwen3-8b")
    p.add_argument("--kv-format", default="saw_int4")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, default=1)
    p.add_argument("--kv-budget-gib", type=float, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--startup-timeout", type=float, default=400)
    p.add_argument("--tritonserver-root", default=None)
    p.add_argument("--stub-python", default=None)
    p.add_argument("--skip-in-process", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT") or "triton_point")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from trtllm_sawint4.serving.benchmark import architecture

    vocab = architecture(args.arch).vocab_size
    rng = random.Random(0)
    n = args.concurrency * args.requests_per_client
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(n)]
    rows = {}
    if not args.skip_in_process:
        rows["in process"] = in_process(args, prompts)
        print(f"in process: {json.dumps(rows['in process'])}", flush=True)
    rows["through the server"], ready_s = through_server(args, prompts)
    print(f"through the server (ready after {ready_s:.1f}s): {json.dumps(rows['through the server'])}", flush=True)
    head = f"{args.arch} {args.kv_format} {args.input_len} in / {args.output_len} out, concurrency {args.concurrency}"
    print(f"\n{head}\n| path | out tok/s | TTFT median / p90 (s) | TPOT median / p90 (ms) |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['output_tok_s']:.1f} | {r['ttft_median_s']:.3f} / {r['ttft_p90_s']:.3f} | "
              f"{r['tpot_median_ms']:.2f} / {r['tpot_p90_ms']:.2f} |")
    if len(rows) == 2:
        ratio = rows["through the server"]["output_tok_s"] / rows["in process"]["output_tok_s"]
        print(f"server / in process output tok/s: {ratio:.3f}")
    (Path(args.out) / "triton_point.json").write_text(json.dumps(dict(setup=vars(args), ready_s=ready_s, **rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

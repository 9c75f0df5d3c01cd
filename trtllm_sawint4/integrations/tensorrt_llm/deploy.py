"""What a TensorRT-LLM user deploys: the ``LLM(...)`` arguments, a trtllm-serve options file, a Triton
``llmapi``-style model repository, and the ``.pth`` worker hook.

All of it is generated text; none of it needs TensorRT-LLM here. The LLM arguments are AutoDeploy's
(``tensorrt_llm._torch.auto_deploy.llm_args.LlmArgs``): the backend is chosen with
``transforms: {insert_cached_attention: {backend: <name>}}`` and the pool is sized by
``kv_cache_config.free_gpu_memory_fraction``. Block reuse is turned off in what we generate: our pools
are indexed by the same block ids as TensorRT-LLM's block manager, and AutoDeploy turns off
copy-on-partial-reuse for such pools, so reuse should be consistent, but that is not verified.
"""

from __future__ import annotations

import os
import sysconfig
from importlib import resources
from pathlib import Path

from ...spec import TOKENS_PER_BLOCK
from . import BACKENDS

PTH_NAME = "trtllm_sawint4_autoregister.pth"
SERVE_FILE = "sawint4_autodeploy.yaml"


def llm_kwargs(model: str, backend: str = "saw_int4", free_gpu_memory_fraction: float = 0.8,
               tokens_per_block: int = 64, max_seq_len: int | None = None, max_batch_size: int | None = None,
               max_num_tokens: int | None = None) -> dict:
    """Keyword arguments of AutoDeploy's ``LLM`` that select `backend` (dicts and scalars only)."""
    if not isinstance(model, str) or not model:
        raise ValueError("model: a Hugging Face model id or a local checkpoint directory is required")
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {sorted(BACKENDS)}, got {backend!r}")
    if not 0.0 < free_gpu_memory_fraction <= 1.0:
        raise ValueError(f"free_gpu_memory_fraction: must be in (0, 1], got {free_gpu_memory_fraction}")
    if tokens_per_block not in TOKENS_PER_BLOCK:
        raise ValueError(f"tokens_per_block: must be one of {TOKENS_PER_BLOCK}, got {tokens_per_block}")
    kwargs: dict = {"model": model}
    for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size),
                        ("max_num_tokens", max_num_tokens)):
        if value is not None:
            if value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
            kwargs[name] = int(value)
    kwargs["transforms"] = {"insert_cached_attention": {"backend": backend}}
    kwargs["kv_cache_config"] = {"free_gpu_memory_fraction": float(free_gpu_memory_fraction),
                                 "tokens_per_block": int(tokens_per_block), "enable_block_reuse": False}
    return kwargs


def llm_snippet(kwargs: dict) -> str:
    """Python that registers the backends and builds AutoDeploy's LLM with `kwargs`."""
    kv = kwargs["kv_cache_config"]
    args = [f"    model={kwargs['model']!r},"]
    args += [f"    {k}={kwargs[k]!r}," for k in ("max_seq_len", "max_batch_size", "max_num_tokens") if k in kwargs]
    args.append(f"    transforms={kwargs['transforms']!r},")
    args.append("    kv_cache_config=KvCacheConfig(" + ", ".join(f"{k}={v!r}" for k, v in kv.items()) + "),")
    return "\n".join([
        "import trtllm_sawint4.integrations.tensorrt_llm as sawint4_trtllm",
        "",
        "sawint4_trtllm.register()  # this process; worker processes: run `sawint4 trtllm install-hook` once",
        "",
        "from tensorrt_llm import SamplingParams",
        "from tensorrt_llm._torch.auto_deploy import LLM  # AutoDeploy's LLM (backend='_autodeploy')",
        "from tensorrt_llm.llmapi import KvCacheConfig",
        "",
        "llm = LLM(",
        *args,
        ")",
        "print(llm.generate(['The capital of France is'], SamplingParams(max_tokens=16))[0].outputs[0].text)",
        "",
    ])


def _yaml_scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_yaml(data: dict, indent: int = 0) -> str:
    """Block YAML of nested dicts of scalars (what this module generates; no dependency on PyYAML)."""
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(" " * indent + f"{key}:")
            lines.append(to_yaml(value, indent + 2).rstrip("\n"))
        else:
            lines.append(" " * indent + f"{key}: {_yaml_scalar(value)}")
    return "\n".join(lines) + "\n"


def serve_options(kwargs: dict) -> dict:
    """The ``--extra_llm_api_options`` file of trtllm-serve: every LLM argument but the model."""
    return {k: v for k, v in kwargs.items() if k != "model"}


def serve_command(kwargs: dict, options_file: str = SERVE_FILE) -> str:
    return f"trtllm-serve {kwargs['model']} --backend _autodeploy --extra_llm_api_options {options_file}"


def serve_yaml(kwargs: dict) -> str:
    return ("# trtllm-serve --extra_llm_api_options file for the saw_int4 KV cache (AutoDeploy backend).\n"
            f"# {serve_command(kwargs)}\n" + to_yaml(serve_options(kwargs)))


# ---- Triton llmapi-style model repository ------------------------------------------------------------
_CONFIG_PBTXT = """\
# Triton model for TensorRT-LLM's AutoDeploy LLM with the saw_int4 KV cache (written by `sawint4 trtllm
# triton-repo`). max_batch_size and decoupled come from triton_config in 1/model.yaml (auto-completed by
# model.py), as in TensorRT-LLM's triton_backend/all_models/llmapi model, whose input and output names
# these are a subset of. The Python model runs on the CPU; TensorRT-LLM's workers use the GPUs.
name: "{name}"
backend: "python"

instance_group [ {{ count: 1, kind: KIND_CPU }} ]

input [
  {{ name: "text_input", data_type: TYPE_STRING, dims: [ -1 ] }},
  {{ name: "streaming", data_type: TYPE_BOOL, dims: [ 1 ], optional: true }},
  {{ name: "sampling_param_max_tokens", data_type: TYPE_INT32, dims: [ 1 ], optional: true }},
  {{ name: "sampling_param_temperature", data_type: TYPE_FP32, dims: [ 1 ], optional: true }},
  {{ name: "sampling_param_top_p", data_type: TYPE_FP32, dims: [ 1 ], optional: true }},
  {{ name: "sampling_param_top_k", data_type: TYPE_INT32, dims: [ 1 ], optional: true }},
  {{ name: "sampling_param_seed", data_type: TYPE_UINT64, dims: [ 1 ], optional: true }},
  {{ name: "sampling_param_stop", data_type: TYPE_STRING, dims: [ -1 ], optional: true }},
  {{ name: "return_finish_reason", data_type: TYPE_BOOL, dims: [ 1 ], optional: true }}
]
output [
  {{ name: "text_output", data_type: TYPE_STRING, dims: [ -1 ] }},
  {{ name: "finish_reason", data_type: TYPE_STRING, dims: [ -1 ] }}
]
"""


def triton_model_yaml(kwargs: dict, decoupled: bool = True) -> str:
    data = {"model": kwargs["model"], "backend": "_autodeploy", **serve_options(kwargs),
            "triton_config": {"max_batch_size": 0, "decoupled": bool(decoupled)}}
    return ("# LLM() arguments of TensorRT-LLM's AutoDeploy backend (plus triton_config), read by model.py.\n"
            + to_yaml(data))


def triton_model_source() -> str:
    return resources.files(__package__).joinpath("triton_model.py").read_text()


def write_triton_repo(out_dir: str | os.PathLike, kwargs: dict, model_name: str = "tensorrt_llm",
                      decoupled: bool = True) -> list[Path]:
    """Write <out_dir>/<model_name>/{config.pbtxt, 1/model.py, 1/model.yaml}; returns the paths."""
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise ValueError(f"model_name: must be a plain directory name, got {model_name!r}")
    root = Path(out_dir) / model_name
    (root / "1").mkdir(parents=True, exist_ok=True)
    files = {root / "config.pbtxt": _CONFIG_PBTXT.format(name=model_name),
             root / "1" / "model.py": triton_model_source(),
             root / "1" / "model.yaml": triton_model_yaml(kwargs, decoupled)}
    for path, text in files.items():
        path.write_text(text)
    return list(files)


# ---- worker hook ---------------------------------------------------------------------------------------
def autoload_path() -> Path:
    return Path(__file__).with_name("autoload.py").resolve()


def pth_line(autoload_file: str | os.PathLike | None = None) -> str:
    """One .pth line: load autoload.py by path (no package import at startup) and arm it; a missing file
    (package removed) does nothing."""
    path = str(autoload_file or autoload_path())
    return ("import os, importlib.util as _u; "
            f"_p = {path!r}; "
            "_s = _u.spec_from_file_location('trtllm_sawint4_autoload', _p) if os.path.isfile(_p) else None; "
            "_m = _s and _u.module_from_spec(_s); "
            "_s and (_s.loader.exec_module(_m), _m.arm())\n")


def default_site_dir() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def install_hook(site_dir: str | os.PathLike | None = None) -> Path:
    """Write the .pth file into `site_dir` (default: this interpreter's site-packages); idempotent."""
    site = Path(site_dir) if site_dir is not None else default_site_dir()
    if not site.is_dir():
        raise ValueError(f"site_dir: {site} is not a directory")
    path = site / PTH_NAME
    path.write_text("# trtllm-sawint4: register the saw_int4 AutoDeploy backends in every process "
                    "(sawint4 trtllm install-hook)\n" + pth_line())
    return path


def uninstall_hook(site_dir: str | os.PathLike | None = None) -> Path | None:
    path = (Path(site_dir) if site_dir is not None else default_site_dir()) / PTH_NAME
    if path.exists():
        path.unlink()
        return path
    return None


def hook_installed(site_dir: str | os.PathLike | None = None) -> bool:
    path = (Path(site_dir) if site_dir is not None else default_site_dir()) / PTH_NAME
    return path.is_file() and pth_line() in path.read_text()

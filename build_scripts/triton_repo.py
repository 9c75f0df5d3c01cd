"""Triton Inference Server model repository for a saw_int4 TensorRT engine.

    <repo>/<model>/config.pbtxt        platform "tensorrt_plan", every engine input/output with its
                                       Triton dtype and dims (-1 where dynamic), max_batch_size 0
                                       (the engine's batch dimensions are explicit)
    <repo>/<model>/<version>/model.plan  the engine (copied), or absent until you copy it there

`parse_pbtxt` reads protobuf text format (the subset Triton configs use) back into dicts, so the
generated file is checked without tritonclient.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

#: numpy dtype name -> Triton data_type
TRITON_DTYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32",
    "int64": "TYPE_INT64", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
}


@dataclass
class IOTensor:
    name: str
    dtype: str  # numpy dtype name
    dims: list  # ints, -1 or symbolic names (str) for dynamic


def _dims(dims) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in dims]


def _io_block(kind: str, tensors: list[IOTensor]) -> str:
    entries = []
    for t in tensors:
        if t.dtype not in TRITON_DTYPES:
            raise ValueError(f"{kind} {t.name!r}: dtype {t.dtype} has no Triton data type")
        dims = ", ".join(str(d) for d in _dims(t.dims))
        entries.append(f'  {{\n    name: "{t.name}"\n    data_type: {TRITON_DTYPES[t.dtype]}\n    dims: [ {dims} ]\n  }}')
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def config_pbtxt(model_name: str, inputs: list[IOTensor], outputs: list[IOTensor], *, instance_count: int = 1,
                 default_model_filename: str = "model.plan") -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", model_name):
        raise ValueError(f"model name {model_name!r}: use letters, digits, '_', '-', '.'")
    return (
        f'name: "{model_name}"\n'
        f'platform: "tensorrt_plan"\n'
        f'backend: "tensorrt"\n'
        f"max_batch_size: 0\n"
        f'default_model_filename: "{default_model_filename}"\n'
        + _io_block("input", inputs)
        + _io_block("output", outputs)
        + f"instance_group [\n  {{\n    kind: KIND_GPU\n    count: {instance_count}\n  }}\n]\n"
    )


def write_repository(repo_dir, model_name: str, inputs: list[IOTensor], outputs: list[IOTensor], *,
                     engine_path=None, version: int = 1, instance_count: int = 1) -> Path:
    """Write <repo_dir>/<model_name>/{config.pbtxt, <version>/[model.plan]}; returns the model folder."""
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    model_dir = Path(repo_dir) / model_name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(model_name, inputs, outputs, instance_count=instance_count))
    if engine_path is not None:
        shutil.copyfile(engine_path, model_dir / str(version) / "model.plan")
    return model_dir


def io_from_onnx(model) -> tuple[list[IOTensor], list[IOTensor]]:
    """Graph inputs/outputs of an ONNX model (TensorRT keeps their names, dtypes and ranks)."""
    from onnx import helper

    def conv(vi):
        tt = vi.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        if tt.elem_type == 16:  # BFLOAT16 (numpy has no bfloat16)
            dtype = "bfloat16"
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or -1) for d in tt.shape.dim]
        return IOTensor(vi.name, dtype, dims)

    inits = {i.name for i in model.graph.initializer}
    return [conv(v) for v in model.graph.input if v.name not in inits], [conv(v) for v in model.graph.output]


# ---- protobuf text format, the subset Triton configs use -------------------------------------------
_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([A-Za-z_][A-Za-z0-9_.]*)|(-?[0-9][0-9.eE+\-]*)|([{}\[\]:,<>]))')


def _tokens(text: str):
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"pbtxt: cannot parse at offset {pos}: {text[pos:pos + 20]!r}")
        pos = m.end()
        comment, string, ident, number, punct = m.groups()
        if comment:
            continue
        if string is not None:
            yield ("str", bytes(string[1:-1], "utf-8").decode("unicode_escape"))
        elif ident is not None:
            yield ("id", ident)
        elif number is not None:
            yield ("num", float(number) if any(c in number for c in ".eE") else int(number))
        else:
            yield ("p", punct)


def parse_pbtxt(text: str) -> dict:
    """Parse text-format protobuf into {field: value or [values]} (repeated fields become lists)."""
    toks = list(_tokens(text))
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else (None, None)

    def take(kind=None, value=None):
        nonlocal pos
        tok = peek()
        if tok[0] is None or (kind and tok[0] != kind) or (value is not None and tok[1] != value):
            raise ValueError(f"pbtxt: expected {value or kind}, got {tok[1]!r}")
        pos += 1
        return tok

    def scalar():
        kind, v = take()
        if kind == "p":
            raise ValueError(f"pbtxt: unexpected {v!r}")
        return v

    def message(end):
        out: dict = {}
        while peek()[1] != end:
            if end is None and peek()[0] is None:
                break
            _, name = take("id")
            if peek()[1] == ":":
                take("p", ":")
            if peek()[1] in ("{", "<"):
                value = message("}" if take()[1] == "{" else ">")
                take()
            elif peek()[1] == "[":
                take("p", "[")
                value = []
                while peek()[1] != "]":
                    if peek()[1] == "{":
                        take()
                        value.append(message("}"))
                        take("p", "}")
                    else:
                        value.append(scalar())
                    if peek()[1] == ",":
                        take()
                take("p", "]")
            else:
                value = scalar()
            if name in out:
                prev = out[name] if isinstance(out[name], list) else [out[name]]
                out[name] = prev + (value if isinstance(value, list) else [value])
            else:
                out[name] = value
            if peek()[1] in (",", ";"):
                take()
        return out

    return message(None)

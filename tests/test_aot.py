"""`sawint4 aot` on a CPU-only machine: artifacts, manifest, and agreement with the plugin contract."""

import json
import re

import pytest
import triton
import triton.language as tl

from trtllm_sawint4.build_scripts.aot import AotKernel, AotParam, load_manifest, write_artifacts
from trtllm_sawint4.kernels.aot import model_kernels
from trtllm_sawint4.plugins import contract

from helpers import run_sawint4

POINTER_DTYPES = {"*bf16": "bfloat16", "*fp16": "float16", "*fp32": "float32", "*u8": "uint8", "*i32": "int32"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    run_sawint4("aot", "--out", str(out), "--targets", "sm_90", "--head-dim", "64", "--num-heads", "8",
                "--num-kv-heads", "2", "--tokens-per-block", "16", cwd=out)
    return out


def test_manifest_describes_every_kernel(artifacts):
    manifest = load_manifest(artifacts)
    assert manifest["triton_version"] == triton.__version__  # the Triton that built it, whichever is installed
    assert {k["op"] for k in manifest["kernels"]} == {"append", "decode", "prefill"}
    for k in manifest["kernels"]:
        cubin = (artifacts / k["cubin"]).read_bytes()
        assert cubin[:4] == b"\x7fELF"  # a real device binary
        ptx = (artifacts / k["ptx"]).read_text()
        assert f".entry {k['kernel_name']}" in ptx
        # TensorRT order: inputs, integer scalars, outputs, and nothing else (scratch pointers stripped)
        kinds = [p["kind"] for p in k["params"]]
        assert kinds == sorted(kinds, key=["input", "scalar", "output"].index)
        assert all(p["type"] in ("i32", "i64") for p in k["params"] if p["kind"] == "scalar")
        entry_params = re.findall(rf"{k['kernel_name']}_param_(\d+)", ptx)
        assert len(set(entry_params)) == len(k["params"]) and k["trailing_scratch_params"] == 0
        assert k["block"] == [k["num_warps"] * 32, 1, 1] and len(k["grid"]) == 3


def test_kernel_inputs_follow_the_plugin_contract(artifacts):
    manifest = load_manifest(artifacts)
    for k in manifest["kernels"]:
        op = contract.op_def(k["op"])
        inputs = [p for p in k["params"] if p["kind"] == "input"]
        assert [p["name"] for p in inputs] == op.input_names
        for p, arg in zip(inputs, op.inputs):
            want = "bfloat16" if arg.dtype == "act" else arg.dtype
            assert POINTER_DTYPES[p["type"]] == want, (k["op"], p["name"])
        outputs = [p for p in k["params"] if p["kind"] == "output"]
        assert [p["name"] for p in outputs] == [o.name for o in op.outputs]
        for out_i, in_i in op.aliases.items():
            assert outputs[out_i]["alias"] == op.input_names[in_i]


def test_manifest_is_json_with_model(artifacts):
    data = json.loads((artifacts / "manifest.json").read_text())
    assert data["model"]["head_dim"] == 64 and data["model"]["kv_format"] == "saw_int4"


def test_bad_aot_descriptions_are_rejected():
    k = model_kernels(64, 8, 2, 16, "saw_int4", False, False, "bf16", 0.125)[0]
    swapped = AotKernel(k.op, k.fn, [k.params[-1]] + k.params[:-1], k.constexprs, k.grid)
    with pytest.raises(ValueError, match="order"):
        swapped.check()
    floaty = AotKernel(k.op, k.fn, k.params[:-2] + [AotParam("num_tokens", "scalar", "fp32", value="1"),
                                                      k.params[-1]], k.constexprs, k.grid)
    with pytest.raises(ValueError, match="integers"):
        floaty.check()
    with pytest.raises(ValueError, match="not inputs"):
        AotKernel(k.op, k.fn, k.params, k.constexprs, ("cdiv(nope.shape[0], 4)", "1", "1")).check()
    with pytest.raises(ValueError, match="target"):
        write_artifacts([k], ["sm_70"], "unused", {})
    with pytest.raises(ValueError, match="rotate_v"):
        model_kernels(64, 8, 2, 16, "saw_int4", True, False, "bf16", 0.125)

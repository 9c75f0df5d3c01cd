"""`sawint4 build` without TensorRT: the Triton model repository, the optimization profiles, and the
exact message when TensorRT is missing."""

from __future__ import annotations

import sys

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx_graphsurgeon")

from onnx import TensorProto as TP  # noqa: E402
from onnx import helper as oh  # noqa: E402

from trtllm_sawint4.build_scripts import build, insert, triton_repo  # noqa: E402
from trtllm_sawint4.cli import main  # noqa: E402


def _attention_model():
    f = lambda n, s: oh.make_tensor_value_info(n, TP.FLOAT, s)  # noqa: E731
    ins = [f("q", ["batch", 4, "seq", 32]), f("k", ["batch", 2, "seq", 32]), f("v", ["batch", 2, "seq", 32])]
    node = oh.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=1)
    g = oh.make_graph([node], "g", ins, [f("y", ["batch", 4, "seq", 32])])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 23)])


@pytest.fixture
def rewritten(tmp_path):
    src = tmp_path / "attn.onnx"
    onnx.save(_attention_model(), str(src))
    out = tmp_path / "attn_saw.onnx"
    insert.insert_file(src, out, insert.InsertOptions(kv_format="saw_int4", tokens_per_block=16))
    return out


def test_triton_only_repository(rewritten, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["build", str(rewritten), "--triton-only", "--triton-repo", str(repo), "--model-name", "llm"]) == 0
    assert (repo / "llm" / "1").is_dir()
    cfg = triton_repo.parse_pbtxt((repo / "llm" / "config.pbtxt").read_text())
    assert cfg["name"] == "llm" and cfg["platform"] == "tensorrt_plan" and cfg["backend"] == "tensorrt"
    assert cfg["max_batch_size"] == 0 and cfg["default_model_filename"] == "model.plan"
    ins = {t["name"]: t for t in cfg["input"]}
    outs = {t["name"]: t for t in cfg["output"]}
    assert list(ins) == ["q", "k", "v", "block_table", "seq_lens", "slot_mapping", "query_start_loc", "kv_pool_0"]
    assert ins["q"] == {"name": "q", "data_type": "TYPE_FP32", "dims": [-1, 4, -1, 32]}
    assert ins["block_table"]["data_type"] == "TYPE_INT32" and ins["block_table"]["dims"] == [-1, -1]
    assert ins["slot_mapping"]["dims"] == [-1]
    assert ins["kv_pool_0"] == {"name": "kv_pool_0", "data_type": "TYPE_UINT8", "dims": [-1, 2, 2, 320]}
    assert list(outs) == ["y", "kv_pool_0_out"]
    assert outs["kv_pool_0_out"]["data_type"] == "TYPE_UINT8"
    assert cfg["instance_group"] == [{"kind": "KIND_GPU", "count": 1}]
    err = capsys.readouterr().err
    assert "aot=0" in err  # JIT plugins cannot run inside Triton's tensorrt backend


def test_repository_with_engine_file(tmp_path):
    engine = tmp_path / "e.plan"
    engine.write_bytes(b"not really an engine")
    io = [triton_repo.IOTensor("x", "bfloat16", ["n", 8])]
    folder = triton_repo.write_repository(tmp_path / "r", "m", io, io, engine_path=engine, version=3)
    assert (folder / "3" / "model.plan").read_bytes() == engine.read_bytes()
    cfg = triton_repo.parse_pbtxt((folder / "config.pbtxt").read_text())
    assert cfg["input"] == [{"name": "x", "data_type": "TYPE_BF16", "dims": [-1, 8]}]
    with pytest.raises(ValueError, match="model name"):
        triton_repo.config_pbtxt("bad name", io, io)
    with pytest.raises(ValueError, match="no Triton data type"):
        triton_repo.config_pbtxt("m", [triton_repo.IOTensor("s", "str", [1])], io)


def test_parse_pbtxt_subset():
    text = """
    # comment
    name: "a\\"b"
    max_batch_size: 8
    dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
    input [ { name: "x" dims: [ -1 ] }, { name: "y" dims: [ 2, 3 ] } ]
    parameters { key: "k" value: { string_value: "v" } }
    parameters { key: "k2" value: { string_value: "v2" } }
    """
    cfg = triton_repo.parse_pbtxt(text)
    assert cfg["name"] == 'a"b' and cfg["max_batch_size"] == 8
    assert cfg["dynamic_batching"] == {"preferred_batch_size": [4, 8], "max_queue_delay_microseconds": 100}
    assert [i["dims"] for i in cfg["input"]] == [[-1], [2, 3]]
    assert [p["key"] for p in cfg["parameters"]] == ["k", "k2"]
    with pytest.raises(ValueError):
        triton_repo.parse_pbtxt("name: {")


def test_missing_tensorrt_exact_message(rewritten, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["build", str(rewritten)]) == build.EXIT_NO_TENSORRT
    err = capsys.readouterr().err
    assert err.startswith("sawint4 build: TensorRT is not available here: ")
    assert "missing package `tensorrt`" in err and "TensorRT >= 10.9" in err and "--triton-only" in err
    assert not rewritten.with_suffix(".plan").exists()


def test_aot_nodes_need_a_manifest(tmp_path, capsys):
    src = tmp_path / "attn.onnx"
    onnx.save(_attention_model(), str(src))
    out = tmp_path / "aot.onnx"
    insert.insert_file(src, out, insert.InsertOptions(aot=True))
    assert build.plugin_nodes(onnx.load(str(out))) == {"count": 2, "aot": {1}}
    assert main(["build", str(out)]) == 2
    assert "--aot-manifest" in capsys.readouterr().err


def test_profiles(rewritten):
    ins, _ = triton_repo.io_from_onnx(onnx.load(str(rewritten)))
    limits = build.Limits(max_tokens=512, opt_tokens=64, max_seqs=8, max_blocks_per_seq=32, num_blocks=100)
    prof = build.profile_shapes(ins, build.dim_ranges(limits))
    assert prof["q"] == ((1, 4, 1, 32), (1, 4, 64, 32), (8, 4, 512, 32))
    assert prof["kv_pool_0"] == ((100, 2, 2, 320),) * 3
    assert prof["query_start_loc"] == ((2,), (2,), (9,))
    assert prof["block_table"] == ((1, 1), (1, 8), (8, 32))
    over = dict([build.parse_profile_arg("num_blocks=10:20:30"), build.parse_profile_arg("q=1x4x1x32:1x4x2x32:2x4x8x32")])
    prof = build.profile_shapes(ins, build.dim_ranges(limits), over)
    assert prof["kv_pool_0"] == ((10, 2, 2, 320), (20, 2, 2, 320), (30, 2, 2, 320))
    assert prof["q"] == ((1, 4, 1, 32), (1, 4, 2, 32), (2, 4, 8, 32))
    odd = [triton_repo.IOTensor("z", "float32", ["mystery", 3])]
    with pytest.raises(ValueError, match="--profile mystery=MIN:OPT:MAX"):
        build.profile_shapes(odd, build.dim_ranges(limits))
    with pytest.raises(ValueError, match="expected NAME=MIN:OPT:MAX"):
        build.parse_profile_arg("seq=1:2")


def test_aot_limits_are_checked_against_the_profile(tmp_path, capsys, monkeypatch):
    import json

    from trtllm_sawint4.plugins import aot

    src = tmp_path / "attn.onnx"
    onnx.save(_attention_model(), str(src))
    out = tmp_path / "aot.onnx"
    insert.insert_file(src, out, insert.InsertOptions(aot=True))
    folder = tmp_path / "kernels"
    folder.mkdir()
    entry = dict(target="sm_90", kernel_name="k", cubin="k.cubin", params=[], grid=["1", "1", "1"], block=[128, 1, 1],
                 shared_bytes=0)
    kernels = [dict(entry, op="append"), dict(entry, op="prefill", limits={"block_table.shape[0]": 16})]
    (folder / "manifest.json").write_text(json.dumps({"format": aot.MANIFEST_FORMAT, "model": {}, "kernels": kernels}))
    assert main(["build", str(out), "--aot-manifest", str(folder), "--max-seqs", "64"]) == 2
    assert "block_table.shape[0] can reach 64 but the AOT kernel covers at most 16" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # within the limits: on to TensorRT (missing here)
    assert main(["build", str(out), "--aot-manifest", str(folder), "--max-seqs", "16"]) == build.EXIT_NO_TENSORRT

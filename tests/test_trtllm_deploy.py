"""`sawint4 trtllm`: the generated LLM(...) call, trtllm-serve YAML and Triton llmapi-style repository,
and the generated Triton model.py run against FAKE triton_python_backend_utils and tensorrt_llm modules
(tests/fakes: they follow the documented interfaces of Triton's Python backend and of TensorRT-LLM 1.3;
they are not those projects)."""

from __future__ import annotations

import importlib.util
import uuid

import numpy as np
import pytest
import yaml

from trtllm_fakes import fake_trtllm, no_trtllm  # noqa: F401  (fixtures)
from trtllm_sawint4.build_scripts.triton_repo import parse_pbtxt
from trtllm_sawint4.cli import main
from trtllm_sawint4.integrations.tensorrt_llm import deploy, registration


def test_llm_args_prints_the_llm_call(capsys):
    assert main(["trtllm", "llm-args", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--max-seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    compile(out, "<llm-args>", "exec")
    assert "from tensorrt_llm._torch.auto_deploy import LLM" in out
    assert "sawint4_trtllm.register()" in out
    assert "transforms={'insert_cached_attention': {'backend': 'saw_int4'}}" in out
    assert "KvCacheConfig(free_gpu_memory_fraction=0.8, tokens_per_block=64, enable_block_reuse=False)" in out


def test_serve_config_round_trips(tmp_path, capsys):
    path = tmp_path / "ad.yaml"
    assert main(["trtllm", "serve-config", "--model", "Qwen/Qwen2.5-7B-Instruct", "--backend", "sawint4_bf16",
                 "--free-gpu-memory-fraction", "0.5", "-o", str(path)]) == 0
    assert capsys.readouterr().err.strip() == (
        f"trtllm-serve Qwen/Qwen2.5-7B-Instruct --backend _autodeploy --extra_llm_api_options {path}")
    data = yaml.safe_load(path.read_text())
    assert data == {"transforms": {"insert_cached_attention": {"backend": "sawint4_bf16"}},
                    "kv_cache_config": {"free_gpu_memory_fraction": 0.5, "tokens_per_block": 64,
                                        "enable_block_reuse": False}}


def test_to_yaml_quotes_strings():
    text = deploy.to_yaml({"a": 'x: "y"', "b": {"c": None, "d": True, "e": 3, "f": 0.25}})
    assert yaml.safe_load(text) == {"a": 'x: "y"', "b": {"c": None, "d": True, "e": 3, "f": 0.25}}


@pytest.mark.parametrize("argv, message", [
    (["--backend", "fp8"], "invalid choice"),
    (["--free-gpu-memory-fraction", "1.5"], "must be in (0, 1]"),
    (["--tokens-per-block", "48"], "invalid choice"),
    (["--max-seq-len", "0"], "--max-seq-len must be >= 1"),
])
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["trtllm", "llm-args", "--model", "m", *argv])
    assert message in capsys.readouterr().err


def test_llm_kwargs_validation():
    with pytest.raises(ValueError, match="model:"):
        deploy.llm_kwargs("")
    with pytest.raises(ValueError, match="backend: must be one of"):
        deploy.llm_kwargs("m", backend="triton_paged")


def test_capacity_table(capsys):
    assert main(["trtllm", "capacity", "--layers", "32", "--kv-heads", "8", "--head-dim", "128",
                 "--memory-gib", "40"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["saw_int4"][-1] == "3.765x" and rows["sawint4_int4"][-1] == "3.765x"
    assert rows["sawint4_bf16"][-1] == "1.000x"
    assert int(rows["saw_int4"][2]) == 32 * 2 * 8 * 68


def test_status_without_tensorrt_llm(capsys, tmp_path, no_trtllm):
    assert main(["trtllm", "status", "--site-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "TensorRT-LLM: not importable (" + registration.MISSING_MESSAGE in out
    assert f"worker hook: not installed in {tmp_path}" in out


def test_hook_commands(tmp_path, capsys):
    assert main(["trtllm", "install-hook", "--site-dir", str(tmp_path)]) == 0
    assert (tmp_path / deploy.PTH_NAME).is_file() and deploy.hook_installed(tmp_path)
    assert main(["trtllm", "install-hook", "--site-dir", str(tmp_path)]) == 0  # idempotent
    assert main(["trtllm", "uninstall-hook", "--site-dir", str(tmp_path)]) == 0
    assert not (tmp_path / deploy.PTH_NAME).exists()
    assert main(["trtllm", "uninstall-hook", "--site-dir", str(tmp_path)]) == 0
    assert "no hook installed" in capsys.readouterr().out
    assert main(["trtllm", "install-hook", "--site-dir", str(tmp_path / "nope")]) == 2


# ---- Triton repository --------------------------------------------------------------------------------------
def _repo(tmp_path, *extra):
    assert main(["trtllm", "triton-repo", str(tmp_path / "repo"), "--model", "org/model", *extra]) == 0
    return tmp_path / "repo" / "tensorrt_llm"


def test_triton_repo_layout(tmp_path):
    root = _repo(tmp_path)
    cfg = parse_pbtxt((root / "config.pbtxt").read_text())
    assert cfg["name"] == "tensorrt_llm" and cfg["backend"] == "python"
    assert {i["name"] for i in cfg["input"]} >= {"text_input", "streaming", "sampling_param_max_tokens"}
    assert [o["name"] for o in cfg["output"]] == ["text_output", "finish_reason"]
    model_yaml = yaml.safe_load((root / "1" / "model.yaml").read_text())
    assert model_yaml["model"] == "org/model" and model_yaml["backend"] == "_autodeploy"
    assert model_yaml["transforms"] == {"insert_cached_attention": {"backend": "saw_int4"}}
    assert model_yaml["triton_config"] == {"max_batch_size": 0, "decoupled": True}
    assert (root / "1" / "model.py").read_text() == deploy.triton_model_source()


class _AutoComplete:
    def set_model_transaction_policy(self, policy):
        self.policy = policy

    def set_max_batch_size(self, n):
        self.max_batch_size = n


def _load_model_py(root, fake_trtllm):
    import triton_python_backend_utils as pb_utils

    pb_utils.MODEL_DIR[0] = str(root / "1")
    name = f"_sawint4_triton_model_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, root / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, pb_utils


def _request(pb_utils, **inputs):
    arrays = {}
    for k, v in inputs.items():
        if isinstance(v, str):
            arrays[k] = np.array([v.encode()], dtype=np.object_)
        elif isinstance(v, bool):
            arrays[k] = np.array([v], dtype=np.bool_)
        elif isinstance(v, float):
            arrays[k] = np.array([v], dtype=np.float32)
        else:
            arrays[k] = np.array([v], dtype=np.int32)
    return pb_utils.InferenceRequest(**arrays)


def _text(response):
    return response.tensor("text_output").as_numpy()[0].decode()


def test_triton_model_serves_through_autodeploy(tmp_path, fake_trtllm):
    import tensorrt_llm._torch.auto_deploy as ad

    root = _repo(tmp_path, "--backend", "sawint4_int4")
    module, pb_utils = _load_model_py(root, fake_trtllm)
    auto = module.TritonPythonModel.auto_complete_config(_AutoComplete())
    assert auto.policy == {"decoupled": True} and auto.max_batch_size == 0

    model = module.TritonPythonModel()
    model.initialize({})
    try:
        llm = ad.CREATED[-1]
        assert "backend" not in llm.kwargs and "triton_config" not in llm.kwargs
        assert llm.kwargs["transforms"] == {"insert_cached_attention": {"backend": "sawint4_int4"}}
        assert registration.registered(fake_trtllm) == {"saw_int4": True, "sawint4_int4": True, "sawint4_bf16": True}

        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        plain = _request(pb_utils, text_input="hi", sampling_param_max_tokens=4, return_finish_reason=True)
        stream = _request(pb_utils, text_input="hi", sampling_param_max_tokens=3, streaming=True)
        bad = _request(pb_utils, sampling_param_max_tokens=3)  # no text_input
        failing = _request(pb_utils, text_input="explode")
        zero = _request(pb_utils, text_input="hi", sampling_param_max_tokens=0)
        after = _request(pb_utils, text_input="again", sampling_param_max_tokens=2)
        requests = [plain, stream, bad, failing, zero, after]
        assert model.execute(requests) is None
        for r in requests:
            assert r.sender.done.wait(10), "no final response"

        [(resp, flags)] = plain.sender.sent
        assert flags == final and _text(resp) == " w0 w1 w2 w3"
        assert resp.tensor("finish_reason").as_numpy()[0] == b"length"
        chunks = stream.sender.sent
        assert [f for _, f in chunks] == [0, 0, final] and "".join(_text(r) for r, _ in chunks) == " w0 w1 w2"
        assert [_text(r) for r, _ in chunks] == [" w0", " w1", " w2"]  # each response: the new text only
        for r, match in ((bad, "text_input: missing"), (failing, "generation failed"), (zero, "max_tokens")):
            [(resp, flags)] = r.sender.sent
            assert flags == final and resp.has_error() and match in resp.error.message()
        [(resp, _)] = after.sender.sent  # still serving after the errors
        assert _text(resp) == " w0 w1"
    finally:
        model.finalize()
    assert llm.shut_down


def test_triton_model_refuses_streaming_when_not_decoupled(tmp_path, fake_trtllm):
    root = _repo(tmp_path, "--no-decoupled")
    module, pb_utils = _load_model_py(root, fake_trtllm)
    model = module.TritonPythonModel()
    model.initialize({})
    try:
        req = _request(pb_utils, text_input="hi", streaming=True)
        model.execute([req])
        assert req.sender.done.wait(10)
        [(resp, _)] = req.sender.sent
        assert resp.has_error() and "decoupled: true" in resp.error.message()
    finally:
        model.finalize()

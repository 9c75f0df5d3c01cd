"""`sawint4 serve` without a server: the request tensors and their checks, the generated model repository,
and the launcher's refusals before anything starts (bad model path, port in use, numpy 2)."""

from __future__ import annotations

import json
import socket
import sys

import numpy as np
import pytest

from trtllm_sawint4.build_scripts.triton_repo import parse_pbtxt
from trtllm_sawint4.cli import main
from trtllm_sawint4.serving import launcher
from trtllm_sawint4.serving.api import RequestError, SamplingParams
from trtllm_sawint4.serving.triton_protocol import INPUTS, OUTPUTS, parse_request
from trtllm_sawint4.serving.triton_repo import MODEL_PY, ServeConfig, config_pbtxt, write_repository


def _request(**values):
    """A request as the model sees it: batch-dimension-1 numpy arrays, like Triton hands them over."""
    arrays = {}
    for name, value in values.items():
        spec = next(t for t in INPUTS if t.name == name)
        if spec.data_type == "TYPE_STRING":
            items = value if isinstance(value, list) else [value]
            arrays[name] = np.array([[v.encode() if isinstance(v, str) else v for v in items]], dtype=np.object_)
        else:
            dtype = {"TYPE_BOOL": np.bool_, "TYPE_FP32": np.float32, "TYPE_INT32": np.int32,
                     "TYPE_UINT64": np.uint64}[spec.data_type]
            arrays[name] = np.array([[value]], dtype=dtype)
    return arrays.get


def test_minimal_request_is_greedy_non_streaming():
    r = parse_request(_request(text_input="Hello", max_tokens=5))
    assert r.prompt == "Hello" and not r.stream and r.exclude_input_in_output
    assert r.params == SamplingParams(max_tokens=5)


def test_all_supported_inputs_map_to_sampling_params():
    r = parse_request(_request(text_input="Hi é", max_tokens=7, stream=True, temperature=0.5, top_p=0.75, top_k=3,
                               random_seed=11, stop_words=["", "\n\n", "END"], end_id=2,
                               exclude_input_in_output=False, bad_words=[""], pad_id=0, beam_width=1,
                               num_return_sequences=1, min_tokens=0, repetition_penalty=1.0,
                               presence_penalty=0.0, frequency_penalty=0.0, length_penalty=0.3,
                               return_log_probs=False))
    assert r.prompt == "Hi é" and r.stream and not r.exclude_input_in_output
    assert r.params == SamplingParams(max_tokens=7, temperature=0.5, top_p=0.75, top_k=3, seed=11,
                                      stop=("\n\n", "END"), stop_token_ids=(2,), ignore_eos=True)


@pytest.mark.parametrize("values, message", [
    (dict(max_tokens=4), "text_input (or input_ids) is required"),
    (dict(text_input="hi", input_ids=[1, 2], max_tokens=4), "not both"),
    (dict(input_ids=[], max_tokens=4), "input_ids must not be empty"),
    (dict(input_ids=[5, 6], max_tokens=4, exclude_input_in_output=False), "needs text_input"),
    (dict(text_input="hi"), "max_tokens is required"),
    (dict(text_input="", max_tokens=4), "text_input must not be empty"),
    (dict(text_input="hi", max_tokens=0), "max_tokens must be an int >= 1, got 0"),
    (dict(text_input="hi", max_tokens=4, temperature=-1.0), "temperature must be"),
    (dict(text_input="hi", max_tokens=4, top_p=0.0), "top_p must be"),
    (dict(text_input="hi", max_tokens=4, top_k=-2), "top_k must be"),
    (dict(text_input="hi", max_tokens=4, temperature=float("nan")), "temperature: must be finite"),
    (dict(text_input="hi", max_tokens=4, beam_width=4), "beam_width=4 is not supported"),
    (dict(text_input="hi", max_tokens=4, repetition_penalty=1.2), "repetition_penalty"),
    (dict(text_input="hi", max_tokens=4, return_log_probs=True), "return_log_probs"),
    (dict(text_input="hi", max_tokens=4, bad_words=["x"]), "bad_words is not supported"),
    (dict(text_input="hi", max_tokens=4, seed=1, random_seed=2), "disagree"),
    (dict(text_input="hi", max_tokens=4, end_id=-1), "end_id must be >= 0"),
    (dict(text_input=b"\xff\xfe", max_tokens=4), "text_input: not valid UTF-8"),
])
def test_bad_values_are_refused_naming_the_input(values, message):
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_request(_request(**values))


def test_token_id_prompts():
    r = parse_request(_request(input_ids=[5, 6, 7], max_tokens=3, ignore_eos=True))
    assert r.prompt == [5, 6, 7] and r.params == SamplingParams(max_tokens=3, ignore_eos=True)


def test_wrong_types_and_batches_are_refused():
    get = _request(text_input="hi", max_tokens=4)
    with pytest.raises(RequestError, match="max_tokens: expected an integer"):
        parse_request(lambda n: np.array([[4.5]], dtype=np.float32) if n == "max_tokens" else get(n))
    with pytest.raises(RequestError, match="stream: expected a bool"):
        parse_request(lambda n: np.array([[1]], dtype=np.int32) if n == "stream" else get(n))
    with pytest.raises(RequestError, match="text_input: expected one value .* one request is one prompt"):
        parse_request(lambda n: np.array([[b"a"], [b"b"]], dtype=np.object_) if n == "text_input" else get(n))


def test_unknown_parameters_are_refused():
    # The generate endpoints pass every JSON key that is not an input as a request parameter.
    get = _request(text_input="hi", max_tokens=4)
    with pytest.raises(RequestError, match="unknown parameter.*temprature"):
        parse_request(get, json.dumps({"temprature": 0.5}))
    assert parse_request(get, "{}").params.max_tokens == 4


def test_config_pbtxt_declares_the_tensors_and_the_engine_config(tmp_path):
    cfg = ServeConfig(model_path='/m/"odd" path', kv_format="int4", num_blocks=32, max_batch=4,
                      engine_options={"max_seq_len": 512}, drain_file="/tmp/x/drain")
    folder = write_repository(tmp_path / "repo", cfg)
    assert folder == tmp_path / "repo" / "sawint4"
    assert (folder / "1" / "model.py").read_text() == MODEL_PY
    parsed = parse_pbtxt((folder / "config.pbtxt").read_text())
    assert parsed["name"] == "sawint4" and parsed["backend"] == "python" and parsed["max_batch_size"] == 1
    assert parsed["model_transaction_policy"] == {"decoupled": "true"}
    ins = {t["name"]: t for t in parsed["input"]}
    assert list(ins) == [t.name for t in INPUTS]
    assert ins["text_input"] == {"name": "text_input", "data_type": "TYPE_STRING", "dims": [1], "optional": "true"}
    assert ins["input_ids"] == {"name": "input_ids", "data_type": "TYPE_INT32", "dims": [-1], "optional": "true"}
    assert ins["max_tokens"]["data_type"] == "TYPE_INT32" and "optional" not in ins["max_tokens"]
    assert ins["stop_words"] == {"name": "stop_words", "data_type": "TYPE_STRING", "dims": [-1], "optional": "true"}
    assert [t["name"] for t in parsed["output"]] == [t.name for t in OUTPUTS] == [
        "text_output", "output_ids", "finish_reason", "num_output_tokens"]
    params = {p["key"]: p["value"] for p in parsed["parameters"]}
    assert params["kv_format"] == {"string_value": "int4"} and params["num_blocks"] == {"string_value": "32"}
    assert params["model_path"] == {"string_value": '/m/"odd" path'}
    back = ServeConfig.from_parameters(params)
    assert back == cfg


def test_serve_config_refuses_bad_values():
    with pytest.raises(ValueError, match="kv_format must be one of"):
        config_pbtxt(ServeConfig(kv_format="fp8"))
    with pytest.raises(ValueError, match="num_blocks must be an int >= 1"):
        ServeConfig(num_blocks=0).validate()
    with pytest.raises(ValueError, match="unknown parameter.*pool_size"):
        ServeConfig.from_parameters({"pool_size": {"string_value": "3"}})


def test_repo_only_writes_the_repository(tmp_path, capsys):
    assert main(["serve", "--repo-only", str(tmp_path / "r"), "--kv-format", "bf16", "--num-blocks", "40"]) == 0
    out = capsys.readouterr().out
    assert "tritonserver --model-repository=" in out
    params = {p["key"]: p["value"]["string_value"]
              for p in parse_pbtxt((tmp_path / "r" / "sawint4" / "config.pbtxt").read_text())["parameters"]}
    assert params["kv_format"] == "bf16" and params["num_blocks"] == "40"
    assert params["model_path"] == "" and params["drain_file"] == ""  # the packaged model, resolved where it runs


def _cli_error(capsys, *argv) -> str:
    assert main(["serve", *argv]) == 2
    return capsys.readouterr().err


def test_startup_refusals_name_the_problem(tmp_path, capsys):
    assert "--model-path: " in _cli_error(capsys, "--model-path", str(tmp_path / "nope"), "--http-port", "1")
    assert "must differ" in _cli_error(capsys, "--http-port", "9000", "--grpc-port", "9000")
    assert "--http-port must be in [1, 65535]" in _cli_error(capsys, "--http-port", "70000")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = _cli_error(capsys, "--http-port", str(port), "--grpc-port", str(port + 1), "--metrics-port", str(port + 2))
    assert f"--http-port {port}: 127.0.0.1:{port} is already in use" in err


def test_missing_tritonserver_root_is_named(tmp_path):
    with pytest.raises(launcher.ServeError, match="bin/tritonserver is missing"):
        launcher.find_triton(tmp_path)


def test_model_env_with_numpy_2_is_refused(tmp_path):
    # A stand-in interpreter that answers the probe the way an environment with numpy 2 does.
    fake = tmp_path / "python3"
    report = {"version": "3.11", "libdir": str(tmp_path), "ldlibrary": "libpython3.11.so", "shared": True,
              "numpy": "2.1.0"}
    fake.write_text(f"#!/bin/sh\necho '{json.dumps(report)}'\n")
    fake.chmod(0o755)
    with pytest.raises(launcher.ServeError, match="numpy 2.1.0.*needs numpy<2.*silently corrupts"):
        launcher.probe_model_env(fake)


def test_this_environment_probes():
    python = launcher.main_env_python()
    if int(np.__version__.split(".")[0]) >= 2:
        with pytest.raises(launcher.ServeError, match="needs numpy<2"):
            launcher.probe_model_env(python)
    else:
        env = launcher.probe_model_env(python)
        assert env.version == f"{sys.version_info[0]}.{sys.version_info[1]}" and env.numpy == np.__version__

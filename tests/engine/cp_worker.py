"""Worker of test_context_parallel.py: one rank of a 2-process Ulysses run (gloo, CPU).

Follows shared/reference/context-parallel.md §7: spawn, FileStore rendezvous, the
``torch.accelerator.device_count`` patch diffusers needs on CPU, sequence lengths divisible by 2.
"""

import json
import os
from datetime import timedelta
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

STEPS = 6


def build():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()


def inputs():
    """A trajectory whose image tokens 8..15 (rank 1's shard) change, tokens 0..7 stay put."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 4, generator=g)
    enc = torch.randn(1, 8, 32, generator=g)
    pooled = torch.randn(1, 32, generator=g)
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    img_ids = torch.stack([torch.zeros(16), ys.flatten().float(), xs.flatten().float()], dim=1)
    steps = []
    jumps = [0.0, 0.01, 0.01, 0.5, 0.01, 0.01]
    for k in range(STEPS):
        x = x.clone()
        x[:, 8:] += jumps[k] * torch.randn(1, 8, 4, generator=g)
        steps.append(dict(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                          timestep=torch.tensor([1.0 - 1e-4 * k]), img_ids=img_ids, txt_ids=torch.zeros(8, 3),
                          return_dict=False))
    return steps


def drive(model):
    import dcache

    decisions, outs, local = [], [], []
    policy = model.dcache.policies[0]
    real = policy.decide

    def spy(state, step, signal):
        from dcache.kernels.rel_l1 import rel_l1

        if state.reference is not None and state.reference.shape == signal.shape:
            local.append(float(rel_l1(signal, state.reference)))  # this rank's shard only
        return real(state, step, signal)

    policy.decide = spy
    with torch.no_grad():
        for kw in inputs():
            outs.append(model(**kw)[0])
    decisions = [list(e["sites"].values())[0] for e in model.dcache.stats()["timeline"]]
    policy.decide = real
    return decisions, torch.stack(outs), local


def enable_cp(model):
    from diffusers import ContextParallelConfig

    with mock.patch("torch.accelerator.device_count", return_value=1):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))


def main(rank, store_path, out_path, threshold):
    import dcache

    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=30))
    torch.set_num_threads(1)
    result = {}
    try:
        single = build()
        dcache.accelerate(single, "fbcache", threshold=threshold)
        ref_dec, ref_out, _ = drive(single)
        dcache.disable(single)
        plain_cp = build()
        enable_cp(plain_cp)
        with torch.no_grad():
            plain_cp_out = torch.stack([plain_cp(**kw)[0] for kw in inputs()])
        for order in ("after", "before"):
            model = build()
            if order == "after":
                enable_cp(model)
                dcache.accelerate(model, "fbcache", threshold=threshold)
            else:
                dcache.accelerate(model, "fbcache", threshold=threshold)
                enable_cp(model)
            dec, out, local = drive(model)
            dcache.disable(model)
            with torch.no_grad():
                after_disable = torch.stack([model(**kw)[0] for kw in inputs()])
            all_dec = [None, None]
            dist.all_gather_object(all_dec, dec)
            all_local = [None, None]
            dist.all_gather_object(all_local, local)
            result[order] = {
                "decisions": all_dec,
                "single": ref_dec,
                "max_diff_vs_single": float((out - ref_out).abs().max()),
                "local_distances": all_local,
                "disable_still_parallel": bool(getattr(model, "_parallel_config", None) is not None),
                "disable_matches_plain_cp": float((after_disable - plain_cp_out).abs().max()),
            }
    finally:
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(result, f)
        dist.destroy_process_group()

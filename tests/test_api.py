"""Public API: policy resolution, bad input, the context manager, the policy listing."""

import pytest
import torch

import dcache
from dcache.schedulers.static import StaticConfig
from dcache.schedulers.taylorseer import TaylorSeerConfig


def test_policies_lists_the_core_methods():
    names = dcache.policies()
    for n in ["none", "static", "teacache", "fbcache", "taylorseer"]:
        assert n in names and isinstance(names[n], str) and names[n]


def test_policies_detailed_names_granularity_and_task():
    from dcache import installers
    from dcache.registry import get_policy

    detailed = dcache.policies(detailed=True)
    assert set(detailed) == set(dcache.policies())
    known = set(installers.granularities())
    for name, info in detailed.items():
        assert info["task"] == get_policy(name).task and info["description"] == dcache.policies()[name]
        # image policies go through an installer; KV policies of the other tasks name their own kind
        assert info["granularity"] in known if info["task"] == "image" else info["granularity"]
    assert {n: detailed[n]["granularity"] for n in ("toca", "deepcache", "delta-dit", "taylorseer")} == {
        "toca": "token", "deepcache": "unet_branch", "delta-dit": "block", "taylorseer": "module"}
    assert set(dcache.policies("dllm", detailed=True)) == set(dcache.policies("dllm"))


def test_policies_cli_prints_granularity(capsys):
    from dcache.cli import main

    assert main(["policies", "--task", "image"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert set(lines) == set(dcache.policies("image"))
    assert "[token]" in lines["toca"] and "[module]" in lines["taylorseer"]


def test_unknown_policy_names_accepted_values(tiny_pipes):
    pipe = tiny_pipes("flux")[0]
    with pytest.raises(ValueError, match="unknown policy 'teacahce'.*accepted:.*taylorseer"):
        dcache.accelerate(pipe, "teacahce")


@pytest.mark.parametrize(
    "policy, options, pattern",
    [
        ("taylorseer", {"interval": "5"}, "interval must be an int"),
        ("taylorseer", {"interval": 0}, r"interval must be in \[1, inf\]"),
        ("taylorseer", {"order": 7}, r"order must be in \[0, 4\]"),
        ("taylorseer", {"dtype": "int8"}, "dtype must be one of"),
        ("static", {"compute_last": 1}, "compute_last must be True or False"),
        ("fbcache", {"threshold": -1.0}, r"threshold must be in \[0.0, inf\]"),
        ("teacache", {"coefficients": [1, "a"]}, "coefficients must be 1 to 5 numbers"),
        ("teacache", {"coefficients": "/nonexistent/c.json"}, "cannot read coefficients file"),
        ("static", {"intervall": 3}, r"unknown option\(s\) \['intervall'\].*accepted: budget, compute_last, difference_from, ends, interval, level, residual_order, steps_mask, warmup_steps"),
    ],
)
def test_bad_options(policy, options, pattern, tiny_pipes):
    pipe = tiny_pipes("flux")[0]
    with pytest.raises(ValueError, match=pattern):
        dcache.accelerate(pipe, policy, **options)
    assert "dcache" not in pipe.__dict__


def test_fbcache_too_many_blocks_is_rejected(tiny_pipes):
    pipe = tiny_pipes("flux")[0]  # 4 blocks
    with pytest.raises(ValueError, match="less than the model's 4 blocks"):
        dcache.accelerate(pipe, "fbcache", fn_blocks=3, bn_blocks=1)


def test_unsupported_model_names_supported_classes():
    from diffusers import UNet2DModel

    with pytest.raises(ValueError, match="unsupported model class UNet2DModel; supported: .*FluxTransformer2DModel.*register_adapter"):
        dcache.accelerate(UNet2DModel(block_out_channels=(4, 8), norm_num_groups=2, layers_per_block=1,
                                      down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2))
    with pytest.raises(ValueError, match="expected a diffusers pipeline"):
        dcache.accelerate(object())


def test_config_objects_and_lists(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    dcache.accelerate(pipe, TaylorSeerConfig(interval=2))
    assert pipe.dcache.stats() == {} and "taylorseer" in repr(pipe.dcache)
    dcache.accelerate(pipe, ["static", "taylorseer"], static={"interval": 4}, taylorseer={"interval": 2})
    out = getattr(pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=6, **kw), attr)
    assert torch.isfinite(out).all()
    assert pipe.dcache.stats()["policies"] == ["static", "taylorseer"]
    dcache.disable(pipe)
    with pytest.raises(ValueError, match="one policy per granularity"):
        dcache.accelerate(pipe, [StaticConfig(), "teacache"])
    with pytest.raises(ValueError, match=r"options \['bogus'\] were not used"):
        dcache.accelerate(pipe, ["static"], bogus={})
    with pytest.raises(ValueError, match="policy must be a name, a policy config object"):
        dcache.accelerate(pipe, 3)
    assert "dcache" not in pipe.__dict__


def test_context_manager_restores(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    base = getattr(pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=6, **kw), attr)
    with dcache.accelerated(pipe, "static", interval=2) as p:
        assert p is pipe and pipe.dcache is not None
        fast = getattr(pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=6, **kw), attr)
    assert not torch.equal(fast, base)
    assert "dcache" not in pipe.__dict__
    assert torch.equal(getattr(pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=6, **kw), attr), base)


def test_accelerate_twice_replaces_policy(tiny_pipes):
    pipe = tiny_pipes("flux")[0]
    dcache.accelerate(pipe, "static")
    dcache.accelerate(pipe, "fbcache")
    assert pipe.dcache.stats() == {} and "fbcache" in repr(pipe.dcache)
    dcache.disable(pipe)
    assert type(pipe).__mro__[1].__name__ != "FluxPipeline"  # class swap fully undone


def test_stats_timeline_records_each_call_and_site(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    with dcache.accelerated(pipe, "static", interval=3, warmup_steps=1, compute_last=False):
        pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=7, **kw)
        stats = pipe.dcache.stats()
    timeline = stats["timeline"]
    assert [e["step"] for e in timeline] == list(range(stats["steps"])) == list(range(7))
    # Interval 3 computes steps 0, 3, 6 (step 0 is also the warm-up) and reuses the rest.
    kinds = [set(e["sites"].values()) for e in timeline]
    assert [k == {"computed"} for k in kinds] == [i % 3 == 0 for i in range(7)]
    assert sum(len(e["sites"]) for e in timeline) == stats["computed"] + stats["reused"]

"""LoRA with dcache: diffusers' compiled hot-swap (`enable_lora_hotswap` + `load_lora_adapter(...,
hotswap=True)`) on an accelerated, compiled transformer swaps without a recompile and gives what
the uncompiled model with the second LoRA gives; a LoRA loaded after `accelerate` works too.

Regional compile (`compile_repeated_blocks`) for a caching policy, the whole transformer with
`fullgraph=True` for policy `none`. Backend: an eager one that counts the graphs dynamo hands it,
and `error_on_recompile` during the swapped generation. The LoRAs are random peft adapters of
ranks 4 and 8 (hot-swap pads the first to `target_rank=8`), saved with diffusers' own
`save_lora_adapter`. The eager backend runs the same kernels as eager mode, so outputs are
compared with atol = rtol = 1e-6.
"""

import pytest
import torch

pytest.importorskip("peft")

import dcache  # noqa: E402
import tiny  # noqa: E402

STEPS = 4
WEIGHTS = "pytorch_lora_weights.safetensors"
TOL = dict(atol=1e-6, rtol=1e-6)


def gen():
    return torch.Generator().manual_seed(0)


class CountingBackend:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    from peft import LoraConfig

    out = {}
    for name, rank, seed in (("a", 4, 1), ("b", 8, 2)):
        tr = tiny.build("flux_micro")[0].transformer
        torch.manual_seed(seed)
        # init_lora_weights=False: random B as well as A, so the adapter changes the output.
        tr.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                  init_lora_weights=False), adapter_name="x")
        path = tmp_path_factory.mktemp(f"lora_{name}")
        tr.save_lora_adapter(str(path), adapter_name="x")
        out[name] = str(path)
    return out


def load(tr, path, **kw):
    tr.load_lora_adapter(path, prefix=None, adapter_name="default_0", weight_name=WEIGHTS, **kw)


def generate(pipe, kw, attr):
    return getattr(pipe(generator=gen(), num_inference_steps=STEPS, **kw), attr)


def reference(policy, options, lora):
    """The uncompiled model with ``lora`` loaded plainly (no hot-swap), accelerated the same way."""
    pipe, kw, attr, _ = tiny.build("flux_micro")
    load(pipe.transformer, lora)
    with dcache.accelerated(pipe, policy, **options):
        return generate(pipe, kw, attr), pipe.dcache.stats()


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("policy, options, mode", [
    ("static", {"interval": 2, "warmup_steps": 1}, "regional"),
    # Same path as static (regional compile, a caching policy): slow only to keep the default run short.
    pytest.param("taylorseer", {"interval": 2, "warmup_steps": 1}, "regional", marks=pytest.mark.slow),
    pytest.param("none", {}, "regional", marks=pytest.mark.slow),
    ("none", {}, "fullgraph"),
])
def test_compiled_hotswap_does_not_recompile(policy, options, mode, loras, fresh_dynamo):
    ref_a, _ = reference(policy, options, loras["a"])
    ref_b, ref_stats = reference(policy, options, loras["b"])
    assert not torch.allclose(ref_a, ref_b, atol=1e-4), "the two LoRAs must give different images"

    pipe, kw, attr, _ = tiny.build("flux_micro")
    tr = pipe.transformer
    tr.enable_lora_hotswap(target_rank=8)
    load(tr, loras["a"])
    dcache.accelerate(pipe, policy, **options)
    backend = CountingBackend()
    if mode == "regional":
        tr.compile_repeated_blocks(backend=backend)
    else:
        pipe.transformer = torch.compile(tr, fullgraph=True, backend=backend)
    try:
        out_a = generate(pipe, kw, attr)
        graphs = backend.graphs
        load(tr, loras["b"], hotswap=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            out_b = generate(pipe, kw, attr)
        stats = pipe.dcache.stats()
    finally:
        pipe.transformer = tr
        dcache.disable(pipe)
    assert graphs > 0 and backend.graphs == graphs, "the hot-swap recompiled"
    torch.testing.assert_close(out_a, ref_a, **TOL)
    torch.testing.assert_close(out_b, ref_b, **TOL)
    if mode == "regional":
        assert stats["reused"] + stats["forecast"] == ref_stats["reused"] + ref_stats["forecast"]
        if policy != "none":
            assert stats["reused"] + stats["forecast"] > 0


@pytest.mark.parametrize("policy, options", [("none", {}), ("static", {"interval": 2, "warmup_steps": 1})])
def test_lora_loaded_after_accelerate(policy, options, loras):
    """peft wraps the attention Linears in LoRA layers inside blocks dcache has hooked."""
    ref, ref_stats = reference(policy, options, loras["a"])
    pipe, kw, attr, _ = tiny.build("flux_micro")
    with dcache.accelerated(pipe, policy, **options):
        plain = generate(pipe, kw, attr)
        load(pipe.transformer, loras["a"])
        out = generate(pipe, kw, attr)
        stats = pipe.dcache.stats()
    assert not torch.allclose(out, plain, atol=1e-4)
    torch.testing.assert_close(out, ref, **TOL)
    assert stats["reused"] == ref_stats["reused"]

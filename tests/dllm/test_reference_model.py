import os

import pytest
import torch

import dcache
from dcache.eval.bench_dllm import default_model_dir
from dcache.pipelines.dllm import tasks
from dcache.pipelines.dllm.modeling import LLaDAModelLM

MODEL_DIR = default_model_dir()
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(MODEL_DIR, "model.safetensors")),
                                reason="reference dLLM weights not shipped in this checkout")


@pytest.fixture(scope="module")
def ref():
    torch.set_num_threads(1)
    return LLaDAModelLM.from_pretrained(MODEL_DIR)


def test_shipped_weights_are_small_and_load(ref):
    assert os.path.getsize(os.path.join(MODEL_DIR, "model.safetensors")) < 10 * 2**20
    assert ref.config.mask_token_id == tasks.MASK


def test_reference_model_solves_held_out_problems_and_dual_cache_keeps_them(ref):
    prompts, answers = tasks.make_problems(8, gen_length=64, n_range=(48, 64), seed=4242)
    base = ref.generate(prompts, gen_length=64, block_length=32, steps=64)
    assert tasks.exact_match(base.sequences, answers) >= 0.75
    dcache.accelerate(ref, policy="dual-cache", threshold=0.9)
    try:
        fast = ref.generate(prompts, gen_length=64, block_length=32, steps=64)
    finally:
        dcache.disable(ref)
    assert tasks.exact_match(fast.sequences, answers) >= 0.75
    assert fast.nfe < base.nfe / 2  # confident parallel decoding needs far fewer forwards

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from dcache.pipelines.dllm.config import DreamConfig, LLaDAConfig
from dcache.pipelines.dllm.modeling import DreamModel, LLaDAModelLM

# the tiny shapes public test fixtures use (reference/dllm-caching.md §4.4)
LLADA_TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=64, vocab_size=128,
                  max_sequence_length=64, rms_norm_eps=1e-5, rope_theta=500000.0, mask_token_id=120,
                  eos_token_id=1, pad_token_id=0)
DREAM_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=128, max_position_embeddings=64, rope_theta=1e6,
                  rms_norm_eps=1e-6, mask_token_id=120, pad_token_id=0, eos_token_id=1)

RAGGED = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10]]


def _randomize(model):
    # random init has near-uniform logits; scale the weights up so predictions are decisive and
    # differ between positions, which makes token-for-token comparisons meaningful
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture
def llada():
    torch.manual_seed(0)
    return _randomize(LLaDAModelLM(LLaDAConfig(**LLADA_TINY))).eval()


@pytest.fixture
def dream():
    torch.manual_seed(0)
    return _randomize(DreamModel(DreamConfig(**DREAM_TINY))).eval()

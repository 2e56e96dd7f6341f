import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(1)


def tiny_pipe(seed: int = 0, layers: int = 2):
    from diffusers import WanTransformer3DModel

    from dcache.pipelines.ar_video.pipeline import ARVideoConfig, ARVideoPipeline

    torch.manual_seed(seed)
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4,
                               out_channels=4, text_dim=32, freq_dim=32, ffn_dim=96, num_layers=layers, rope_max_seq_len=64).eval()
    # latent 8x12 -> 4x6 = 24 tokens per frame (6 segments of 4 tokens)
    return ARVideoPipeline(tr, ARVideoConfig(chunk_frames=3, height=8, width=12))


@pytest.fixture
def pipe():
    return tiny_pipe()


@pytest.fixture
def emb():
    return torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def head_file(tmp_path):
    from dcache.schedulers._forcing_heads import HeadSplit, save_head_file

    p = tmp_path / "heads.json"
    save_head_file(HeadSplit(2, 4, [[0, 2], [1]], [[1, 3], [0, 2, 3]]), p, profile="test")
    return str(p)


"""Token gather/scatter: the torch reference against a Python loop, the Triton kernels (Triton's
interpreter on CPU) against the torch reference, and the argument checks."""

import pytest
import torch

from dcache.kernels import token_gather as tg


@pytest.fixture
def force_triton(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("DCACHE_FORCE_TRITON", "1")


def _case(dtype, b=2, n=13, d=300, k=5, seed=0):
    # d > the kernel's 256-wide block and not a multiple of it: exercises the loop and the tail mask.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)])  # distinct per row, unsorted
    src = torch.randn(b, k, d, generator=g).to(dtype)
    return x, idx, src


def test_torch_reference_matches_a_loop():
    x, idx, src = _case(torch.float32)
    g = tg.gather_torch(x, idx)
    s = tg.scatter_torch(x, idx, src)
    for b in range(x.shape[0]):
        for j, t in enumerate(idx[b].tolist()):
            assert torch.equal(g[b, j], x[b, t])
            assert torch.equal(s[b, t], src[b, j])
        untouched = sorted(set(range(x.shape[1])) - set(idx[b].tolist()))
        assert torch.equal(s[b, untouched], x[b, untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [0, 1, 5, 13])
def test_triton_matches_torch(dtype, k, force_triton):
    x, idx, src = _case(dtype, k=k)
    base = x.clone()
    assert torch.equal(tg.gather(x, idx), tg.gather_torch(x, idx))
    assert torch.equal(tg.scatter(x, idx, src), tg.scatter_torch(x, idx, src))
    assert torch.equal(x, base)  # the cache is never written in place


def test_int32_indices_and_identity(force_triton):
    x, _, _ = _case(torch.float32, b=2, n=9, d=5)
    full = torch.arange(9).expand(2, 9).to(torch.int32)
    assert torch.equal(tg.gather(x, full), x)
    assert torch.equal(tg.scatter(torch.zeros_like(x), full, x), x)


def test_bad_arguments_raise_value_error():
    x, idx, src = _case(torch.float32)
    with pytest.raises(ValueError, match=r"\(batch, tokens, dim\)"):
        tg.gather(x[0], idx)
    with pytest.raises(ValueError, match="integer"):
        tg.gather(x, idx.float())
    with pytest.raises(ValueError, match="src must be"):
        tg.scatter(x, idx, src[:, :3])

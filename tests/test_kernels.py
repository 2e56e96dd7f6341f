"""Kernels: the Triton versions (run by Triton's interpreter on CPU) against the torch references."""

import math

import pytest
import torch

from dcache.kernels import rel_l1 as rl
from dcache.kernels import taylor


@pytest.fixture
def force_triton(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("DCACHE_FORCE_TRITON", "1")


@pytest.mark.parametrize("n_terms", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forecast_triton_matches_torch(n_terms, dtype, force_triton):
    torch.manual_seed(0)
    terms = torch.randn(5, 3, 37, 11).to(dtype)  # odd sizes: exercises the tail mask
    ref = taylor.forecast_torch(terms, n_terms, 2.5)
    out = taylor.forecast(terms, n_terms, 2.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("n_valid", [0, 1, 2, 3])
def test_update_triton_matches_torch(n_valid, force_triton):
    torch.manual_seed(1)
    terms_a = torch.randn(3, 1000)
    terms_b = terms_a.clone()
    x = torch.randn(1000)
    va = taylor.update_torch(terms_a, n_valid, x, 3.0)
    vb = taylor.update(terms_b, n_valid, x, 3.0)
    assert va == vb == min(n_valid + 1, 3)
    torch.testing.assert_close(terms_b[:vb], terms_a[:va], atol=1e-6, rtol=1e-6)


def test_taylor_forecast_is_exact_on_polynomials():
    # Three observations of a quadratic fill all three terms; order 0 returns the last value.
    f = lambda s: 3.0 + 0.5 * s - 0.25 * s * s  # noqa: E731
    terms = torch.zeros(3, 4)
    n = 0
    for s in (0, 2, 4):
        n = taylor.update(terms, n, torch.full((4,), f(s)), 2.0)
    assert n == 3
    # Linear features are forecast exactly at any distance by order 1.
    lin = torch.zeros(2, 4)
    m = taylor.update(lin, 0, torch.full((4,), 1.0), 1.0)
    m = taylor.update(lin, m, torch.full((4,), 4.0), 3.0)  # slope 1 per step
    assert torch.allclose(taylor.forecast(lin, m, 5.0), torch.full((4,), 9.0))
    assert math.isclose(float(taylor.forecast(terms, 1, 7.0)[0]), f(4))


def test_taylor_rejects_bad_arguments():
    terms = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="n_valid must be in 1..2"):
        taylor.forecast(terms, 3, 1.0)
    with pytest.raises(ValueError, match="does not match"):
        taylor.update(terms, 0, torch.zeros(5), 1.0)
    with pytest.raises(ValueError, match="positive"):
        taylor.update(terms, 0, torch.zeros(4), 0.0)


def test_rel_l1_triton_matches_torch(force_triton):
    torch.manual_seed(2)
    a, b = torch.randn(5000), torch.randn(5000)
    torch.testing.assert_close(rl.rel_l1(a, b), rl.rel_l1_torch(a, b), atol=1e-5, rtol=1e-5)
    assert float(rl.rel_l1(b, b)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        rl.rel_l1(a, b[:10])


def _shard_worker(rank, world, port, q):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    a, b = torch.randn(8, 100), torch.randn(8, 100)
    shard = slice(rank * 4, rank * 4 + 4)  # sequence-sharded as under context parallelism
    d = float(rl.rel_l1(a[shard], b[shard], group=dist.group.WORLD))
    q.put((rank, d, float(rl.rel_l1_torch(a, b))))
    dist.destroy_process_group()


def test_rel_l1_all_reduces_across_shards():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_shard_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    (_, d0, full), (_, d1, _) = sorted(results)
    assert d0 == d1  # every rank takes the same decision
    assert abs(d0 - full) < 1e-6  # and it is the distance of the whole tensor

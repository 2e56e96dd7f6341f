import os

# Before anything imports triton or touches the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
# Tiny test models gain nothing from threads, and OpenMP spin-waiting makes them crawl when
# the cores are shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipes():
    """Session cache of tiny pipelines, built on first use."""
    import tiny

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tiny.build(name)
        return cache[name]

    return get

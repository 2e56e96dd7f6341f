"""FLOP tables stay right while another thread runs a forward (the demo serves requests at once)."""

import threading

import torch

from dcache import flops


class _Blocking(torch.nn.Module):
    def __init__(self, entered: threading.Event, release: threading.Event) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.entered, self.release = entered, release

    def forward(self, x):
        self.entered.set()
        self.release.wait(10)  # stays "inside" its forward while the other thread measures
        return self.lin(x)


def test_a_forward_in_another_thread_gets_no_flops():
    root = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    entered, release = threading.Event(), threading.Event()
    other = _Blocking(entered, release)
    worker = threading.Thread(target=lambda: other(torch.randn(2, 8)))

    def call():
        # The other thread enters its forward while this one is being measured, and stays inside.
        worker.start()
        assert entered.wait(10)
        try:
            return root(torch.randn(3, 16))
        finally:
            release.set()
            worker.join(10)

    names = {root: "root", root[0]: "root.0", root[1]: "root.1", other: "other"}
    _, table = flops.measure(call, root, names)
    assert table.of("other") == 0.0
    # Linear FLOPs are 2 * batch * in * out, counted on this thread only.
    assert table.of("root.0") == 2 * 3 * 16 * 32 and table.of("root.1") == 2 * 3 * 32 * 4
    assert table.total == table.of("root.0") + table.of("root.1")

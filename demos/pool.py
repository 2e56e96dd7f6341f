"""Per-request isolation: a pool of model instances and a baseline cache.

``dcache.accelerate`` patches the object it is given, and the AR-video pipeline keeps per-call
state on itself, so two requests must never run on one instance at the same time. A request
checks an instance out of its model's pool (a new one is built when all are busy) and gives it
back with every hook removed; requests therefore never share cache state, whatever the queue's
concurrency.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Any, Callable, Hashable, Iterator

__all__ = ["InstancePool", "BaselineCache", "SharedExclusiveLock", "GENERATIONS"]


class InstancePool:
    """Instances built by ``factory``: at most ``max_instances`` exist (a request waits for one to be
    given back beyond that: a large hub pipeline must not be loaded once per user), and at most
    ``max_idle`` are kept between requests."""

    def __init__(self, factory: Callable[[], Any], max_idle: int = 2, initial: list[Any] | None = None,
                 max_instances: int = 4) -> None:
        self._factory = factory
        self._idle: list[Any] = list(initial or [])
        self._cond = threading.Condition()
        self._max_idle = max_idle
        self._max_instances = max(max_instances, 1)
        self._alive = len(self._idle)
        self.built = 0
        self.in_use = 0
        self.peak_in_use = 0  # most instances out at once: how many requests really overlapped

    @contextlib.contextmanager
    def checkout(self) -> Iterator[Any]:
        with self._cond:
            self._cond.wait_for(lambda: self._idle or self._alive < self._max_instances)
            obj = self._idle.pop() if self._idle else None
            if obj is None:
                self._alive += 1  # reserved now, built below outside the lock
            self.in_use += 1
            self.peak_in_use = max(self.peak_in_use, self.in_use)
        try:
            if obj is None:
                try:
                    obj = self._factory()
                except BaseException:
                    with self._cond:
                        self._alive -= 1
                        self._cond.notify_all()
                    raise
                with self._cond:
                    self.built += 1
            yield obj
        finally:
            with self._cond:
                self.in_use -= 1
                if obj is not None:
                    if len(self._idle) < self._max_idle:
                        self._idle.append(obj)
                    else:
                        self._alive -= 1
                self._cond.notify_all()


class BaselineCache:
    """LRU map (model, condition, seed, steps, ...) → baseline result, so switching policies is quick."""

    def __init__(self, max_entries: int = 64) -> None:
        self._data: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._max = max_entries
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._max:
                self._data.popitem(last=False)


class SharedExclusiveLock:
    """Many holders of the shared side at once, or one of the exclusive side.

    dcache measures a denoiser's FLOPs once per input shape with *process-wide* module hooks
    (``dcache.flops.measure``), so a generation running in another thread meanwhile would be
    counted into the table. Generations take the shared side; the one-off measurement the
    exclusive side.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._exclusive = True  # new shared holders wait from here on
            self._cond.wait_for(lambda: self._shared == 0)
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


# Every generation of every tab holds GENERATIONS.shared(); measuring a new image instance's FLOPs
# holds GENERATIONS.exclusive().
GENERATIONS = SharedExclusiveLock()

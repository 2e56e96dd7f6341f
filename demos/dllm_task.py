"""The dLLM tab's work: one cipher problem set, the plain sampler and a KV policy, streamed.

The embedded model (``pipelines/zoo/dllm_cipher``) solves a keyed digit cipher whose every answer
token is known, so accuracy is exact. Each generation reports its canvas after every step
(``callback``) and the tab shows the answer filling in, masked slots as ``?``.
"""

from __future__ import annotations

import copy
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

import dcache
from dcache.demos.pool import GENERATIONS, BaselineCache, InstancePool

__all__ = ["DEFAULT_DLLM_MODEL", "DllmRun", "run_dllm", "GEN_LENGTHS"]

DEFAULT_DLLM_MODEL = "embedded"
GEN_LENGTHS = (32, 64, 128)
BLOCK = 32


@dataclass
class DllmRun:
    """One side (plain or cached) of a comparison, as it stands."""

    label: str
    step: int = 0
    total: int = 0
    text: str = ""
    done: bool = False
    seconds: float = 0.0
    nfe: int = 0
    accuracy: float | None = None  # exact match over the batch
    token_accuracy: float | None = None
    tokens_per_s: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)


_POOLS: dict[str, InstancePool] = {}
_LOCK = threading.Lock()
_BASELINES = BaselineCache()


def _model_dir(name: str) -> str:
    from dcache.eval.bench_dllm import default_model_dir

    name = (name or "").strip()
    if name in ("", DEFAULT_DLLM_MODEL):
        return default_model_dir()
    if not os.path.isdir(name):
        raise ValueError(f"dLLM model must be {DEFAULT_DLLM_MODEL!r} or a local LLaDA model directory; {name!r} is not a directory")
    return name


def _pool(name: str) -> InstancePool:
    path = _model_dir(name)
    with _LOCK:
        if path in _POOLS:
            return _POOLS[path]
    from dcache.pipelines.dllm.modeling import LLaDAModelLM

    try:
        first = LLaDAModelLM.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any loading failure is reported the same way
        raise ValueError(f"cannot load a LLaDA model from {path!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    first.eval()
    pool = InstancePool(lambda: copy.deepcopy(first), initial=[first])
    with _LOCK:
        return _POOLS.setdefault(path, pool)


def _check(seed: Any, gen_length: Any, batch: Any) -> tuple[int, int, int]:
    try:
        seed, gen_length, batch = int(seed), int(gen_length), int(batch)
    except (TypeError, ValueError):
        raise ValueError("seed, answer length and batch must be integers") from None
    if gen_length not in GEN_LENGTHS:
        raise ValueError(f"answer length must be one of {GEN_LENGTHS}, got {gen_length}")
    if not 1 <= batch <= 16:
        raise ValueError(f"batch must be in [1, 16], got {batch}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return seed, gen_length, batch


def _stream(model: Any, prompts: torch.Tensor, answers: torch.Tensor, gen_length: int, run: DllmRun,
            config: Any | None) -> Iterator[DllmRun]:
    """Generate in a worker thread; yield ``run`` each time a new step has been rendered."""
    from dcache.pipelines.dllm import tasks

    updates: queue.Queue = queue.Queue()
    result: dict[str, Any] = {}
    run.total = gen_length

    def callback(step, tokens, committed):
        updates.put((step, tasks.render(tokens[0])))

    def work():
        try:
            if config is not None:
                dcache.accelerate(model, config)
            try:
                with GENERATIONS.shared():
                    t0 = time.perf_counter()
                    out = model.generate(prompts, gen_length=gen_length, block_length=BLOCK, steps=gen_length,
                                         callback=callback)
                    result["seconds"] = time.perf_counter() - t0
                result["out"] = out
                result["stats"] = model.dcache.stats() if config is not None else {}
            finally:
                if config is not None:
                    dcache.disable(model)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = e
        finally:
            updates.put(None)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    last = 0.0
    while True:
        item = updates.get()
        if item is None:
            break
        run.step, run.text = item
        if time.perf_counter() - last > 0.15:  # the page needs no more than a few frames a second
            last = time.perf_counter()
            yield run
    worker.join()
    if "error" in result:
        raise result["error"]
    out = result["out"]
    run.done, run.seconds, run.nfe, run.stats = True, result["seconds"], int(out.nfe), result["stats"]
    run.text = tasks.render(out.sequences[0])
    run.accuracy = tasks.exact_match(out.sequences, answers)
    run.token_accuracy = float((out.sequences.cpu() == answers.cpu()).float().mean())
    run.tokens_per_s = out.sequences.numel() / run.seconds
    run.step = out.steps
    yield run


def problem(seed: int, gen_length: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    from dcache.pipelines.dllm import tasks

    return tasks.make_problems(batch, gen_length=gen_length, n_range=(gen_length * 3 // 4, min(gen_length, tasks.FIELD)),
                               seed=seed)


def run_dllm(model_name: str, seed: Any, gen_length: Any, batch: Any, policy: str,
             options: dict[str, Any]) -> Iterator[tuple[DllmRun, DllmRun | None]]:
    """Yield (plain, cached) as both fill in; the plain run is cached per (model, seed, length, batch)."""
    from dcache.demos.knobs import build_config

    seed, gen_length, batch = _check(seed, gen_length, batch)
    config = build_config(policy, "dllm", options)
    pool = _pool(model_name)
    prompts, answers = problem(seed, gen_length, batch)
    key = (_model_dir(model_name), seed, gen_length, batch)
    base = _BASELINES.get(key)
    if base is None:
        base = DllmRun("plain sampler")
        with pool.checkout() as model:
            for _ in _stream(model, prompts, answers, gen_length, base, None):
                yield base, None
        _BASELINES.put(key, base)
    cached = DllmRun(type(config).policy_name)
    with pool.checkout() as model:
        for _ in _stream(model, prompts, answers, gen_length, cached, config):
            yield base, cached


def render_prompt(seed: int, gen_length: int) -> tuple[str, str]:
    """The first problem's prompt and its expected answer, rendered (for the page)."""
    from dcache.pipelines.dllm import tasks

    prompts, answers = problem(seed, gen_length, 1)
    return tasks.render(prompts[0]), tasks.render(answers[0])

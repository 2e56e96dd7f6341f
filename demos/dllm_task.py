"""The dLLM tab's work: one "scripts" problem set, the plain sampler and a KV policy, streamed.

The embedded model (``pipelines/zoo/dllm_scripts``, see ``dcache.pipelines.dllm.scripts_task``)
copies a 16-digit message cyclically over the whole answer, every digit in ONE of the 2-3 scripts
the prompt allows, its choice. Each prompt has 2-3 valid answers, so accuracy is the share of rows
that are one of them (``scripts_task.valid_rows``); the cached run also reports the share of its
tokens equal to the plain sampler's. Prompts are left-padded and the prompt mask is passed to the
sampler, as the model was trained. Each generation reports its canvas after every step
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
    accuracy: float | None = None  # share of rows that are a valid answer
    agreement: float | None = None  # share of tokens equal to the plain sampler's (cached run only)
    tokens: torch.Tensor | None = None  # the generated canvases (batch, gen_length), when done
    tokens_per_s: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)


_POOLS: dict[str, InstancePool] = {}
_LOCK = threading.Lock()
_BASELINES = BaselineCache()


def _model_dir(name: str) -> str:
    from dcache.eval.bench_dllm import default_model_dir

    name = (name or "").strip()
    if name in ("", DEFAULT_DLLM_MODEL):
        return default_model_dir("llada")
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


def _stream(model: Any, prompts: torch.Tensor, mask: torch.Tensor, gen_length: int, run: DllmRun,
            config: Any | None, plain: DllmRun | None = None) -> Iterator[DllmRun]:
    """Generate in a worker thread; yield ``run`` each time a new step has been rendered.
    ``plain``: the finished plain run the token agreement is measured against."""
    from dcache.pipelines.dllm import scripts_task as task

    updates: queue.Queue = queue.Queue()
    result: dict[str, Any] = {}
    run.total = gen_length

    def callback(step, tokens, committed):
        updates.put((step, task.render(tokens[0])))

    def work():
        try:
            if config is not None:
                dcache.accelerate(model, config)
            try:
                with GENERATIONS.shared():
                    t0 = time.perf_counter()
                    out = model.generate(prompts, attention_mask=mask, gen_length=gen_length, block_length=BLOCK, steps=gen_length,
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
    run.tokens = out.sequences.cpu()
    run.text = task.render(run.tokens[0])
    run.accuracy = task.accuracy(run.tokens, prompts, mask)
    if plain is not None and plain.tokens is not None:
        run.agreement = float((run.tokens == plain.tokens).float().mean())
    run.tokens_per_s = out.sequences.numel() / run.seconds
    run.step = out.steps
    yield run


def problem(seed: int, gen_length: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompts (batch, P) left-padded, their attention mask) of the seed's problem set."""
    from dcache.pipelines.dllm import scripts_task as task

    prompts, mask, _ = task.make_problems(batch, gen_length=gen_length, seed=seed)
    return prompts, mask


def run_dllm(model_name: str, seed: Any, gen_length: Any, batch: Any, policy: str,
             options: dict[str, Any]) -> Iterator[tuple[DllmRun, DllmRun | None]]:
    """Yield (plain, cached) as both fill in; the plain run is cached per (model, seed, length, batch)."""
    from dcache.demos.knobs import build_config

    seed, gen_length, batch = _check(seed, gen_length, batch)
    config = build_config(policy, "dllm", options)
    pool = _pool(model_name)
    prompts, mask = problem(seed, gen_length, batch)
    key = (_model_dir(model_name), seed, gen_length, batch)
    base = _BASELINES.get(key)
    if base is None:
        base = DllmRun("plain sampler")
        with pool.checkout() as model:
            for _ in _stream(model, prompts, mask, gen_length, base, None):
                yield base, None
        _BASELINES.put(key, base)
    cached = DllmRun(type(config).policy_name)
    with pool.checkout() as model:
        for _ in _stream(model, prompts, mask, gen_length, cached, config, plain=base):
            yield base, cached


def render_prompt(seed: int, gen_length: int, batch: int = 1) -> tuple[str, str]:
    """The first problem's prompt (padding dropped) and its valid answers, rendered (for the page).
    ``batch``: the batch the problems are drawn in (the draw depends on it)."""
    from dcache.eval.targets import dllm_valid_answers
    from dcache.pipelines.dllm import scripts_task as task

    prompts, mask = problem(seed, gen_length, batch)
    valid = dllm_valid_answers(prompts[0], mask[0], gen_length)
    return task.render(prompts[0][mask[0]]), " or\n".join(task.render(a) for a in valid)

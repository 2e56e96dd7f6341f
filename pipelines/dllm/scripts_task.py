"""The reference dLLM task "scripts": copy a message cyclically in ONE of the allowed scripts.

A prompt lists 2 or 3 allowed scripts (out of 4) and a 16-digit message. The answer fills the
whole generation canvas with the message repeated (answer slot ``i`` holds message digit
``i mod 16``), every digit written in the same script, which the model chooses freely among the
allowed ones. So each prompt has 2-3 valid answers and the answer tokens constrain each other:

* a position's digit follows from the prompt (or from the decoded position 16 slots away), but
  its script is a free choice that must agree with every other answer token;
* decoding all positions independently (one-shot, or with answer-to-answer attention cut) mixes
  scripts; a cache that never sees decoded tokens lets later blocks choose again.

A generated canvas is correct when it equals one of the valid answers exactly.

Token ids (vocab 64)::

    0-9 plain digits (the message), 10*s + d digit d in script s (s = 1..4, ids 10-49),
    50-53 script markers S1..S4, 54 BOS, 55 SEP, 56 EOS (also padding), 57 MASK

Prompt: ``[BOS, S_a, S_b(, S_c), SEP, m0 .. m15, SEP]`` (20 or 21 tokens; left-padded in a batch).

Example::

    prompts, mask, answers = make_problems(8, gen_length=256, seed=0)
    acc = accuracy(generated, prompts, mask)
"""

from __future__ import annotations

import torch

__all__ = ["VOCAB", "PERIOD", "N_SCRIPTS", "BOS", "SEP", "EOS", "MASK", "PAD", "make_problems",
           "valid_rows", "accuracy", "script_mix", "render", "PROMPT_MAX"]

VOCAB = 64
PERIOD = 16
N_SCRIPTS = 4
MARK0 = 50
BOS, SEP, EOS, MASK = 54, 55, 56, 57
PAD = EOS
PROMPT_MAX = 1 + 3 + 1 + PERIOD + 1


def make_problems(count: int, gen_length: int, seed: int | None = None, generator: torch.Generator | None = None,
                  n_allowed: tuple[int, ...] = (2, 3)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` problems → prompts (count, 21) left-padded with PAD, their attention mask (bool),
    and one valid answer per row (count, gen_length), its script drawn uniformly from the allowed."""
    if not isinstance(gen_length, int) or gen_length < 1:
        raise ValueError(f"gen_length must be a positive int, got {gen_length!r}")
    if not set(n_allowed) <= {1, 2, 3, 4}:
        raise ValueError(f"n_allowed must be a subset of (1, 2, 3, 4), got {n_allowed!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else seed)
    na = torch.tensor(n_allowed)[torch.randint(len(n_allowed), (count,), generator=g)]
    # allowed scripts: the first na of a random permutation of 1..4, listed in increasing order
    perm = torch.argsort(torch.rand(count, N_SCRIPTS, generator=g), dim=1) + 1
    rank = torch.arange(N_SCRIPTS)[None]
    allowed = torch.where(rank < na[:, None], perm, torch.full_like(perm, 99)).sort(1).values  # 99 = unused
    msg = torch.randint(0, 10, (count, PERIOD), generator=g)
    prompts = torch.full((count, PROMPT_MAX), PAD)
    mask = torch.zeros((count, PROMPT_MAX), dtype=torch.bool)
    for r in range(count):
        marks = [MARK0 + int(s) - 1 for s in allowed[r, : int(na[r])]]
        row = [BOS, *marks, SEP, *msg[r].tolist(), SEP]
        prompts[r, PROMPT_MAX - len(row):] = torch.tensor(row)
        mask[r, PROMPT_MAX - len(row):] = True
    pick = allowed.gather(1, (torch.rand(count, 1, generator=g) * na[:, None]).long())  # (count, 1)
    digits = msg[:, torch.arange(gen_length) % PERIOD]
    return prompts, mask, pick * 10 + digits


def _parse(prompts: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Message (B, 16) and allowed-script mask (B, 5) of each prompt row."""
    prompts, mask = prompts.cpu(), mask.cpu().bool()
    msg = prompts[:, -1 - PERIOD:-1]
    allowed = torch.zeros(prompts.shape[0], N_SCRIPTS + 1, dtype=torch.bool)
    is_mark = (prompts >= MARK0) & (prompts < MARK0 + N_SCRIPTS) & mask
    rows, cols = is_mark.nonzero(as_tuple=True)
    allowed[rows, prompts[rows, cols] - MARK0 + 1] = True
    return msg, allowed


def valid_rows(generated: torch.Tensor, prompts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the generated canvas is one of its prompt's valid answers."""
    if generated.shape[0] != prompts.shape[0] or prompts.shape != mask.shape:
        raise ValueError(f"generated {tuple(generated.shape)}, prompts {tuple(prompts.shape)} and mask "
                         f"{tuple(mask.shape)} do not describe the same rows")
    gen = generated.cpu()
    msg, allowed = _parse(prompts, mask)
    G = gen.shape[1]
    digits = msg[:, torch.arange(G) % PERIOD]
    script = gen // 10
    first = script[:, :1]
    ok = (gen >= 10) & (gen < 10 * (N_SCRIPTS + 1)) & (gen % 10 == digits) & (script == first)
    ok_script = allowed.gather(1, first.clamp(0, N_SCRIPTS))[:, 0]
    return ok.all(1) & ok_script


def accuracy(generated: torch.Tensor, prompts: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of rows whose generated canvas is a valid answer."""
    return valid_rows(generated, prompts, mask).float().mean().item()


def script_mix(generated: torch.Tensor) -> float:
    """Fraction of rows that use more than one script (the failure independent decoding produces)."""
    s = generated.cpu() // 10
    s = torch.where((generated.cpu() >= 10) & (generated.cpu() < 50), s, torch.full_like(s, -1))
    return ((s != s[:, :1]) & (s >= 0)).any(1).float().mean().item()


def render(ids: torch.Tensor) -> str:
    """One row as text: plain digits, scripts as letters a-d + digit, markers as A-D."""
    out = []
    for t in ids.tolist():
        if t < 10:
            out.append(str(t))
        elif t < 50:
            out.append("abcd"[t // 10 - 1] + str(t % 10))
        elif t < 54:
            out.append("ABCD"[t - MARK0])
        else:
            out.append({BOS: "^", SEP: "|", EOS: "$", MASK: "?"}.get(t, "#"))
    return " ".join(out)

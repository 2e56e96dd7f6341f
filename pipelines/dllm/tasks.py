"""The synthetic task of the reference dLLM: a keyed digit cipher with long exact answers.

A problem is a key digit ``k`` and a message of ``n`` digits (1 ≤ n ≤ 128) written into a
128-slot field padded with FILL. The answer is the message with ``k`` added to every digit
(mod 10), followed by EOS up to the generation length. Every answer token is determined exactly,
so accuracy is exact match of the whole generated canvas.

Token ids (vocab 32)::

    0-9 digits, 10-19 key digits K0..K9, 20 BOS, 21 SEP, 22 FILL, 23 EOS, 24 MASK

Example::

    prompts, answers = make_problems(8, gen_length=128, n_range=(96, 128), seed=0)
    acc = exact_match(generated, answers)
"""

from __future__ import annotations

import torch

__all__ = ["VOCAB", "FIELD", "BOS", "SEP", "FILL", "EOS", "MASK", "make_problems", "exact_match", "render"]

VOCAB = 32
FIELD = 128
BOS, SEP, FILL, EOS, MASK = 20, 21, 22, 23, 24


def make_problems(
    count: int, gen_length: int = 128, n_range: tuple[int, int] = (1, FIELD), seed: int | None = None,
    generator: torch.Generator | None = None, key_zero_frac: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` problems: prompts (count, FIELD + 3) and answers (count, gen_length).

    ``key_zero_frac``: extra share of key-0 problems (plain copies). Training uses some, because
    with uniform keys neither the copy nor the key lookup lowers the loss on its own."""
    lo, hi = n_range
    if not (1 <= lo <= hi <= min(FIELD, gen_length)):
        raise ValueError(f"n_range must satisfy 1 <= lo <= hi <= min({FIELD}, gen_length={gen_length}), got {n_range}")
    g = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else seed)
    n = torch.randint(lo, hi + 1, (count,), generator=g)
    key = torch.randint(0, 10, (count,), generator=g)
    if key_zero_frac > 0:
        key = torch.where(torch.rand(count, generator=g) < key_zero_frac, torch.zeros_like(key), key)
    msg = torch.randint(0, 10, (count, FIELD), generator=g)
    slot = torch.arange(FIELD)[None]
    in_msg = slot < n[:, None]
    field = torch.where(in_msg, msg, torch.full_like(msg, FILL))
    prompts = torch.cat([torch.full((count, 1), BOS), (key + 10)[:, None], field, torch.full((count, 1), SEP)], 1)
    ans = torch.full((count, gen_length), EOS)
    m = min(FIELD, gen_length)
    ans[:, :m] = torch.where(in_msg[:, :m], (msg[:, :m] + key[:, None]) % 10, torch.full_like(msg[:, :m], EOS))
    return prompts, ans


def exact_match(generated: torch.Tensor, answers: torch.Tensor) -> float:
    """Fraction of rows whose whole generated canvas equals the answer."""
    if generated.shape != answers.shape:
        raise ValueError(f"generated {tuple(generated.shape)} and answers {tuple(answers.shape)} differ in shape")
    return (generated.cpu() == answers.cpu()).all(dim=1).float().mean().item()


def render(ids: torch.Tensor) -> str:
    names = {BOS: "^", SEP: "|", FILL: "_", EOS: "$", MASK: "?"}
    return "".join(names.get(int(t), str(int(t) % 10) if int(t) < 20 else "#") for t in ids)

"""`hyca`: a solver per channel group, chosen from a profile (HyCa, arXiv 2510.04188).

HyCa models a hidden feature as a mixture of ODEs across its channels: channels evolve
differently, so each channel cluster gets the solver that suits it, chosen once offline and then
used at every step (shared/reference/caching-algorithms.md, "HyCa"). Here the pool is the three
solvers that read one FoCa history (``dcache.kernels.foca``): reuse (the last computed value),
first-order Taylor (the last computed value plus the anchor derivative times the distance) and
FoCa (BDF2 predictor + Heun corrector); clusters are contiguous groups of ``group_size`` channels
of the site's last dimension.

The schedule is FoCa's (warm-up, every ``interval`` steps, the last step). The choice comes from
a profile file:

* **profile run** (``profile_out=<file>``): every step is computed (the images are the uncached
  ones), while each site replays the schedule in a shadow history: on the steps the schedule
  would forecast, each solver's prediction is compared with the value just computed and its
  squared error summed per channel group (that is each solver's error at 1..interval-1 steps
  ahead, the errors the schedule would make, not only one step ahead). At the end of every
  generation the file is (re)written with the cumulative errors and, per group, the solver with
  the least error (ties go to the cheaper solver: reuse, then Taylor, then FoCa).
* **use** (``profile=<file>``): the solver codes are loaded; a profile measured on another model
  (denoiser class, config hash, site names or channel counts differ) is a ValueError.

Example::

    with dcache.accelerated(pipe, "hyca", profile_out="hyca.json"):
        pipe(prompt, num_inference_steps=50)           # profile run: computes every step
    pipe = dcache.accelerate(pipe, "hyca", profile="hyca.json", interval=5)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from dcache.kernels import foca as foca_ops
from dcache.registry import register_policy
from dcache.schedulers._base import Action, PolicyEnv
from dcache.schedulers._common import require_blocks
from dcache.schedulers._validate import check_bool, check_choice, check_int
from dcache.schedulers.foca import DTYPES, FoCaPolicy, FoCaSite, FoCaState, scheduled_compute

logger = logging.getLogger(__name__)

FORMAT = "dcache.hyca/1"


class HyCaState(FoCaState):
    """Per-branch schedule state; in a profile run also the shadow schedule's last compute."""

    def reset(self) -> None:
        super().reset()
        self.shadow_last: int | None = None


class HyCaSite(FoCaSite):
    __slots__ = ("name", "codes", "uses_foca", "taylor_mask", "shadow")

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.codes: torch.Tensor | None = None  # one solver code per channel (use mode)
        self.uses_foca = True
        self.taylor_mask: torch.Tensor | None = None
        self.shadow: FoCaSite | None = None  # the schedule replayed during a profile run


def group_codes(errors: torch.Tensor) -> list[int]:
    """Per group, the solver with the least summed error; ties go to the lower code (cheaper)."""
    return [int(min(range(errors.shape[0]), key=lambda s: (float(errors[s, g]), s))) for g in range(errors.shape[1])]


def load_profile(path: str) -> dict:
    try:
        with open(path) as f:
            profile = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"hyca: profile file {path!r} not found; write one with profile_out={path!r}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"hyca: cannot read profile {path!r}: {e}") from None
    if not isinstance(profile, dict) or profile.get("format") != FORMAT:
        raise ValueError(f"hyca: {path!r} is not a hyca profile (expected format {FORMAT!r})")
    return profile


class HyCaPolicy(FoCaPolicy):
    named_sites = True

    def __init__(self, config: "HyCaConfig", env: PolicyEnv, profile: dict | None) -> None:
        super().__init__(config)
        self.env = env
        self.profile = profile
        self.profiling = config.profile_out is not None
        # Profile run: per site name, summed squared error (solver, group) and the channel count.
        self.errors: dict[str, torch.Tensor] = {}
        self.channels: dict[str, int] = {}

    def new_state(self) -> HyCaState:
        return HyCaState()

    def new_site_state(self, *name: str) -> HyCaSite:
        return HyCaSite(name[0] if name else "")

    @torch.compiler.disable
    def action(self, state: HyCaState, step: Any) -> Action:
        if not self.profiling:
            return super().action(state, step)
        c = self.config
        shadow = scheduled_compute(_Shadow(state), step, c.interval, c.warmup_steps, c.compute_last)
        if shadow:
            state.shadow_last = step.index
        step.decisions[(id(self), "shadow")] = shadow
        state.computes += 1
        state.last_compute = step.index
        return Action.COMPUTE

    # -- use ---------------------------------------------------------------------------------
    @torch.compiler.disable
    def produce(self, site: HyCaSite, step: Any) -> torch.Tensor:
        self._codes(site)  # sets uses_foca / taylor_mask on first use
        if site.uses_foca:
            return super().produce(site, step)
        # No FoCa channel: reuse and Taylor read only the anchor, one pass, no window to advance
        # (a second-order scheduler's corrector call at the same step gets the same value).
        site.cur_step = step.index
        return foca_ops.anchored(site.hist, float(step.index - site.full_step), site.taylor_mask, site.dtype)

    def _codes(self, site: HyCaSite) -> torch.Tensor:
        if site.codes is None or site.codes.device != site.hist.device:
            entry = self._entry(site.name, site.hist.shape[-1])
            gs = self.profile["group_size"]
            per_channel = [entry["solvers"][i // gs] for i in range(entry["channels"])]
            site.codes = torch.tensor(per_channel, dtype=torch.int32, device=site.hist.device)
            site.uses_foca = foca_ops.FOCA in per_channel
            site.taylor_mask = None if foca_ops.TAYLOR not in per_channel else (site.codes == foca_ops.TAYLOR).float()
        return site.codes

    def _entry(self, name: str, channels: int) -> dict:
        entry = self.profile["sites"].get(name)
        where = f"hyca: profile {self.config.profile!r} was measured on {self.profile['model']['class']}"
        if entry is None:
            raise ValueError(f"{where} and has no site {name!r}: it is the profile of another model; "
                             "run a profile run (profile_out=...) on this one")
        if entry["channels"] != channels:
            raise ValueError(f"{where}: site {name!r} has {entry['channels']} channels there, {channels} here; "
                             "run a profile run (profile_out=...) on this model")
        return entry

    # -- profile run -------------------------------------------------------------------------
    @torch.compiler.disable
    def store(self, site: HyCaSite, value: torch.Tensor, step: Any) -> None:
        if self.profiling:  # every step computes: only the shadow history is ever read
            self._shadow(site, value, step)
            return
        super().store(site, value, step)

    def _shadow(self, site: HyCaSite, value: torch.Tensor, step: Any) -> None:
        if site.shadow is None:
            site.shadow = FoCaSite()
        sh = site.shadow
        if sh.n_full > 0 and step.index == sh.cur_step:
            return  # a corrector sub-call: the history keeps the step's first value
        if step.decisions.get((id(self), "shadow"), True) or sh.hist is None or sh.hist.shape[1:] != value.shape:
            super().store(sh, value, step)
            return
        x = value.detach().float()
        full, dfull = sh.hist[foca_ops.FULL].float(), sh.hist[foca_ops.DFULL].float()
        k = float(step.index - sh.full_step)
        preds = [full, full + k * dfull]
        h = float(step.index - sh.cur_step)
        preds.append(foca_ops.forecast(sh.hist, h, torch.float32))
        sh.cur_step = step.index
        channels = x.shape[-1]
        gs = self.config.group_size
        groups = -(-channels // gs)
        pad = groups * gs - channels
        err = torch.stack([((p - x) ** 2).reshape(-1, channels).sum(0) for p in preds]).double()
        err = torch.nn.functional.pad(err, (0, pad)).reshape(3, groups, gs).sum(-1)
        if site.name in self.channels and self.channels[site.name] != channels:
            raise ValueError(f"hyca: site {site.name!r} changed from {self.channels[site.name]} to {channels} channels "
                             "within a profile run")
        self.channels[site.name] = channels
        self.errors[site.name] = self.errors.get(site.name, 0) + err.cpu()

    def profile_dict(self) -> dict:
        c = self.config
        sites = {}
        for name in sorted(self.errors):
            err = self.errors[name]
            sites[name] = {"channels": self.channels[name], "solvers": group_codes(err),
                           "errors": [[float(v) for v in row] for row in err.tolist()]}
        return {
            "format": FORMAT,
            "model": {"class": self.env.model_class, "config_hash": self.env.config_hash,
                      "model_id": self.env.model_id},
            "schedule": {"interval": c.interval, "warmup_steps": c.warmup_steps, "compute_last": c.compute_last},
            "group_size": c.group_size,
            "solver_names": list(foca_ops.SOLVERS),
            "sites": sites,
        }

    def on_run_end(self) -> None:
        if not self.profiling or not self.errors:
            return
        profile = self.profile_dict()
        path = self.config.profile_out
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(profile, f, indent=1)
        counts = [0, 0, 0]
        for s in profile["sites"].values():
            for code in s["solvers"]:
                counts[code] += 1
        logger.info("hyca: wrote a profile of %d sites to %s (groups: %s)", len(profile["sites"]), path,
                    ", ".join(f"{n} {k}" for n, k in zip(counts, foca_ops.SOLVERS)))


class _Shadow:
    """The shadow schedule's view of a state, for ``scheduled_compute``."""

    def __init__(self, state: HyCaState) -> None:
        self.last_compute = state.shadow_last


@register_policy("hyca", description="module-level forecast with a solver (reuse / Taylor / FoCa) per channel group, from a profile",
                 granularity="module")
@dataclass
class HyCaConfig:
    """HyCa.

    Args:
        profile: a profile file to use (written by a profile run on the same model).
        profile_out: make this a profile run: compute every step, measure each solver per channel
            group under the schedule below, write the profile here at the end of each generation.
            Exactly one of ``profile`` and ``profile_out`` is given.
        interval: compute every ``interval`` steps after warm-up, forecast in between (as ``foca``).
            In use it may differ from the profile's, but the choice was measured for the profile's.
        warmup_steps: leading steps always computed.
        compute_last: also compute the final step.
        group_size: channels per group in a profile run (contiguous in the last dimension; HyCa
            clusters channels by their dynamics, a contiguous split is the simplest clustering).
            In use the profile's group size applies.
        dtype: storage dtype of the history (as ``foca``).
    """

    profile: str | None = None
    profile_out: str | None = None
    interval: int = 5
    warmup_steps: int = 3
    compute_last: bool = True
    group_size: int = 8
    dtype: str | None = None

    def __post_init__(self) -> None:
        if (self.profile is None) == (self.profile_out is None):
            raise ValueError("hyca: give exactly one of profile=<file> (a profile to use) and "
                             "profile_out=<file> (a profile run that writes one)")
        for name in ("profile", "profile_out"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"hyca: {name} must be a file path, got {v!r}")
        if self.profile is not None:
            load_profile(self.profile)  # a missing or foreign file fails here, before any generation
        check_int("hyca", "interval", self.interval, 1)
        check_int("hyca", "warmup_steps", self.warmup_steps, 0)
        check_bool("hyca", "compute_last", self.compute_last)
        check_int("hyca", "group_size", self.group_size, 1)
        check_choice("hyca", "dtype", self.dtype, tuple(DTYPES))

    def build(self, env: PolicyEnv) -> HyCaPolicy:
        require_blocks(env.has_blocks, env.family, "hyca forecasts module outputs inside transformer blocks")
        profile = None
        if self.profile is not None:
            profile = load_profile(self.profile)
            model = profile.get("model", {})
            if (model.get("class"), model.get("config_hash")) != (env.model_class, env.config_hash):
                raise ValueError(
                    f"hyca: profile {self.profile!r} was measured on {model.get('class')} (config hash "
                    f"{model.get('config_hash')}), this model is {env.model_class} (config hash {env.config_hash}); "
                    "run a profile run (profile_out=...) on this model"
                )
        return HyCaPolicy(self, env, profile)

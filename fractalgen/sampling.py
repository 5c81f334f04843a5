"""Sampling controls: classifier-free guidance, filter threshold, temperature, schedules.

Guidance follows the official semantics: the batch is doubled as
``[conditional rows; unconditional rows]`` through every level and guidance acts only on the
final 256-way logits (and the guiding-pixel logits). ``temperature`` here is a true temperature
(logits are divided by it); ``official_temperature=True`` reproduces the official code, which
*multiplies* the logits by ``temperature`` (so its 1.02-1.1 sharpen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import SamplingError

#: The official sampling settings per preset family: cfg, temperature (official, multiplying).
OFFICIAL_SETTINGS = {
    "fractalar_in64": dict(cfg=11.0, temperature=1.03, num_iter=(64, 16)),
    "fractalmar_in64": dict(cfg=6.5, temperature=1.02, num_iter=(64, 16)),
    "fractalmar_base_in256": dict(cfg=29.0, temperature=1.1, num_iter=(64, 16, 16), filter_threshold=1e-3),
    "fractalmar_large_in256": dict(cfg=21.0, temperature=1.1, num_iter=(64, 16, 16), filter_threshold=1e-3),
    "fractalmar_huge_in256": dict(cfg=19.0, temperature=1.1, num_iter=(64, 16, 16), filter_threshold=1e-3),
}


@dataclass
class SamplingConfig:
    """How to draw samples; defaults give plain ancestral sampling."""

    cfg: float = 1.0
    cfg_schedule: str = "constant"          # "constant", or "linear" (ramps at level 0 only)
    temperature: float = 1.0
    official_temperature: bool = False      # multiply logits by temperature, as the official code
    filter_threshold: float = 1e-4
    num_iter: tuple[int, ...] = field(default_factory=tuple)  # MAR iterations per level; default 64, 16, 16, ...

    def __post_init__(self) -> None:
        self.num_iter = tuple(int(n) for n in self.num_iter)
        if self.cfg_schedule not in ("constant", "linear"):
            raise SamplingError(f"cfg_schedule must be 'constant' or 'linear', got {self.cfg_schedule!r}")
        if self.temperature <= 0:
            raise SamplingError(f"temperature must be > 0, got {self.temperature}")
        if self.cfg < 0:
            raise SamplingError(f"cfg must be >= 0 (1 = no guidance), got {self.cfg}")
        if any(n < 1 for n in self.num_iter):
            raise SamplingError(f"num_iter entries must be >= 1, got {self.num_iter}")

    @property
    def guided(self) -> bool:
        """Whether the batch carries unconditional rows for classifier-free guidance."""
        return self.cfg != 1.0

    def iterations(self, level: int) -> int:
        """MAR iteration count at ``level`` (official: 64 at level 0, 16 below)."""
        if level < len(self.num_iter):
            return self.num_iter[level]
        return 64 if level == 0 else 16

    @classmethod
    def official(cls, preset: str, **overrides) -> "SamplingConfig":
        """The official sampling settings of a preset (linear cfg schedule, multiplying temperature)."""
        if preset not in OFFICIAL_SETTINGS:
            raise SamplingError(f"no official sampling settings for {preset!r}; known: {', '.join(OFFICIAL_SETTINGS)}")
        args = dict(cfg_schedule="linear", official_temperature=True, **OFFICIAL_SETTINGS[preset])
        args.update(overrides)
        return cls(**args)


def settings_key(settings: SamplingConfig) -> tuple:
    """What of ``settings`` a sampling step's computation depends on (graphs are kept per key)."""
    return (settings.cfg, settings.cfg_schedule, settings.temperature, settings.official_temperature,
            settings.filter_threshold, settings.num_iter)


def linear_cfg(cfg: float, progress: float) -> float:
    """Linear guidance ramp at level 0: 1 + (cfg - 1) * progress, progress in (0, 1]."""
    return 1.0 + (cfg - 1.0) * progress


#: Subtracted from a logit, takes it out of any maximum with a finite float32 logit.
_OUT_OF_REACH = 1e30


def guided_probs(logits: Tensor, cfg_now: float | Tensor, settings: SamplingConfig) -> Tensor:
    """Sampling probabilities (n, V) from V-way logits after temperature and guidance; guided
    logits arrive as [cond; uncond] rows (2n). ``cfg_now`` may be a 0-dim tensor (graphs)."""
    logits = logits.float()
    if settings.temperature != 1.0:
        logits = logits * settings.temperature if settings.official_temperature else logits / settings.temperature
    if settings.guided:
        cond, uncond = logits.chunk(2)
        if settings.filter_threshold > 0:
            # Where the conditional model finds a value very unlikely, raise the unconditional
            # logit to the conditional one shifted to the same maximum, so guidance cannot pick
            # it (official filter). The values are selected by arithmetic: a select by a random
            # boolean mask branches per element in torch's CPU kernels (5-8x slower).
            top = logits.amax(-1, keepdim=True).chunk(2)
            above = torch.sign(torch.softmax(cond, dim=-1) - settings.filter_threshold).add_(1)  # 0 below
            uncond = torch.maximum(uncond, (cond + (top[1] - top[0])).sub_(above, alpha=_OUT_OF_REACH))
        logits = torch.lerp(uncond, cond, cfg_now)  # uncond + cfg (cond - uncond)
    return torch.softmax(logits, dim=-1)


def draw(probs: Tensor, uniform: Tensor) -> Tensor:
    """One index per row of ``probs`` (n, V) by inverting the CDF at ``uniform`` (n, 1) in [0, 1)
    (much cheaper than torch.multinomial for the many small batches of pixel-by-pixel sampling;
    the uniforms come from outside so that this can run inside a compiled graph)."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def cosine_mask_ratio(step: int, num_iter: int) -> float:
    """Fraction of tokens still masked after ``step`` of the MAR cosine schedule (before clamping)."""
    return math.cos(math.pi / 2.0 * (step + 1) / num_iter)

"""Training in parts: a batch's loss back-propagated piece by piece, so that only one piece's
activations are in memory at a time (the lower levels hold most of a 64px model's).

Images, and the patches below level 0 given their conditions, are modelled independently, so the
loss splits exactly into the losses of groups of images and, within each, of groups of the patches
level 0 hands down. A lower group's gradient reaches level 0 through detached conditions that are
back-propagated once all its groups are done: the same gradients as one backward of the whole
loss with the same masks (up to summation order), without recomputation. MAR masks are drawn for
the whole batch first, so every part knows the loss denominators. Each backward runs with
autocast disabled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .levels import MARLevel
from .pixel import PixelHead

#: ``mask_fn(level, n, seq_len, device)`` -> bool mask (n, seq_len) for a MAR level, or None.
MaskFn = Callable[[int, int, int, torch.device], "Tensor | None"]


@dataclass
class Plan:
    """What every part needs: the network, and what the whole batch fixes before any part runs."""

    levels: nn.ModuleList      # the generator levels
    pixel: PixelHead           # the pixel transformer
    weighted: bool             # red-weighted pixel loss (train mode)
    lower_chunks: int          # groups the patches level 0 hands down are split into
    masks: list[Tensor | None]  # MAR mask of every level (None for AR levels: every patch goes down)
    rows: list[int]            # rows entering each level and the pixel transformer
    offsets: list[list[int]]   # per level, the first child row of every row


def plan_parts(levels: nn.ModuleList, pixel: PixelHead, batch: int, device: torch.device, mask_fn: MaskFn | None,
               weighted: bool, lower_chunks: int) -> Plan:
    """Draw the MAR masks of the whole batch and count the rows each level hands down."""
    masks, rows, offsets = [], [batch], []
    for index, level in enumerate(levels):
        mask = None
        if isinstance(level, MARLevel):
            mask = mask_fn(index, rows[-1], level.seq_len, device) if mask_fn is not None else None
            mask = level.random_mask(rows[-1], device) if mask is None else mask
        children = mask.sum(1) if mask is not None else torch.full((rows[-1],), level.seq_len, device=device)
        masks.append(mask)
        offsets.append(F.pad(children.cumsum(0), (1, 0)).tolist())
        rows.append(offsets[-1][-1])
    return Plan(levels, pixel, weighted, lower_chunks, masks, rows, offsets)


def backward_parts(plan: Plan, index: int, x: Tensor, conds: list[Tensor], lo: int, parts: int) -> Tensor:
    """Back-propagate the loss of the rows lo.. entering level ``index`` in ``parts`` groups; return its value."""
    total = torch.zeros((), device=x.device)
    bounds = torch.linspace(0, x.shape[0], parts + 1).long().tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a < b:
            surrogate, value = subtree_loss(plan, index, x[a:b], [c[a:b] for c in conds], lo + a)
            if surrogate.requires_grad:
                with torch.autocast(x.device.type, enabled=False):
                    surrogate.backward()
            total += value
    return total


def subtree_loss(plan: Plan, index: int, x: Tensor, conds: list[Tensor], lo: int) -> tuple[Tensor, Tensor]:
    """(what to back-propagate, loss value) for the rows lo.. entering level ``index``."""
    if x.shape[0] == 0:  # a part whose patches send nothing further down
        zero = torch.zeros((), device=x.device)
        return zero, zero
    if index == len(plan.levels):
        loss = plan.pixel.loss(conds[0], x.flatten(1), weighted=plan.weighted).sum() / plan.rows[-1]
        return loss, loss.detach()
    mask = plan.masks[index]
    children, child_conds, _, gp = plan.levels[index](x, conds, None if mask is None else mask[lo:lo + x.shape[0]])
    own = gp.sum() / plan.rows[index] if gp is not None else torch.zeros((), device=x.device)
    child_lo = plan.offsets[index][lo]
    if index == 0 and plan.lower_chunks > 1:
        leaves = [c.detach().requires_grad_() for c in child_conds]
        value = backward_parts(plan, 1, children, leaves, child_lo, plan.lower_chunks)
        surrogate = own + sum((c * leaf.grad).sum() for c, leaf in zip(child_conds, leaves) if leaf.grad is not None)
        return surrogate, value + own.detach()
    surrogate, value = subtree_loss(plan, index + 1, children, child_conds, child_lo)
    return own + surrogate, value + own.detach()

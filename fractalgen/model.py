"""The fractal generative model: a stack of generator levels ending in a pixel transformer.

>>> import torch
>>> from fractalgen import FractalGen, get_preset, SamplingConfig
>>> model = FractalGen(get_preset("fractalmar_fmnist28")).eval()
>>> images = model.sample(labels=torch.tensor([0, 7]), settings=SamplingConfig(num_iter=(2, 2)), seed=0)
>>> images.shape, images.dtype
(torch.Size([2, 1, 28, 28]), torch.uint8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backward import MaskFn, backward_parts, plan_parts
from .config import FractalConfig
from .context import Chooser, Known, SampleContext
from .errors import InputError, SamplingError
from .graphs import StepGraph, StepGraphs, bucket
from .levels import ARLevel, MARLevel, make_level
from .persistence import PretrainedMixin
from .pixel import PixelHead
from .runtime import busy_cores, eval_mode, intra_op_threads
from .sampling import SamplingConfig, settings_key

#: ``torch.compile`` modes offered for ``FractalGen.compile_sampling`` by the CLI and benchmarks.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: the modes in which torch replays compiled steps as CUDA graphs of its own (the sampler's are then off)
_TORCH_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class LossOutput:
    """Result of a forward pass; all values in nats."""

    loss: Tensor        # scalar objective: mean pixel loss + mean guiding-pixel loss of each level
    per_image: Tensor   # (B,) the same quantity for each image
    pixel: Tensor       # (B,) pixel-transformer part per image
    guiding: Tensor     # (B, levels with a guiding pixel) guiding-pixel part per image
    pixel_rows: Tensor  # (M,) pixel-transformer loss of every pixel that reached the last level
    pixel_index: Tensor  # (M,) where each of those pixels is: image * H * W + y * W + x

    @property
    def bits_per_dim(self) -> Tensor:
        """Per-image total in bits (for AR stacks the exact bits/dim)."""
        return self.per_image / math.log(2)

    def bits_map(self, batch: int, size: int, channels: int) -> tuple[Tensor, Tensor]:
        """Bits per pixel (summed over channels) as (B, H, W) maps, and which pixels were scored."""
        bits = torch.zeros(batch * size * size, dtype=torch.float64, device=self.pixel_rows.device)
        seen = torch.zeros_like(bits, dtype=torch.bool)
        bits[self.pixel_index] = self.pixel_rows.double() * channels / math.log(2)
        seen[self.pixel_index] = True
        return bits.view(batch, size, size), seen.view(batch, size, size)


#: Multiply-adds of a transformer-block call, on average over a sampling call, from which
#: ``threads_for_sampling`` lets sampling use more than one intra-op thread: measured on a 2-core
#: machine, the shipped AR model is as fast or faster on one thread at 24 images (3.3M) and 11%
#: faster on two at 80 (11M); the MAR models' passes over every token are far above.
THREADED_BLOCK_WORK = 8_000_000


def threads_for_sampling(config: FractalConfig, rows: int, settings: SamplingConfig,
                         busy: Callable[[], int] = lambda: 0) -> int:
    """Intra-op CPU threads to sample ``rows`` sequences (images, twice as many with guidance) with
    a model of ``config``: one for small steps, else torch's current count less the cores other
    programs keep busy (``busy()``, asked only then; at least one).

    Sampling is a chain of dependent steps, thousands of them, and every multi-threaded operation
    waits for its slowest thread: where a step multiplies a few rows by small weights, threads
    only add that wait, and a thread sharing its core with another program waits for its turn at
    every step (two threads on a 2-core machine with one core busy took 2.7x as long as one).
    The measure is the average multiply-adds of a block call over every level's steps (MAR
    levels with the iterations of ``settings``, whose chosen patches go down together)."""
    work = calls = 0.0
    runs = 1.0  # how often the level runs: the product of the steps above it
    for level in range(config.num_levels):
        width, depth = config.embed_dim_list[level], config.num_blocks_list[level]
        if level == config.num_levels - 1:  # the pixel transformer: one step per channel
            steps, tokens = config.channels, 1
        elif config.generator_type_list[level] == "ar":  # one token per step
            steps, tokens = config.seq_len(level), 1
        else:  # MAR: every token at each iteration
            steps, tokens = min(config.seq_len(level), settings.iterations(level)), config.seq_len(level)
        work += runs * steps * depth * rows * tokens * 12 * width ** 2
        calls += runs * steps * depth
        if level < config.num_levels - 1:
            rows *= config.seq_len(level) / steps
            runs *= steps
    return max(1, torch.get_num_threads() - busy()) if work / calls >= THREADED_BLOCK_WORK else 1


def _sample_threads(model: "FractalGen", threads: int | None, rows: int, settings: SamplingConfig) -> int:
    """The intra-op threads of a ``sample`` call (see there); InputError for a count below 1."""
    threads = model.sampling_threads if threads is None else threads
    if threads is None:
        cpu = model.device.type == "cpu"
        return threads_for_sampling(model.config, rows, settings, busy_cores) if cpu else torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be an integer >= 1 (or None to choose by the work), got {threads!r}")
    return threads


def _scatter_mean(values: Tensor, owner: Tensor, n: int) -> Tensor:
    """Mean of ``values`` per owner index 0..n-1, accumulated in float64."""
    sums = torch.zeros(n, device=values.device, dtype=torch.float64).index_add_(0, owner, values.double())
    return sums / torch.bincount(owner, minlength=n).clamp(min=1)


def _check_images(config: FractalConfig, images: Tensor) -> None:
    """Raise InputError unless images are integer (B, C, S, S) pixels a model of ``config`` takes."""
    c, s = config.channels, config.image_size
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise InputError(f"images must be a (batch, {c}, {s}, {s}) tensor, got {shape}")
    if images.dtype.is_floating_point or images.dtype == torch.bool:
        raise InputError(f"images must hold integer pixels 0..255 (uint8), got {images.dtype}; "
                         "normalisation happens inside the model")
    if tuple(images.shape[1:]) != (c, s, s):
        raise InputError(f"images of shape {tuple(images.shape[1:])} do not fit this model, which takes "
                         f"({c}, {s}, {s}) (channels, height, width); resize/convert them first")


def _check_labels(config: FractalConfig, labels: Tensor | None, batch: int | None,
                  device: torch.device) -> Tensor | None:
    """Validate class ids for a model of ``config``; returns them as a long tensor on ``device``."""
    if labels is None:
        return None
    if not config.conditional:
        raise InputError("this model is unconditional (class_num=0); do not pass labels")
    labels = torch.as_tensor(labels, device=device).long().reshape(-1)
    if batch is not None and labels.numel() != batch:
        raise InputError(f"got {labels.numel()} labels for {batch} images")
    bad = labels[(labels < 0) | (labels >= config.class_num)]
    if bad.numel():
        raise InputError(f"class id {int(bad[0])} is out of range: this model has {config.class_num} "
                         f"classes (0..{config.class_num - 1})")
    return labels


def _known_pixels(config: FractalConfig, known: Tensor | None, known_mask: Tensor | None, batch: int,
                  device: torch.device) -> Known | None:
    """Validate the pixels to keep and move them to ``device``; None when there are none."""
    if known is None and known_mask is None:
        return None
    if known is None or known_mask is None:
        raise InputError("give both known (pixels) and known_mask (True = keep), or neither")
    _check_images(config, known)
    if known.shape[0] != batch:
        raise InputError(f"known holds {known.shape[0]} images but {batch} are sampled")
    if known_mask.dtype != torch.bool:
        raise InputError(f"known_mask must be a bool tensor, got {known_mask.dtype}")
    c = config.channels
    if known_mask.dim() != 4 or known_mask.shape[1] not in (1, c) or known_mask.shape[2:] != known.shape[2:] \
            or known_mask.shape[0] != batch:
        raise InputError(f"known_mask of shape {tuple(known_mask.shape)} does not match the images "
                         f"{tuple(known.shape)}; give (B, 1, H, W) or (B, {c}, H, W)")
    known_mask = known_mask.expand_as(known).to(device)
    return Known(known.to(device, torch.uint8), known_mask.contiguous())


def _forced_pixels(config: FractalConfig, targets: Tensor, known: Known | None, batch: int,
                   device: torch.device) -> Known:
    """Validate the images forced sampling takes (``targets``) as forced known pixels."""
    if known is not None:
        raise InputError("give known pixels (editing) or targets (forced sampling), not both")
    _check_images(config, targets)
    if targets.shape[0] != batch:
        raise InputError(f"targets hold {targets.shape[0]} images but {batch} are sampled")
    targets = targets.to(device, torch.uint8)
    return Known(targets, torch.ones_like(targets, dtype=torch.bool), forced=True)


class FractalGen(PretrainedMixin, nn.Module):
    """A fractal generative model (Li, Sun, Fan, He, 2025) built from a ``FractalConfig``;
    ``save_pretrained`` / ``from_pretrained`` come from ``PretrainedMixin``."""

    def __init__(self, config: FractalConfig):
        super().__init__()
        self.config = config
        d0 = config.embed_dim_list[0]
        self.class_emb = nn.Embedding(config.class_num, d0) if config.conditional else None
        self.null_cond = nn.Parameter(torch.zeros(1, d0))  # "fake latent": label dropped / unconditional
        self.levels = nn.ModuleList([make_level(config, l) for l in range(config.num_levels - 1)])
        self.pixel = PixelHead(config.embed_dim_list[-2], config.embed_dim_list[-1], config.num_blocks_list[-1],
                               config.num_heads_list[-1], config.channels, config.r_weight)
        if self.class_emb is not None:
            nn.init.normal_(self.class_emb.weight, std=0.02)
        nn.init.normal_(self.null_cond, std=0.02)
        self._compiled_steps: dict[Callable, Callable] = {}
        self._compiled_graphs = False  # whether torch.compile makes CUDA graphs of the compiled steps itself
        self._graphs = StepGraphs()
        #: intra-op CPU threads of every ``sample`` call that names none (None: ``threads_for_sampling``)
        self.sampling_threads: int | None = None

    # --------------------------------------------------------------------------------------------
    # Inputs
    # --------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.null_cond.device

    def check_images(self, images: Tensor) -> None:
        """Raise InputError unless images are integer (B, C, S, S) pixels this model takes."""
        _check_images(self.config, images)

    def check_labels(self, labels: Tensor | None, batch: int | None = None) -> Tensor | None:
        """Validate class ids; returns them as a long tensor on the model's device."""
        return _check_labels(self.config, labels, batch, self.device)

    def condition(self, labels: Tensor | None, batch: int) -> Tensor:
        """Level-0 condition: class embedding (dropped to the null vector with probability
        label_drop_prob in training), or the null vector when there are no labels."""
        null = self.null_cond.expand(batch, -1)
        if labels is None:
            return null
        emb = self.class_emb(labels)
        if self.training:  # the null vector stays in the graph even when nothing is dropped (DDP)
            drop = torch.rand(batch, device=labels.device) < self.config.label_drop_prob
            emb = torch.where(drop.unsqueeze(1), null, emb)
        return emb

    # --------------------------------------------------------------------------------------------
    # Training loss and likelihood
    # --------------------------------------------------------------------------------------------
    def forward(self, images: Tensor, labels: Tensor | None = None, mask_fn: MaskFn | None = None) -> LossOutput:
        """All levels at once (breadth-first). In train mode: red-weighted pixel loss, random MAR
        masks, label drop. In eval mode: plain channel mean, uniform MAR mask counts; without
        labels the null condition is used (the official, unconditional likelihood).
        ``mask_fn`` fixes MAR masks (e.g. for a deterministic likelihood)."""
        self.check_images(images)
        b = images.shape[0]
        labels = self.check_labels(labels, b)
        cond = self.condition(labels, b)
        x, conds = images, [cond] * 5
        owner = torch.arange(b, device=images.device)  # image of every row
        y0 = x0 = torch.zeros(b, dtype=torch.long, device=images.device)  # top-left pixel of every row
        guiding = []
        for index, level in enumerate(self.levels):
            mask = None
            if mask_fn is not None and isinstance(level, MARLevel):
                mask = mask_fn(index, x.shape[0], level.seq_len, x.device)
            x, conds, rows, gp_loss = level(x, conds, mask)
            if gp_loss is not None:
                guiding.append((gp_loss, owner))
            parent, patch = rows // level.seq_len, rows % level.seq_len
            owner = owner[parent]
            y0 = y0[parent] + patch // level.grid * level.patch_size
            x0 = x0[parent] + patch % level.grid * level.patch_size
        pixel = self.pixel.loss(conds[0], x.flatten(1), weighted=self.training)
        # Sum as the official code does: ((pixel + gp_deepest) + ...) + gp_level1.
        loss = pixel.mean()
        for gp_loss, _ in reversed(guiding):
            loss = loss + gp_loss.mean()
        per_pixel = _scatter_mean(pixel, owner, b)
        per_guide = torch.stack([_scatter_mean(l, o, b) for l, o in guiding], 1) if guiding else per_pixel.new_zeros(b, 0)
        size = self.config.image_size
        return LossOutput(loss, per_pixel + per_guide.sum(1), per_pixel, per_guide, pixel.detach(),
                          (owner * size + y0) * size + x0)

    def forward_backward(self, images: Tensor, labels: Tensor | None = None, micro_batches: int = 1,
                         lower_chunks: int = 1, mask_fn: MaskFn | None = None) -> Tensor:
        """The training loss (returned, detached) with its gradients accumulated into ``.grad``,
        back-propagated in parts so that only one part's activations are in memory at a time: the
        batch in ``micro_batches`` groups of images and, within each, the patches level 0 hands
        down in ``lower_chunks`` groups. The same gradients as ``self(images, labels).loss.backward()``
        with the same masks, up to summation order (``backward`` explains why)."""
        for name, value in (("micro_batches", micro_batches), ("lower_chunks", lower_chunks)):
            if value < 1:
                raise InputError(f"{name} must be >= 1, got {value}")
        self.check_images(images)
        b = images.shape[0]
        labels = self.check_labels(labels, b)
        plan = plan_parts(self.levels, self.pixel, b, images.device, mask_fn, self.training, lower_chunks)
        cond = self.condition(labels, b)
        leaf = cond.detach().requires_grad_()
        total = backward_parts(plan, 0, images, [leaf] * 5, 0, micro_batches)
        if leaf.grad is not None:
            with torch.autocast(images.device.type, enabled=False):
                cond.backward(leaf.grad)
        return total

    @torch.no_grad()
    def nll(self, images: Tensor, labels: Tensor | None = None, passes: int = 1) -> tuple[Tensor, Tensor]:
        """Per-image bits/dim and its standard error over ``passes`` forward passes.

        Exact (and deterministic) for AR stacks; for MAR stacks the official estimator (random
        order, uniform mask count), averaged over ``passes``. With guiding pixels the value
        includes their losses, as in the paper. Runs in eval mode and restores the mode.
        """
        if passes < 1:
            raise InputError(f"passes must be >= 1, got {passes}")
        if all(not isinstance(level, MARLevel) for level in self.levels):
            passes = 1
        with eval_mode(self):
            runs = torch.stack([self(images, labels).bits_per_dim for _ in range(passes)])
        err = runs.std(0) / math.sqrt(passes) if passes > 1 else torch.zeros_like(runs[0])
        return runs.mean(0), err

    # --------------------------------------------------------------------------------------------
    # Sampling
    # --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, labels: Tensor | None = None, num_images: int | None = None,
               settings: SamplingConfig | None = None, seed: int | None = None,
               generator: torch.Generator | None = None,
               on_step: Callable[[int, int, Tensor], None] | None = None,
               known: Tensor | None = None, known_mask: Tensor | None = None,
               return_logprob: bool = False, targets: Tensor | None = None,
               choose: Chooser | None = None, graphs: bool | None = None,
               threads: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Generate uint8 images (B, C, S, S), depth-first.

        ``labels`` gives one class per image (class-conditional models); otherwise ``num_images``
        unconditional images. ``seed`` (or a ``generator`` on the model's device) makes the output
        reproducible. ``on_step(step, total, images)`` is called after every level-0 step.
        ``known`` (B, C, S, S) uint8 with ``known_mask`` (bool, same shape or (B, 1, S, S); True =
        keep) fixes pixels: only the others are generated, conditioned on them (see ``edit``).

        ``return_logprob=True`` also returns the log-probability (nats, float64, (B,)) of every
        generated sub-pixel under the distribution it was drawn from; with cfg 1 and temperature 1
        it is the model's log-likelihood of the returned images (exact for AR stacks).
        ``targets`` (B, C, S, S) uint8 runs the sampler as if it generated the whole image but
        takes these values, and ``choose(probs, targets)`` replaces every draw: it gets the
        probabilities (n, 256) of a sub-pixel step and the forced values (n,) (None without
        ``targets``) and returns the values to take. Encoder and decoder of an entropy coder run
        this same computation: one with ``targets``, one without.

        ``graphs`` (default: on CUDA) runs static steps, CUDA graphs on CUDA kept for later calls
        (``clear_graphs``), eagerly elsewhere: the eager images, up to the kernels' rounding. Steps
        compiled by ``compile_sampling`` run inside them. Editing, ``targets`` and ``choose`` run eagerly.

        ``threads``: intra-op CPU threads while sampling (default ``self.sampling_threads``, else on
        CPU ``threads_for_sampling``'s choice); the caller's count is restored after.
        """
        settings = settings or SamplingConfig()
        labels = self.check_labels(labels)
        b = labels.numel() if labels is not None else num_images
        if not b or b < 1:
            raise InputError("give labels (one per image) or num_images >= 1")
        if labels is not None and num_images is not None and num_images != b:
            raise InputError(f"num_images={num_images} but {b} labels were given")
        if settings.guided and labels is None:
            raise SamplingError("classifier-free guidance (cfg != 1) needs class labels and a conditional model")
        fixed = _known_pixels(self.config, known, known_mask, b, self.device)
        if targets is not None:
            fixed = _forced_pixels(self.config, targets, fixed, b, self.device)
        if generator is None and seed is not None:
            generator = torch.Generator(self.device).manual_seed(seed)
        graphs = self.device.type == "cuda" if graphs is None else graphs
        static = graphs and fixed is None and choose is None and not self._compiled_graphs
        ctx = SampleContext(settings, generator, on_step, self._compiled_steps, choose=choose, logprob=return_logprob,
                            graphs=self._graphs if static else None, capture=static and self.device.type == "cuda")
        threads = _sample_threads(self, threads, b * (2 if settings.guided else 1), settings)
        # everything in eval mode, the condition included (training mode would drop labels at random);
        # inference mode: less bookkeeping per tensor operation (compiled steps cannot take views of
        # inference tensors as inputs, so they run under no_grad)
        with eval_mode(self), torch.no_grad() if self._compiled_steps else torch.inference_mode(), \
                intra_op_threads(threads):
            cond = self.condition(labels, b)
            if settings.guided:
                cond = torch.cat([cond, self.null_cond.expand(b, -1)])
            images = self._sample_level(0, [cond] * 5, settings.cfg, ctx, fixed)
        images = images.clone()  # ordinary tensors for the caller (inference tensors refuse in-place updates)
        return (images, ctx.child_logp.clone()) if return_logprob else images

    def compile_sampling(self, enabled: bool = True, **options) -> "FractalGen":
        """Compile the network call of every sampling step with ``torch.compile(**options)``: an AR
        level's decode step and the pixel transformer's channel step (once per stack and batch: they
        take the position or channel as a tensor), a MAR level's condition pass (once per number of
        patches). Loops, schedules and draws stay in Python: the same samples (up to
        rounding). Shapes are static unless ``dynamic`` is given (torch 2.13's inductor fails on
        these steps under dynamic shapes); recompilations past 64 per function run eagerly.
        Compiled steps run inside the CUDA graphs ``sample`` replays, unless ``mode`` is
        "reduce-overhead" or "max-autotune" (torch's own graphs instead of the sampler's);
        ``backend="eager"`` only traces; ``enabled=False`` returns to eager. Forgets kept graphs."""
        self.clear_graphs()  # kept steps hold the step functions they were made with
        self._compiled_steps.clear()
        self._compiled_steps.update(_compile_steps(options) if enabled else {})
        self._compiled_graphs = enabled and options.get("mode") in _TORCH_GRAPH_MODES
        return self

    def clear_graphs(self) -> None:
        """Free the static sampling steps (CUDA graphs and their caches) kept from earlier calls."""
        self._graphs.clear()

    def _sample_level(self, index: int, conds: list[Tensor], cfg_now: float | Tensor, ctx: SampleContext,
                      known: Known | None, uniforms: Tensor | None = None) -> Tensor:
        """Generate the sub-images for the given conditions at level ``index`` and below."""
        if index == len(self.levels):
            pixel_known = Known(known.values.flatten(1), known.mask.flatten(1), known.forced) if known is not None else None
            return self.pixel.sample(conds[0], cfg_now, ctx, pixel_known, uniforms).to(torch.uint8)[:, :, None, None]
        level = self.levels[index]
        if ctx.graphs is not None and level.lowest and (index > 0 or ctx.on_step is None):
            return _sample_lowest_static(self, level, conds, cfg_now, ctx)

        def next_level(child_conds: list[Tensor], cfg_child: float | Tensor, child_known: Known | None,
                       child_uniforms: Tensor | None = None) -> Tensor:
            return self._sample_level(index + 1, child_conds, cfg_child, ctx, child_known, child_uniforms)

        return level.sample(conds, cfg_now, ctx, next_level, known)

    # --------------------------------------------------------------------------------------------
    # Introspection
    # --------------------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in the backward pass (saves memory, costs time)."""
        for level in self.levels:
            level.grad_checkpointing = enabled

    def level_parameters(self) -> list[int]:
        """Parameters per level (level 0 includes the class table; the last entry is the pixel transformer)."""
        counts = [sum(p.numel() for p in level.parameters()) for level in self.levels]
        counts[0] += self.null_cond.numel() + (self.class_emb.weight.numel() if self.class_emb is not None else 0)
        return counts + [sum(p.numel() for p in self.pixel.parameters())]


def _compile_steps(options: dict) -> dict[Callable, Callable]:
    """``torch.compile(**options)`` (static shapes by default) of every sampling step function, with
    torch's limit on recompilations per function raised to 64."""
    import torch._dynamo  # noqa: F401  (not imported by ``import torch`` on every version)

    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 64))
    options = {"dynamic": False, **options}
    steps = (ARLevel.decode, MARLevel.query_conditions, PixelHead.channel_probs)
    return {fn: torch.compile(fn, **options) for fn in steps}


def _sample_lowest_static(model: FractalGen, level: nn.Module, conds: list[Tensor], cfg_now: float,
                          ctx: SampleContext) -> Tensor:
    """One call of ``model``'s lowest generator level with the pixel transformer under it, as one
    static step (a CUDA graph on CUDA): its uniform draws are made outside, the images padded to a
    ``bucket`` size (so that the varying batches of MAR levels above share few graphs). It computes
    log-probabilities only for calls that return them (a graph of its own)."""
    g, n = ctx.groups, conds[0].shape[0] // ctx.groups
    table = level.draw_table(n, ctx, conds[0].device)
    padded = bucket(n)
    if padded != n:  # per [cond; uncond] half
        conds = [F.pad(c.view(g, n, -1), (0, 0, 0, padded - n)).flatten(0, 1) for c in conds]
        table = F.pad(table, (0, 0, 0, padded - n), value=0.5)
    settings = ctx.settings

    def make() -> StepGraph:
        inner = SampleContext(settings, compiled=ctx.compiled, logprob=ctx.logprob)  # its decoders stay with the graph

        def call(table: Tensor, cfg: Tensor, *conds: Tensor) -> tuple[Tensor, Tensor | None]:
            def pixels(child_conds, cfg_child, known, uniforms):
                return model._sample_level(len(model.levels), child_conds, cfg_child, inner, None, uniforms)
            return level.sample(list(conds), cfg, inner, pixels, None, table), inner.child_logp
        return StepGraph(call, ctx.capture)

    key = ctx.step_key("lowest", level, conds[0]) + (len(conds), settings_key(settings), ctx.logprob)
    images, logp = ctx.graphs.get(key, make)(table, cfg_now, *conds)
    ctx.child_logp = logp[:n].clone() if ctx.logprob else None
    return images[:n].clone()

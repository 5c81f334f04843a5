"""Analytic compute and size of a fractal model, level by level.

``level_costs(config)`` returns, for every level of a ``FractalConfig`` (generators, then the
final pixel transformer), how many transformer sequences one image makes it run, how long they
are, the forward GFLOPs per image, the attention-matrix entries per image and the parameters.
Nothing is built or run; the numbers follow the exact layer sizes of this implementation.

Counting rules
--------------
* FLOPs: a multiply-add is 2 FLOPs. Counted: every linear layer (qkv, output projection, MLP /
  SwiGLU, patch / condition / guiding-pixel embeddings, the pixel transformer's tied 256-way
  output heads) and the two attention products QK^T and AV (``4 * T^2 * D`` per layer, the full
  matrix even for causal layers, as dense kernels compute it). Not counted: norms, softmax,
  rotary embeddings, biases, activations, table lookups (class and channel-value embeddings).
* Every patch goes down: a MAR level is counted with every patch masked (mask ratio 1), the
  most a training forward does; the official training masks ~80% on average
  (E[ratio] of N(1, 0.25) truncated to [0, 1]), so its lower levels then cost ~0.8x per MAR level.
* Attention entries: ``sequences * tokens**2`` per image -- one matrix per sequence, not
  multiplied by layers or heads (the paper's convention when it compares 1,048,576 entries at
  the finest level of a 256px model with (256*256)**2 for full-image attention).
* Parameters are those of this implementation and equal ``FractalGen.level_parameters()``
  (level 0 includes the class table and the null condition; a level with a guiding pixel
  includes its guiding-pixel transformer).

Conventions (``convention=``) for the token counts and block sizes:

``"official"`` (default) -- what the official code computes: an AR level runs L+1 tokens
    [condition, patch_1 .. patch_L] (the last output is unused; this package's training forward
    feeds only L tokens), LLaMA blocks with SwiGLU hidden 256*ceil(int(8D/3)/256); a MAR level
    runs num_conds (+1 guiding pixel) + L tokens with ViT blocks (MLP 4D); the pixel transformer
    (and the guiding-pixel transformer) runs C+1 tokens [condition, v_1 .. v_C].
``"implementation"`` -- what this package's ``FractalGen.forward`` computes: as "official" but an
    AR level runs L tokens and the pixel / guiding-pixel transformers C tokens (the last channel
    value is never fed). A FLOP counter on a real forward agrees with this one.
``"paper"`` -- the simplified count that reproduces the paper's computation table: every block
    costs ``24 T D^2 + 4 T^2 D`` (12 D^2 parameters: MLP ratio 4, or an un-rounded 8D/3 SwiGLU),
    T = the number of patches (no condition or guiding-pixel tokens), the pixel transformer C
    tokens.

The paper's table (ImageNet 64x64 forward GFLOPs: 3 levels 438, 2 levels 5516, one flat sequence
29845) is reproduced by ``paper_comparison()``: with the "paper" convention 438.2 (+0.05%),
5514.0 (-0.04%) and 29693 (-0.51%); with the "official" convention 479.5 (+9.5%), 5589.5 (+1.3%),
29903.5 (+0.2%) -- see ``benchmarks/README.md`` for the analysis.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .config import FractalConfig, get_preset
from .errors import ConfigError

CONVENTIONS = ("official", "implementation", "paper")

#: The paper's computation table: forward GFLOPs per 64x64 ImageNet image.
PAPER_GFLOPS = {"3 levels": 438.0, "2 levels": 5516.0, "flat": 29845.0}

VOCAB = 256  # values per channel


@dataclass(frozen=True)
class LevelCost:
    """Cost of one level for one image (see the module docstring for the counting rules)."""

    level: int
    kind: str                # "ar", "mar", "pixel" (final pixel transformer) or "flat"
    width: int
    depth: int
    patches: int             # patches (pixel transformer: channels) modelled per sequence
    tokens: int              # transformer sequence length under the convention
    sequences: int           # sequences per image
    gflops: float            # forward GFLOPs per image, guiding-pixel transformer included
    attention_entries: int   # sequences * tokens**2 per image (main transformer)
    params: int
    guide_gflops: float = 0.0  # the part of ``gflops`` spent in the guiding-pixel transformer


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------

def swiglu_hidden(dim: int) -> int:
    """LLaMA SwiGLU hidden size: the multiple of 256 at or above int(8 * dim / 3)."""
    return 256 * math.ceil(int(2 * 4 * dim / 3) / 256)


def block_linear_macs(dim: int, block: str) -> int:
    """Multiply-adds per token of one block's linear layers (= its weight count without biases)."""
    if block == "llama":
        return 4 * dim * dim + 3 * dim * swiglu_hidden(dim)
    if block in ("vit", "paper"):
        return 12 * dim * dim
    raise ValueError(f"unknown block type {block!r}")


def transformer_flops(tokens: int, dim: int, depth: int, block: str) -> int:
    """Forward FLOPs of ``depth`` blocks over one sequence of ``tokens`` tokens: linear layers
    ``2 * T * macs`` plus QK^T and AV ``4 * T^2 * D`` per layer."""
    return depth * (2 * tokens * block_linear_macs(dim, block) + 4 * tokens * tokens * dim)


def _vit_block_params(dim: int) -> int:
    # 2 LayerNorms (4D), qkv (3D^2 + 3D), proj (D^2 + D), fc1 (4D^2 + 4D), fc2 (4D^2 + D)
    return 12 * dim * dim + 13 * dim


def _llama_block_params(dim: int) -> int:
    # 2 RMSNorms (2D), qkv and proj without bias (4D^2), SwiGLU w1, w3, w2 (3 D H)
    return 4 * dim * dim + 3 * dim * swiglu_hidden(dim) + 2 * dim


def pixel_head_params(cond_dim: int, width: int, depth: int, channels: int) -> int:
    """Parameters of a pixel transformer (``pixel.PixelHead``)."""
    return (cond_dim * width + width            # condition embedding
            + channels * VOCAB * width          # tied value embeddings / output heads
            + 2 * width + 2 * width             # input and final LayerNorm
            + depth * _vit_block_params(width)
            + channels * VOCAB)                 # logit biases


def pixel_head_flops(cond_dim: int, width: int, depth: int, channels: int, tokens: int, block: str) -> int:
    """Forward FLOPs of a pixel transformer for one pixel: condition embedding, ``tokens`` tokens
    through the blocks, and ``channels`` tied 256-way heads."""
    return (2 * cond_dim * width + transformer_flops(tokens, width, depth, block)
            + channels * 2 * width * VOCAB)


def _check(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ConfigError(f"unknown FLOP convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")


# ------------------------------------------------------------------------------------------------
# Per-level costs
# ------------------------------------------------------------------------------------------------

def level_costs(config: FractalConfig, convention: str = "official") -> list[LevelCost]:
    """Cost of every level for one image: generator levels 0 .. n-2, then the pixel transformer."""
    _check(convention)
    paper = convention == "paper"
    c = config.channels
    pixel_tokens = c + 1 if convention == "official" else c
    costs = []
    sequences = 1
    for level in range(config.num_levels - 1):
        kind = config.generator_type_list[level]
        d = config.embed_dim_list[level]
        depth = config.num_blocks_list[level]
        cond_dim = config.embed_dim_list[level - 1] if level > 0 else d
        p = config.img_size_list[level + 1]
        patch_in = c * p * p
        L = config.seq_len(level)
        guide_flops = 0
        if kind == "ar":
            tokens = L if paper or convention == "implementation" else L + 1
            block = "paper" if paper else "llama"
            # one condition token; the other tokens are patches
            flops = 2 * cond_dim * d + 2 * patch_in * d * (tokens - 1) + transformer_flops(tokens, d, depth, block)
            params = (patch_in * d + d + cond_dim * d + d + (L + 1) * d + 4 * d
                      + depth * _llama_block_params(d))
        else:
            conds = config.level_conds(level)
            guiding = config.level_guiding_pixel(level)
            prefix = conds + int(guiding)
            tokens = L if paper else prefix + L
            block = "paper" if paper else "vit"
            flops = (2 * cond_dim * d * conds + 2 * c * d * int(guiding) + 2 * patch_in * d * L
                     + transformer_flops(tokens, d, depth, block))
            params = (patch_in * d + d + cond_dim * d + d + d + (prefix + L) * d + 4 * d
                      + depth * _vit_block_params(d))
            if guiding:
                params += c * d + d + pixel_head_params(cond_dim, config.guide_width, config.guide_depth, c)
                guide_flops = pixel_head_flops(cond_dim, config.guide_width, config.guide_depth, c,
                                               pixel_tokens, "paper" if paper else "vit")
                flops += guide_flops
        if level == 0:
            params += d + (config.class_num * d if config.conditional else 0)
        costs.append(LevelCost(level, kind, d, depth, L, tokens, sequences, sequences * flops / 1e9,
                               sequences * tokens * tokens, params, sequences * guide_flops / 1e9))
        sequences *= L
    w, depth = config.embed_dim_list[-1], config.num_blocks_list[-1]
    cond_dim = config.embed_dim_list[-2]
    flops = pixel_head_flops(cond_dim, w, depth, c, pixel_tokens, "paper" if paper else "vit")
    costs.append(LevelCost(config.num_levels - 1, "pixel", w, depth, c, pixel_tokens, sequences,
                           sequences * flops / 1e9, sequences * pixel_tokens ** 2,
                           pixel_head_params(cond_dim, w, depth, c)))
    return costs


def total_gflops(config: FractalConfig, convention: str = "official") -> float:
    """Forward GFLOPs per image of the whole model."""
    return sum(cost.gflops for cost in level_costs(config, convention))


def total_params(config: FractalConfig) -> int:
    """Parameters of the model (equal to ``sum(p.numel() for p in FractalGen(config).parameters())``)."""
    return sum(cost.params for cost in level_costs(config))


def full_attention_entries(image_size: int) -> int:
    """Entries of one attention matrix over every pixel of an image: (S*S)**2."""
    return (image_size * image_size) ** 2


# ------------------------------------------------------------------------------------------------
# The paper's comparison models
# ------------------------------------------------------------------------------------------------

def flat_cost(tokens: int, width: int = 1024, depth: int = 32, convention: str = "paper") -> LevelCost:
    """One causal transformer over a flat sequence of ``tokens`` sub-pixel tokens, each predicting
    a 256-way value (value embedding = a lookup, output head = a 256-way linear layer).
    "paper": T = tokens, 12 D^2 blocks; "official"/"implementation": a condition token in front
    and LLaMA blocks with the rounded SwiGLU, as the official AR level would build it."""
    _check(convention)
    if convention == "paper":
        seq, block = tokens, "paper"
    else:
        seq, block = tokens + 1, "llama"
    flops = transformer_flops(seq, width, depth, block) + tokens * 2 * width * VOCAB
    params = depth * (_llama_block_params(width) if block == "llama" else _vit_block_params(width)) \
        + 2 * VOCAB * width + seq * width
    return LevelCost(0, "flat", width, depth, tokens, seq, 1, flops / 1e9, seq * seq, params)


def paper_configs() -> dict[str, FractalConfig]:
    """The hierarchies of the paper's computation table (ImageNet 64x64, widths 1024/512/128,
    depths 32/8/3): "3 levels" is ``fractalar_in64`` (64 -> 4 -> 1); "2 levels" keeps its level-0
    transformer but over the 4096 pixels directly (64 -> 1), followed by the pixel transformer.
    ("flat", one transformer over the 64*64*3 = 12288 sub-pixels, is ``flat_cost(12288)``.)"""
    two = FractalConfig((64, 1), (1024, 128), (32, 3), (16, 4), ("ar", "ar"), channels=3, class_num=1000,
                        num_conds=1)
    return {"3 levels": get_preset("fractalar_in64"), "2 levels": two}


def paper_comparison(convention: str = "paper") -> dict[str, float]:
    """Forward GFLOPs per image of the paper's three 64x64 models under ``convention``."""
    configs = paper_configs()
    out = {name: total_gflops(cfg, convention) for name, cfg in configs.items()}
    out["flat"] = flat_cost(64 * 64 * 3, 1024, 32, convention).gflops
    return out


def truncated_config(config: FractalConfig, levels: int) -> FractalConfig:
    """The same model with only its first ``levels`` generator levels (and the same pixel
    transformer): the image shrinks by the patch size of every level removed, e.g. a
    (256, 16, 4, 1) model truncated to 2 generator levels is a (64, 4, 1) model with the widths
    and depths of levels 0, 1 and of the pixel transformer. Used to compare 256px and 64px
    models of matched widths (the paper's "256x256 costs about 2x 64x64")."""
    n = config.num_levels - 1
    if not 1 <= levels <= n:
        raise ConfigError(f"levels must be 1..{n}, got {levels}")
    drop = config.img_size_list[levels]  # side of the patches the kept levels end with
    sizes = tuple(s // drop for s in config.img_size_list[:levels]) + (1,)
    keep = list(range(levels)) + [n]

    def pick(values):
        return tuple(values[i] for i in keep)

    return dataclasses.replace(
        config, img_size_list=sizes, embed_dim_list=pick(config.embed_dim_list),
        num_blocks_list=pick(config.num_blocks_list), num_heads_list=pick(config.num_heads_list),
        generator_type_list=pick(config.generator_type_list))


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_table(config: FractalConfig, convention: str = "official") -> str:
    """Per-level table (kind, width, depth, tokens, sequences per image, parameters, forward
    GFLOPs per image, attention entries per image) with totals, as ``fractalgen info`` prints it."""
    costs = level_costs(config, convention)
    head = (f"{'level':>5} {'kind':>6} {'width':>5} {'depth':>5} {'tokens':>6} {'seqs/img':>9} "
            f"{'params':>13} {'GFLOPs/img':>11} {'attn/img':>9}")
    lines = [f"forward compute per image ({convention} convention; every patch goes down, "
             "multiply-add = 2 FLOPs)", head]
    for cost in costs:
        kind = cost.kind + ("+gp" if cost.guide_gflops else "")
        lines.append(f"{cost.level:>5} {kind:>6} {cost.width:>5} {cost.depth:>5} {cost.tokens:>6} "
                     f"{cost.sequences:>9,} {cost.params:>13,} {cost.gflops:>11.2f} "
                     f"{_si(cost.attention_entries):>9}")
    lines.append(f"{'total':>5} {'':>6} {'':>5} {'':>5} {'':>6} {'':>9} {sum(c.params for c in costs):>13,} "
                 f"{sum(c.gflops for c in costs):>11.2f} {_si(sum(c.attention_entries for c in costs)):>9}")
    return "\n".join(lines)

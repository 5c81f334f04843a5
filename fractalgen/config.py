"""Model configuration and the preset registry.

A fractal model is described by per-level lists, as in the official code. Entry ``l`` of ``img_size_list`` is
the side of the (sub-)image level ``l`` sees; level ``l`` has ``(img[l] / img[l+1])**2`` tokens,
each a patch of side ``img[l+1]``. Levels ``0 .. n-2`` are generators ("ar" or "mar"); the last
entries of the width/depth/heads lists configure the final pixel transformer, and the last entry
of ``generator_type_list`` is always "ar" (the pixel transformer is causal over channels).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics for RGB, 0.5/0.5 (values mapped to [-1, 1]) for other channel counts."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * channels, (0.5,) * channels


@dataclass
class FractalConfig:
    """Everything needed to build a model; serialised as ``config.json`` beside the weights."""

    img_size_list: tuple[int, ...]
    embed_dim_list: tuple[int, ...]
    num_blocks_list: tuple[int, ...]
    num_heads_list: tuple[int, ...]
    generator_type_list: tuple[str, ...]
    channels: int = 3
    class_num: int = 1000
    num_conds: int = 5
    guiding_pixel: bool = False
    r_weight: float = 5.0
    label_drop_prob: float = 0.1
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    guide_width: int = 128
    guide_depth: int = 3
    guide_heads: int = 4

    def __post_init__(self) -> None:
        for name in ("img_size_list", "embed_dim_list", "num_blocks_list", "num_heads_list",
                     "generator_type_list"):
            setattr(self, name, tuple(getattr(self, name)))
        mean, std = default_normalization(self.channels)
        self.pixel_mean = tuple(float(v) for v in (self.pixel_mean or mean))
        self.pixel_std = tuple(float(v) for v in (self.pixel_std or std))
        if self.class_names is not None:
            self.class_names = tuple(self.class_names)
        self.validate()

    # ----------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        """Number of levels including the final pixel transformer."""
        return len(self.img_size_list)

    @property
    def image_size(self) -> int:
        return self.img_size_list[0]

    @property
    def conditional(self) -> bool:
        return self.class_num > 0

    def seq_len(self, level: int) -> int:
        """Tokens (patches) modelled by generator level ``level``."""
        return (self.img_size_list[level] // self.img_size_list[level + 1]) ** 2

    def level_conds(self, level: int) -> int:
        """Condition slots a generator level reads (an AR level reads slot 0 only)."""
        return 1 if self.generator_type_list[level] == "ar" else self.num_conds

    def level_guiding_pixel(self, level: int) -> bool:
        """The guiding pixel is used by MAR levels below level 0 only."""
        return self.guiding_pixel and level > 0 and self.generator_type_list[level] == "mar"

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistency."""
        n = len(self.img_size_list)
        lists = {"embed_dim_list": self.embed_dim_list, "num_blocks_list": self.num_blocks_list,
                 "num_heads_list": self.num_heads_list, "generator_type_list": self.generator_type_list}
        if n < 2:
            raise ConfigError(f"img_size_list needs at least 2 levels (e.g. (28, 4, 1)), got {self.img_size_list}")
        for name, values in lists.items():
            if len(values) != n:
                raise ConfigError(f"{name} has {len(values)} entries but img_size_list has {n}; give one per level")
        if self.img_size_list[-1] != 1:
            raise ConfigError(f"the last entry of img_size_list must be 1 (single pixels), got {self.img_size_list}")
        for a, b in zip(self.img_size_list, self.img_size_list[1:]):
            if b >= a or a % b:
                raise ConfigError(f"each image size must be a multiple of the next and larger: {a} -> {b} "
                                  f"in {self.img_size_list} does not divide")
        for level, kind in enumerate(self.generator_type_list[:-1]):
            if kind not in ("ar", "mar"):
                raise ConfigError(f"generator_type_list[{level}] is {kind!r}; use 'ar' or 'mar'")
        if self.generator_type_list[-1] != "ar":
            raise ConfigError("the last generator type is the pixel transformer, which is always 'ar'")
        for level, (dim, heads) in enumerate(zip(self.embed_dim_list, self.num_heads_list)):
            if dim % heads:
                raise ConfigError(f"level {level}: width {dim} is not divisible by {heads} heads")
            if self.generator_type_list[level] == "ar" and level < n - 1 and (dim // heads) % 4:
                raise ConfigError(f"level {level}: AR head width {dim // heads} must be a multiple of 4 for 2-D RoPE")
        for level in range(1, n - 1):
            if (self.generator_type_list[level - 1] == "ar" and self.generator_type_list[level] == "mar"
                    and self.num_conds > 1):
                raise ConfigError(f"level {level} is MAR below an AR level, which passes one condition; "
                                  f"set num_conds=1 (got {self.num_conds})")
        if not 1 <= self.num_conds <= 5:
            raise ConfigError(f"num_conds must be 1..5 (middle, top, right, bottom, left), got {self.num_conds}")
        if self.channels < 1:
            raise ConfigError(f"channels must be >= 1, got {self.channels}")
        if len(self.pixel_mean) != self.channels or len(self.pixel_std) != self.channels:
            raise ConfigError(f"pixel_mean/pixel_std need {self.channels} entries (one per channel)")
        if self.class_num < 0:
            raise ConfigError(f"class_num must be >= 0 (0 = unconditional), got {self.class_num}")
        if self.class_names is not None and len(self.class_names) != self.class_num:
            raise ConfigError(f"class_names has {len(self.class_names)} names for {self.class_num} classes")

    # ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FractalConfig":
        """Build from a dict, rejecting unknown keys with a clear message."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(names)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "FractalConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read model config {path}: {e}") from None
        return cls.from_dict(data)


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------

def _official(sizes, widths, depths, heads, types, guiding_pixel) -> FractalConfig:
    return FractalConfig(sizes, widths, depths, heads, types, channels=3, class_num=1000,
                         num_conds=1 if types[0] == "ar" else 5, guiding_pixel=guiding_pixel)


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")

PRESETS: dict[str, Callable[[], FractalConfig]] = {
    # The official ImageNet models, with the official code's widths, depths and heads.
    "fractalar_in64": lambda: _official((64, 4, 1), (1024, 512, 128), (32, 8, 3), (16, 8, 4),
                                        ("ar", "ar", "ar"), False),
    "fractalmar_in64": lambda: _official((64, 4, 1), (1024, 512, 128), (32, 8, 3), (16, 8, 4),
                                         ("mar", "mar", "ar"), False),
    "fractalmar_base_in256": lambda: _official((256, 16, 4, 1), (768, 384, 192, 64), (24, 6, 3, 1),
                                               (12, 6, 3, 4), ("mar", "mar", "mar", "ar"), True),
    "fractalmar_large_in256": lambda: _official((256, 16, 4, 1), (1024, 512, 256, 64), (32, 8, 4, 1),
                                                (16, 8, 4, 4), ("mar", "mar", "mar", "ar"), True),
    "fractalmar_huge_in256": lambda: _official((256, 16, 4, 1), (1280, 640, 320, 64), (40, 10, 5, 1),
                                               (16, 8, 4, 4), ("mar", "mar", "mar", "ar"), True),
    # Small models that train on a 2-core CPU.
    "fractalar_fmnist28": lambda: FractalConfig(
        (28, 4, 1), (224, 96, 32), (6, 2, 1), (8, 4, 2), ("ar", "ar", "ar"), channels=1, class_num=10,
        num_conds=1, attn_dropout=0.0, proj_dropout=0.0, class_names=FASHION_MNIST_CLASSES),
    "fractalmar_fmnist28": lambda: FractalConfig(
        (28, 4, 1), (224, 96, 32), (6, 2, 1), (8, 4, 2), ("mar", "mar", "ar"), channels=1, class_num=10,
        num_conds=5, attn_dropout=0.0, proj_dropout=0.0, class_names=FASHION_MNIST_CLASSES),
    "fractalmar_rgb32": lambda: FractalConfig(
        (32, 4, 1), (192, 96, 48), (6, 3, 2), (6, 4, 4), ("mar", "mar", "ar"), channels=3,
        class_num=0, num_conds=5),
    "fractalar_rgb32": lambda: FractalConfig(
        (32, 4, 1), (192, 96, 48), (6, 3, 2), (6, 4, 4), ("ar", "ar", "ar"), channels=3,
        class_num=0, num_conds=1),
}


def get_preset(name: str, **overrides) -> FractalConfig:
    """The named preset's config, with fields optionally overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    if "channels" in overrides:  # re-derive the normalisation unless it is given too
        overrides.setdefault("pixel_mean", None)
        overrides.setdefault("pixel_std", None)
    return dataclasses.replace(cfg, **overrides) if overrides else cfg

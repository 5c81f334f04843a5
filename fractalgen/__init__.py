"""Fractal generative models (Li, Sun, Fan, He, 2025) in PyTorch."""

from .checkpoint import CheckpointError, load_model, load_official
from .config import PRESETS, ConfigError, FractalConfig, get_preset
from .model import FractalGen, InputError, LossOutput
from .sampling import SamplingConfig, SamplingError

__all__ = ["CheckpointError", "ConfigError", "FractalConfig", "FractalGen", "InputError", "LossOutput",
           "PRESETS", "SamplingConfig", "SamplingError", "get_preset", "load_model", "load_official"]

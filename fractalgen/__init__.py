"""Fractal generative models (Li, Sun, Fan, He, 2025) in PyTorch."""

from .checkpoint import load_model, load_official
from .config import PRESETS, FractalConfig, get_preset
from .errors import (CheckpointError, ConfigError, DataError, FIDError, FractalGenError, InputError,
                     SamplingError)
from .model import FractalGen, LossOutput
from .sampling import SamplingConfig

__all__ = ["CheckpointError", "ConfigError", "DataError", "FIDError", "FractalConfig", "FractalGen",
           "FractalGenError", "InputError", "LossOutput", "PRESETS", "SamplingConfig", "SamplingError",
           "get_preset", "load_model", "load_official"]

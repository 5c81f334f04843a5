"""Error types. Each carries a one-line message that names the problem and the fix; the CLI
prints it without a traceback."""


class FractalGenError(ValueError):
    """Base class of every error this package raises on bad input."""


class ConfigError(FractalGenError):
    """A model configuration that cannot describe a fractal model."""


class InputError(FractalGenError):
    """Images, labels or masks that the model cannot take."""


class SamplingError(FractalGenError):
    """Sampling arguments that cannot be honoured."""


class CheckpointError(FractalGenError):
    """A checkpoint that cannot be read or does not match the model."""


class DataError(FractalGenError):
    """A dataset that cannot be read or does not fit the model."""


class FIDError(FractalGenError):
    """Inputs to the FID / precision / recall evaluation that cannot be used."""


class CodecError(FractalGenError):
    """A compressed file that cannot be decoded: damaged, of another version, or for another model."""

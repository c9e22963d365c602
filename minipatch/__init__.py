"""minipatch: what a prompt does to a transformer, written as an exact weight update.

    model = minipatch.models.tiny_gemma(seed=0)
    res = minipatch.absorb(model, tokens, context=[1, 2, 3], method="m6a")
    model.forward(tokens[res.kept], positions=res.kept, patches=res.patches)
        == model.forward(tokens)[res.kept]          # to rounding

See MATH.md labels M1..M8 in the docstrings of ``lemmas``, ``m6``, ``controllability``,
``absorb``.
"""
from . import models
from .absorb import AbsorbResult, absorb, patched_forward
from .decode import Stream, absorb_prefill, absorb_step, greedy
from .config import ModelConfig
from .errors import (InputError, MinipatchError, ModelFileError, NotControllableError, ShapeError,
                     UnsupportedArchitectureError)
from .model import Model
from .patches import Patches, Rank1, Scale, Shift

__version__ = "0.1.0"


def load(path, dtype="float64"):
    """Load a Hugging Face checkpoint folder (config.json + *.safetensors) or a .gguf file."""
    from .io import load as _load

    return _load(path, dtype=dtype)


__all__ = ["Model", "ModelConfig", "models", "absorb", "absorb_prefill", "absorb_step", "Stream", "greedy", "patched_forward", "AbsorbResult",
           "Patches", "Rank1", "Scale", "Shift", "load", "NotControllableError", "ShapeError",
           "InputError", "ModelFileError", "UnsupportedArchitectureError", "MinipatchError"]

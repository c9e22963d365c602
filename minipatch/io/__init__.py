"""Checkpoint loaders: Hugging Face folders (safetensors) and GGUF files.

Loaders never unpickle and never execute anything from a file. Every tensor name is
mapped through one readable table per family (``minipatch.io.hf``).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ModelFileError


def load(path, dtype="float64"):
    """A :class:`~minipatch.model.Model` from a checkpoint folder or a ``.gguf`` file."""
    from .hf import model_from_hf

    path = Path(path)
    if path.is_dir():
        from .safetensors import read_checkpoint_folder

        config, tensors = read_checkpoint_folder(path)
        return model_from_hf(config, tensors, dtype)
    if path.suffix == ".gguf":
        from .gguf import read_gguf

        config, tensors, _ = read_gguf(path, dtype=dtype)
        return model_from_hf(config, tensors, dtype)
    if not path.exists():
        raise FileNotFoundError(path)
    raise ModelFileError(f"{path}: expected a checkpoint folder (config.json + *.safetensors) or a .gguf file")

"""Checkpoint loaders: Hugging Face folders (safetensors) and GGUF files.

Loaders never unpickle and never execute anything from a file. Every tensor name is
mapped through one readable table per family (``minipatch.io.hf``). Files must be regular
files (``minipatch.io.files``); configs are validated and cross-checked against the tensor
index before any tensor data is read (``minipatch.io.config_check``).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError, ModelFileError
from ..validate import check_float_dtype


def load(path, dtype="float64"):
    """A :class:`~minipatch.model.Model` from a checkpoint folder or a ``.gguf`` file.

    Args:
      path: a folder with ``config.json`` and ``*.safetensors``, or a ``.gguf`` file.
      dtype: ``'float32'`` or ``'float64'`` (InputError otherwise).
    Raises:
      FileNotFoundError: nothing at ``path``.
      ModelFileError (ConfigError, UnsupportedArchitectureError): anything wrong with the files.
    """
    dtype = check_float_dtype(dtype)
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        from .hf import load_folder

        return load_folder(path, dtype)
    if path.suffix == ".gguf":
        from .gguf import read_gguf
        from .hf import model_from_hf

        config, tensors, _ = read_gguf(path, dtype=dtype)
        return model_from_hf(config, tensors, dtype, source=path)
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(path)
    raise ModelFileError(f"{path}: expected a checkpoint folder (config.json + *.safetensors) or a .gguf file")

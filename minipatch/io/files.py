"""Opening checkpoint files safely: regular files only, bounded reads, never a hang.

``config.json`` as a FIFO blocks ``open`` forever; a symlink to ``/dev/zero`` reads without
end. Every file the loaders read goes through :func:`open_regular`: ``os.stat`` (which follows
symlinks) must show a regular file *before* anything is opened, the file is then opened with
``O_NONBLOCK`` and ``fstat`` must show the same regular file (so swapping it for a FIFO between
the two calls fails too). Small JSON files are read with a size limit.
"""
from __future__ import annotations

import os
import stat

from ..errors import ModelFileError

MAX_CONFIG_BYTES = 16 << 20
"""Largest accepted ``config.json`` (real ones are a few KB; 16 MiB leaves room for label maps)."""

MAX_INDEX_BYTES = 64 << 20
"""Largest accepted ``model.safetensors.index.json``."""

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def _kind(mode):
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path, what):
    """``os.stat(path)`` if ``path`` (after symlinks) is a regular file, else ModelFileError.

    A missing file raises FileNotFoundError (callers turn it into their own message).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ModelFileError(f"{path}: cannot stat {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"{path}: {what} is {_kind(st.st_mode)}, not a regular file; refused "
                             "without reading it")
    return st


def open_regular(path, what, max_bytes=None):
    """A binary file object for the regular file ``path`` (see the module docstring).

    Raises FileNotFoundError if it does not exist, ModelFileError if it is not a regular file,
    is larger than ``max_bytes`` or cannot be opened.
    """
    st = check_regular(path, what)
    if max_bytes is not None and st.st_size > max_bytes:
        raise ModelFileError(f"{path}: {what} has {st.st_size} bytes, more than the {max_bytes}-byte limit")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ModelFileError(f"{path}: cannot open {what} ({e.strerror or e})") from None
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise ModelFileError(f"{path}: {what} changed while it was opened ({_kind(now.st_mode)})")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path, what, max_bytes):
    """All bytes of the regular file ``path``, at most ``max_bytes`` (else ModelFileError)."""
    with open_regular(path, what, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ModelFileError(f"{path}: {what} grew past the {max_bytes}-byte limit while it was read")
    return data

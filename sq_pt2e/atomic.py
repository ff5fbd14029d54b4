"""Atomic file writes: a temporary file in the target folder, then ``os.replace``.

An interrupted write leaves the previous file intact, never a truncated one.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_save_tensor", "atomic_write_bytes", "atomic_write_text"]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; create parent folders. Returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically. Returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_tensor(path: str | os.PathLike[str], tensor: object) -> Path:
    """``torch.save`` ``tensor`` (or a structure of tensors) to ``path`` atomically. Returns the path."""
    import torch

    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return atomic_write_bytes(path, buffer.getvalue())

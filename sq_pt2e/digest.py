"""Content digests of tensors: equal exactly when dtype, shape and bytes are."""

from __future__ import annotations

import hashlib

import torch

__all__ = ["hash_tensor", "tensor_digest"]


def hash_tensor(digest: hashlib._Hash, tensor: torch.Tensor, label: str = "") -> None:
    """Feed ``label``, ``tensor``'s dtype and shape, then its bytes into ``digest``."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"{label}{flat.dtype}:{tuple(tensor.shape)};".encode())
    digest.update(flat.view(torch.uint8).numpy())


def tensor_digest(*tensors: torch.Tensor) -> str:
    """A short hex digest of the tensors' dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for tensor in tensors:
        hash_tensor(digest, tensor)
    return digest.hexdigest()[:16]

"""Synthetic speech corpus and training of the reference CTC models (``python -m sq_pt2e.train``)."""

from __future__ import annotations

__all__: list[str] = []

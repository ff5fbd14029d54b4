"""Synthetic speech corpus and training of the reference CTC models."""

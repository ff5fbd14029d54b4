"""sq-pt2e."""

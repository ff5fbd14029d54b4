"""``python -m sq_pt2e.train corpus|train|export``: see :mod:`sq_pt2e.train.cli`."""

from __future__ import annotations

from sq_pt2e.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""Progress bars of long work (calibration, verification, eval, energy, training): tqdm on stderr,
quiet under --json (enabled=False) and when stderr is not a terminal."""
from __future__ import annotations

import sys
from typing import Iterable

from tqdm import tqdm

# Bars show up after this many seconds: a run refused on its first batches (bad data) leaves its
# one error line alone on stderr, not under a bar.
PROGRESS_DELAY_S = 1.0


def progress_bar(iterable: Iterable | None = None, *, desc: str, enabled: bool, total: int | None = None,
                 unit: str = "batch", **options) -> tqdm:
    """A tqdm bar over `iterable` (or one to `update` by hand), shown only when `enabled` and
    stderr is a terminal."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=None if enabled else True,
                delay=PROGRESS_DELAY_S, file=sys.stderr, **options)

"""An optional progress bar for long work: tqdm on stderr when it is installed."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(**options: Any):
    """A ``tqdm`` bar on stderr (options as tqdm's), or None when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(file=sys.stderr, **options)

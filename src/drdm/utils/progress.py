"""Progress bars for long command-line work (``augment.py``, ``eval.py``), on tqdm.

Log records emitted while a bar is open are routed through it (``logging_redirect_tqdm``), so
the per-block log lines and the bar do not overwrite each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


@contextmanager
def progress_bar(total: int, unit: str, enabled: bool = True) -> Iterator[tqdm]:
    """A bar over ``total`` items (``unit``: their singular name) with rate and ETA; a silent
    one when disabled."""
    bar = tqdm(total=total, unit=unit, disable=not enabled, dynamic_ncols=True, smoothing=0.1)
    try:
        with logging_redirect_tqdm():
            yield bar
    finally:
        bar.close()

"""How the entry points report a user's mistake: one line naming the culprit, no traceback.

``ValueError`` and ``FileNotFoundError`` are what drdm raises for bad input (a missing file, a
wrong shape, a bad config value); the scripts print their message and exit with status 1.
``HYDRA_FULL_ERROR=1`` shows the full traceback instead, as it does for Hydra's own errors.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

USER_ERRORS = (ValueError, FileNotFoundError)


@contextmanager
def report_user_errors(script: str):
    """Turn a :data:`USER_ERRORS` exception raised inside into ``<script>: error: <message>``."""
    try:
        yield
    except USER_ERRORS as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{script}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (torch's loader errors run to a page of advice)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")

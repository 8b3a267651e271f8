"""User-facing errors: each says what was wrong and what to do about it."""

from __future__ import annotations


class LowbitError(Exception):
    """An error caused by the user's input or environment, shown without a traceback.

    The CLI prints ``error: <message>`` and exits with code 2.
    """

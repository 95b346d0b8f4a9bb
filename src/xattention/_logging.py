"""Warnings a user should see once per process, not once per layer and step."""

from __future__ import annotations

import logging

__all__ = ["WARNED", "warn_once"]

WARNED: set[str] = set()


def warn_once(logger: logging.Logger, message: str) -> None:
    """``logger.warning(message)`` the first time this exact message comes; later repeats are dropped."""
    if message not in WARNED:
        WARNED.add(message)
        logger.warning(message)

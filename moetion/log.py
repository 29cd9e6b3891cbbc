"""Logging with the rank and stage in every line; ``MOETION_LOG_LEVEL`` (default INFO) sets the level."""
from __future__ import annotations

import logging
import sys

from moetion import env

_HANDLER_NAME = "moetion-rank"


def configure(*, rank: int, stage: int) -> None:
    """Sends the ``moetion`` loggers' records to stderr, prefixed with this process's rank."""
    level = env.log_level()
    logger = logging.getLogger("moetion")
    for handler in list(logger.handlers):
        if handler.get_name() == _HANDLER_NAME:
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank} stage {stage}] %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False

"""Plain log lines for journald: ``<6>`` style level prefixes when stderr is the journal."""
from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record):
        return f"<{_PRIORITY.get(record.levelno, 6)}>{record.getMessage()}"


def setup(verbose: bool = False, quiet: bool = False) -> logging.Logger:
    logger = logging.getLogger("omaha-agent")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    return logger

"""What Ultralytics logs, captured for assertions (its logger does not propagate to pytest's caplog)."""

import logging
from collections.abc import Callable


def ultralytics_log(action: Callable[[], object]) -> str:
    """Everything Ultralytics logs while `action()` runs, one message a line."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("ultralytics")
    logger.addHandler(handler)
    try:
        action()
    finally:
        logger.removeHandler(handler)
    return "\n".join(r.getMessage() for r in records)

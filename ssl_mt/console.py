"""Keeps a normal run's console to what the run itself reports.

Third-party messages known to say nothing about the run are filtered out one by one, by
logger and message or by warning category and message; everything else still shows.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from ssl_mt.data.image_io import BadSampleError, bad_sample_message

log = logging.getLogger(__name__)

# Lightning promotes its cloud products (litlogger, litmodels) through rank_zero_info.
_TIP_LOGGER = "lightning.pytorch.utilities.rank_zero"
TIP_PREFIX = "💡 Tip:"

# (category, message regex) of warnings raised by the installed libraries, not by our code.
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # torch >= 2.10 deprecates LeafSpec; Lightning's _pytree still creates one per batch.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


_TIP_FILTER = _DropTips()


def quiet_known_noise() -> None:
    """Installs the filters (idempotent); called before a Trainer is built."""
    logger = logging.getLogger(_TIP_LOGGER)
    if _TIP_FILTER not in logger.filters:
        logger.addFilter(_TIP_FILTER)
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


@contextmanager
def stop_on_bad_sample(root: str) -> Iterator[None]:
    """Ends an app whose data loader met a bad file (``data.on_bad_sample=raise``) with one
    error line naming the file and its csv row, instead of a DataLoader worker's traceback.

    Args:
        root: The dataset root, for the ``data check`` command the line suggests.

    Raises:
        SystemExit: with status 1, after logging that line.
    """
    try:
        yield
    except BadSampleError as error:
        log.error(
            "bad sample: %s. `python -m ssl_mt.data check %s` lists every bad file; "
            "data.on_bad_sample=skip skips them (and lists them in RUN/bad_samples.txt).",
            bad_sample_message(error),
            root,
        )
        raise SystemExit(1) from None

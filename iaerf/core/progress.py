"""The one progress bar of iaerf: tqdm on a terminal, a few plain lines when output goes to a file or a CI log."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

# Off a terminal a carriage-return redraw becomes a new line in the log: redraw at most this often (seconds).
_LOG_INTERVAL_S = 30.0


def progress_bar(iterable=None, *, total: int | None = None, desc: str = "", enabled: bool = True, initial: int = 0):
    """A tqdm bar over ``iterable`` (or a manual one of ``total`` steps), hidden when ``enabled`` is False."""
    interactive = getattr(sys.stderr, "isatty", lambda: False)()
    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=not enabled, leave=False,
                dynamic_ncols=interactive, mininterval=0.1 if interactive else _LOG_INTERVAL_S,
                maxinterval=_LOG_INTERVAL_S if not interactive else 10.0)

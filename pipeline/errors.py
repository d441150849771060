"""User-facing errors and the wrapper every stage's `main` runs under.

A `PipelineError` is something the user caused and can fix (bad params, a
corrupt archive, a missing file): it is printed as one line naming cause and
fix, with no traceback. Anything else is a bug and raises normally.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class PipelineError(Exception):
    """An error the user can fix; its message says what happened and what to do."""


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Run a stage's main, turning a PipelineError into one line on stderr and exit 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except PipelineError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return 130

    return wrapper

"""User-facing errors and the wrapper every stage's `main` runs under.

A `PipelineError` is something the user caused and can fix (bad params, a
corrupt archive, a missing file): it is printed as one line naming cause and
fix, with no traceback. Anything else is a bug and raises normally.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable


class PipelineError(Exception):
    """An error the user can fix; its message says what happened and what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`docker stop`, a batch scheduler's preemption, `kill`), raised like Ctrl-C
    so the stage stops the same way: its MLflow run marked KILLED, not left RUNNING."""


def _terminated(signum, frame):
    raise Terminated


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Run a stage's main, turning a PipelineError into one line on stderr and exit 1, and
    Ctrl-C or SIGTERM into a run marked KILLED and exit 130 or 143."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        # Python runs the handler between two bytecodes: within a training step's time.
        # Only over the default: a SIGTERM ignored by whoever started us stays ignored.
        install = (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        )
        if install:
            signal.signal(signal.SIGTERM, _terminated)
        try:
            return main(*args, **kwargs) or 0
        except PipelineError as error:
            end_mlflow_run("FAILED")
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt as interrupt:
            end_mlflow_run("KILLED")
            terminated = isinstance(interrupt, Terminated)
            print("terminated" if terminated else "interrupted", file=sys.stderr, flush=True)
            return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
        except Exception:
            end_mlflow_run("FAILED")
            raise
        finally:
            if install:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return wrapper


def end_mlflow_run(status: str) -> None:
    """End the stage's active MLflow run, if any, as FAILED or KILLED.

    Otherwise MLflow's own exit hook ends it as FINISHED, and `mlflow ui` shows a
    training stopped at epoch 10 of 50 as complete. A resumed training sets it
    RUNNING again.
    """
    mlflow = sys.modules.get("mlflow")  # a stage that never imported MLflow has no run
    if mlflow is None or mlflow.active_run() is None:
        return
    from pipeline.tracking import few_retries, short_reason

    try:
        # Within seconds: after a store error MLflow's own retries would hold the
        # stage's error back for minutes.
        with few_retries():
            mlflow.end_run(status)
    except Exception as error:  # the store is unreachable, say: the stage's error comes first
        print(
            f"warning: could not mark the MLflow run {status} ({short_reason(error)})",
            file=sys.stderr,
        )

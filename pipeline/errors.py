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
            end_mlflow_run("FAILED")
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            end_mlflow_run("KILLED")
            print("interrupted", file=sys.stderr, flush=True)
            return 130
        except Exception:
            end_mlflow_run("FAILED")
            raise

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

"""MLflow: where runs go, what they are tagged with, and failing fast when it is unreachable.

By default every run, from `dvc repro`, `dvc exp run`, `dvc exp run --temp` or
a queued experiment, lands in one local store at the repository root:
`mlflow.db` (SQLite) with artifacts in `mlartifacts/`, which `mlflow ui`
started there shows. Temporary experiment copies live under
`<repo>/.dvc/tmp/exps/...`; the store is anchored on the repository that holds
them, so their runs are not lost with the copy. `MLFLOW_TRACKING_URI`
overrides all of this (e.g. a shared tracking server).

Here too: waiting out a busy SQLite store (retry_locked), and store failures as one
line (reported, few_retries). What a training logs is in pipeline/run_log.py, how an
evaluation is logged in pipeline/evaluation_log.py.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import yaml

from pipeline import paths
from pipeline.errors import PipelineError

EXPERIMENT = "cifar10-resnet"  # the experiment runs go to, unless MLFLOW_EXPERIMENT_NAME says
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
_EXPERIMENT_COPY = (".dvc", "tmp", "exps")  # where DVC puts temporary experiment copies

T = TypeVar("T")

# Seconds of SQLite contention a store call waits out before giving up: long by
# default (nothing waits on it), short inside few_retries (the workers wait).
_LOCK_WAIT_S = contextvars.ContextVar("lock_wait_s", default=600.0)
# The command that tries a refused or failed stage again, named in its errors: a training
# on several machines, or in a temporary experiment copy, sets its own (train.rerun).
_RERUN = contextvars.ContextVar("rerun", default="`dvc repro`")


class TrackingError(PipelineError):
    """The MLflow tracking store cannot be reached or used."""


def experiment_name() -> str:
    """The MLflow experiment training runs go to: MLflow's own MLFLOW_EXPERIMENT_NAME where
    it is set (your own dataset's runs apart from CIFAR-10's), else cifar10-resnet."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT


def repository_root(cwd: Path | None = None) -> Path:
    """The user's repository: DVC_ROOT (or cwd), lifted out of a temporary experiment copy."""
    root = Path(os.environ.get("DVC_ROOT") or cwd or Path.cwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - len(_EXPERIMENT_COPY) + 1):
        if parts[i : i + len(_EXPERIMENT_COPY)] == _EXPERIMENT_COPY:
            return Path(*parts[:i])
    return root


def in_experiment_copy() -> bool:
    """Whether this runs in one of DVC's temporary experiment copies (`dvc exp run
    --temp`, a queued experiment), deleted with everything in it when the run ends."""
    return repository_root() != Path.cwd().resolve()


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI, else the repository's own SQLite store.

    A relative SQLite path (`sqlite:///mlflow.db`, as `mlflow` commands run from the
    repository root take it) is the repository root's file, and a relative file store
    (`mlruns`, `file:./mlruns`) the root's folder: not one in the working directory, which
    for `dvc exp run --temp` and queued runs is a copy deleted with it.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{root / DB_FILE}"
    database = sqlite_file(uri)
    if database is not None and not database.is_absolute():
        return f"sqlite:///{root}/{uri.removeprefix('sqlite:///')}"  # any ?query kept
    # A file store given as a relative path (`mlruns`, `file:./mlruns`): the same reason.
    # MLflow reads a value without a scheme as a path, but for its Databricks names.
    if uri.startswith("file:") and not uri.startswith("file://"):
        folder = uri.removeprefix("file:")
    elif ":" not in uri and uri not in ("databricks", "databricks-uc"):
        folder = uri
    else:
        return uri
    return uri if Path(folder).is_absolute() else (root / folder).as_uri()


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (`sqlite:////abs/path`, or relative, with or
    without a `?query`), else None: a server, or SQLite's in-memory `sqlite:///:memory:`."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").partition("?")[0]
    return None if path in ("", ":memory:") else Path(path)


# Stores MLflow opens through SQLAlchemy itself, by the URI's scheme (postgresql+psycopg...).
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")


def database_server(uri: str) -> bool:
    """A database server MLflow connects to itself (no MLflow server between)."""
    return uri.partition("://")[0].partition("+")[0] in DATABASE_SCHEMES


def probe_database(uri: str) -> None:
    """Connect once and let go, raising the driver's error: a host that drops packets
    fails in 10 s, not after the OS's minutes, and MLflow's own engine, which tries 10
    times over 100 s and warns at each, then opens a database that answers."""
    import sqlalchemy

    timeout = {"connect_timeout": 10} if uri.startswith(("postgresql", "mysql")) else {}
    engine = sqlalchemy.create_engine(uri, connect_args=timeout)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


def first_line(error: BaseException) -> str:
    """An error's first line (drivers add hints and links on more), or its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_locked(error: Exception) -> bool:
    """SQLite busy with another writer (a local store; a server's 503 MLflow's client
    retries itself, then reports without the server's text).

    Not MLflow's TEMPORARILY_UNAVAILABLE alone: it gives that code to every database
    OperationalError (a read-only or full disk, I/O errors) and to any HTTP 503, none of
    which waiting ten minutes in silence mends.
    """
    return "database is locked" in str(error)


def redact(uri: str) -> str:
    """`uri` with its password replaced by ***, for messages and logs."""
    # user:password@ as SQLAlchemy splits it (the user may be empty or hold an @, as
    # Azure's user@server does; the password runs to the first @ and may hold / ? #), and
    # as urllib3 splits an http one (the password runs to the last @ before the host),
    # and a libpq-style ?password= query parameter.
    uri = re.sub(r"(://[^:/\s]*:)[^@\s]*(?:@[^@/\s?#]*)*@", r"\1***@", uri)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", uri, flags=re.IGNORECASE)


def retry_locked(function: Callable[..., T]) -> Callable[..., T]:
    """Retry a store call while SQLite is busy with another writer.

    Several experiments (`dvc queue start -j 2`) write to one mlflow.db; SQLite
    allows one writer at a time, and MLflow gives up after its 20 s busy
    timeout ("database is locked", TEMPORARILY_UNAVAILABLE). Waiting and
    retrying loses nothing. It waits up to 600 s, or 30 s inside few_retries.
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        delay_s = 0.5
        deadline = time.monotonic() + _LOCK_WAIT_S.get()
        while True:
            try:
                return function(*args, **kwargs)
            except Exception as error:
                if not is_locked(error) or time.monotonic() > deadline:
                    raise
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, 10.0)

    return wrapper


@contextlib.contextmanager
def _environment(**values: str):
    """Set environment variables for the duration of a block (MLflow reads them per call)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def quiet_mlflow_logs() -> None:
    """Keep alembic's schema-migration chatter, and the tqdm bars of artifact transfers
    that flood non-terminal logs, out of the stage's output."""
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def connect(root: Path, experiment: bool = True) -> str | None:
    """Point MLflow at the store and make sure the experiment exists; return its id.

    Raises TrackingError at once (before any training) when the store is
    unreachable or refuses us, naming the URI and how to fix it. experiment=False (an
    evaluation, which logs into its training's run wherever that is): only the store is
    checked, and no experiment is created, restored or made active.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(root)
    quiet_mlflow_logs()
    mlflow.set_tracking_uri(uri)
    try:
        # Fail in seconds, not after MLflow's default 4 minutes of HTTP retries; a timeout
        # the user set is kept (a server that starts on demand may take longer than 10 s).
        timeout_s = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or "10"
        with _environment(
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=timeout_s
        ):
            if sqlite_file(uri):
                _create_schema_once(uri)
            elif database_server(uri):
                probe_database(uri)
            if not experiment:
                retry_locked(mlflow.search_experiments)(max_results=1)
                return None
            location = artifact_location(uri, root)
            return retry_locked(_get_or_create_experiment)(mlflow, location)
    except MlflowException as error:
        refused = _refused(uri, error.get_http_status_code(), message=str(error))
        if refused:
            raise TrackingError(
                f"MLflow tracking store {redact(uri)} is not usable: {refused}"
            ) from None
        raise TrackingError(_unreachable(uri, redact(first_line(error)))) from None
    except TrackingError:  # already one line (a missing folder for the SQLite file)
        raise
    except ModuleNotFoundError as error:  # a database URI whose driver is not installed
        raise TrackingError(
            f"MLflow tracking store {redact(uri)}: the database driver {error.name} is not "
            "installed; install it, or point MLFLOW_TRACKING_URI at the MLflow server"
        ) from None
    except Exception as error:  # network and driver errors come in many types
        reason = f"{type(error).__name__}: {first_line(error)}"
        raise TrackingError(_unreachable(uri, redact(reason))) from None


@contextlib.contextmanager
def store_lock():
    """Exclusive access to a local SQLite store across processes (a no-op for servers).

    Used where MLflow itself does not serialise: creating the schema (two
    processes creating a new mlflow.db at once corrupt it for good in MLflow's
    migrations) and read-then-move decisions such as the champion alias.
    """
    import fcntl

    import mlflow

    database = sqlite_file(mlflow.get_tracking_uri())
    if database is None:
        yield
        return
    with open(database.with_name(database.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _create_schema_once(uri: str) -> None:
    from mlflow import MlflowClient

    database = sqlite_file(uri)
    if not database.parent.is_dir():
        raise TrackingError(f"{uri}: the folder {database.parent} does not exist")
    with store_lock():
        retry_locked(MlflowClient(uri).search_experiments)(max_results=1)


def _unreachable(uri: str, reason: str) -> str:
    if database_server(uri):  # its login is in the URI
        return (
            f"MLflow tracking store {redact(uri)} is not usable: {reason}. Start the "
            "database or fix MLFLOW_TRACKING_URI (unset it to use the local mlflow.db)"
        )
    return (
        f"MLflow tracking store {redact(uri)} is not usable: {reason}. Start the server or fix "
        "MLFLOW_TRACKING_URI (unset it to use the local mlflow.db), and for a server that "
        "needs a login set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )


def _refused(uri: str, status: int, on: str | None = None, message: str = "") -> str | None:
    """Why a server refused our login (401), our user (403) or the host name we reached it
    by (403 from its DNS-rebinding check), and what to do, else None.

    on: what a permission 403 was about (the experiment unless said); the server says no
    more than the status.
    message: MLflow's error text, which holds the body of a response that was not JSON.
    """
    from urllib.parse import urlsplit

    on = on or f"experiment '{experiment_name()}'"
    parts = urlsplit(uri)
    if status == 403 and "Invalid Host header" in message:
        name = parts.hostname or "?"
        host = f"{name}:{parts.port}" if parts.port else name  # the Host header sent
        return (
            f"the server refuses the host name '{name}' (HTTP 403, MLflow's check against "
            "DNS rebinding: by default it answers only localhost and private IP addresses). "
            f"Its admin adds the name: MLFLOW_SERVER_ALLOWED_HOSTS='{host}' (README, \"A "
            'shared tracking server"), or reach it by its private IP address'
        )
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or parts.username
    who = f" for user '{user}'" if user else ""
    if status == 401 and not (user or os.environ.get("MLFLOW_TRACKING_TOKEN")):
        return (
            "login refused (HTTP 401), no credentials were sent. The server needs a login: "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    if (
        status == 401
        and user
        and not (os.environ.get("MLFLOW_TRACKING_PASSWORD") or parts.password)
    ):
        return (  # MLflow sends a login only with both, else the token or nothing
            f"login refused (HTTP 401){who}: no password was sent (MLFLOW_TRACKING_PASSWORD "
            "is unset or empty). Set it"
        )
    if status == 401 and not user:  # a token alone, sent as a bearer token
        return (
            "login refused (HTTP 401): the server does not take MLFLOW_TRACKING_TOKEN. A "
            "server with logins (make tracking-server) needs MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD"
        )
    if status == 401:
        return (
            f"login refused (HTTP 401){who}: wrong user name or password. Check "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the server's admin "
            "creates users and resets passwords)"
        )
    if status == 403:
        return (
            f"permission denied (HTTP 403){who} on {on}. Ask the server's admin for EDIT "
            "permission on it"
        )
    return None


def artifact_location(uri: str, root: Path) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's database file,
    or in the repository's mlartifacts/ for another database the client opens itself.

    Not MLflow's default, `./mlruns` of the working directory: a run in a temporary
    experiment copy (`dvc exp run --temp`, a queued experiment) would put them in
    the copy, deleted with it, and the experiment would keep that path for good. A
    server, or a file store, decides for itself (None).
    """
    database = sqlite_file(uri)
    if database is not None:
        return (database.parent / ARTIFACTS_DIR).as_uri()
    if database_server(uri):
        return (root / ARTIFACTS_DIR).as_uri()
    return None


def _get_or_create_experiment(mlflow, location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    name = experiment_name()
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except MlflowException as error:
            if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
                raise  # else another run created it first
        experiment = mlflow.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        _restore(mlflow, experiment.experiment_id)
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return experiment.experiment_id


def _restore(mlflow, experiment_id: str) -> None:
    """Bring back the deleted experiment: MLflow keeps its name taken until `mlflow gc`."""
    from mlflow.exceptions import MlflowException

    name = experiment_name()
    print(
        f"tracking: experiment '{name}' (id {experiment_id}) was deleted; restoring it "
        "for this run, with every run it held (MLflow restores those too, also ones deleted "
        "on their own before). To drop it for good instead: `mlflow gc` on the store",
        flush=True,
    )
    try:
        mlflow.tracking.MlflowClient().restore_experiment(experiment_id)
    except MlflowException as error:
        if error.get_http_status_code() == 403:  # restoring needs MANAGE, not EDIT
            raise TrackingError(
                f"experiment '{name}' (id {experiment_id}) is deleted, and restoring it "
                "needs MANAGE permission on it (HTTP 403): ask whoever deleted it, or the "
                f"server's admin, to restore it (`mlflow experiments restore --experiment-id "
                f"{experiment_id}`) or to remove it for good (`mlflow gc`)"
            ) from None
        again = mlflow.get_experiment(experiment_id)  # another run restored it first?
        if again is None or again.lifecycle_stage == "deleted":
            raise


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def prepared_data_hash(lock_file: Path = paths.DVC_LOCK) -> str | None:
    """md5 of data/prepared as dvc.lock records it (the exact data a run trained on)."""
    try:
        lock = yaml.safe_load(lock_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    for out in lock.get("stages", {}).get("prepare", {}).get("outs", []):
        if out.get("path") == paths.PREPARED_DIR.as_posix():
            return out.get("md5")
    return None


# Set under `dvc exp run` only: a run resumed by a plain `dvc repro` (its model then lands
# in the workspace, in no experiment) must not keep naming the experiment that started it.
DVC_TAGS = ("dvc.exp_name", "dvc.baseline_rev")


def run_tags() -> dict[str, str]:
    """Tags that lead from a run back to its exact code and data."""
    tags = {}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["git.commit"] = commit
        status = _git("status", "--porcelain", "--untracked-files=no")
        tags["git.dirty"] = str(bool(status)).lower()
    for variable, tag in zip(("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"), DVC_TAGS, strict=True):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    data_hash = prepared_data_hash()
    if data_hash:
        tags["data.prepared_md5"] = data_hash
    return tags


def store_errors() -> tuple[type[Exception], ...]:
    """What a store that does not answer raises: MLflow's errors (a server's 5xx, a
    refused connection after MLflow's retries), the network's (requests' are OSErrors)
    and, where boto3 is installed, its own: a client writing artifacts straight to S3
    (a server without --serve-artifacts) meets an expired token or a missing bucket as
    boto3's S3UploadFailedError (a Boto3Error wrapping botocore's ClientError), other
    calls as a ClientError, a dropped connection as a BotoCoreError."""
    from mlflow.exceptions import MlflowException

    errors: tuple[type[Exception], ...] = (MlflowException, OSError)
    try:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # no boto3: no S3 artifact store to fail
        return errors
    return (*errors, Boto3Error, BotoCoreError, ClientError)


def short_reason(error: Exception) -> str:
    """The error's type and first line, with any password in a URI it quotes hidden."""
    text = str(error).splitlines()[0] if str(error) else ""
    text = " ".join(redact(word) for word in text.split(" "))  # a word at a time: URIs only
    return f"{type(error).__name__}: {text[:200]}"


def retried_by(command: str) -> None:
    """Name `command` (markdown-quoted) as what runs a stage again, in its errors."""
    _RERUN.set(command)


@contextlib.contextmanager
def reported(what: str, then: str) -> Iterator[None]:
    """Turn a store error in the block into one line: `what` failed (why); `then`.

    For store calls after connect() succeeded, when the store goes down or refuses
    one request (a 403 on another user's run, say): no traceback after the work.
    """
    try:
        yield
    except store_errors() as error:
        if refused := refusal(error):  # no rerun mends it by itself
            raise TrackingError(f"{what}: {refused}; then retry with {_RERUN.get()}") from None
        raise TrackingError(f"{what} ({short_reason(error)}); {then}") from None


def refusal(error: Exception) -> str | None:
    """What a server's 401 or 403 after connect() means (a server whose default permission
    is READ lets connect through, then refuses the first write), else None."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not isinstance(error, MlflowException):
        return None
    on = f"experiment '{experiment_name()}' or the registered model it writes to"
    return _refused(mlflow.get_tracking_uri(), error.get_http_status_code(), on, str(error))


@contextlib.contextmanager
def few_retries() -> Iterator[None]:
    """Give up on an HTTP store within seconds (MLflow alone retries for minutes).

    For calls that can wait for a later try, such as one epoch's metrics: the
    training must not stand still while a server restarts, and the other workers
    of a multi-worker training wait for the chief at most COLLECTIVE_TIMEOUT_S
    (120 s). 3 tries of at most 10 s each; lower settings of the user's are kept.
    A busy SQLite store is waited out for 30 s, not 600 s: with SQLite's own 20 s
    busy timeout per try, a call gives up within about 41 s.
    """
    limits = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": 2, "MLFLOW_HTTP_REQUEST_TIMEOUT": 10}
    values = {}
    for name, limit in limits.items():
        try:
            values[name] = str(min(int(os.environ.get(name, limit)), limit))
        except ValueError:  # not a number: MLflow's own error, not ours to raise
            values[name] = str(limit)
    token = _LOCK_WAIT_S.set(30.0)
    try:
        with _environment(**values):
            yield
    finally:
        _LOCK_WAIT_S.reset(token)


@retry_locked
def run_is_gone(run_id: str) -> bool:
    """Whether the store has no such run, or has it deleted (`mlflow ui`'s delete).

    MLflow refuses to continue or log to either; any other store error is raised.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_run(run_id).info.lifecycle_stage == "deleted"
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return True


def rerun_command() -> str:
    """The command that runs the failed stage again, as errors name it (retried_by)."""
    return _RERUN.get()

"""MLflow: where runs go, what they are tagged with, and failing fast when it is unreachable.

By default every run, from `dvc repro`, `dvc exp run`, `dvc exp run --temp` or
a queued experiment, lands in one local store at the repository root:
`mlflow.db` (SQLite) with artifacts in `mlartifacts/`, which `mlflow ui`
started there shows. Temporary experiment copies live under
`<repo>/.dvc/tmp/exps/...`; the store is anchored on the repository that holds
them, so their runs are not lost with the copy. `MLFLOW_TRACKING_URI`
overrides all of this (e.g. a shared tracking server).
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

EXPERIMENT = "cifar10-resnet"
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


def _is_locked(error: Exception) -> bool:
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
                if not _is_locked(error) or time.monotonic() > deadline:
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


def connect(root: Path) -> str:
    """Point MLflow at the store and make sure the experiment exists; return its id.

    Raises TrackingError at once (before any training) when the store is
    unreachable or refuses us, naming the URI and how to fix it.
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


def _refused(
    uri: str, status: int, on: str = f"experiment '{EXPERIMENT}'", message: str = ""
) -> str | None:
    """Why a server refused our login (401), our user (403) or the host name we reached it
    by (403 from its DNS-rebinding check), and what to do, else None.

    on: what a permission 403 was about; the server says no more than the status.
    message: MLflow's error text, which holds the body of a response that was not JSON.
    """
    from urllib.parse import urlsplit

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

    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        try:
            mlflow.create_experiment(EXPERIMENT, artifact_location=location)
        except MlflowException as error:
            if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
                raise  # else another run created it first
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment.lifecycle_stage == "deleted":
        _restore(mlflow, experiment.experiment_id)
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return experiment.experiment_id


def _restore(mlflow, experiment_id: str) -> None:
    """Bring back the deleted experiment: MLflow keeps its name taken until `mlflow gc`."""
    from mlflow.exceptions import MlflowException

    print(
        f"tracking: experiment '{EXPERIMENT}' (id {experiment_id}) was deleted; restoring it "
        "for this run, with every run it held (MLflow restores those too, also ones deleted "
        "on their own before). To drop it for good instead: `mlflow gc` on the store",
        flush=True,
    )
    try:
        mlflow.tracking.MlflowClient().restore_experiment(experiment_id)
    except MlflowException as error:
        if error.get_http_status_code() == 403:  # restoring needs MANAGE, not EDIT
            raise TrackingError(
                f"experiment '{EXPERIMENT}' (id {experiment_id}) is deleted, and restoring it "
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
        if refused := _refusal(error):  # no rerun mends it by itself
            raise TrackingError(f"{what}: {refused}; then retry with {_RERUN.get()}") from None
        raise TrackingError(f"{what} ({short_reason(error)}); {then}") from None


def _refusal(error: Exception) -> str | None:
    """What a server's 401 or 403 after connect() means (a server whose default permission
    is READ lets connect through, then refuses the first write), else None."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not isinstance(error, MlflowException):
        return None
    on = f"experiment '{EXPERIMENT}' or the registered model it writes to"
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


# --- the training run ----------------------------------------------------------------------------
# Every call that writes to the store goes through retry_locked.


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


@retry_locked
def start_run(run_id: str | None):
    """Start a new run, or continue `run_id` (a resumed training), as the active run.

    A run the store no longer has (deleted in the UI, or MLFLOW_TRACKING_URI now names
    another store) cannot be continued: a new run starts, and says so.
    """
    import mlflow

    if run_id is not None and run_is_gone(run_id):
        print(
            f"train: MLflow run {run_id} is deleted or not in this tracking store; "
            "the training goes on in a new run",
            flush=True,
        )
        run_id = None
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.start_run(run_id=run_id)
    except MlflowException as error:
        # Its experiment was renamed in the UI since: connect() made a new one of our name,
        # and MLflow continues no run of another experiment than the active one.
        if run_id is None or "active experiment ID does not match" not in str(error):
            raise
    own = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    name = mlflow.get_experiment(own).name
    print(f"train: MLflow run {run_id} is in experiment '{name}' now; it goes on there")
    mlflow.set_experiment(experiment_id=own)
    return mlflow.start_run(run_id=run_id)


@retry_locked
def log_params(params: dict) -> None:
    """Log the params the active run does not have yet (a run restarted after a kill has some;
    MLflow refuses to change one, and a new data.url for the same images keeps the run)."""
    import mlflow

    run = mlflow.active_run()
    logged = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    changed = sorted(k for k, v in params.items() if k in logged and logged[k] != str(v))
    if changed:
        print(f"train: the MLflow run keeps the values it started with for {', '.join(changed)}")
    mlflow.log_params({key: value for key, value in params.items() if key not in logged})


@retry_locked
def log_params_file(params: dict) -> None:
    """The run's params as train/params.json, on every start of the run, before any epoch.

    Also the run's first upload: MLflow opens a run's artifact store only then, so a
    store that cannot take files (a folder this machine may not write, as the experiment
    a teammate created on a shared database keeps theirs; an s3:// bucket without
    credentials; a server whose --artifacts-destination is broken) stops the training
    here, not after its last epoch when the model is logged.
    """
    import mlflow

    where = redact(mlflow.get_artifact_uri())
    try:
        mlflow.log_dict(params, "train/params.json")
    except Exception as error:  # artifact stores raise their own types (OSError, boto3's, ...)
        if _is_locked(error):  # the run's lookup in a busy mlflow.db: retry_locked waits
            raise
        if refused := _refusal(error):
            raise TrackingError(
                f"cannot store the run's artifacts: {refused}; then retry with {_RERUN.get()}"
            ) from None
        raise TrackingError(
            f"cannot store the run's artifacts at {where} ({short_reason(error)}), so "
            "neither its model; no epoch was trained by this attempt: fix the artifact store "
            "(a folder this machine can write, the server's --artifacts-destination, "
            f"credentials) or wait until it answers, then retry with {_RERUN.get()}"
        ) from None


@retry_locked
def set_tags(tags: dict[str, str], unset: tuple[str, ...] = ()) -> None:
    """Set `tags` on the active run and delete those of `unset` that `tags` lacks."""
    import mlflow

    mlflow.set_tags(tags)
    run_id = mlflow.active_run().info.run_id
    logged = mlflow.MlflowClient().get_run(run_id).data.tags
    for key in unset:
        if key in logged and key not in tags:
            mlflow.delete_tag(key)


@retry_locked
def log_epoch(row: dict, step: int) -> None:
    import mlflow

    mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=step)


@retry_locked
def backfill_metrics(run_id: str, history: list[dict]) -> None:
    """Log the epochs a killed run checkpointed, or a store outage kept from the store,
    but not yet logged; never twice. Each metric's steps are looked up on their own, and
    each request (at most 1000 values, MLflow's batch limit) holds whole epochs, so a
    request that fails part-way through a long backfill leaves nothing half-logged."""
    import mlflow
    from mlflow.entities import Metric

    if not history:
        return
    client = mlflow.MlflowClient()
    keys = sorted({key for row in history for key in row if key != "epoch"})
    logged = {key: {m.step for m in client.get_metric_history(run_id, key)} for key in keys}
    now_ms = int(time.time() * 1000)
    batch: list[Metric] = []
    for row in history:
        epoch = [
            Metric(key, value, now_ms, row["epoch"])
            for key, value in row.items()
            if key != "epoch" and row["epoch"] not in logged[key]
        ]
        if len(batch) + len(epoch) > 1000:
            client.log_batch(run_id, metrics=batch)
            batch = []
        batch += epoch
    if batch:
        client.log_batch(run_id, metrics=batch)


@retry_locked
def log_final(summary: dict, files: list[Path]) -> None:
    """The training's summary figures as final_* metrics (those the run lacks: a rerun
    after a failed log does not add a second value) and its files under train/."""
    import mlflow

    run_id = mlflow.active_run().info.run_id
    logged = mlflow.MlflowClient().get_run(run_id).data.metrics
    final = {f"final_{k}": v for k, v in summary.items() if isinstance(v, int | float)}
    mlflow.log_metrics({key: value for key, value in final.items() if key not in logged})
    for file in files:
        mlflow.log_artifact(str(file), artifact_path="train")


@retry_locked
def log_model(model, examples, class_names: list[str]) -> str:
    """Log `model` with the keras flavor as the active run's `model`; its model URI.

    The signature says what a caller sends: a batch of raw uint8 images
    (batch, H, W, 3), and gets back class probabilities (batch, classes).
    Once per run: a try cut short (a busy SQLite store, which retry_locked waits
    out, a kill, a store error) leaves a model PENDING or FAILED, which the next
    try deletes before it logs (where the user may: on a server with logins only
    the experiment's managers can; otherwise it stays, marked unfinished); one
    that finished (READY) is the run's model.
    """
    import mlflow
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import infer_signature

    run = mlflow.active_run().info
    earlier = mlflow.search_logged_models(
        experiment_ids=[run.experiment_id],
        filter_string=f"source_run_id = '{run.run_id}'",
        output_format="list",
    )
    for found in earlier:
        if found.status == LoggedModelStatus.READY:
            return found.model_uri
    for found in earlier:
        try:
            mlflow.MlflowClient().delete_logged_model(found.model_id)
        except store_errors() as error:
            if _is_locked(error):
                raise  # retry_locked waits for the other writer
            print(
                f"train: an earlier try's unfinished model {found.model_id} stays "
                f"({found.status}; not deleted: {short_reason(error)})",
                flush=True,
            )

    sample = examples.images[:4]  # (4, H, W, 3) uint8
    signature = infer_signature(sample, model.predict(sample, verbose=0))
    with _input_example_fix():
        info = mlflow.keras.log_model(
            model,
            name="model",
            signature=signature,
            input_example=sample,
            # Known, so MLflow need not infer them (slow, and it imports half the env).
            pip_requirements=_pip_requirements(),
            metadata={"class_names": list(class_names)},
        )
    return info.model_uri


@retry_locked
def end_run(run_id: str) -> None:
    """Mark the active run `run_id` FINISHED and end it.

    mlflow.end_run alone takes the run off its stack before it writes the status, so
    a retry after a busy SQLite store would find no run and leave it RUNNING: the
    status is written first, through the client, and retried; the end after it only
    drops the run from the stack (its second write of the same status may fail).
    """
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, "FINISHED")
    with contextlib.suppress(*store_errors()):
        mlflow.end_run()


@retry_locked
def end_abandoned(run_id: str, logged: bool) -> None:
    """End a run that discarded recovery state leaves behind, if it is still RUNNING
    (a SIGKILL leaves it so): FINISHED when its model was logged, else KILLED. Best
    effort, within seconds: its training is not coming back either way."""
    import mlflow

    status = "FINISHED" if logged else "KILLED"
    try:
        with few_retries():
            client = mlflow.MlflowClient()
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "deleted" or run.info.status != "RUNNING":
                return
            client.set_terminated(run_id, status)
    except store_errors() as error:
        if _is_locked(error):
            raise  # retry_locked waits for the other writer
        if getattr(error, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":  # another store's
            print(f"train: could not mark MLflow run {run_id} {status} ({short_reason(error)})")
        return
    print(f"train: marked MLflow run {run_id} of the discarded state {status}", flush=True)


@contextlib.contextmanager
def _input_example_fix():
    """Work around MLflow 3.17's keras flavor writing the input example before it
    creates the model directory (FileNotFoundError on input_example.json): make
    the directory first. Scoped to one log_model call; harmless once fixed upstream."""
    import mlflow.keras.save as keras_save

    original = keras_save._save_example

    def save_example(mlflow_model, example, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, example, path, *args, **kwargs)

    keras_save._save_example = save_example
    try:
        yield
    finally:
        keras_save._save_example = original


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("tensorflow", "keras", "mlflow", "numpy")]


# --- evaluations of a trained model ------------------------------------------------------------


@retry_locked
def check_run(run_id: str, named_by: Path) -> None:
    """Fail before the work if the training run an evaluation logs into is not in this store."""
    import mlflow

    if run_is_gone(run_id):
        raise TrackingError(
            f"{named_by} names MLflow run {run_id}, which is deleted or not in the tracking "
            f"store {redact(mlflow.get_tracking_uri())}: the evaluation is logged into the run "
            "that trained the model. Point MLFLOW_TRACKING_URI at that run's store (a model from "
            "`dvc pull` needs the team's server), or retrain with `dvc repro -f train`"
        )


def log_evaluation(run_id: str, metrics: dict[str, float], files: list[Path], params: dict) -> int:
    """Record evaluation k of training run `run_id`: metrics at step k, files under evaluation-k/.

    Returns k. See pipeline/evaluate.py for why evaluations are kept this way. Two steps,
    each retried on its own while SQLite is locked; a retry finds the number its claim
    took (the run param `evaluation.k`, whose value `mark` is this evaluation's alone).
    """
    import socket
    import uuid

    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    mark = f"{when} {socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:8]}"
    number = _log_evaluation_metrics(run_id, metrics, mark)
    _log_evaluation_files(run_id, number, files, {**params, "evaluation.claim": mark})
    return number


EVALUATION_PARAM = re.compile(r"evaluation\.(\d+)")  # a run param claiming evaluation k


def _claims(client, run_id: str) -> dict[int, str]:
    """The run's evaluation claims: number -> the mark of the evaluation that took it."""
    params = client.get_run(run_id).data.params
    return {int(m[1]): v for k, v in params.items() if (m := EVALUATION_PARAM.fullmatch(k))}


@retry_locked
def _log_evaluation_metrics(run_id: str, metrics: dict[str, float], mark: str) -> int:
    """Claim the next evaluation number and log the metrics at that step: one batch, which
    the store writes whole or not at all, up to MLflow's 1000 metrics a request (five
    headline figures and one per class: about 995 classes). Beyond, MLflow sends several,
    and a store failing between them leaves that step part-logged."""
    import mlflow

    client = mlflow.MlflowClient()
    with store_lock():  # SQLite: the whole step at once (claims alone suffice on a server)
        number = _claim_evaluation(client, run_id, mark)
        stamp = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[
                mlflow.entities.Metric(key, float(value), stamp, number)
                for key, value in metrics.items()
            ],
        )
    return number


def _claim_evaluation(client, run_id: str, mark: str) -> int:
    """The lowest free evaluation number, taken by logging the run param `evaluation.k` =
    `mark`. MLflow's params never change once logged, and every store (SQL databases
    through their primary key) refuses a second value for one atomically: two evaluations
    of one run at once (`dvc queue start -j 2` of `evaluate.*` experiments, on a tracking
    server) take two numbers, where reading the metric history and writing after it
    would give both the same one and the second's files would overwrite the first's.
    Numbers start after the evaluations the test_accuracy history holds (those logged
    before claims were)."""
    from mlflow.exceptions import MlflowException

    claimed = _claims(client, run_id)
    for number, value in claimed.items():
        if value == mark:  # a retry after the claim got through
            return number
    number = len(client.get_metric_history(run_id, "test_accuracy")) + 1
    while True:
        while number in claimed:
            number += 1
        try:
            client.log_param(run_id, f"evaluation.{number}", mark)
            return number
        except MlflowException:  # taken meanwhile, or the store's own trouble: look
            taken = _claims(client, run_id).get(number)
            if taken == mark:  # ours after all: the reply was lost, and a retry refused
                return number
            if taken is None:
                raise
            claimed[number] = taken


@retry_locked
def _log_evaluation_files(run_id: str, number: int, files: list[Path], params: dict) -> None:
    """Evaluation `number`'s files and params, and the count: all overwritten on a retry."""
    import mlflow

    client = mlflow.MlflowClient()
    folder = f"evaluation-{number}"
    for file in files:
        client.log_artifact(run_id, str(file), artifact_path=folder)
    client.log_dict(run_id, params, f"{folder}/params.json")
    # The highest number claimed, not this one: a later evaluation may be done first.
    client.set_tag(run_id, "evaluation.count", str(max([number, *_claims(client, run_id)])))


@retry_locked
def set_run_tags(run_id: str, tags: dict[str, str]) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)

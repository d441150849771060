"""A team's MLflow tracking server: runs in PostgreSQL, artifacts proxied, logins required.

    export MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:PASSWORD@db-host:5432/mlflow
    python -m pipeline.server \\
        --artifacts-destination s3://team-bucket/mlflow --host 0.0.0.0 --port 5000
    make tracking-server    # the same, each option from its environment variable

It runs `mlflow server --app-name basic-auth` with:

- the backend store (experiments, runs, params, metrics, the model registry)
  in a SQL database, PostgreSQL for a team (`--backend-store-uri`);
- artifacts (plots, models) proxied through the server as `mlflow-artifacts:/`
  into `--artifacts-destination`, a local folder or object storage (s3://,
  gs://, ...), so clients need the server's address and a login, no storage
  credentials;
- MLflow's basic-auth app: every request needs a user and password. The admin
  user is created on the first start from MLFLOW_AUTH_ADMIN_PASSWORD (only
  read from the environment, never written anywhere); users are stored in
  `--auth-database-uri` (default: SQLite in the state folder).

Generated here, in `--state-dir` (default ~/.local/state/mlflow-server): the
auth config file `basic_auth.ini` MLflow reads through MLFLOW_AUTH_CONFIG_PATH,
and the Flask secret key (unless MLFLOW_FLASK_SERVER_SECRET_KEY is set; several
replicas behind one address need the same key). Both files are readable by
their owner only: the ini holds the auth database's URI.

MLflow answers only requests whose Host header it allows (its check against DNS
rebinding; HTTP 403 "Invalid Host header" otherwise), by default localhost and
private IP addresses, and its UI may only change things from localhost. This
command adds the machine's own names to both, so clients and browsers reach it
as http://NAME:PORT; for another name (a DNS alias, a proxy) add it to
MLFLOW_SERVER_ALLOWED_HOSTS (e.g. `mlflow.example.com:*,mlflow.example.com`)
and MLFLOW_SERVER_CORS_ALLOWED_ORIGINS (`https://mlflow.example.com`): their
entries are kept beside the defaults and the machine's names.

Arguments after `--` go to `mlflow server` as they are. Give URIs that hold a
password through their environment variables rather than as flags: any user of
the machine can read a command line (`ps`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline import files
from pipeline.errors import PipelineError, Terminated, cli
from pipeline.tracking import first_line, probe_database, redact

PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")
AUTH_CONFIG_FILE = "basic_auth.ini"
SECRET_KEY_FILE = "flask_secret_key"
AUTH_DATABASE_FILE = "basic_auth.db"
# MLflow's own variables for the Host headers and browser origins it answers.
ALLOWED_HOSTS = "MLFLOW_SERVER_ALLOWED_HOSTS"
ALLOWED_ORIGINS = "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerConfig:
    backend_store_uri: str  # SQLAlchemy URI: postgresql://user:password@host:5432/mlflow
    artifacts_destination: str  # an absolute folder, or s3://bucket/path and the like
    host: str
    port: int
    workers: int
    auth_database_uri: str
    default_permission: str  # what a user may do on others' experiments and models
    admin_username: str
    state_dir: Path
    mlflow_args: tuple[str, ...]  # passed through to `mlflow server`


def default_state_dir() -> Path:
    state_home = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state_home) / "mlflow-server"


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    argv = sys.argv[1:] if argv is None else list(argv)
    passthrough: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, passthrough = argv[:at], argv[at + 1 :]
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.server",
        description=__doc__.splitlines()[0],
        epilog="Each option defaults to the environment variable named in its help.",
    )
    parser.add_argument(
        "--backend-store-uri",
        default=env("MLFLOW_BACKEND_STORE_URI"),
        help="runs and the model registry: postgresql://USER:PASSWORD@HOST:5432/DB "
        "(MLFLOW_BACKEND_STORE_URI; required)",
    )
    parser.add_argument(
        "--artifacts-destination",
        default=env("MLFLOW_ARTIFACTS_DESTINATION"),
        help="where the server stores artifacts: a folder or s3://BUCKET/PATH "
        "(MLFLOW_ARTIFACTS_DESTINATION; required)",
    )
    parser.add_argument(
        "--host",
        default=env("MLFLOW_SERVER_HOST", "127.0.0.1"),
        help="interface to listen on; 0.0.0.0 for other machines (MLFLOW_SERVER_HOST; 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        default=env("MLFLOW_SERVER_PORT", "5000"),
        help="TCP port (MLFLOW_SERVER_PORT; 5000)",
    )
    parser.add_argument(
        "--workers",
        default=env("MLFLOW_SERVER_WORKERS", "4"),
        help="server processes (MLFLOW_SERVER_WORKERS; 4)",
    )
    parser.add_argument(
        "--auth-database-uri",
        default=env("MLFLOW_AUTH_DATABASE_URI"),
        help="users and permissions, e.g. postgresql://USER:PASSWORD@HOST:5432/mlflow_auth "
        f"(MLFLOW_AUTH_DATABASE_URI; SQLite {AUTH_DATABASE_FILE} in the state folder)",
    )
    parser.add_argument(
        "--default-permission",
        default=env("MLFLOW_AUTH_DEFAULT_PERMISSION", "EDIT"),
        help="every user's permission on experiments and models others created; EDIT lets a "
        "team log runs to one experiment and register versions of one model "
        f"({', '.join(PERMISSIONS)}; MLFLOW_AUTH_DEFAULT_PERMISSION; EDIT)",
    )
    parser.add_argument(
        "--admin-username",
        default=env("MLFLOW_AUTH_ADMIN_USERNAME", "admin"),
        help="the admin user, created on the first start with the password in "
        "MLFLOW_AUTH_ADMIN_PASSWORD (MLFLOW_AUTH_ADMIN_USERNAME; admin)",
    )
    parser.add_argument(
        "--state-dir",
        default=env("MLFLOW_SERVER_STATE_DIR") or str(default_state_dir()),
        help="folder for the generated auth config and secret key "
        "(MLFLOW_SERVER_STATE_DIR; ~/.local/state/mlflow-server)",
    )
    args = parser.parse_args(argv)
    return validate(args, tuple(passthrough))


def validate(args: argparse.Namespace, passthrough: tuple[str, ...]) -> ServerConfig:
    """The options as a ServerConfig; a missing or bad one raises PipelineError naming it."""
    if not args.backend_store_uri:
        raise PipelineError(
            "--backend-store-uri: required; give the database, e.g. "
            "postgresql://mlflow:PASSWORD@db-host:5432/mlflow (or set MLFLOW_BACKEND_STORE_URI)"
        )
    if not args.artifacts_destination:
        raise PipelineError(
            "--artifacts-destination: required; give a folder or s3://bucket/path "
            "(or set MLFLOW_ARTIFACTS_DESTINATION)"
        )
    port = _integer("--port", args.port, 1, 65535)
    workers = _integer("--workers", args.workers, 1, 64)
    permission = args.default_permission.upper()
    if permission not in PERMISSIONS:
        raise PipelineError(
            f"--default-permission: must be one of {', '.join(PERMISSIONS)}, "
            f"got {args.default_permission!r}"
        )
    destination = args.artifacts_destination
    if "://" not in destination:  # a local folder: absolute, so the server's cwd does not matter
        destination = str(Path(destination).expanduser().resolve())
    state_dir = Path(args.state_dir).expanduser().resolve()
    auth_uri = args.auth_database_uri or f"sqlite:///{state_dir / AUTH_DATABASE_FILE}"
    return ServerConfig(
        backend_store_uri=args.backend_store_uri,
        artifacts_destination=destination,
        host=args.host,
        port=port,
        workers=workers,
        auth_database_uri=auth_uri,
        default_permission=permission,
        admin_username=args.admin_username,
        state_dir=state_dir,
        mlflow_args=passthrough,
    )


def _integer(option: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise PipelineError(f"{option}: must be an integer from {low} to {high}, got {text!r}")
    return value


def check_database(uri: str, option: str, private: bool = False) -> None:
    """Connect once, so a wrong URI or a database that is down fails now, in one line.

    private: a SQLite file only its owner may read (0600), as the users' password
    hashes in the auth database must be; an existing one is narrowed too.
    """
    from pipeline.tracking import sqlite_file

    path = sqlite_file(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if private:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # an empty file: a new DB
            os.chmod(path, 0o600)
    try:
        probe_database(uri)
    except ModuleNotFoundError as error:
        raise PipelineError(
            f"{option} {redact(uri)}: the database driver {error.name} is not installed; "
            "install this project's dependencies (pip install -e .)"
        ) from None
    except Exception as error:  # drivers raise many types: bad URI, refused, no such database
        raise PipelineError(
            f"{option} {redact(uri)} is not usable: {redact(first_line(error))}. Start the "
            "database and create it (createdb), or fix the URI"
        ) from None


def write_auth_config(cfg: ServerConfig) -> Path:
    """basic_auth.ini for MLflow's basic-auth app; owner-only, since it names the auth database."""
    path = cfg.state_dir / AUTH_CONFIG_FILE
    text = (
        "# Written by `python -m pipeline.server` at each start: change its options, not this.\n"
        "[mlflow]\n"
        f"default_permission = {cfg.default_permission}\n"
        f"database_uri = {cfg.auth_database_uri.replace('%', '%%')}\n"
        f"admin_username = {cfg.admin_username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    files.write_text(path, text, private=True)
    return path


def secret_key(state_dir: Path) -> str:
    """The Flask secret key (CSRF for the login pages): from the environment, else kept here."""
    if os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        return os.environ["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    path = state_dir / SECRET_KEY_FILE
    if path.exists() and (kept := path.read_text().strip()):
        return kept
    key = secrets.token_hex(32)  # also for an empty file, which MLflow would refuse
    files.write_text(path, key + "\n", private=True)
    return key


def mlflow_server_args(cfg: ServerConfig) -> list[str]:
    """The `mlflow server` command line (without `mlflow server`) for `cfg`."""
    return [
        "--app-name", "basic-auth",
        "--backend-store-uri", cfg.backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination", cfg.artifacts_destination,
        "--host", cfg.host,
        "--port", str(cfg.port),
        "--workers", str(cfg.workers),
        *cfg.mlflow_args,
    ]  # fmt: skip


def machine_names() -> list[str]:
    """The names other machines likely reach this one by: its host name and full name."""
    names: list[str] = []
    for name in (socket.gethostname(), socket.getfqdn()):
        name = name.strip().lower()
        if name and name != "localhost" and name not in names:
            names.append(name)
    return names


def allowed_names(cfg: ServerConfig, names: list[str], environ: Mapping[str, str]) -> dict:
    """MLflow's variables for the Host headers and UI origins it answers, as the server is
    to see them: the user's own entries (in those variables), MLflow's default hosts
    (localhost, private IP addresses) and this machine's `names` at the port.

    Set as variables, not options: MLflow refuses the options beside --gunicorn-opts or
    --waitress-opts, and its Flask and FastAPI checks read the variables in every worker.
    Left alone: a list given as an option after `--` (MLflow's own, used as it is), or `*`.
    Origins get only the machine's names: a private address is no proof that a page
    served from there may act for a logged-in user.
    """
    from mlflow.server.security_utils import get_default_allowed_hosts

    def listed(variable: str) -> list[str]:
        return [entry.strip() for entry in environ.get(variable, "").split(",") if entry.strip()]

    def given(option: str) -> bool:
        return any(arg == option or arg.startswith(f"{option}=") for arg in cfg.mlflow_args)

    settings = {}
    hosts, origins = listed(ALLOWED_HOSTS), listed(ALLOWED_ORIGINS)
    if not given("--allowed-hosts") and "*" not in hosts:
        ours = [*get_default_allowed_hosts(), *(f"{name}:{cfg.port}" for name in names)]
        settings[ALLOWED_HOSTS] = ",".join(dict.fromkeys([*hosts, *ours]))
    if not given("--cors-allowed-origins") and "*" not in origins and (origins or names):
        ours = [f"http://{name}:{cfg.port}" for name in names]
        settings[ALLOWED_ORIGINS] = ",".join(dict.fromkeys([*origins, *ours]))
    return settings


@cli
def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    check_database(cfg.backend_store_uri, "--backend-store-uri")
    check_database(cfg.auth_database_uri, "--auth-database-uri", private=True)
    if "://" not in cfg.artifacts_destination:
        Path(cfg.artifacts_destination).mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(write_auth_config(cfg))
    # MLflow reads the admin name from this variable before the ini: the option must win.
    os.environ["MLFLOW_AUTH_ADMIN_USERNAME"] = cfg.admin_username
    os.environ["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secret_key(cfg.state_dir)
    # Background job runners serve GenAI features this pipeline does not use; off, they
    # save a dozen processes. Set it to true to have them.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print(
        f"server: MLflow at http://{cfg.host}:{cfg.port} (logins required); "
        f"runs in {redact(cfg.backend_store_uri)}, "
        f"artifacts in {redact(cfg.artifacts_destination)}, "
        f"users in {redact(cfg.auth_database_uri)}; config {os.environ['MLFLOW_AUTH_CONFIG_PATH']}",
        flush=True,
    )
    names = machine_names()
    settings = allowed_names(cfg, names, os.environ)
    os.environ.update(settings)
    if names and ALLOWED_HOSTS in settings and cfg.host not in LOOPBACK:  # others reach it
        reached = ", ".join(f"http://{name}:{cfg.port}" for name in names)
        print(
            f"server: clients may use {reached} (API clients also a private IP address); "
            f"for another name add it to {ALLOWED_HOSTS} and, for the UI, "
            f"{ALLOWED_ORIGINS} (README)",
            flush=True,
        )

    import click
    import sqlalchemy
    from mlflow.cli import server as mlflow_server
    from mlflow.exceptions import MlflowException

    try:
        # MLflow's own command, in this process: it bootstraps the admin user, then runs the
        # workers until stopped. Its configuration errors (no admin password) become one line.
        with keep_server_process() as started:
            mlflow_server.main(
                mlflow_server_args(cfg), prog_name="mlflow server", standalone_mode=False
            )
    except MlflowException as error:
        hint = ""
        if "admin_password" in error.message or "ADMIN_PASSWORD" in error.message:
            # MLflow's own text points at the ini, which this command rewrites at each start.
            hint = f" (use the variable: this command rewrites {AUTH_CONFIG_FILE} at each start)"
        raise PipelineError(f"mlflow server: {error.message}{hint}") from None
    except sqlalchemy.exc.SQLAlchemyError as error:
        # The auth database's schema, made here before the workers start: a user that may
        # connect but not create tables (PostgreSQL 15's public schema), say.
        raise PipelineError(
            f"mlflow server: the database refused its schema ({redact(first_line(error))}); "
            "give the server's database user its own database (createdb -O) or rights on "
            "the schema"
        ) from None
    except click.ClickException as error:  # a bad option after `--`
        raise PipelineError(f"mlflow server: {error.format_message()}") from None
    except click.exceptions.Abort as error:  # click's for Ctrl-C before the workers ran
        stopped = error.__context__  # click turns SIGTERM's Terminated into Abort too
        raise (stopped if isinstance(stopped, Terminated) else KeyboardInterrupt()) from None
    if problem := exit_problem(started):
        raise PipelineError(f"mlflow server: {problem}")


@contextlib.contextmanager
def keep_server_process():
    """The uvicorn process `mlflow server` starts, to read its exit status afterwards.

    MLflow 3.17 waits for that process and drops its status, so a server that could not
    bind its port or whose workers died would end this command with 0, and a service
    manager would never restart it. Its one process starter (mlflow.server._exec_cmd) is
    wrapped for the duration; the list stays empty on a MLflow that starts it otherwise.
    """
    import mlflow.server

    started: list[subprocess.Popen] = []
    original = getattr(mlflow.server, "_exec_cmd", None)
    if original is None:
        yield started
        return

    def exec_and_keep(*args, **kwargs):
        process = original(*args, **kwargs)
        if isinstance(process, subprocess.Popen):
            started.append(process)
        return process

    mlflow.server._exec_cmd = exec_and_keep
    try:
        yield started
    finally:
        mlflow.server._exec_cmd = original


def exit_problem(started: list[subprocess.Popen]) -> str | None:
    """What went wrong with the server process, from its exit status; None for a clean stop
    (status 0, or the SIGTERM / SIGINT this command forwards to it)."""
    for process in started:
        code = process.poll()
        if code is None or code == 0 or -code in (signal.SIGTERM, signal.SIGINT):
            continue
        if code < 0:
            return f"the server was killed by signal {-code}"
        return f"the server exited with status {code} (its own error is above)"
    return None


if __name__ == "__main__":
    sys.exit(main())

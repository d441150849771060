"""A team's tracking server, for real: PostgreSQL, `python -m pipeline.server`, logins.

One PostgreSQL (initdb into a temporary folder, on a free loopback port) and one
MLflow server started the documented way, with its backend store and its users
in PostgreSQL and artifacts proxied into a temporary folder. The pipeline's
stages run in a repository copy against it through MLFLOW_TRACKING_URI and
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, with no other change. The
server tests share that server and run in file order: the first checks that a
refused client left it empty, so it runs before any test logs to it.

PostgreSQL refuses to run as root: as root (CI), the database runs as `nobody`.
Without the PostgreSQL server binaries these tests skip.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from pipeline import evaluation_log, files
from pipeline import server as launcher
from pipeline.errors import PipelineError, Terminated
from tests.repo import ROOT, TINY, Background, dvc, free_port, make_repo, run, set_params, stage_env

# MLflow's server module imports a deprecated Starlette module; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:starlette.middleware.wsgi is deprecated")

ADMIN, ADMIN_PASSWORD = "admin", "admin-" + secrets.token_hex(8)
USERS = {"alice": "alice-password-1", "bob": "bob-password-22"}  # MLflow wants 12+ characters
MLFLOW_LOGIN = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


# --- the launcher's options, without a server ------------------------------------------------


def test_launcher_takes_its_options_from_the_environment_and_passes_extra_ones_on(
    monkeypatch, tmp_path
):
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", "postgresql://mlflow:pw@db:5432/mlflow")
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", "s3://team-bucket/mlflow")
    monkeypatch.setenv("MLFLOW_SERVER_PORT", "5050")
    monkeypatch.delenv("MLFLOW_AUTH_DATABASE_URI", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_DEFAULT_PERMISSION", raising=False)
    cfg = launcher.parse_args(
        ["--host", "0.0.0.0", "--state-dir", str(tmp_path), "--", "--allowed-hosts", "mlflow.x"]
    )
    assert launcher.mlflow_server_args(cfg) == [
        "--app-name", "basic-auth",
        "--backend-store-uri", "postgresql://mlflow:pw@db:5432/mlflow",
        "--serve-artifacts", "--artifacts-destination", "s3://team-bucket/mlflow",
        "--host", "0.0.0.0", "--port", "5050", "--workers", "4",
        "--allowed-hosts", "mlflow.x",
    ]  # fmt: skip
    assert cfg.auth_database_uri == f"sqlite:///{tmp_path / 'basic_auth.db'}"
    assert cfg.default_permission == "EDIT"


def test_the_machines_own_names_are_allowed_beside_the_defaults_and_the_users_own(tmp_path):
    """MLflow answers only Host headers it allows (localhost and private IPs by default), so
    clients of a server on mlflow-host reaching it as http://mlflow-host:5000 got 403."""
    from mlflow.server.security_utils import get_default_allowed_hosts

    base = ["--backend-store-uri", "sqlite:///x.db", "--artifacts-destination", "a",
            "--state-dir", str(tmp_path)]  # fmt: skip
    cfg = launcher.parse_args(base)
    names = ["mlflow-host", "mlflow-host.team.lan"]
    settings = launcher.allowed_names(cfg, names, {})
    assert settings[launcher.ALLOWED_HOSTS].split(",") == [
        *get_default_allowed_hosts(),
        "mlflow-host:5000",
        "mlflow-host.team.lan:5000",
    ]  # MLflow's defaults kept: localhost:*, 10.*, ...
    assert settings[launcher.ALLOWED_ORIGINS] == (
        "http://mlflow-host:5000,http://mlflow-host.team.lan:5000"
    )
    # Variables, not options: MLflow refuses the options beside --gunicorn-opts.
    assert not any(a.startswith("--allowed-hosts") for a in launcher.mlflow_server_args(cfg))
    # The user's own entries are kept, first; `*` and MLflow's own options are left alone.
    user = {launcher.ALLOWED_HOSTS: "mlflow.example.com:*, mlflow.example.com",
            launcher.ALLOWED_ORIGINS: "https://mlflow.example.com"}  # fmt: skip
    settings = launcher.allowed_names(cfg, ["mlflow-host"], user)
    hosts = settings[launcher.ALLOWED_HOSTS].split(",")
    assert hosts[:2] == ["mlflow.example.com:*", "mlflow.example.com"]
    assert {"localhost:*", "mlflow-host:5000"} <= set(hosts)
    assert settings[launcher.ALLOWED_ORIGINS] == (
        "https://mlflow.example.com,http://mlflow-host:5000"
    )
    assert launcher.allowed_names(cfg, names, {launcher.ALLOWED_HOSTS: "*"}).keys() == {
        launcher.ALLOWED_ORIGINS
    }
    given = launcher.parse_args([*base, "--", "--allowed-hosts=mlflow.example.com:*"])
    assert launcher.allowed_names(given, names, {}).keys() == {launcher.ALLOWED_ORIGINS}
    assert "localhost" not in launcher.machine_names()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--backend-store-uri: required"),
        (["--backend-store-uri", "sqlite:///x.db"], "--artifacts-destination: required"),
        (["--backend-store-uri", "sqlite:///x.db", "--artifacts-destination", "a", "--port", "0"],
         "--port: must be an integer from 1 to 65535, got '0'"),
        (["--backend-store-uri", "sqlite:///x.db", "--artifacts-destination", "a",
          "--default-permission", "ALL"], "--default-permission: must be one of READ, USE, EDIT"),
    ],
)  # fmt: skip
def test_launcher_names_a_missing_or_bad_option(monkeypatch, argv, message):
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(PipelineError, match="^" + message.replace("(", r"\(")):
        launcher.parse_args(argv)


def test_auth_config_is_private_and_readable_by_mlflow(tmp_path):
    import configparser

    auth_uri = "postgresql://mlflow:p%40ss@db:5432/mlflow_auth"  # '%' must survive the ini
    cfg = launcher.parse_args([
        "--backend-store-uri", "sqlite:///x.db", "--artifacts-destination", str(tmp_path / "a"),
        "--auth-database-uri", auth_uri, "--default-permission", "read",
        "--state-dir", str(tmp_path / "state"),
    ])  # fmt: skip
    path = launcher.write_auth_config(cfg)
    assert path.stat().st_mode & 0o777 == 0o600
    config = configparser.ConfigParser()  # as MLflow reads it, with % interpolation
    config.read(path)
    assert config["mlflow"]["database_uri"] == auth_uri
    assert config["mlflow"]["default_permission"] == "READ"
    assert config["mlflow"]["admin_username"] == "admin"
    key = launcher.secret_key(cfg.state_dir)
    assert key == launcher.secret_key(cfg.state_dir)  # kept across restarts
    assert (cfg.state_dir / "flask_secret_key").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in cfg.state_dir.iterdir()) == ["basic_auth.ini", "flask_secret_key"]


def test_an_empty_or_half_written_secret_key_does_not_block_the_next_start(tmp_path, monkeypatch):
    """MLflow refuses an empty key, with a message that the launcher makes one itself."""
    monkeypatch.delenv("MLFLOW_FLASK_SERVER_SECRET_KEY", raising=False)
    kept = tmp_path / "flask_secret_key"
    kept.write_text("")  # left by an older version killed midway, say
    key = launcher.secret_key(tmp_path)
    assert len(key) == 64 and kept.read_text() == key + "\n"

    def killed(source, target):
        raise OSError("No space left on device")

    monkeypatch.setattr(launcher.os, "replace", killed)
    with pytest.raises(OSError, match="No space left"):
        files.write_text(kept, "other\n", private=True)
    assert kept.read_text() == key + "\n"  # the key in use is whole


def test_the_auth_database_with_the_password_hashes_is_private(tmp_path):
    auth = tmp_path / "state" / "basic_auth.db"
    launcher.check_database(f"sqlite:///{auth}", "--auth-database-uri", private=True)
    assert auth.stat().st_mode & 0o777 == 0o600
    auth.chmod(0o644)  # made by an earlier version, world-readable
    launcher.check_database(f"sqlite:///{auth}", "--auth-database-uri", private=True)
    assert auth.stat().st_mode & 0o777 == 0o600


def test_the_admin_option_wins_and_a_missing_password_names_the_variable(
    tmp_path, monkeypatch, capsys
):
    from mlflow.cli import server as mlflow_server

    seen = {}

    def refuse(args, **kwargs):  # MLflow's own bootstrap check, with no password set
        from mlflow.server.auth import _validate_bootstrap_admin_password

        seen["admin"] = os.environ["MLFLOW_AUTH_ADMIN_USERNAME"]
        _validate_bootstrap_admin_password(seen["admin"], None)

    monkeypatch.setattr(mlflow_server, "main", refuse)
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "someone-else")
    # main sets these for MLflow; set here, they are restored after the test.
    for name in (
        "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
    ):  # fmt: skip
        monkeypatch.setenv(name, "")
    status = launcher.main([
        "--backend-store-uri", f"sqlite:///{tmp_path / 'runs.db'}",
        "--artifacts-destination", str(tmp_path / "artifacts"),
        "--state-dir", str(tmp_path / "state"), "--admin-username", "teamlead",
    ])  # fmt: skip
    assert status == 1 and seen["admin"] == "teamlead"
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(
        "error: mlflow server: MLflow Authentication needs a password to create the admin user "
        "'teamlead'"
    )
    assert last.endswith("(use the variable: this command rewrites basic_auth.ini at each start)")


def test_passwords_are_redacted_wherever_a_uri_carries_them():
    cases = {
        "postgresql://mlflow:s3cret@db:5432/mlflow": "postgresql://mlflow:***@db:5432/mlflow",
        "postgresql://:s3cret@db/mlflow": "postgresql://:***@db/mlflow",
        "postgresql://mlflow:Zm9v/YmFy+==@db/mlflow": "postgresql://mlflow:***@db/mlflow",
        "postgresql://mlflow:a?b#c@db/mlflow": "postgresql://mlflow:***@db/mlflow",
        "postgresql://db/mlflow?user=mlflow&password=s3cret&sslmode=require": (
            "postgresql://db/mlflow?user=mlflow&password=***&sslmode=require"
        ),
        "postgresql://mlflow@db/mlflow": "postgresql://mlflow@db/mlflow",
        # Azure's user@server login: SQLAlchemy takes the user to the colon.
        "postgresql://mlflow@azure:s3cret@db:5432/mlflow": (
            "postgresql://mlflow@azure:***@db:5432/mlflow"
        ),
        # urllib3 takes an http password to the last @ before the host.
        "http://alice:p@ss@mlflow-host:5000": "http://alice:***@mlflow-host:5000",
        "ftp://mlflow:s3cret@nas/mlflow a second postgresql://u:v@db/x": (
            "ftp://mlflow:***@nas/mlflow a second postgresql://u:***@db/x"
        ),
        "http://mlflow-host:5000/x": "http://mlflow-host:5000/x",
        "sqlite:///srv/mlflow.db": "sqlite:///srv/mlflow.db",
    }
    for uri, shown in cases.items():
        assert launcher.redact(uri) == shown


def test_a_store_error_quoting_a_uri_with_a_password_is_shown_without_it():
    from pipeline.tracking import short_reason

    error = ConnectionError(
        "API request to http://alice:s3cret@host:5000/api/2.0/mlflow/runs/log-batch failed "
        "with exception HTTPConnectionPool(host='host', port=5000): Max retries exceeded\nmore"
    )
    assert short_reason(error) == (
        "ConnectionError: API request to http://alice:***@host:5000/api/2.0/mlflow/runs/"
        "log-batch failed with exception HTTPConnectionPool(host='host', port=5000): Max "
        "retries exceeded"
    )


def launch_on_sqlite(tmp_path, monkeypatch) -> int:
    """`python -m pipeline.server` on SQLite stores under tmp_path, as the environment of
    a fresh shell has it; its exit status. For tests that replace mlflow's server."""
    for name in (
        "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "MLFLOW_AUTH_ADMIN_USERNAME",
    ):  # fmt: skip
        monkeypatch.setenv(name, "")
    return launcher.main([
        "--backend-store-uri", f"sqlite:///{tmp_path / 'runs.db'}",
        "--artifacts-destination", str(tmp_path / "artifacts"), "--state-dir", str(tmp_path / "s"),
    ])  # fmt: skip


def test_the_start_line_names_the_stores_without_their_passwords(tmp_path, monkeypatch, capsys):
    """An sftp:// artifacts destination carries its password in the URI (MLflow's way);
    MLflow is given it whole, the start line shows it redacted, like the databases'."""
    from mlflow.cli import server as mlflow_server

    given = []
    monkeypatch.setattr(mlflow_server, "main", lambda args, **kwargs: given.append(args))
    for name in (
        "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "MLFLOW_AUTH_ADMIN_USERNAME",
    ):  # fmt: skip
        monkeypatch.setenv(name, "")
    status = launcher.main([
        "--backend-store-uri", f"sqlite:///{tmp_path / 'runs.db'}",
        "--artifacts-destination", "sftp://mlflow:s3cret@files.example/mlflow",
        "--state-dir", str(tmp_path / "s"),
    ])  # fmt: skip
    said = capsys.readouterr()
    assert status == 0, said.err
    [args] = given
    assert args[args.index("--artifacts-destination") + 1] == (
        "sftp://mlflow:s3cret@files.example/mlflow"
    )
    assert "artifacts in sftp://mlflow:***@files.example/mlflow, " in said.out
    assert "s3cret" not in said.out + said.err


@pytest.mark.parametrize(
    ("signal_error", "code", "said"), [(KeyboardInterrupt, 130, "interrupted"),
                                         (Terminated, 143, "terminated")],
)  # fmt: skip
def test_ctrl_c_while_the_server_starts_is_an_interruption_not_a_traceback(
    tmp_path, monkeypatch, capsys, signal_error, code, said
):
    from mlflow.cli import server as mlflow_server

    def interrupted(args, **kwargs):  # click turns Ctrl-C (or SIGTERM's) into Abort
        import click

        try:
            raise signal_error
        except KeyboardInterrupt:
            raise click.exceptions.Abort() from None

    monkeypatch.setattr(mlflow_server, "main", interrupted)
    status = launch_on_sqlite(tmp_path, monkeypatch)
    assert (status, capsys.readouterr().err.strip().splitlines()[-1]) == (code, said)


def test_a_schema_the_database_refuses_is_one_line_without_its_password(
    tmp_path, monkeypatch, capsys
):
    """MLflow makes the auth database's tables in this process before its workers start;
    a user that may connect but not create them raised SQLAlchemy's error, a traceback."""
    import sqlalchemy
    from mlflow.cli import server as mlflow_server

    def refused(args, **kwargs):
        raise sqlalchemy.exc.ProgrammingError(
            "CREATE TABLE users ...", {}, Exception("permission denied for schema public")
        )

    monkeypatch.setattr(mlflow_server, "main", refused)
    status = launch_on_sqlite(tmp_path, monkeypatch)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 1 and last.startswith(
        "error: mlflow server: the database refused its schema ((builtins.Exception) "
        "permission denied for schema public"
    ), last
    assert last.endswith(
        "give the server's database user its own database (createdb -O) or rights on the schema"
    )


def test_an_unreachable_database_fails_in_one_line_without_its_password():
    uri = f"postgresql://mlflow:hunter2-secret@127.0.0.1:{free_port()}/mlflow"
    with pytest.raises(PipelineError) as error:
        launcher.check_database(uri, "--backend-store-uri")
    message = str(error.value)
    assert (
        message.startswith("--backend-store-uri postgresql://mlflow:***@127.0.0.1:")
        and "Connection refused" in message
    )
    assert "hunter2" not in message and "\n" not in message


def test_the_server_process_exit_status_is_read_and_a_clean_stop_is_not_a_failure():
    def ended(code: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", code])
        process.wait()
        return process

    clean, failed = ended("pass"), ended("import sys; sys.exit(3)")
    stopped = ended("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    killed = ended("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert launcher.exit_problem([]) is None  # MLflow started nothing we could see
    assert launcher.exit_problem([clean, stopped]) is None
    assert (
        launcher.exit_problem([failed])
        == "the server exited with status 3 (its own error is above)"
    )
    assert launcher.exit_problem([killed]) == "the server was killed by signal 9"


def test_the_wrapped_process_starter_hands_back_what_mlflow_started():
    import mlflow.server

    original = mlflow.server._exec_cmd
    with launcher.keep_server_process() as started:
        process = mlflow.server._exec_cmd([sys.executable, "-c", "pass"], synchronous=False)
        process.wait()
    assert started == [process] and mlflow.server._exec_cmd is original


@pytest.mark.slow
def test_a_server_that_cannot_start_fails_the_command(tmp_path):
    """Port taken: uvicorn gives up, and the launcher must not exit 0 (a service manager
    would then never restart it)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [
            sys.executable, "-m", "pipeline.server",
            "--backend-store-uri", f"sqlite:///{tmp_path / 'runs.db'}",
            "--auth-database-uri", f"sqlite:///{tmp_path / 'users.db'}",
            "--artifacts-destination", str(tmp_path / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--state-dir", str(tmp_path / "state"),
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}
        result = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
    assert result.returncode == 1, result.stderr[-3000:]
    assert re.fullmatch(  # uvicorn's own status (3 in 0.54: startup failure)
        r"error: mlflow server: the server exited with status [1-9]\d* \(its own error is above\)",
        result.stderr.strip().splitlines()[-1],
    )
    assert "address already in use" in result.stderr.lower()


# --- PostgreSQL and the server, for real -----------------------------------------------------


def postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: from PATH, else Debian's /usr/lib/postgresql/<v>/bin."""
    on_path = shutil.which("initdb")
    if on_path and (Path(on_path).resolve().parent / "pg_ctl").exists():
        return Path(on_path).resolve().parent
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda initdb: int(initdb.parts[-3]) if initdb.parts[-3].isdigit() else 0,
    )
    return found[-1].parent if found else None


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1, owned by an unprivileged user."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.user, self.password = "mlflow", secrets.token_hex(8)
        # Not under pytest's tmp_path: as root that is a 0700 folder `nobody` cannot enter.
        self.folder = Path(tempfile.mkdtemp(prefix="mlflow-postgres-"))
        self.data = self.folder / "data"
        self.run_as: dict = {}
        if os.geteuid() == 0:  # postgres refuses root: run it as nobody, with no extra groups
            nobody = pwd.getpwnam("nobody")
            os.chown(self.folder, nobody.pw_uid, nobody.pw_gid)
            self.run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}

    def uri(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            cwd=self.folder, capture_output=True, text=True, timeout=120, **self.run_as,
        )  # fmt: skip
        assert result.returncode == 0, f"{args[0]}: {result.stdout}{result.stderr}"

    def start(self) -> Postgres:
        password_file = self.folder / "password"
        password_file.write_text(self.password + "\n")
        if self.run_as:
            os.chown(password_file, self.run_as["user"], self.run_as["group"])
        self._run(
            "initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={password_file}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale",
            "--no-sync",
        )  # fmt: skip
        password_file.unlink()
        # Loopback only, its unix socket in its own folder, no fsync: a test database.
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "log"), "-w",
                  "-t", "60", "-o", options, "start")  # fmt: skip
        return self

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.uri("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')

    def stop(self) -> None:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        # A server pg_ctl could not stop still has its pid file: kill it, never leave it up.
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(int((self.data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under "
            "/usr/lib/postgresql/*/bin; install them: apt-get install postgresql"
        )
    cluster = Postgres(bin_dir)
    try:
        cluster.start()
        for database in ("mlflow", "mlflow_auth"):
            cluster.create_database(database)
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def login(user: str, password: str):
    """MLflow clients in this process send this login (they read it from the environment)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", user)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        yield


class TrackingServer:
    def __init__(self, url: str, artifacts: Path, log: Path) -> None:
        self.url, self.artifacts, self.log = url, artifacts, log

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url, registry_uri=self.url)

    def env(self, user: str | None = None, password: str | None = None) -> dict:
        """The stages' environment: this server, and exactly this login (or none)."""
        env = stage_env({"MLFLOW_TRACKING_URI": self.url})
        for name in MLFLOW_LOGIN:
            env.pop(name, None)
        if user is not None:
            env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
        return env


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """`python -m pipeline.server` as the README starts it; users alice and bob created by admin."""
    folder = tmp_path_factory.mktemp("tracking-server")
    port = free_port()
    command = [
        sys.executable, "-m", "pipeline.server",
        "--backend-store-uri", postgres.uri("mlflow"),
        "--auth-database-uri", postgres.uri("mlflow_auth"),
        "--artifacts-destination", str(folder / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
        "--state-dir", str(folder / "state"),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}
    log = folder / "server.log"
    with open(log, "w") as output:
        # Its own process group: the workers it spawns are stopped with it.
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # seconds; workers import MLflow on a busy 2-core box
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the tracking server did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        from mlflow.server import get_app_client

        with login(ADMIN, ADMIN_PASSWORD):
            users = get_app_client("basic-auth", tracking_uri=url)
            for user, password in USERS.items():
                users.create_user(user, password)
        yield TrackingServer(url, folder / "artifacts", log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        # Whatever is left of its group (a worker that outlived the launcher, say).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


@pytest.fixture(scope="module")
def repo(served_archive, tmp_path_factory):
    """A repository copy with the data prepared (download and prepare do not use MLflow)."""
    path = make_repo(
        tmp_path_factory.mktemp("team") / "repo",
        {**TINY, "data.url": served_archive.url, "data.md5": served_archive.md5},
    )
    dvc(path, "repro", "prepare")
    return path


def train(repo: Path, env: dict, check: bool = True):
    return run([sys.executable, "-m", "pipeline.train"], repo, env, check=check)


@pytest.mark.slow
def test_server_refuses_a_client_without_a_valid_login_and_it_logs_nothing(server, repo):
    search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=10"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(search, timeout=30)
    assert refused.value.code == 401

    anonymous = train(repo, server.env(), check=False)
    assert anonymous.returncode == 1
    assert anonymous.stderr.strip().splitlines()[-1] == (
        f"error: MLflow tracking store {server.url} is not usable: login refused (HTTP 401), "
        "no credentials were sent. The server needs a login: set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD"
    )
    wrong = train(repo, server.env("alice", "not-alices-password"), check=False)
    assert wrong.returncode == 1
    assert wrong.stderr.strip().splitlines()[-1] == (
        f"error: MLflow tracking store {server.url} is not usable: login refused (HTTP 401) for "
        "user 'alice': wrong user name or password. Check MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD (the server's admin creates users and resets passwords)"
    )
    for result in (anonymous, wrong):  # refused before any training
        assert "train: epoch" not in result.stdout
    assert not (repo / "models" / "model.keras").exists()

    with login(ADMIN, ADMIN_PASSWORD):
        client = server.client()
        assert [e.name for e in client.search_experiments()] == ["Default"]
        assert client.search_runs(["0"]) == []
        assert client.search_registered_models() == []
    assert not (repo / "mlflow.db").exists()  # and nothing fell back to the local store


@pytest.mark.slow
def test_server_answers_its_machines_own_name_and_refuses_other_names(server):
    """A client reaching the server by this machine's name gets past MLflow's Host check (to
    the login, 401); any other name is refused with 403, as a browser page from elsewhere."""
    import http.client
    from urllib.parse import urlsplit

    names = launcher.machine_names()
    if not names:
        pytest.skip("this machine's only name is localhost")
    port = urlsplit(server.url).port

    def status(method: str, headers: dict) -> tuple[int, str]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request(method, "/api/2.0/mlflow/experiments/search", headers=headers)
            response = connection.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            connection.close()

    assert status("GET", {"Host": f"{names[0]}:{port}"})[0] == 401
    code, body = status("GET", {"Host": f"elsewhere.example:{port}"})
    assert (code, body) == (403, "Invalid Host header - possible DNS rebinding attack detected")
    # The UI served at http://NAME:PORT changes things with requests from that origin.
    own = {"Host": f"{names[0]}:{port}", "Origin": f"http://{names[0]}:{port}"}
    assert status("POST", own)[0] == 401
    assert status("POST", {**own, "Origin": "http://elsewhere.example"})[0] == 403


@pytest.mark.slow
def test_pipeline_logs_everything_to_the_server(server, repo, tmp_path):
    result = dvc(repo, "repro", env=server.env("alice", USERS["alice"]))
    assert "Running stage 'train'" in result.stdout
    assert "Running stage 'evaluate'" in result.stdout
    assert "is the first champion" in result.stdout
    assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()

    import mlflow

    info = json.loads((repo / "models/model_info.json").read_text())
    test = json.loads((repo / "metrics/test.json").read_text())
    with login("alice", USERS["alice"]):
        client = server.client()
        experiment = client.get_experiment_by_name("cifar10-resnet")
        assert experiment.artifact_location.startswith("mlflow-artifacts:/")  # proxied
        logged = client.get_run(info["run_id"])
        assert logged.info.status == "FINISHED"
        assert logged.info.experiment_id == experiment.experiment_id
        assert logged.data.params["train.batch_size"] == "32"
        assert logged.data.params["model.filters"] == "[8, 16]"
        for metric in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
            history = client.get_metric_history(info["run_id"], metric)
            assert sorted(m.step for m in history) == [1, 2], metric
        assert logged.data.metrics["test_accuracy"] == pytest.approx(test["accuracy"])
        assert logged.data.metrics["test_f1_macro"] == pytest.approx(test["f1_macro"])
        evaluation = {a.path for a in client.list_artifacts(info["run_id"], "evaluation-1")}
        assert {
            "evaluation-1/test.json", "evaluation-1/confusion.csv",
            "evaluation-1/per_class_accuracy.png", "evaluation-1/confusion_matrix.png",
            "evaluation-1/misclassified.png", "evaluation-1/params.json",
        } <= evaluation  # fmt: skip

        model = client.get_logged_model(info["model_uri"].removeprefix("models:/"))
        assert model.artifact_location.startswith("mlflow-artifacts:/")
        mlmodel = mlflow.artifacts.download_artifacts(
            f"{model.artifact_location}/MLmodel", dst_path=str(tmp_path), tracking_uri=server.url
        )
        assert "keras" in Path(mlmodel).read_text() and "signature" in Path(mlmodel).read_text()
        champion = client.get_model_version_by_alias("cifar10-resnet", "champion")
        assert str(champion.version) == "1" and champion.run_id == info["run_id"]

    # The artifacts went through the server into its --artifacts-destination, byte for byte.
    run_folder = server.artifacts / experiment.experiment_id / info["run_id"] / "artifacts"
    stored = run_folder / "evaluation-1" / "test.json"
    assert stored.read_bytes() == (repo / "metrics/test.json").read_bytes()
    assert list(server.artifacts.glob(f"{experiment.experiment_id}/models/*/artifacts/MLmodel"))

    # predict fetches the champion through the server, and leaves no copy of it behind.
    image = tmp_path / "grey.png"
    Image.new("RGB", (32, 32), (128, 128, 128)).save(image)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = server.env("alice", USERS["alice"]) | {"TMPDIR": str(scratch)}
    command = [sys.executable, "-m", "pipeline.predict", "--json", "--model"]
    predicted = run([*command, "models:/cifar10-resnet@champion", str(image)], repo, env)
    assert len(json.loads(predicted.stdout)[0]["predictions"]) == 3
    assert list(scratch.iterdir()) == []


@pytest.mark.slow
def test_two_trainings_at_once_lose_nothing(server, repo, served_archive, tmp_path):
    """alice and bob train at the same time into the one experiment; both runs are whole."""
    epochs = 3
    other = make_repo(
        tmp_path / "bob",
        {**TINY, "data.url": served_archive.url, "data.md5": served_archive.md5, "train.seed": 7},
    )
    dvc(other, "repro", "prepare")
    set_params(repo, {"train.seed": 8})
    for copy in (repo, other):
        set_params(copy, {"train.epochs": epochs})
    with Background(tmp_path) as background:
        trainings = [
            background.start(
                [sys.executable, "-m", "pipeline.train"], copy, server.env(user, USERS[user])
            )
            for copy, user in ((repo, "alice"), (other, "bob"))
        ]
        outputs = background.wait(*trainings, timeout=600)
    assert [training.returncode for training in trainings] == [0, 0], outputs

    with login(ADMIN, ADMIN_PASSWORD):
        client = server.client()
        run_ids = []
        for copy, seed in ((repo, "8"), (other, "7")):
            run_id = json.loads((copy / "models/model_info.json").read_text())["run_id"]
            run_ids.append(run_id)
            logged = client.get_run(run_id)
            assert logged.info.status == "FINISHED"
            assert logged.data.params["train.seed"] == seed
            with open(copy / "metrics/history.csv") as file:
                rows = list(csv.DictReader(file))
            assert len(rows) == epochs
            for metric in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
                history = sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)
                assert [m.step for m in history] == list(range(1, epochs + 1)), metric
                expected = [float(row[metric]) for row in rows]  # history.csv keeps 6 digits
                assert [m.value for m in history] == pytest.approx(expected, rel=1e-5), metric
            assert client.list_artifacts(run_id, "train")  # history.csv and train.json
        experiment = client.get_experiment_by_name("cifar10-resnet").experiment_id
        assert len(set(run_ids)) == 2  # two runs, both in the experiment's list
        assert set(run_ids) <= {run.info.run_id for run in client.search_runs([experiment])}


@pytest.mark.slow  # PostgreSQL and the MLflow server: `make test-fast` starts neither
def test_two_evaluations_of_one_run_at_once_take_two_numbers(server, tmp_path, monkeypatch):
    """PostgreSQL behind the server takes a run param once: a claim the other evaluation
    made after ours looked at the run is refused to us, over REST, and we take the next."""
    import mlflow

    with login("alice", USERS["alice"]):
        client = server.client()
        run_id = client.create_run(client.create_experiment("claims")).info.run_id
        rival = [1]

        def stale_history(self, run, key):
            if rival:
                client.log_param(run_id, f"evaluation.{rival.pop()}", "the other one")
            return []

        monkeypatch.setattr(mlflow.MlflowClient, "get_metric_history", stale_history)
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(server.url)
        try:
            (tmp_path / "test.json").write_text("{}\n")
            number = evaluation_log.log_evaluation(
                run_id, {"test_accuracy": 0.5}, [tmp_path / "test.json"], {"evaluate.x": 1}
            )
        finally:
            mlflow.set_tracking_uri(previous)
        params = client.get_run(run_id).data.params
        assert number == 2 and params["evaluation.1"] == "the other one"
        assert params["evaluation.2"].split(" pid ")[0].endswith(socket.gethostname())
        assert [a.path for a in client.list_artifacts(run_id, "evaluation-2")] == [
            "evaluation-2/params.json", "evaluation-2/test.json",
        ]  # fmt: skip
        assert client.get_run(run_id).data.tags["evaluation.count"] == "2"

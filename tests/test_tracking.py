"""MLflow tracking: the store (tracking.py), the training's run (run_log.py) and numbered
evaluations (evaluation_log.py), on a local SQLite store or with the store's failures
stood in for: waits, retries, refusals and the one-line errors they become."""

from __future__ import annotations

import contextvars
import json
import os
import sys
import time
from pathlib import Path

import mlflow
import pytest

from pipeline import evaluation_log, run_log
from tests.repo import ROOT, free_port


def test_every_public_store_call_waits_out_a_locked_sqlite_store():
    """Two queued experiments share one mlflow.db: a call without retry_locked can fail."""
    import ast

    def imports_mlflow(node: ast.FunctionDef) -> bool:  # `import mlflow`, `from mlflow import`
        return any(
            (isinstance(i, ast.Import) and "mlflow" in {n.name for n in i.names})
            or (isinstance(i, ast.ImportFrom) and i.module == "mlflow")
            for i in ast.walk(node)
        )

    unguarded = [
        f"{module}.{node.name}"
        for module in ("tracking", "run_log", "evaluation_log", "registry")
        for node in ast.parse((ROOT / f"pipeline/{module}.py").read_text()).body
        if isinstance(node, ast.FunctionDef)
        and not node.name.startswith("_")
        and imports_mlflow(node)
        and "retry_locked" not in [ast.unparse(d) for d in node.decorator_list]
    ]
    # connect retries its one store call itself; store_lock is the file lock around writes;
    # refusal reads the tracking URI, no store call, to explain a refused one.
    assert unguarded == ["tracking.connect", "tracking.store_lock", "tracking.refusal"]


def test_an_evaluation_retried_on_a_locked_store_keeps_its_number(
    mlflow_store, tmp_path, monkeypatch
):
    """`dvc queue start -j 2`: the store is locked after the metrics are in. The retry must
    finish evaluation 1, not log the same figures again as evaluation 2."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    monkeypatch.setattr(tracking.time, "sleep", lambda seconds: None)
    run_id = mlflow_store.create_run(mlflow_store.create_experiment("e")).info.run_id
    real_set_tag, calls = mlflow.MlflowClient.set_tag, []

    def locked_once(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return real_set_tag(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "set_tag", locked_once)
    (tmp_path / "report.txt").write_text("figures\n")
    number = evaluation_log.log_evaluation(
        run_id, {"test_accuracy": 0.5}, [tmp_path / "report.txt"], {"x": 1}
    )
    history = mlflow_store.get_metric_history(run_id, "test_accuracy")
    assert number == 1 and [(m.step, m.value) for m in history] == [(1, 0.5)]
    assert len(calls) == 2  # the locked try, then the retry
    assert mlflow_store.get_run(run_id).data.tags["evaluation.count"] == "1"
    logged = {f.path for f in mlflow_store.list_artifacts(run_id, "evaluation-1")}
    assert logged == {"evaluation-1/report.txt", "evaluation-1/params.json"}
    assert not mlflow_store.list_artifacts(run_id, "evaluation-2")


def test_two_evaluations_of_one_run_at_once_take_two_numbers(mlflow_store, tmp_path, monkeypatch):
    """On a tracking server nothing serialises two evaluations of one model: both read the
    metric history before either logs. The run param each claims its number with, which
    MLflow's store takes once, tells them apart; nothing is overwritten."""

    run_id = mlflow_store.create_run(mlflow_store.create_experiment("e")).info.run_id
    real_history, rival = mlflow.MlflowClient.get_metric_history, []

    def stale_history(self, run, key):
        if rival:  # the other evaluation claims between our look and our claim
            mlflow_store.log_param(run_id, f"evaluation.{rival.pop()}", "the other one")
        return []  # as both read it before either logged

    monkeypatch.setattr(mlflow.MlflowClient, "get_metric_history", stale_history)
    (tmp_path / "report.txt").write_text("figures\n")
    numbers = []
    for accuracy, seen in ((0.5, []), (0.6, []), (0.7, [3])):
        rival.extend(seen)
        numbers.append(
            evaluation_log.log_evaluation(
                run_id, {"test_accuracy": accuracy}, [tmp_path / "report.txt"], {"x": accuracy}
            )
        )
    assert numbers == [1, 2, 4]  # 3 taken by the rival after we looked
    params = mlflow_store.get_run(run_id).data.params
    assert sorted(params) == ["evaluation.1", "evaluation.2", "evaluation.3", "evaluation.4"]
    assert len(set(params.values())) == 4
    history = real_history(mlflow_store, run_id, "test_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.6), (4, 0.7)]
    for number, accuracy in zip(numbers, (0.5, 0.6, 0.7), strict=True):
        logged = mlflow_store.download_artifacts(run_id, f"evaluation-{number}/params.json")
        logged = json.loads(Path(logged).read_text())
        assert logged == {"x": accuracy, "evaluation.claim": params[f"evaluation.{number}"]}
    assert mlflow_store.get_run(run_id).data.tags["evaluation.count"] == "4"
    # A retry whose claim got through the first time takes that number again.
    mark = params["evaluation.2"]
    assert evaluation_log._log_evaluation_metrics(run_id, {"test_accuracy": 0.6}, mark) == 2


def test_artifacts_go_beside_the_sqlite_store_whatever_the_working_directory(
    mlflow_store, tmp_path, monkeypatch
):
    """Not MLflow's ./mlruns: in a temporary experiment copy (`dvc exp run --temp`, the
    queue) that is the copy, deleted with every artifact and registered model in it."""
    from pipeline import tracking

    repo, copy, other = tmp_path / "repo", tmp_path / "exp-copy", tmp_path / "other"
    for folder in (repo, copy, other):
        folder.mkdir()
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment = tracking.connect(repo)
    assert mlflow.get_experiment(experiment).artifact_location == (repo / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other / 'team.db'}")  # the user's own
    experiment = tracking.connect(repo)
    assert mlflow.get_experiment(experiment).artifact_location == (other / "mlartifacts").as_uri()
    # A relative one, as README's `mlflow models serve` line exports it: the repository's file.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///team.db")
    assert tracking.tracking_uri(repo) == f"sqlite:///{repo / 'team.db'}"
    experiment = tracking.connect(repo)
    assert mlflow.get_experiment(experiment).artifact_location == (repo / "mlartifacts").as_uri()
    assert (repo / "team.db").exists() and not (copy / "team.db").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///team.db?timeout=30")  # query kept
    assert tracking.tracking_uri(repo) == f"sqlite:///{repo}/team.db?timeout=30"
    assert tracking.sqlite_file(tracking.tracking_uri(repo)) == repo / "team.db"
    for in_memory in ("sqlite:///:memory:", "sqlite:///"):  # no file: left as they are
        monkeypatch.setenv("MLFLOW_TRACKING_URI", in_memory)
        assert tracking.tracking_uri(repo) == in_memory and not tracking.sqlite_file(in_memory)
    assert tracking.artifact_location("http://tracking:5000", repo) is None  # a server decides
    # A database the client opens itself: its experiments keep this path for good.
    for database in ("postgresql://u:p@db/mlflow", "postgresql+psycopg2://db/m", "mysql://db/m"):
        assert tracking.artifact_location(database, repo) == (repo / "mlartifacts").as_uri()
    assert not (copy / "mlruns").exists()
    # A file store by a relative path: the repository's folder too; other URIs as they are.
    for relative in ("mlruns", "file:mlruns", "file:./mlruns"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", relative)
        assert tracking.tracking_uri(repo) == (repo / "mlruns").as_uri(), relative
    for kept in ("file:///srv/mlruns", "/srv/mlruns", "http://tracking:5000", "databricks"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", kept)
        assert tracking.tracking_uri(repo) == kept, kept


def test_a_deleted_experiment_is_restored_with_a_word_and_a_refusal_says_why(
    mlflow_store, tmp_path, monkeypatch, capsys
):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST

    from pipeline import tracking

    experiment = tracking.connect(tmp_path)
    mlflow_store.delete_experiment(experiment)
    capsys.readouterr()
    assert tracking.connect(tmp_path) == experiment
    assert mlflow_store.get_experiment(experiment).lifecycle_stage == "active"
    assert f"experiment 'cifar10-resnet' (id {experiment}) was deleted; restoring it" in (
        capsys.readouterr().out
    )

    real_restore = mlflow.MlflowClient.restore_experiment

    def restored_by_another_run_first(self, experiment_id):
        real_restore(self, experiment_id)
        raise MlflowException("No Experiment with id=1 exists", RESOURCE_DOES_NOT_EXIST)

    mlflow_store.delete_experiment(experiment)
    monkeypatch.setattr(mlflow.MlflowClient, "restore_experiment", restored_by_another_run_first)
    assert tracking.connect(tmp_path) == experiment  # the other run's restore is enough

    def forbidden(self, experiment_id):  # a server: restoring needs MANAGE, users have EDIT
        raise MlflowException("Permission denied", PERMISSION_DENIED)

    mlflow_store.delete_experiment(experiment)
    monkeypatch.setattr(mlflow.MlflowClient, "restore_experiment", forbidden)
    with pytest.raises(tracking.TrackingError, match=r"is deleted, and restoring it needs MANAGE"):
        tracking.connect(tmp_path)


def test_connect_keeps_the_users_request_timeout(mlflow_store, tmp_path, monkeypatch):
    from pipeline import tracking

    seen = []

    def record(mlflow, location):
        seen.append(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"])
        return "0"

    monkeypatch.setattr(tracking, "_get_or_create_experiment", record)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    tracking.connect(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")  # a server that starts on demand
    tracking.connect(tmp_path)
    assert seen == ["10", "60"]


def test_mlflows_experiment_name_variable_picks_the_experiment(mlflow_store, tmp_path, monkeypatch):
    """MLFLOW_EXPERIMENT_NAME, as MLflow documents it: your own dataset's runs apart."""
    from pipeline import tracking

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "pets")
    pets = tracking.connect(tmp_path)
    with run_log.start_run(None) as run:
        assert run.info.experiment_id == pets
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    cifar = tracking.connect(tmp_path)
    assert pets != cifar
    names = [mlflow_store.get_experiment(i).name for i in (pets, cifar)]
    assert names == ["pets", "cifar10-resnet"]
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "pets")
    assert "on experiment 'pets'" in tracking._refused("http://h:5000", 403)
    # An evaluation logs into its training's run: it checks the store, creates nothing.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "other")
    assert tracking.connect(tmp_path, experiment=False) is None
    assert mlflow_store.get_experiment_by_name("other") is None


def test_a_run_the_store_no_longer_has_is_replaced_by_a_new_one(mlflow_store, capsys):

    with mlflow.start_run() as kept, mlflow.start_run(nested=True) as deleted:
        pass
    mlflow_store.delete_run(deleted.info.run_id)
    with run_log.start_run(kept.info.run_id) as run:  # a resumed training
        assert run.info.run_id == kept.info.run_id
    assert capsys.readouterr().out == ""
    for gone in (deleted.info.run_id, "0123456789abcdef0123456789abcdef"):
        with run_log.start_run(gone) as run:
            assert run.info.run_id not in (gone, kept.info.run_id)
        assert f"MLflow run {gone} is deleted or not in this tracking store" in (
            capsys.readouterr().out
        )


def test_a_run_whose_experiment_was_renamed_goes_on_there(mlflow_store, tmp_path, capsys):
    """connect() then makes a new experiment of the pipeline's name, and MLflow refused to
    continue the run of another experiment: every rerun failed the same way."""
    from pipeline import tracking

    experiment = tracking.connect(tmp_path)
    with run_log.start_run(None) as run:
        pass
    mlflow_store.rename_experiment(experiment, "cifar10-resnet (old)")
    assert tracking.connect(tmp_path) != experiment  # a new "cifar10-resnet"
    with run_log.start_run(run.info.run_id) as resumed:
        assert resumed.info.run_id == run.info.run_id
    assert capsys.readouterr().out == (
        f"train: MLflow run {run.info.run_id} is in experiment 'cifar10-resnet (old)' now; "
        "it goes on there\n"
    )


def test_a_store_that_stops_answering_costs_a_warning_and_the_epochs_follow_later(
    mlflow_store, monkeypatch, capsys
):
    from mlflow.exceptions import MlflowException

    from pipeline.progress import EpochLogger

    down = [True]

    def refused_while_down(call):  # a server restarting: every request refused until it is back
        def wrapper(*args, **kwargs):
            if down[0]:
                raise MlflowException("API request to /api/2.0/mlflow/runs/log-batch failed")
            return call(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(run_log, "log_epoch", refused_while_down(run_log.log_epoch))
    history_call = mlflow.MlflowClient.get_metric_history  # the backfill's first request
    monkeypatch.setattr(mlflow.MlflowClient, "get_metric_history", refused_while_down(history_call))
    history = []
    with mlflow.start_run() as run:
        logger = EpochLogger(run.info.run_id, history)
        for epoch in (1, 2, 3):
            if epoch == 3:
                down[0] = False
            history.append({"epoch": epoch, "loss": 1.0 / epoch, "accuracy": 0.1 * epoch})
            logger(history[-1])  # as the recorder calls it, after the checkpoint
    out = capsys.readouterr().out
    assert out.count("warning: epoch") == 2 and "warning: epoch 3" not in out
    assert "train: warning: epoch 1 is not logged to MLflow yet (MlflowException: API " in out
    assert "training goes on and logs it later" in out
    logged = mlflow_store.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in logged) == [(1, 1.0), (2, 0.5), (3, 1 / 3)]


def test_epoch_logs_give_up_within_the_workers_collective_timeout(monkeypatch):
    """3 tries of at most 10 s (the other workers wait 120 s); a lower setting of the user's
    stays, and the user's settings are back afterwards."""
    import os

    from pipeline import tracking

    names = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    with tracking.few_retries():
        assert [os.environ[name] for name in names] == ["2", "10"]
    assert not any(name in os.environ for name in names)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    with tracking.few_retries():
        assert [os.environ[name] for name in names] == ["0", "10"]
    assert [os.environ[name] for name in names] == ["0", "300"]


def test_a_busy_store_is_waited_out_briefly_inside_few_retries(monkeypatch):
    """An epoch's log must not hold the chief past the workers' 120 s: inside few_retries
    a locked SQLite store is waited out for 30 s of the clock, elsewhere for 600 s."""
    import types

    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    clock = [0.0]

    def sleep(seconds):
        clock[0] += seconds

    # tracking's own clock only: patching the time module would move it for every thread.
    fake = types.SimpleNamespace(monotonic=lambda: clock[0], sleep=sleep)
    monkeypatch.setattr(tracking, "time", fake)

    @tracking.retry_locked
    def locked():
        clock[0] += 20.0  # SQLite's busy timeout passes in each try
        raise MlflowException("(sqlite3.OperationalError) database is locked")

    def gave_up_after() -> float:
        clock[0] = 0.0
        with pytest.raises(MlflowException, match="database is locked"):
            locked()
        return clock[0]

    with tracking.few_retries():
        assert gave_up_after() == 40.5  # 20 s, 0.5 s asleep, 20 s: past the 30 s
    assert 600 < gave_up_after() < 650  # and back to the long wait afterwards


def test_only_a_locked_sqlite_store_is_waited_for(monkeypatch):
    """MLflow gives every database OperationalError (a read-only or full disk) and any 503
    the code TEMPORARILY_UNAVAILABLE: those fail at once, not after ten silent minutes."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    from pipeline import tracking

    monkeypatch.setattr(tracking.time, "sleep", lambda seconds: None)
    tries = []

    @tracking.retry_locked
    def write(message):
        tries.append(message)
        if len(tries) == 1 or "locked" not in message:
            raise MlflowException(message, error_code=TEMPORARILY_UNAVAILABLE)

    for message in (
        "(sqlite3.OperationalError) attempt to write a readonly database",
        "(sqlite3.OperationalError) database or disk is full",
        "API request to http://mlflow:5000 failed with error code 503 != 200",
    ):
        tries.clear()
        with pytest.raises(MlflowException):
            write(message)
        assert len(tries) == 1, message
    tries.clear()
    write("(sqlite3.OperationalError) database is locked")  # waited out: the second try
    assert len(tries) == 2


def test_a_refusal_after_connect_says_to_ask_for_permission_not_to_wait(monkeypatch):
    """A server whose default permission is READ lets connect() through, then refuses the
    first write: "rerun once the store answers" would repeat the refusal for ever."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, UNAUTHENTICATED

    from pipeline import tracking
    from pipeline.train import rerun

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    with pytest.raises(tracking.TrackingError) as error:
        with tracking.reported("the evaluation is done but not logged", "rerun later"):
            raise MlflowException("Permission denied", error_code=PERMISSION_DENIED)
    assert str(error.value) == (
        "the evaluation is done but not logged: permission denied (HTTP 403) for user 'bob' "
        "on experiment 'cifar10-resnet' or the registered model it writes to. Ask the "
        "server's admin for EDIT permission on it; then retry with `dvc repro`"
    )
    # After a training on several machines, or in an experiment copy, the rerun is another.
    monkeypatch.setattr(tracking, "_RERUN", contextvars.ContextVar("rerun", default="`dvc repro`"))
    tracking.retried_by(rerun(2))
    with pytest.raises(tracking.TrackingError) as error:
        with tracking.reported("x", "rerun later"):
            raise MlflowException("Permission denied", error_code=PERMISSION_DENIED)
    assert str(error.value).endswith(
        "; then retry with `python -m pipeline.train` run again on every worker (the same "
        "TF_CONFIG)"
    )
    with pytest.raises(tracking.TrackingError, match=r"login refused \(HTTP 401\) for user"):
        with tracking.reported("x", "rerun later"):
            raise MlflowException("Unauthenticated", error_code=UNAUTHENTICATED)


def test_a_server_refusing_the_host_name_says_so_not_permission_denied(monkeypatch):
    """MLflow's server answers a Host header it does not allow (any name but localhost's
    and private IPs' by default) with a plain-text 403, before any login is looked at."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pipeline import tracking

    class RefuseHost(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = b"Invalid Host header - possible DNS rebinding attack detected"
            self.send_response(403)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), RefuseHost)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://localhost:{server.server_port}")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        with pytest.raises(tracking.TrackingError) as error:
            tracking.connect(Path.cwd())
    finally:
        server.shutdown()
        server.server_close()
    assert str(error.value) == (
        f"MLflow tracking store http://localhost:{server.server_port} is not usable: the server "
        "refuses the host name 'localhost' (HTTP 403, MLflow's check against DNS rebinding: by "
        "default it answers only localhost and private IP addresses). Its admin adds the "
        f"name: MLFLOW_SERVER_ALLOWED_HOSTS='localhost:{server.server_port}' (README, \"A "
        'shared tracking server"), or reach it by its private IP address'
    )


def test_a_password_in_the_tracking_uri_is_never_printed(monkeypatch):
    from pipeline import tracking

    # requests takes basic auth from the URL; nothing listens on the port.
    uri = f"http://alice:hunter2-secret@127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(tracking.TrackingError) as error:
        tracking.connect(Path.cwd())
    assert "hunter2" not in str(error.value)
    assert str(error.value).startswith("MLflow tracking store http://alice:***@127.0.0.1:")
    database = "postgresql://mlflow:hunter2-secret@db/mlflow"  # a store MLflow also takes
    assert tracking._unreachable(database, "down").startswith(
        "MLflow tracking store postgresql://mlflow:***@db/mlflow is not usable: down."
    )
    # Credentials in the URL are credentials sent: not "no credentials were sent".
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    assert "for user 'alice'" in tracking._refused("http://alice:pw@mlflow:5000", 401)


def test_a_database_store_that_is_down_fails_in_seconds_in_one_line(monkeypatch):
    """MLFLOW_TRACKING_URI at PostgreSQL itself: MLflow's engine tried 10 times over 100 s,
    warning at each, and the error ran over four lines (the driver's hints and a link)."""
    from pipeline import tracking

    uri = f"postgresql://mlflow:hunter2-secret@127.0.0.1:{free_port()}/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(tracking.TrackingError) as error:
        tracking.connect(Path.cwd())
    assert time.monotonic() - started < 15
    message = str(error.value)
    assert "\n" not in message and "hunter2" not in message
    assert (
        message.startswith("MLflow tracking store postgresql://mlflow:***@127.0.0.1:")
        and "is not usable: OperationalError: " in message
    )
    assert message.endswith(
        "Start the database or fix MLFLOW_TRACKING_URI (unset it to use the local mlflow.db)"
    )


def test_a_refused_login_says_which_part_of_it_is_missing(monkeypatch):
    """MLflow sends a login only with a user name and a password: a user alone (a password
    file that was not there) sends nothing, and "wrong password" sent the user hunting."""
    from pipeline import tracking

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    server = "http://mlflow-host:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    for password in (None, ""):
        if password is not None:
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        assert tracking._refused(server, 401) == (
            "login refused (HTTP 401) for user 'alice': no password was sent "
            "(MLFLOW_TRACKING_PASSWORD is unset or empty). Set it"
        )
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not hers")
    assert "for user 'alice': wrong user name or password" in tracking._refused(server, 401)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "a-token")
    assert tracking._refused(server, 401) == (
        "login refused (HTTP 401): the server does not take MLFLOW_TRACKING_TOKEN. A server "
        "with logins (make tracking-server) needs MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD"
    )


def test_a_sqlite_store_in_a_missing_folder_is_one_plain_line(tmp_path, monkeypatch):
    from pipeline import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'gone/mlflow.db'}")
    with pytest.raises(tracking.TrackingError) as error:
        tracking.connect(tmp_path)
    assert str(error.value) == (  # not wrapped again with server and login advice
        f"sqlite:///{tmp_path / 'gone/mlflow.db'}: the folder {tmp_path / 'gone'} does not exist"
    )


def test_a_store_error_after_the_work_is_one_line_saying_what_is_kept():
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    with pytest.raises(tracking.TrackingError) as error:
        with tracking.reported("the evaluation is done but not logged", "its figures are kept"):
            raise MlflowException("API request failed with error code 503 != 200\nResponse: ...")
    assert str(error.value) == (
        "the evaluation is done but not logged (MlflowException: API request failed with error "
        "code 503 != 200); its figures are kept"
    )
    with pytest.raises(KeyError):  # a bug is not dressed up as the store's trouble
        with tracking.reported("the evaluation is done but not logged", "its figures are kept"):
            raise KeyError("class_names")


def test_s3_errors_count_as_store_errors_where_boto3_is_installed(monkeypatch):
    """A client writing artifacts straight to S3 fails with boto3's and botocore's errors,
    which are not OSErrors: they get the same one line. Without boto3 nothing is added."""
    import types

    from pipeline import tracking

    monkeypatch.setitem(sys.modules, "boto3.exceptions", None)  # import fails
    assert len(tracking.store_errors()) == 2
    errors = {}
    fakes = {"boto3": ["Boto3Error"], "botocore": ["BotoCoreError", "ClientError"]}
    for module, names in fakes.items():
        fake = types.ModuleType(f"{module}.exceptions")
        for name in names:
            errors[name] = type(name, (Exception,), {})
            setattr(fake, name, errors[name])
        monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
        monkeypatch.setitem(sys.modules, f"{module}.exceptions", fake)
    # What S3's upload_file raises for an expired token: boto3 wraps botocore's ClientError.
    upload_failed = type("S3UploadFailedError", (errors["Boto3Error"],), {})
    for error in (upload_failed, errors["ClientError"], errors["BotoCoreError"]):
        with pytest.raises(tracking.TrackingError) as raised:
            with tracking.reported("the model is trained but not logged", "it is kept"):
                raise error("An error occurred (ExpiredToken) when calling PutObject")
        assert str(raised.value) == (
            f"the model is trained but not logged ({error.__name__}: An error occurred "
            "(ExpiredToken) when calling PutObject); it is kept"
        )

"""The download stage against a local HTTP server that misbehaves on purpose."""

from __future__ import annotations

import hashlib
import io
import os
import ssl
import urllib.error
from pathlib import Path

import pytest
import yaml

from pipeline import download
from pipeline.download import DownloadError, Progress, fetch
from pipeline.prepare import find_download
from tests.http_server import PayloadServer
from tests.repo import free_port

NAME = "cifar-10-python.tar.gz"
PAYLOAD = os.urandom(300_000)  # a few hundred KB: several reads, still instant
MD5 = hashlib.md5(PAYLOAD).hexdigest()
HALF = len(PAYLOAD) // 2
FAST = {"backoff_s": 0.001, "timeout_s": 5.0}  # retries without real waiting


class FakeClock:
    """A monotonic clock the test moves by hand, in seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TTYStringIO(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """A proxy from the environment must not intercept requests to 127.0.0.1."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def serve():
    """Start PayloadServer(PAYLOAD, f"/{NAME}", **options); stopped after the test."""
    servers: list[PayloadServer] = []

    def start(**options) -> PayloadServer:
        servers.append(PayloadServer(PAYLOAD, f"/{NAME}", **options).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def quiet() -> Progress:
    return Progress(io.StringIO())


def test_full_download(serve, tmp_path):
    server = serve()
    path = fetch(server.url, MD5, tmp_path / "raw", progress=quiet(), **FAST)
    assert path == tmp_path / "raw" / NAME
    assert path.read_bytes() == PAYLOAD
    assert os.listdir(tmp_path / "raw") == [NAME]  # no .part left behind
    assert [r.range for r in server.requests] == [None]


def test_md5_mismatch_leaves_nothing_and_names_the_param(serve, tmp_path):
    server = serve()
    wrong = "0" * 32
    with pytest.raises(DownloadError) as caught:
        fetch(server.url, wrong, tmp_path, progress=quiet(), **FAST)
    message = str(caught.value)
    assert f"md5 is {MD5}, expected {wrong} (data.md5)" in message
    assert "dvc exp run -S data.url=" in message
    assert os.listdir(tmp_path) == []  # neither the final file nor a .part


def test_resumes_an_existing_part_with_range(serve, tmp_path):
    server = serve()
    (tmp_path / f"{NAME}.part").write_bytes(PAYLOAD[:HALF])
    path = fetch(server.url, MD5, tmp_path, progress=quiet(), **FAST)
    assert path.read_bytes() == PAYLOAD
    [request] = server.requests
    assert request.range == f"bytes={HALF}-"
    assert (request.status, request.body_bytes) == (206, len(PAYLOAD) - HALF)


def test_connection_closed_mid_body_resumes_in_the_same_call(serve, tmp_path):
    server = serve(cut_after=100_000)
    path = fetch(server.url, MD5, tmp_path, progress=quiet(), **FAST)
    assert path.read_bytes() == PAYLOAD
    assert [(r.range, r.body_bytes) for r in server.requests] == [
        (None, 100_000),
        ("bytes=100000-", len(PAYLOAD) - 100_000),
    ]


def test_interrupted_download_leaves_only_a_part_that_the_next_run_resumes(serve, tmp_path):
    server = serve(cut_after=1_000)
    with pytest.raises(
        DownloadError, match=f"connection closed after 1000 of {len(PAYLOAD)} bytes"
    ):
        fetch(server.url, MD5, tmp_path, retries=0, progress=quiet(), **FAST)
    assert os.listdir(tmp_path) == [f"{NAME}.part"]  # nothing under the final name
    assert (tmp_path / f"{NAME}.part").read_bytes() == PAYLOAD[:1_000]
    assert fetch(server.url, MD5, tmp_path, progress=quiet(), **FAST).read_bytes() == PAYLOAD
    assert server.requests[-1].range == "bytes=1000-"


def test_part_longer_than_the_file_starts_over(serve, tmp_path):
    server = serve()
    (tmp_path / f"{NAME}.part").write_bytes(PAYLOAD + b"junk")  # server answers 416
    path = fetch(server.url, MD5, tmp_path, progress=quiet(), **FAST)
    assert path.read_bytes() == PAYLOAD
    assert [(r.range, r.status) for r in server.requests] == [
        (f"bytes={len(PAYLOAD) + 4}-", 416),
        (None, 200),
    ]


def test_server_error_is_retried(serve, tmp_path, capsys):
    server = serve(fail_first=1, fail_status=500)
    path = fetch(server.url, MD5, tmp_path, progress=quiet(), **FAST)
    assert path.read_bytes() == PAYLOAD
    assert [r.status for r in server.requests] == [500, 200]
    assert "HTTP 500" in capsys.readouterr().out  # the user sees why it waited


def test_persistent_server_error_gives_up_after_all_retries(serve, tmp_path):
    server = serve(fail_first=100, fail_status=503)
    with pytest.raises(DownloadError, match="after 3 attempts: HTTP 503"):
        fetch(server.url, MD5, tmp_path, retries=2, progress=quiet(), **FAST)
    assert len(server.requests) == 3


def test_404_fails_at_once(serve, tmp_path):
    server = serve()
    missing = f"{server.base_url}/nowhere/{NAME}"
    with pytest.raises(DownloadError) as caught:
        fetch(missing, MD5, tmp_path, progress=quiet(), **FAST)
    message = str(caught.value)
    assert message.startswith(f"{missing}: HTTP 404 Not Found (data.url)")
    assert "point data.url at a mirror or a local copy (file:///" in message
    assert len(server.requests) == 1  # no retry of a client error


def test_403_fails_at_once(serve, tmp_path):
    server = serve(fail_first=1, fail_status=403)
    with pytest.raises(DownloadError, match="HTTP 403 Forbidden"):
        fetch(server.url, MD5, tmp_path, progress=quiet(), **FAST)
    assert len(server.requests) == 1


def test_refused_connection_says_unreachable(tmp_path):
    port = free_port()  # nothing listens on it
    url = f"http://127.0.0.1:{port}/{NAME}"
    with pytest.raises(DownloadError) as caught:
        fetch(url, MD5, tmp_path, retries=1, progress=quiet(), **FAST)
    message = str(caught.value)
    assert f"could not download {url} (data.url) after 2 attempts" in message
    assert f"127.0.0.1:{port} is unreachable" in message and "refused" in message
    assert os.listdir(tmp_path) == []


def test_an_invalid_url_fails_at_once_without_retrying(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/my {NAME}"  # a space: http.client refuses it
    with pytest.raises(DownloadError) as caught:
        fetch(url, MD5, tmp_path, retries=3, progress=quiet(), **FAST)
    assert f"{url} (data.url) is not a valid URL (write a space in it as %20)" in str(caught.value)
    assert "retry" not in capsys.readouterr().out
    assert os.listdir(tmp_path) == []


def test_a_certificate_that_fails_verification_is_not_retried(tmp_path, monkeypatch, capsys):
    def untrusted(request, timeout):
        failure = ssl.SSLCertVerificationError(1, "certificate verify failed")
        failure.verify_message = "self-signed certificate in certificate chain"
        raise urllib.error.URLError(failure)

    monkeypatch.setattr(download.urllib.request, "urlopen", untrusted)
    url = f"https://mirror.example/{NAME}"
    with pytest.raises(DownloadError) as caught:
        fetch(url, MD5, tmp_path, retries=3, progress=quiet(), **FAST)
    message = str(caught.value)
    assert "mirror.example's certificate failed verification" in message
    assert "self-signed certificate in certificate chain" in message and "SSL_CERT_FILE" in message
    assert "retry" not in capsys.readouterr().out


def test_a_host_dns_does_not_know_fails_at_once(tmp_path, monkeypatch, capsys):
    """Offline, the canonical host: 5 retries took 31 s to say what the first one knew."""
    import socket

    def unknown(request, timeout):
        raise urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))

    monkeypatch.setattr(download.urllib.request, "urlopen", unknown)
    for variable in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):  # the CI's, say
        monkeypatch.delenv(variable, raising=False)
    url = f"https://www.cs.toronto.edu/~kriz/{NAME}"
    with pytest.raises(DownloadError) as caught:
        fetch(url, MD5, tmp_path, retries=3, progress=quiet(), **FAST)
    assert str(caught.value).startswith(
        f"{url} (data.url): no such host 'www.cs.toronto.edu' (Name or service not known); "
        "check the address and the network, or point data.url at a mirror"
    )
    assert "retry" not in capsys.readouterr().out
    # Through a proxy the unknown name may be the proxy's: retried and reported as before.
    monkeypatch.setenv("https_proxy", "http://no-such-proxy.invalid:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(DownloadError, match="after 2 attempts.*Check the network or proxy"):
        fetch(url, MD5, tmp_path, retries=1, progress=quiet(), **FAST)
    monkeypatch.delenv("https_proxy")
    transient = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    monkeypatch.setattr(
        download.urllib.request, "urlopen",
        lambda request, timeout: (_ for _ in ()).throw(urllib.error.URLError(transient)),
    )  # fmt: skip
    with pytest.raises(DownloadError, match="after 2 attempts"):  # this one is retried
        fetch(url, MD5, tmp_path, retries=1, progress=quiet(), **FAST)


def test_reuses_a_good_file_without_any_request(serve, tmp_path, capsys):
    server = serve()
    (tmp_path / NAME).write_bytes(PAYLOAD)
    path = fetch(server.url, MD5, tmp_path, progress=quiet(), **FAST)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == []
    assert "reusing" in capsys.readouterr().out


def test_replaces_an_existing_file_with_the_wrong_md5(serve, tmp_path):
    server = serve()
    (tmp_path / NAME).write_bytes(b"truncated")
    path = fetch(server.url, MD5, tmp_path, progress=quiet(), **FAST)
    assert path.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_file_url(tmp_path):
    source = tmp_path / "mirror" / NAME
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    path = fetch(source.as_uri(), MD5, tmp_path / "raw", progress=quiet(), **FAST)
    assert path.read_bytes() == PAYLOAD
    assert os.listdir(tmp_path / "raw") == [NAME]


def test_missing_file_url(tmp_path):
    url = (tmp_path / NAME).as_uri()
    with pytest.raises(DownloadError, match=f"no such file or folder {tmp_path / NAME}") as error:
        fetch(url, MD5, tmp_path / "raw", progress=quiet(), **FAST)
    assert "three slashes" not in str(error.value)  # it has them: only the path is wrong
    with pytest.raises(DownloadError, match="A local path needs three slashes, e.g. file:///"):
        fetch(f"file://{tmp_path.name}/{NAME}", MD5, tmp_path / "raw", progress=quiet(), **FAST)


def test_server_without_range_support_restarts_from_zero(serve, tmp_path, capsys):
    server = serve(ranges=False)
    # Junk in the .part: appending to it instead of starting over would break the md5.
    (tmp_path / f"{NAME}.part").write_bytes(b"x" * HALF)
    path = fetch(server.url, MD5, tmp_path, progress=quiet(), **FAST)
    assert path.read_bytes() == PAYLOAD
    [request] = server.requests
    assert request.range == f"bytes={HALF}-"
    assert (request.status, request.body_bytes) == (200, len(PAYLOAD))
    assert "server cannot resume" in capsys.readouterr().out


def test_progress_off_a_terminal_prints_plain_lines_every_5_s():
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(stream, clock=clock)
    progress.start(0, 20_000_000)
    for second in range(1, 13):  # 12 s at 1 MB/s, one update per second
        clock.now = float(second)
        progress.update(second * 1_000_000)
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines == [
        "download: 5.0/20.0 MB  1.0 MB/s  ETA 0:15",
        "download: 10.0/20.0 MB  1.0 MB/s  ETA 0:10",
        "download: 12.0/20.0 MB  1.0 MB/s",
    ]


def test_progress_on_a_terminal_redraws_one_line():
    stream, clock = TTYStringIO(), FakeClock()
    progress = Progress(stream, clock=clock)
    progress.start(0, 4_000_000)
    for second in range(1, 4):
        clock.now = float(second)
        progress.update(second * 1_000_000)
    progress.finish()
    output = stream.getvalue()
    assert output.count("\n") == 1 and output.endswith("\n")  # one line, ended once
    assert output.count("\r") == 4  # three updates and the final state
    assert "\rdownload: 2.0/4.0 MB  1.0 MB/s  ETA 0:02" in output


def test_fetch_progress_goes_to_stdout_as_plain_lines(serve, tmp_path, capsys):
    server = serve()
    fetch(server.url, MD5, tmp_path, **FAST)  # default Progress: stdout, not a terminal here
    out = capsys.readouterr().out
    assert "\r" not in out
    assert "download: 0.3/0.3 MB" in out
    assert f"saved {tmp_path / NAME}" in out


def test_main_reports_a_404_as_one_line(serve, tmp_path, monkeypatch, capsys, raw_params):
    server = serve()
    raw_params["data"].update(url=f"{server.base_url}/gone/{NAME}", md5=MD5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    monkeypatch.chdir(tmp_path)
    assert download.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1  # one line, no traceback
    assert "HTTP 404" in err and "data.url" in err
    assert not Path("data/raw", NAME).exists()


def test_main_downloads_into_data_raw(serve, tmp_path, monkeypatch, raw_params):
    server = serve()
    raw_params["data"].update(url=server.url, md5=MD5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    monkeypatch.chdir(tmp_path)
    assert download.main([]) == 0
    assert (tmp_path / "data" / "raw" / NAME).read_bytes() == PAYLOAD


def test_folder_url_is_copied_without_hidden_files(tmp_path, capsys):
    folder = tmp_path / "pets"
    for name in ("train/cat/1.png", "train/dog/2.png", ".DS_Store", "train/.git/config"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(name.encode())
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / NAME).write_bytes(b"an earlier data.url")
    (raw / "pets.part").mkdir()  # a copy killed half-way: started over
    (raw / "pets.part" / "stale.png").write_bytes(b"x")
    path = fetch(folder.as_uri(), "", raw, progress=quiet(), **FAST)
    assert path == raw / "pets"
    assert os.listdir(raw) == ["pets"]
    copied = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert copied == ["train/cat/1.png", "train/dog/2.png"]
    assert (path / "train/cat/1.png").read_bytes() == b"train/cat/1.png"
    out = capsys.readouterr().out
    assert "copied 2 files" in out and "leaving out 2 hidden" in out
    assert "`dvc repro --force download`" in out  # DVC does not watch the folder: say so

    (folder / "train/dog/2.png").unlink()  # a copy made again follows the folder
    fetch(folder.as_uri(), "", raw, progress=quiet(), **FAST)
    assert not (path / "train/dog/2.png").exists() and (path / "train/cat/1.png").exists()


def test_a_copy_of_a_read_only_folder_can_be_replaced(tmp_path):
    """copytree copies modes: read-only folders in data/raw would make the next copy, or a
    change of data.url, fail on deleting them (as any user but root)."""
    folder = tmp_path / "pets"
    (folder / "train/cat").mkdir(parents=True)
    (folder / "train/cat/1.png").write_bytes(b"x")
    for path in (folder / "train/cat", folder / "train", folder):
        path.chmod(0o555)
    try:
        path = fetch(folder.as_uri(), "", tmp_path / "raw", progress=quiet(), **FAST)
    finally:
        for path_ in (folder, folder / "train", folder / "train/cat"):
            path_.chmod(0o755)
    for copied in (path, path / "train", path / "train/cat"):
        assert copied.stat().st_mode & 0o700 == 0o700, copied
    assert (path / "train/cat/1.png").read_bytes() == b"x"


def test_a_read_only_folder_left_by_an_older_copy_is_still_removed(tmp_path, monkeypatch):
    """What rmtree's error handler does for a non-root user: make the parent writable, retry."""
    stale = tmp_path / "pets.old.part" / "train"
    stale.mkdir(parents=True)
    (stale / "1.png").write_bytes(b"x")
    stale.chmod(0o555)
    denied = PermissionError(13, "Permission denied")
    download._writable_and_retry(os.unlink, str(stale / "1.png"), (PermissionError, denied, None))
    assert not (stale / "1.png").exists() and stale.stat().st_mode & 0o200
    # And _remove hands it to rmtree (as root, as in CI, nothing is ever denied).
    handed = []
    monkeypatch.setattr(download.shutil, "rmtree", lambda path, onerror: handed.append(onerror))
    download._remove(tmp_path / "pets.old.part")
    assert handed == [download._writable_and_retry]
    kept = stale / "2.png"  # any other failure is raised as it was, not retried
    kept.write_bytes(b"x")
    error = OSError(28, "No space left on device")
    with pytest.raises(OSError) as raised:
        download._writable_and_retry(os.unlink, str(kept), (OSError, error, None))
    assert raised.value is error and kept.exists()


def test_a_full_disk_is_one_line_naming_the_file_and_the_fix(tmp_path):
    class FullDisk(io.BytesIO):
        name = str(tmp_path / "raw" / f"{NAME}.part")

        def write(self, chunk):
            raise OSError(28, "No space left on device")

    with pytest.raises(DownloadError) as error:
        download._stream(io.BytesIO(PAYLOAD), FullDisk(), hashlib.md5(), quiet(), 0, len(PAYLOAD))
    assert str(error.value) == (
        f"cannot write {tmp_path / 'raw' / NAME}.part (No space left on device); free disk "
        f"space or make {tmp_path / 'raw'} writable, then run `dvc repro download` again"
    )


def test_a_relative_file_url_says_it_needs_three_slashes_for_a_folder_too(tmp_path):
    for md5 in ("", MD5):  # a folder's empty md5 gave "is a file, not a folder"
        with pytest.raises(DownloadError) as error:
            fetch("file://data/pets", md5, tmp_path / "raw", progress=quiet(), **FAST)
        assert str(error.value).startswith(
            "file://data/pets (data.url) names the host 'data', not a path on this machine. A "
            "local path needs three slashes, e.g. file:///path/to/pets"
        )


def test_folder_with_an_md5_and_file_without_one_are_refused(tmp_path):
    (tmp_path / "pets").mkdir()
    with pytest.raises(
        DownloadError, match=r'is a folder, which has no single md5: set data.md5 to ""'
    ):
        fetch((tmp_path / "pets").as_uri(), MD5, tmp_path / "raw", progress=quiet(), **FAST)
    (tmp_path / NAME).write_bytes(PAYLOAD)
    with pytest.raises(DownloadError, match=r'data.md5 is "" but .* is a file, not a folder'):
        fetch((tmp_path / NAME).as_uri(), "", tmp_path / "raw", progress=quiet(), **FAST)
    assert os.listdir(tmp_path / "raw") == []


def test_a_mistyped_local_path_says_so_and_keeps_the_earlier_download(tmp_path):
    raw = tmp_path / "raw"
    (tmp_path / NAME).write_bytes(PAYLOAD)
    fetch((tmp_path / NAME).as_uri(), MD5, raw, progress=quiet(), **FAST)
    for md5 in ("", MD5):  # a folder's empty md5, or an archive's
        with pytest.raises(DownloadError, match=r"\(data.url\): no such file or folder /typo/pets"):
            fetch("file:///typo/pets", md5, raw, progress=quiet(), **FAST)
    assert os.listdir(raw) == [NAME]  # not removed as "left over" before the URL was checked


def test_a_failing_http_url_keeps_the_earlier_download_until_a_new_one_is_in_place(
    serve, tmp_path, capsys
):
    server = serve()
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "earlier.tar.gz").write_bytes(b"the archive of an earlier data.url")
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{server.base_url}/typo/{NAME}", MD5, raw, progress=quiet(), **FAST)
    assert os.listdir(raw) == ["earlier.tar.gz"]  # the typo cost nothing
    fetch(server.url, MD5, raw, progress=quiet(), **FAST)
    assert os.listdir(raw) == [NAME]
    assert f"removing {raw / 'earlier.tar.gz'}, left over from an earlier data.url" in (
        capsys.readouterr().out
    )
    # The same file name with another md5 (a new version at a mistyped address): kept too.
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{server.base_url}/typo/{NAME}", "0" * 32, raw, progress=quiet(), **FAST)
    assert os.listdir(raw) == [NAME] and (raw / NAME).read_bytes() == PAYLOAD


@pytest.mark.parametrize(
    "path",
    [f"/..%2F..%2F{NAME}", f"/o/datasets%2F{NAME}?alt=media"],  # hostile; a cloud object URL
    ids=["dotdot", "cloud-object"],
)
def test_an_encoded_slash_in_the_url_cannot_leave_data_raw(tmp_path, path):
    """Decoded after the last `/` was taken, `..%2F..%2Fx` named a file two folders up,
    and the clean-up of data/raw then removed everything beside it: the repository."""
    repo = tmp_path / "repo"
    raw = repo / "data" / "raw"
    raw.mkdir(parents=True)
    (repo / "params.yaml").write_text("kept")
    with PayloadServer(PAYLOAD, path) as server:
        saved = fetch(server.url, MD5, raw, progress=quiet(), **FAST)
    assert saved == raw / NAME and saved.read_bytes() == PAYLOAD
    assert sorted(os.listdir(repo)) == ["data", "params.yaml"]
    for url in ("http://host/data/..", "http://host/%2E%2E", "http://host/"):
        with pytest.raises(DownloadError, match="does not end with a file name"):
            fetch(url, MD5, raw, progress=quiet(), **FAST)


def test_a_part_of_another_file_is_downloaded_again_from_the_start(serve, tmp_path, capsys):
    """A .part left by an earlier data.url (or a file the server has since replaced) is not
    blamed on data.md5: the download starts over once, and only a whole file's md5 counts."""
    server = serve()
    (tmp_path / f"{NAME}.part").write_bytes(os.urandom(HALF))
    path = fetch(server.url, MD5, tmp_path, progress=quiet(), **FAST)
    assert path.read_bytes() == PAYLOAD and os.listdir(tmp_path) == [NAME]
    assert [(r.range, r.status) for r in server.requests] == [
        (f"bytes={HALF}-", 206),
        (None, 200),
    ]
    assert f"after resuming an earlier run's {NAME}.part, expected {MD5}; downloading" in (
        capsys.readouterr().out
    )
    with pytest.raises(DownloadError, match=r"expected 0{32} \(data.md5\)"):  # wrong after all
        fetch(server.url, "0" * 32, tmp_path / "again", progress=quiet(), **FAST)


@pytest.mark.parametrize("ranges", [False, True], ids=["no-range-support", "416"])
def test_a_mistyped_md5_after_a_download_begun_again_from_zero_downloads_once(
    serve, tmp_path, capsys, ranges
):
    """A .part the server would not resume (200) or refused (416, longer than the file) was
    already replaced by a whole, fresh download: a second one would only repeat it."""
    server = serve(ranges=ranges)
    (tmp_path / f"{NAME}.part").write_bytes(b"x" * (len(PAYLOAD) + 1 if ranges else HALF))
    with pytest.raises(
        DownloadError, match=r"its md5 is [0-9a-f]{32}, expected 0{32} \(data\.md5\)"
    ):
        fetch(server.url, "0" * 32, tmp_path, progress=quiet(), **FAST)
    whole = [r for r in server.requests if r.status == 200]
    assert len(whole) == 1 and whole[0].body_bytes == len(PAYLOAD)
    assert "after resuming an earlier run's" not in capsys.readouterr().out


def test_a_kill_while_the_earlier_folder_copy_is_deleted_leaves_the_new_one_whole(
    tmp_path, monkeypatch
):
    folder = tmp_path / "pets"
    (folder / "train" / "cat").mkdir(parents=True)
    (folder / "train" / "cat" / "1.png").write_bytes(b"one")
    raw = tmp_path / "raw"
    fetch(folder.as_uri(), "", raw, progress=quiet(), **FAST)
    (folder / "train" / "cat" / "2.png").write_bytes(b"two")
    remove = download._remove

    def killed_on_the_old_copy(path):
        if path.name == "pets.old.part" and path.exists():
            raise KeyboardInterrupt  # the kill lands while the old copy is deleted
        remove(path)

    monkeypatch.setattr(download, "_remove", killed_on_the_old_copy)
    with pytest.raises(KeyboardInterrupt):
        fetch(folder.as_uri(), "", raw, progress=quiet(), **FAST)
    assert sorted(os.listdir(raw / "pets" / "train" / "cat")) == ["1.png", "2.png"]  # whole
    assert find_download(raw) == raw / "pets"  # the old copy's .part name is ignored
    monkeypatch.setattr(download, "_remove", remove)
    fetch(folder.as_uri(), "", raw, progress=quiet(), **FAST)
    assert os.listdir(raw) == ["pets"]  # and the next run removes it


def test_a_hash_or_question_mark_in_a_file_url_is_refused_not_cut(tmp_path):
    """file:///data/pets#v2 names /data/pets to a URL parser: that folder was copied."""
    (tmp_path / "pets/train/cat").mkdir(parents=True)
    (tmp_path / "pets#v2/train/dog").mkdir(parents=True)
    for mark in ("#", "?"):
        url = f"file://{tmp_path}/pets{mark}v2"
        with pytest.raises(DownloadError) as error:
            fetch(url, "", tmp_path / "raw", progress=quiet(), **FAST)
        assert str(error.value).startswith(
            f"{url} (data.url): a # or ? ends a URL's path, so this names {tmp_path}/pets; "
            "write them in the path as %23 and %3F"
        )
    copied = fetch(f"file://{tmp_path}/pets%23v2", "", tmp_path / "raw", progress=quiet())
    assert sorted(p.name for p in (copied / "train").iterdir()) == ["dog"]


def test_a_file_url_under_a_folder_it_cannot_enter_is_one_line(tmp_path, monkeypatch):
    """Python 3.11's Path.exists raises PermissionError there (another user's mode-700 home);
    root, which runs these tests, enters any folder, so the refusal is simulated."""
    source = tmp_path / "alice" / NAME
    real_exists = Path.exists

    def exists(path, *args, **kwargs):
        if path == source:
            raise PermissionError(13, "Permission denied", str(path))
        return real_exists(path, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", exists)
    with pytest.raises(DownloadError) as error:
        fetch(source.as_uri(), MD5, tmp_path / "raw", progress=quiet(), **FAST)
    assert str(error.value).startswith(
        f"{source.as_uri()} (data.url): cannot read {source} (Permission denied); make it, and "
        "the folders above it, readable by this user"
    )


def test_a_url_with_letters_beyond_ascii_is_sent_percent_encoded(tmp_path):
    """As a browser's address bar shows it: http.client raised UnicodeEncodeError."""
    with PayloadServer(PAYLOAD, f"/donn%C3%A9es/{NAME}") as server:
        url = f"{server.base_url}/données/{NAME}"
        path = fetch(url, MD5, tmp_path / "raw", progress=quiet(), **FAST)
        assert [r.path for r in server.requests] == [f"/donn%C3%A9es/{NAME}"]
    assert path == tmp_path / "raw" / NAME and path.read_bytes() == PAYLOAD


def test_a_url_with_a_login_is_refused_without_showing_the_password(serve, tmp_path):
    """urllib sends no login from a URL (it took `s3cret@127.0.0.1` for a port), and a
    password in data.url would be committed and logged with every run."""
    server = serve()
    url = server.url.replace("http://", "http://alice:s3cret@")
    with pytest.raises(DownloadError) as error:
        fetch(url, MD5, tmp_path / "raw", progress=quiet(), **FAST)
    assert str(error.value).startswith(
        f"{server.url.replace('http://', 'http://***@')} (data.url) holds a login "
        "(user:password@); it would be committed with params.yaml"
    )
    assert "s3cret" not in str(error.value) and "alice" not in str(error.value)
    assert server.requests == [] and not (tmp_path / "raw").exists()


def test_a_reused_archive_named_in_another_case_is_kept(tmp_path, capsys):
    """On a disk that ignores case (macOS's), data.url's CIFAR-10-python.tar.gz is the
    cifar-10-python.tar.gz already there: reused, then deleted as "left over". A hard link
    stands in here for the two names of one file."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / NAME).write_bytes(PAYLOAD)
    os.link(raw / NAME, raw / NAME.upper())
    mirror = tmp_path / "mirror" / NAME.upper()
    mirror.parent.mkdir()
    mirror.write_bytes(PAYLOAD)
    path = fetch(mirror.as_uri(), MD5, raw, progress=quiet(), **FAST)
    assert path == raw / NAME.upper() and "reusing" in capsys.readouterr().out
    assert (raw / NAME).read_bytes() == PAYLOAD  # the one file, under the name the disk keeps
    (raw / "dangling").symlink_to(tmp_path / "gone")  # a link to nothing is still removed
    fetch(mirror.as_uri(), MD5, raw, progress=quiet(), **FAST)
    assert not (raw / "dangling").is_symlink()

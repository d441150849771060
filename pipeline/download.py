"""Stage `download`: fetch the dataset archive into data/raw, verified by md5 (or copy a folder).

    python -m pipeline.download      # reads data.url and data.md5 from params.yaml

The archive is streamed into `<name>.part` while its md5 is computed, and only
renamed to `<name>` once the md5 matches, so a file under its final name is
always complete. Transient failures (reset, timeout, HTTP 5xx, short body) are
retried with exponential backoff, resuming the `.part` with an HTTP Range
request where the server allows it. A final file that already matches is reused
without touching the network.

A local folder (`file:///path/to/folder`, `data.md5: ""`) is copied into
`data/raw/<folder>/` instead: every file but hidden ones, symbolic links
followed. The copy is what prepare reads and what DVC hashes and caches, so
dvc.lock pins the exact images a model was trained on, `dvc push` saves them
and checking out an old experiment restores them. A dependency on the folder
itself could do none of that, and a static dvc.yaml cannot even name it (the
folder is a param). The price: DVC does not watch the folder. After changing
it, `dvc repro --force download` copies it again; prepare and what follows
re-run only if the copy's content changed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import os
import re
import shutil
import socket
import ssl
import stat
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TextIO

from pipeline import paths
from pipeline.config import load_params
from pipeline.errors import PipelineError, cli

CHUNK_BYTES = 1 << 20  # read, hash and write 1 MiB at a time
TIMEOUT_S = 60.0  # socket timeout for connecting and for each read
MAX_BACKOFF_S = 60.0  # cap on the wait between attempts
MB = 1e6  # progress is reported in decimal megabytes, as browsers and curl do
FIX_HINT = "dvc exp run -S data.url=... -S data.md5=... or edit params.yaml"


def _proxied(url: str) -> bool:
    """Whether urllib sends a request for `url` through a proxy (HTTPS_PROXY and the like)."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    return bool(proxy) and not urllib.request.proxy_bypass(parts.hostname or "")


def _mirror_hint(name: str) -> str:
    return (
        f"point data.url at a mirror or a local copy (file:///path/to/{name}) "
        f"and data.md5 at its checksum: {FIX_HINT}"
    )


class DownloadError(PipelineError):
    """The archive could not be fetched or is not the expected file."""


class _Transient(Exception):
    """A failure worth another attempt; its message is the reason."""


class Progress:
    """Bytes done/total, rate and ETA of one transfer.

    On a terminal: one line redrawn in place with a carriage return. Otherwise
    (DVC logs, CI): a plain line at most every `interval_s` and one at the end.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty()
        self.interval_s = 0.2 if self.tty else interval_s  # a terminal redraws at 5 Hz
        self.clock = clock
        self.total: int | None = None
        self.start_bytes = self.done = 0
        self.started_s = self.shown_s = 0.0
        self.width = 0  # length of the last terminal line, to blank it out

    def start(self, done: int, total: int | None) -> None:
        """Begin an attempt at byte `done` (non-zero when resuming) of `total` (None: unknown)."""
        self.total, self.start_bytes, self.done = total, done, done
        self.started_s = self.shown_s = self.clock()

    def update(self, done: int) -> None:
        self.done = done
        now = self.clock()
        if now - self.shown_s >= self.interval_s:
            self.shown_s = now
            self._show(now, final=False)

    def finish(self) -> None:
        self._show(self.clock(), final=True)

    def _show(self, now: float, *, final: bool) -> None:
        elapsed_s = now - self.started_s
        # Rate of this attempt only: bytes resumed from disk were not transferred.
        rate = (self.done - self.start_bytes) / elapsed_s if elapsed_s > 0 else 0.0
        size = f"{self.done / MB:.1f}" + (f"/{self.total / MB:.1f}" if self.total else "")
        line = f"download: {size} MB  {rate / MB:.1f} MB/s"
        if self.total and rate > 0 and not final:
            eta_s = max(self.total - self.done, 0) / rate
            line += f"  ETA {int(eta_s) // 60}:{int(eta_s) % 60:02d}"
        if self.tty:
            self.stream.write("\r" + line.ljust(self.width) + ("\n" if final else ""))
            self.width = 0 if final else len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def fetch(
    url: str,
    md5: str,
    dest_dir: Path,
    *,
    retries: int = 5,
    backoff_s: float = 1.0,
    progress: Progress | None = None,
    timeout_s: float = TIMEOUT_S,
) -> Path:
    """Download `url` into `dest_dir/<basename>` and return that path once its md5 is `md5`.

    Up to `retries` further attempts follow a transient failure, waiting
    `backoff_s`, then twice that, and so on. Raises DownloadError otherwise.
    """
    md5 = md5.lower()
    _refuse_a_login(url)
    name = _file_name(url)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final, part = dest_dir / name, dest_dir / f"{name}.part"
    # data.url and data.md5 are checked before anything in data/raw is touched,
    # and what an earlier data.url left there is removed only after success.
    local = _local_path(url) if url.startswith("file://") else None
    if url.startswith("file://") and local is None:
        raise DownloadError(_host_named(url, name))
    try:  # Python 3.11's exists() raises, not answers False, under a folder one cannot enter
        exists = local is not None and local.exists()
        folder = local if exists and local.is_dir() else None
    except PermissionError as error:
        raise DownloadError(
            f"{url} (data.url): cannot read {local} ({error.strerror}); make it, and the "
            f"folders above it, readable by this user, or fix data.url: {FIX_HINT}"
        ) from None
    if local is not None and not exists:
        hint = "" if url.startswith("file:///") else (
            f"A local path needs three slashes, e.g. file:///path/to/{name}; "
        )  # fmt: skip
        raise DownloadError(
            f"{url} (data.url): no such file or folder {local}. {hint}fix data.url: {FIX_HINT}"
        )
    if folder is not None and md5:
        raise DownloadError(
            f'{url} (data.url) is a folder, which has no single md5: set data.md5 to "" '
            f"or point data.url at an archive of it: {FIX_HINT}"
        )
    if folder is None and not md5:
        raise DownloadError(
            f'data.md5 is "" but {url} (data.url) is a file, not a folder: set data.md5 to '
            f"the file's md5 (md5sum prints it): {FIX_HINT}"
        )
    if folder is not None:
        return _keep_only(copy_folder(folder, final))
    progress = progress if progress is not None else Progress()

    if final.is_file():
        found = _hash_file(final, hashlib.md5()).hexdigest()
        if found == md5:
            print(f"download: reusing {final} (md5 {md5} matches)", flush=True)
            return _keep_only(final)
        # Kept until the new one replaces it: a download that fails leaves it as it was.
        print(f"download: {final} has md5 {found}, expected {md5}; downloading again", flush=True)

    # An earlier run's bytes, which an HTTP download resumes from (a file:// copy starts over).
    left_over = not url.startswith("file://") and part.is_file() and part.stat().st_size > 0

    from_zero: list[bool] = []  # set when an attempt emptied the .part and began at byte 0

    def download() -> str:
        return _attempts(url, part, name, progress, retries, backoff_s, timeout_s, from_zero)

    digest = download()
    # The earlier run's bytes, of another file? (data.url changed, the server's file too.)
    # Only if they are still in it: a download that began at byte 0 is whole and fresh, and
    # a second one would only repeat it before the md5 error (a mistyped data.md5, say).
    if digest != md5 and left_over and not from_zero:
        part.unlink()
        print(
            f"download: md5 {digest} after resuming an earlier run's {part.name}, "
            f"expected {md5}; downloading {name} from the start",
            flush=True,
        )
        digest = download()
    if digest != md5:
        part.unlink()  # a resumed run must not build on bytes of the wrong file
        raise DownloadError(
            f"downloaded {url} but its md5 is {digest}, expected {md5} (data.md5). "
            f"If you use a mirror, set data.url to it and data.md5 to its checksum: {FIX_HINT}"
        )
    _replace(part, final)  # atomic: the final name appears only with verified content
    with contextlib.suppress(OSError):  # make the rename itself durable (not on Windows)
        fd = os.open(dest_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    print(f"download: saved {final} (md5 {md5})", flush=True)
    return _keep_only(final)


def _attempts(
    url: str,
    part: Path,
    name: str,
    progress: Progress,
    retries: int,
    backoff_s: float,
    timeout_s: float,
    from_zero: list[bool],
) -> str:
    """Download `url` into `part`, retrying transient failures; return the md5.

    Appends to `from_zero` whenever an attempt empties `part` to begin at byte 0."""
    for attempt in range(retries + 1):
        try:
            if url.startswith("file://"):
                return _copy_local(url, part, name, progress)
            return _download_http(url, part, name, progress, timeout_s, from_zero)
        except _Transient as failure:
            if attempt == retries:
                raise DownloadError(
                    f"could not download {url} (data.url) after {retries + 1} attempts: "
                    f"{failure}. Check the network or proxy (HTTPS_PROXY), or " + _mirror_hint(name)
                ) from None
            delay_s = min(backoff_s * 2**attempt, MAX_BACKOFF_S)
            print(
                f"download: {failure}; retry {attempt + 1}/{retries} in {delay_s:.1f} s", flush=True
            )
            time.sleep(delay_s)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _replace(part: Path, final: Path) -> None:
    """Give the complete `part` the name `final`.

    A folder under that name (an earlier copy) is first moved aside under a
    `.part` name, which prepare ignores and the next run removes, then deleted:
    a kill while deleting it never leaves a half-deleted folder under `final`.
    """
    aside = final.with_name(f"{final.name}.old.part")
    _remove(aside)
    if (final.is_dir() and not final.is_symlink()) or (part.is_dir() and final.exists()):
        os.replace(final, aside)
    os.replace(part, final)
    _remove(aside)


def _keep_only(final: Path) -> Path:
    """Remove everything in `final`'s folder but `final`, and return `final`.

    dvc.yaml keeps data/raw across runs (persist) so that a `.part` can be
    resumed; anything else in it is left over from an earlier data.url. It goes
    only once the new data is in place, so a data.url that fails (a typo, a
    404, no network) leaves the earlier download where it was.
    """
    for stale in final.parent.iterdir():
        # On a disk that ignores case (macOS's), the reused file may list as cifar-10-...
        # while data.url names CIFAR-10-...: the same file, which must stay.
        if stale != final and not _same_file(stale, final):
            print(f"download: removing {stale}, left over from an earlier data.url", flush=True)
            _remove(stale)
    return final


def _same_file(one: Path, other: Path) -> bool:
    try:
        return os.path.samefile(one, other)
    except OSError:  # either gone, or a link to nothing (a cache entry DVC dropped)
        return False


def _download_http(
    url: str, part: Path, name: str, progress: Progress, timeout_s: float, from_zero: list[bool]
) -> str:
    """One attempt: stream `url` into `part`, resuming it if it exists; return the md5."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(_ascii(url), headers={"User-Agent": "pipeline.download"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:  # the .part is not a prefix the server knows
            part.unlink()
            from_zero.append(True)
            raise _Transient("server refused to resume (HTTP 416); starting over") from None
        if error.code >= 500 or error.code in (408, 429):  # server trouble, timeout, rate limit
            raise _Transient(f"HTTP {error.code} {error.reason}") from None
        what = "the file is not at that address" if error.code in (404, 410) else "refused"
        raise DownloadError(
            f"{url}: HTTP {error.code} {error.reason} (data.url): {what}; " + _mirror_hint(name)
        ) from None
    except http.client.InvalidURL as error:  # a space, a port that is not a number: no retry helps
        space = " (write a space in it as %20)" if " " in url else ""
        raise DownloadError(
            f"{url} (data.url) is not a valid URL{space}: {error}; {FIX_HINT}"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:  # refused, DNS
        host = urllib.parse.urlsplit(url).netloc
        reason = getattr(error, "reason", error)
        if isinstance(reason, ssl.SSLCertVerificationError):  # the same certificate every time
            raise DownloadError(
                f"{url} (data.url): {host}'s certificate failed verification "
                f"({reason.verify_message}). A proxy that inspects HTTPS needs its CA: point "
                "SSL_CERT_FILE at a bundle that holds it"
            ) from None
        if (
            isinstance(reason, socket.gaierror)
            and reason.errno == socket.EAI_NONAME
            and not _proxied(url)  # then the unknown name may be the proxy's
        ):
            # DNS knows no such name: a typo, or a machine offline. Waiting minutes for the
            # retries mends neither; a rerun resumes any .part once the name resolves.
            raise DownloadError(
                f"{url} (data.url): no such host {urllib.parse.urlsplit(url).hostname!r} "
                f"({reason.strerror}); check the address and the network, or " + _mirror_hint(name)
            ) from None
        raise _Transient(f"{host} is unreachable: {reason}") from None

    with response:
        hasher = hashlib.md5()
        length = response.headers.get("Content-Length")
        if response.status == 206:
            match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                part.unlink()
                from_zero.append(True)
                raise _Transient("server resumed at the wrong byte; starting over")
            _hash_file(part, hasher)  # the md5 covers the whole file, resumed bytes first
            mode = "ab"
        else:
            if offset:
                print(f"download: server cannot resume; restarting {name}", flush=True)
            offset, mode = 0, "wb"
            from_zero.append(True)
        total = offset + int(length) if length is not None else None
        with _open_part(part, mode) as out:
            done = _stream(response, out, hasher, progress, offset, total)
    # http.client returns a short body without error when the peer closes early.
    if total is not None and done < total:
        raise _Transient(f"connection closed after {done} of {total} bytes")
    return hasher.hexdigest()


def _local_path(url: str) -> Path | None:
    """The path a file:// URL names on this machine; None if it names another host."""
    split = urllib.parse.urlsplit(url)
    if split.query or split.fragment or url.endswith(("?", "#")):
        # A URL's path ends at them: file:///data/pets#v2 would name /data/pets.
        raise DownloadError(
            f"{url} (data.url): a # or ? ends a URL's path, so this names "
            f"{urllib.request.url2pathname(split.path)}; write them in the path as %23 and "
            f"%3F: {FIX_HINT}"
        )
    local = split.netloc in ("", "localhost")
    return Path(urllib.request.url2pathname(split.path)) if local else None


def _ascii(url: str) -> str:
    """`url` with its characters beyond ASCII percent-encoded (UTF-8), as a browser sends
    them: http.client refuses them (UnicodeEncodeError), and a URL copied from the
    address bar shows them decoded (https://host/données/...). A host name beyond ASCII
    http.client encodes itself (IDNA)."""
    if url.isascii():
        return url
    split = urllib.parse.urlsplit(url)
    parts = {part: getattr(split, part) for part in ("path", "query", "fragment")}
    encoded = {
        part: re.sub(r"[^\x00-\x7f]+", lambda m: urllib.parse.quote(m[0]), text)
        for part, text in parts.items()
    }
    return urllib.parse.urlunsplit(split._replace(**encoded))


def _refuse_a_login(url: str) -> None:
    """A user name and password in data.url would be committed with params.yaml and logged
    with every MLflow run, and urllib does not send them (it read the password as a port)."""
    split = urllib.parse.urlsplit(url)
    if "@" not in split.netloc:
        return
    shown = urllib.parse.urlunsplit(split._replace(netloc="***@" + split.netloc.rpartition("@")[2]))
    raise DownloadError(
        f"{shown} (data.url) holds a login (user:password@); it would be committed with "
        "params.yaml and logged with every run, and this download does not send one. Point "
        "data.url at a copy that needs none (a public mirror, a presigned URL, a file:// "
        f"path): {FIX_HINT}"
    )


def _copy_local(url: str, part: Path, name: str, progress: Progress) -> str:
    """Copy a file:// URL into `part` the same way, in chunks; return the md5."""
    source = _local_path(url)  # not None: fetch refused a URL that names a host
    if source is None or not source.is_file():
        raise DownloadError(
            f"{url} (data.url): no such file {source}. A local copy needs an absolute path with "
            f"three slashes, e.g. file:///path/to/{name}; fix data.url: {FIX_HINT}"
        )
    hasher = hashlib.md5()
    try:
        stream = source.open("rb")
    except OSError as error:  # permission denied, say: not worth retrying
        raise DownloadError(
            f"{url} (data.url): cannot read {source} ({error.strerror}); make it readable "
            f"or fix data.url: {FIX_HINT}"
        ) from None
    with stream, _open_part(part) as out:
        _stream(stream, out, hasher, progress, 0, source.stat().st_size)
    return hasher.hexdigest()


def _host_named(url: str, name: str) -> str:
    """file://data/x.tar.gz: "data" is read as a host name."""
    return (
        f"{url} (data.url) names the host {urllib.parse.urlsplit(url).netloc!r}, not a path "
        f"on this machine. A local path needs three slashes, e.g. file:///path/to/{name}; "
        f"fix data.url: {FIX_HINT}"
    )


def _open_part(part: Path, mode: str = "wb") -> BinaryIO:
    try:
        return part.open(mode)
    except OSError as error:
        raise _write_failed(part, error) from None


def _write_failed(path: Path, error: OSError) -> DownloadError:
    """Disk full, or data/raw not writable: the fix is here, not in data.url."""
    return DownloadError(
        f"cannot write {path} ({error.strerror or error}); free disk space or make "
        f"{path.parent} writable, then run `dvc repro download` again"
    )


def _stream(
    source: BinaryIO | http.client.HTTPResponse,
    out: BinaryIO,
    hasher: hashlib._Hash,
    progress: Progress,
    done: int,
    total: int | None,
) -> int:
    """Copy `source` to `out` from byte `done`, hashing as it goes; return bytes in `out`."""
    progress.start(done, total)
    try:
        while True:
            try:
                chunk = source.read(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as error:  # reset, timeout, bad chunk
                raise _Transient(f"connection lost after {done} bytes: {error!r}") from None
            if not chunk:
                break
            try:
                out.write(chunk)
            except OSError as error:
                raise _write_failed(Path(out.name), error) from None
            hasher.update(chunk)
            done += len(chunk)
            progress.update(done)
        try:
            out.flush()
            os.fsync(out.fileno())  # on disk before any rename can make it look complete
        except OSError as error:
            raise _write_failed(Path(out.name), error) from None
    finally:
        progress.finish()
    return done


def copy_folder(source: Path, final: Path) -> Path:
    """Copy the folder `source` to `final` (hidden entries left out) and return `final`.

    Copied under `<name>.part` first and renamed, so a folder under the final
    name is always a complete copy; a leftover `.part` is started over.
    """
    part = final.with_name(f"{final.name}.part")
    hidden = 0

    def skip_hidden(directory: str, names: list[str]) -> list[str]:
        nonlocal hidden
        skipped = [n for n in names if n.startswith(".")]  # .git, .DS_Store, ._x.jpg
        hidden += len(skipped)
        return skipped

    _remove(part)
    try:
        shutil.copytree(source, part, ignore=skip_hidden)
    except shutil.Error as error:  # one (source, target, reason) per file that failed
        failed, _, reason = error.args[0][0]
        raise DownloadError(
            f"could not copy {failed} ({reason}) from the folder at data.url; "
            "fix or remove it, then run `dvc repro download` again"
        ) from None
    except OSError as error:  # the folder itself cannot be listed, or data/raw not written
        raise DownloadError(
            f"could not copy the folder at data.url: {error.filename or source}: "
            f"{error.strerror or error}; fix it, then run `dvc repro download` again"
        ) from None
    # copytree copies the source's modes: a read-only source would give folders that the
    # next copy (or a change of data.url) cannot delete. The copy is the pipeline's own.
    for folder, _, _ in os.walk(part):
        os.chmod(folder, os.stat(folder).st_mode | stat.S_IRWXU)
    _replace(part, final)
    files = [p for p in final.rglob("*") if p.is_file()]
    megabytes = sum(p.stat().st_size for p in files) / MB
    print(
        f"download: copied {len(files)} files ({megabytes:.1f} MB) from {source} to {final}"
        + (f", leaving out {hidden} hidden" if hidden else "")
        + "; DVC does not watch that folder: after changing it, run "
        "`dvc repro --force download`, then `dvc repro`",
        flush=True,
    )
    return final


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        # A read-only folder inside (copied by an older version from a read-only source)
        # is made writable and the removal tried again.
        shutil.rmtree(path, onerror=_writable_and_retry)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _writable_and_retry(function: Callable, target: str, excinfo) -> None:
    parent = os.path.dirname(target)
    if not isinstance(excinfo[1], PermissionError) or os.stat(parent).st_mode & stat.S_IWUSR:
        raise excinfo[1]
    os.chmod(parent, os.stat(parent).st_mode | stat.S_IRWXU)
    function(target)


def _hash_file(path: Path, hasher: hashlib._Hash) -> hashlib._Hash:
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            hasher.update(chunk)
    return hasher


def _file_name(url: str) -> str:
    """The name the download gets in data/raw: the URL path's last part, decoded first.

    Decoded first, so an encoded slash (`datasets%2Fcifar.tar.gz`, as cloud object
    URLs write folders) cannot put a folder, or a `..`, into the name.
    """
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    if name in ("", ".", ".."):
        raise DownloadError(f"data.url {url} does not end with a file name; {FIX_HINT}")
    return name


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.download",
        description=f"Fetch data.url into {paths.RAW_DIR}, verified against data.md5.",
    )
    parser.parse_args(argv)
    params = load_params(paths.PARAMS)
    fetch(params.data.url, params.data.md5, paths.RAW_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())

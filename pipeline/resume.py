"""Crash recovery for training: a checkpoint after every epoch, kept outside DVC's outs.

`dvc repro` deletes a stage's outs before re-running it, so the recovery state
lives in `.train-state/` (ignored by git, unknown to DVC): the model with its
optimizer after the last completed epoch, the history so far and the MLflow
run id. A training killed at any moment, even by SIGKILL, restarts from the
last completed epoch in the same MLflow run. The state carries a fingerprint
of the training params and the data it belongs to. A training of other params
or data sets the state it finds aside, in `kept/<fingerprint>/`, rather than
deleting it: a quick `dvc exp run -S train.epochs=1` between a killed 50-epoch
training and its rerun costs none of its epochs. The newest KEEP_ASIDE states
set aside are kept, older ones discarded.

`dvc exp run --temp` and queued experiments train in a temporary copy under
`<repo>/.dvc/tmp/exps/`, deleted when the experiment ends, failed or not. Their
state lives in the repository's own state folder instead, in
`exps/<fingerprint>/`, claimed by the training that uses it (an flock the
kernel drops with the process, however it dies), so a killed or failed
experiment resumes when the same experiment runs again: queued, `--temp`, or
in the workspace, which takes an unclaimed one into place.

Writes are ordered so that the state on disk is always consistent: the new
checkpoint is written under its own name, then `state.json` is atomically
replaced to point at it, then the old checkpoint is removed. A state moves
to and from kept/ a file at a time, `state.json` last out of the state folder
and first into it, and its checkpoint is looked for on both sides: a kill
during a move loses nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras

from pipeline import files
from pipeline.errors import PipelineError

STATE_FILE = "state.json"
KEPT_DIR = "kept"  # in the state folder: kept/<fingerprint>/, states set aside
KEEP_ASIDE = 2  # states set aside that are kept (each a checkpoint: 35 MB for the default network)
# In the workspace's state folder: exps/<fingerprint>/, states of trainings in DVC's
# temporary experiment copies, each beside its claim, exps/<fingerprint>.lock.
EXPERIMENTS_DIR = "exps"
NOT_THE_STATE = (KEPT_DIR, EXPERIMENTS_DIR)  # in a state folder, but other states


# How long a claim waits out another's hold before calling it taken: held()'s probe and
# a workspace's adoption hold a lock for microseconds to milliseconds, a training for hours.
CLAIM_PATIENCE_S = 1.0


class Claim:
    """One training's exclusive hold on a state folder in exps/: two experiments of the
    same settings (one queued twice, `dvc queue start -j 2`) must not write one state,
    nor the workspace take a state a running experiment writes.

    An flock on `<folder>.lock`: the kernel drops it when the process ends, however it
    ends (SIGKILL too), so a dead training never holds a state."""

    def __init__(self, fd: int, path: Path):
        self.fd: int | None = fd
        self.path = path

    @staticmethod
    def lock_file(folder: Path) -> Path:
        return folder.with_name(folder.name + ".lock")

    @classmethod
    def take(cls, folder: Path, patience_s: float = CLAIM_PATIENCE_S) -> Claim | None:
        """The claim on `folder`, or None while another process holds it."""
        path = cls.lock_file(folder)
        give_up = time.monotonic() + patience_s
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # no exps/ yet, or another's release just removed it
                path.parent.mkdir(parents=True, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= give_up:
                    return None
                time.sleep(0.05)  # a moment's hold (held()'s probe, a release) passes
                continue
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                return cls(fd, path)
            # Its holder released it, deleting the file, between our open and our lock:
            # a lock on that deleted file excludes no one. Take the file there now.
            os.close(fd)

    @staticmethod
    def held(folder: Path) -> bool:
        """Whether a running training holds `folder` now (a probe that takes nothing)."""
        try:
            fd = os.open(Claim.lock_file(folder), os.O_RDONLY)
        except FileNotFoundError:  # a holder keeps its lock file until it lets go
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # and with it the shared lock, if taken

    def release(self) -> None:
        """Delete the lock file, then let go (in that order: see take)."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


@dataclass
class TrainState:
    fingerprint: str  # hash of the training params and data this state belongs to
    run_id: str | None = None  # MLflow run that the resumed training continues
    epochs_done: int = 0
    history: list[dict] = field(default_factory=list)  # one row per completed epoch
    checkpoint: str | None = None  # file name in the state dir
    wall_time_s: float = 0.0  # training time of the completed epochs
    # Set once the trained model is logged: a rerun after a later failure (the store
    # down when the run is marked finished) does not log it again.
    model_uri: str | None = None
    # What the fingerprint hashes (pipeline.recovery_key.resume_basis), to say what changed.
    basis: dict | None = None
    # Keras's random streams (dropout's), [seed, counter] each: its checkpoints leave them out.
    rng: list[list[int]] | None = None


def seed_states(model: keras.Model) -> list:
    """The model's random-stream variables (a dropout layer's SeedGenerator), in order."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def fingerprint(*parts: object) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changes(old: dict | None, new: dict | None, shown: int = 4) -> str:
    """What differs between two resume bases, for the line that discards a state.

    A basis is {"params": {dotted: value}, "meta": meta.json, "data": digest,
    "precision": policy, "workers": count, "code": {module: digest}}; a state
    written before bases were kept has none, and then only "other params or data"
    can be said.
    """
    if not old or not new:
        return "other params or data"
    new = json.loads(json.dumps(new, default=str))  # as stored: tuples are lists
    found = []
    for key in dict.fromkeys([*new.get("params", {}), *old.get("params", {})]):
        before = old.get("params", {}).get(key, "(none)")
        after = new.get("params", {}).get(key, "(none)")
        if before != after:
            found.append(f"{key} {before} -> {after}")
    for key in ("precision", "workers", "replicas"):
        if key == "replicas" and ("replicas" not in old or old["workers"] != new["workers"]):
            continue  # replicas follow workers (a GPU each) unless a worker's GPUs changed
        if old.get(key) != new.get(key):
            found.append(f"{key} {old.get(key)} -> {new.get(key)}")
    if "code" not in old:
        found.append("the code of an earlier version")
    elif edited := [k for k in new.get("code", {}) if old["code"].get(k) != new["code"][k]]:
        found.append(f"the code of {', '.join(edited)}")
    meta = [k for k in dict.fromkeys([*new.get("meta", {}), *old.get("meta", {})])
            if old.get("meta", {}).get(k) != new.get("meta", {}).get(k)]  # fmt: skip
    if meta:
        found.append(f"data/prepared's {', '.join(meta)}")
    elif old.get("data") != new.get("data"):
        found.append("data/prepared's images or labels")
    if not found:
        return "other params or data"
    more = f" and {len(found) - shown} more" if len(found) > shown else ""
    return "other settings: " + "; ".join(found[:shown]) + more


class StateStore:
    """The recovery state on disk; read-only (`writable=False`) on all but the chief worker.

    claim: held on `directory` (a state folder in exps/) until release(). experiments:
    the workspace's exps/, whose unclaimed state of the settings trained is taken back."""

    def __init__(
        self, directory: Path, writable: bool = True,
        claim: Claim | None = None, experiments: Path | None = None,
    ):  # fmt: skip
        self.directory = directory
        self.writable = writable
        self.claim = claim
        self.experiments = experiments
        # States load() threw away, for their MLflow runs: their training is not coming back.
        self.discarded: list[TrainState] = []

    def load(self, expected_fingerprint: str, basis: dict | None = None) -> TrainState | None:
        """The saved state if it belongs to these params and data, else None.

        A state of other params or data is set aside (kept/), and one set aside earlier
        for these is taken back; then the newest KEEP_ASIDE states set aside are kept.
        basis: what expected_fingerprint was computed from, to name what changed."""
        try:  # a full or read-only disk, a file where a folder goes: before any training
            state = self._read(self.directory)
            if state is not None and state.fingerprint != expected_fingerprint:
                self._set_aside(state, f"it belongs to {changes(state.basis, basis)}")
                state = None
            if state is None:
                state = self._take_back(expected_fingerprint)
                if state is None and self._adopt(expected_fingerprint):
                    state = self._take_back(expected_fingerprint)
            elif self.writable:  # a kill while it was set aside may have left its files there
                self._move(self._kept(expected_fingerprint), self.directory)
            self._keep_newest(expected_fingerprint)
            self._mention_waiting(expected_fingerprint)
        except OSError as error:
            # A move cut short is one the next load finishes (see _move): no state is lost.
            raise PipelineError(
                f"cannot set aside or take back the recovery states in {self.directory} "
                f"({error}); fix that and run again"
            ) from None
        if state is None:
            return None
        if state.epochs_done and not (state.checkpoint and self.checkpoint_path(state).is_file()):
            self._discard(state, f"its checkpoint of epoch {state.epochs_done} is missing")
            return None
        return state  # also a kill during epoch 1: no checkpoint yet, but its MLflow run goes on

    def _kept(self, fingerprint: str) -> Path:
        return self.directory / KEPT_DIR / fingerprint

    def _read(self, directory: Path) -> TrainState | None:
        """The state in `directory`; None if there is none. One that cannot be read (a
        state.json of another version of this code, say) is discarded, saying so."""
        try:
            text = (directory / STATE_FILE).read_text()
        except FileNotFoundError:
            return None
        except OSError as error:  # EIO on a network disk, say: it may read tomorrow
            raise PipelineError(
                f"cannot read the recovery state {directory / STATE_FILE} "
                f"({error.strerror or error}); nothing was deleted: fix that and run again, "
                "or delete that file to give up the state"
            ) from None
        try:
            return TrainState(**json.loads(text))
        except (ValueError, TypeError) as error:
            reason = f"{type(error).__name__}: {error}"
        try:  # its MLflow run, if it can be told, is ended with it
            run_id = json.loads(text).get("run_id")
        except (ValueError, AttributeError):
            run_id = None
        unreadable = TrainState(fingerprint="", run_id=run_id if isinstance(run_id, str) else None)
        self._discard(unreadable, f"its {STATE_FILE} cannot be read ({reason})", directory)
        return None

    def _discard(self, state: TrainState, reason: str, directory: Path | None = None) -> None:
        where = directory or self.directory
        print(f"train: discarding recovery state in {where} ({reason})", flush=True)
        self.discarded.append(state)
        if where == self.directory:
            self.clear()
        elif self.writable:
            shutil.rmtree(where, ignore_errors=True)

    def _move(self, source: Path, target: Path) -> None:
        """Every file of a state from `source` to `target`, state.json last out of the state
        folder and first into it: killed half-way, the state folder has the state.json and
        the files it names may be in kept/ (checkpoint_path finds them there; load finishes
        the move). So the state folder never holds a checkpoint without its state.json,
        which a training of other settings would take for its own and delete."""
        if not source.is_dir():
            return
        target.mkdir(parents=True, exist_ok=True)
        into_place = target == self.directory
        entries = sorted(
            (e for e in source.iterdir() if e.name not in NOT_THE_STATE),
            key=lambda e: (e.name == STATE_FILE) != into_place,
        )
        for entry in entries:
            os.replace(entry, target / entry.name)
        if source != self.directory and not any(source.iterdir()):
            source.rmdir()

    def _set_aside(self, state: TrainState, reason: str) -> None:
        """Move the active state to kept/<its fingerprint>/."""
        if not self.writable:  # another worker's: the chief sets it aside
            return
        if not state.epochs_done:  # nothing trained to keep: a kill during epoch 1
            self._discard(state, reason)
            return
        target = self._kept(state.fingerprint)
        self._move(self.directory, target)
        os.utime(target / STATE_FILE)  # its time set aside: the newest are the ones kept
        epochs = f"{state.epochs_done} epoch{'s' * (state.epochs_done != 1)}"
        print(
            f"train: set aside the recovery state in {self.directory} ({epochs}; {reason}) "
            f"as {target}: training those settings again resumes it",
            flush=True,
        )

    def _take_back(self, fingerprint: str) -> TrainState | None:
        """The state set aside for this fingerprint, moved back into place (where the other
        workers of a multi-worker training, which write nothing, read it from kept/)."""
        kept = self._kept(fingerprint)
        state = self._read(kept) if kept.is_dir() else None
        if state is None or state.fingerprint != fingerprint:
            return None
        print(f"train: taking back the recovery state set aside as {kept}", flush=True)
        if self.writable:
            self._move(kept, self.directory)
        return state

    def _adopt(self, fingerprint: str) -> bool:
        """Move an experiment's unclaimed state of this fingerprint from exps/ to kept/,
        whence it is taken back. One rename: a kill leaves it on one side or the other."""
        if not self.writable or self.experiments is None:
            return False
        folder = self.experiments / fingerprint
        if not (folder / STATE_FILE).is_file():
            return False
        claim = Claim.take(folder)
        if claim is None:
            print(
                f"train: warning: the recovery state {folder} of these settings is in use "
                "by a training in a temporary experiment copy; this one starts anew",
                flush=True,
            )
            return False
        if not (folder / STATE_FILE).is_file():  # its training finished since we looked
            claim.release()
            return False
        try:
            kept = self._kept(fingerprint)
            if kept.is_dir():  # no state.json there, or it would have been taken back
                shutil.rmtree(kept)
            kept.parent.mkdir(parents=True, exist_ok=True)
            os.replace(folder, kept)
        finally:
            claim.release()
        print(
            f"train: taking the recovery state {folder} of a temporary experiment copy",
            flush=True,
        )
        return True

    def _mention_waiting(self, expected_fingerprint: str) -> None:
        """Say which states of other experiments wait in exps/ and what they weigh: no
        count or age prunes them (their experiments may be queued again any time)."""
        if not self.writable or self.experiments is None or not self.experiments.is_dir():
            return
        try:  # a notice: a state another training takes meanwhile must not stop this one
            waiting = [
                folder for folder in self.experiments.iterdir()
                if folder.name != expected_fingerprint and (folder / STATE_FILE).is_file()
                and not Claim.held(folder)
            ]  # fmt: skip
            size = sum(f.stat().st_size for d in waiting for f in d.iterdir() if f.is_file())
        except OSError:
            return
        if not waiting:
            return
        states = f"{len(waiting)} recovery state{'s' * (len(waiting) != 1)}"
        print(
            f"train: {states} of killed or failed experiments wait in {self.experiments} "
            f"({size / 1e6:.1f} MB): running the same experiment again resumes it; "
            f"`rm -rf {self.experiments}` drops them (not while a queued or `--temp` "
            "experiment trains: it keeps its state there too)",
            flush=True,
        )

    def _keep_newest(self, expected_fingerprint: str) -> None:
        """Discard all but the KEEP_ASIDE states set aside last (never this training's own),
        and what a kill left of a state without its state.json."""
        kept = self.directory / KEPT_DIR
        if not self.writable or not kept.is_dir():
            return
        aside = []
        for folder in kept.iterdir():
            if folder.name == expected_fingerprint:
                continue
            if not (folder / STATE_FILE).is_file():  # its state.json is gone: no resuming it
                shutil.rmtree(folder, ignore_errors=True)
                continue
            aside.append(folder)
        aside.sort(key=lambda d: (d / STATE_FILE).stat().st_mtime, reverse=True)
        for old in aside[KEEP_ASIDE:]:
            try:
                dropped = self._read(old)  # None: unreadable, discarded already
            except PipelineError as error:  # an old state's trouble: not this training's
                print(f"train: warning: {error}", flush=True)
                continue
            if dropped is not None:
                reason = f"more than {KEEP_ASIDE} states set aside; the oldest"
                self._discard(dropped, reason, old)
        if not any(kept.iterdir()):
            kept.rmdir()

    def record(self, state: TrainState) -> None:
        """Write `state` without a new checkpoint: the run before the first epoch (so even
        epoch 1's crash resumes it), the logged model's URI after training."""
        if not self.writable:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        files.write_text(self.directory / STATE_FILE, json.dumps(asdict(state), indent=1))

    def save(self, state: TrainState, model: keras.Model) -> None:
        if not self.writable:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        old = state.checkpoint
        state.rng = [[int(x) for x in v.numpy()] for v in seed_states(model)]
        # Keras insists on the .keras suffix; the epoch in the name keeps the old one intact.
        state.checkpoint = f"epoch-{state.epochs_done:05d}.keras"
        try:
            model.save(self.directory / state.checkpoint)
            files.fsync(self.directory / state.checkpoint)  # on disk before state.json names it
            files.write_text(self.directory / STATE_FILE, json.dumps(asdict(state), indent=1))
        except OSError as error:  # a full disk, say
            # state.json names the last whole epoch: this one if its rename was done (only
            # the folder's fsync failed), else the one before, whose checkpoint stays.
            epoch = state.epochs_done
            done = epoch if self._named() == state.checkpoint else epoch - 1
            if done < epoch:
                (self.directory / state.checkpoint).unlink(missing_ok=True)
                state.checkpoint = old
            then = f"resumes after epoch {done}" if done else "starts epoch 1 again"
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
            fix = "free disk space" if full else "fix that"
            raise PipelineError(
                f"cannot save the recovery state of epoch {epoch} in {self.directory} "
                f"({error.strerror or error}); {fix} and run again: the training "
                f"{then}"
            ) from None
        if old and old != state.checkpoint:
            (self.directory / old).unlink(missing_ok=True)

    def _named(self) -> str | None:
        """The checkpoint state.json names on disk now, if it can be read."""
        try:
            return json.loads((self.directory / STATE_FILE).read_text()).get("checkpoint")
        except (OSError, ValueError, AttributeError):
            return None

    def checkpoint_path(self, state: TrainState) -> Path:
        """The state's checkpoint: in place, or where a move between kept/ and the state
        folder left it (another worker's take-back, a kill during a move)."""
        here = self.directory / state.checkpoint
        kept = self._kept(state.fingerprint) / state.checkpoint
        return kept if not here.is_file() and kept.is_file() else here

    def clear(self) -> None:
        """Remove the active state; the folder too unless other states are in it."""
        if not self.writable or not self.directory.is_dir():
            return
        for entry in self.directory.iterdir():
            if entry.name in NOT_THE_STATE:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        # rmdir, not a look then rmtree: an experiment copy may claim a state in exps/
        # between the two, and its lock file must not go.
        for folder in (*(self.directory / name for name in NOT_THE_STATE), self.directory):
            with contextlib.suppress(OSError):  # not empty (other states), or not there
                folder.rmdir()

    def release(self) -> None:
        """Let go of the claim on the state folder, once the training is done with it, and
        remove the state folders left empty (exps/, then the workspace's)."""
        if self.claim is None:
            return
        self.claim.release()
        self.claim = None
        for folder in (self.directory.parent, self.directory.parent.parent):
            try:
                folder.rmdir()
            except OSError:  # not empty: other experiments' states
                break

"""One score run at a time per output folder: a lease file, created atomically, renewed while the run lives.

PRED_DIR/_lease holds {run_id, host, pid, started, expires}. A run that finds it held by a live run exits
(code 3, cxr.cli) without touching anything. A lease is taken over only when its holder is gone: past its
expiry, or (on the same host) its process no longer exists, as after a killed driver. Takeover renames the
stale file to a name of the taker's own first: of two runs racing for one stale lease only one rename
succeeds, so only one run ever believes it holds the lease.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from typing import Callable, Protocol

log = logging.getLogger(__name__)

LEASE_FILE = "_lease"


class LeaseHeldError(RuntimeError):
    """Another run holds the output folder's lease (cxr.cli exits 3 with this message)."""


class LeaseLostError(RuntimeError):
    """This run's lease was taken over (it was presumed dead): it must not commit."""


class LeaseFiles(Protocol):
    def create_new(self, uri: str, text: str) -> bool: ...          # atomic; False when uri exists
    def read_text_or_none(self, uri: str) -> str | None: ...
    def write_text(self, uri: str, text: str) -> None: ...
    def rename_if_exists(self, src: str, dst: str) -> bool: ...     # atomic; False when src is gone
    def delete(self, uri: str) -> None: ...


class LocalLeaseFiles:
    """The local file system: O_EXCL create and rename(2) are atomic there."""

    @staticmethod
    def _path(uri: str) -> str:
        from cxr.image.source import local_path

        path = local_path(uri)
        if path is None:
            raise ValueError(f"not a local path: {uri}")
        return path

    def create_new(self, uri, text):
        path = self._path(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return True

    def read_text_or_none(self, uri):
        try:
            with open(self._path(uri)) as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def write_text(self, uri, text):
        path = self._path(uri)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)

    def rename_if_exists(self, src, dst):
        try:
            os.rename(self._path(src), self._path(dst))
            return True
        except FileNotFoundError:
            return False

    def delete(self, uri):
        try:
            os.remove(self._path(uri))
        except FileNotFoundError:
            pass


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def _process_exists(pid: int) -> bool:
    """A live process with that pid (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def holder_gone(holder: dict, now: float) -> str | None:
    """Why a lease may be taken over (None while its holder may still be running)."""
    if now > float(holder.get("expires_unix", 0)):
        return f"expired at {holder.get('expires')}"
    if holder.get("host") == socket.gethostname() and not _process_exists(int(holder.get("pid", -1))):
        return f"its process {holder.get('pid')} on this host no longer exists"
    return None


def describe(holder: dict) -> str:
    return (f"run {holder.get('run_id')} (host {holder.get('host')}, pid {holder.get('pid')}, started "
            f"{holder.get('started')}, lease expires {holder.get('expires')})")


class Lease:
    def __init__(self, files: LeaseFiles, out: str, run_id: str, ttl_s: float, clock: Callable[[], float] = time.time):
        self.files, self.uri, self.run_id, self.ttl_s, self.clock = files, f"{out.rstrip('/')}/{LEASE_FILE}", run_id, ttl_s, clock
        self.started = clock()
        self.took_over: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def _record(self) -> str:
        now = self.clock()
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": _iso(self.started), "renewed": _iso(now), "expires": _iso(now + self.ttl_s),
                           "expires_unix": now + self.ttl_s}, sort_keys=True)

    def _holder(self) -> dict | None:
        text = self.files.read_text_or_none(self.uri)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:   # a half-written lease of a run killed while creating it: treat as expired
            return {"run_id": "?", "expires_unix": 0, "expires": "unknown (unreadable lease file)"}

    def acquire(self) -> "Lease":
        """Take the lease or raise LeaseHeldError naming the holder."""
        for _ in range(3):
            if self.files.create_new(self.uri, self._record()):
                return self
            holder = self._holder()
            if holder is None:
                continue   # released between our create and read: try again
            why = holder_gone(holder, self.clock())
            if why is None:
                raise LeaseHeldError(f"the output folder is in use by {describe(holder)}: this run exits without "
                                     f"writing anything; run again after it finishes")
            stale = f"{self.uri}.stale-{self.run_id}"
            if self.files.rename_if_exists(self.uri, stale):
                self.files.delete(stale)
                self.took_over = {**holder, "reason": why}
                log.warning("took over the lease of %s: %s", describe(holder), why)
        holder = self._holder() or {}
        raise LeaseHeldError(f"the output folder is in use by {describe(holder)}: could not take its lease")

    def check(self) -> None:
        """Raise LeaseLostError unless the lease file still names this run."""
        holder = self._holder()
        if not holder or holder.get("run_id") != self.run_id:
            self.lost = f"lease now held by {describe(holder or {})}"
            raise LeaseLostError(f"run {self.run_id} lost its lease on the output folder ({self.lost}): "
                                 "nothing of it was committed")

    def renew(self) -> None:
        self.check()
        self.files.write_text(self.uri, self._record())

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLostError as exc:
                log.error("%s", exc)
                return
            except Exception as exc:  # a flaky store: keep trying until expiry makes it moot
                log.warning("could not renew the lease: %s", exc)

    def __enter__(self) -> "Lease":
        self.acquire()
        self._thread = threading.Thread(target=self._renew_forever, name="cxr-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        holder = self._holder()
        if holder and holder.get("run_id") == self.run_id:
            self.files.delete(self.uri)

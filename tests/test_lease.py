"""The score job's output lease on the local file system, without Spark: who may take it, and when."""
from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from cxr.score.lease import Lease, LeaseHeldError, LeaseLostError, LocalLeaseFiles


def _lease(out, run_id, ttl=60.0, clock=time.time):
    return Lease(LocalLeaseFiles(), str(out), run_id, ttl, clock=clock)


def test_a_live_lease_is_refused_with_its_holder_named(tmp_path):
    first = _lease(tmp_path, "night-1").acquire()
    with pytest.raises(LeaseHeldError, match=r"in use by run night-1 \(host .*, pid \d+, started .*expires"):
        _lease(tmp_path, "manual").acquire()
    first.check()   # still ours


def test_an_expired_lease_is_taken_over_and_the_old_holder_cannot_commit(tmp_path):
    now = [1000.0]
    old = _lease(tmp_path, "stuck", ttl=10, clock=lambda: now[0]).acquire()
    now[0] += 11
    new = _lease(tmp_path, "next", ttl=10, clock=lambda: now[0]).acquire()
    assert new.took_over["run_id"] == "stuck" and "expired" in new.took_over["reason"]
    with pytest.raises(LeaseLostError, match="lost its lease"):
        old.check()
    with pytest.raises(LeaseLostError):
        old.renew()
    assert json.loads((tmp_path / "_lease").read_text())["run_id"] == "next"


@pytest.mark.parametrize("reaped", [True, False])
def test_a_lease_whose_process_is_gone_on_this_host_is_taken_over_before_expiry(tmp_path, reaped):
    proc = subprocess.Popen(["sleep", "60"])
    record = {"run_id": "killed", "host": socket.gethostname(), "pid": proc.pid, "started": "t",
              "expires": "in an hour", "expires_unix": time.time() + 3600}
    (tmp_path / "_lease").write_text(json.dumps(record))
    with pytest.raises(LeaseHeldError):        # its process still runs
        _lease(tmp_path, "too-early").acquire()
    proc.kill()
    if reaped:
        proc.wait()
    else:   # a zombie: killed, not yet reaped by its parent (as after a SIGKILLed spark-submit)
        time.sleep(0.3)
    taker = _lease(tmp_path, "rerun").acquire()
    assert taker.took_over["run_id"] == "killed" and "no longer exists" in taker.took_over["reason"]
    proc.wait()


def test_another_hosts_lease_waits_for_its_expiry(tmp_path):
    record = {"run_id": "remote", "host": "some-other-host", "pid": 1, "started": "t", "expires": "soon",
              "expires_unix": time.time() + 3600}
    (tmp_path / "_lease").write_text(json.dumps(record))
    with pytest.raises(LeaseHeldError, match="run remote"):
        _lease(tmp_path, "local").acquire()


def test_the_context_renews_and_releases(tmp_path):
    with _lease(tmp_path, "r1", ttl=0.3) as lease:
        first = json.loads((tmp_path / "_lease").read_text())["expires_unix"]
        time.sleep(0.5)   # renewed every ttl/3
        assert json.loads((tmp_path / "_lease").read_text())["expires_unix"] > first
        lease.check()
    assert not (tmp_path / "_lease").exists()

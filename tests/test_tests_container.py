"""The tests container's own hardening, seen from inside it (it runs there only).

The host-side checks (tests/compose/test_containers.py) see the long-running services; the
tests container runs only as long as the suite, so the suite checks itself.
"""
import errno
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.container


def status(pid):
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


@pytest.mark.parametrize("pid", ["self", "1"], ids=["pytest", "pid 1"])
def test_runs_unprivileged(pid):
    fields = status(pid)
    assert set(map(int, fields["Uid"].split())) == {10001}
    for capabilities in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[capabilities], 16) == 0, capabilities
    assert fields["NoNewPrivs"] == "1"


def test_pid_1_is_an_init_not_pytest():
    # PID 1 ignores signals it has no handler for: as pytest it would outlive a stop.
    assert os.getpid() != 1
    assert Path("/proc/1/comm").read_text().strip() not in ("python", "pytest")


def test_only_tmp_is_writable(tmp_path):
    with pytest.raises(OSError) as refused:
        Path("/srv/tests/probe").write_text("x")
    assert refused.value.errno == errno.EROFS
    # pytest's tmp_path lives in the /tmp tmpfs
    assert str(tmp_path).startswith("/tmp/")
    (tmp_path / "probe").write_text("x")

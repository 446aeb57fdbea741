"""The apps' graceful stop under the hardened settings, from the host (make test-compose only).

Runs after test_containers.py (run.sh names the files in that order): it stops the apps, as
`make compose-down` does first. Each app must send close 1001 through nginx to its open
WebSockets and exit by itself, with status 0, well within its compose stop_grace_period: the
engine's SIGKILL must never be what ends it. The init in front of uWSGI has to forward the
stop signal for this to work at all.
"""
import json
import subprocess
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from stack import ws_url
from test_containers import compose_service, container, nginx_reaches
from up import seconds
from wsstack.rawws import RawWebSocket

pytestmark = pytest.mark.compose


@pytest.mark.parametrize("service", ["uwsgi-app", "flask-app"])
def test_stopping_an_app_closes_its_websockets_with_1001_within_the_grace_period(service):
    grace = seconds(compose_service(service)["stop_grace_period"], None)
    backend = service.removesuffix("-app")
    # The other app's container has just stopped (or been recreated): nginx reaches this one
    # again first (see test_containers.NGINX_FOLLOW_SECONDS), then its answer is fresh for
    # both handshakes.
    nginx_reaches(f"/{backend}/healthz")
    with connect(ws_url(backend), ping_interval=None) as polite, RawWebSocket(ws_url(backend)) as silent:
        polite.send("still here")
        assert polite.recv(timeout=5) == "still here"
        started = time.monotonic()
        # podman-compose stops a service the same way: `podman stop -t <stop_grace_period>`
        stop = subprocess.Popen(["podman", "stop", "--time", str(int(grace)), container(service)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with pytest.raises(ConnectionClosed) as closed:
            polite.recv(timeout=grace)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        # A client that never answers the close gets it too; the app stops waiting for it.
        frame = silent.expect_close(timeout=grace)
        assert frame.close_code == 1001
        output, _ = stop.communicate(timeout=grace + 10)
        took = time.monotonic() - started
    assert stop.returncode == 0, output
    state = json.loads(subprocess.run(["podman", "inspect", "--format", "{{json .State}}", container(service)],
                                      capture_output=True, text=True, check=True).stdout)
    assert (state["Status"], state["ExitCode"], state["OOMKilled"]) == ("exited", 0, False)
    assert took < grace - 2, f"stopped after {took:.1f}s of a {grace:.0f}s grace period"

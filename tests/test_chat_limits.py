"""Bounded resources of the chat, on both backends (local mode: apps of the test's own with
small limits, on the stack's Redis): rooms per client address and per process, one
slow-consumer policy, the token issuer's rate limit, and no query string or token in a log."""
import json
import os
import urllib.error
import urllib.request

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from chat_client import NO_CLIENT_PINGS, new_room, protocol_header, protocols, token
from local_processes import running_app, running_nginx
from wsstack.rawws import RawWebSocket

pytestmark = pytest.mark.local

REDIS_URL = f"redis://127.0.0.1:{os.environ.get('LOCAL_REDIS_PORT', '6379')}/0"
APPS = ("uwsgi-app", "flask-app")


def open_chat(base, room, name, address):
    return connect(f"{base}/ws/chat?room={room}", subprotocols=protocols(token(name)["token"]),
                   additional_headers={"X-Real-IP": address}, **NO_CLIENT_PINGS).__enter__()


def read_until(ws, wanted):
    while True:
        event = json.loads(ws.recv(timeout=10))
        if event["type"] == wanted:
            return event


def close_of(ws):
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=10)
    return closed.value.rcvd


@pytest.mark.parametrize("app", APPS)
def test_rooms_are_capped_per_client_address_and_per_process(app, tmp_path):
    with running_app(app, tmp_path / "app.log", REDIS_URL=REDIS_URL, UWSGI_PROCESSES="1",
                     CHAT_MAX_ROOMS_PER_CLIENT="2", CHAT_MAX_ROOMS_PER_PROCESS="3") as url:
        base = "ws" + url[len("http"):]
        rooms = [new_room() for _ in range(4)]
        held = [open_chat(base, rooms[0], "capped", "203.0.113.1"), open_chat(base, rooms[1], "capped", "203.0.113.1"),
                open_chat(base, rooms[0], "capped", "203.0.113.1")]  # a room it already has: no new one
        try:
            for ws in held:
                read_until(ws, "presence")
            third = open_chat(base, rooms[2], "capped", "203.0.113.1")
            closed = close_of(third)
            assert closed.code == 1008 and "too many rooms open from your address" in closed.reason
            held.append(open_chat(base, rooms[2], "other", "203.0.113.2"))  # the process's third room
            read_until(held[-1], "presence")
            fourth = open_chat(base, rooms[3], "other", "203.0.113.2")
            closed = close_of(fourth)
            assert closed.code == 1013 and "too many active rooms" in closed.reason
        finally:
            for ws in held:
                ws.close()


@pytest.mark.parametrize("app", APPS)
def test_a_client_that_stops_reading_is_closed_with_1013_once_the_backlog_is_full(app, tmp_path):
    """One policy on both apps: live messages wait for a connection up to CHAT_SEND_BACKLOG;
    then it is closed (it resumes with last_id), and nothing grows without bound meanwhile."""
    # Pings every 60 s: a client that reads nothing answers no ping either, and the pong
    # timeout (the suite's 2 s pings) would otherwise drop it before its backlog fills.
    with running_app(app, tmp_path / "app.log", REDIS_URL=REDIS_URL, CHAT_SEND_BACKLOG="150",
                     UWSGI_WEBSOCKETS_PING_FREQ="60",
                     WS_MAX_MESSAGES_PER_SECOND="100000", WS_MESSAGE_BURST="100000") as url:
        base = "ws" + url[len("http"):]
        room = new_room()
        slow = RawWebSocket(f"{base}/ws/chat?room={room}", headers=protocol_header(token("slow")["token"]))
        # The sender reads everything (an unbounded queue in its own process), so only `slow` falls behind.
        with connect(f"{base}/ws/chat?room={room}", subprotocols=protocols(token("sender")["token"]),
                     max_queue=None, **NO_CLIENT_PINGS) as sender:
            read_until(sender, "presence")
            # 16 MB: more than the socket buffers between them hold. In batches of 100, each
            # read back before the next, so that the sender itself never falls behind.
            for batch in range(40):
                for i in range(100):
                    sender.send(json.dumps({"type": "message", "text": f"{batch}-{i}-".ljust(4000, "x")}))
                while not json.loads(sender.recv(timeout=30)).get("text", "").startswith(f"{batch}-99-"):
                    pass
            read_messages = 0
            while True:
                frame = slow.recv_frame(timeout=30)
                assert frame is not None, "no close frame"
                if frame.opcode == 0x8:
                    break
                read_messages += 1
            assert frame.close_code == 1013 and "too slow" in frame.close_reason
            assert read_messages < 4000 + 3  # it did not get everything: it was cut off
        slow.close()


def test_the_token_issuer_is_rate_limited_per_client_address(tmp_path):
    with running_nginx(tmp_path, NGINX_AUTH_REQUESTS_PER_MINUTE="60", NGINX_AUTH_REQUEST_BURST="2") as base:
        statuses = []
        for _ in range(8):
            request = urllib.request.Request("http" + base[len("ws"):] + "/auth/token", data=b'{"name": "x"}',
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    statuses.append(response.status)
            except urllib.error.HTTPError as error:
                statuses.append(error.code)
        # 1 per second with a burst of 2: the first three at once, then 429.
        assert statuses[:3] == [200, 200, 200] and statuses.count(429) >= 4, statuses


def test_no_log_line_holds_a_query_string_or_a_token(tmp_path):
    secret_room = "room-" + os.urandom(6).hex()
    document = token("logged", fresh=True)
    with running_app("uwsgi-app", tmp_path / "app.log", REDIS_URL=REDIS_URL) as url:
        with running_nginx(tmp_path, uwsgi_app_upstream=url.removeprefix("http://")) as base:
            with connect(f"{base}/uwsgi/ws/chat?room={secret_room}&last_id=0-0",
                         subprotocols=protocols(document["token"]), **NO_CLIENT_PINGS) as ws:
                read_until(ws, "presence")
    access, app_log = (tmp_path / "access.log").read_text(), (tmp_path / "app.log").read_text()
    assert "/uwsgi/ws/chat" in access and '"GET /ws/chat"' in app_log  # the requests were logged...
    for log in (access, app_log):  # ...without what their URL and headers carried
        assert secret_room not in log and document["token"] not in log and "last_id" not in log

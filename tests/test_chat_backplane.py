"""The chat's Redis backplane (local mode): replicas, room readers, and a Redis outage."""
import json
import os
import time
import urllib.parse

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from chat_client import BACKENDS, ChatClient, new_room
from local_processes import process_tree_cpu_seconds, running_app_process, running_nginx
from local_redis import REDIS_PORT, OwnRedis, cli
from stack import http_get

pytestmark = pytest.mark.local

REPLICAS = int(os.environ.get("LOCAL_REPLICAS", "1"))
APP_PORTS = {"uwsgi": int(os.environ.get("LOCAL_UWSGI_APP_PORT", "8001")),
             "flask": int(os.environ.get("LOCAL_FLASK_APP_PORT", "8002"))}



def query(room, last_id=None):
    return urllib.parse.urlencode({"room": room, **({"last_id": last_id} if last_id else {})})


def redis_command(port, *args):
    return cli(*args, port=port, timeout=10).stdout


def readers():
    """PIDs of the processes holding a chat reader connection (from CLIENT LIST), one entry
    per connection."""
    pids = []
    for line in redis_command(REDIS_PORT, "CLIENT", "LIST").splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if fields.get("name", "").startswith("chat-reader:"):
            pids.append(int(fields["name"].rsplit("-", 1)[1]))
    return pids


def shared_token_secret():
    """The stack's token secret (wsstack.auth.SharedSecret), for apps of a test's own that use
    another Redis: the issuer's tokens are then valid there too."""
    return redis_command(REDIS_PORT, "GET", "chat-auth:hs256-secret").strip()


needs_replicas = pytest.mark.skipif(REPLICAS < 2, reason="the stack runs one instance per app (LOCAL_REPLICAS)")


@needs_replicas
@pytest.mark.parametrize("backend", BACKENDS)
def test_nginx_balances_across_the_replicas(backend):
    # nginx's resolver hands out a service name's addresses starting at a random one, so
    # every instance gets requests, though not strictly in turn: ask until all have answered.
    masters = set()
    for _ in range(50 * REPLICAS):
        masters.add(json.loads(http_get(f"/{backend}/healthz").body)["instance"])
        if len(masters) == REPLICAS:
            break
    assert len(masters) == REPLICAS


@needs_replicas
def test_a_message_reaches_every_replica_exactly_once_in_the_same_order():
    room = new_room()
    # Straight to every replica of both apps, so each one surely has a client.
    # Replica r listens on 127.0.0.r (scripts/stack.py).
    urls = [f"ws://127.0.0.{r}:{APP_PORTS[backend]}/ws/chat?{query(room)}"
            for backend in BACKENDS for r in range(1, REPLICAS + 1)]
    clients = [ChatClient(None, room, f"client{n}", url=url) for n, url in enumerate(urls)]
    try:
        for client in clients:
            client.say(f"from {client.user}")
        orders = [[m["id"] for m in client.messages(len(clients))] for client in clients]
        assert all(order == orders[0] for order in orders)
        assert len(set(orders[0])) == len(clients)
    finally:
        for client in clients:
            client.close()


def test_each_process_holds_one_reader_for_all_its_rooms_and_drops_it_when_they_empty():
    before = set(readers())
    rooms = [new_room() for _ in range(3)]
    clients = [ChatClient(backend, room, f"{backend}{i}") for room in rooms for backend in BACKENDS for i in range(4)]
    try:
        for room in rooms:
            next(c for c in clients if c.room == room).say("wake every reader")
        for client in clients:  # every process with a client has now delivered through its reader
            assert client.messages(1)[0]["text"] == "wake every reader"
        during = readers()
        assert len(during) == len(set(during))  # one reader connection per process, whatever its rooms
        new = set(during) - before
        assert new and len(new) < len(clients)  # shared by the connections and the rooms of a process
    finally:
        for client in clients:
            client.close()
    deadline = time.monotonic() + 15  # a reader notices that its rooms emptied after its 5 s XREAD
    while set(readers()) & new:
        assert time.monotonic() < deadline, "readers outlived their clients"
        time.sleep(0.2)


def test_a_redis_outage_closes_chats_with_1013_keeps_echo_and_chat_resumes_after(tmp_path):
    # Persisting every write (appendfsync always), so a restart keeps what it stored, as a
    # production Redis with persistence would.
    redis = OwnRedis(tmp_path, appendonly="yes", extra=["--appendfsync", "always"])
    redis.start()
    apps = {}
    try:
        env = {"REDIS_URL": redis.url, "CHAT_AUTH_SECRET": shared_token_secret()}
        with running_app_process("uwsgi-app", tmp_path / "uwsgi.log", **env) as (uwsgi_proc, uwsgi_url), \
                running_app_process("flask-app", tmp_path / "flask.log", **env) as (flask_proc, flask_url):
            apps = {"uwsgi": uwsgi_proc, "flask": flask_proc}
            with running_nginx(tmp_path, uwsgi_app_upstream=uwsgi_url.removeprefix("http://"),
                               flask_app_upstream=flask_url.removeprefix("http://")) as base:
                room = new_room()

                def chat(backend, user, last_id=None):
                    return ChatClient(backend, room, user, url=f"{base}/{backend}/ws/chat?{query(room, last_id)}")

                a, b = chat("uwsgi", "a"), chat("flask", "b")
                b.say("stored before the outage 1")
                seen = a.messages(1)[0]
                b.say("stored before the outage 2")  # stored, but `a` never reads it
                assert b.messages(2)[1]["text"] == "stored before the outage 2"

                redis.stop()
                for client in (a, b):
                    assert "chat backplane unavailable" in client.close_reason(1013)
                for backend in BACKENDS:  # echo does not need Redis
                    with connect(f"{base}/{backend}/ws/echo", ping_interval=None) as echo:
                        echo.send("echo still works")
                        assert echo.recv(timeout=5) == "echo still works"
                # Clients keep trying; each attempt is refused at once, and the apps do not spin.
                cpu_before = {name: process_tree_cpu_seconds(p.pid) for name, p in apps.items()}
                started = time.monotonic()
                for _ in range(5):
                    for backend in BACKENDS:
                        with pytest.raises(ConnectionClosed) as refused:
                            chat(backend, "retrying")
                        assert refused.value.rcvd.code == 1013
                time.sleep(max(0.0, 3 - (time.monotonic() - started)))  # an idle stretch to measure
                for name, process in apps.items():
                    assert process.poll() is None, f"{name} died during the outage"
                    used = process_tree_cpu_seconds(process.pid) - cpu_before[name]
                    assert used < 1.0, f"{name} used {used:.2f} s of CPU in 3 s with Redis down"

                redis.start()
                # Back with the id it last saw, on the other backend: what Redis stored meanwhile
                # arrives, nothing twice, and the room is live again.
                back = chat("flask", "a", last_id=seen["id"])
                assert [m["text"] for m in back.history] == ["stored before the outage 2"]
                other = chat("uwsgi", "b")
                other.say("after the outage")
                assert back.messages(1)[0]["text"] == "after the outage"
                back.close()
                other.close()
    finally:
        if redis.process.poll() is None:
            redis.stop()


def test_the_health_check_reports_redis_and_the_instance():
    # The apps stay healthy without Redis (echo works), but say how Redis is.
    for backend in BACKENDS:
        health = json.loads(http_get(f"/{backend}/healthz").body)
        assert health["redis"] == "ok"
        assert isinstance(health["instance"], str) and health["instance"]

"""Redis's boundary (local mode): who may connect and run what, a full Redis, persistence.

redis/redis-start.sh starts Redis the same way in every mode: the default user off, the
apps' user (REDIS_USERNAME) limited to the chat's commands and keys, maxmemory with
noeviction, an append-only file with REDIS_APPENDONLY=yes. The compose stack's Redis is
checked from the host in tests/compose/test_containers.py."""
import json
import os
import subprocess
import time

import pytest
from websockets.exceptions import ConnectionClosed

from chat_client import BACKENDS, ChatClient, chat_url, new_room, token
from local_processes import running_app, start_app, stop
from local_redis import APP_PASSWORD_FILE, APP_USER, OwnRedis, admin, cli
from repo import REPO
from stack import http_get

pytestmark = pytest.mark.local

# What an attacker holding the apps' password would want; each must be refused.
FORBIDDEN = [
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "maxmemory"), ("CONFIG", "SET", "maxmemory", "0"),
    ("EVAL", "return 1", "0"), ("FUNCTION", "LIST"), ("SCRIPT", "FLUSH"), ("KEYS", "*"), ("SCAN", "0"),
    ("DEBUG", "SLEEP", "0"), ("SHUTDOWN", "NOSAVE"), ("ACL", "LIST"), ("ACL", "SETUSER", "x", "on"),
    ("MONITOR",), ("CLIENT", "KILL", "TYPE", "normal"), ("REPLICAOF", "127.0.0.1", "1"), ("MODULE", "LIST"),
    ("SUBSCRIBE", "x"), ("BGREWRITEAOF",), ("DEL", "chat:x"),
]


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of the test's own: the forbidden commands could otherwise stop the stack's."""
    redis = OwnRedis(tmp_path)
    redis.start()
    yield redis
    if redis.process.poll() is None:
        redis.stop()


def test_an_unauthenticated_connection_can_run_nothing(own_redis):
    for command in (("PING",), ("GET", "chat-auth:hs256-secret"), ("SET", "chat:x", "1"), ("INFO",)):
        result = cli(*command, port=own_redis.port, user=None)
        assert "NOAUTH" in result.stdout + result.stderr, (command, result)
    # Nor does a guessed password for the default user (it has none: it is off).
    assert "WRONGPASS" in cli("AUTH", "default", "guess", port=own_redis.port, user=None).stdout


def test_the_apps_user_may_run_only_the_chats_commands_on_the_chats_keys(own_redis):
    for command in FORBIDDEN:
        result = cli(*command, port=own_redis.port, user=APP_USER, timeout=5)
        answer = result.stdout + result.stderr
        # DEBUG is refused to everyone before the ACL is asked (enable-debug-command no).
        assert "NOPERM" in answer or (command[0] == "DEBUG" and "DEBUG command not allowed" in answer), (command, result)
    assert admin("PING", port=own_redis.port) == "PONG", "a refused command stopped Redis"
    # The chat's own keys, with its commands; nothing beside them.
    assert cli("SET", "chat:r:epoch", "e", "NX", "GET", port=own_redis.port, user=APP_USER).stdout.strip() == ""
    assert cli("XADD", "chat-wake:i", "*", "room", "added", port=own_redis.port, user=APP_USER).returncode == 0
    assert cli("GET", "chat-auth:hs256-secret", port=own_redis.port, user=APP_USER).returncode == 0
    for command in (("SET", "session:1", "x"), ("GET", "other"), ("XADD", "stream", "*", "a", "b")):
        result = cli(*command, port=own_redis.port, user=APP_USER)
        assert "NOPERM" in result.stdout, (command, result)


def test_the_chat_sends_no_command_its_user_may_not_run():
    """The whole chat on both backends (history, resume, presence, messages, leaving) leaves
    nothing in the stack's ACL LOG: the list in redis/redis-start.sh covers it."""
    admin("ACL", "LOG", "RESET")
    room = new_room()
    with ChatClient("uwsgi", room, "first") as first, ChatClient("flask", room, "second") as second:
        first.say("hello")
        said = second.messages(1)[0]
        second.say("back")
        first.messages(1)
    for backend in BACKENDS:
        with ChatClient(backend, room, "again", last_id="0-0") as again:  # XINFO STREAM
            assert again.history_end["recovered"] is True
        with ChatClient(backend, room, "resumer", last_id=said["id"]) as resumer:
            assert [m["text"] for m in resumer.history] == ["back"]
    time.sleep(1)  # the leaves, after the close
    assert admin("ACL", "LOG") == ""


def test_redis_runs_with_maxmemory_and_noeviction():
    assert admin("CONFIG", "GET", "maxmemory-policy").split() == ["maxmemory-policy", "noeviction"]
    setting = os.environ.get("REDIS_MAXMEMORY", "160mb").lower()
    units = {"kb": 1024, "mb": 1024**2, "gb": 1024**3, "k": 1000, "m": 1000**2, "g": 1000**3, "b": 1}
    unit = next((u for u in units if setting.endswith(u)), "")
    expected = int(setting[:len(setting) - len(unit)]) * units.get(unit, 1)
    assert admin("CONFIG", "GET", "maxmemory").split() == ["maxmemory", str(expected)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_full_redis_refuses_the_message_and_the_chat_answers_as_for_an_outage(backend):
    """maxmemory reached with noeviction: Redis answers OOM to every write. The sender's
    connection closes with 1013 as when Redis is down, the app keeps serving, and once
    Redis has room again the sender resumes with what it saw last."""
    limit = admin("CONFIG", "GET", "maxmemory").split()[1]
    room = new_room()
    with ChatClient(backend, room, "reader") as reader, ChatClient(backend, room, "writer") as writer:
        writer.say("before")
        seen = reader.messages(1)[0]
        try:
            admin("CONFIG", "SET", "maxmemory", "1")
            writer.say("refused")
            assert "chat backplane unavailable" in writer.close_reason(1013)
            # Reading needs no memory: the reader's connection stays, and the app is healthy.
            health = json.loads(http_get(f"/{backend}/healthz").body)
            assert health["redis"] == "ok"
        finally:
            admin("CONFIG", "SET", "maxmemory", limit)
        with ChatClient(backend, room, "writer", last_id=seen["id"]) as back:
            assert back.history == [] and back.history_end["recovered"] is True  # "refused" was not stored
            back.say("after")
            assert reader.messages(1)[0]["text"] == "after"


@pytest.mark.parametrize("appendonly", ["yes", "no"])
def test_with_appendonly_a_restarted_redis_keeps_the_history_and_the_epoch(tmp_path, appendonly):
    """REDIS_APPENDONLY=yes: a restart replays the append-only file, so a client resuming
    after it is told its history is complete; =no: the room starts over with a new epoch,
    and the client is told that it is not."""
    redis = OwnRedis(tmp_path, appendonly=appendonly)
    redis.start()
    try:
        token("keeper")  # the stack's shared secret exists once a token was issued
        secret = admin("GET", "chat-auth:hs256-secret")  # the issuer's tokens are valid here too
        with running_app("uwsgi-app", tmp_path / "app.log", REDIS_URL=redis.url, CHAT_AUTH_SECRET=secret) as url:
            ws_url = url.replace("http://", "ws://") + "/ws/chat"
            room = new_room()

            def chat(**query):
                return ChatClient("uwsgi", room, "keeper", url=ws_url + "?" + chat_url("uwsgi", room, **query).split("?", 1)[1])

            with chat() as first:
                first.say("kept across the restart?")
                seen = first.messages(1)[0]
                epoch = first.history_end["epoch"]
            redis.stop()
            redis.start()
            deadline = time.monotonic() + 15
            while True:  # the app's pool reconnects on its next command
                try:
                    back = chat(last_id=seen["id"], epoch=epoch)
                    break
                except ConnectionClosed:
                    assert time.monotonic() < deadline, "the chat did not come back after Redis restarted"
                    time.sleep(0.5)
            with back:
                if appendonly == "yes":
                    assert back.history_end["epoch"] == epoch and back.history_end["recovered"] is True
                else:
                    assert back.history_end["epoch"] != epoch and back.history_end["recovered"] is False
            with chat() as fresh:
                assert [m["text"] for m in fresh.history] == (["kept across the restart?"] if appendonly == "yes" else [])
    finally:
        if redis.process.poll() is None:
            redis.stop()


def password_file_cases(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    unreadable = tmp_path / "directory"
    unreadable.mkdir()
    return [(str(tmp_path / "missing"), "cannot read"), (str(empty), "empty"), (str(unreadable), "")]


@pytest.mark.parametrize("app", ["uwsgi-app", "flask-app"])
def test_an_app_refuses_to_start_without_a_readable_redis_password(tmp_path, app):
    for index, (path, reason) in enumerate(password_file_cases(tmp_path)):
        log = tmp_path / f"app-{index}.log"
        process, _url = start_app(app, log, REDIS_PASSWORD_FILE=path)
        try:
            assert process.wait(timeout=30) != 0, path
        finally:
            stop(process)
        text = log.read_text()
        assert f"REDIS_PASSWORD_FILE={path}" in text and reason in text, text[-2000:]


def test_redis_refuses_to_start_without_a_readable_password_or_with_bad_settings(tmp_path):
    good = dict(os.environ, REDIS_USERNAME="chat", REDIS_PASSWORD_FILE=str(tmp_path / "pw"),
                REDIS_MAXMEMORY="64mb", REDIS_APPENDONLY="no")
    (tmp_path / "pw").write_text("a password\n")
    cases = [({"REDIS_PASSWORD_FILE": path}, "REDIS_PASSWORD_FILE") for path, _ in password_file_cases(tmp_path)]
    cases += [({"REDIS_PASSWORD_FILE": ""}, "REDIS_PASSWORD_FILE is not set"),
              ({"REDIS_MAXMEMORY": "0"}, "REDIS_MAXMEMORY=0"), ({"REDIS_MAXMEMORY": "lots"}, "REDIS_MAXMEMORY=lots"),
              ({"REDIS_APPENDONLY": "sometimes"}, "REDIS_APPENDONLY=sometimes"),
              ({"REDIS_USERNAME": "default"}, "reserved"), ({"REDIS_USERNAME": "a b"}, "letters, digits"),
              ({"REDIS_ADMIN_PASSWORD_FILE": str(tmp_path / "missing")}, "REDIS_ADMIN_PASSWORD_FILE")]
    for overrides, message in cases:
        # Each is refused before redis-server starts (which would otherwise keep running).
        result = subprocess.run(["sh", str(REPO / "redis" / "redis-start.sh"), "--port", "0"],
                                env=dict(good, **overrides), capture_output=True, text=True, timeout=10)
        assert result.returncode == 2 and message in result.stderr, (overrides, result)


def test_the_healthcheck_pings_as_the_apps_user(own_redis, tmp_path):
    """redis-start.sh --health, compose's healthcheck and the Kubernetes probes: PONG needs the
    apps' password (an unauthenticated PING gets NOAUTH)."""
    def health(password_file):
        env = dict(os.environ, REDIS_USERNAME=APP_USER, REDIS_PASSWORD_FILE=str(password_file))
        return subprocess.run(["sh", str(REPO / "redis" / "redis-start.sh"), "--health", "-p", str(own_redis.port)],
                              env=env, capture_output=True, text=True, timeout=10)

    assert health(APP_PASSWORD_FILE).returncode == 0
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password\n")
    result = health(wrong)
    assert result.returncode != 0 and "WRONGPASS" in result.stderr + result.stdout, result

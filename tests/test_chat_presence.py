"""Presence: who is in a room, across both backends and every replica, from Redis.

Any mode: join and leave events, the member list on connect, one member per token however
many connections it has. Local mode: the list's cap, and a member of a crashed app process
disappearing within the stated bound (CHAT_PRESENCE_TTL x 4/3)."""
import os
import signal
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from chat_client import ChatClient, new_room, request_token, token
from local_processes import running_app_process
from local_redis import REDIS_PORT, cli

PRESENCE_TTL = int(os.environ.get("CHAT_PRESENCE_TTL", "15"))


def names(presence):
    return sorted(member["name"] for member in presence["members"])


def next_presence_event(client, timeout=10):
    return client.next_of(("join", "leave"), timeout)


def test_members_see_each_other_join_and_leave_across_backends():
    room = new_room()
    with ChatClient("uwsgi", room, "ada") as ada:
        assert names(ada.presence) == ["ada"] and ada.presence["count"] == 1
        with ChatClient("flask", room, "bob") as bob:
            assert names(bob.presence) == ["ada", "bob"] and bob.presence["count"] == 2
            event = next_presence_event(ada)
            assert (event["type"], event["user"]) == ("join", {"id": bob.uid, "name": "bob"})
        event = next_presence_event(ada)
        assert (event["type"], event["user"]["id"]) == ("leave", token("bob")["user"]["id"])


def test_one_token_in_two_tabs_is_one_member():
    room = new_room()
    tabs = token("two-tabs", fresh=True)
    with ChatClient("uwsgi", room, "watcher") as watcher:
        first = ChatClient("uwsgi", room, "two-tabs", token_document=tabs)
        assert next_presence_event(watcher)["type"] == "join"
        second = ChatClient("flask", room, "two-tabs", token_document=tabs)
        assert second.presence["count"] == 2  # the watcher and two-tabs, once
        first.close()
        # No leave while the other tab is open: the next presence event is the second tab's leave.
        watcher.say("marker")
        assert watcher.messages(1)[0]["text"] == "marker"
        second.close()
        event = next_presence_event(watcher)
        assert (event["type"], event["user"]["id"]) == ("leave", tabs["user"]["id"])


@pytest.mark.local
def test_the_member_list_is_capped_and_says_how_many_there_are():
    room = new_room()
    far = str(int((time.time() + 600) * 1000))
    # 150 members of other processes, as Redis holds them, in one redis-cli session
    commands = "".join(f"ZADD chat:{room}:presence {far} u-fake-{i}\nHSET chat:{room}:names u-fake-{i} fake-{i}\n"
                       for i in range(150))
    assert cli(input=commands).returncode == 0
    with ChatClient("flask", room, "counted") as client:
        assert len(client.presence["members"]) == 100  # CHAT_PRESENCE_MAX
        assert client.presence["count"] == 151
        # Beyond CHAT_PRESENCE_MAX members joins and leaves are not announced (N x N messages
        # when a big room reconnects after a deploy): the next event is the marker message.
        with ChatClient("uwsgi", room, "unannounced") as other:
            assert other.presence["count"] == 152
            other.say("marker")
            event = client.next_event()
            assert (event["type"], event.get("text")) == ("message", "marker"), event


def process_tree(pid):
    todo, found = [pid], []
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            todo.extend(int(c) for c in Path(f"/proc/{current}/task/{current}/children").read_text().split())
        except OSError:
            pass
    return found


@pytest.mark.local
def test_a_member_of_a_crashed_app_process_disappears_within_the_bound(tmp_path):
    room = new_room()
    with ChatClient("uwsgi", room, "watcher") as watcher:
        with running_app_process("flask-app", tmp_path / "flask.log",
                                 REDIS_URL=f"redis://127.0.0.1:{REDIS_PORT}/0") as (process, url):
            doomed = ChatClient(None, room, "doomed", url=f"ws{url[len('http'):]}/ws/chat?room={room}")
            assert next_presence_event(watcher)["type"] == "join"
            for pid in process_tree(process.pid):  # no graceful stop: no leave is announced
                os.kill(pid, signal.SIGKILL)
            crashed = time.monotonic()
            event = next_presence_event(watcher, timeout=PRESENCE_TTL * 4 / 3 + 5)
            took = time.monotonic() - crashed
            assert (event["type"], event["user"]["id"]) == ("leave", doomed.uid)
            doomed.connection.socket.close()
            assert took <= PRESENCE_TTL * 4 / 3 + 1, f"left {took:.1f} s after the crash"


def test_a_member_whose_token_expired_reconnects_without_a_leave_and_a_join():
    """After the server's 4001 (or 1001 at a stop) the client comes right back: the others see
    neither a leave nor a join for it, only its messages."""
    room = new_room()
    first = token("renewer", ttl=1, fresh=True)
    with ChatClient("uwsgi", room, "watcher") as watcher:
        expiring = ChatClient("flask", room, "renewer", token_document=first)
        assert next_presence_event(watcher)["type"] == "join"
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                expiring.next_event(timeout=20)  # exp + CHAT_AUTH_LEEWAY (10 s)
        assert closed.value.rcvd.code == 4001
        status, renewed = request_token("renewer", renew=first["token"])
        assert status == 200 and renewed["user"]["id"] == first["user"]["id"]
        with ChatClient("uwsgi", room, "renewer", token_document=renewed) as back:
            assert first["user"]["id"] in [m["id"] for m in back.presence["members"]]
            back.say("back again")
            event = watcher.next_event()  # nothing between: no leave, no join
            assert (event["type"], event.get("text")) == ("message", "back again"), event
        event = next_presence_event(watcher)  # a close of its own is a leave at once
        assert (event["type"], event["user"]["id"]) == ("leave", first["user"]["id"])

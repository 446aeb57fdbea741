"""Honest recovery: history_end says whether a resume was complete, on both backends.

The first test runs in any mode; the others change the room in Redis behind the chat's back
(trimming, a lost stream, entries written by something else), so they need the local
stack's Redis."""
import os
import subprocess
import time

import pytest

from chat_client import BACKENDS, ChatClient, new_room
from local_redis import ADMIN_PASSWORD_FILE, REDIS_PORT, cli, password
from local_redis import admin as redis

OTHER = {"uwsgi": "flask", "flask": "uwsgi"}


def say_and_see(client, *texts):
    for text in texts:
        client.say(text)
    return client.messages(len(texts))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resume_within_the_stream_is_complete(backend):
    room = new_room()
    with ChatClient(backend, room, "writer") as writer:
        seen = say_and_see(writer, "one", "two")
        end = writer.history_end
        say_and_see(writer, "three")
    with ChatClient(OTHER[backend], room, "writer", last_id=seen[-1]["id"], epoch=end["epoch"]) as back:
        assert [m["text"] for m in back.history] == ["three"]
        assert back.history_end["recovered"] is True
        assert back.history_end["epoch"] == end["epoch"]
    with ChatClient(backend, room, "fresh") as fresh:  # not a resume: nothing to say about recovery
        assert "recovered" not in fresh.history_end


@pytest.mark.local
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resume_from_a_trimmed_message_is_not_complete(backend):
    room = new_room()
    with ChatClient(backend, room, "writer") as writer:
        seen = say_and_see(writer, "old 1", "old 2", "kept 1", "kept 2")
    redis("XTRIM", f"chat:{room}", "MAXLEN", "2")  # what CHAT_STREAM_MAXLEN does to a busy room
    with ChatClient(OTHER[backend], room, "writer", last_id=seen[0]["id"]) as back:
        # What is left is sent, but the client is told that "old 2" may be missing.
        assert [m["text"] for m in back.history] == ["kept 1", "kept 2"]
        assert back.history_end["recovered"] is False


@pytest.mark.local
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resume_after_the_room_was_lost_and_recreated_is_not_complete(backend):
    room = new_room()
    with ChatClient(backend, room, "writer") as writer:
        seen = say_and_see(writer, "before the loss")
        epoch = writer.history_end["epoch"]
    redis("DEL", f"chat:{room}", f"chat:{room}:epoch")  # a Redis restart without persistence, say
    with ChatClient(OTHER[backend], room, "other") as other:
        say_and_see(other, "after the loss")
        assert other.history_end["epoch"] != epoch
    with ChatClient(backend, room, "writer", last_id=seen[-1]["id"], epoch=epoch) as back:
        assert [m["text"] for m in back.history] == ["after the loss"]
        assert back.history_end["recovered"] is False


@pytest.mark.local
def test_an_old_epoch_makes_even_a_resume_from_the_start_incomplete():
    # A client that had seen no message (last_id 0-0) of a room whose data was then lost:
    # only the epoch can tell.
    room = new_room()
    with ChatClient("uwsgi", room, "early") as early:
        epoch = early.history_end["epoch"]
    redis("DEL", f"chat:{room}:epoch")
    with ChatClient("flask", room, "early", last_id="0-0", epoch=epoch) as back:
        assert back.history_end["recovered"] is False
    with ChatClient("flask", room, "early", last_id="0-0", epoch=back.history_end["epoch"]) as again:
        assert again.history_end["recovered"] is True


@pytest.mark.local
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resume_is_capped_at_the_newest_chat_resume_max_messages(backend):
    room = new_room()
    with ChatClient(backend, room, "writer") as writer:
        first = say_and_see(writer, "seen")[0]
    # 520 messages the client missed, written in one pipeline (faster than the rate limit allows).
    lines = "".join(f"XADD chat:{room} * user writer uid u-writer text missed-{i} via test\n" for i in range(520))
    assert cli(input=lines).returncode == 0
    with ChatClient(OTHER[backend], room, "writer", last_id=first["id"]) as back:
        # CHAT_RESUME_MAX (500): the newest ones, contiguous with what comes live.
        assert [m["text"] for m in back.history] == [f"missed-{i}" for i in range(20, 520)]
        assert back.history_end["recovered"] is False
        assert back.history_end["last_id"] == back.history[-1]["id"]
        back.say("live")
        assert back.messages(1)[0]["text"] == "live"


@pytest.mark.local
@pytest.mark.parametrize("backend", BACKENDS)
def test_entries_written_by_something_else_are_skipped_and_the_room_stays_live(backend):
    room = new_room()
    with ChatClient(backend, room, "reader") as reader, ChatClient(OTHER[backend], room, "writer") as writer:
        redis("XADD", f"chat:{room}", "*", "unrelated", "field")  # no user, uid, text, via
        redis("XADD", f"chat:{room}:events", "*", "type", "party")
        writer.say("still delivered")
        assert reader.messages(1)[0]["text"] == "still delivered"
        writer.say("and again")
        assert reader.messages(1)[0]["text"] == "and again"
    with ChatClient(backend, room, "late") as late:  # history skips it too
        assert [m["text"] for m in late.history] == ["still delivered", "and again"]


@pytest.mark.local
def test_the_resume_of_a_full_room_is_read_a_page_at_a_time():
    """The server never holds the whole stream for one connection: MONITOR shows the resume's
    reads as XREVRANGE/XRANGE calls of at most one page (100) each."""
    room = new_room()
    lines = "".join(f"XADD chat:{room} * user w uid u-w text m{i} via test\n" for i in range(450))
    assert cli(input=lines).returncode == 0
    monitor = subprocess.Popen(["redis-cli", "-p", str(REDIS_PORT), "--user", "admin", "--no-auth-warning", "MONITOR"],
                               stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, REDISCLI_AUTH=password(ADMIN_PASSWORD_FILE)))
    try:
        time.sleep(0.5)
        with ChatClient("uwsgi", room, "resumer", last_id="0-0") as back:
            assert len(back.history) == 450 and back.history_end["recovered"] is True  # nothing was ever trimmed
    finally:
        monitor.terminate()
        out, _ = monitor.communicate(timeout=10)
    reads = [line for line in out.splitlines() if f'"chat:{room}"' in line and ('"XRANGE"' in line or '"XREVRANGE"' in line)]
    counts = [int(line.rsplit('"COUNT" "', 1)[1].split('"')[0]) for line in reads if '"COUNT"' in line]
    assert reads and counts and max(counts) <= 100, reads


@pytest.mark.local
def test_every_key_of_a_room_expires_after_chat_room_ttl():
    room = new_room()
    with ChatClient("uwsgi", room, "passing") as client:
        say_and_see(client, "soon forgotten")
        keys = redis("KEYS", f"chat:{room}*").split()
        assert set(keys) >= {f"chat:{room}", f"chat:{room}:epoch", f"chat:{room}:events", f"chat:{room}:presence"}
        for key in keys:
            assert 0 < int(redis("TTL", key)) <= 604800, key  # CHAT_ROOM_TTL, refreshed by joins and messages

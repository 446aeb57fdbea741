"""Chat rooms on a Redis Streams backplane, shared by both apps (protocol: docs/chat.md).

Each room is one stream, `chat:<room>`, capped at CHAT_STREAM_MAXLEN entries; a message's id
is its stream entry id, so ids grow and every client sees the same order. A client that
reconnects with `last_id` gets exactly the entries after it, from whichever replica or
backend it lands on.

Per app process, one reader greenlet per room with local clients (Hub) blocks on XREAD and
hands each entry to the room's subscriptions; a connection never reads Redis for live
messages itself. A connection subscribes before it reads its history, and skips live entries
its history already had: nothing is missed, nothing arrives twice.

CHAT_HISTORY         messages sent on connect without last_id (default 50)
CHAT_STREAM_MAXLEN   messages Redis keeps per room (default 1000, approximate trimming)
REDIS_URL            the backplane
Read at import: a malformed value stops uWSGI at start-up (need-app).
"""
import json
import os
import re
import urllib.parse
from collections import deque

import gevent
import redis
from gevent.event import Event

from wsstack.settings import env_whole_number

ROOM = re.compile(r"[A-Za-z0-9_-]{1,64}")
STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
MAX_USER = 32
MAX_TEXT = 4096
READ_BLOCK_MS = 5000  # how long a room reader's XREAD waits; it rechecks for subscribers after
RANGE_PAGE = 500
BACKLOG = 1000  # live messages waiting for one slow connection before it is closed


HISTORY = env_whole_number("CHAT_HISTORY", "50", minimum=0)
STREAM_MAXLEN = env_whole_number("CHAT_STREAM_MAXLEN", "1000")


class InvalidParams(ValueError):
    """A chat URL the server refuses (400 at the handshake, or close 1008)."""


class Close(Exception):
    """End the connection with this close code and reason."""

    def __init__(self, code, reason):
        super().__init__(f"{code} {reason}")
        self.code, self.reason = code, reason


def backplane_down():
    return Close(1013, "chat backplane unavailable; reconnect later")


def parse_params(query_string):
    """(room, user, last_id or None) from the handshake's query string."""
    query = urllib.parse.parse_qs(query_string, keep_blank_values=True)
    for name, values in query.items():
        if len(values) > 1:
            raise InvalidParams(f"{name} given more than once")
    room = query.get("room", ["lobby"])[0]
    if not ROOM.fullmatch(room):
        raise InvalidParams("room must be 1-64 characters of A-Z a-z 0-9 _ -")
    user = query.get("user", [""])[0]
    if not 1 <= len(user) <= MAX_USER or not user.isprintable():
        raise InvalidParams(f"user is required: 1-{MAX_USER} printable characters")
    last_id = query.get("last_id", [None])[0]
    if last_id is not None and not STREAM_ID.fullmatch(last_id):
        raise InvalidParams("last_id must be a message id such as 1700000000000-0")
    return room, user, last_id


def id_key(message_id):
    ms, seq = message_id.split("-")
    return int(ms), int(seq)


def stream_key(room):
    return f"chat:{room}"


def message_json(room, entry_id, fields):
    entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    fields = {k.decode(): v.decode() for k, v in fields.items()}
    return entry_id, json.dumps({
        "type": "message", "id": entry_id, "room": room, "user": fields["user"], "text": fields["text"],
        "ts": id_key(entry_id)[0], "via": fields["via"],
    })


class Subscription:
    """One connection's share of a room: live messages (id, json) waiting to be sent."""

    def __init__(self, room):
        self.room = room
        self.pending = deque()
        self.wakeup = Event()
        self.failure = None

    def deliver(self, entry):
        if len(self.pending) >= BACKLOG:
            self.fail(Close(1008, "too slow: messages backed up"))
            return
        self.pending.append(entry)
        self.wakeup.set()

    def fail(self, close):
        self.failure = self.failure or close
        self.wakeup.set()


class Room:
    def __init__(self, name):
        self.name = name
        self.subscribers = set()
        self.started = Event()
        self.error = None


class Hub:
    """This process's room readers (one greenlet and one Redis connection per active room)."""

    def __init__(self, url):
        self.url = url
        self.redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self.rooms = {}

    def reader_connection(self, room):
        # A connection of its own, named so that `CLIENT LIST` shows which process reads which
        # room; its XREAD blocks for READ_BLOCK_MS, so the socket timeout must outlast that.
        return redis.Redis.from_url(
            self.url, single_connection_client=True, client_name=f"chat-reader:{room}:pid-{os.getpid()}",
            socket_timeout=READ_BLOCK_MS / 1000 + 5, socket_connect_timeout=2,
        )

    def subscribe(self, name):
        """A new subscription to the room; raises redis.RedisError when the backplane is down."""
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name)
            try:
                # Where the reader starts must be known before any subscriber reads its history:
                # an entry between the two would otherwise reach nobody.
                newest = self.redis.xrevrange(stream_key(name), count=1)
                start = newest[0][0] if newest else "0-0"
            except redis.RedisError as exc:
                room.error = exc
                del self.rooms[name]
                raise
            finally:
                room.started.set()
            gevent.spawn(self._read, room, start)
        else:
            room.started.wait()
            if room.error is not None:
                raise room.error
        subscription = Subscription(name)
        room.subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription):
        room = self.rooms.get(subscription.room)
        if room is not None:
            room.subscribers.discard(subscription)
        # The reader notices an empty room after its current XREAD and ends.

    def _read(self, room, last):
        connection = self.reader_connection(room.name)
        try:
            while room.subscribers:
                reply = connection.xread({stream_key(room.name): last}, count=RANGE_PAGE, block=READ_BLOCK_MS)
                for _stream, entries in reply or ():
                    for entry_id, fields in entries:
                        last = entry_id
                        entry = message_json(room.name, entry_id, fields)
                        for subscription in list(room.subscribers):
                            subscription.deliver(entry)
        except redis.RedisError:
            # Every connection of the room closes with 1013 and comes back with last_id; the
            # reader ends rather than retrying in a loop while Redis is away.
            for subscription in list(room.subscribers):
                subscription.fail(backplane_down())
        finally:
            if self.rooms.get(room.name) is room:
                del self.rooms[room.name]
            connection.close()

    def history(self, name, last_id):
        """[(id, json)] a connection starts with: the latest HISTORY, or everything after last_id."""
        key = stream_key(name)
        if last_id is None:
            entries = list(reversed(self.redis.xrevrange(key, count=HISTORY))) if HISTORY else []
            return [message_json(name, entry_id, fields) for entry_id, fields in entries]
        found, after = [], last_id
        while True:
            page = self.redis.xrange(key, min=f"({after}", count=RANGE_PAGE)
            found.extend(message_json(name, entry_id, fields) for entry_id, fields in page)
            if len(page) < RANGE_PAGE:
                return found
            after = found[-1][0]

    def publish(self, name, user, text, via):
        self.redis.xadd(stream_key(name), {"user": user, "text": text, "via": via},
                        maxlen=STREAM_MAXLEN, approximate=True)


def error_json(reason):
    return json.dumps({"type": "error", "reason": reason})


class Session:
    """One chat connection, independent of how its frames are read and written.

    start() -> the JSON texts to send first; incoming(payload, binary) -> an optional error
    text to send back; outgoing() -> live JSON texts to send. Each may raise Close.
    """

    def __init__(self, hub, room, user, last_id, via):
        self.hub, self.room, self.user, self.via = hub, room, user, via
        self.last_id = last_id
        self.subscription = None

    @property
    def wakeup(self):
        return self.subscription.wakeup

    def start(self):
        try:
            self.subscription = self.hub.subscribe(self.room)
            history = self.hub.history(self.room, self.last_id)
        except redis.RedisError:
            raise backplane_down() from None
        if history:
            self.last_id = history[-1][0]
        end = json.dumps({"type": "history_end", "last_id": self.last_id})
        return [text for _id, text in history] + [end]

    def outgoing(self):
        subscription = self.subscription
        subscription.wakeup.clear()
        if subscription.failure is not None:
            raise subscription.failure
        texts = []
        while subscription.pending:
            entry_id, text = subscription.pending.popleft()
            if self.last_id is not None and id_key(entry_id) <= id_key(self.last_id):
                continue  # already sent as history
            self.last_id = entry_id
            texts.append(text)
        return texts

    def incoming(self, payload, binary):
        if binary:
            raise Close(1003, "binary frames are not accepted: send JSON text")
        try:
            message = json.loads(payload)
        except ValueError:
            return error_json("not JSON: send {\"type\": \"message\", \"text\": \"...\"}")
        if not isinstance(message, dict) or message.get("type") != "message":
            return error_json("unknown message type: only \"message\" is accepted")
        text = message.get("text")
        if not isinstance(text, str) or not 1 <= len(text) <= MAX_TEXT:
            return error_json(f"text must be a string of 1-{MAX_TEXT} characters")
        try:
            self.hub.publish(self.room, self.user, text, self.via)
        except redis.RedisError:
            raise backplane_down() from None
        return None

    def end(self):
        if self.subscription is not None:
            self.hub.unsubscribe(self.subscription)

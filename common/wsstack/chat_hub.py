"""One app process's share of the chat: its rooms, one Redis reader for all of them, presence
heartbeats, and the caps that bound what one process and one client address can make it hold.

Per process, whatever the number of rooms and connections:
  - one reader greenlet on one Redis connection, blocked on a single XREAD over the message
    and presence streams of every room with local clients, plus a wake-up stream of its own
    (a room that becomes active adds an entry there, so the reader includes it at once);
  - one heartbeat greenlet refreshing the presence of this process's members every
    CHAT_PRESENCE_TTL / 3 seconds and removing members whose process stopped refreshing;
  - a connection pool of at most CHAT_REDIS_POOL_SIZE connections for everything else
    (publishing, history, presence); a command waits up to POOL_WAIT seconds for one.

CHAT_MAX_ROOMS_PER_PROCESS  rooms with local clients at once (default 1000); beyond: close 1013
CHAT_MAX_ROOMS_PER_CLIENT   rooms one client address has open in one process (default 10); beyond: close 1008
CHAT_SEND_BACKLOG           live messages waiting for one connection (default 256, at least 100); beyond: close 1013
CHAT_REDIS_POOL_SIZE        Redis connections per process besides the reader (default 20)
"""
import os
import secrets
import socket
import sys
import traceback
from collections import deque

import gevent
import redis
from gevent.event import Event

from wsstack import chat_store
from wsstack.chat_store import text
from wsstack.settings import env_whole_number

READ_BLOCK_MS = 5000  # the reader's XREAD timeout: how often it notices that its rooms emptied
POOL_WAIT = 5
WAKE_MAXLEN = 10

MAX_ROOMS_PER_PROCESS = env_whole_number("CHAT_MAX_ROOMS_PER_PROCESS", "1000")
MAX_ROOMS_PER_CLIENT = env_whole_number("CHAT_MAX_ROOMS_PER_CLIENT", "10")
# At least a page: the reader hands a connection up to chat_store.PAGE entries at once.
SEND_BACKLOG = env_whole_number("CHAT_SEND_BACKLOG", "256", minimum=chat_store.PAGE)
REDIS_POOL_SIZE = env_whole_number("CHAT_REDIS_POOL_SIZE", "20")


class Close(Exception):
    """End the connection with this close code and reason."""

    def __init__(self, code, reason):
        super().__init__(f"{code} {reason}")
        self.code, self.reason = code, reason


def backplane_down():
    return Close(1013, "chat backplane unavailable; reconnect later")


def too_slow():
    return Close(1013, f"too slow: {SEND_BACKLOG} messages waited for this connection; reconnect with last_id")


class Subscription:
    """One connection's share of a room: live entries waiting to be sent, each
    (stream id, json, whether it is a presence event)."""

    __slots__ = ("room", "client", "pending", "wakeup", "failure")

    def __init__(self, room, client):
        self.room, self.client = room, client
        self.pending = deque()
        self.wakeup = Event()
        self.failure = None

    def deliver(self, entry):
        if self.failure is not None:
            return
        if len(self.pending) >= SEND_BACKLOG:
            # One policy for both apps: the connection is closed (and resumes with last_id)
            # rather than the process holding an unbounded queue for a client that cannot keep up.
            self.pending.clear()
            self.fail(too_slow())
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
        self.members = {}  # this process's members: id -> [name, connections]
        self.ready = Event()  # set once `last` and `events_last` are known
        self.error = None
        self.last = self.events_last = "0-0"


class LazyRedis:
    """A redis.Redis made on first use. The apps are imported in uWSGI's master before it forks
    the workers, and a BlockingConnectionPool made there creates gevent's hub and its wake-up
    eventfd, which every worker would then share (see wsstack/startup_check.py: a stop signal
    can then wake the wrong worker). Made in the worker, each has its own pool too."""

    def __init__(self, make):
        self._make, self._client = make, None

    def __getattr__(self, name):
        if self._client is None:
            self._client = self._make()
        return getattr(self._client, name)


class Hub:
    def __init__(self, url, credentials=None):
        """`credentials`: redis-py options of the apps' Redis user (wsstack.settings.redis_credentials)."""
        self.url, self.credentials = url, credentials or {}
        self.redis = LazyRedis(lambda: redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
            url, max_connections=REDIS_POOL_SIZE, timeout=POOL_WAIT, socket_timeout=5, socket_connect_timeout=2,
            **self.credentials)))
        self.rooms = {}
        self.rooms_of_client = {}  # client address -> {room: connections}
        self.reader = None
        self.heart = None
        self._instance = None

    @property
    def instance(self):
        # Made on first use, in the worker: the app is imported before uWSGI forks them.
        if self._instance is None or not self._instance.endswith(f"-{os.getpid()}"):
            self._instance = f"{socket.gethostname()}-{secrets.token_hex(3)}-{os.getpid()}"
        return self._instance

    @property
    def wake_key(self):
        return f"chat-wake:{self.instance}"

    # -- rooms ------------------------------------------------------------------------

    def subscribe(self, name, client):
        """A subscription to room `name` for a connection from `client` (its address).
        Raises Close when a cap refuses it or Redis is down."""
        rooms = self.rooms_of_client.get(client, {})
        if name not in rooms and len(rooms) >= MAX_ROOMS_PER_CLIENT:
            raise Close(1008, f"too many rooms open from your address (at most {MAX_ROOMS_PER_CLIENT})")
        room = self.rooms.get(name)
        if room is None:
            if len(self.rooms) >= MAX_ROOMS_PER_PROCESS:
                raise Close(1013, "this server has too many active rooms; try again later")
            room = self.rooms[name] = Room(name)
            try:
                # Where the reader starts must be known before any subscriber reads its
                # history: an entry between the two would otherwise reach nobody.
                room.last, room.events_last = chat_store.newest_ids(self.redis, name)
                self._wake_reader()
            except redis.RedisError as exc:
                room.error = exc
                if self.rooms.get(name) is room:
                    del self.rooms[name]
                raise backplane_down() from None
            finally:
                room.ready.set()
        else:
            room.ready.wait()
            if room.error is not None:
                raise backplane_down()
            self._start_greenlets()
        subscription = Subscription(name, client)
        room.subscribers.add(subscription)
        rooms = self.rooms_of_client.setdefault(client, {})
        rooms[name] = rooms.get(name, 0) + 1
        return subscription

    def unsubscribe(self, subscription):
        room = self.rooms.get(subscription.room)
        if room is not None:
            room.subscribers.discard(subscription)
            if not room.subscribers and not room.members:
                del self.rooms[room.name]  # the reader leaves it out from its next XREAD
        rooms = self.rooms_of_client.get(subscription.client)
        if rooms is not None:
            rooms[subscription.room] -= 1
            if not rooms[subscription.room]:
                del rooms[subscription.room]
            if not rooms:
                del self.rooms_of_client[subscription.client]

    # -- presence ---------------------------------------------------------------------

    def member_joined(self, subscription, identity):
        room = self.rooms.get(subscription.room)
        if room is not None:  # else the reader failed meanwhile, and the connection is closing
            entry = room.members.setdefault(identity.id, [identity.name, 0])
            entry[1] += 1
        chat_store.join(self.redis, subscription.room, identity)

    def member_left(self, subscription, identity, coming_back=False):
        room = self.rooms.get(subscription.room)
        if room is not None:
            entry = room.members.get(identity.id)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del room.members[identity.id]
        chat_store.leave(self.redis, subscription.room, identity, coming_back)

    def _beat(self):
        while self.rooms:
            gevent.sleep(chat_store.PRESENCE_TTL / 3)
            for room in list(self.rooms.values()):
                try:
                    chat_store.heartbeat(self.redis, room.name, {k: tuple(v) for k, v in room.members.items()})
                    chat_store.sweep(self.redis, room.name)
                except redis.RedisError as exc:
                    # The reader fails the room's connections; presence resumes with Redis.
                    print(f"chat: presence heartbeat of room {room.name}: {exc}", file=sys.stderr, flush=True)
        self.heart = None

    # -- the reader -------------------------------------------------------------------

    def _start_greenlets(self):
        """True when the reader had to be started (it then reads every room's current ids)."""
        if self.heart is None:
            self.heart = gevent.spawn(self._beat)
        if self.reader is None:
            self.reader = gevent.spawn(self._read)
            return True
        return False

    def _wake_reader(self):
        if self._start_greenlets():
            return
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self.wake_key, {"room": "added"}, maxlen=WAKE_MAXLEN, approximate=False)
            pipe.expire(self.wake_key, 3600)
            pipe.execute()

    def _read(self):
        connection = redis.Redis.from_url(
            self.url, single_connection_client=True, client_name=f"chat-reader:{self.instance}",
            socket_timeout=READ_BLOCK_MS / 1000 + 5, socket_connect_timeout=2, **self.credentials,
        )
        wake_last = "0-0"
        try:
            while self.rooms:
                streams = {self.wake_key: wake_last}
                for room in list(self.rooms.values()):
                    if room.ready.is_set() and room.error is None:
                        streams[chat_store.messages_key(room.name)] = room.last
                        streams[chat_store.events_key(room.name)] = room.events_last
                reply = connection.xread(streams, count=chat_store.PAGE, block=READ_BLOCK_MS)
                for key, entries in reply or ():
                    key = text(key)
                    if key == self.wake_key:
                        wake_last = text(entries[-1][0])
                    else:
                        self._dispatch(key, entries)
        except redis.RedisError:
            # Every chat connection of this process closes with 1013 and comes back with
            # last_id; the reader ends rather than retrying in a loop while Redis is away.
            self._fail_all(backplane_down())
        except Exception:  # a bug must not leave the rooms' connections waiting forever
            traceback.print_exc()
            self._fail_all(Close(1011, "chat reader failed; reconnect"))
        finally:
            self.reader = None
            connection.close()

    def _dispatch(self, key, entries):
        events = key.endswith(":events")
        name = key[len("chat:"):-len(":events")] if events else key[len("chat:"):]
        room = self.rooms.get(name)
        if room is None:
            return
        for entry_id, fields in entries:
            try:
                if events:
                    room.events_last = text(entry_id)
                    entry = (*chat_store.event_json(name, entry_id, fields), True)
                else:
                    room.last = text(entry_id)
                    entry = (*chat_store.message_json(name, entry_id, fields), False)
            except chat_store.BadEntry as exc:
                # Something else wrote to the room's stream: skip the entry, keep the room alive.
                print(f"chat: skipped {exc}", file=sys.stderr, flush=True)
                continue
            for subscription in list(room.subscribers):
                subscription.deliver(entry)

    def _fail_all(self, close):
        # The rooms go with their connections: a later connection starts afresh from Redis.
        rooms, self.rooms = list(self.rooms.values()), {}
        for room in rooms:
            for subscription in list(room.subscribers):
                subscription.fail(close)

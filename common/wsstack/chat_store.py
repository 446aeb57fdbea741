"""The chat's data in Redis: one room's keys, publishing, bounded history, epochs, presence.

Keys of room R (R is [A-Za-z0-9_-], so no key of one room is a key of another):
  chat:R           stream of messages (user, uid, text, via), ~CHAT_STREAM_MAXLEN entries
  chat:R:epoch     random id made when the room's data is (re)created: a client that saw
                   another epoch cannot have a complete history here
  chat:R:events    stream of presence events (join, leave), ~EVENTS_MAXLEN entries
  chat:R:presence  sorted set: member id -> Unix time (ms) its presence expires
  chat:R:names     hash: member id -> display name
  chat:R:tabs      hash: member id -> open connections, over every process
Every key expires CHAT_ROOM_TTL seconds after the room was last joined or written to.

No Lua: the apps' Redis user may not run scripts (docs/operations.md). Where two commands
must not interleave with another process's, a single command decides (SET NX GET, ZADD GT,
ZREM's count), so exactly one process announces a join or a leave.
"""
import json
import secrets
import time

import redis as redis_py

from wsstack.settings import env_whole_number

PAGE = 100  # entries per XRANGE/XREVRANGE: what one connection holds while it reads history
EVENTS_MAXLEN = 200
MAX_ID_PART = 2**64 - 1
MAX_ID = f"{MAX_ID_PART}-{MAX_ID_PART}"

HISTORY = env_whole_number("CHAT_HISTORY", "50", minimum=0)
RESUME_MAX = env_whole_number("CHAT_RESUME_MAX", "500")
STREAM_MAXLEN = env_whole_number("CHAT_STREAM_MAXLEN", "1000")
ROOM_TTL = env_whole_number("CHAT_ROOM_TTL", "604800", minimum=60)
PRESENCE_TTL = env_whole_number("CHAT_PRESENCE_TTL", "15", minimum=3)
PRESENCE_MAX = env_whole_number("CHAT_PRESENCE_MAX", "100")
if HISTORY > RESUME_MAX:
    raise ValueError(f"CHAT_HISTORY ({HISTORY}) must not exceed CHAT_RESUME_MAX ({RESUME_MAX})")


def messages_key(room):
    return f"chat:{room}"


def events_key(room):
    return f"chat:{room}:events"


def room_keys(room):
    return [messages_key(room), events_key(room)] + [f"chat:{room}:{part}" for part in ("epoch", "presence", "names", "tabs")]


def id_key(message_id):
    ms, seq = message_id.split("-")
    return int(ms), int(seq)


def text(value):
    return value.decode() if isinstance(value, bytes) else value


class BadEntry(ValueError):
    """A stream entry this chat did not write (fields missing or not text)."""


def message_json(room, entry_id, fields):
    entry_id = text(entry_id)
    try:
        user, uid, body, via = (fields[name].decode() for name in (b"user", b"uid", b"text", b"via"))
    except (KeyError, UnicodeDecodeError, AttributeError):
        raise BadEntry(f"{messages_key(room)} {entry_id}: not a chat message: fields {sorted(map(text, fields))}") from None
    return entry_id, json.dumps({
        "type": "message", "id": entry_id, "room": room, "user": user, "uid": uid, "text": body,
        "ts": id_key(entry_id)[0], "via": via,
    }, ensure_ascii=False)


def event_json(room, entry_id, fields):
    """(entry id, json) of a presence event."""
    try:
        kind, uid, name = (fields[name].decode() for name in (b"type", b"uid", b"name"))
    except (KeyError, UnicodeDecodeError, AttributeError):
        raise BadEntry(f"{events_key(room)} {text(entry_id)}: not a presence event") from None
    if kind not in ("join", "leave"):
        raise BadEntry(f"{events_key(room)} {text(entry_id)}: unknown event {kind!r}")
    return text(entry_id), json.dumps({"type": kind, "room": room, "user": {"id": uid, "name": name}},
                                      ensure_ascii=False)


def newest_ids(redis, room):
    """Where a reader of the room starts: the newest message and event ids ("0-0" if none)."""
    with redis.pipeline(transaction=False) as pipe:
        pipe.xrevrange(messages_key(room), count=1)
        pipe.xrevrange(events_key(room), count=1)
        replies = pipe.execute()
    return [text(reply[0][0]) if reply else "0-0" for reply in replies]


def publish(redis, room, identity, body, via):
    with redis.pipeline(transaction=False) as pipe:
        pipe.set(f"chat:{room}:epoch", secrets.token_hex(8), nx=True, ex=ROOM_TTL)
        pipe.xadd(messages_key(room), {"user": identity.name, "uid": identity.id, "text": body, "via": via},
                  maxlen=STREAM_MAXLEN, approximate=True)
        for key in room_keys(room):
            pipe.expire(key, ROOM_TTL)
        pipe.execute()


def current_epoch(redis, room):
    """The room's epoch, made now if the room has none (first use, or its data was lost)."""
    candidate = secrets.token_hex(8)
    existing = redis.set(f"chat:{room}:epoch", candidate, nx=True, get=True, ex=ROOM_TTL)
    return candidate if existing is None else text(existing)


def _walk_back(redis, key, lower, limit):
    """Find where the newest `limit` entries above `lower` start, one page in memory at a
    time. Returns (start id, newest id, the single page if everything fit in one, truncated)."""
    upper, taken, start, newest, only_page = "+", 0, None, None, None
    while taken < limit:
        wanted = min(PAGE, limit - taken)
        page = redis.xrevrange(key, max=upper, min=lower, count=wanted)
        if not page:
            break
        if newest is None:
            newest = text(page[0][0])
            only_page = page
        else:
            only_page = None
        taken += len(page)
        start = text(page[-1][0])
        if len(page) < wanted:
            return start, newest, only_page, False
        upper = f"({start}"
    if start is None:
        return None, None, None, False
    truncated = taken >= limit and bool(redis.xrevrange(key, max=f"({start}", min=lower, count=1))
    return start, newest, only_page, truncated


def history(redis, room, last_id, limit):
    """Yield the (id, json) of the room's messages a connection starts with: the newest
    `limit` after last_id (or overall), oldest first, read and handed over a page at a time.
    Returns (its generator's value) whether more than `limit` were there."""
    key = messages_key(room)
    if last_id == MAX_ID:
        return False  # nothing can come after it (and Redis refuses it as an exclusive bound)
    lower = "-" if last_id is None else f"({last_id}"
    start, newest, only_page, truncated = _walk_back(redis, key, lower, limit)
    if start is None:
        return False
    if only_page is not None:
        for entry_id, fields in reversed(only_page):
            yield from _message_or_nothing(room, entry_id, fields)
        return truncated
    lower_bound = start
    while True:
        page = redis.xrange(key, min=lower_bound, max=newest, count=PAGE)
        for entry_id, fields in page:
            yield from _message_or_nothing(room, entry_id, fields)
        if len(page) < PAGE:
            return truncated
        lower_bound = f"({text(page[-1][0])}"


def _message_or_nothing(room, entry_id, fields):
    try:
        yield message_json(room, entry_id, fields)
    except BadEntry as exc:
        print(f"chat: skipped {exc}", flush=True)


def still_has(redis, room, last_id):
    """Whether the client's last message is still in the stream: then everything after it is
    too (streams are trimmed from the oldest end only). For last_id 0-0 (the client had none):
    whether nothing was ever removed from the stream."""
    key = messages_key(room)
    if last_id == "0-0":
        try:
            info = redis.xinfo_stream(key)
        except redis_py.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return True  # an empty room
            raise
        return info["entries-added"] == info["length"]
    return bool(redis.xrange(key, min=last_id, max=last_id, count=1))


# -- presence -------------------------------------------------------------------------------

def presence_expiry_ms():
    return int((time.time() + PRESENCE_TTL) * 1000)


def announce(pipe, room, kind, identity_id, name):
    pipe.xadd(events_key(room), {"type": kind, "uid": identity_id, "name": name}, maxlen=EVENTS_MAXLEN, approximate=True)


def announced(members_after):
    """Whether joins and leaves are announced in a room of this many members. Beyond
    PRESENCE_MAX they are not: each would be a message to every member, so a room of N
    members reconnecting after a deploy would cost N x N messages. The list on connect still
    shows PRESENCE_MAX members and the count (Pusher caps presence rooms at 100 members)."""
    return members_after <= PRESENCE_MAX


def join(redis, room, identity):
    """Count one more connection of the member; announce the member if it was not present."""
    with redis.pipeline(transaction=False) as pipe:
        pipe.hincrby(f"chat:{room}:tabs", identity.id, 1)
        pipe.hset(f"chat:{room}:names", identity.id, identity.name)
        pipe.zadd(f"chat:{room}:presence", {identity.id: presence_expiry_ms()}, gt=True)
        pipe.zcard(f"chat:{room}:presence")
        for key in room_keys(room):
            pipe.expire(key, ROOM_TTL)
        replies = pipe.execute()
    if replies[2] and announced(replies[3]):
        with redis.pipeline(transaction=False) as pipe:
            announce(pipe, room, "join", identity.id, identity.name)
            pipe.execute()


def leave(redis, room, identity, coming_back=False):
    """One connection of the member fewer; the last one anywhere announces its leave, unless
    it is `coming_back` (it was closed to reconnect): then its presence is left to expire, and
    a reconnect within CHAT_PRESENCE_TTL is no leave and no join for the others."""
    if redis.hincrby(f"chat:{room}:tabs", identity.id, -1) > 0 or coming_back:
        return
    remove_member(redis, room, identity.id, identity.name)


def remove_member(redis, room, member_id, name=None):
    if not redis.zrem(f"chat:{room}:presence", member_id):
        return  # another process removed it first, and announced it
    if name is None:
        name = text(redis.hget(f"chat:{room}:names", member_id) or b"")
    with redis.pipeline(transaction=False) as pipe:
        pipe.hdel(f"chat:{room}:tabs", member_id)
        pipe.hdel(f"chat:{room}:names", member_id)
        pipe.zcard(f"chat:{room}:presence")
        remaining = pipe.execute()[2]
    if announced(remaining + 1):
        with redis.pipeline(transaction=False) as pipe:
            announce(pipe, room, "leave", member_id, name)
            pipe.execute()


def heartbeat(redis, room, members):
    """Keep this process's members of the room present; re-announce any that a sweep removed
    (this process was too slow to refresh them in time). `members`: {id: (name, connections)}."""
    if not members:
        return
    expiry = presence_expiry_ms()
    with redis.pipeline(transaction=False) as pipe:
        for member_id in members:
            pipe.zadd(f"chat:{room}:presence", {member_id: expiry}, gt=True)
        added = pipe.execute()
    returned = [member_id for member_id, new in zip(members, added) if new]
    if returned:
        loud = announced(redis.zcard(f"chat:{room}:presence"))
        with redis.pipeline(transaction=False) as pipe:
            for member_id in returned:
                name, connections = members[member_id]
                pipe.hset(f"chat:{room}:names", member_id, name)
                pipe.hincrby(f"chat:{room}:tabs", member_id, connections)
                if loud:
                    announce(pipe, room, "join", member_id, name)
            pipe.execute()


def sweep(redis, room):
    """Remove members whose presence expired (their process stopped refreshing them: it
    crashed or lost Redis), announcing each leave once."""
    now_ms = int(time.time() * 1000)
    for member_id in redis.zrangebyscore(f"chat:{room}:presence", "-inf", now_ms, start=0, num=PAGE):
        remove_member(redis, room, text(member_id))


def members(redis, room):
    """(up to PRESENCE_MAX members as [{"id", "name"}], how many are present in all, the id
    of the last presence event the snapshot includes). One MULTI: the three agree."""
    now_ms = int(time.time() * 1000)
    key = f"chat:{room}:presence"
    with redis.pipeline(transaction=True) as pipe:
        pipe.zrangebyscore(key, now_ms, "+inf", start=0, num=PRESENCE_MAX)
        pipe.zcount(key, now_ms, "+inf")
        pipe.xrevrange(events_key(room), count=1)
        ids, count, last_event = pipe.execute()
    ids = [text(member_id) for member_id in ids]
    names = redis.hmget(f"chat:{room}:names", ids) if ids else []
    return ([{"id": member_id, "name": text(name or b"")} for member_id, name in zip(ids, names)], count,
            text(last_event[0][0]) if last_event else "0-0")

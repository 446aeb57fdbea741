"""The chat protocol, shared by every backend (docs/chat.md): who may connect, what a
connection is sent first, what it may send, and when it is closed. The backends only move
frames: admit() runs before their upgrade, then a Session per connection.

Redis holds the data (wsstack.chat_store); each process's share of it, with its reader and
its caps, is a wsstack.chat_hub.Hub.

CHAT_MAX_FRAME_BYTES  largest message a chat client may send, in bytes on the wire (default
                      16384; the echo's limit, UWSGI_WEBSOCKETS_MAX_SIZE, is far larger); beyond: close 1009
CHAT_MAX_TEXT_BYTES   largest message text, in bytes of UTF-8 (default 4096)
CHAT_RECONNECT_WINDOW_MS  the window over which clients spread their reconnects after a
                      server stop (1001) or a lost connection: each waits a random delay in
                      it first (full jitter); sent in history_end (default 5000)
Read at import: a malformed value stops uWSGI at start-up (need-app).
"""
import json
import re
import time
import urllib.parse
from typing import NamedTuple

import redis

from wsstack import auth, chat_store, http
from wsstack.chat_hub import Close, Hub, backplane_down  # noqa: F401 (the apps use them from here)
from wsstack.settings import env_whole_number

ROOM = re.compile(r"[A-Za-z0-9_-]{1,64}")
STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
EPOCH = re.compile(r"[0-9a-f]{1,32}")

MAX_FRAME_BYTES = env_whole_number("CHAT_MAX_FRAME_BYTES", "16384", minimum=256)
MAX_TEXT_BYTES = env_whole_number("CHAT_MAX_TEXT_BYTES", "4096")
RECONNECT_WINDOW_MS = env_whole_number("CHAT_RECONNECT_WINDOW_MS", "5000", minimum=0)
if MAX_TEXT_BYTES >= MAX_FRAME_BYTES:
    raise ValueError(f"CHAT_MAX_TEXT_BYTES ({MAX_TEXT_BYTES}) must be below CHAT_MAX_FRAME_BYTES ({MAX_FRAME_BYTES})")


# Close codes after which a client reconnects at once (Session.end).
COMING_BACK = (1001, auth.TOKEN_EXPIRED_CODE)


class InvalidParams(ValueError):
    """A chat URL the server refuses (400 at the handshake)."""


class Admission(NamedTuple):
    room: str
    last_id: str  # or None: a new client
    epoch: str  # or None
    identity: auth.Identity
    client: str  # the client's address, for the per-address cap


def valid_stream_id(value):
    match = STREAM_ID.fullmatch(value)
    return bool(match) and all(int(part) <= chat_store.MAX_ID_PART for part in match.groups())


def parse_params(query_string):
    """(room, last_id or None, epoch or None) from the handshake's query string."""
    query = urllib.parse.parse_qs(query_string, keep_blank_values=True)
    for name, values in query.items():
        if len(values) > 1:
            raise InvalidParams(f"{name} given more than once")
    room = query.get("room", ["lobby"])[0]
    if not ROOM.fullmatch(room):
        raise InvalidParams("room must be 1-64 characters of A-Z a-z 0-9 _ -")
    last_id = query.get("last_id", [None])[0]
    if last_id is not None and not valid_stream_id(last_id):
        raise InvalidParams("last_id must be a message id such as 1700000000000-0 (two numbers below 2^64)")
    epoch = query.get("epoch", [None])[0]
    if epoch is not None and (last_id is None or not EPOCH.fullmatch(epoch)):
        raise InvalidParams("epoch goes with last_id: the epoch of the history_end that last_id came with")
    if "user" in query:
        raise InvalidParams("user is not a parameter: the name comes from the token")
    return room, last_id, epoch


def client_address(environ):
    # nginx, the only way in, sets X-Real-IP to the address it saw.
    return environ.get("HTTP_X_REAL_IP") or environ.get("REMOTE_ADDR", "")


def admit(verifier, environ):
    """The Admission of a chat handshake, or raises Refused: every check that can answer with
    an HTTP status runs here, before the upgrade, on both backends."""
    try:
        room, last_id, epoch = parse_params(environ.get("QUERY_STRING", ""))
    except InvalidParams as exc:
        raise Refused("chat_params", http.bad_handshake(str(exc))) from None
    try:
        identity = verifier.verify(auth.token_from_handshake(environ))
    except auth.Unauthorized as exc:
        raise Refused("unauthorized", http.unauthorized(str(exc))) from None
    except redis.RedisError:  # the shared secret lives in Redis (auth.SharedSecret)
        raise Refused("backplane", http.unavailable("chat backplane unavailable; retry later")) from None
    environ["wsstack.subprotocol"] = auth.SUBPROTOCOL
    environ["wsstack.max_message_bytes"] = MAX_FRAME_BYTES
    return Admission(room, last_id, epoch, identity, client_address(environ))


class Refused(Exception):
    def __init__(self, reason, answer):
        super().__init__(reason)
        self.reason, self.answer = reason, answer


ADMISSION = "wsstack.chat.admission"


def handshake_check(verifier):
    """The backends' hook before the upgrade: environ -> None (the Admission is left in
    environ[ADMISSION]) or (reason, answer) to refuse with."""
    def check(environ):
        try:
            environ[ADMISSION] = admit(verifier, environ)
        except Refused as refused:
            return refused.reason, refused.answer
        return None
    return check


def error_json(reason):
    return json.dumps({"type": "error", "reason": reason})


class Session:
    """One chat connection, independent of how its frames are read and written.

    start() -> an iterator of the texts to send first (history a page at a time, then
    history_end and presence); incoming(payload, binary) -> an optional error text to send
    back; outgoing() -> live texts to send; wait_timeout(longest) -> how long the backend may
    wait before calling outgoing() again. Each may raise Close.
    """

    def __init__(self, hub, admission, via):
        self.hub, self.via = hub, via
        self.room, self.identity = admission.room, admission.identity
        self.resume_from, self.client_epoch, self.client = admission.last_id, admission.epoch, admission.client
        self.last_id = admission.last_id
        self.subscription = None
        self.joined = False
        self.presence_last = None  # the last presence event the snapshot sent on connect had

    @property
    def wakeup(self):
        return self.subscription.wakeup

    def start(self):
        self.check_expiry()
        self.subscription = self.hub.subscribe(self.room, self.client)
        try:
            yield from self._history()
            self.hub.member_joined(self.subscription, self.identity)
            self.joined = True
            members, count, self.presence_last = chat_store.members(self.hub.redis, self.room)
        except redis.RedisError:
            raise backplane_down() from None
        yield json.dumps({"type": "presence", "room": self.room, "members": members, "count": count},
                         ensure_ascii=False)

    def _history(self):
        redis_ = self.hub.redis
        epoch = chat_store.current_epoch(redis_, self.room)
        resuming = self.resume_from is not None
        limit = chat_store.RESUME_MAX if resuming else chat_store.HISTORY
        # Checked before the history is read: a trim meanwhile can only make this pessimistic.
        intact = resuming and (self.client_epoch in (None, epoch)) and chat_store.still_has(redis_, self.room, self.resume_from)
        truncated = False
        if limit:
            history = chat_store.history(redis_, self.room, self.resume_from, limit)
            while True:
                try:
                    entry_id, text = next(history)
                except StopIteration as done:
                    truncated = done.value
                    break
                self.last_id = entry_id
                yield text
        end = {"type": "history_end", "last_id": self.last_id, "epoch": epoch,
               "reconnect_window_ms": RECONNECT_WINDOW_MS}
        if resuming:
            end["recovered"] = bool(intact and not truncated)
        yield json.dumps(end)

    def check_expiry(self):
        if time.time() >= self.identity.expires:
            raise Close(auth.TOKEN_EXPIRED_CODE, auth.TOKEN_EXPIRED_REASON)

    def wait_timeout(self, longest):
        return max(0.0, min(longest, self.identity.expires - time.time()))

    def outgoing(self):
        self.check_expiry()
        subscription = self.subscription
        subscription.wakeup.clear()
        if subscription.failure is not None:
            raise subscription.failure
        texts = []
        while subscription.pending:
            entry_id, text, event = subscription.pending.popleft()
            if event:
                if self.presence_last is None or not self._after(entry_id, self.presence_last):
                    continue  # before or in the presence snapshot this connection got
            elif self.last_id is not None and not self._after(entry_id, self.last_id):
                continue  # already sent as history
            else:
                self.last_id = entry_id
            texts.append(text)
        return texts

    @staticmethod
    def _after(entry_id, previous):
        return chat_store.id_key(entry_id) > chat_store.id_key(previous)

    def incoming(self, payload, binary):
        if binary:
            raise Close(1003, "binary frames are not accepted: send JSON text")
        if len(payload) > MAX_FRAME_BYTES:
            raise Close(1009, f"chat messages are limited to {MAX_FRAME_BYTES} bytes")
        self.check_expiry()
        try:
            message = json.loads(payload)
        except ValueError:
            return error_json("not JSON: send {\"type\": \"message\", \"text\": \"...\"}")
        if not isinstance(message, dict) or message.get("type") != "message":
            return error_json("unknown message type: only \"message\" is accepted")
        text = message.get("text")
        if not isinstance(text, str) or not text:
            return error_json("text must be a non-empty string")
        if not auth.encodable(text):
            return error_json("text is not valid Unicode (a lone surrogate escape)")
        if len(text.encode("utf-8")) > MAX_TEXT_BYTES:
            return error_json(f"text must be at most {MAX_TEXT_BYTES} bytes of UTF-8")
        try:
            chat_store.publish(self.hub.redis, self.room, self.identity, text, self.via)
        except redis.RedisError:
            raise backplane_down() from None
        return None

    def end(self, close_status=None):
        """`close_status`: the backend's (code, sent by the peer) of the first close frame, or
        None. After the server's 1001 (it stops) or 4001 (the token expired) the client comes
        right back: its leave is left to presence expiry, so that the others see no leave and
        join for a deploy or a token renewal."""
        if self.subscription is None:
            return
        coming_back = close_status is not None and not close_status[1] and close_status[0] in COMING_BACK
        try:
            if self.joined:
                self.hub.member_left(self.subscription, self.identity, coming_back)
        except redis.RedisError:
            pass  # its presence expires by itself within CHAT_PRESENCE_TTL
        finally:
            self.hub.unsubscribe(self.subscription)

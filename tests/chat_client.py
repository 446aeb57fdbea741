"""A chat client for the tests: gets its token from the demo issuer, reads its history and
the presence list on connect, then messages on demand."""
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import stack
from stack import ws_url
from wsstack.rawws import RawWebSocket

BACKENDS = ("uwsgi", "flask")
NO_CLIENT_PINGS = {"ping_interval": None}
SUBPROTOCOL = "wsstack.chat.v1"  # wsstack.auth.SUBPROTOCOL (the tests image has no PyJWT-free copy)

_tokens = {}


def new_room():
    return f"t-{uuid.uuid4().hex[:12]}"


def request_token(name, ttl=None, renew=None, timeout=60):
    """(status, document or text) from POST /auth/token; waits out nginx's rate limit (429)."""
    body = {"name": name} if ttl is None else {"name": name, "ttl": ttl}
    headers = {"Content-Type": "application/json"}
    if renew:
        headers["Authorization"] = f"Bearer {renew}"
    deadline = time.monotonic() + timeout
    while True:
        request = urllib.request.Request(f"{stack.BASE_URL}/auth/token", data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code == 429 and time.monotonic() < deadline:
                time.sleep(1)
                continue
            return error.code, error.read().decode()


def token(name, ttl=None, fresh=False):
    """A token for `name` (one per name for the whole run, unless fresh or with a ttl)."""
    if fresh or ttl is not None or name not in _tokens:
        status, document = request_token(name, ttl)
        assert status == 200, (status, document)
        if fresh or ttl is not None:
            return document
        _tokens[name] = document
    return _tokens[name]


def protocols(token_text):
    return [SUBPROTOCOL, f"bearer.{token_text}"]


def protocol_header(token_text):
    return {"Sec-WebSocket-Protocol": ", ".join(protocols(token_text))}


def raw_chat(backend, room, user, url=None, token_document=None, **query):
    """A RawWebSocket to the chat with `user`'s token (for frames the websockets client will not send)."""
    document = token_document or token(user)
    return RawWebSocket(url or chat_url(backend, room, **query), headers=protocol_header(document["token"]))


def chat_url(backend, room, last_id=None, epoch=None, **extra):
    query = {"room": room, **extra}
    if last_id is not None:
        query["last_id"] = last_id
    if epoch is not None:
        query["epoch"] = epoch
    return f"{ws_url(backend, 'chat')}?{urllib.parse.urlencode(query)}"


class ChatClient:
    """A chat connection that reads its history up to history_end, and the presence list
    after it, on entry."""

    def __init__(self, backend, room, user, last_id=None, url=None, token_document=None, epoch=None):
        self.backend, self.room, self.user = backend, room, user
        document = token_document or token(user)
        self.uid = document["user"]["id"]
        self.connection = connect(url or chat_url(backend, room, last_id, epoch),
                                  subprotocols=protocols(document["token"]), **NO_CLIENT_PINGS)
        self.ws = self.connection.__enter__()
        self.history = []
        while True:
            event = self.next_event()
            if event["type"] == "history_end":
                self.history_end = event
                break
            assert event["type"] == "message", event
            self.history.append(event)
        self.presence = self.next_event()
        assert self.presence["type"] == "presence", self.presence

    def next_event(self, timeout=10):
        return json.loads(self.ws.recv(timeout=timeout))

    def next_of(self, types, timeout=10):
        """The next event of one of `types`, skipping the others (presence events, say)."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.next_event(max(0.01, deadline - time.monotonic()))
            if event["type"] in types:
                return event

    def close_reason(self, code, timeout=15):
        """Reads until the server closes (messages already on their way may come first), checks
        that it closed with `code`, and returns the close reason."""
        try:
            while True:
                self.next_event(timeout=timeout)
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "closed without a close frame"
            assert closed.rcvd.code == code, closed.rcvd
            return closed.rcvd.reason

    def say(self, text):
        self.ws.send(json.dumps({"type": "message", "text": text}))

    def messages(self, count, timeout=10):
        """The next `count` messages; presence events (join, leave) in between are skipped."""
        found = []
        while len(found) < count:
            event = self.next_event(timeout)
            if event["type"] in ("join", "leave"):
                continue
            assert event["type"] == "message", event
            found.append(event)
        return found

    def close(self):
        self.connection.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

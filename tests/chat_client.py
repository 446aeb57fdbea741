"""A chat client for the tests: reads its history on connect, then messages on demand."""
import json
import urllib.parse
import uuid

from websockets.sync.client import connect

from stack import ws_url

BACKENDS = ("uwsgi", "flask")
NO_CLIENT_PINGS = {"ping_interval": None}


def new_room():
    return f"t-{uuid.uuid4().hex[:12]}"


def chat_url(backend, room, user, last_id=None, **extra):
    query = {"room": room, "user": user, **extra}
    if last_id is not None:
        query["last_id"] = last_id
    return f"{ws_url(backend, 'chat')}?{urllib.parse.urlencode(query)}"


class ChatClient:
    """A chat connection that reads its history up to history_end on entry."""

    def __init__(self, backend, room, user, last_id=None, url=None):
        self.backend, self.room, self.user = backend, room, user
        self.connection = connect(url or chat_url(backend, room, user, last_id), **NO_CLIENT_PINGS)
        self.ws = self.connection.__enter__()
        self.history = []
        while True:
            event = self.next_event()
            if event["type"] == "history_end":
                self.history_end = event
                break
            assert event["type"] == "message", event
            self.history.append(event)

    def next_event(self, timeout=10):
        return json.loads(self.ws.recv(timeout=timeout))

    def say(self, text):
        self.ws.send(json.dumps({"type": "message", "text": text}))

    def messages(self, count, timeout=10):
        found = []
        while len(found) < count:
            event = self.next_event(timeout)
            assert event["type"] == "message", event
            found.append(event)
        return found

    def close(self):
        self.connection.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

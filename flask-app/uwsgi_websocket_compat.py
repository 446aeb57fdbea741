"""Make Flask-uWSGI-WebSocket 0.6.1 (its last release, 2018) work on today's stack.

Import this module instead of flask_uwsgi_websocket; app code keeps the package's
API (`ws = GeventWebSocket(app)`, `@ws.route(...)`, `client.receive()/send()`).
Each fix names the upstream problem it works around; tests/test_flask_compat.py
shows each one is needed by running without it.

1. FLASK3_SETUPMETHOD  the package does `from flask.app import setupmethod`;
   Flask 3 moved it to flask.sansio.scaffold -> ImportError on import.
2. PY311_ASYNCIO       its optional asyncio flavour uses `@asyncio.coroutine`,
   removed in Python 3.11 -> AttributeError on import (not caught by the package,
   which only expects ImportError). We never use that flavour, so we make its
   import fail the way the package already handles.
3. WERKZEUG_WS_RULES   Werkzeug >= 2 matches a WebSocket request only against
   Rule(websocket=True); the package builds plain Rules -> every WebSocket route 404s.
   Plain HTTP requests to such a route now get 426 instead of falling through to 404.
4. GEVENT_EMPTY_MESSAGES  the gevent middleware queues the b'' that
   uwsgi.websocket_recv_nb() returns for "nothing to read" after every message and
   on every idle wake-up (upstream issue #39), so a handler echoing whatever is not
   None floods the browser with empty messages. Its loop also wakes every second per
   connection. The middleware below queues only real messages and sleeps until the
   socket is readable, the handler sends, or the next ping is due.
   Limitation: uWSGI's API cannot tell an empty message from "nothing to read", so an
   empty message from a client is not delivered to flask-app handlers.
5. BINARY_FRAMES       `client.send(msg, binary=True)` (the default) sends a text frame,
   and a received message does not say whether it was binary. Binary messages now arrive
   as `BinaryMessage` (a bytes subclass, so existing code keeps working); `send()` sends a
   binary frame for them or when called with binary=True, text otherwise (0.6.1's de-facto
   default). Needs uwsgi.websocket_opcode() from the project's uWSGI patches.

Beyond the fixes, the middleware applies the project's per-worker connection cap
(wsstack.capacity: 503 at the handshake when the worker is full), as uwsgi-app does, and
back-pressure: the package's middleware reads every message the socket has into an
unbounded queue before the handler runs, so a client that sends faster than its handler
(or its own reading) keeps up fills the worker's memory. At most MAX_BUFFERED messages now
wait in either direction; beyond that the middleware stops reading the socket, and the
client's sends wait in TCP instead. It also counts refused handshakes and every message in
and out, for the app's /metrics (wsstack.metrics).
"""
import asyncio
import sys

import flask.app

FIXES = ("FLASK3_SETUPMETHOD", "PY311_ASYNCIO", "WERKZEUG_WS_RULES", "GEVENT_EMPTY_MESSAGES", "BINARY_FRAMES")


def fix_flask3_setupmethod():
    if not hasattr(flask.app, "setupmethod"):
        from flask.sansio.scaffold import setupmethod

        flask.app.setupmethod = setupmethod


def fix_py311_asyncio():
    if not hasattr(asyncio, "coroutine"):
        # A None entry makes `from ._asyncio import *` raise ImportError, which the
        # package turns into its "asyncio not available" placeholder class.
        sys.modules.setdefault("flask_uwsgi_websocket._asyncio", None)


def import_package(skip=()):
    """Apply the import-time fixes (minus those named in `skip`, for tests) and import the package."""
    if "FLASK3_SETUPMETHOD" not in skip:
        fix_flask3_setupmethod()
    if "PY311_ASYNCIO" not in skip:
        fix_py311_asyncio()
    import flask_uwsgi_websocket

    return flask_uwsgi_websocket


flask_uwsgi_websocket = import_package()

# Everything below needs the package, which needs the fixes above first.
import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.queue import Queue  # noqa: E402
from werkzeug.exceptions import HTTPException  # noqa: E402
from werkzeug.routing import Rule, WebsocketMismatch  # noqa: E402

from wsstack import capacity, http, metrics, uwsgi_options  # noqa: E402

uwsgi = flask_uwsgi_websocket.uwsgi


class WebSocketRoutesMixin:
    """Fix 3: register WebSocket routes as Rule(websocket=True)."""

    def add_url_rule(self, rule, endpoint=None, view_func=None, **options):
        assert view_func is not None, "view_func is mandatory"
        endpoint = endpoint or view_func.__name__
        existing = self.view_functions.get(endpoint)
        if existing is not None and existing is not view_func:
            raise AssertionError(f"View function mapping is overwriting an existing endpoint function: {endpoint}")
        self.url_map.add(Rule(rule, endpoint=endpoint, methods=("GET",), websocket=True, **options))
        self.view_functions[endpoint] = view_func



class BinaryMessage(bytes):
    """Fix 5: a message that arrived in binary frames."""


class _Close:
    def __init__(self, code, reason):
        self.code, self.reason = code, reason


class GeventClient(flask_uwsgi_websocket.GeventWebSocketClient):
    """Fix 5: send() honours the frame type. Also: close() can send a close code."""

    def close(self, code=1000, reason=b""):
        # The close frame goes out from the request greenlet, like every frame (see serve()).
        self.send_queue.put(_Close(code, reason))
        self.send_event.set()

    def send(self, msg, binary=None):
        if binary is None:
            binary = isinstance(msg, BinaryMessage)
        self.send_queue.put((msg, bool(binary)))
        self.send_event.set()

    def send_binary(self, msg):
        self.send(msg, binary=True)


MAX_BUFFERED = 16  # messages waiting for the handler, or for the socket, per connection


class GeventMiddleware(flask_uwsgi_websocket.GeventWebSocketMiddleware):
    """Fix 4 (and the 426 of fix 3): one wake-up per event, only real messages queued."""

    client = GeventClient
    ping_interval = uwsgi_options.ping_interval()

    def __call__(self, environ, start_response):
        try:
            endpoint, args = self.websocket.url_map.bind_to_environ(environ).match()
        except WebsocketMismatch:
            return capacity.refuse(start_response, "not_upgrade", http.upgrade_required())
        except HTTPException:
            return self.wsgi_app(environ, start_response)
        refusal = http.handshake_refusal(environ)
        if refusal:
            return capacity.refuse(start_response, *refusal)
        return capacity.upgrade(environ, start_response,
                                lambda: self.serve(self.websocket.view_functions[endpoint], args, environ))

    def serve(self, view, args, environ):
        # uWSGI's websocket calls only work from the request's own greenlet (the gevent
        # plugin finds the request through it), so this greenlet does all socket I/O and
        # the view runs in its own greenlet, talking to us through the two queues.
        send_event, send_queue, recv_queue, readable = Event(), Queue(), Queue(), Event()
        client = self.client(environ, uwsgi.connection_fd(), send_event, send_queue, readable, recv_queue,
                             self.websocket.timeout)
        watcher = gevent.get_hub().loop.io(client.fd, 1)
        watcher.start(readable.set)
        handler = gevent.spawn(view, client, **args)
        more_to_read = False  # uWSGI may hold whole messages already read from the socket
        try:
            while client.connected and not handler.ready():
                if not (more_to_read and self._has_room(send_queue, recv_queue)):
                    events = [handler, send_event]
                    if self._has_room(send_queue, recv_queue):
                        events.append(readable)  # full queues: the socket waits, not memory
                    gevent.wait(events, count=1, timeout=self.ping_interval)
                self._flush(client, send_event, send_queue)
                if self._has_room(send_queue, recv_queue):
                    # Also runs on a timeout: recv_nb is where uWSGI sends its pings.
                    readable.clear()
                    more_to_read = self._drain(client, recv_queue, MAX_BUFFERED - recv_queue.qsize())
            self._flush(client, send_event, send_queue)
        finally:
            watcher.stop()
            watcher.close()
            client.connected = False
            recv_queue.put(None)  # a view blocked in receive() sees the close
            handler.join(self.websocket.timeout)
            handler.kill()

    @staticmethod
    def _flush(client, send_event, send_queue):
        send_event.clear()
        try:
            while client.connected and not send_queue.empty():
                item = send_queue.get_nowait()
                if isinstance(item, _Close):
                    client.connected = False
                    uwsgi.websocket_close(item.code, item.reason)
                    return
                message, binary = item
                (uwsgi.websocket_send_binary if binary else uwsgi.websocket_send)(message)
                metrics.message_sent(binary)
        except OSError:
            client.connected = False

    @staticmethod
    def _has_room(send_queue, recv_queue):
        return send_queue.qsize() < MAX_BUFFERED and recv_queue.qsize() < MAX_BUFFERED

    @staticmethod
    def _drain(client, recv_queue, at_most):
        """Read up to `at_most` messages; True when it stopped at that limit."""
        try:
            for _ in range(at_most):
                if not client.connected:
                    return False
                message = uwsgi.websocket_recv_nb()
                if not message:  # b'' means "nothing more to read", never a message
                    return False
                binary = metrics.message_received()
                recv_queue.put(BinaryMessage(message) if binary else message)
            return True
        except OSError:
            client.connected = False
            return False


class GeventWebSocket(WebSocketRoutesMixin, flask_uwsgi_websocket.GeventWebSocket):
    """Drop-in for flask_uwsgi_websocket.GeventWebSocket with fixes 3 and 4."""

    middleware = GeventMiddleware

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
   connection, and every message crosses two queues and three greenlet switches. Now
   the view runs in the request's greenlet and reads and writes the socket itself
   (GeventClient): receive() returns only real messages and sleeps until the socket is
   readable, another greenlet sends, or the next ping is due. Empty messages from the
   client are real messages and are delivered (b''): the read uses
   uwsgi.websocket_try_recv() from the project's uWSGI patch 0016, which returns None for
   "nothing to read" where websocket_recv_nb() returns b'' for both.
5. BINARY_FRAMES       `client.send(msg, binary=True)` (the default) sends a text frame,
   and a received message does not say whether it was binary. Binary messages now arrive
   as `BinaryMessage` (a bytes subclass, so existing code keeps working); `send()` sends a
   binary frame for them or when called with binary=True, text otherwise (0.6.1's de-facto
   default). Needs uwsgi.websocket_opcode() from the project's uWSGI patches.

Two additions to the package's API, which the project's chat needs:
- `@ws.route(rule, admit=check)`: `check(environ)` runs before the upgrade and returns None
  to go ahead or (reason, (status, headers, body)) to refuse with that HTTP answer, counted
  by reason; the package runs routes only after the handshake, where a refusal can only be
  a close code.
- `client.flush()`: from a greenlet other than the view, write what it queued now, waiting
  while the socket is full, so that a forwarder never piles up sends for a slow client.

Beyond the fixes, the middleware applies the project's per-worker connection cap
(wsstack.capacity: 503 at the handshake when the worker is full), as uwsgi-app does, and
back-pressure: the package's middleware reads every message the socket has into an
unbounded queue before the handler runs, so a client that sends faster than its handler
(or its own reading) keeps up fills the worker's memory. Now a message is read when the
view asks for it (plus at most MAX_BUFFERED while the view is busy elsewhere and a ping is
due); the client's sends wait in TCP instead. It also counts refused handshakes and every message in
and out, for the app's /metrics (wsstack.metrics).
"""
import asyncio
import functools
import sys
import time
import uuid

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
from gevent import getcurrent  # noqa: E402
from gevent.hub import Waiter  # noqa: E402
from gevent.lock import Semaphore  # noqa: E402
from werkzeug.exceptions import HTTPException  # noqa: E402
from werkzeug.routing import Rule, WebsocketMismatch  # noqa: E402

from wsstack import capacity, http, metrics, uwsgi_options  # noqa: E402

uwsgi = flask_uwsgi_websocket.uwsgi


class WebSocketRoutesMixin:
    """Fix 3: register WebSocket routes as Rule(websocket=True)."""

    def add_url_rule(self, rule, endpoint=None, view_func=None, **options):
        assert view_func is not None, "view_func is mandatory"
        endpoint = endpoint or view_func.__name__
        admit = options.pop("admit", None)
        if admit is not None:
            self.admissions[endpoint] = admit
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
    """Fixes 4 and 5: the connection a view gets.

    The view runs in the request's own greenlet and does the socket I/O itself: receive()
    reads one message when the view asks for it (so a fast sender waits in TCP, never in the
    worker's memory) and send() writes at once. Sends from any other greenlet (a broadcaster,
    a forwarder) are queued, as in the package, so a slow client never blocks them: the view
    writes them when it next waits in receive() or sends, or a helper greenlet does when the
    view is busy elsewhere. One uWSGI call at a time uses the socket (`self._io`): frames are
    never interleaved. An idle connection has no greenlet awake and no timer but its ping.

    The package's attributes keep their roles: send_queue carries sends from other greenlets;
    recv_queue holds messages a helper read while keeping the connection alive (at most
    MAX_BUFFERED). Both are plain lists, smaller than deques (a worker holds thousands of
    idle connections), and there are no events: a waiting receive() is woken directly (see
    _wait).
    """

    def __init__(self, environ, fd, timeout):
        # The package's attributes (its __init__ sets the same), but `id`: see below.
        self.environ, self.fd, self.timeout, self.connected = environ, fd, timeout, True
        self.send_event = self.recv_event = None
        self.send_queue, self.recv_queue = [], []
        self._view = getcurrent()  # the request's greenlet, which runs the view
        self._request = self._view.uwsgi_wsgi_req  # how uWSGI finds the request (see _call)
        self._io = Semaphore()
        self._waiter = None  # set while the view is blocked in receive()
        self._helper = None  # a greenlet writing or pinging while the view is busy elsewhere
        self._hub = gevent.get_hub()
        loop = self._hub.loop
        self._readable = loop.io(fd, 1)
        self._ticker = None
        self._arm_ticker()

    # -- the package's API ------------------------------------------------------------

    @functools.cached_property
    def id(self):
        """The package's client id (a uuid1 string), made when first asked for: few views
        ask, and it is some 200 bytes per idle connection."""
        return str(uuid.uuid1())

    def receive(self):
        return self.recv()

    def recv(self):
        """The next message, or None once the connection is closed."""
        while True:
            if self.recv_queue:
                return self.recv_queue.pop(0)
            if not self.connected:
                return None
            message = self._call(self._read)
            if message is not None:
                return message
            if self.connected:  # else the read found the close: say so at once
                self._wait()

    def send(self, msg, binary=None):
        if binary is None:
            binary = isinstance(msg, BinaryMessage)
        self._submit((msg, bool(binary)))

    def send_binary(self, msg):
        self.send(msg, binary=True)

    def close(self, code=1000, reason=b""):
        self._submit(_Close(code, reason))

    def flush(self):
        """Addition: from another greenlet, write its queued sends now (waiting while the
        socket is full); the view's own sends are written at once anyway."""
        if getcurrent() is not self._view:
            self._call(self._write)

    # -- plumbing ---------------------------------------------------------------------

    def _submit(self, item):
        if getcurrent() is self._view:
            self._call(self._write, item)
            return
        self.send_queue.append(item)
        self._nudge()

    def _arm_ticker(self):
        """Every ping interval, the socket is read so that uWSGI can ping: uWSGI pings once
        websockets-ping-freq whole seconds of its clock (time(), like time.time() here) have
        passed since its last ping. The ticker fires just after the second in which the next
        ping is due begins, together with those of every connection of the worker due in that
        second: one wake-up of the worker for all of them, not one per connection at the
        moment it happened to connect. Re-armed at each tick from the clock, so that it keeps
        to whole seconds (a repeating timer follows the monotonic clock, which drifts from it)."""
        self._ticker = self._hub.loop.timer(PING_INTERVAL - time.time() % 1 + PAST_THE_SECOND)
        # update: measured from now, not from the start of the event loop's current pass
        self._ticker.start(self._tick, update=True)

    def _tick(self):
        if self.connected:
            self._arm_ticker()
        self._nudge()

    def _nudge(self):
        """Get the queued sends written and the socket read: by the view if it waits in
        receive(), else by a helper greenlet."""
        if self._waiter is not None:
            self._wake()
        elif self._helper is None and self.connected:
            self._helper = gevent.spawn(self._help)

    def _help(self):
        try:
            self._call(self._write)
            # uWSGI pings from a read that finds nothing to read; skipped while the socket is
            # busy (a blocked send) or the view has not taken what was read before.
            if not self._io.locked() and len(self.recv_queue) < MAX_BUFFERED:
                message = self._call(self._read)
                if message is not None:
                    self.recv_queue.append(message)
        finally:
            self._helper = None

    def _call(self, function, *args):
        """Run `function` (which makes uWSGI calls for this connection) from any greenlet.

        uWSGI's gevent plugin finds the current request through the calling greenlet's
        `uwsgi_wsgi_req` attribute, which only the request's own greenlet has: any other
        greenlet carries it for the duration of the call. A failed call means the connection
        is over, as in the package (which never raises on send).
        """
        if not self.connected:
            return None
        current = getcurrent()
        # The common case, the view's own reads and sends, skips the attribute lookup.
        theirs = self._request if current is self._view else getattr(current, "uwsgi_wsgi_req", None)
        swap = theirs != self._request
        if swap:
            current.uwsgi_wsgi_req = self._request
        try:
            with self._io:
                return function(*args)
        except OSError:
            self._disconnected()
            return None
        finally:
            if swap:
                if theirs is None:
                    del current.uwsgi_wsgi_req
                else:
                    current.uwsgi_wsgi_req = theirs

    def _read(self):
        """One message (b'' for an empty one), or None when none is complete yet (fix 4)."""
        message = _try_recv()
        if message is None:
            return None
        return BinaryMessage(message) if metrics.message_received() else message

    def _write(self, item=None):
        """Write what other greenlets queued, then `item`, then what they queued meanwhile."""
        if item is not None:
            if self.send_queue:
                self.send_queue.append(item)  # after what others queued before it
            else:
                self._write_one(item)
        while self.send_queue and self.connected:
            # Taken as a batch: what other greenlets queue while a write blocks comes next.
            batch, self.send_queue = self.send_queue, []
            for queued in batch:
                self._write_one(queued)

    def _write_one(self, item):
        if not self.connected:
            return
        if isinstance(item, _Close):
            self.connected = False
            uwsgi.websocket_close(item.code, item.reason)
            return
        message, binary = item
        (uwsgi.websocket_send_binary if binary else uwsgi.websocket_send)(message)
        metrics.message_sent(binary)

    def _wait(self):
        """Sleep until the socket is readable or _wake() is called. The event loop switches
        straight back to this greenlet (gevent's Waiter, as its own sockets do): no event
        object, no extra trip through the loop per message."""
        self._waiter = waiter = Waiter()
        self._readable.start(waiter.switch, None)
        try:
            waiter.get()
        finally:
            self._readable.stop()
            self._waiter = None
        if self.send_queue:
            self._call(self._write)

    def _wake(self):
        """Wake a waiting receive() from anywhere: the switch itself runs from the event loop
        (only it may resume a Waiter), and only if that same wait is still going on."""
        waiter = self._waiter
        if waiter is not None:
            self._hub.loop.run_callback(lambda: self._waiter is waiter and waiter.switch(None))

    def _disconnected(self):
        self.connected = False
        self._wake()  # a view waiting in receive() sees the close

    def _finish(self):
        """After the view returned: write what is still queued, then let go of everything."""
        self._ticker.stop()
        helper = self._helper
        if helper is not None:
            helper.join(self.timeout)
            helper.kill()
        self._call(self._write)
        self.connected = False
        self._ticker.close()
        self._readable.close()


def _recv_nb_or_none():
    # A stock uWSGI (compared in `make conformance`) has no try_recv: its b'' means both
    # "nothing yet" and an empty message, which is then lost.
    return uwsgi.websocket_recv_nb() or None


_try_recv = getattr(uwsgi, "websocket_try_recv", None) or _recv_nb_or_none


MAX_BUFFERED = 16  # messages read ahead of the view while keeping the connection alive
PING_INTERVAL = uwsgi_options.ping_interval()
PAST_THE_SECOND = 0.005  # how long after the whole second the ticker fires


class GeventMiddleware(flask_uwsgi_websocket.GeventWebSocketMiddleware):
    """Fix 4 (and the 426 of fix 3): no wake-up without a reason, only real messages delivered."""

    client = GeventClient

    def __call__(self, environ, start_response):
        try:
            endpoint, args = self.websocket.url_map.bind_to_environ(environ).match()
        except WebsocketMismatch:
            return capacity.refuse(start_response, "not_upgrade", http.upgrade_required())
        except HTTPException:
            return self.wsgi_app(environ, start_response)
        admit = self.websocket.admissions.get(endpoint)
        refusal = http.handshake_refusal(environ) or (admit and admit(environ))
        if refusal:
            return capacity.refuse(start_response, *refusal)
        # The rule's arguments only when it has any: this frame, and what it passes on, live as
        # long as the connection.
        args = args or None
        return capacity.upgrade(environ, start_response,
                                lambda: self.serve(self.websocket.view_functions[endpoint], args, environ))

    def serve(self, view, args, environ):
        """Run `view` on the connection (`args`: the rule's arguments, or None)."""
        client = self.client(environ, uwsgi.connection_fd(), self.websocket.timeout)
        try:
            # Without **: Python 3.11 runs a call with ** through C, a C stack frame that every
            # idle connection's greenlet keeps a copy of while it waits (about 500 bytes).
            if args:
                view(client, **args)
            else:
                view(client)
        except Exception:
            # A failing view closes its connection with 1011 (and uWSGI logs the traceback)
            # instead of leaving the client with a dropped connection.
            client.close(1011, b"internal error")
            raise
        finally:
            client._finish()


class GeventWebSocket(WebSocketRoutesMixin, flask_uwsgi_websocket.GeventWebSocket):
    """Drop-in for flask_uwsgi_websocket.GeventWebSocket with fixes 3 and 4."""

    middleware = GeventMiddleware

    def __init__(self, app=None, timeout=5):
        self.admissions = {}  # endpoint -> its route's `admit` check
        super().__init__(app, timeout)

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
   "nothing to read" where websocket_recv_nb() returns b'' for both. An idle view is not
   woken for keep-alive either: the worker's ping sweep has uWSGI write the ping from the
   event loop (uwsgi.websocket_ping_nowait(), patch 0033) and the socket's watcher has it take
   the pong there (uwsgi.websocket_absorb_pongs(), patch 0032).
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
    view is busy elsewhere. One uWSGI call at a time uses the socket (`_busy`): frames are
    never interleaved. An idle connection has no greenlet awake and no timer of its own: the
    worker's ping sweep (PINGS) has its ping written from the event loop, or wakes it when
    that cannot be done there; the pong is taken in the event loop too (_on_readable).

    The package's attributes keep their roles: send_queue carries sends from other greenlets;
    recv_queue holds messages a helper read while keeping the connection alive (at most
    MAX_BUFFERED). An idle connection holds as little as it can (a worker holds thousands):
    the queues are lists made when first needed (the class's empty tuple until then), there
    are no events (a waiting receive() is woken directly, see _wait), and no lock object
    (see _call).
    """

    # The package's events, unused; and the defaults an idle connection does not store.
    send_event = recv_event = None
    send_queue = recv_queue = ()
    _waiter = None  # set while the view is blocked in receive()
    _helper = None  # a greenlet writing or pinging while the view is busy elsewhere
    _busy = False  # a uWSGI call for this connection is under way (it may be blocked in a write)
    _queued_calls = None  # Waiters of the greenlets that wait for it to end

    def __init__(self, environ, fd, timeout):
        # The package's attributes (its __init__ sets the same), but `id`: see below.
        self.environ, self.fd, self.timeout, self.connected = environ, fd, timeout, True
        self._view = getcurrent()  # the request's greenlet, which runs the view
        self._request = self._view.uwsgi_wsgi_req  # how uWSGI finds the request (see _call)
        self._readable = gevent.get_hub().loop.io(fd, 1)
        self._ping_second = PINGS.add(self)

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
        self.send_queue = _appended(self.send_queue, item)
        self._nudge()

    def _ping_due(self, next_second):
        """From the ping sweep, in the event loop, when this connection's ping is due: let the
        view read (uWSGI pings from a read that finds nothing to read), or a helper while the
        view is busy elsewhere."""
        if not self.connected:
            return
        self._ping_second = next_second
        PINGS.file(self, next_second)
        waiter = self._waiter
        if waiter is not None:
            # uWSGI writes the ping from here when nothing stands in the way (patch 0033): the
            # view sleeps on.
            if not self._busy and self._from_event_loop(_ping_nowait):
                return
            # In the event loop, as an I/O watcher's callback would: straight into the waiting
            # receive(), with no callback scheduled for it.
            waiter.switch(None)
        elif self._helper is None:
            self._helper = gevent.spawn(self._help)

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
            if not self._busy and len(self.recv_queue) < MAX_BUFFERED:
                message = self._call(self._read)
                if message is not None:
                    self.recv_queue = _appended(self.recv_queue, message)
        finally:
            self._helper = None

    def _call(self, function, *args):
        """Run `function` (which makes uWSGI calls for this connection) from any greenlet, one
        such call at a time.

        uWSGI's gevent plugin finds the current request through the calling greenlet's
        `uwsgi_wsgi_req` attribute, which only the request's own greenlet has: any other
        greenlet carries it for the duration of the call. A failed call means the connection
        is over, as in the package (which never raises on send).

        A call waits while another is under way (blocked in a write: a uWSGI call yields only
        there). That is a flag and, only while someone waits, a list of Waiters, not a gevent
        Semaphore per connection: 150 bytes of every idle connection for a wait that happens
        only when a helper or a forwarder meets a blocked send.
        """
        while self._busy:
            self._wait_for_call()
        if not self.connected:
            return None
        current = getcurrent()
        # The common case, the view's own reads and sends, skips the attribute lookup.
        theirs = self._request if current is self._view else getattr(current, "uwsgi_wsgi_req", None)
        swap = theirs != self._request
        if swap:
            current.uwsgi_wsgi_req = self._request
        self._busy = True
        try:
            return function(*args)
        except OSError:
            self._disconnected()
            return None
        finally:
            self._busy = False
            if self._queued_calls:
                self._wake_queued_calls()
            if swap:
                if theirs is None:
                    del current.uwsgi_wsgi_req
                else:
                    current.uwsgi_wsgi_req = theirs

    def _wait_for_call(self):
        waiter = Waiter()
        if self._queued_calls is None:
            self._queued_calls = []
        self._queued_calls.append(waiter)
        try:
            waiter.get()
        finally:
            # Killed while waiting (a forwarder's end): it must not keep a place in the queue.
            if self._queued_calls and waiter in self._queued_calls:
                self._queued_calls.remove(waiter)

    def _wake_queued_calls(self):
        """All of them, from the event loop: each checks `_busy` again, so the first to run
        goes ahead and the others wait anew, and one killed meanwhile blocks nobody."""
        waiters, self._queued_calls = self._queued_calls, None
        loop = gevent.get_hub().loop
        for waiter in waiters:
            loop.run_callback(waiter.switch, None)

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
            batch, self.send_queue = self.send_queue, ()
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
        self._readable.start(self._on_readable, waiter)
        try:
            waiter.get()
        finally:
            self._readable.stop()
            self._waiter = None
        if self.send_queue:
            self._call(self._write)

    def _on_readable(self, waiter):
        """In the event loop, when the socket of a waiting receive() became readable. What an
        idle connection's socket brings is the pong of its keep-alive ping: uWSGI takes it
        there (patch 0032) and the view sleeps on. Anything else wakes it, with what was read
        kept in uWSGI for its next read. While another uWSGI call for this connection is
        under way (a helper's blocked send) the view is woken as before."""
        if not self._busy and self._from_event_loop(_absorb_pongs):
            return
        waiter.switch(None)

    def _from_event_loop(self, function):
        """Call a uWSGI function that never blocks for this connection from the event loop:
        uWSGI finds the request through the calling greenlet (see _call), here the hub."""
        hub = getcurrent()
        hub.uwsgi_wsgi_req = self._request
        try:
            return function()
        finally:
            del hub.uwsgi_wsgi_req

    def _wake(self):
        """Wake a waiting receive() from anywhere: the switch itself runs from the event loop
        (only it may resume a Waiter), and only if that same wait is still going on."""
        waiter = self._waiter
        if waiter is not None:
            gevent.get_hub().loop.run_callback(lambda: self._waiter is waiter and waiter.switch(None))

    def _disconnected(self):
        self.connected = False
        self._wake()  # a view waiting in receive() sees the close

    def _finish(self):
        """After the view returned: write what is still queued, then let go of everything."""
        PINGS.discard(self, self._ping_second)
        helper = self._helper
        if helper is not None:
            helper.join(self.timeout)
            helper.kill()
        self._call(self._write)
        self.connected = False
        self._readable.close()


class PingSweep:
    """Pings each connection of the worker when its keep-alive ping is due.

    uWSGI pings from a read that finds nothing to read (or, from the event loop, from
    websocket_ping_nowait()), once websockets-ping-freq whole seconds of its clock
    (gettimeofday(), like time.time() here) have passed since its last ping. Connections
    are filed under the whole second in which their next ping is due; one timer fires just
    after each such second begins and wakes that second's connections together: one wake-up
    of the worker for all of them, and no timer per connection (a libev timer and its callback
    were some 250 bytes of every idle connection). The next second is taken from the clock at
    each sweep, so the schedule keeps to whole seconds of time() (a repeating timer follows the
    monotonic clock, which drifts from it).
    """

    def __init__(self, interval):
        self.interval = interval
        self.due = {}  # whole second of time() -> the connections whose ping is due in it
        self.timer = None
        self.timer_second = None  # the second the timer is set for

    def add(self, client):
        """File a new connection: its first ping is due one interval from now (patch 0020)."""
        second = int(time.time()) + self.interval
        self.file(client, second)
        return second

    def file(self, client, second):
        clients = self.due.get(second)
        if clients is None:
            self.due[second] = [client]
        else:
            clients.append(client)
        if self.timer_second is None or second < self.timer_second:
            self._set_timer(second)

    def discard(self, client, second):
        clients = self.due.get(second, ())
        if client in clients:
            clients.remove(client)
            if not clients:
                del self.due[second]

    def _set_timer(self, second):
        if self.timer is not None:
            self.timer.close()
        self.timer = gevent.get_hub().loop.timer(max(0.0, second - time.time() + PAST_THE_SECOND))
        self.timer_second = second
        # update: measured from now, not from the start of the event loop's current pass
        self.timer.start(self._sweep, update=True)

    def _sweep(self):
        self.timer.close()
        self.timer = self.timer_second = None
        now = time.time()
        next_second = int(now) + self.interval
        # Each connection is refiled before it runs: a view that ends meanwhile finds itself
        # under its next second and takes itself out of it.
        try:
            for second in sorted(second for second in self.due if second <= now):
                for client in self.due.pop(second):
                    client._ping_due(next_second)
        finally:
            # Set anew whatever the refiling set meanwhile: that was for `next_second`, and
            # the connections due in the seconds before it come first. Whatever happened above:
            # without the timer no connection of the worker would be pinged again.
            if self.due:
                self._set_timer(min(self.due))


def _appended(queue, item):
    """`queue` with `item` at its end: a client's queue is a list from its first item on (the
    class's empty tuple until then)."""
    if queue:
        queue.append(item)
        return queue
    return [item]


def _recv_nb_or_none():
    # A stock uWSGI (compared in `make conformance`) has no try_recv: its b'' means both
    # "nothing yet" and an empty message, which is then lost.
    return uwsgi.websocket_recv_nb() or None


_try_recv = getattr(uwsgi, "websocket_try_recv", None) or _recv_nb_or_none
# A stock uWSGI neither takes pongs nor writes pings for a waiting view: each wakes it.
_absorb_pongs = getattr(uwsgi, "websocket_absorb_pongs", None) or (lambda: False)
_ping_nowait = getattr(uwsgi, "websocket_ping_nowait", None) or (lambda: False)


MAX_BUFFERED = 16  # messages read ahead of the view while keeping the connection alive
PING_INTERVAL = uwsgi_options.ping_interval()
PAST_THE_SECOND = 0.005  # how long after the whole second the ping sweep runs
PINGS = PingSweep(PING_INTERVAL)


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
        route = (self.websocket.view_functions[endpoint], args or None, environ)
        return capacity.upgrade(environ, start_response, self.serve, route)

    def serve(self, route):
        """Run the view on the connection; `route`: (view, the rule's arguments or None, environ)."""
        view, args, environ = route
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

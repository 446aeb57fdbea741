"""Per-worker cap on open WebSockets, enforced at the handshake by both apps.

WS_MAX_CONNECTIONS_PER_WORKER   WebSockets one worker process holds open at once (default 900)

Every open WebSocket occupies one of its worker's gevent cores (UWSGI_GEVENT, default 1000)
for its whole life. When all cores are taken uWSGI stops accepting: new clients then sit in
the listen queue without an answer until nginx gives up on them (504 after
proxy_read_timeout), and health checks hang the same way. The cap is therefore lower than
the core count: a full worker still has cores to answer health checks and to refuse new
WebSockets at once with 503 and Retry-After. One app instance holds at most
UWSGI_PROCESSES x WS_MAX_CONNECTIONS_PER_WORKER WebSockets.

Read at import, so a malformed value, or one that leaves no free core, stops uWSGI at
start-up (need-app).
"""
import os
import re
import sys

from wsstack import http, metrics, uwsgi_options
from wsstack.settings import whole_number
from wsstack.uwsgi_options import gevent_cores

RETRY_AFTER_SECONDS = 5


def parse_limit(raw, cores):
    limit = whole_number("WS_MAX_CONNECTIONS_PER_WORKER", raw, 1)
    if cores is not None and limit >= cores:
        raise ValueError(
            f"WS_MAX_CONNECTIONS_PER_WORKER={raw} must be lower than the gevent cores per worker "
            f"(UWSGI_GEVENT={cores}): a full worker needs free cores to answer health checks and "
            "to refuse new connections"
        )
    return limit


class Capacity:
    """Counts the WebSockets of this worker process (gevent: one thread, no lock needed)."""

    def __init__(self, limit):
        self.limit, self.open = limit, 0

    def take(self):
        """Take a slot (True), or say the worker is full (False); a slot taken is given back
        with release(). Taken before the handshake: the handshake can yield to other
        greenlets, and a check made before it would let all of them through at once.

        Not a context manager: a generator-based one stays alive, with its frame, for as long
        as the connection it counts (a few hundred bytes per idle connection)."""
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def release(self):
        self.open -= 1

    def refusal(self):
        return http.plain(
            "503 Service Unavailable",
            f"WebSocket handshake refused: this worker already holds its limit of {self.limit} "
            "connections (WS_MAX_CONNECTIONS_PER_WORKER); retry later.",
            [("Retry-After", str(RETRY_AFTER_SECONDS))],
        )


WORKER = Capacity(parse_limit(os.environ.get("WS_MAX_CONNECTIONS_PER_WORKER", "900"), gevent_cores()))


def refuse(start_response, reason, answer):
    """Answer a WebSocket handshake with an HTTP refusal, counted by `reason` (wsstack.metrics)."""
    metrics.handshake_failed(reason)
    return http.respond(start_response, answer)


def upgrade(environ, start_response, on_open, argument=None):
    """Take a slot of this worker, complete the WebSocket handshake and run `on_open(argument)`
    until the conversation ends; a full worker answers 503 instead. Both apps' handshakes end
    here, after their own checks of the request.

    A function and one argument, because of what an idle connection keeps while it waits: not
    a closure (a function object and a cell per value it closes over, 0.2-0.4 KiB), and not a
    call with *args (Python 3.11 makes that call through C: a C stack frame, copied with the
    greenlet's stack, some 400 bytes)."""
    import uwsgi  # only ever called inside a uWSGI worker

    if not WORKER.take():
        return refuse(start_response, "worker_full", WORKER.refusal())
    try:
        # The subprotocol a route selected (wsstack.auth for the chat); the project's patch 0007
        # sends it only if the client offered it.
        uwsgi.websocket_handshake(environ["HTTP_SEC_WEBSOCKET_KEY"], environ.get("HTTP_ORIGIN", ""),
                                  environ.get("wsstack.subprotocol", ""))
        # A route's own message-size limit (the chat's), applied by the engine to each frame
        # header (patch 0021): an oversized message is refused before its payload is buffered.
        # A stock uWSGI has no such call; the route then checks each message's size itself.
        max_size = environ.get("wsstack.max_message_bytes")
        if max_size and hasattr(uwsgi, "websocket_max_size"):
            uwsgi.websocket_max_size(max_size)
        metrics.connection_opened()
        client, request_id = log_fields(environ)
        release_environ(environ)
        try:
            on_open(argument)
        finally:
            # A stock uWSGI cannot say (patch 0011), and counts as no close frame.
            status = uwsgi_options.close_status()
            metrics.connection_closed(status)
            print(close_log_line(client, request_id, status), file=sys.stderr, flush=True)
        return []
    finally:
        WORKER.release()


KEPT_PREFIX = "wsstack."


def release_environ(environ):
    """Empty the request's environ once the connection is open, all but the routes' own
    entries (KEPT_PREFIX: what their checks found, e.g. the chat's admission).

    An open WebSocket holds its environ for its whole life, and nothing reads the request's
    headers after the handshake: its forty-odd entries are about 2.5 KiB per idle connection.
    uWSGI reuses the same dict for its core's next request, so it is emptied in place."""
    kept = {key: value for key, value in environ.items() if key.startswith(KEPT_PREFIX)}
    environ.clear()
    environ.update(kept)


def log_fields(environ):
    """The client address and request id of the close line, the same as the request log's line
    (common/uwsgi-base.ini): read at the handshake, before the environ is released. Header
    values are cut at any whitespace or control character: a request that did not come through
    nginx (which sets both) cannot add fields or lines of its own."""
    return tuple(re.match(r"[!-~]*", environ.get(name, "")).group()[:64]
                 for name in ("HTTP_X_REAL_IP", "HTTP_X_REQUEST_ID"))


def close_log_line(client, request_id, status):
    """The line a WebSocket's end writes: its close code, client address and request id (the
    request log's line comes right after it)."""
    code, initiator = ("1006", "none") if status is None else (status[0], "client" if status[1] else "server")
    return f"websocket closed code={code} initiator={initiator} client={client} request_id={request_id}"

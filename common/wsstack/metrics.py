"""WebSocket metrics of one app instance, counted by every worker, served on an internal socket.

METRICS_HTTP_SOCKET   HOST:PORT of the app's second, internal HTTP socket (uwsgi-base.ini), the
                      only place GET /metrics answers; unset: no metrics socket

Why a uWSGI sharedarea (uwsgi-base.ini `sharedarea`): an instance runs several worker
processes, and a scrape lands on any one of them. Every worker adds to the same 64-bit slots
of one shared memory page under uWSGI's lock, so /metrics is the same whichever worker
answers. The open-connections gauge is kept per worker, each in its own slot, and a worker
zeroes its slot when it starts: a worker that dies with connections open (SIGKILL, a crash)
would otherwise leave them counted forever.

Why a socket of its own: nginx proxies every path of the apps' public socket (/uwsgi/...,
/flask/...), so no path there is private. Requests are told apart by the local address of
their connection, which a client cannot forge with headers. The metrics socket answers
GET /metrics and nothing else; the public socket never answers /metrics.

Outside uWSGI (unit tests, tools) the counters live in this process only.
"""
import _socket  # not gevent's: only the address is read, the descriptor's mode stays as uWSGI set it
import os
import struct

from wsstack import exposition, http, uwsgi_options

MESSAGE_TYPES = ("text", "binary")
# Close codes get their own label value up to 1014 (RFC 6455 7.4.1 and IANA); the ranges
# applications and libraries may use are one value each, so a client cannot create
# thousands of series by picking codes.
CLOSE_CODES = ("1000", "1001", "1002", "1003", "1005", "1006", "1007", "1008", "1009", "1010", "1011", "1012",
               "1013", "1014", "3000-3999", "4000-4999", "other")
# who sent the first close frame; "none": the connection ended without one (code 1006)
CLOSE_INITIATORS = ("client", "server")
HANDSHAKE_FAILURES = {
    "not_upgrade": "a plain HTTP request to a WebSocket endpoint (426)",
    "bad_key": "missing or malformed Sec-WebSocket-Key (400)",
    "bad_version": "Sec-WebSocket-Version other than 13 (426)",
    "origin": "Origin not allowed (403)",
    "worker_full": "the worker holds WS_MAX_CONNECTIONS_PER_WORKER already (503)",
    "chat_params": "invalid chat room, last_id or epoch (400)",
    "unauthorized": "chat token missing, invalid or expired (401)",
    "backplane": "chat backplane (Redis) unavailable at the handshake (503)",
}


def _series():
    """Every counter series, in slot order: (family key, labels)."""
    series = [("connections", ())]
    series += [("received", (("type", kind),)) for kind in MESSAGE_TYPES]
    series += [("sent", (("type", kind),)) for kind in MESSAGE_TYPES]
    for code in CLOSE_CODES:
        if code == "1006":
            series.append(("closes", (("code", code), ("initiator", "none"))))
        else:
            series += [("closes", (("code", code), ("initiator", who))) for who in CLOSE_INITIATORS]
    series += [("handshake_failures", (("reason", reason),)) for reason in HANDSHAKE_FAILURES]
    return series


SERIES = _series()
SLOT = {key: index for index, key in enumerate(SERIES)}
SLOT_BYTES = 8
SHAREDAREA_ID = 0  # the first `sharedarea` of uwsgi-base.ini


class SharedSlots:
    """64-bit slots in uWSGI's sharedarea: the counters, then one open-connections slot per worker."""

    def __init__(self, uwsgi):
        self.uwsgi = uwsgi
        self.count = len(SERIES) + uwsgi.numproc + 1  # worker ids start at 1
        try:
            uwsgi.sharedarea_read(SHAREDAREA_ID, 0, self.count * SLOT_BYTES)
        except ValueError as exc:
            raise RuntimeError(
                f"wsstack.metrics needs {self.count * SLOT_BYTES} bytes of uWSGI sharedarea {SHAREDAREA_ID} "
                "(uwsgi-base.ini `sharedarea`, in 4 KiB pages) for its counters and one slot per worker"
            ) from exc

    def add(self, slot, amount):
        self.uwsgi.sharedarea_inc64(SHAREDAREA_ID, slot * SLOT_BYTES, amount)

    def set(self, slot, value):
        self.uwsgi.sharedarea_write64(SHAREDAREA_ID, slot * SLOT_BYTES, value)

    def read_all(self):
        raw = self.uwsgi.sharedarea_read(SHAREDAREA_ID, 0, self.count * SLOT_BYTES)
        return list(struct.unpack(f"={self.count}q", raw))

    def worker_slot(self):
        return len(SERIES) + self.uwsgi.worker_id()

    def worker_slots(self):
        return range(len(SERIES) + 1, self.count)


class LocalSlots:
    """The same slots in this process only, for code running outside uWSGI."""

    def __init__(self):
        self.values = [0] * (len(SERIES) + 1)

    def add(self, slot, amount):
        self.values[slot] += amount

    def set(self, slot, value):
        self.values[slot] = value

    def read_all(self):
        return list(self.values)

    def worker_slot(self):
        return len(SERIES)

    def worker_slots(self):
        return range(len(SERIES), len(SERIES) + 1)


def _slots():
    try:
        import uwsgi
    except ImportError:
        return LocalSlots()
    slots = SharedSlots(uwsgi)
    from uwsgidecorators import postfork

    # A new or respawned worker starts with no connections, whatever its predecessor held.
    postfork(lambda: slots.set(slots.worker_slot(), 0))
    return slots


SLOTS = _slots()
_open_here = 0  # WebSockets open in this worker process (gevent: one thread, no lock)


def connection_opened():
    global _open_here
    _open_here += 1
    SLOTS.set(SLOTS.worker_slot(), _open_here)
    SLOTS.add(SLOT["connections", ()], 1)


def close_labels(status):
    """(code, initiator) label values for uwsgi.websocket_close_status()'s answer."""
    if status is None:
        return "1006", "none"  # RFC 6455 7.1.5: closed without a close frame either way
    code, by_peer = status
    if 3000 <= code <= 3999:
        label = "3000-3999"
    elif 4000 <= code <= 4999:
        label = "4000-4999"
    else:
        label = str(code) if str(code) in CLOSE_CODES and code != 1006 else "other"
    return label, "client" if by_peer else "server"


def connection_closed(status):
    """`status`: uwsgi.websocket_close_status() once the conversation is over."""
    global _open_here
    _open_here -= 1
    SLOTS.set(SLOTS.worker_slot(), _open_here)
    code, initiator = close_labels(status)
    SLOTS.add(SLOT["closes", (("code", code), ("initiator", initiator))], 1)


def message_received():
    """Count the message uWSGI just handed over, by its type; return whether it was binary."""
    binary = uwsgi_options.last_message_is_binary()
    SLOTS.add(SLOT["received", (("type", MESSAGE_TYPES[binary]),)], 1)
    return binary


def message_sent(binary):
    SLOTS.add(SLOT["sent", (("type", MESSAGE_TYPES[bool(binary)]),)], 1)


def handshake_failed(reason):
    SLOTS.add(SLOT["handshake_failures", (("reason", reason),)], 1)


FAMILIES = {
    "connections": ("wsstack_websocket_connections_total", "WebSocket handshakes completed."),
    "received": ("wsstack_websocket_messages_received_total", "WebSocket messages received from clients, by type."),
    "sent": ("wsstack_websocket_messages_sent_total", "WebSocket messages sent to clients, by type."),
    "closes": ("wsstack_websocket_closes_total",
               "WebSockets ended, by the code of the first close frame and who sent it "
               "(1006, initiator none: no close frame either way)."),
    "handshake_failures": ("wsstack_websocket_handshake_failures_total", "WebSocket handshakes refused, by reason."),
}


def render(backend):
    """The instance's metrics in Prometheus text format, each sample labelled with `backend`."""
    values = SLOTS.read_all()
    open_now = exposition.Family("wsstack_websocket_connections_open", "gauge", "WebSockets open now.")
    open_now.add(sum(values[slot] for slot in SLOTS.worker_slots()), backend=backend)
    families = {key: exposition.Family(name, "counter", text) for key, (name, text) in FAMILIES.items()}
    for index, (key, labels) in enumerate(SERIES):
        families[key].add(values[index], backend=backend, **dict(labels))
    return exposition.render([open_now, *families.values()])


def _metrics_port():
    value = os.environ.get("METRICS_HTTP_SOCKET")
    return int(value.rpartition(":")[2]) if value else None  # the format is checked at start-up


METRICS_PORT = _metrics_port()


def arrived_on_metrics_socket():
    """Whether the current request came in on METRICS_HTTP_SOCKET (its connection's local port)."""
    if METRICS_PORT is None:
        return False
    import uwsgi

    connection = _socket.socket(fileno=uwsgi.connection_fd())
    try:
        return connection.getsockname()[1] == METRICS_PORT
    finally:
        connection.detach()  # the descriptor stays uWSGI's


def with_metrics_endpoint(backend, app):
    """Wrap a WSGI app: requests on the metrics socket get /metrics (and nothing else)."""

    def application(environ, start_response):
        if not arrived_on_metrics_socket():
            return app(environ, start_response)
        if environ.get("PATH_INFO") != "/metrics" or environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return http.respond(start_response, http.plain("404 Not Found", "The metrics socket serves GET /metrics only."))
        body = render(backend).encode()
        start_response("200 OK", [("Content-Type", exposition.CONTENT_TYPE), ("Cache-Control", "no-store"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    return application

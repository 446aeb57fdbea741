"""uwsgi-app: WebSocket echo on uWSGI's native API, no web framework.

Routes (nginx mounts them under /uwsgi/):
  GET /healthz   JSON health, 200 once the app is loaded
  GET /ws/echo   WebSocket: every message comes back unchanged, in order
  GET /ws/chat   WebSocket: chat rooms on the Redis backplane (wsstack.chat, docs/chat.md)
  POST /auth/token  the demo's chat token issuer (wsstack.token_issuer; nginx: /auth/token)
"""
import sys
import traceback

import gevent
import uwsgi
from gevent.event import Event

from wsstack import auth, capacity, chat, health, http, metrics, ratelimit, token_issuer, uwsgi_options

APP_NAME = "uwsgi-app"
HUB = chat.Hub(health.REDIS_URL, health.REDIS_CREDENTIALS)
VERIFIER = auth.Verifier.from_environment(HUB.redis)
CHAT_CHECK = chat.handshake_check(VERIFIER)


def accept(environ, start_response, check, on_open, argument):
    """The WebSocket handshake both routes share: refuse with an HTTP answer (the request's,
    or the route's own `check(environ)` -> (reason, answer), when it has one), or upgrade the
    connection and run `on_open(argument)` on it until the conversation ends (capacity.upgrade
    says why not a closure)."""
    if not http.is_websocket_upgrade(environ):
        return capacity.refuse(start_response, "not_upgrade", http.upgrade_required())
    refusal = http.handshake_refusal(environ) or (check and check(environ))
    if refusal:
        return capacity.refuse(start_response, *refusal)
    return capacity.upgrade(environ, start_response, on_open, argument)


def echo(environ, start_response):
    return accept(environ, start_response, None, echo_messages, ratelimit.TokenBucket())


def echo_messages(bucket):
    while True:
        try:
            # Blocks this greenlet only: uWSGI's gevent plugin makes the wait cooperative,
            # and pings go out every websockets-ping-freq seconds while it waits.
            message = uwsgi.websocket_recv()
            binary = metrics.message_received()
            if not bucket.allow():
                uwsgi.websocket_close(ratelimit.CLOSE_CODE, ratelimit.CLOSE_REASON)
                return
            # The opcode comes with the project's uWSGI patches (0004): binary stays binary.
            # A send to a reader that stopped reading waits at most socket-timeout seconds
            # (UWSGI_SOCKET_TIMEOUT), then fails and ends the connection; meanwhile only this
            # greenlet waits.
            if binary:
                uwsgi.websocket_send_binary(message)
            else:
                uwsgi.websocket_send(message)
            metrics.message_sent(binary)
        except OSError:  # peer closed, pong timeout or write error: the connection is over
            return


def chat_room(environ, start_response):
    return accept(environ, start_response, CHAT_CHECK, talk, environ)


def talk(environ):
    session = chat.Session(HUB, environ[chat.ADMISSION], via="uwsgi")
    try:
        converse(session)
    finally:
        session.end(uwsgi_options.close_status())


READ_BATCH = 32


def converse(session):
    """Relay between the client and the room until either side ends it.

    uWSGI's websocket calls work only from the request's own greenlet, so this greenlet
    waits for either a readable socket or live messages from the room's reader.
    """
    readable = Event()
    watcher = gevent.get_hub().loop.io(uwsgi.connection_fd(), 1)
    watcher.start(readable.set)
    bucket = ratelimit.TokenBucket()
    try:
        for text in session.start():
            send_text(text)
        while True:
            gevent.wait([readable, session.wakeup], count=1, timeout=session.wait_timeout(uwsgi_options.ping_interval()))
            readable.clear()
            # Also on a timeout: the non-blocking receive is where uWSGI sends its pings. At most
            # READ_BATCH messages before the live ones go out: a client that sends a burst
            # must not fall behind its own room while it is read.
            for _ in range(READ_BATCH):
                # try_recv (patch 0016): None is "nothing more to read", b'' an empty message
                payload = uwsgi.websocket_try_recv()
                if payload is None:
                    break
                binary = metrics.message_received()
                if not bucket.allow():
                    raise chat.Close(ratelimit.CLOSE_CODE, ratelimit.CLOSE_REASON.decode())
                reply = session.incoming(payload, binary=binary)
                if reply:
                    send_text(reply)
            else:
                # More may be waiting in uWSGI's buffer, where the socket watcher cannot see it.
                readable.set()
            for text in session.outgoing():
                send_text(text)
    except chat.Close as close:
        try:
            uwsgi.websocket_close(close.code, close.reason.encode())
        except OSError:
            pass
    except OSError:  # peer closed, pong timeout or write error: the connection is over
        pass
    except Exception:  # a bug: the client gets 1011 and reconnects, the log the traceback
        traceback.print_exc(file=sys.stderr)
        try:
            uwsgi.websocket_close(1011, b"internal error")
        except OSError:
            pass
    finally:
        watcher.stop()
        watcher.close()


def send_text(text):
    uwsgi.websocket_send(text.encode())
    metrics.message_sent(binary=False)


def route(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/ws/echo":
        return echo(environ, start_response)
    if path == "/ws/chat":
        return chat_room(environ, start_response)
    if path == "/auth/token":
        return http.respond(start_response, token_issuer.handle(VERIFIER, environ))
    if path == "/healthz":
        return http.respond(start_response, health.report(APP_NAME, environ))
    return http.respond(start_response, http.not_found())


# GET /metrics on the internal socket (METRICS_HTTP_SOCKET) only; everything else goes to route().
application = metrics.with_metrics_endpoint(APP_NAME, route)

"""flask-app: Flask + Flask-uWSGI-WebSocket (through its compatibility layer) on uWSGI/gevent.

Routes (nginx mounts them under /flask/):
  GET /healthz   JSON health, 200 once the app is loaded
  GET /ws/echo   WebSocket: every message comes back unchanged, in order
  GET /ws/chat   WebSocket: chat rooms on the Redis backplane (wsstack.chat, docs/chat.md)
"""
import gevent
from flask import Flask, Response, request

from uwsgi_websocket_compat import BinaryMessage, GeventWebSocket
from wsstack import auth, chat, health, metrics, ratelimit, uwsgi_options

APP_NAME = "flask-app"
HUB = chat.Hub(health.REDIS_URL, health.REDIS_CREDENTIALS)
VERIFIER = auth.Verifier.from_environment(HUB.redis)

app = Flask(__name__)
websocket = GeventWebSocket(app)
# GET /metrics on the internal socket (METRICS_HTTP_SOCKET) only; outermost, so no route sees it.
# The middleware's bound __call__, not the middleware itself: Python 3.11 calls a bound Python
# method in the same interpreter frame, a callable object through C, a C stack frame that every
# idle connection's greenlet keeps a copy of while it waits (about 500 bytes).
app.wsgi_app = metrics.with_metrics_endpoint(APP_NAME, app.wsgi_app.__call__)


@app.get("/healthz")
def healthz():
    status, headers, body = health.report(APP_NAME, request.environ)
    return Response(body, status=status, headers=headers)


@websocket.route("/ws/echo")
def echo(client):
    bucket = ratelimit.TokenBucket()
    while True:
        message = client.receive()
        if message is None:  # connection closed
            return
        if not bucket.allow():
            client.close(ratelimit.CLOSE_CODE, ratelimit.CLOSE_REASON)
            return
        client.send(message)


# The compat layer runs `admit` before the upgrade: no token, a bad one or bad parameters get
# their HTTP status (401, 400) as on uwsgi-app.
@websocket.route("/ws/chat", admit=chat.handshake_check(VERIFIER))
def chat_room(client):
    session = chat.Session(HUB, client.environ[chat.ADMISSION], via="flask")
    forwarder = None
    bucket = ratelimit.TokenBucket()
    try:
        for text in session.start():
            client.send(text)
        # Live messages go out from a greenlet of their own while this one reads the client.
        forwarder = gevent.spawn(forward_live_messages, session, client)
        while True:
            message = client.receive()
            if message is None:  # connection closed
                return
            if not bucket.allow():
                raise chat.Close(ratelimit.CLOSE_CODE, ratelimit.CLOSE_REASON.decode())
            reply = session.incoming(message, binary=isinstance(message, BinaryMessage))
            if reply:
                client.send(reply)
    except chat.Close as close:
        client.close(close.code, close.reason.encode())
    finally:
        if forwarder is not None:
            forwarder.kill()
        session.end(uwsgi_options.close_status())


def forward_live_messages(session, client):
    try:
        while client.connected:
            session.wakeup.wait(timeout=session.wait_timeout(uwsgi_options.ping_interval()))
            for text in session.outgoing():
                client.send(text)
            # Waits until they are written: what a slow client has not taken stays in the
            # session's bounded backlog (CHAT_SEND_BACKLOG), as on uwsgi-app, never in an
            # unbounded send queue.
            client.flush()
    except chat.Close as close:
        client.close(close.code, close.reason.encode())

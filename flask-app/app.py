"""flask-app: Flask + Flask-uWSGI-WebSocket (through its compatibility layer) on uWSGI/gevent.

Routes (nginx mounts them under /flask/):
  GET /healthz   JSON health, 200 once the app is loaded
  GET /ws/echo   WebSocket: every message comes back unchanged, in order
  GET /ws/chat   WebSocket: chat rooms on the Redis backplane (wsstack.chat, docs/chat.md)
"""
import gevent
from flask import Flask, Response

from uwsgi_websocket_compat import BinaryMessage, GeventWebSocket
from wsstack import chat, health, metrics, ratelimit

APP_NAME = "flask-app"
HUB = chat.Hub(health.REDIS_URL)

app = Flask(__name__)
websocket = GeventWebSocket(app)
# GET /metrics on the internal socket (METRICS_HTTP_SOCKET) only; outermost, so no route sees it.
app.wsgi_app = metrics.with_metrics_endpoint(APP_NAME, app.wsgi_app)


@app.get("/healthz")
def healthz():
    status, headers, body = health.report(APP_NAME)
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


@websocket.route("/ws/chat")
def chat_room(client):
    # The package's route runs after the handshake: invalid parameters get close 1008.
    try:
        room, user, last_id = chat.parse_params(client.environ.get("QUERY_STRING", ""))
    except chat.InvalidParams as exc:
        metrics.handshake_failed("chat_params")
        client.close(1008, str(exc).encode())
        return
    session = chat.Session(HUB, room, user, last_id, via="flask")
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
        session.end()


def forward_live_messages(session, client):
    try:
        while client.connected:
            session.wakeup.wait()
            for text in session.outgoing():
                client.send(text)
    except chat.Close as close:
        client.close(close.code, close.reason.encode())

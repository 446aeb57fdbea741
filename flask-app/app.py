"""flask-app: Flask + Flask-uWSGI-WebSocket (through its compatibility layer) on uWSGI/gevent.

Routes (nginx mounts them under /flask/):
  GET /healthz   JSON health, 200 once the app is loaded
  GET /ws/echo   WebSocket: every message comes back unchanged, in order
"""
from flask import Flask, Response

from uwsgi_websocket_compat import GeventWebSocket
from wsstack import health, ratelimit

APP_NAME = "flask-app"

app = Flask(__name__)
websocket = GeventWebSocket(app)


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

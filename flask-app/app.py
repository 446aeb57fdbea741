"""flask-app: Flask + Flask-uWSGI-WebSocket (through its compatibility layer) on uWSGI/gevent.

Routes (nginx mounts them under /flask/):
  GET /healthz   JSON health, 200 once the app is loaded
  GET /ws/echo   WebSocket: every message comes back unchanged, in order
"""
import uwsgi
from flask import Flask, Response

from uwsgi_websocket_compat import GeventWebSocket
from wsstack import health, settings, uwsgi_build

APP_NAME = "flask-app"

uwsgi_build.require_ssl()
settings.check_uwsgi_options(uwsgi.opt)

app = Flask(__name__)
websocket = GeventWebSocket(app)


@app.get("/healthz")
def healthz():
    status, headers, body = health.report(APP_NAME)
    return Response(body, status=status, headers=headers)


@websocket.route("/ws/echo")
def echo(client):
    while True:
        message = client.receive()
        if message is None:  # connection closed
            return
        client.send(message)

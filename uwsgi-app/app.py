"""uwsgi-app: WebSocket echo on uWSGI's native API, no web framework.

Routes (nginx mounts them under /uwsgi/):
  GET /healthz   JSON health, 200 once the app is loaded
  GET /ws/echo   WebSocket: every message comes back unchanged, in order
"""
import uwsgi

from wsstack import capacity, health, http, ratelimit

APP_NAME = "uwsgi-app"
BINARY = 2  # RFC 6455 opcode
# A stock uWSGI (allowed only for comparisons) cannot tell: everything is echoed as text.
message_opcode = getattr(uwsgi, "websocket_opcode", lambda: 1)


def echo(environ, start_response):
    if not http.is_websocket_upgrade(environ):
        return http.respond(start_response, http.upgrade_required())
    refusal = http.handshake_refusal(environ)
    if refusal:
        return http.respond(start_response, refusal)
    with capacity.WORKER.slot() as granted:
        if not granted:
            return http.respond(start_response, capacity.WORKER.refusal())
        uwsgi.websocket_handshake(environ["HTTP_SEC_WEBSOCKET_KEY"], environ.get("HTTP_ORIGIN", ""))
        serve(ratelimit.TokenBucket())
        return []


def serve(bucket):
    while True:
        try:
            # Blocks this greenlet only: uWSGI's gevent plugin makes the wait cooperative,
            # and pings go out every websockets-ping-freq seconds while it waits.
            message = uwsgi.websocket_recv()
            if not bucket.allow():
                uwsgi.websocket_close(ratelimit.CLOSE_CODE, ratelimit.CLOSE_REASON)
                return
            # The opcode comes with the project's uWSGI patches (0004): binary stays binary.
            # A send to a reader that stopped reading waits at most socket-timeout seconds
            # (UWSGI_SOCKET_TIMEOUT), then fails and ends the connection; meanwhile only this
            # greenlet waits.
            if message_opcode() == BINARY:
                uwsgi.websocket_send_binary(message)
            else:
                uwsgi.websocket_send(message)
        except OSError:  # peer closed, pong timeout or write error: the connection is over
            return


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/ws/echo":
        return echo(environ, start_response)
    if path == "/healthz":
        return http.respond(start_response, health.report(APP_NAME))
    return http.respond(start_response, http.not_found())

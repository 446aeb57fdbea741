"""The JSON body both apps answer on /healthz.

The app being able to answer at all proves it loaded (uWSGI runs with need-app).
Redis is reported, not required: the echo path does not use it.
"""
import json
import os
import secrets

import redis

from wsstack.settings import redis_credentials

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
# Read at import, so that a missing password file stops the app at start-up (need-app).
REDIS_CREDENTIALS = redis_credentials()
_redis = redis.Redis.from_url(REDIS_URL, socket_timeout=0.5, socket_connect_timeout=0.5, **REDIS_CREDENTIALS)


def redis_status():
    try:
        _redis.ping()
        return "ok"
    except redis.RedisError as exc:
        return f"unavailable: {exc.__class__.__name__}"


# One per app instance: made at import, which uWSGI does in the master before it forks, so
# every worker of an instance (and a worker it re-forks) reports the same. It tells replicas
# apart without naming processes (the public /healthz carries no PIDs).
INSTANCE = secrets.token_hex(8)
# Set to 1 only by nginx's internal status listener (/healthz/<app>); nginx's public server
# clears whatever a client sends, so the public answer never has the details.
DETAIL_HEADER = "HTTP_X_HEALTH_DETAIL"


def master_pid():
    """The uWSGI master: one per app instance, so it tells replicas apart."""
    try:
        import uwsgi
    except ImportError:
        return None
    return uwsgi.masterpid()


def report(app_name, environ):
    """Return (http status line, headers, body bytes) for the health endpoint: the worker's
    and master's PIDs only when nginx's status listener asks (DETAIL_HEADER)."""
    fields = {"status": "ok", "app": app_name, "instance": INSTANCE, "redis": redis_status()}
    if environ.get(DETAIL_HEADER) == "1":
        fields.update(pid=os.getpid(), master_pid=master_pid())
    body = json.dumps(fields).encode()
    headers = [("Content-Type", "application/json"), ("Cache-Control", "no-store"), ("Content-Length", str(len(body)))]
    return "200 OK", headers, body

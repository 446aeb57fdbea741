"""The JSON body both apps answer on /healthz.

The app being able to answer at all proves it loaded (uWSGI runs with need-app).
Redis is reported, not required: the echo path does not use it.
"""
import json
import os

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


def master_pid():
    """The uWSGI master: one per app instance, so it tells replicas apart."""
    try:
        import uwsgi
    except ImportError:
        return None
    return uwsgi.masterpid()


def report(app_name):
    """Return (http status line, headers, body bytes) for the health endpoint."""
    body = json.dumps({"status": "ok", "app": app_name, "pid": os.getpid(), "master_pid": master_pid(),
                       "redis": redis_status()}).encode()
    headers = [("Content-Type", "application/json"), ("Cache-Control", "no-store"), ("Content-Length", str(len(body)))]
    return "200 OK", headers, body

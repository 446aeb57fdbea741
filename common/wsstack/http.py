"""Plain-HTTP answers and handshake checks shared by both apps' websocket endpoints.

ALLOWED_ORIGINS   comma-separated origins allowed to open WebSockets, e.g.
                  "https://chat.example.com,http://localhost:8080"; default (unset or
                  empty): only the request's own origin (scheme, host and port). Requests without an
                  Origin header (non-browser clients) are always allowed: the check exists
                  against cross-site WebSocket hijacking, which only browsers can be led into.
"""
import base64
import binascii
import os
import urllib.parse


def parse_origins(value):
    origins = set()
    for item in filter(None, (part.strip() for part in value.split(","))):
        parts = urllib.parse.urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"ALLOWED_ORIGINS: {item!r} is not an origin such as https://example.com")
        origins.add(f"{parts.scheme}://{parts.netloc.lower()}")
    return origins


# Fails at import, so uWSGI (need-app) refuses to start with a malformed value.
ALLOWED_ORIGINS = parse_origins(os.environ.get("ALLOWED_ORIGINS", ""))


def plain(status, text, extra_headers=()):
    body = (text + "\n").encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    headers.extend(extra_headers)
    return status, headers, body


def upgrade_required():
    # RFC 7231 6.5.15: 426 must say which protocol to switch to.
    return plain(
        "426 Upgrade Required",
        "This endpoint speaks WebSocket only: send a GET with 'Upgrade: websocket'.",
        [("Upgrade", "websocket"), ("Connection", "Upgrade")],
    )


def bad_handshake(reason):
    return plain("400 Bad Request", f"WebSocket handshake refused: {reason}")


def unauthorized(reason):
    # RFC 9110 15.5.2: a 401 names the scheme; the token travels in Sec-WebSocket-Protocol
    # (wsstack.auth), but it is a bearer token all the same.
    return plain("401 Unauthorized", f"WebSocket handshake refused: {reason}",
                 [("WWW-Authenticate", 'Bearer realm="chat"')])


def unavailable(reason):
    return plain("503 Service Unavailable", f"WebSocket handshake refused: {reason}", [("Retry-After", "5")])


def version_not_supported():
    # RFC 6455 4.4: tell the client which version we speak.
    return plain("426 Upgrade Required", "WebSocket handshake refused: only Sec-WebSocket-Version 13 is supported.",
                 [("Sec-WebSocket-Version", "13")])


def forbidden_origin(origin):
    return plain("403 Forbidden", f"WebSocket handshake refused: origin {origin} is not allowed.")


def valid_key(key):
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def origin_allowed(origin, environ, allowed=None):
    allowed = ALLOWED_ORIGINS if allowed is None else allowed
    parts = urllib.parse.urlsplit(origin)
    normalized = f"{parts.scheme}://{parts.netloc.lower()}"
    if allowed:
        return normalized in allowed
    # Default: the request's own origin, scheme included (nginx passes the client's Host, port
    # included, as X-Forwarded-Host, and its scheme as X-Forwarded-Proto): a page served over
    # http may not open the https site's sockets, which may carry that site's credentials.
    host = environ.get("HTTP_X_FORWARDED_HOST") or environ.get("HTTP_HOST", "")
    scheme = environ.get("HTTP_X_FORWARDED_PROTO") or environ.get("wsgi.url_scheme", "http")
    return bool(host) and parts.scheme == scheme and parts.netloc.lower() == host.lower()


def handshake_refusal(environ, allowed=None):
    """None when the upgrade request may proceed, else (reason, answer): the reason is a
    wsstack.metrics label, the answer a (status, headers, body)."""
    if not valid_key(environ.get("HTTP_SEC_WEBSOCKET_KEY", "")):
        return "bad_key", bad_handshake("missing or malformed Sec-WebSocket-Key (16 bytes, base64)")
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION") != "13":
        return "bad_version", version_not_supported()
    origin = environ.get("HTTP_ORIGIN")
    if origin is not None and not origin_allowed(origin, environ, allowed):
        return "origin", forbidden_origin(origin)
    return None


def not_found():
    return plain("404 Not Found", "Not found.")


def is_websocket_upgrade(environ):
    return environ.get("HTTP_UPGRADE", "").lower() == "websocket"


def respond(start_response, answer):
    """Send one of the (status, headers, body) answers above through a WSGI start_response."""
    status, headers, body = answer
    start_response(status, headers)
    return [body]

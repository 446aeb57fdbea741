"""Plain-HTTP answers shared by both apps' websocket endpoints."""


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


def not_found():
    return plain("404 Not Found", "Not found.")


def is_websocket_upgrade(environ):
    return environ.get("HTTP_UPGRADE", "").lower() == "websocket"


def respond(start_response, answer):
    """Send one of the (status, headers, body) answers above through a WSGI start_response."""
    status, headers, body = answer
    start_response(status, headers)
    return [body]

"""The demo's token issuer: POST /auth/token (nginx rate-limits it per client address).

THIS IS THE PART A DEPLOYMENT REPLACES. It hands a signed token to anyone who asks, for the
display name they ask for: it proves nothing about who the caller is, only that every
message of a connection comes from the holder of one token (nobody can post under another
holder's identity). A real deployment issues tokens from its login (an identity provider,
or its own session) and sets CHAT_AUTH_DEMO_ISSUER=off (docs/chat.md, "Identity").

Request:  {"name": "ada", "ttl": 300}   ttl optional, at most CHAT_AUTH_TOKEN_TTL seconds
          Authorization: Bearer <a token from here, valid or expired at most CHAT_AUTH_TOKEN_TTL
          ago> renews it: same subject (one member in presence, across tabs and renewals).
Answer:   200 {"token": "...", "expires_at": <Unix time>, "user": {"id": "u-...", "name": "ada"}}
          400 with the reason; 404 when the demo issuer is off; 405 for another method.
"""
import json
import secrets

import redis

from wsstack import auth, http

MAX_BODY = 1024


def answer_json(status, document):
    body = (json.dumps(document) + "\n").encode()
    return status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                    ("Cache-Control", "no-store")], body


def read_body(environ):
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = -1
    if not 0 < length <= MAX_BODY:
        raise ValueError(f"send a JSON body of 1-{MAX_BODY} bytes")
    try:
        document = json.loads(environ["wsgi.input"].read(length))
    except ValueError:
        raise ValueError("the body is not JSON") from None
    if not isinstance(document, dict):
        raise ValueError('send {"name": "..."}')
    return document


def renewed_subject(verifier, environ):
    header = environ.get("HTTP_AUTHORIZATION", "")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ValueError("Authorization must be 'Bearer <token>'")
    try:
        # An expired token may be renewed for as long again as a token lives.
        return verifier.verify(token.strip(), leeway=verifier.settings.ttl).id
    except auth.Unauthorized as exc:
        raise ValueError(f"cannot renew: {exc}") from None


def handle(verifier, environ):
    """(status, headers, body) for one request to /auth/token."""
    if not verifier.settings.demo_issuer:
        return http.plain("404 Not Found", "The demo token issuer is off (CHAT_AUTH_DEMO_ISSUER=off).")
    if environ.get("REQUEST_METHOD") != "POST":
        return http.plain("405 Method Not Allowed", "POST a JSON body {\"name\": \"...\"}.", [("Allow", "POST")])
    try:
        request = read_body(environ)
        name = request.get("name")
        if not auth.valid_name(name):
            raise ValueError(f"name must be 1-{auth.MAX_NAME} printable characters")
        ttl = request.get("ttl", verifier.settings.ttl)
        if type(ttl) is not int or not 1 <= ttl <= verifier.settings.ttl:
            raise ValueError(f"ttl must be a whole number of seconds from 1 to {verifier.settings.ttl}")
        subject = renewed_subject(verifier, environ) or f"u-{secrets.token_hex(8)}"
    except ValueError as exc:
        return http.plain("400 Bad Request", f"token refused: {exc}")
    try:
        token, expires_at = verifier.issue(subject, name, ttl)
    except redis.RedisError:  # the default secret lives in Redis (auth.SharedSecret)
        return http.unavailable("chat backplane unavailable; retry later")
    return answer_json("200 OK", {"token": token, "expires_at": expires_at, "user": {"id": subject, "name": name}})

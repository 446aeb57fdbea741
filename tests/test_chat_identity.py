"""Chat identity through nginx, both backends (any mode): only a valid token gets in, the
token's user is the only identity, an expired token ends the connection, and the demo issuer
answers bad requests with a reason."""
import base64
import json
import time
import urllib.error
import urllib.request

import jwt
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from chat_client import (BACKENDS, NO_CLIENT_PINGS, SUBPROTOCOL, ChatClient, chat_url, new_room, protocol_header,
                         protocols, request_token, token)
from stack import BASE_URL
from wsstack.rawws import HandshakeError, RawWebSocket


def refused(backend, headers):
    with pytest.raises(HandshakeError) as error:
        RawWebSocket(chat_url(backend, new_room()), headers=headers)
    return error.value


def claims_of(token_text):
    return jwt.decode(token_text, options={"verify_signature": False})


def with_claims(token_text, **changes):
    """The token with its payload changed and its signature kept (a tampered token)."""
    header, _payload, signature = token_text.split(".")
    payload = base64.urlsafe_b64encode(json.dumps({**claims_of(token_text), **changes}).encode()).rstrip(b"=").decode()
    return f"{header}.{payload}.{signature}"


def forged_tokens():
    real = token("victim")["token"]
    claims = claims_of(real)
    return {
        "other secret": jwt.encode(claims, "an attacker's secret of thirty-two bytes!", algorithm="HS256"),
        "alg none": jwt.encode(claims, None, algorithm="none"),
        "tampered name": with_claims(real, name="admin"),
        "tampered expiry": with_claims(real, exp=claims["exp"] + 86400),
        "not a JWT": "abc.def",
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_handshake_without_a_token_gets_401_with_the_reason(backend):
    answer = refused(backend, {})
    assert answer.status == 401
    assert "no token" in answer.body.decode() and "/auth/token" in answer.body.decode()
    assert answer.headers["www-authenticate"][0].startswith("Bearer")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_token_without_the_chat_subprotocol_gets_401(backend):
    answer = refused(backend, {"Sec-WebSocket-Protocol": f"bearer.{token('plain')['token']}"})
    assert answer.status == 401 and SUBPROTOCOL in answer.body.decode()


@pytest.mark.parametrize("backend", BACKENDS)
def test_forged_and_tampered_tokens_get_401(backend):
    for name, forged in forged_tokens().items():
        answer = refused(backend, protocol_header(forged))
        assert answer.status == 401, name
        assert "invalid token" in answer.body.decode(), (name, answer.body)


def test_an_expired_token_gets_401_saying_so():
    document = token("short-lived", ttl=1)
    # The server allows CHAT_TOKEN_LEEWAY (10 s) of clock skew at the handshake.
    time.sleep(12)
    for backend in BACKENDS:
        answer = refused(backend, protocol_header(document["token"]))
        assert answer.status == 401 and "token expired" in answer.body.decode(), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_server_selects_the_chat_subprotocol(backend):
    with connect(chat_url(backend, new_room()), subprotocols=protocols(token("selector")["token"]),
                 **NO_CLIENT_PINGS) as ws:
        assert ws.subprotocol == SUBPROTOCOL


def test_the_name_and_id_of_every_message_come_from_the_token():
    room = new_room()
    ada = token("ada")
    with ChatClient("uwsgi", room, "ada") as sender, ChatClient("flask", room, "reader") as reader:
        assert sender.uid == ada["user"]["id"]
        # A client cannot name itself in a message: extra fields are ignored.
        sender.ws.send(json.dumps({"type": "message", "text": "hello", "user": "mallory", "uid": "u-0"}))
        for client in (sender, reader):
            message = client.messages(1)[0]
            assert (message["user"], message["uid"], message["text"]) == ("ada", ada["user"]["id"], "hello")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_token_that_expires_while_connected_closes_with_4001(backend):
    document = token("expiring", ttl=3)
    with ChatClient(backend, new_room(), "expiring", token_document=document) as client:
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                client.next_event(timeout=15)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
        assert "token expired" in closed.value.rcvd.reason
        assert time.monotonic() - started < 10  # at its expiry, not at the next ping or later


def test_the_issuer_renews_a_token_with_the_same_identity():
    first = token("renewing", fresh=True)
    status, renewed = request_token("renewing again", renew=first["token"])
    assert status == 200
    assert renewed["user"] == {"id": first["user"]["id"], "name": "renewing again"}
    assert renewed["token"] != first["token"]
    status, text = request_token("thief", renew=with_claims(first["token"], sub="u-someone-else"))
    assert status == 400 and "cannot renew" in text


def post(path, body, headers=None, method="POST"):
    request = urllib.request.Request(BASE_URL + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


BAD_TOKEN_REQUESTS = [
    (b"", "JSON body"),
    (b"not json", "not JSON"),
    (b"[1, 2]", 'send {"name"'),
    (json.dumps({}).encode(), "name must be"),
    (json.dumps({"name": ""}).encode(), "name must be"),
    (json.dumps({"name": "x" * 33}).encode(), "name must be"),
    (json.dumps({"name": "line\nbreak"}).encode(), "name must be"),
    (b'{"name": "\\ud800"}', "name must be"),
    (json.dumps({"name": "ok", "ttl": 0}).encode(), "ttl must be"),
    (json.dumps({"name": "ok", "ttl": 10 ** 9}).encode(), "ttl must be"),
    (json.dumps({"name": "ok", "ttl": "60"}).encode(), "ttl must be"),
    (json.dumps({"name": "ok", "ttl": True}).encode(), "ttl must be"),
]


@pytest.mark.parametrize("body, reason", BAD_TOKEN_REQUESTS, ids=[str(i) for i in range(len(BAD_TOKEN_REQUESTS))])
def test_the_issuer_refuses_bad_requests_with_a_reason(body, reason):
    status, text = post("/auth/token", body, {"Content-Type": "application/json"})
    assert status == 400 and reason in text, (status, text)


def test_the_issuer_takes_only_small_posts():
    assert post("/auth/token", None, method="GET")[0] == 405
    assert post("/auth/token", json.dumps({"name": "x" * 2000}).encode())[0] == 413  # nginx: client_max_body_size

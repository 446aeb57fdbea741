"""wsstack.auth on its own (local mode): the settings that must stop the apps at start-up,
and verification with the key kinds a real identity provider uses (a PEM public key, a JWKS
URL), with `aud`/`iss` when configured."""
import http.server
import json
import threading
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from wsstack import auth

pytestmark = pytest.mark.local

SECRET = "s" * 32


def verifier(**environ):
    return auth.Verifier.from_environment(redis_client=None, environ=environ)


def claims(**extra):
    now = int(time.time())
    return {"sub": "u-1", "name": "ada", "iat": now, "exp": now + 60, **extra}


@pytest.mark.parametrize("environ, message", [
    ({"CHAT_TOKEN_ALGORITHMS": "none"}, "choose from"),
    ({"CHAT_TOKEN_ALGORITHMS": ""}, "choose from"),
    ({"CHAT_TOKEN_ALGORITHMS": "HS256,RS256"}, "cannot be mixed"),
    ({"CHAT_TOKEN_SECRET": "short"}, "at least 32 bytes"),
    ({"CHAT_TOKEN_SECRET": SECRET, "CHAT_TOKEN_SECRET_FILE": "/x"}, "only one of"),
    ({"CHAT_TOKEN_SECRET_FILE": "/nonexistent/secret"}, "cannot read"),
    ({"CHAT_TOKEN_PUBLIC_KEY_FILE": "/x"}, "public-key algorithms"),
    ({"CHAT_TOKEN_ALGORITHMS": "RS256", "CHAT_TOKEN_DEMO_ISSUER": "off"}, "needs CHAT_TOKEN_PUBLIC_KEY_FILE"),
    ({"CHAT_TOKEN_ALGORITHMS": "RS256", "CHAT_TOKEN_JWKS_URL": "http://127.0.0.1:1/"}, "DEMO_ISSUER=on needs an HMAC"),
    ({"CHAT_TOKEN_DEMO_ISSUER": "yes"}, "on or off"),
    ({"CHAT_TOKEN_TTL": "5"}, "CHAT_TOKEN_TTL"),
    ({"CHAT_TOKEN_LEEWAY": "-1"}, "CHAT_TOKEN_LEEWAY"),
])
def test_invalid_settings_are_refused_at_start_up(environ, message):
    with pytest.raises(ValueError, match=message):
        verifier(**environ)


def test_a_secret_from_a_file_verifies_and_nothing_else_does(tmp_path):
    (tmp_path / "secret").write_text(SECRET + "\n")  # a trailing newline, as editors leave it
    check = verifier(CHAT_TOKEN_SECRET_FILE=str(tmp_path / "secret"))
    assert check.verify(jwt.encode(claims(), SECRET, algorithm="HS256")) == ("u-1", "ada", claims()["exp"])
    for forged in (jwt.encode(claims(), "t" * 32, algorithm="HS256"), jwt.encode(claims(), SECRET, algorithm="HS512"),
                   jwt.encode(claims(), None, algorithm="none")):
        with pytest.raises(auth.Unauthorized, match="invalid token"):
            check.verify(forged)


@pytest.mark.parametrize("missing", ["exp", "sub"])
def test_tokens_must_say_who_and_until_when(missing):
    token = jwt.encode({k: v for k, v in claims().items() if k != missing}, SECRET, algorithm="HS256")
    with pytest.raises(auth.Unauthorized, match=missing):
        verifier(CHAT_TOKEN_SECRET=SECRET).verify(token)


def test_a_name_the_chat_cannot_show_is_refused():
    for name in ("", "x" * 33, "tab\there", 42):
        with pytest.raises(auth.Unauthorized, match="name must be"):
            verifier(CHAT_TOKEN_SECRET=SECRET).verify(jwt.encode(claims(name=name), SECRET, algorithm="HS256"))


def test_audience_and_issuer_are_required_once_configured():
    check = verifier(CHAT_TOKEN_SECRET=SECRET, CHAT_TOKEN_AUDIENCE="chat", CHAT_TOKEN_ISSUER="https://idp.example")
    good = claims(aud="chat", iss="https://idp.example")
    assert check.verify(jwt.encode(good, SECRET, algorithm="HS256")).id == "u-1"
    for bad in ({**good, "aud": "other"}, {**good, "iss": "https://evil.example"},
                {k: v for k, v in good.items() if k != "aud"}):
        with pytest.raises(auth.Unauthorized):
            check.verify(jwt.encode(bad, SECRET, algorithm="HS256"))


def pem_public(key):
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_an_identity_providers_rs256_tokens_verify_with_its_public_key(tmp_path):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "idp.pem").write_bytes(pem_public(private))
    check = verifier(CHAT_TOKEN_ALGORITHMS="RS256", CHAT_TOKEN_PUBLIC_KEY_FILE=str(tmp_path / "idp.pem"),
                     CHAT_TOKEN_DEMO_ISSUER="off", CHAT_TOKEN_NAME_CLAIM="preferred_username")
    token = jwt.encode({**claims(), "preferred_username": "grace"}, private, algorithm="RS256")
    assert check.verify(token).name == "grace"
    # Algorithm confusion: the public key used as an HMAC secret must not verify.
    with pytest.raises(auth.Unauthorized):
        check.verify(_hs256_with_key(pem_public(private)))


def _hs256_with_key(key_bytes):
    # PyJWT refuses to sign HMAC with a PEM key, so the confused token is assembled by hand.
    import base64
    import hashlib
    import hmac

    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims()).encode())}"
    return f"{signing_input}.{b64(hmac.new(key_bytes, signing_input.encode(), hashlib.sha256).digest())}"


def test_a_jwks_url_serves_the_keys_by_kid():
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    jwks = json.dumps({"keys": [{**jwk, "kid": "key-1", "use": "sig", "alg": "ES256"}]}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(jwks)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check = verifier(CHAT_TOKEN_ALGORITHMS="ES256", CHAT_TOKEN_DEMO_ISSUER="off",
                         CHAT_TOKEN_JWKS_URL=f"http://127.0.0.1:{server.server_port}/jwks.json")
        token = jwt.encode(claims(), private, algorithm="ES256", headers={"kid": "key-1"})
        assert check.verify(token).id == "u-1"
        unknown = jwt.encode(claims(), private, algorithm="ES256", headers={"kid": "key-2"})
        with pytest.raises(auth.Unauthorized, match="no key"):
            check.verify(unknown)
    finally:
        server.shutdown()


class FakeRedis:
    """SET NX GET, the one command SharedSecret uses."""

    def __init__(self):
        self.values = {}

    def set(self, key, value, nx, get):
        existing = self.values.get(key)
        if existing is None:
            self.values[key] = value.encode()
        return existing


def test_processes_without_a_secret_setting_agree_on_one_through_redis():
    shared = FakeRedis()
    one, two = verifier(), verifier()
    one.keys.redis = two.keys.redis = shared
    token, _ = one.issue("u-7", "ada", 60)
    assert two.verify(token).id == "u-7"
    # A Redis that lost it makes a new one; the old tokens stop working.
    shared.values.clear()
    two.keys.read_at -= auth.SECRET_REFRESH_SECONDS
    three = verifier()
    three.keys.redis = shared
    newer, _ = three.issue("u-8", "bob", 60)
    assert two.verify(newer).id == "u-8"  # re-read after the signature failure
    with pytest.raises(auth.Unauthorized):
        two.verify(token)

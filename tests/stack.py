"""Helpers for talking to the stack under test through nginx."""
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

BASE_URL = os.environ.get("STACK_BASE_URL", "http://127.0.0.1:8080").rstrip("/")
WS_BASE_URL = "ws" + BASE_URL[len("http"):]
# nginx's TLS port, and the CA its certificate is signed by (make test: the development CA).
TLS_BASE_URL = os.environ.get("STACK_TLS_BASE_URL", "https://127.0.0.1:8443").rstrip("/")
WSS_BASE_URL = "wss" + TLS_BASE_URL[len("https"):]
TLS_CA_FILE = os.environ.get("STACK_TLS_CA_FILE", ".run/tls/ca.crt")


def nginx_seconds(value):
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value).groups()
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[unit]


PROXY_READ_TIMEOUT = nginx_seconds(os.environ.get("NGINX_PROXY_READ_TIMEOUT", "60s"))
PING_FREQ = int(os.environ.get("UWSGI_WEBSOCKETS_PING_FREQ", "20"))


def ws_url(backend, endpoint="echo"):
    return f"{WS_BASE_URL}/{backend}/ws/{endpoint}"


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes


def http_get(path, headers=None, timeout=10):
    request = urllib.request.Request(BASE_URL + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as err:
        return Response(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())

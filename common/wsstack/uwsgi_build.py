"""Fail at start-up, not at the first handshake, when uWSGI was built without SSL.

uWSGI computes Sec-WebSocket-Accept with OpenSSL's SHA-1; a binary compiled without
libssl-dev silently lacks it and every `uwsgi.websocket_handshake()` raises IOError.
"""
import os
import subprocess


class UwsgiBuildError(RuntimeError):
    pass


def uwsgi_binary():
    # Inside uWSGI, /proc/self/exe is the uwsgi binary whatever the PATH or virtualenv says.
    return os.readlink("/proc/self/exe")


def build_cflags(binary=None):
    result = subprocess.run(
        [binary or uwsgi_binary(), "--cflags"], capture_output=True, text=True, timeout=10, check=True
    )
    return result.stdout.split()


def require_ssl(binary=None):
    binary = binary or uwsgi_binary()
    if "-DUWSGI_SSL" not in build_cflags(binary):
        raise UwsgiBuildError(
            f"{binary} was built without SSL support, so the WebSocket handshake cannot work. "
            "Install libssl-dev (Debian) and rebuild: pip install --no-binary uwsgi --no-cache-dir uwsgi"
        )

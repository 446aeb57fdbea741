"""The local stack's Redis, for the @pytest.mark.local tests that look behind the chat's back.

Its default user can run nothing (redis/redis-start.sh): these helpers authenticate as the
admin user scripts/stack.py makes in local mode, with the password it generated in
LOCAL_RUN_DIR/secrets, and pass the password through REDISCLI_AUTH (never as an argument)."""
import os
import signal
import subprocess
import time
from pathlib import Path

from repo import REPO, free_port

REDIS_PORT = int(os.environ.get("LOCAL_REDIS_PORT", "6379"))
SECRETS_DIR = Path(os.environ.get("LOCAL_RUN_DIR", REPO / ".run")).resolve() / "secrets"
APP_PASSWORD_FILE = SECRETS_DIR / "redis-password"
ADMIN_PASSWORD_FILE = SECRETS_DIR / "redis-admin-password"
APP_USER = os.environ.get("REDIS_USERNAME", "chat")


def password(path):
    return Path(path).read_text().rstrip("\n")


def cli(*args, port=REDIS_PORT, user="admin", input=None, timeout=30):
    """redis-cli as `user` (admin, the apps' user, or None: not authenticated); returns the
    CompletedProcess (text)."""
    argv, env = ["redis-cli", "-p", str(port)], dict(os.environ)
    env.pop("REDISCLI_AUTH", None)
    if user is not None:
        argv += ["--user", user, "--no-auth-warning"]
        env["REDISCLI_AUTH"] = password(ADMIN_PASSWORD_FILE if user == "admin" else APP_PASSWORD_FILE)
    return subprocess.run(argv + list(args), input=input, env=env, capture_output=True, text=True, timeout=timeout)


def admin(*args, port=REDIS_PORT):
    """An admin command's output (stripped); fails the test if redis-cli failed."""
    result = cli(*args, port=port)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def admin_client(port=REDIS_PORT):
    # Imported here: the tests image has no redis-py, and it collects the modules that use this.
    import redis

    return redis.Redis(host="127.0.0.1", port=port, username="admin", password=password(ADMIN_PASSWORD_FILE))


class OwnRedis:
    """A redis-server of a test's own, started by redis/redis-start.sh as the stack starts its
    own: the same users and passwords (the apps of the test authenticate with the stack's
    settings), REDIS_APPENDONLY as given; `extra` goes to redis-server."""

    def __init__(self, directory, appendonly="no", extra=()):
        self.port, self.directory, self.process = free_port(), directory, None
        self.appendonly, self.extra = appendonly, list(extra)

    def start(self):
        env = dict(os.environ, REDIS_USERNAME=APP_USER, REDIS_PASSWORD_FILE=str(APP_PASSWORD_FILE),
                   REDIS_ADMIN_PASSWORD_FILE=str(ADMIN_PASSWORD_FILE), REDIS_MAXMEMORY="64mb",
                   REDIS_APPENDONLY=self.appendonly)
        self.process = subprocess.Popen(
            ["sh", str(REPO / "redis" / "redis-start.sh"), "--bind", "127.0.0.1", "--port", str(self.port),
             "--dir", str(self.directory), *self.extra],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while "PONG" not in cli("PING", port=self.port).stdout:
            assert self.process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=10)

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

"""Environment settings of the apps, checked when a module reads them (at import: a malformed
value stops uWSGI at start-up, because it runs with need-app)."""
import os


def whole_number(name, raw, minimum):
    if not raw.isdigit() or int(raw) < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {raw!r}")
    return int(raw)


def env_whole_number(name, default, minimum=1):
    return whole_number(name, os.environ.get(name, default), minimum)


def redis_credentials(environ=os.environ):
    """redis-py connection options for the apps' Redis user (docs/configuration.md):
    REDIS_USERNAME (default chat) with the password in REDIS_PASSWORD_FILE. That file unset or
    empty: no AUTH, for a Redis whose default user is open (a test's own, a bare deployment).
    A file that is named but missing, unreadable or empty stops the app at start-up."""
    path = environ.get("REDIS_PASSWORD_FILE", "")
    # No CLIENT SETINFO on connect: the apps' user may not run it (redis/redis-start.sh).
    options = {"driver_info": None}
    if not path:
        return options
    username = environ.get("REDIS_USERNAME", "chat")
    if not username or not username.replace("-", "").replace("_", "").isalnum() or not username.isascii():
        raise ValueError(f"REDIS_USERNAME={username!r}: letters, digits, _ and - only")
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise ValueError(f"REDIS_PASSWORD_FILE={path}: cannot read it: {exc.strerror}") from None
    # What redis/redis-start.sh hashes: the content without its trailing newlines.
    try:
        password = raw.decode("utf-8").rstrip("\n")
    except UnicodeDecodeError:
        raise ValueError(f"REDIS_PASSWORD_FILE={path}: the password is not UTF-8 text") from None
    if not password:
        raise ValueError(f"REDIS_PASSWORD_FILE={path}: the file is empty")
    return dict(options, username=username, password=password)

"""Environment settings of the apps, checked when a module reads them (at import: a malformed
value stops uWSGI at start-up, because it runs with need-app)."""
import os


def whole_number(name, raw, minimum):
    if not raw.isdigit() or int(raw) < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {raw!r}")
    return int(raw)


def env_whole_number(name, default, minimum=1):
    return whole_number(name, os.environ.get(name, default), minimum)

"""Start-up validation of the uWSGI settings that come from the environment.

uWSGI turns a malformed number into 0 (or worse, a working but wrong value) without a
word; the apps call `check_uwsgi_options()` at import, so with need-app a bad value
stops uWSGI at start-up with a message naming the variable.
"""

# option -> (environment variable, smallest valid value)
NUMERIC_OPTIONS = {
    "processes": ("UWSGI_PROCESSES", 1),
    "gevent": ("UWSGI_GEVENT", 1),
    "websockets-max-size": ("UWSGI_WEBSOCKETS_MAX_SIZE", 1),
    "websockets-ping-freq": ("UWSGI_WEBSOCKETS_PING_FREQ", 1),
    "websockets-pong-tolerance": ("UWSGI_WEBSOCKETS_PONG_TOLERANCE", 1),
    "worker-reload-mercy": ("UWSGI_WORKER_RELOAD_MERCY", 1),
}


class SettingsError(ValueError):
    pass


def _text(value):
    if isinstance(value, (list, tuple)):  # an option given twice
        raise SettingsError(f"given more than once: {value!r}")
    return value.decode() if isinstance(value, bytes) else str(value)


def check_uwsgi_options(options):
    """`options` is uwsgi.opt: option name -> value as uWSGI parsed it."""
    for option, (env_name, minimum) in NUMERIC_OPTIONS.items():
        if option not in options:
            continue
        try:
            raw = _text(options[option])
            value = int(raw)
        except (SettingsError, ValueError) as exc:
            raise SettingsError(f"{env_name} (uWSGI option {option}) must be a whole number, got {options[option]!r}") from exc
        if value < minimum:
            raise SettingsError(f"{env_name} (uWSGI option {option}) must be at least {minimum}, got {value}")

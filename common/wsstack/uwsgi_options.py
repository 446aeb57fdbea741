"""uWSGI options as the running server sees them (`uwsgi.opt`), for code shared by both apps.

Outside uWSGI (tools, unit tests) there is no `uwsgi` module: every option is then unset.
"""


def option(name):
    try:
        import uwsgi
    except ImportError:
        return None
    value = uwsgi.opt.get(name)
    if isinstance(value, list):  # given more than once: the last one wins
        value = value[-1]
    return value.decode() if isinstance(value, bytes) else value


def ping_interval():
    """Seconds between uWSGI's pings (websockets-ping-freq; uWSGI's default is 30)."""
    value = option("websockets-ping-freq")
    return float(value) if value else 30.0


def gevent_cores():
    """Gevent cores per worker (None when not running under uWSGI's gevent loop)."""
    value = option("gevent")
    return int(value) if value else None

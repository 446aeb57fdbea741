"""uWSGI options as the running server sees them (`uwsgi.opt`), for code shared by both apps.

Outside uWSGI (tools, unit tests) there is no `uwsgi` module: every option is then unset.
"""
BINARY = 2  # RFC 6455 opcode


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


def last_message_is_binary():
    """Whether the message just received came in binary frames (uwsgi.websocket_opcode() from
    the project's patch 0004; a stock uWSGI cannot tell, and everything counts as text)."""
    import uwsgi

    opcode = getattr(uwsgi, "websocket_opcode", None)
    return opcode is not None and opcode() == BINARY


def gevent_cores():
    """Gevent cores per worker (None when not running under uWSGI's gevent loop)."""
    value = option("gevent")
    return int(value) if value else None


def close_status():
    """(code, sent by the peer) of this connection's first close frame, or None (no close
    frame, or a stock uWSGI, which cannot say: patch 0011)."""
    import uwsgi

    return getattr(uwsgi, "websocket_close_status", lambda: None)()

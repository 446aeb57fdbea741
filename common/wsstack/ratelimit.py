"""Per-connection message-rate limit, shared by both apps' WebSocket handlers.

WS_MAX_MESSAGES_PER_SECOND   sustained messages per second one connection may send (default 100)
WS_MESSAGE_BURST             messages it may send at once above that rate (default 200)
Beyond them the app closes the connection with 1008 (policy violation). Both are read at
import, so a malformed value stops uWSGI at start-up (need-app).
"""
import os
import time

CLOSE_CODE = 1008
CLOSE_REASON = b"message rate limit exceeded"


def _positive_int(name, default):
    raw = os.environ.get(name, default)
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {raw!r}")
    return int(raw)


MAX_MESSAGES_PER_SECOND = _positive_int("WS_MAX_MESSAGES_PER_SECOND", "100")
MESSAGE_BURST = _positive_int("WS_MESSAGE_BURST", "200")


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; each message takes one."""

    def __init__(self, rate=MAX_MESSAGES_PER_SECOND, burst=MESSAGE_BURST, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.updated = float(burst), clock()

    def allow(self):
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

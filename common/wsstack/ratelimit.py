"""Per-connection message-rate limit, shared by both apps' WebSocket handlers.

WS_MAX_MESSAGES_PER_SECOND   sustained messages per second one connection may send (default 100)
WS_MESSAGE_BURST             messages it may send at once above that rate (default 200)
Beyond them the app closes the connection with 1008 (policy violation). Both are read at
import, so a malformed value stops uWSGI at start-up (need-app).
"""
import time

from wsstack.settings import env_whole_number

CLOSE_CODE = 1008
CLOSE_REASON = b"message rate limit exceeded"


MAX_MESSAGES_PER_SECOND = env_whole_number("WS_MAX_MESSAGES_PER_SECOND", "100")
MESSAGE_BURST = env_whole_number("WS_MESSAGE_BURST", "200")


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; each message takes one."""

    # one per connection, idle ones included: no instance dict
    __slots__ = ("rate", "burst", "clock", "tokens", "updated")

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

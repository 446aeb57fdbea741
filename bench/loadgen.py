"""The load generator: picows clients on one asyncio loop.

Every workload is bounded in connections and time and only ever targets loopback URLs.
Latencies are recorded in microseconds into HDR histograms (1 us .. 60 s, 3 digits).
"""
import asyncio
import json
import time

from hdrh.histogram import HdrHistogram
from picows import WSCloseCode, WSListener, WSMsgType, ws_connect

CONNECT_CONCURRENCY = 100  # handshakes in flight at once while opening many connections
DATA = (WSMsgType.BINARY, WSMsgType.TEXT)


def new_histogram():
    return HdrHistogram(1, 60_000_000, 3)


CURVE = (50, 75, 90, 95, 99, 99.5, 99.9, 99.99)  # the latency distribution kept for plots


def percentiles(histogram):
    if histogram.get_total_count() == 0:
        return {"p50_us": None, "p99_us": None, "p999_us": None, "curve_us": {}}
    return {"p50_us": histogram.get_value_at_percentile(50), "p99_us": histogram.get_value_at_percentile(99),
            "p999_us": histogram.get_value_at_percentile(99.9),
            "curve_us": {str(p): histogram.get_value_at_percentile(p) for p in CURVE}}


async def connect_many(urls, listener_factory, count):
    """Open `count` connections spread round-robin over `urls`; returns the listeners."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(i):
        async with gate:
            _transport, listener = await ws_connect(listener_factory, urls[i % len(urls)], max_frame_size=2 << 20,
                                                    websocket_handshake_timeout=30)
            return listener

    return await asyncio.gather(*(one(i) for i in range(count)))


def close_all(listeners):
    for listener in listeners:
        if not listener.transport.is_disconnected:
            listener.transport.send_close(WSCloseCode.OK)
            listener.transport.disconnect()


class Tracked(WSListener):
    """A listener that remembers its transport and whether the server dropped it."""

    def __init__(self):
        self.transport = None
        self.dropped = False
        self.closing = False

    def on_ws_connected(self, transport):
        self.transport = transport

    def on_ws_disconnected(self, transport):
        if not self.closing:
            self.dropped = True


class EchoRun:
    def __init__(self):
        self.running, self.measuring = True, False
        self.count = 0
        self.histogram = new_histogram()
        self.done = asyncio.Event()
        self.active = 0


class EchoClient(Tracked):
    """Closed loop: the next message goes out as soon as the previous echo is back."""

    def __init__(self, run, payload):
        super().__init__()
        self.run, self.payload, self.sent_at = run, payload, 0

    def send_next(self):
        self.sent_at = time.perf_counter_ns()
        self.transport.send(WSMsgType.BINARY, self.payload)

    def on_ws_frame(self, transport, frame):
        if frame.msg_type not in DATA:
            return
        now = time.perf_counter_ns()
        if self.run.measuring:
            self.run.count += 1
            self.run.histogram.record_value(max(1, (now - self.sent_at) // 1000))
        if self.run.running:
            self.send_next()
        else:
            self.run.active -= 1
            if self.run.active == 0:
                self.run.done.set()


async def echo(url, connections, size, warmup, duration):
    """Closed-loop echo: messages/s over `duration` after `warmup`, and latency percentiles."""
    run = EchoRun()
    payload = b"x" * size
    clients = await connect_many([url], lambda: EchoClient(run, payload), connections)
    try:
        run.active = len(clients)
        for client in clients:
            client.send_next()
        await asyncio.sleep(warmup)  # discarded: connections and caches settle
        run.measuring = True
        started = time.perf_counter()
        await asyncio.sleep(duration)
        run.measuring = False
        elapsed = time.perf_counter() - started
        run.running = False
        await asyncio.wait_for(run.done.wait(), timeout=30)
        dropped = sum(client.dropped for client in clients)
    finally:
        for client in clients:
            client.closing = True
        close_all(clients)
    return {"messages_per_second": run.count / elapsed, **percentiles(run.histogram), "dropped": dropped}


async def open_idle(urls, count):
    """`count` connections that send nothing (uWSGI's pings are answered by picows)."""
    return await connect_many(urls, Tracked, count)


class Subscriber(Tracked):
    def __init__(self, histogram, received):
        super().__init__()
        self.histogram, self.received, self.ready = histogram, received, asyncio.Event()

    def on_ws_frame(self, transport, frame):
        if frame.msg_type != WSMsgType.TEXT:
            return
        event = json.loads(frame.get_payload_as_utf8_text())
        if event.get("type") == "history_end":
            self.ready.set()
        elif event.get("type") == "message" and event["text"].startswith("bench "):
            sent_ns = int(event["text"].split()[1])
            self.histogram.record_value(max(1, (time.perf_counter_ns() - sent_ns) // 1000))
            self.received[0] += 1


async def fanout(sender_url, subscriber_urls, subscribers, messages, interval):
    """One sender, `subscribers` clients of the same room: delivery latency of each message
    to each subscriber (send to receive, one clock: all in this process)."""
    histogram, received = new_histogram(), [0]
    listeners = await connect_many(subscriber_urls, lambda: Subscriber(histogram, received), subscribers)
    sender = (await connect_many([sender_url], Tracked, 1))[0]
    try:
        # Every subscriber must have its history before the first message goes out; one that
        # does not within the minute is reported, not waited for forever.
        deadline = time.monotonic() + 60
        while not all(listener.ready.is_set() for listener in listeners) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        ready = sum(listener.ready.is_set() for listener in listeners)
        for _ in range(messages):
            text = f"bench {time.perf_counter_ns()}"
            sender.transport.send(WSMsgType.TEXT, json.dumps({"type": "message", "text": text}).encode())
            await asyncio.sleep(interval)
        deadline = time.monotonic() + 30
        while received[0] < messages * ready and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        dropped = sum(listener.dropped for listener in listeners)
    finally:
        for listener in listeners + [sender]:
            listener.closing = True
        close_all(listeners + [sender])
    return {"subscribers_ready": ready, "deliveries": received[0], "expected": messages * subscribers,
            **percentiles(histogram), "dropped": dropped}


async def handshakes(url, concurrency, duration):
    """Open and close connections back to back from `concurrency` loops: handshakes/s."""
    done, failed = [0], [0]
    deadline = time.monotonic() + duration

    async def loop():
        while time.monotonic() < deadline:
            try:
                transport, listener = await ws_connect(Tracked, url, websocket_handshake_timeout=10)
                listener.closing = True
                transport.send_close()
                transport.disconnect()
                done[0] += 1
            except (OSError, asyncio.TimeoutError, RuntimeError):
                failed[0] += 1

    started = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return {"handshakes_per_second": done[0] / (time.monotonic() - started), "failed": failed[0]}

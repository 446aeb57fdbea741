"""The load generator: picows clients on one asyncio loop.

Every workload is bounded in connections and time and only ever targets loopback URLs.
Latencies are recorded in microseconds into HDR histograms (1 us .. 60 s, 3 digits).
"""
import asyncio
import json
import random
import time

from hdrh.histogram import HdrHistogram
from picows import WSCloseCode, WSError, WSListener, WSMsgType, ws_connect

CONNECT_CONCURRENCY = 100  # handshakes in flight at once while opening many connections
DATA = (WSMsgType.BINARY, WSMsgType.TEXT)
SUBPROTOCOL = "wsstack.chat.v1"  # wsstack.auth.SUBPROTOCOL
# The demo client's backoff (nginx/html/chat.js): the first retry within 0.5 s, doubling to 10 s.
BACKOFF_FIRST_MS, BACKOFF_MAX_MS = 500, 10000
CONNECT_ERRORS = (OSError, asyncio.TimeoutError, WSError)  # refused, timed out, or not a 101 (nginx's 502)


def new_histogram():
    return HdrHistogram(1, 60_000_000, 3)


CURVE = (50, 75, 90, 95, 99, 99.5, 99.9, 99.99)  # the latency distribution kept for plots


def percentiles(histogram):
    if histogram.get_total_count() == 0:
        return {"p50_us": None, "p99_us": None, "p999_us": None, "curve_us": {}}
    return {"p50_us": histogram.get_value_at_percentile(50), "p99_us": histogram.get_value_at_percentile(99),
            "p999_us": histogram.get_value_at_percentile(99.9),
            "curve_us": {str(p): histogram.get_value_at_percentile(p) for p in CURVE}}


def chat_headers(token):
    """The chat's handshake header: its subprotocol and the token beside it (wsstack.auth: a
    header, never the URL, which access logs keep)."""
    return {"Sec-WebSocket-Protocol": f"{SUBPROTOCOL}, bearer.{token}"}


async def connect_many(urls, listener_factory, count, headers=None, auto_pong=True):
    """Open `count` connections spread round-robin over `urls`; returns the listeners, each
    with the `url` it went to. `headers(i)`: the extra handshake headers of connection i (a
    chat token). auto_pong=False: the listener answers pings itself (PingCounter)."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(i):
        async with gate:
            url = urls[i % len(urls)]
            _transport, listener = await ws_connect(listener_factory, url, max_frame_size=2 << 20,
                                                    websocket_handshake_timeout=30, enable_auto_pong=auto_pong,
                                                    extra_headers=headers(i) if headers else None)
            listener.url = url
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


class PingCounter(Tracked):
    """An idle connection that answers the server's pings and counts them: the idle figures
    divide CPU by the pings that arrived, not by those that should have (a server that skipped
    some would look cheaper per ping)."""

    def __init__(self):
        super().__init__()
        self.pings = 0

    def on_ws_frame(self, transport, frame):
        if frame.msg_type == WSMsgType.PING:
            self.pings += 1
            transport.send_pong(frame.get_payload_as_bytes())


async def open_idle(urls, count):
    """`count` connections that send nothing and answer pings (PingCounter)."""
    return await connect_many(urls, PingCounter, count, auto_pong=False)


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


async def fanout(sender_url, sender_token, subscriber_urls, subscriber_tokens, subscribers, messages, interval):
    """One sender, `subscribers` clients of the same room: delivery latency of each message
    to each subscriber (send to receive, one clock: all in this process). Subscriber i
    connects to subscriber_urls[i % len] with subscriber_tokens[i % len]."""
    histogram, received = new_histogram(), [0]
    listeners = await connect_many(subscriber_urls, lambda: Subscriber(histogram, received), subscribers,
                                   headers=lambda i: chat_headers(subscriber_tokens[i % len(subscriber_tokens)]))
    sender = (await connect_many([sender_url], Tracked, 1, headers=lambda _i: chat_headers(sender_token)))[0]
    selected = sender.transport.response.headers.get("sec-websocket-protocol")
    if selected != SUBPROTOCOL:
        raise RuntimeError(f"the chat selected the subprotocol {selected!r}, not {SUBPROTOCOL}")
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


# -- chat clients that come back: the reconnect and resume workloads ------------------------

def id_key(message_id):
    """A stream id as a sortable pair (wsstack.chat_store.id_key)."""
    ms, seq = message_id.split("-")
    return int(ms), int(seq)


def full_jitter(failures):
    """Seconds to wait after the n-th failed attempt in a row: uniform below a doubling cap."""
    return random.uniform(0, min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** (failures - 1))) / 1000


class ChatRun:
    """What all the chat clients of one run share: the client-side handshake log."""

    def __init__(self):
        self.stopping = False
        self.handshakes = []  # monotonic time of each completed handshake (101)
        self.failures = []  # monotonic time of each failed attempt


class ChatListener(WSListener):
    """One connection of a ChatClient. Only messages and history_end are parsed: presence,
    join and leave events (as many as members come and go) are counted, not decoded."""

    def __init__(self, client):
        self.client, self.transport = client, None
        self.close_code = self.close_reason = None
        self.history_end = None
        self.gone = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport):
        self.transport = transport
        # Here, not after ws_connect returns: the first frames may be handled before that.
        self.client.listener = self

    def on_ws_frame(self, transport, frame):
        if frame.msg_type == WSMsgType.CLOSE:
            self.close_code = frame.get_close_code()
            self.close_reason = frame.get_close_message()
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        payload = frame.get_payload_as_bytes()
        # The server writes every event with json.dumps' default separators, type first.
        if payload.startswith(b'{"type": "message"'):
            self.client.on_message(json.loads(payload)["id"])
        elif payload.startswith(b'{"type": "history_end"'):
            self.history_end = json.loads(payload)
            self.client.on_history_end(self.history_end)
        elif payload.startswith(b'{"type": "error"'):
            self.client.errors += 1
        else:
            self.client.events += 1

    def on_ws_disconnected(self, transport):
        if not self.gone.done():
            self.gone.set_result(None)


class ChatClient:
    """A chat client with the demo client's policy: after a close it waits a random delay in
    [0, reconnect_window_ms) (the server's hint from history_end), then reconnects with
    last_id and epoch; an attempt that fails (refused, 502, closed before history_end) is
    retried after an exponential backoff with full jitter."""

    def __init__(self, run, url, token, last_id=None):
        self.run, self.url, self.headers = run, url, chat_headers(token)
        self.last_id, self.epoch, self.window_ms = last_id, None, 0
        self.ids = []  # ids of every message received, history included, in order
        self.first_history = None  # (history_end's last_id, len(ids)) of the first connection
        self.ready = asyncio.Event()  # the first history_end came
        self.connected_at = None  # monotonic time of the first history_end
        self.closes = []  # (monotonic time, close code or None for no close frame, reason)
        self.resumes = []  # (monotonic time, recovered) of each history_end after a close
        self.away = False
        self.errors = self.events = 0
        self.listener = None

    def address(self):
        if self.last_id is None:
            return self.url
        return f"{self.url}&last_id={self.last_id}" + (f"&epoch={self.epoch}" if self.epoch else "")

    def on_message(self, message_id):
        self.ids.append(message_id)
        self.last_id = message_id

    def on_history_end(self, end):
        self.last_id = end["last_id"] or self.last_id
        self.epoch, self.window_ms = end["epoch"], end["reconnect_window_ms"]
        if self.first_history is None:
            self.first_history = (end["last_id"], len(self.ids))
            self.connected_at = time.monotonic()
            self.ready.set()
        elif self.away:
            self.resumes.append((time.monotonic(), end.get("recovered")))
        self.away = False

    async def live(self, gate=None):
        """Connect, and reconnect after every close, until the run stops."""
        failures = 0
        while not self.run.stopping:
            try:
                if gate is not None and self.first_history is None:
                    async with gate:  # the first connection of many: a bounded number at once
                        _transport, listener = await self._connect()
                else:
                    _transport, listener = await self._connect()
            except CONNECT_ERRORS:
                self.run.failures.append(time.monotonic())
                failures += 1
                await asyncio.sleep(full_jitter(failures))
                continue
            self.run.handshakes.append(time.monotonic())
            await listener.gone
            if self.run.stopping:
                return
            self.closes.append((time.monotonic(), listener.close_code, listener.close_reason))
            self.away = True
            if listener.history_end is None:  # closed before it was served: a failed attempt
                failures += 1
                await asyncio.sleep(full_jitter(failures))
            else:
                failures = 0
                await asyncio.sleep(random.uniform(0, self.window_ms / 1000))

    def _connect(self):
        return ws_connect(lambda: ChatListener(self), self.address(), extra_headers=self.headers,
                          websocket_handshake_timeout=10, max_frame_size=2 << 20)

    def send(self, text):
        self.listener.transport.send(WSMsgType.TEXT, json.dumps({"type": "message", "text": text}).encode())

    def close(self):
        listener = self.listener
        if listener is not None and not listener.transport.is_disconnected:
            listener.transport.send_close(WSCloseCode.OK)
            listener.transport.disconnect()


async def wait_until(predicate, timeout, step=0.05):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(step)
    return predicate()


def stop_clients(run, clients):
    run.stopping = True
    for client in clients:
        client.close()


def bins(times, start, end, width=0.1):
    """Counts of `times` in bins of `width` seconds from `start` to `end`."""
    counts = [0] * max(1, int((end - start) / width) + 1)
    for moment in times:
        if start <= moment <= end:
            counts[int((moment - start) / width)] += 1
    return counts


def settled(client):
    """Connected, with its history (after a close: resumed)."""
    return not client.away and client.listener is not None and client.listener.history_end is not None


async def reconnect(url, tokens, sender_url, sender_token, restart, prefill, interval, timeout=60):
    """len(tokens) clients of one room at `url` (one app), a sender at `sender_url` (the other
    app) publishing every `interval` s; `restart()` (run in a thread) restarts the app and
    returns its timeline. Returns what the clients saw: handshakes in 100 ms bins, the time
    from the first 1001 to all resumed, messages lost or duplicated (by id), recoveries."""
    run = ChatRun()
    sender = ChatClient(run, sender_url, sender_token)
    tasks = [asyncio.ensure_future(sender.live())]
    clients = []
    try:
        if not await wait_until(sender.ready.is_set, 30):
            raise RuntimeError(f"the sender never got its history from {sender_url}")
        for number in range(prefill):  # the room has some history before the clients come
            sender.send(f"before {number}")
        if not await wait_until(lambda: len(sender.ids) >= prefill, 30):
            raise RuntimeError("the sender's messages did not come back")
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        clients = [ChatClient(run, url, token) for token in tokens]
        tasks += [asyncio.ensure_future(client.live(gate)) for client in clients]
        # Those still without their history by then are reported (never_connected) and left
        # out of the checks; the restart goes ahead, as a deploy does not wait for them.
        await wait_until(lambda: all(c.ready.is_set() for c in clients), timeout)
        connected_at = time.monotonic()

        async def publish():
            number = 0
            while True:
                sender.send(f"live {number}")
                number += 1
                await asyncio.sleep(interval)

        publisher = asyncio.ensure_future(publish())
        await asyncio.sleep(1)  # live traffic before the restart
        timeline = await asyncio.to_thread(restart)
        resumed = await wait_until(lambda: all(settled(c) for c in clients), timeout)
        await asyncio.sleep(1)  # live traffic after it
        publisher.cancel()
        # Everything published must reach everyone: the sender's own copy tells the last id.
        await wait_until(lambda: len(sender.ids) > prefill, 10)
        last = sender.ids[-1]
        delivered = await wait_until(lambda: all(c.ids and c.ids[-1] == last for c in clients if settled(c)), 15)
        return {"clients": clients, "sender": sender, "run": run, "timeline": timeline, "resumed": resumed,
                "delivered": delivered, "connected_at": connected_at}
    finally:
        stop_clients(run, clients + [sender])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def reconnect_summary(outcome, stream_ids):
    """The reconnect workload's figures from what reconnect() returned and the room's stream."""
    clients, run = outcome["clients"], outcome["run"]
    closes = [moment for c in clients for moment, code, _reason in c.closes if code == 1001]
    codes = {}
    for client in clients:
        for _moment, code, _reason in client.closes:
            codes[str(code)] = codes.get(str(code), 0) + 1
    first_close = min(closes) if closes else outcome["connected_at"]
    resumes = [r for c in clients for r in c.resumes]
    last_resume = max((c.resumes[-1][0] for c in clients if c.resumes), default=first_close)
    start = outcome["timeline"][0]["stop_sent_at"] - 1.0
    end = max(last_resume, outcome["timeline"][-1]["healthy_at"] or last_resume) + 1.0
    handshake_bins = bins(run.handshakes, start, end)
    waves = []  # per replica stopped: its 1001s, and how long until those clients had resumed
    for number, step in enumerate(outcome["timeline"]):
        until = outcome["timeline"][number + 1]["stop_sent_at"] if number + 1 < len(outcome["timeline"]) else end
        wave_closes, wave_resumed = [], []
        for client in clients:
            for moment, code, _reason in client.closes:
                if code == 1001 and step["stop_sent_at"] <= moment < until:
                    wave_closes.append(moment)
                    wave_resumed.append(next((t for t, _r in client.resumes if t >= moment), None))
        complete = bool(wave_closes) and None not in wave_resumed
        waves.append({"replica": step["replica"], "closes_1001": len(wave_closes),
                      "peak_handshakes_per_second": 10 * max(bins(run.handshakes, step["stop_sent_at"], until)),
                      "first_1001_to_all_resumed_s":
                          round(max(wave_resumed) - min(wave_closes), 3) if complete else None})
    lost = duplicated = unexpected = disordered = 0
    stream = sorted(stream_ids, key=id_key)
    # Checked on the clients that came back: one still away when the run ended (all_resumed
    # false) is counted as not resumed, not as having lost what it never asked for.
    for client in clients:
        if client.first_history is None or not settled(client):
            continue
        first_last, first_count = client.first_history
        after = client.ids[first_count:]
        expected = {i for i in stream if first_last is None or id_key(i) > id_key(first_last)}
        seen = set(after)
        lost += len(expected - seen)
        unexpected += len(seen - expected)
        duplicated += len(after) - len(seen)
        disordered += sum(id_key(b) <= id_key(a) for a, b in zip(after, after[1:]))
    return {
        "clients": len(clients), "closes_1001": len(closes), "close_codes": codes,
        "peak_handshakes_per_second": 10 * max(handshake_bins),
        "first_1001_to_all_resumed_s": round(last_resume - first_close, 3) if closes else None,
        "resumes": len(resumes), "not_recovered": sum(1 for _t, recovered in resumes if recovered is False),
        "failed_attempts": len(run.failures), "all_resumed": outcome["resumed"],
        "not_resumed": sum(not settled(c) for c in clients),
        "never_connected": sum(c.first_history is None for c in clients),
        "all_delivered": outcome["delivered"], "messages_in_stream": len(stream),
        "lost": lost, "duplicated": duplicated, "unexpected": unexpected, "out_of_order": disordered,
        "errors": sum(c.errors for c in clients), "waves": waves,
        # for the plot: bins from 1 s before the first stop, and when each step happened on that clock
        "bin_ms": 100, "handshake_bins": handshake_bins,
        "failure_bins": bins(run.failures, start, end),
        "first_1001_at_s": round(first_close - start, 3),
        "timeline": [{k: round(v - start, 3) if k.endswith("_at") and v is not None else v for k, v in step.items()}
                     for step in outcome["timeline"]],
    }


async def resume(url, tokens, expected):
    """len(tokens) clients open `url` (a resume with last_id=0-0) at once: the seconds until
    the last history_end, what each received, and what history_end said."""
    run = ChatRun()
    clients = [ChatClient(run, url, token, last_id="0-0") for token in tokens]
    started = time.monotonic()
    tasks = [asyncio.ensure_future(client.live()) for client in clients]
    try:
        done = await wait_until(lambda: all(c.ready.is_set() for c in clients), 120)
        finished = max((c.connected_at for c in clients if c.connected_at), default=started)
    finally:
        stop_clients(run, clients)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    counts = [c.first_history[1] if c.first_history else len(c.ids) for c in clients]
    return {"clients": len(clients), "all_history_end": done, "seconds_to_all_history_end": round(finished - started, 3),
            "messages_min": min(counts), "messages_max": max(counts), "messages_expected": expected,
            "recovered_false": sum(1 for c in clients if c.listener and c.listener.history_end
                                   and c.listener.history_end.get("recovered") is False),
            "failed_attempts": len(run.failures), "closes": sum(len(c.closes) for c in clients)}

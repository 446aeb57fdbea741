"""The uWSGI WebSocket engine against hostile and unusual input, on both apps through nginx.

Frame lengths that overflow the size check, subprotocol offers, empty messages and UTF-8
that can be refused before the message is complete. The shared stack serves every test;
the ones that look at the workers' PIDs need the local processes (@pytest.mark.local).
"""
import socket
import time

import pytest

from chat_client import SUBPROTOCOL, chat_url, new_room, protocols, token
from stack import PING_FREQ, ws_url
from test_protocol import echo_once, uwsgi_processes
from wsstack.conformance import expect_close_code
from wsstack.rawws import BINARY, CONT, PING, PONG, TEXT, RawWebSocket, encode_frame

ROUTES = ["echo", "chat"]


def route_socket(backend, route, offered=()):
    """A RawWebSocket to the route, offering `offered` subprotocols (the chat's own with its token too)."""
    if route == "echo":
        url = ws_url(backend)
    else:
        url, offered = chat_url(backend, new_room()), [*offered, *protocols(token("hostile")["token"])]
    return RawWebSocket(url, headers={"Sec-WebSocket-Protocol": ", ".join(offered)} if offered else None)


def fragment_then_continuation_declaring(length):
    """A 1-byte non-final text fragment, then a continuation declaring `length` bytes (one sent)."""
    return encode_frame(TEXT, b"a", fin=False) + encode_frame(CONT, b"b", length=length)


# --- 1. Size checks that cannot overflow -------------------------------------------------------

@pytest.mark.local
@pytest.mark.parametrize("route", ROUTES)
def test_a_continuation_declaring_2_64_minus_1_bytes_is_1002_and_kills_no_worker(backend, route):
    """Guards the message-size check against overflow: fragments so far (1) + declared length
    (2^64-1) wrapped to 0 and passed, and the worker then buffered "2^64-1" bytes.
    Old behaviour: the worker died of SIGSEGV (the master respawned it), the client got no
    close frame. RFC 6455 5.2: a 64-bit length with its most significant bit set is a
    protocol error."""
    app = f"{backend}-app"
    before = uwsgi_processes(app)
    assert len(before) >= 3  # master and two workers
    with route_socket(backend, route) as ws:
        data = fragment_then_continuation_declaring(2**64 - 1)
        assert len(data) == 22
        ws.send_raw(data)
        frame = ws.expect_close(timeout=5)
    after = uwsgi_processes(app)
    answer = "no close frame" if frame is None else f"close {frame.close_code} {frame.close_reason!r}"
    assert frame is not None and frame.close_code == 1002 and after == before, (
        f"{answer}; worker PIDs gone: {sorted(before - after)}, new: {sorted(after - before)}")
    assert echo_once(backend, "after the overflow") == "after the overflow"


@pytest.mark.parametrize("length", [2**63, 2**64 - 1], ids=["2^63", "2^64-1"])
def test_a_frame_declaring_a_length_with_the_top_bit_set_is_1002(backend, length):
    """RFC 6455 5.2: the most significant bit of a 64-bit length must be 0.
    Old behaviour: close 1009 (message too big), as for any merely large frame."""
    with RawWebSocket(ws_url(backend)) as ws:
        ws.send(BINARY, b"", length=length)
        expect_close_code(ws, 1002)


def test_a_continuation_declaring_2_63_minus_1_bytes_is_1009(backend):
    """The largest legal 64-bit length after a 1-byte fragment: too big (1009), without the
    sum overflowing. Old behaviour: the sum stayed below 2^64, 1009 came already; this keeps
    the overflow fix from turning it into anything else."""
    with RawWebSocket(ws_url(backend)) as ws:
        ws.send_raw(fragment_then_continuation_declaring(2**63 - 1))
        expect_close_code(ws, 1009)


# --- 4. Subprotocols ---------------------------------------------------------------------------

@pytest.mark.parametrize("route", ROUTES)
def test_only_a_subprotocol_the_route_speaks_is_accepted(backend, route):
    """The 101 names at most one subprotocol, one the server speaks (RFC 6455 4.2.2): none for
    the echo, the chat's own for the chat; a client would otherwise speak graphql-ws to an
    echo. Old behaviour: the 101 carried `Sec-WebSocket-Protocol: graphql-ws`."""
    with route_socket(backend, route, offered=["graphql-ws", "wamp"]) as ws:
        selected = ws.response_headers.get("sec-websocket-protocol")
        assert selected == (None if route == "echo" else [SUBPROTOCOL]), ws.response_headers
        if route == "echo":  # the connection is otherwise an ordinary one
            ws.send(TEXT, b"no subprotocol")
            assert ws.recv_message(timeout=5).payload == b"no subprotocol"


# --- 7. Empty messages -------------------------------------------------------------------------

def data_frames_within(ws, seconds, pings_wanted):
    """Data frames arriving in `seconds` while idle, answering pings; stops early once
    `pings_wanted` server pings came. Returns (data frames, pings seen)."""
    frames, pings, deadline = [], 0, time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and pings < pings_wanted:
        try:
            frame = ws.recv_frame(timeout=left)
        except TimeoutError:
            break
        if frame.opcode == PING:
            pings += 1
            ws.send(PONG, frame.payload)
        else:
            frames.append(frame)
    return frames, pings


def test_empty_messages_come_back_empty_in_order_and_none_is_invented(backend):
    """Empty text and binary messages are messages: each comes back, empty, with its type,
    between the non-empty ones around it, without delay; and across server pings no message
    appears that was not sent. Old behaviour: flask-app never delivered an empty message
    (its compat layer took b'' for "nothing to read"), and messages already received after
    one could wait for the connection's next wake-up (a server ping, seconds later)."""
    sent = [(TEXT, b"before"), (TEXT, b""), (BINARY, b""), (TEXT, b"middle"), (BINARY, b""), (TEXT, b""),
            (BINARY, b"\x00after")]
    with RawWebSocket(ws_url(backend)) as ws:
        for opcode, payload in sent:
            ws.send(opcode, payload)
        # ...and an empty text message in two empty fragments.
        ws.send(TEXT, b"", fin=False)
        ws.send(CONT, b"")
        ws.send(TEXT, b"last")
        expected = sent + [(TEXT, b""), (TEXT, b"last")]
        received = []
        try:
            for _ in expected:
                frame = ws.recv_message(timeout=1)  # less than a ping interval: no waiting for a wake-up
                received.append((frame.opcode, frame.payload))
        except TimeoutError:
            pass
        assert received == expected
        # Two ping intervals idle: the pings must come, and nothing else.
        extra, pings = data_frames_within(ws, 2 * PING_FREQ + 2, pings_wanted=2)
        assert pings >= 1, "no server ping arrived: the idle check proved nothing"
        assert extra == []


# --- 8. UTF-8 refused as soon as it cannot be valid --------------------------------------------

def test_a_non_final_text_fragment_that_cannot_start_valid_utf8_is_1007_at_once(backend):
    """\\xff can start no UTF-8 sequence: the message is invalid whatever follows, and the
    server must say so before the final fragment (RFC 6455 8.1: fail fast). Old behaviour: the
    check ran on the whole message only; without the final fragment nothing came (time-out)."""
    with RawWebSocket(ws_url(backend)) as ws:
        ws.send(TEXT, b"\xce\xba\xff", fin=False)
        expect_close_code(ws, 1007)


def test_invalid_utf8_at_the_start_of_a_partly_sent_frame_is_1007_at_once(backend):
    """A text frame declaring 1000 bytes whose first 16 hold a UTF-16 surrogate encoded in
    UTF-8 (\\xed\\xa0\\x80, never valid): 1007 before the other 984 bytes are sent. Old
    behaviour: the server waited for the whole payload (time-out)."""
    start = b"ok \xed\xa0\x80 padding.."
    assert len(start) == 16
    with RawWebSocket(ws_url(backend)) as ws:
        ws.send(TEXT, start, length=1000)
        expect_close_code(ws, 1007)


SPLIT_TEXT = "aé€𝄞z".encode()  # 1-, 2-, 3- and 4-byte characters


def test_characters_split_across_fragments_or_tcp_writes_are_echoed_intact(backend):
    """The counterpart of failing fast: an incomplete character at the end of a fragment or
    of what has arrived so far is not an error. Each split point of SPLIT_TEXT, once between
    two fragments and once between two TCP writes of one frame. Old behaviour: passes (the
    check ran on whole messages); guards the fail-fast fix against refusing valid text."""
    with RawWebSocket(ws_url(backend)) as ws:
        ws.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for cut in range(1, len(SPLIT_TEXT)):
            ws.send(TEXT, SPLIT_TEXT[:cut], fin=False)
            ws.send(CONT, SPLIT_TEXT[cut:])
            frame = ws.recv_message(timeout=5)
            assert (frame.opcode, frame.payload) == (TEXT, SPLIT_TEXT), f"fragments cut at byte {cut}"
            data = encode_frame(TEXT, SPLIT_TEXT)
            header = len(data) - len(SPLIT_TEXT)
            ws.send_raw(data[:header + cut])
            # Pacing, not readiness: a pause gives the server the chance to read the first
            # part alone; the echo must be the same whether it did or not.
            time.sleep(0.02)
            ws.send_raw(data[header + cut:])
            frame = ws.recv_message(timeout=5)
            assert (frame.opcode, frame.payload) == (TEXT, SPLIT_TEXT), f"one frame written in two at byte {cut}"

"""RFC 6455 conformance checks against a WebSocket echo endpoint.

    python -m wsstack.conformance ws://127.0.0.1:8080/uwsgi/ws/echo [ws://.../flask/ws/echo ...]
        [--max-size BYTES] [--json]

Each check opens its own connection, sends what a client (well-behaved or not) may send,
and compares the server's answer with what RFC 6455 requires. Prints a pass/fail table per
endpoint; exits 1 if any check fails. Standard library only.
"""
import argparse
import json
import socket
import sys

from wsstack.rawws import BINARY, CLOSE, CONT, PING, PONG, TEXT, RawWebSocket, close_payload, encode_frame

DEFAULT_MAX_SIZE = 1024 * 1024
CHECKS = []


def check(rfc):
    def register(func):
        CHECKS.append((func.__name__, rfc, func))
        return func

    return register


class Failed(AssertionError):
    pass


def expect(condition, message):
    if not condition:
        raise Failed(message)


def expect_message(ws, opcode, payload):
    frame = ws.recv_message(timeout=5)
    expect(frame.opcode == opcode and frame.payload == payload,
           f"expected opcode {opcode} {payload[:40]!r}, got opcode {frame.opcode} {frame.payload[:40]!r}")


def expect_close_code(ws, code):
    frame = ws.expect_close(timeout=5)
    expect(frame is not None, f"expected close {code}, the server dropped the connection without a close frame")
    expect(frame.close_code == code, f"expected close {code}, got {frame.close_code} {frame.close_reason!r}")


@check("5.6")
def text_echo(url, max_size):
    with RawWebSocket(url) as ws:
        ws.send(TEXT, "héllo ✓".encode())
        expect_message(ws, TEXT, "héllo ✓".encode())


@check("5.6")
def binary_comes_back_as_binary(url, max_size):
    data = bytes(range(256))
    with RawWebSocket(url) as ws:
        ws.send(BINARY, data)
        expect_message(ws, BINARY, data)


@check("5.6")
def empty_messages_come_back_empty(url, max_size):
    # An empty message is a message: it comes back, as the type it was sent as.
    with RawWebSocket(url) as ws:
        ws.send(TEXT, b"")
        ws.send(BINARY, b"")
        ws.send(TEXT, b"after")
        expect_message(ws, TEXT, b"")
        expect_message(ws, BINARY, b"")
        expect_message(ws, TEXT, b"after")


@check("4.2.2")
def no_subprotocol_the_server_did_not_select(url, max_size):
    with RawWebSocket(url, headers={"Sec-WebSocket-Protocol": "graphql-ws, wamp"}) as ws:
        confirmed = ws.response_headers.get("sec-websocket-protocol")
        expect(confirmed is None, f"the server confirmed {confirmed}, a subprotocol an echo server does not speak")


@check("5.4")
def fragments_reassembled_with_a_ping_between(url, max_size):
    with RawWebSocket(url) as ws:
        ws.send(TEXT, b"Hel", fin=False)
        ws.send(PING, b"in-between")
        ws.send(CONT, b"lo ", fin=False)
        ws.send(CONT, b"world")
        frame = ws.recv_frame(timeout=5)
        while frame.opcode == PING:  # a server keep-alive ping may come first
            frame = ws.recv_frame(timeout=5)
        expect(frame.opcode == PONG and frame.payload == b"in-between", f"expected the pong first, got {frame}")
        expect_message(ws, TEXT, b"Hello world")


@check("5.4")
def concurrent_fragmented_messages_do_not_mix(url, max_size):
    sockets = [RawWebSocket(url) for _ in range(4)]
    try:
        for i, ws in enumerate(sockets):
            ws.send(TEXT, f"[{i}:a]".encode(), fin=False)
        for i, ws in enumerate(sockets):
            ws.send(CONT, f"[{i}:b]".encode(), fin=False)
        for i, ws in enumerate(sockets):
            ws.send(CONT, f"[{i}:c]".encode())
        for i, ws in enumerate(sockets):
            expect_message(ws, TEXT, f"[{i}:a][{i}:b][{i}:c]".encode())
    finally:
        for ws in sockets:
            ws.close()


@check("5.5.3")
def pong_echoes_the_ping_payload(url, max_size):
    with RawWebSocket(url) as ws:
        ws.send(PING, b"payload-123")
        frame = ws.recv_frame(timeout=5)
        while frame.opcode == PING:
            frame = ws.recv_frame(timeout=5)
        expect(frame.opcode == PONG and frame.payload == b"payload-123", f"expected pong 'payload-123', got {frame}")


@check("5.5.1")
def close_echoes_the_code(url, max_size):
    for code in (1000, 4000):
        with RawWebSocket(url) as ws:
            ws.send(CLOSE, close_payload(code, "bye"))
            expect_close_code(ws, code)


@check("7.1.1")
def server_hangs_up_after_the_close_handshake(url, max_size):
    # The server closes the TCP connection first; a client waiting for that would otherwise
    # hang until its own close timeout (10 s in the `websockets` client, for instance).
    with RawWebSocket(url) as ws:
        ws.send(TEXT, b"hello")
        expect_message(ws, TEXT, b"hello")
        ws.send(CLOSE, close_payload(1000))
        expect_close_code(ws, 1000)
        ws.sock.settimeout(2)
        try:
            left = ws.buffer + ws.sock.recv(65536)
        except TimeoutError:
            raise Failed("the connection was still open 2 s after the close handshake") from None
        expect(left == b"", f"expected the end of the connection, got {left[:40]!r}")


@check("10.4")
def message_over_the_size_limit_is_1009(url, max_size):
    half = max_size // 2 + 1
    with RawWebSocket(url) as ws:
        ws.send(BINARY, b"x" * half, fin=False)
        ws.send(CONT, b"x" * half)
        expect_close_code(ws, 1009)


@check("8.1")
def invalid_utf8_text_is_1007(url, max_size):
    with RawWebSocket(url) as ws:
        ws.send(TEXT, b"\xff\xfe invalid")
        expect_close_code(ws, 1007)


@check("8.1")
def invalid_utf8_in_a_first_fragment_fails_at_once(url, max_size):
    # Fail fast: the close comes before the final fragment is sent.
    with RawWebSocket(url) as ws:
        ws.send(TEXT, b"\xce\xba\xff", fin=False)
        expect_close_code(ws, 1007)


@check("8.1")
def invalid_utf8_fails_before_its_frame_ends(url, max_size):
    # 16 of the 1000 payload bytes the header declares, the first ones already not UTF-8 (a
    # surrogate): the close comes while the rest of the frame is still due.
    with RawWebSocket(url) as ws:
        frame = encode_frame(TEXT, b"\xce\xba\xed\xa0\x80" + b"x" * 995)
        ws.send_raw(frame[:8 + 16])
        expect_close_code(ws, 1007)


def protocol_error(send):
    def run(url, max_size):
        with RawWebSocket(url) as ws:
            send(ws)
            expect_close_code(ws, 1002)

    return run


PROTOCOL_ERRORS = {
    "unmasked_client_frame": ("5.1", lambda ws: ws.send(TEXT, b"unmasked", mask=False)),
    "rsv_bits_set": ("5.2", lambda ws: ws.send(TEXT, b"rsv", rsv=0b100)),
    "reserved_data_opcode": ("5.2", lambda ws: ws.send(0x3, b"x")),
    "reserved_control_opcode": ("5.2", lambda ws: ws.send(0xB, b"x")),
    "control_frame_over_125_bytes": ("5.5", lambda ws: ws.send(PING, b"p" * 126)),
    "fragmented_control_frame": ("5.5", lambda ws: ws.send(PING, b"p", fin=False)),
    "stray_continuation": ("5.4", lambda ws: ws.send(CONT, b"stray")),
    "new_message_inside_a_fragmented_one": ("5.4", lambda ws: (ws.send(TEXT, b"a", fin=False), ws.send(TEXT, b"b"))),
    "invalid_close_code": ("7.4.1", lambda ws: ws.send(CLOSE, close_payload(1005))),
    "close_code_out_of_range": ("7.4.2", lambda ws: ws.send(CLOSE, close_payload(5000))),
    "one_byte_close_payload": ("5.5.1", lambda ws: ws.send(CLOSE, b"\x03")),
    # a 64-bit length must have its top bit clear; the second one, after a fragment, made a
    # message-size check that added the two sizes wrap around and overflow the heap
    "length_with_the_top_bit_set": ("5.2", lambda ws: ws.send_raw(encode_frame(BINARY, length=2**63)[:14])),
    "fragment_then_a_length_of_2_64_minus_1": ("5.2", lambda ws: ws.send_raw(
        encode_frame(TEXT, b"a", fin=False) + encode_frame(CONT, length=2**64 - 1)[:14])),
}
for _name, (_rfc, _send) in PROTOCOL_ERRORS.items():
    CHECKS.append((f"{_name}_is_1002", _rfc, protocol_error(_send)))


def run_check(func, url, max_size):
    try:
        func(url, max_size)
        return True, ""
    except Failed as exc:
        return False, str(exc)
    except (OSError, socket.timeout, ConnectionError, RuntimeError) as exc:
        return False, f"{exc.__class__.__name__}: {exc}"


def run_all(url, max_size=DEFAULT_MAX_SIZE):
    return [(name, rfc, *run_check(func, url, max_size)) for name, rfc, func in CHECKS]


def short(detail, width=70):
    detail = detail.replace("|", "/").replace("\n", " ")
    return detail if len(detail) <= width else detail[: width - 3] + "..."


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+", help="WebSocket echo endpoints, e.g. ws://127.0.0.1:8080/uwsgi/ws/echo")
    parser.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE, help="the server's message size limit, bytes")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--brief", action="store_true", help="table cells say pass/FAIL only")
    args = parser.parse_args(argv)
    results = {url: run_all(url, args.max_size) for url in args.urls}
    if args.json:
        print(json.dumps({url: [dict(check=n, rfc=r, passed=p, detail=d) for n, r, p, d in rows]
                          for url, rows in results.items()}, indent=2))
    else:
        print("| check | RFC 6455 | " + " | ".join(results) + " |")
        print("|---|---|" + "---|" * len(results))
        for i, (name, rfc, _func) in enumerate(CHECKS):
            cells = ["pass" if rows[i][2] else "FAIL" + ("" if args.brief else ": " + short(rows[i][3]))
                     for rows in results.values()]
            print(f"| {name} | {rfc} | " + " | ".join(cells) + " |")
    return 0 if all(row[2] for rows in results.values() for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

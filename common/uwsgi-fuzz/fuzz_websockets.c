/*
 * libFuzzer harness for the patched uWSGI WebSocket engine (core/websockets.c), compiled from
 * the tree common/build-uwsgi.sh --source-only prepares. One worker with FUZZ_CONNS async
 * cores; the input is a script of peer and application actions on those connections.
 *
 * Input format (every read past the end of the input gives zeros, so any input is valid):
 *   byte 0      config: websockets-max-size = 1 + (b & 3) KiB, ping freq = 1 + ((b >> 2) & 7)
 *               s, pong tolerance = 1 + ((b >> 5) & 3) s; bit 7: a rate byte r follows,
 *               websockets-frame-rate = 1 + (r & 31) frames/s, websockets-frame-burst = r >> 5
 *               (0: the default, twice the rate); without bit 7 both are 0 (no limit)
 *   then ops:   one byte OP; connection = OP & 3, action = (OP >> 2) % ACTIONS:
 *     0 DATA       len:u8, bytes     the peer's next read returns these bytes (a read asks for
 *     1 DATA16     len:u16be, bytes    less? the rest stays for the next read)
 *     2 EAGAIN     the next read has nothing yet (-1/EAGAIN)
 *     3 EOF        the peer closed its side: reads return 0 from there on
 *     4 RESET      reads fail with ECONNRESET from there on
 *     5 RECV_NB    the app calls uwsgi_websocket_recv_nb()
 *     6 RECV       the app calls uwsgi_websocket_recv() (waits; a silent peer lets the clock run)
 *     7 SEND       SENDARG, uwsgi_websocket_send()
 *     8 SEND_BIN   SENDARG, uwsgi_websocket_send_binary()
 *     9 CLOSE      code:u16be, len:u8, reason   uwsgi_websocket_close()
 *    10 GOING_AWAY uwsgi_websockets_going_away() (graceful stop, every connection)
 *    11 END        the request ends (uwsgi_close_request's frees); the slot takes a new one
 *    12 CLOCK      secs:u8     time passes
 *    13 CLOCK_MS   ms:u8
 *    14 WRITE_FAIL the next write to this connection fails (peer gone)
 *    15 WAIT_ERR   the next wait_read_hook on this connection fails
 *    16 IN_WAIT    k:u8 [code:u16be]   when this connection next waits to read, another
 *                  greenlet runs the graceful stop (k odd) or closes it with `code` (k even)
 *    17 TRY_RECV   the app calls uwsgi_websocket_try_recv() (1 message, 0 none yet, -1 over)
 *    18 WRITE_BLOCK room:u8, k:u8   the peer stops reading: the socket takes `room` more bytes,
 *                  then writes get EAGAIN until the writer waits (wait_write_hook); in that
 *                  wait the hub runs the graceful stop (k & 1), and the wait ends with the
 *                  socket drained, or times out like socket-timeout (k & 2: a write error)
 *    19 PY_CLOSE   code:u16be, len:u8, reason   uwsgi.websocket_close() of the Python plugin:
 *                  refused (ValueError) unless the code may be sent and the reason is UTF-8,
 *                  else uwsgi_websocket_close() then uwsgi_websocket_linger()
 *    20 LOOP       the event loop's turn while the app waits for the socket itself (patches
 *                  0032, 0033, as the compat layer's watcher and ping sweep call them): with
 *                  bytes to read, uwsgi_websocket_absorb_pongs(); else the interval passes
 *                  (ping freq seconds) and uwsgi_websocket_ping_nowait()
 *   A RECV's wait (wait_read_hook) does the same as the gevent plugin's kept wait: the event
 *   loop takes pongs while there is input, and writes the ping due when the wait times out.
 *   CLOSE (9) and IN_WAIT's close are the app's uwsgi_websocket_close() as the Python layer
 *   calls it: a code or reason it refuses (above) is not passed on.
 *   SENDARG: f:u8; f < 0x80: f bytes follow; else n:u16be, fill:u8, and the message is len
 *            bytes of `fill`: len = n & 0x1fff, or with f & 0x40, 65528 + (n & 15) (across the
 *            16/64-bit length boundary). Big messages without big inputs, and few of them
 *            big: copying 64 KiB under ASan is most of an input's time.
 *   Before a connection's first op, its handshake runs with these arguments:
 *     flags:u8 (bit 0: the app passes the key, bit 1: the app passes a protocol),
 *     key len:u8+bytes, client Sec-WebSocket-Protocol len:u8+bytes, app protocol len:u8+bytes,
 *     bytes the client sent right after its HTTP request (len:u8+bytes)
 *   A connection whose handshake fails is ended; the next op on its slot starts a new one.
 *
 * Oracles besides the sanitizers (abort on violation): every byte the engine writes is a
 * well-formed server frame (final, unmasked, shortest length form, control payload <= 125,
 * close payload never 1 byte, a code that may be sent, a UTF-8 reason; the app's close
 * carries its code and its reason cut to 123 bytes at a character boundary), nothing follows
 * a close frame or a shutdown, a write never starts at the write position of another frame
 * that is partly out (stubs.c), a request never ends inside a frame, a receive call that
 * ends the connection leaves our close frame all out (unless a write failed), the 101
 * carries the right Sec-WebSocket-Accept and at most one protocol, each message returned to
 * the app is text or binary, within websockets-max-size, and valid UTF-8 when text.
 * uwsgi_websocket_valid_close_code() and uwsgi_websocket_valid_utf8() agree with the
 * harness's own tables. A receive call consumes at most 256 frames between two yields
 * (before_read()). FUZZ_KNOWN (README.md) turns the oracle of a known bug into a log line.
 * Reference model: the harness parses what the peer sent with its own RFC 6455 parser
 * (struct ref): each message a receive call returns (recv, recv_nb, try_recv) must be the
 * reference's next complete message (opcode and payload), none may come after a frame the
 * reference refuses (or the peer's close) or after our close frame, and "nothing yet"
 * (try_recv 0, recv_nb's empty buffer) is wrong when the bytes read so far complete the next
 * message. Not modelled by the reference (the engine may end the connection there, never
 * return something else): the frame-rate limit, pongs, timeouts, write errors.
 */
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <stdarg.h>

#include "fuzz.h"

extern struct uwsgi_server uwsgi;

#define ACTIONS 21

struct cursor {
	const uint8_t *p;
	size_t left;
};

static uint8_t u8(struct cursor *c) {
	if (!c->left) return 0;
	c->left--;
	return *c->p++;
}

static uint16_t u16(struct cursor *c) {
	uint16_t hi = u8(c);
	return (uint16_t) ((hi << 8) | u8(c));
}

// up to `len` bytes, pointing into the input (which outlives the run)
static const uint8_t *take(struct cursor *c, size_t *len) {
	if (*len > c->left) *len = c->left;
	const uint8_t *p = c->p;
	c->p += *len;
	c->left -= *len;
	return p;
}

void fuzz_fail(const char *fmt, ...) {
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "==ORACLE== ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	abort();
}

/* UTF-8 per RFC 3629's table of well-formed byte sequences, written independently of the
   engine's decoder so one does not hide the other's mistake. */
static int utf8_ok(const uint8_t *s, size_t len) {
	size_t i = 0;
	while (i < len) {
		uint8_t b = s[i];
		uint8_t lo = 0x80, hi = 0xBF;
		size_t tail;
		if (b <= 0x7F) { i++; continue; }
		if (b >= 0xC2 && b <= 0xDF) tail = 1;
		else if (b == 0xE0) { tail = 2; lo = 0xA0; }
		else if (b == 0xED) { tail = 2; hi = 0x9F; }
		else if (b >= 0xE1 && b <= 0xEF) tail = 2;
		else if (b == 0xF0) { tail = 3; lo = 0x90; }
		else if (b == 0xF4) { tail = 3; hi = 0x8F; }
		else if (b >= 0xF1 && b <= 0xF3) tail = 3;
		else return 0;
		if (len - i <= tail) return 0;
		if (s[i + 1] < lo || s[i + 1] > hi) return 0;
		size_t k;
		for (k = 2; k <= tail; k++) {
			if (s[i + k] < 0x80 || s[i + k] > 0xBF) return 0;
		}
		i += tail + 1;
	}
	return 1;
}

// codes an endpoint may put in a close frame (RFC 6455 7.4, IANA registry)
static int sendable_close_code(uint16_t code) {
	return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999);
}

/* Consume the complete frames at the start of the connection's output; any malformed one
   is a bug, whatever the client sent. */
static void check_frames(struct fuzz_conn *c) {
	size_t off = 0;
	for (;;) {
		const uint8_t *f = c->out + off;
		size_t avail = c->out_len - off;
		if (avail < 2) break;
		uint8_t op = f[0] & 0x0F;
		if (!(f[0] & 0x80)) fuzz_fail("conn %d: server frame without FIN (0x%02x)", c->index, f[0]);
		if (f[0] & 0x70) fuzz_fail("conn %d: server frame with RSV bits (0x%02x)", c->index, f[0]);
		if (op != 1 && op != 2 && op != 8 && op != 9 && op != 10) fuzz_fail("conn %d: server frame with opcode %u", c->index, op);
		if (f[1] & 0x80) fuzz_fail("conn %d: masked server frame", c->index);
		uint64_t plen = f[1] & 0x7F;
		size_t hlen = 2;
		if (plen == 126) {
			if (avail < 4) break;
			plen = ((uint64_t) f[2] << 8) | f[3];
			hlen = 4;
			if (plen < 126) fuzz_fail("conn %d: 16-bit length %llu fits in 7 bits", c->index, (unsigned long long) plen);
		}
		else if (plen == 127) {
			if (avail < 10) break;
			plen = 0;
			int i;
			for (i = 0; i < 8; i++) plen = (plen << 8) | f[2 + i];
			hlen = 10;
			if (plen >> 63) fuzz_fail("conn %d: 64-bit length with the top bit set", c->index);
			if (plen <= 0xFFFF) fuzz_fail("conn %d: 64-bit length %llu fits in 16 bits", c->index, (unsigned long long) plen);
		}
		if (op >= 8 && plen > 125) fuzz_fail("conn %d: control frame 0x%x with %llu bytes", c->index, op, (unsigned long long) plen);
		if (avail - hlen < plen) break;
		const uint8_t *payload = f + hlen;
		if (c->close_written) fuzz_fail("conn %d: frame 0x%x written after the close frame", c->index, op);
		if (op == 8) {
			if (plen == 1) fuzz_fail("conn %d: close frame with a 1-byte payload", c->index);
			if (plen >= 2) {
				uint16_t code = (uint16_t) ((payload[0] << 8) | payload[1]);
				// the app's codes are checked before the call (the Python layer), the engine's
				// own (errors, echoes, going away) must be sendable as well
				if (!sendable_close_code(code)) fuzz_fail("conn %d: close frame with code %u", c->index, code);
				if (!utf8_ok(payload + 2, plen - 2)) fuzz_fail("conn %d: close reason is not UTF-8", c->index);
			}
			if (c->expect_close_len && (plen != c->expect_close_len || memcmp(payload, c->expect_close, plen)))
				fuzz_fail("conn %d: the app's close went out as %llu bytes (code %u), expected %zu (code %u, reason cut at a character boundary)",
				          c->index, (unsigned long long) plen, plen >= 2 ? (payload[0] << 8) | payload[1] : 0,
				          c->expect_close_len, (c->expect_close[0] << 8) | c->expect_close[1]);
			c->close_written = 1;
		}
		off += hlen + plen;
	}
	memmove(c->out, c->out + off, c->out_len - off);
	c->out_len -= off;
}

void fuzz_wire_write(struct fuzz_conn *c, const char *buf, size_t len) {
	if (!c->headers_written) fuzz_fail("conn %d: frame written before the 101", c->index);
	if (c->shut_wr) fuzz_fail("conn %d: %zu bytes written after shutdown(SHUT_WR)", c->index, len);
	if (c->close_written) fuzz_fail("conn %d: %zu bytes written after the close frame", c->index, len);
	if (c->out_len + len > c->out_cap) {
		c->out_cap = (c->out_len + len) * 2;
		c->out = realloc(c->out, c->out_cap);
		if (!c->out) abort();
	}
	memcpy(c->out + c->out_len, buf, len);
	c->out_len += len;
	check_frames(c);
}

static const char *header_value(const char *h, size_t hlen, const char *name, size_t *vlen, int *count) {
	const char *found = NULL;
	size_t nlen = strlen(name);
	const char *line = h, *end = h + hlen;
	*count = 0;
	while (line < end) {
		const char *eol = memmem(line, end - line, "\r\n", 2);
		if (!eol) break;
		if ((size_t) (eol - line) > nlen + 2 && !strncasecmp(line, name, nlen) && line[nlen] == ':' && line[nlen + 1] == ' ') {
			found = line + nlen + 2;
			*vlen = eol - found;
			(*count)++;
		}
		line = eol + 2;
	}
	return found;
}

void fuzz_headers_written(struct fuzz_conn *c, const char *h, size_t len) {
	if (c->headers_written) fuzz_fail("conn %d: the 101 headers were written twice", c->index);
	c->headers_written = 1;
	if (len < 34 || memcmp(h, "HTTP/1.1 101 Switching Protocols\r\n", 34)) fuzz_fail("conn %d: not a 101 status line", c->index);
	if (len < 4 || memcmp(h + len - 4, "\r\n\r\n", 4)) fuzz_fail("conn %d: headers do not end with an empty line", c->index);
	size_t vlen = 0;
	int count, lines = 0;
	const char *p;
	for (p = h; (p = memmem(p, h + len - p, "\r\n", 2)) != NULL; p += 2) lines++;
	const char *accept = header_value(h, len, "Sec-WebSocket-Accept", &vlen, &count);
	if (count != 1 || vlen != strlen(c->accept) || memcmp(accept, c->accept, vlen))
		fuzz_fail("conn %d: Sec-WebSocket-Accept is '%.*s', expected '%s'", c->index, (int) vlen, accept ? accept : "", c->accept);
	const char *proto = header_value(h, len, "Sec-WebSocket-Protocol", &vlen, &count);
	if (count > 1) fuzz_fail("conn %d: %d Sec-WebSocket-Protocol headers", c->index, count);
	// status, Upgrade, Connection, Sec-WebSocket-Accept, [Sec-WebSocket-Protocol], empty line:
	// any other line was injected through a header value
	if (lines != 5 + count) fuzz_fail("conn %d: %d lines in the 101 response", c->index, lines);
	if (proto && !c->app_proto_given) {
		// the client's first offer, as it sent it
		if (vlen == 0 || vlen > c->client_proto_len || memcmp(proto, c->client_proto, vlen))
			fuzz_fail("conn %d: Sec-WebSocket-Protocol '%.*s' is not the client's first offer", c->index, (int) vlen, proto);
		if (memchr(proto, ',', vlen) || proto[vlen - 1] == ' ' || proto[vlen - 1] == '\t')
			fuzz_fail("conn %d: Sec-WebSocket-Protocol '%.*s' is not one token", c->index, (int) vlen, proto);
	}
}

/* FUZZ_KNOWN=name,... (a long campaign's option, never for replay): the oracle of a known,
   unfixed engine bug (crashes/<name>-*) logs once instead of aborting, so the run can find
   other bugs. Names: pending-close, dropped-messages-yield. */
static int known_bug(const char *name) {
	static const char *seen[8];
	const char *list = getenv("FUZZ_KNOWN");
	if (!list || !strstr(list, name)) return 0;
	int i;
	for (i = 0; i < 8 && seen[i]; i++) {
		if (seen[i] == name) return 1;
	}
	if (i < 8) seen[i] = name;
	fprintf(stderr, "==KNOWN== %s (FUZZ_KNOWN): not aborting\n", name);
	return 1;
}

/* --- the reference model: the peer's bytes, parsed independently of the engine ---------- */

struct ref_msg {
	uint8_t opcode;
	size_t off, len;	/* its payload in ref.store */
	size_t end;		/* the stream offset just past its final frame */
};

struct ref {
	uint8_t *in;		/* every byte the peer sent, in the order the engine reads them */
	size_t in_len, in_cap;
	size_t pos;		/* the next frame's start in `in` */
	int ended;		/* EOF or reset queued: nothing after it is ever read */
	const char *dead;	/* why the stream ends (refused frame, the peer's close), or NULL */
	int in_msg;
	uint8_t msg_opcode;
	size_t msg_off;		/* the message in progress: from store + msg_off to store_len */
	uint8_t *store;
	size_t store_len, store_cap;
	struct ref_msg *msgs;
	size_t nmsgs, msgs_cap;
	size_t *frame_ends;	/* the stream offset just past each frame, in order */
	size_t nframes, frames_cap;
	size_t next;		/* the next message the engine must return */
	int off;		/* stopped comparing: our close frame went out (messages are dropped) */
};

static struct ref refs[FUZZ_CONNS];

static void *grow(void *p, size_t *cap, size_t need, size_t elem) {
	if (need <= *cap) return p;
	*cap = need * 2 + 64;
	p = realloc(p, *cap * elem);
	if (!p) abort();
	return p;
}

static void ref_reset(struct ref *f) {
	free(f->in);
	free(f->store);
	free(f->msgs);
	free(f->frame_ends);
	memset(f, 0, sizeof(*f));
}

static void ref_parse(struct ref *f) {
	uint64_t max = uwsgi.websockets_max_size * 1024;
	while (!f->dead) {
		const uint8_t *h = f->in + f->pos;
		size_t avail = f->in_len - f->pos;
		if (avail < 2) return;
		int fin = h[0] >> 7;
		uint8_t opcode = h[0] & 0x0F, len7 = h[1] & 0x7F;
		if (h[0] & 0x70) { f->dead = "RSV bits"; return; }
		if ((opcode >= 3 && opcode <= 7) || opcode >= 11) { f->dead = "reserved opcode"; return; }
		if (!(h[1] & 0x80)) { f->dead = "unmasked frame"; return; }
		if (opcode >= 8 && (!fin || len7 > 125)) { f->dead = "bad control frame"; return; }
		if (opcode == 0 && !f->in_msg) { f->dead = "continuation without a message"; return; }
		if (opcode >= 1 && opcode <= 2 && f->in_msg) { f->dead = "new message inside a fragmented one"; return; }
		size_t ext = len7 == 126 ? 2 : len7 == 127 ? 8 : 0;
		if (avail < 2 + ext + 4) return;
		uint64_t size = len7;
		size_t i;
		if (ext) {
			size = 0;
			for (i = 0; i < ext; i++) size = (size << 8) | h[2 + i];
		}
		// a non-minimal length is accepted (the engine does: see make_corpus.py's len64-short)
		if (size >> 63) { f->dead = "64-bit length with the top bit set"; return; }
		if (opcode <= 2) {
			uint64_t so_far = f->in_msg ? f->store_len - f->msg_off : 0;
			if (so_far + size > max || size > max) { f->dead = "message over websockets-max-size"; return; }
		}
		size_t hlen = 2 + ext + 4;
		if (avail - hlen < size) return;
		const uint8_t *mask = h + 2 + ext, *p = h + hlen;
		f->pos += hlen + size;
		f->frame_ends = grow(f->frame_ends, &f->frames_cap, f->nframes + 1, sizeof(*f->frame_ends));
		f->frame_ends[f->nframes++] = f->pos;
		if (opcode == 8) { f->dead = "the peer's close"; return; }
		if (opcode >= 8) continue;	// ping, pong: not messages
		if (!f->in_msg) {
			f->in_msg = 1;
			f->msg_opcode = opcode;
			f->msg_off = f->store_len;
		}
		f->store = grow(f->store, &f->store_cap, f->store_len + size + 1, 1);
		for (i = 0; i < size; i++) f->store[f->store_len + i] = p[i] ^ mask[i & 3];
		f->store_len += size;
		if (!fin) continue;
		f->in_msg = 0;
		if (f->msg_opcode == 1 && !utf8_ok(f->store + f->msg_off, f->store_len - f->msg_off)) { f->dead = "text message not UTF-8"; return; }
		f->msgs = grow(f->msgs, &f->msgs_cap, f->nmsgs + 1, sizeof(*f->msgs));
		f->msgs[f->nmsgs].opcode = f->msg_opcode;
		f->msgs[f->nmsgs].off = f->msg_off;
		f->msgs[f->nmsgs].len = f->store_len - f->msg_off;
		f->msgs[f->nmsgs].end = f->pos;
		f->nmsgs++;
	}
}

static void ref_feed(struct fuzz_conn *c, const uint8_t *p, size_t len) {
	struct ref *f = &refs[c->index];
	if (f->ended || !len) return;
	f->in = grow(f->in, &f->in_cap, f->in_len + len, 1);
	memcpy(f->in + f->in_len, p, len);
	f->in_len += len;
	ref_parse(f);
}

// What a receive call gave: a message (ub), or nothing yet (ub NULL, `over` 0), or the end of
// the connection (`over` 1). `close_before`: our close frame had gone out before the call.
static void ref_check(struct fuzz_conn *c, struct uwsgi_buffer *ub, int over, time_t close_before, const char *api) {
	struct wsgi_request *r = c->req;
	struct ref *f = &refs[c->index];
	if (ub && close_before) fuzz_fail("conn %d: %s returned a message after our close frame", c->index, api);
	if (!f->off && ub) {
		if (f->next >= f->nmsgs)
			fuzz_fail("conn %d: %s returned a %zu-byte message (opcode %u), the reference has %s after its %zu messages",
			          c->index, api, ub->pos, r->websocket_message_opcode, f->dead ? f->dead : "no complete message", f->nmsgs);
		struct ref_msg *m = &f->msgs[f->next];
		if (m->opcode != r->websocket_message_opcode || m->len != ub->pos || (m->len && memcmp(f->store + m->off, ub->buf, m->len)))
			fuzz_fail("conn %d: %s returned message %zu as %zu bytes (opcode %u), the peer sent %zu bytes (opcode %u)",
			          c->index, api, f->next, ub->pos, r->websocket_message_opcode, m->len, m->opcode);
		uwsgi_log("fuzz ref: conn %d: %s returned message %zu (%zu bytes, opcode %u) as the reference has it\n", c->index, api, f->next, m->len, m->opcode);
		f->next++;
	}
	if (!f->off && !ub && !over && !r->websocket_close_sent && f->next < f->nmsgs && f->msgs[f->next].end <= c->delivered)
		fuzz_fail("conn %d: %s found no message, but the %zu bytes read complete message %zu (%zu bytes, opcode %u, ends at %zu)",
		          c->index, api, c->delivered, f->next, f->msgs[f->next].len, f->msgs[f->next].opcode, f->msgs[f->next].end);
	// after our close frame the peer's messages are dropped
	if (r->websocket_close_sent) f->off = 1;
	if (over && r->websocket_close_sent && !r->write_errors && !c->write_broken && !c->peer_reset && (r->websocket_close_pending || !c->close_written)
	    && !(r->websocket_close_pending && known_bug("pending-close")))
		fuzz_fail("conn %d: %s ended the connection with our close frame not all out (%zu bytes on the wire, %s)", c->index, api,
		          c->out_len, r->websocket_close_pending ? "the rest pending" : "none pending");
}

// 0015: one receive call lets the worker's other connections run every 256 frames it
// consumes that are not returned messages. Before each read all the bytes read so far are
// consumed: the frames that ended after the last yield were consumed without one (an
// undercount when the yield came mid-buffer, never an overcount). Lingering (after a failure)
// only drains, and yields by bytes.
#define FUZZ_FRAMES_PER_YIELD 256
static void before_read(struct fuzz_conn *c) {
	struct ref *f = &refs[c->index];
	if (!c->in_recv || c->req->websocket_closed) return;
	size_t lo = 0, hi = f->nframes;
	// frames ending at or before yield_mark, by binary search; then those up to delivered
	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		if (f->frame_ends[mid] <= c->yield_mark) lo = mid + 1;
		else hi = mid;
	}
	size_t n = 0, i;
	for (i = lo; i < f->nframes && f->frame_ends[i] <= c->delivered; i++) n++;
	if (n > FUZZ_FRAMES_PER_YIELD + 1 && !known_bug("dropped-messages-yield"))
		fuzz_fail("conn %d: %zu frames consumed in one receive call without a yield (bytes %zu-%zu; at most %d between yields)",
		          c->index, n, c->yield_mark, c->delivered, FUZZ_FRAMES_PER_YIELD);
}

/* --- connection lifecycle ---------------------------------------------------------------- */

static int conn_started[FUZZ_CONNS];

// what uwsgi_close_request() (core/utils.c) frees of a WebSocket request, then its reset
static void end_request(struct fuzz_conn *c) {
	struct wsgi_request *r = c->req;
	// as uwsgi_close_request() begins: the rest of a close frame the graceful stop left cut goes
	// out now (patch 0017), so nothing may be left half written but after a write that failed
	// (the peer is gone anyway); the rest of a ping the event loop left cut too (patch 0033)
	if (r->websocket_close_pending || r->websocket_ping_cut) uwsgi_websocket_request_end(r);
	if (r->websocket_ping_cut) fuzz_fail("conn %d: uwsgi_websocket_request_end() kept the cut ping", c->index);
	if (r->websocket_close_pending) fuzz_fail("conn %d: uwsgi_websocket_request_end() kept the pending close frame", c->index);
	if (c->headers_written && c->out_len && !c->write_broken && !r->write_errors && !c->peer_reset)
		fuzz_fail("conn %d: ended inside a server frame (%zu bytes)", c->index, c->out_len);
	if (r->proto_parser_buf) free(r->proto_parser_buf);
	if (r->headers) uwsgi_buffer_destroy(r->headers);
	if (r->websocket_buf) uwsgi_buffer_destroy(r->websocket_buf);
	if (r->websocket_continuation) uwsgi_buffer_destroy(r->websocket_continuation);
	if (r->websocket_send_buf) uwsgi_buffer_destroy(r->websocket_send_buf);
	int async_id = r->async_id;
	memset(r, 0, sizeof(*r));
	r->async_id = async_id;
	uwsgi.workers[uwsgi.mywid].cores[async_id].in_request = 0;
	free(c->out);
	free(c->inflight);
	ref_reset(&refs[c->index]);
	struct wsgi_request *keep = c->req;
	int index = c->index;
	memset(c, 0, sizeof(*c));
	c->req = keep;
	c->index = index;
	conn_started[index] = 0;
}

static void expected_accept(const uint8_t *key, size_t len, char *out) {
	unsigned char digest[SHA_DIGEST_LENGTH];
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	EVP_DigestInit_ex(ctx, EVP_sha1(), NULL);
	EVP_DigestUpdate(ctx, key, len);
	EVP_DigestUpdate(ctx, "258EAFA5-E914-47DA-95CA-C5AB0DC85B11", 36);
	EVP_DigestFinal_ex(ctx, digest, NULL);
	EVP_MD_CTX_free(ctx);
	EVP_EncodeBlock((unsigned char *) out, digest, SHA_DIGEST_LENGTH);
}

// A header value as nginx or uWSGI's HTTP parser can deliver it: the line ends at CR or LF,
// and neither passes a NUL. Longer fuzzed bytes would test a request no client can send.
static size_t header_line_len(const uint8_t *p, size_t len) {
	size_t i;
	for (i = 0; i < len; i++) {
		if (p[i] == '\r' || p[i] == '\n' || p[i] == 0) break;
	}
	return i;
}

// the request as the HTTP parser leaves it for a WebSocket handler, then the handshake
static void start_request(struct fuzz_conn *c, struct cursor *in) {
	struct wsgi_request *r = c->req;
	conn_started[c->index] = 1;
	uwsgi.workers[uwsgi.mywid].cores[r->async_id].in_request = 1;
	r->fd = FUZZ_FD_BASE + c->index;
	r->socket = fuzz_socket_ptr();
	r->method = "GET";
	r->method_len = 3;
	r->uri = "/ws";
	r->uri_len = 3;
	r->remote_addr = "127.0.0.1";
	r->remote_addr_len = 9;

	uint8_t flags = u8(in);
	size_t key_len = u8(in);
	const uint8_t *key = take(in, &key_len);
	size_t cproto_len = u8(in);
	const uint8_t *cproto = take(in, &cproto_len);
	size_t aproto_len = u8(in);
	const uint8_t *aproto = take(in, &aproto_len);
	size_t early_len = u8(in);
	const uint8_t *early = take(in, &early_len);
	key_len = header_line_len(key, key_len);
	cproto_len = header_line_len(cproto, cproto_len);
	// the app's protocol too: a Python str with a CR LF in it is the app's bug, not the engine's
	aproto_len = header_line_len(aproto, aproto_len);

	// the parser's buffer is a copy (its size is buffer-size in uWSGI), so the engine may
	// free it; the header values point into it like the parser's do
	size_t total = key_len + cproto_len + early_len;
	r->proto_parser_buf = uwsgi_malloc(total ? total : 1);
	memcpy(r->proto_parser_buf, key, key_len);
	memcpy(r->proto_parser_buf + key_len, cproto, cproto_len);
	memcpy(r->proto_parser_buf + key_len + cproto_len, early, early_len);
	char *app_key = NULL;
	uint16_t app_key_len = 0;
	if (flags & 1) {
		app_key = r->proto_parser_buf;
		app_key_len = key_len;
	}
	else {
		r->http_sec_websocket_key = r->proto_parser_buf;
		r->http_sec_websocket_key_len = key_len;
	}
	r->http_sec_websocket_protocol = r->proto_parser_buf + key_len;
	r->http_sec_websocket_protocol_len = cproto_len;
	r->proto_parser_remains = early_len;
	ref_feed(c, early, early_len);
	r->proto_parser_remains_buf = r->proto_parser_buf + key_len + cproto_len;

	expected_accept(key, key_len, c->accept);
	c->client_proto = cproto;
	c->client_proto_len = cproto_len;
	c->app_proto_given = (flags & 2) && aproto_len > 0;
	int ret = uwsgi_websocket_handshake(r, app_key, app_key_len, NULL, 0,
	                                    (flags & 2) ? (char *) aproto : NULL, (flags & 2) ? aproto_len : 0);
	if (key_len == 0 && ret == 0) fuzz_fail("conn %d: handshake accepted an empty key", c->index);
	// the Python plugin raises on a failed handshake, and the request ends
	if (ret != 0) end_request(c);
}

static void check_message(struct fuzz_conn *c, struct uwsgi_buffer *ub, int nb) {
	struct wsgi_request *r = c->req;
	if (nb && ub->pos == 0) return;	// nothing to read yet (or an empty message)
	if (ub->pos > uwsgi.websockets_max_size * 1024)
		fuzz_fail("conn %d: %zu-byte message over websockets-max-size %llu KiB", c->index, ub->pos, (unsigned long long) uwsgi.websockets_max_size);
	if (r->websocket_message_opcode != 1 && r->websocket_message_opcode != 2)
		fuzz_fail("conn %d: message returned with opcode %u", c->index, r->websocket_message_opcode);
	if (r->websocket_message_opcode == 1 && !utf8_ok((uint8_t *) ub->buf, ub->pos))
		fuzz_fail("conn %d: text message returned to the app is not UTF-8", c->index);
}

static void app_send(struct fuzz_conn *c, struct cursor *in, int binary) {
	uint8_t f = u8(in);
	char *msg;
	size_t len;
	if (f < 0x80) {
		len = f;
		msg = (char *) take(in, &len);
	}
	else {
		uint16_t n = u16(in);
		len = (f & 0x40) ? 65528 + (n & 15) : (n & 0x1fff);
		msg = malloc(len ? len : 1);
		memset(msg, u8(in), len);
	}
	if (binary) uwsgi_websocket_send_binary(c->req, msg, len);
	else uwsgi_websocket_send(c->req, msg, len);
	if (f >= 0x80) free(msg);
}

static void queue_read(struct fuzz_conn *c, enum fuzz_read_kind kind, const uint8_t *data, size_t len) {
	if (c->read_count == FUZZ_MAX_READS) return;
	if (kind == READ_DATA) ref_feed(c, data, len);
	if (kind == READ_EOF || kind == READ_RESET) refs[c->index].ended = 1;
	c->reads[c->read_count].kind = kind;
	c->reads[c->read_count].data = data;
	c->reads[c->read_count].len = len;
	c->read_count++;
}

// The app's close as the Python plugin makes it (py_uwsgi_websocket_close): a code that may
// not be sent or a reason that is not UTF-8 raises ValueError before the engine is called.
// The exported checks must agree with the harness's own. 1 when the close was made.
static int app_close(struct fuzz_conn *c, uint16_t code, const uint8_t *reason, size_t len, int linger) {
	struct wsgi_request *r = c->req;
	int valid = uwsgi_websocket_valid_close_code(code);
	if (valid != sendable_close_code(code))
		fuzz_fail("uwsgi_websocket_valid_close_code(%u) = %d, RFC 6455 7.4 says %d", code, valid, sendable_close_code(code));
	int utf8 = uwsgi_websocket_valid_utf8(reason, len);
	if (!!utf8 != utf8_ok(reason, len))
		fuzz_fail("uwsgi_websocket_valid_utf8() = %d for a %zu-byte reason, RFC 3629 says %d", utf8, len, utf8_ok(reason, len));
	if (!valid || !utf8) return 0;
	// the frame it must put on the wire: the code, the reason cut before the first character
	// that does not fit in 123 bytes
	if (!r->websocket_close_sent) {
		size_t cut = len;
		if (cut > 123) {
			cut = 123;
			while (cut > 0 && (reason[cut] & 0xC0) == 0x80) cut--;
		}
		c->expect_close[0] = (uint8_t) (code >> 8);
		c->expect_close[1] = (uint8_t) code;
		if (cut) memcpy(c->expect_close + 2, reason, cut);
		c->expect_close_len = 2 + cut;
	}
	c->app_close_pending = 1;
	c->app_close_code = code;
	int ret = uwsgi_websocket_close(r, code, (char *) reason, len);
	c->app_close_pending = 0;
	c->expect_close_len = 0;
	if (linger && ret >= 0) uwsgi_websocket_linger(r);
	return 1;
}

static void during_wait(struct fuzz_conn *c) {
	int action = c->in_wait_action;
	c->in_wait_action = 0;
	if (action == 1) {
		uwsgi_websockets_going_away();
		return;
	}
	app_close(c, c->in_wait_code, NULL, 0, 0);
}

// the hub runs the graceful stop while a connection's greenlet waits for its socket to drain
static void during_write_wait(struct fuzz_conn *c) {
	uwsgi_websockets_going_away();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
	fuzz_stubs_init();
	fuzz_during_wait = during_wait;
	fuzz_during_write_wait = during_write_wait;
	fuzz_before_read = before_read;
	uwsgi_websockets_init();
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
	struct cursor in = { data, size };
	uint8_t cfg = u8(&in);
	uwsgi.websockets_max_size = 1 + (cfg & 3);
	uwsgi.websockets_ping_freq = 1 + ((cfg >> 2) & 7);
	uwsgi.websockets_pong_tolerance = 1 + ((cfg >> 5) & 3);
	uwsgi.websockets_frame_rate = 0;
	uwsgi.websockets_frame_burst = 0;
	if (cfg & 0x80) {
		uint8_t rate = u8(&in);
		uwsgi.websockets_frame_rate = 1 + (rate & 31);
		uwsgi.websockets_frame_burst = rate >> 5;
	}
	fuzz_clock_us = 1700000000ULL * 1000000;

	while (in.left) {
		uint8_t op = u8(&in);
		struct fuzz_conn *c = &fuzz_conns[op & 3];
		int action = (op >> 2) % ACTIONS;
		if (!conn_started[c->index]) {
			start_request(c, &in);
			if (!conn_started[c->index]) continue;
		}
		struct wsgi_request *r = c->req;
		if (action == 5 || action == 6 || action == 17) {
			c->in_recv = 1;
			c->yield_mark = c->delivered;
			fuzz_current = c;
		}
		switch (action) {
		case 0:
		case 1: {
			size_t len = action == 0 ? u8(&in) : u16(&in);
			const uint8_t *p = take(&in, &len);
			if (len) queue_read(c, READ_DATA, p, len);
			break;
		}
		case 2: queue_read(c, READ_EAGAIN, NULL, 0); break;
		case 3: queue_read(c, READ_EOF, NULL, 0); break;
		case 4: queue_read(c, READ_RESET, NULL, 0); break;
		case 5:
		case 6: {
			int nb = action == 5;
			time_t close_before = r->websocket_close_sent;
			struct uwsgi_buffer *ub = nb ? uwsgi_websocket_recv_nb(r) : uwsgi_websocket_recv(r);
			if (ub) {
				check_message(c, ub, nb);
				// recv_nb's empty buffer is an empty message only when the reference's next
				// message is empty and was read, and no close frame of ours went out (after
				// it the peer's messages are dropped); else it means nothing yet (ref_check)
				struct ref *f = &refs[c->index];
				int message = !nb || ub->pos > 0
				              || (!f->off && !r->websocket_close_sent && f->next < f->nmsgs && f->msgs[f->next].len == 0
				                  && f->msgs[f->next].end <= c->delivered);
				ref_check(c, message ? ub : NULL, 0, close_before, nb ? "recv_nb" : "recv");
				// the plugins copy the message into a Python object and destroy the buffer
				uwsgi_buffer_destroy(ub);
			}
			else ref_check(c, NULL, 1, close_before, nb ? "recv_nb" : "recv");
			break;
		}
		case 7: app_send(c, &in, 0); break;
		case 8: app_send(c, &in, 1); break;
		case 9:
		case 19: {
			uint16_t code = u16(&in);
			size_t len = u8(&in);
			const uint8_t *reason = take(&in, &len);
			app_close(c, code, reason, len, action == 19);
			break;
		}
		case 10: uwsgi_websockets_going_away(); break;
		case 11: end_request(c); break;
		case 12: fuzz_clock_us += (uint64_t) u8(&in) * 1000000; break;
		case 13: fuzz_clock_us += (uint64_t) u8(&in) * 1000; break;
		case 14: c->write_fail = 1; break;
		case 15: c->wait_errors++; break;
		case 16: {
			uint8_t k = u8(&in);
			c->in_wait_action = (k & 1) ? 1 : 2;
			if (!(k & 1)) c->in_wait_code = u16(&in);
			break;
		}
		case 17: {
			time_t close_before = r->websocket_close_sent;
			struct uwsgi_buffer *ub = NULL;
			int ret = uwsgi_websocket_try_recv(r, &ub);
			if (ret == 1) {
				if (!ub) fuzz_fail("conn %d: try_recv returned 1 without a message", c->index);
				check_message(c, ub, 0);
				ref_check(c, ub, 0, close_before, "try_recv");
				uwsgi_buffer_destroy(ub);
			}
			else {
				if (ub) fuzz_fail("conn %d: try_recv returned %d with a message", c->index, ret);
				if (ret != 0 && ret != -1) fuzz_fail("conn %d: try_recv returned %d", c->index, ret);
				if (ret == -1 && !r->websocket_closed) fuzz_fail("conn %d: try_recv returned -1 on an open connection", c->index);
				ref_check(c, NULL, ret == -1, close_before, "try_recv");
			}
			break;
		}
		case 18: {
			c->write_blocked = 1;
			c->write_room = u8(&in);
			c->write_wait_action = u8(&in) & 3;
			break;
		}
		case 20: {
			if (c->read_head < c->read_count) {
				// all it read were pongs, taken: they hid no message
				if (uwsgi_websocket_absorb_pongs(r)) ref_check(c, NULL, 0, r->websocket_close_sent, "absorb_pongs");
			}
			else {
				fuzz_clock_us += (uint64_t) uwsgi.websockets_ping_freq * 1000000;
				uwsgi_websocket_ping_nowait(r);
			}
			break;
		}
		}
		c->in_recv = 0;
		fuzz_current = NULL;
	}
	int i;
	for (i = 0; i < FUZZ_CONNS; i++) {
		if (conn_started[i]) end_request(&fuzz_conns[i]);
	}
	return 0;
}

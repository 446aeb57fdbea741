/*
 * The rest of uWSGI, as far as core/websockets.c and core/buffer.c reach it: just enough of a
 * worker for the real engine code to run in-process under libFuzzer.
 *
 * Every stand-in either models the real function's observable behaviour (reads come from the
 * fuzzed peer, writes go to the harness's frame oracle, the clock is the fuzzed clock) or
 * aborts when reached: a function this harness does not model must never return an invented
 * result. When websockets.c starts calling something new, the link fails on the undefined
 * symbol; add it here (see README.md in this folder).
 */
#include <openssl/evp.h>
#include <stdarg.h>
#include <sys/syscall.h>

#include "fuzz.h"

struct uwsgi_server uwsgi;
struct fuzz_conn fuzz_conns[FUZZ_CONNS];
uint64_t fuzz_clock_us;
void (*fuzz_during_wait)(struct fuzz_conn *);
void (*fuzz_during_write_wait)(struct fuzz_conn *);
void (*fuzz_before_read)(struct fuzz_conn *);
struct fuzz_conn *fuzz_current;

static struct uwsgi_socket fuzz_socket;
static struct uwsgi_worker fuzz_workers[2];
static struct uwsgi_core fuzz_cores[FUZZ_CONNS];

__attribute__((noreturn)) static void not_modelled(const char *name) {
	fprintf(stderr, "fuzz stubs: %s() was called but is not modelled by stubs.c\n", name);
	abort();
}

// logging is the engine's slowest path; FUZZ_VERBOSE=1 shows it when reading a crash
static void fuzz_vlog(const char *fmt, va_list ap) {
	static int verbose = -1;
	if (verbose < 0) verbose = getenv("FUZZ_VERBOSE") != NULL;
	if (verbose) vfprintf(stderr, fmt, ap);
}

void uwsgi_log(const char *fmt, ...) {
	va_list ap;
	va_start(ap, fmt);
	fuzz_vlog(fmt, ap);
	va_end(ap);
}

void uwsgi_log_verbose(const char *fmt, ...) {
	va_list ap;
	va_start(ap, fmt);
	fuzz_vlog(fmt, ap);
	va_end(ap);
}

// uWSGI exits the worker when an allocation fails; a fuzzed input that gets there is a
// remote denial of service, so it must stop the run.
void *uwsgi_malloc(size_t size) {
	void *p = malloc(size);
	if (!p) fuzz_fail("uwsgi_malloc(%zu) failed: the worker would exit", size);
	return p;
}

void *uwsgi_calloc(size_t size) {
	void *p = calloc(1, size);
	if (!p) fuzz_fail("uwsgi_calloc(%zu) failed: the worker would exit", size);
	return p;
}

/* --- time: only the fuzz input moves it ------------------------------------------------ */

time_t uwsgi_now(void) {
	return (time_t) (fuzz_clock_us / 1000000);
}

uint64_t uwsgi_micros(void) {
	return fuzz_clock_us;
}

/* --- the peer's side of the socket ---------------------------------------------------- */

struct fuzz_conn *fuzz_conn_of(struct wsgi_request *wsgi_req) {
	int i;
	for (i = 0; i < FUZZ_CONNS; i++) {
		if (fuzz_conns[i].req == wsgi_req) return &fuzz_conns[i];
	}
	fuzz_fail("a wsgi_request that is not one of the fuzzed connections");
}

struct fuzz_conn *fuzz_conn_of_fd(int fd) {
	if (fd >= FUZZ_FD_BASE && fd < FUZZ_FD_BASE + FUZZ_CONNS) return &fuzz_conns[fd - FUZZ_FD_BASE];
	return NULL;
}

static int fuzz_has_input(struct fuzz_conn *c) {
	return c->read_head < c->read_count;
}

// uwsgi_proto_base_read_body(): the bytes the HTTP parser read past the request first, then
// the socket, which gives the next fuzzed read result. EOF and reset stay, as on a socket.
ssize_t uwsgi_proto_base_read_body(struct wsgi_request *wsgi_req, char *buf, size_t len) {
	if (wsgi_req->proto_parser_remains > 0) {
		size_t n = wsgi_req->proto_parser_remains < len ? wsgi_req->proto_parser_remains : len;
		memcpy(buf, wsgi_req->proto_parser_remains_buf, n);
		wsgi_req->proto_parser_remains -= n;
		wsgi_req->proto_parser_remains_buf += n;
		fuzz_conn_of(wsgi_req)->delivered += n;
		return n;
	}
	struct fuzz_conn *c = fuzz_conn_of(wsgi_req);
	if (len == 0) return 0;
	if (fuzz_before_read) fuzz_before_read(c);
	if (!fuzz_has_input(c)) {
		errno = EAGAIN;
		return -1;
	}
	struct fuzz_read *r = &c->reads[c->read_head];
	switch (r->kind) {
	case READ_DATA: {
		size_t n = r->len - c->read_offset;
		if (n > len) n = len;
		memcpy(buf, r->data + c->read_offset, n);
		c->read_offset += n;
		c->delivered += n;
		if (c->read_offset == r->len) {
			c->read_head++;
			c->read_offset = 0;
		}
		return n;
	}
	case READ_EAGAIN:
		c->read_head++;
		errno = EAGAIN;
		return -1;
	case READ_EOF:
		return 0;
	case READ_RESET:
		c->peer_reset = 1;
		errno = ECONNRESET;
		return -1;
	}
	abort();
}

// A wait with nothing left to read is a peer that stays silent: it lasts the whole timeout.
static int fuzz_wait_read(int fd, int timeout) {
	struct fuzz_conn *c = fuzz_conn_of_fd(fd);
	if (!c) fuzz_fail("wait_read_hook on fd %d, not a fuzzed connection", fd);
	// patch 0022: a receive call waiting for its peer holds no read buffer with nothing in it
	// (one page per idle connection); a partial frame's bytes keep it
	struct uwsgi_buffer *rb = c->req->websocket_buf;
	if (c->in_recv && !c->req->websocket_closed && rb && rb->pos == c->req->websocket_buf_off)
		fuzz_fail("conn %d: a receive waits for its peer holding an empty read buffer", c->index);
	c->yield_mark = c->delivered;
	if (c->in_wait_action && fuzz_during_wait) fuzz_during_wait(c);
	if (c->wait_errors > 0) {
		c->wait_errors--;
		errno = EINTR;
		return -1;
	}
	// the event loop while the receive waits, as the gevent plugin's kept wait has it (patches
	// 0032, 0033): it takes pongs as they come (a yield), and writes the ping due at the end
	// of the wait and waits on; anything else ends the wait
	for (;;) {
		if (fuzz_has_input(c)) {
			if (!uwsgi_websocket_absorb_pongs(c->req)) return 1;
			c->yield_mark = c->delivered;
			continue;
		}
		fuzz_clock_us += (uint64_t) (timeout > 0 ? timeout : 0) * 1000000;
		if (!uwsgi_websocket_ping_nowait(c->req)) return 0;
	}
}

// The socket is writable unless the peer stopped reading (WRITE_BLOCK). Then the writer's wait
// is where the hub runs other greenlets (write_wait_action bit 0: the graceful stop), and it
// either sees the peer read everything (1) or lasts the whole timeout (bit 1: 0, a write error).
static int fuzz_wait_write(int fd, int timeout) {
	struct fuzz_conn *c = fuzz_conn_of_fd(fd);
	if (!c) fuzz_fail("wait_write_hook on fd %d, not a fuzzed connection", fd);
	if (!c->write_blocked) return 1;
	c->yield_mark = c->delivered;
	int action = c->write_wait_action;
	c->write_wait_action = 0;
	if ((action & 1) && fuzz_during_write_wait) fuzz_during_write_wait(c);
	if (action & 2) {
		fuzz_clock_us += (uint64_t) (timeout > 0 ? timeout : 0) * 1000000;
		c->write_broken = 1;
		return 0;
	}
	c->write_blocked = 0;
	return 1;
}

static int fuzz_wait_milliseconds(int ms) {
	// with gevent a switch to the hub: the worker's other connections run
	if (fuzz_current) fuzz_current->yield_mark = fuzz_current->delivered;
	fuzz_clock_us += (uint64_t) (ms > 0 ? ms : 0) * 1000;
	return 0;
}

/* --- the engine's writes ---------------------------------------------------------------- */

// write(2) on the fuzzed socket: what it takes goes to the wire oracle.
static ssize_t fuzz_socket_write(struct fuzz_conn *c, const char *buf, size_t len) {
	if (c->write_fail) {
		c->write_fail = 0;
		c->write_broken = 1;
		errno = EPIPE;
		return -1;
	}
	if (c->write_blocked) {
		if (c->write_room == 0) {
			errno = EAGAIN;
			return -1;
		}
		if (len > c->write_room) len = c->write_room;
		c->write_room -= len;
	}
	fuzz_wire_write(c, buf, len);
	return len;
}

// uwsgi_proto_base_write() (proto/base.c): one write from the request's write position, which
// it advances; UWSGI_AGAIN while the buffer is not all out
int uwsgi_proto_base_write(struct wsgi_request *wsgi_req, char *buf, size_t len) {
	struct fuzz_conn *c = fuzz_conn_of(wsgi_req);
	// uWSGI keeps one write position per request: a write that starts while another one is
	// partly out would send the other's rest from this buffer
	if (wsgi_req->write_pos) {
		if (!c->inflight || len != c->inflight_len || memcmp(buf, c->inflight, len))
			fuzz_fail("conn %d: a %zu-byte write (0x%02x...) continues at position %zu of another frame (%zu bytes, 0x%02x...) that is partly out",
			          c->index, len, len ? (uint8_t) buf[0] : 0, wsgi_req->write_pos, c->inflight_len, c->inflight ? c->inflight[0] : 0);
	}
	else {
		free(c->inflight);
		c->inflight = NULL;
	}
	ssize_t wlen = fuzz_socket_write(c, buf + wsgi_req->write_pos, len - wsgi_req->write_pos);
	if (wlen > 0) wsgi_req->write_pos += wlen;
	if (wsgi_req->write_pos && wsgi_req->write_pos < len && !c->inflight) {
		c->inflight = uwsgi_malloc(len);
		memcpy(c->inflight, buf, len);
		c->inflight_len = len;
	}
	if (wlen > 0) {
		if (wsgi_req->write_pos == len) {
			free(c->inflight);
			c->inflight = NULL;
			return UWSGI_OK;
		}
		return UWSGI_AGAIN;
	}
	if (wlen < 0 && errno == EAGAIN) return UWSGI_AGAIN;
	return -1;
}

// uwsgi_response_write_body_do() (core/writer.c) after the headers, without routing or
// transformations: proto_write until all is out, waiting (wait_write_hook, socket-timeout)
// whenever the socket is full; the write position is the request's, shared by every writer
int uwsgi_response_write_body_do(struct wsgi_request *wsgi_req, char *buf, size_t len) {
	if (wsgi_req->write_errors) return -1;
	if (!wsgi_req->headers_sent) fuzz_fail("response body written before the 101 headers");
	if (len == 0) return UWSGI_OK;
	for (;;) {
		errno = 0;
		int ret = wsgi_req->socket->proto_write(wsgi_req, buf, len);
		if (ret < 0) {
			wsgi_req->write_errors++;
			return -1;
		}
		if (ret == UWSGI_OK) break;
		if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINPROGRESS) continue;
		ret = uwsgi.wait_write_hook(wsgi_req->fd, uwsgi.socket_timeout);
		if (ret <= 0) {
			wsgi_req->write_errors++;
			return -1;
		}
	}
	wsgi_req->response_size += wsgi_req->write_pos;
	wsgi_req->write_pos = 0;
	return UWSGI_OK;
}

// core/writer.c keeps the headers in wsgi_req->headers (a page) until the request ends; the
// handshake frees that buffer itself (patch 0012), so it must be a real uwsgi_buffer.
int uwsgi_response_prepare_headers(struct wsgi_request *wsgi_req, char *status, uint16_t status_len) {
	if (wsgi_req->headers_sent || wsgi_req->headers_size || wsgi_req->response_size) return -1;
	if (!wsgi_req->headers) wsgi_req->headers = uwsgi_buffer_new(uwsgi.page_size);
	wsgi_req->headers->pos = 0;
	if (uwsgi_buffer_append(wsgi_req->headers, "HTTP/1.1 ", 9)) return -1;
	if (uwsgi_buffer_append(wsgi_req->headers, status, status_len)) return -1;
	if (uwsgi_buffer_append(wsgi_req->headers, "\r\n", 2)) return -1;
	if (status_len >= 3) wsgi_req->status = (status[0] - '0') * 100 + (status[1] - '0') * 10 + (status[2] - '0');
	return 0;
}

int uwsgi_response_add_header(struct wsgi_request *wsgi_req, char *key, uint16_t key_len, char *value, uint16_t value_len) {
	if (wsgi_req->headers_sent || !wsgi_req->headers) return -1;
	struct uwsgi_buffer *h = wsgi_req->headers;
	if (uwsgi_buffer_append(h, key, key_len) || uwsgi_buffer_append(h, ": ", 2)
	    || uwsgi_buffer_append(h, value, value_len) || uwsgi_buffer_append(h, "\r\n", 2)) return -1;
	wsgi_req->header_cnt++;
	return 0;
}

int uwsgi_response_write_headers_do(struct wsgi_request *wsgi_req) {
	struct fuzz_conn *c = fuzz_conn_of(wsgi_req);
	if (wsgi_req->headers_sent || !wsgi_req->headers || wsgi_req->write_errors) return -1;
	if (c->write_fail) {
		c->write_fail = 0;
		wsgi_req->write_errors++;
		return -1;
	}
	if (uwsgi_buffer_append(wsgi_req->headers, "\r\n", 2)) return -1;
	fuzz_headers_written(c, wsgi_req->headers->buf, wsgi_req->headers->pos);
	wsgi_req->headers_size += wsgi_req->headers->pos;
	wsgi_req->headers_sent = 1;
	return 0;
}

/* The engine may write to, or shut down, its socket directly. These definitions take the
   place of libc's for the fuzzed descriptors only; any other descriptor gets the system call. */
ssize_t send(int fd, const void *buf, size_t len, int flags) {
	struct fuzz_conn *c = fuzz_conn_of_fd(fd);
	if (!c) return syscall(SYS_sendto, fd, buf, len, flags, NULL, 0);
	return fuzz_socket_write(c, buf, len);
}

int shutdown(int fd, int how) {
	struct fuzz_conn *c = fuzz_conn_of_fd(fd);
	if (!c) return syscall(SYS_shutdown, fd, how);
	if (how == SHUT_WR || how == SHUT_RDWR) c->shut_wr = 1;
	return 0;
}

/* --- helpers from core/utils.c and core/ssl.c -------------------------------------------- */

uint16_t uwsgi_be16(char *buf) {
	const uint8_t *b = (const uint8_t *) buf;
	return (uint16_t) ((b[0] << 8) | b[1]);
}

uint64_t uwsgi_be64(char *buf) {
	const uint8_t *b = (const uint8_t *) buf;
	uint64_t v = 0;
	int i;
	for (i = 0; i < 8; i++) v = (v << 8) | b[i];
	return v;
}

char *uwsgi_sha1_2n(char *s1, size_t len1, char *s2, size_t len2, char *dst) {
	// core/ssl.c's SHA1_* calls are deprecated in OpenSSL 3; EVP computes the same digest
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	if (!ctx) return NULL;
	int ok = EVP_DigestInit_ex(ctx, EVP_sha1(), NULL) && EVP_DigestUpdate(ctx, s1, len1)
	         && EVP_DigestUpdate(ctx, s2, len2) && EVP_DigestFinal_ex(ctx, (unsigned char *) dst, NULL);
	EVP_MD_CTX_free(ctx);
	return ok ? dst : NULL;
}

char *uwsgi_base64_encode(char *src, size_t len, size_t *d_len) {
	static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	const uint8_t *s = (const uint8_t *) src;
	char *dst = uwsgi_malloc(((len + 2) / 3) * 4 + 1);
	size_t i, o = 0;
	for (i = 0; i < len; i += 3) {
		uint32_t v = (uint32_t) s[i] << 16;
		if (i + 1 < len) v |= (uint32_t) s[i + 1] << 8;
		if (i + 2 < len) v |= s[i + 2];
		dst[o++] = alphabet[(v >> 18) & 63];
		dst[o++] = alphabet[(v >> 12) & 63];
		dst[o++] = i + 1 < len ? alphabet[(v >> 6) & 63] : '=';
		dst[o++] = i + 2 < len ? alphabet[v & 63] : '=';
	}
	dst[o] = 0;
	*d_len = o;
	return dst;
}

/* Not driven by this harness (see README.md in this folder): trap rather than pretend. */
struct uwsgi_sharedarea *uwsgi_sharedarea_get_by_id(int id, uint64_t pos) {
	not_modelled("uwsgi_sharedarea_get_by_id");
}

int uwsgi_waitfd_event(int fd, int timeout, int event) {
	not_modelled("uwsgi_waitfd_event");
}

/* --- one worker with FUZZ_CONNS async cores --------------------------------------------- */

void fuzz_stubs_init(void) {
	uwsgi.page_size = 4096;
	uwsgi.async = FUZZ_CONNS;
	uwsgi.socket_timeout = 30;
	uwsgi.mywid = 1;
	fuzz_workers[1].cores = fuzz_cores;
	uwsgi.workers = fuzz_workers;
	uwsgi.wait_read_hook = fuzz_wait_read;
	uwsgi.wait_write_hook = fuzz_wait_write;
	uwsgi.wait_milliseconds_hook = fuzz_wait_milliseconds;
	fuzz_socket.proto_read_body = uwsgi_proto_base_read_body;
	fuzz_socket.proto_write = uwsgi_proto_base_write;
	int i;
	for (i = 0; i < FUZZ_CONNS; i++) {
		fuzz_conns[i].index = i;
		fuzz_conns[i].req = &fuzz_cores[i].req;
		fuzz_cores[i].req.async_id = i;
	}
}

struct uwsgi_socket *fuzz_socket_ptr(void) {
	return &fuzz_socket;
}

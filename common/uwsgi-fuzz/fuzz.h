/* Shared between the harness (fuzz_websockets.c) and the uWSGI stand-ins (stubs.c). */
#ifndef WSSTACK_FUZZ_H
#define WSSTACK_FUZZ_H

#include "uwsgi.h"

#define FUZZ_CONNS 4
/* Far above what the fuzzer process opens, so the send()/shutdown() interposers in stubs.c
   can tell a fuzzed connection from a real descriptor. */
#define FUZZ_FD_BASE 900
#define FUZZ_MAX_READS 256

enum fuzz_read_kind { READ_DATA, READ_EAGAIN, READ_EOF, READ_RESET };

struct fuzz_read {
	enum fuzz_read_kind kind;
	const uint8_t *data;
	size_t len;
};

/* What the peer of one connection does, and what the engine wrote to it. */
struct fuzz_conn {
	int index;
	struct wsgi_request *req;
	struct fuzz_read reads[FUZZ_MAX_READS];
	size_t read_head, read_count, read_offset;
	int wait_errors;	/* the next wait_read_hook calls that fail */
	/* another greenlet's action, run while this connection waits to read (gevent switches
	   there): 1 = the graceful stop, 2 = the app closes this connection */
	int in_wait_action;
	uint16_t in_wait_code;
	int write_fail;		/* the next response write fails */
	/* the peer stops reading (WRITE_BLOCK): the socket takes write_room more bytes, then
	   writes get EAGAIN until a wait_write_hook, which drains it; write_wait_action says
	   what happens during that wait (bit 0: the graceful stop runs from the hub, bit 1: the
	   wait times out, as socket-timeout does) */
	int write_blocked;
	size_t write_room;
	int write_wait_action;
	int write_broken;	/* a write failed after part of a frame went out */
	int peer_reset;		/* a read failed with ECONNRESET: nothing we write arrives */
	/* `delivered` when the worker's other connections last got to run (a wait, a yield) or
	   the receive call began; in_recv: a receive call is running */
	size_t yield_mark;
	int in_recv;
	size_t delivered;	/* bytes the engine has read from the peer (reference model) */
	/* the buffer of a write that is partly out (write_pos > 0): the next write from that
	   position must be the rest of the same bytes */
	uint8_t *inflight;
	size_t inflight_len;
	int shut_wr;
	int headers_written;
	/* the server frames written so far, checked as they complete */
	uint8_t *out;
	size_t out_len, out_cap;
	int close_written;
	int app_close_pending;	/* the app's uwsgi_websocket_close() is running */
	uint16_t app_close_code;
	char accept[32];	/* the expected Sec-WebSocket-Accept */
	const uint8_t *client_proto;
	size_t client_proto_len;
	int app_proto_given;
	/* the app's close being sent: the close frame the wire must carry (code, reason cut at
	   a character boundary), or expect_close_len = 0 */
	uint8_t expect_close[125];
	size_t expect_close_len;
};

extern struct fuzz_conn fuzz_conns[FUZZ_CONNS];
extern uint64_t fuzz_clock_us;
/* set by the harness: runs a connection's in_wait_action from inside wait_read_hook */
extern void (*fuzz_during_wait)(struct fuzz_conn *);
/* set by the harness: runs what another greenlet does while a write waits (wait_write_hook) */
extern void (*fuzz_during_write_wait)(struct fuzz_conn *);
/* set by the harness: called before each socket read of a receive call (all the bytes read
   before were consumed then), to count the frames consumed since the last yield */
extern void (*fuzz_before_read)(struct fuzz_conn *);
/* the connection whose receive call is running (wait_milliseconds_hook has no fd) */
extern struct fuzz_conn *fuzz_current;

struct fuzz_conn *fuzz_conn_of(struct wsgi_request *);
struct fuzz_conn *fuzz_conn_of_fd(int fd);
void fuzz_stubs_init(void);
/* bytes the engine put on a connection's wire (the frame oracle in the harness) */
void fuzz_wire_write(struct fuzz_conn *, const char *, size_t);
void fuzz_headers_written(struct fuzz_conn *, const char *, size_t);
struct uwsgi_socket *fuzz_socket_ptr(void);
void fuzz_fail(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

#endif

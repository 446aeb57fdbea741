// The floor of a keep-alive ping on this machine's loopback: the CPU time (getrusage) that a
// process spends per ping when a ping is nothing but one 2-byte write and one read of the
// 6-byte answer, on one of N idle TCP connections, with no framework, no event library and
// no Python. A child process answers every ping (its CPU is not counted, as nginx's is not
// counted in the apps' figure). Not part of `make bench`; docs/benchmark.md (P4a) quotes it.
//
//   cc -O2 -o /tmp/ping_floor bench/ping_floor.c
//   /tmp/ping_floor N RATE SECONDS spread|sweep
//
// spread: one ping every 1/RATE s, the process sleeping in between (what per-connection
//         timers started at scattered moments do); sweep: once a second, all RATE pings of
//         that second back to back (what timers that end on the same whole second do).
// N is limited by the open-file limit (one descriptor per connection in the measuring process).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
	struct rusage r;
	getrusage(RUSAGE_SELF, &r);
	return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

// the peer: a 6-byte masked pong for every 2-byte ping
static void answer_forever(int listener) {
	int ep = epoll_create1(0);
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = listener }, events[512];
	epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev);
	for (;;) {
		int k = epoll_wait(ep, events, 512, -1);
		for (int i = 0; i < k; i++) {
			int fd = events[i].data.fd;
			if (fd == listener) {
				int c = accept4(listener, NULL, NULL, SOCK_NONBLOCK);
				struct epoll_event e = { .events = EPOLLIN, .data.fd = c };
				if (c >= 0) epoll_ctl(ep, EPOLL_CTL_ADD, c, &e);
				continue;
			}
			char buf[64];
			ssize_t r = read(fd, buf, sizeof buf);
			if (r <= 0) {
				close(fd);
				continue;
			}
			for (ssize_t j = 0; j + 2 <= r; j += 2) {
				if (write(fd, "\x8a\x80\x01\x02\x03\x04", 6) < 0) break;
			}
		}
	}
}

int main(int argc, char **argv) {
	if (argc != 5 || (strcmp(argv[4], "spread") && strcmp(argv[4], "sweep"))) {
		fprintf(stderr, "usage: %s N RATE SECONDS spread|sweep\n", argv[0]);
		return 2;
	}
	int n = atoi(argv[1]);
	double rate = atof(argv[2]), seconds = atof(argv[3]);
	int sweep = !strcmp(argv[4], "sweep");
	if (n < 1 || rate < 1 || seconds <= 0) {
		fprintf(stderr, "N, RATE and SECONDS must be positive\n");
		return 2;
	}
	int listener = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t addr_len = sizeof addr;
	if (bind(listener, (void *) &addr, sizeof addr) || listen(listener, 4096) || getsockname(listener, (void *) &addr, &addr_len)) {
		perror("listen");
		return 1;
	}
	pid_t peer = fork();
	if (peer == 0) answer_forever(listener);
	int *fds = malloc(n * sizeof *fds);
	int ep = epoll_create1(0);
	for (int i = 0; i < n; i++) {
		fds[i] = socket(AF_INET, SOCK_STREAM, 0);
		if (fds[i] < 0 || connect(fds[i], (void *) &addr, sizeof addr)) {
			perror("connect");
			kill(peer, SIGKILL);
			return 1;
		}
		fcntl(fds[i], F_SETFL, O_NONBLOCK);
		struct epoll_event e = { .events = EPOLLIN, .data.fd = fds[i] };
		epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &e);
	}
	sleep(1);  // the connections idle before the measurement, as the apps' are
	double start = now(), cpu_start = cpu_seconds(), due = start;
	long pings = 0, pongs = 0, wakes = 0;
	int next = 0;
	struct epoll_event events[512];
	while (now() - start < seconds) {
		while (now() >= due) {
			long batch = sweep ? (long) rate : 1;
			for (long j = 0; j < batch; j++, pings++, next = (next + 1) % n) {
				if (write(fds[next], "\x89\x00", 2) != 2) perror("ping");
			}
			due += sweep ? 1.0 : 1.0 / rate;
		}
		double wait_ms = (due - now()) * 1000;
		int k = epoll_wait(ep, events, 512, wait_ms <= 0 ? 0 : (int) wait_ms + 1);
		wakes++;
		for (int i = 0; i < k; i++) {
			char buf[64];
			ssize_t r = read(events[i].data.fd, buf, sizeof buf);
			if (r > 0) pongs += r / 6;
		}
	}
	double cpu = cpu_seconds() - cpu_start;
	printf("%s: %d connections, %ld pings (%ld pongs) in %.1f s, %ld wake-ups: %.3f s CPU, %.1f us per ping\n",
	       argv[4], n, pings, pongs, now() - start, wakes, cpu, 1e6 * cpu / pings);
	kill(peer, SIGKILL);
	waitpid(peer, NULL, 0);
	return 0;
}

/* A small HTTP/1.1 load generator for benchmarks/serving.py, so that the load costs little of the cores the server
 * runs on (a Python generator takes about one core at 10,000 requests/s). One request, sent over keep-alive
 * connections, in one of two modes:
 *
 *   loadgen HOST PORT REQUEST_FILE closed CONNECTIONS SECONDS [BACKOFF_MS]
 *       closed loop: each connection sends the next request as soon as the last answer arrives (after an
 *       answer other than 200, BACKOFF_MS later if given: a client that honours Retry-After);
 *   loadgen HOST PORT REQUEST_FILE poisson RATE SECONDS MAX_CONNECTIONS SEED
 *       open loop: Poisson arrivals at RATE/s, each sent at its arrival time on an idle connection (a new one if
 *       none is idle, up to MAX_CONNECTIONS; past that the arrival is counted as not sent). Latency is measured
 *       from the arrival time.
 *
 * REQUEST_FILE holds the whole request (request line, headers with Content-Length, body), or several back to back:
 * then each request sent is the next of them in turn (text of many lengths, as traffic has). Prints one line per
 * answered request, "STATUS MICROSECONDS", then "sent N", "not_sent N", "failed N" (connections that broke with
 * a request unanswered), "refused N" (connections the server refused: their requests never left).
 * Build: cc -O2 -o loadgen loadgen.c -lm
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define BUF (1 << 20)  /* the largest answer read (an embedding response for 32 sentences is ~250 KB) */

typedef struct {
    int fd, busy, connected;
    size_t sent, got;
    double arrival, retry_at;  /* retry_at > 0: waiting out a backoff before its next request */
    const char *request;  /* the one this connection is sending */
    size_t request_len;
    char buf[BUF];
} Conn;

static char **requests;
static size_t *request_lens, n_requests, next_request;
static struct sockaddr_in addr;
static int ep;
static long n_sent, n_not_sent, n_failed, n_refused;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static Conn *open_conn(void) {
    Conn *c = calloc(1, sizeof(Conn));
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) die("connect");
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
    return c;
}

static void start(Conn *c, double arrival) {
    c->busy = 1, c->sent = 0, c->got = 0, c->arrival = arrival;
    c->request = requests[next_request], c->request_len = request_lens[next_request];
    next_request = (next_request + 1) % n_requests;
    n_sent++;
}

static void pump_write(Conn *c) {
    while (c->busy && c->connected && c->sent < c->request_len) {
        ssize_t n = write(c->fd, c->request + c->sent, c->request_len - c->sent);
        if (n < 0) return;  /* EAGAIN: EPOLLOUT will call again; errors show up on read */
        c->sent += n;
    }
}

/* 1: a whole answer is in the buffer (status and end found); 0: not yet; -1: malformed */
static int parse(Conn *c, int *status, int *close_after) {
    c->buf[c->got] = 0;
    char *end = strstr(c->buf, "\r\n\r\n");
    if (!end) return c->got >= BUF - 1 ? -1 : 0;
    if (sscanf(c->buf, "HTTP/1.%*d %d", status) != 1) return -1;
    long length = 0;
    *close_after = 0;
    for (char *line = strstr(c->buf, "\r\n") + 2; line < end; line = strstr(line, "\r\n") + 2) {
        if (!strncasecmp(line, "content-length:", 15)) length = atol(line + 15);
        if (!strncasecmp(line, "connection:", 11) && strcasestr(line, "close") && strcasestr(line, "close") < strstr(line, "\r\n"))
            *close_after = 1;
    }
    size_t need = (end + 4 - c->buf) + length;
    if (need > BUF - 1) return -1;
    return c->got >= need;
}

static Conn **idle, **waiting;
static int n_idle, n_open, n_waiting, last_status;
static double backoff;

static void drop(Conn *c) {
    close(c->fd);
    free(c);
    n_open--;
}

/* Returns 1 when the connection finished an answer and is idle again. */
static int on_event(Conn *c, unsigned events) {
    if (!c->connected && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err == ECONNREFUSED) {  /* the port takes no connection (a server draining): nothing was sent */
            n_refused++;
            drop(c);
            return 0;
        }
        if (err) goto broken;
        c->connected = 1;
    }
    if (events & EPOLLOUT) pump_write(c);
    if (!(events & (EPOLLIN | EPOLLERR | EPOLLHUP))) return 0;
    int eof = 0;  /* the server closed: an answer read whole before its FIN still counts as answered */
    for (;;) {
        ssize_t n = read(c->fd, c->buf + c->got, BUF - 1 - c->got);
        if (n == 0) {
            eof = 1;
            break;
        }
        if (n < 0) {
            if (errno == EAGAIN) break;
            goto broken;
        }
        c->got += n;
    }
    if (!c->busy) {
        if (eof) goto broken;
        return 0;
    }
    int status, close_after, done = parse(c, &status, &close_after);
    if (done < 0 || (!done && eof)) goto broken;
    if (!done) return 0;
    printf("%d %.0f\n", status, (now() - c->arrival) * 1e6);
    c->busy = 0;
    last_status = status;
    if (close_after || eof) {
        drop(c);
        return 0;
    }
    return 1;
broken:
    if (c->busy) n_failed++;
    drop(c);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: loadgen HOST PORT REQUEST_FILE closed CONNECTIONS SECONDS\n"
                        "       loadgen HOST PORT REQUEST_FILE poisson RATE SECONDS MAX_CONNECTIONS SEED\n");
        return 2;
    }
    addr.sin_family = AF_INET;
    addr.sin_port = htons(atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) die("HOST must be an IPv4 address");
    FILE *f = fopen(argv[3], "rb");
    if (!f) die(argv[3]);
    fseek(f, 0, SEEK_END);
    size_t total = ftell(f);
    rewind(f);
    char *all = malloc(total + 1);
    if (fread(all, 1, total, f) != total) die("read REQUEST_FILE");
    fclose(f);
    all[total] = 0;
    for (size_t at = 0; at < total;) {  /* split on each request's end: its headers, then Content-Length bytes */
        char *head_end = strstr(all + at, "\r\n\r\n"), *cl = strcasestr(all + at, "\r\ncontent-length:");
        if (!head_end) die("REQUEST_FILE: a request without the blank line that ends its headers");
        size_t len = (head_end + 4 - (all + at)) + (cl && cl < head_end ? (size_t)atol(cl + 17) : 0);
        if (at + len > total) die("REQUEST_FILE: a request's body is shorter than its Content-Length");
        requests = realloc(requests, (n_requests + 1) * sizeof *requests);
        request_lens = realloc(request_lens, (n_requests + 1) * sizeof *request_lens);
        requests[n_requests] = all + at, request_lens[n_requests++] = len;
        at += len;
    }
    if (!n_requests) die("REQUEST_FILE is empty");
    int open_loop = !strcmp(argv[4], "poisson");
    if (open_loop && argc < 9) die("poisson needs RATE SECONDS MAX_CONNECTIONS SEED");
    double rate = atof(argv[5]), seconds = atof(argv[6]);
    int max_conns = open_loop ? atoi(argv[7]) : atoi(argv[5]);
    srand48(open_loop ? atol(argv[8]) : 0);
    backoff = !open_loop && argc > 7 ? atof(argv[7]) / 1e3 : 0;
    ep = epoll_create1(0);
    idle = calloc(max_conns, sizeof(Conn *));
    waiting = calloc(max_conns, sizeof(Conn *));
    int timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct epoll_event tev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, timer, &tev);

    double t0 = now(), stop = t0 + seconds, next = t0;
    if (!open_loop)
        for (int i = 0; i < max_conns; i++, n_open++) start(open_conn(), now());
    struct epoll_event events[256];
    while (now() < stop + 5 && (now() < stop || n_open > n_idle + n_waiting)) {
        if (open_loop && next < stop) {
            double t = now();
            for (; next <= t && next < stop; next += -log(1 - drand48()) / rate) {
                Conn *c = n_idle ? idle[--n_idle] : n_open < max_conns ? (n_open++, open_conn()) : NULL;
                if (!c) {
                    n_not_sent++;
                    continue;
                }
                start(c, next);
                pump_write(c);
            }
            struct itimerspec at = {.it_value = {.tv_sec = (time_t)next, .tv_nsec = (long)((next - (time_t)next) * 1e9)}};
            timerfd_settime(timer, TFD_TIMER_ABSTIME, &at, NULL);
        }
        for (int i = 0; i < n_waiting;) {  /* backoffs that are over: send again */
            Conn *c = waiting[i];
            if (c->retry_at > now()) {
                i++;
                continue;
            }
            waiting[i] = waiting[--n_waiting];
            c->retry_at = 0;
            if (now() < stop) {
                start(c, now());
                pump_write(c);
            } else {
                idle[n_idle++] = c;
            }
        }
        int n = epoll_wait(ep, events, 256, n_waiting ? 1 : 100);
        for (int i = 0; i < n; i++) {
            Conn *c = events[i].data.ptr;
            if (!c) {
                uint64_t ticks;
                if (read(timer, &ticks, sizeof ticks) < 0 && errno != EAGAIN) die("timerfd");
                continue;
            }
            if (!on_event(c, events[i].events)) continue;
            if (!open_loop && backoff > 0 && last_status != 200 && now() < stop) {
                c->retry_at = now() + backoff;
                waiting[n_waiting++] = c;
            } else if (!open_loop && now() < stop) {
                start(c, now());
                pump_write(c);
            } else {
                idle[n_idle++] = c;
            }
        }
    }
    printf("sent %ld\nnot_sent %ld\nfailed %ld\nrefused %ld\n", n_sent, n_not_sent, n_failed, n_refused);
    return 0;
}

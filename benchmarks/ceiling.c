/* An HTTP/1.1 server that does no work: it reads each request (headers and a Content-Length body) and sends a
 * fixed response. benchmarks/serving.py measures it beside torchship's server: no server can answer faster on the
 * same machine, so its rate bounds what the serving ratios can reach there.
 *
 *     ceiling PORT THREADS RESPONSE_FILE      (each thread: its own epoll loop and SO_REUSEPORT socket)
 *
 * Prints "ready" once listening; runs until killed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536

typedef struct { int fd; size_t len; char buf[BUF]; } Conn;

static char *response;
static size_t response_len;
static int port;

static int listener(void) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(s, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4096)) { perror("bind/listen"); exit(1); }
    return s;
}

/* Length of the first whole request in b[0:n], or 0 while it is incomplete. */
static size_t request_len(const char *b, size_t n) {
    const char *end = memmem(b, n, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t body = 0;
    for (const char *p = b; p < end;) {
        const char *eol = memmem(p, end + 2 - p, "\r\n", 2);
        if (!strncasecmp(p, "content-length:", 15)) body = strtoul(p + 15, NULL, 10);
        p = eol + 2;
    }
    size_t total = (size_t)(end + 4 - b) + body;
    return total <= n ? total : 0;
}

static void drop(int ep, Conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

static void *loop(void *arg) {
    int ls = listener(), ep = epoll_create1(0), one = 1;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL}, evs[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    if (arg) { puts("ready"); fflush(stdout); }
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            Conn *c = evs[i].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = malloc(sizeof *c);
                    c->fd = fd, c->len = 0;
                    ev.data.ptr = c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            ssize_t r = read(c->fd, c->buf + c->len, BUF - c->len);
            if (r <= 0) { drop(ep, c); continue; }
            c->len += (size_t)r;
            size_t m;
            while ((m = request_len(c->buf, c->len))) {
                if (write(c->fd, response, response_len) != (ssize_t)response_len) { c->len = BUF; break; }
                memmove(c->buf, c->buf + m, c->len - m);
                c->len -= m;
            }
            if (c->len == BUF) drop(ep, c);  /* a request larger than the buffer, or a client not reading */
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: ceiling PORT THREADS RESPONSE_FILE\n"); return 2; }
    port = atoi(argv[1]);
    int threads = atoi(argv[2]);
    FILE *f = fopen(argv[3], "rb");
    if (!f) { perror(argv[3]); return 1; }
    fseek(f, 0, SEEK_END);
    response_len = (size_t)ftell(f);
    rewind(f);
    response = malloc(response_len);
    if (fread(response, 1, response_len, f) != response_len) { perror("read"); return 1; }
    fclose(f);
    pthread_t t;
    for (int i = 1; i < threads; i++) pthread_create(&t, NULL, loop, NULL);
    loop("main");
    return 0;
}

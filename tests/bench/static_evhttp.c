/* static_evhttp - a bare libevent evhttp server, the "from memory" reference of
 * tests/bench/bench_cache.py: every request is answered 200 with
 * Content-Type: application/json and the same body, held once in memory and
 * lent to each answer by reference.
 *
 *   static_evhttp PORT THREADS BODY
 *
 * BODY is a file whose bytes are the body, or a number of bytes (a JSON string
 * of that length). Each thread has its own event_base and evhttp on its own
 * SO_REUSEPORT socket on 127.0.0.1:PORT, so the kernel spreads connections over
 * the threads as it does over the gateway's workers. Like nginx and the
 * gateway it has TCP_NODELAY (accepted sockets inherit it from the listener) and
 * writes an answer at once (a bufferevent writes 16 KiB at most by default).
 * Runs until killed. */
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

static char *body;
static size_t body_len;

static void answer(struct evhttp_request *req, void *arg)
{
    (void)arg;
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "application/json");
    evbuffer_add_reference(evhttp_request_get_output_buffer(req), body, body_len, NULL, NULL);
    evhttp_send_reply(req, 200, "OK", NULL);
}

static struct bufferevent *new_bev(struct event_base *base, void *arg)
{
    (void)arg;
    struct bufferevent *bev = bufferevent_socket_new(base, -1, BEV_OPT_CLOSE_ON_FREE);
    if (bev)
        bufferevent_set_max_single_write(bev, 1 << 20);
    return bev;
}

static int listen_socket(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0 ||
        bind(fd, (struct sockaddr *)&sin, sizeof sin) != 0 || listen(fd, 4096) != 0) {
        perror("static_evhttp: listen");
        exit(1);
    }
    return fd;
}

static void *run(void *arg)
{
    event_base_dispatch(arg);
    return NULL;
}

static void load_body(const char *arg)
{
    char *end;
    unsigned long n = strtoul(arg, &end, 10);
    if (*arg && *end == '\0') { /* a size: {"pad":"xxxx..."} */
        body_len = n < 11 ? 11 : n;
        body = malloc(body_len);
        if (!body)
            exit(1);
        memset(body, 'x', body_len);
        memcpy(body, "{\"pad\":\"", 8);
        memcpy(body + body_len - 2, "\"}", 2);
        return;
    }
    FILE *f = fopen(arg, "rb");
    if (!f || fseek(f, 0, SEEK_END) != 0 || ftell(f) < 0) {
        perror(arg);
        exit(1);
    }
    body_len = (size_t)ftell(f);
    body = malloc(body_len ? body_len : 1);
    rewind(f);
    if (!body || fread(body, 1, body_len, f) != body_len) {
        fprintf(stderr, "static_evhttp: cannot read %s\n", arg);
        exit(1);
    }
    fclose(f);
}

int main(int argc, char **argv)
{
    if (argc != 4 || atoi(argv[1]) <= 0 || atoi(argv[1]) > 65535 || atoi(argv[2]) < 1 ||
        atoi(argv[2]) > 256) {
        fprintf(stderr, "usage: %s PORT THREADS BODY-FILE|BODY-BYTES\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]), threads = atoi(argv[2]);
    load_body(argv[3]);
    pthread_t tid[256];
    for (int i = 0; i < threads; i++) {
        struct event_base *base = event_base_new();
        struct evhttp *http = base ? evhttp_new(base) : NULL;
        if (!http || !evhttp_accept_socket_with_handle(http, listen_socket(port))) {
            fprintf(stderr, "static_evhttp: cannot set up thread %d\n", i);
            return 1;
        }
        evhttp_set_gencb(http, answer, NULL);
        evhttp_set_bevcb(http, new_bev, NULL);
        if (pthread_create(&tid[i], NULL, run, base) != 0)
            return 1;
    }
    printf("static_evhttp: 127.0.0.1:%d, %d thread%s, %zu-byte body\n", port, threads, threads > 1 ? "s" : "",
           body_len);
    fflush(stdout);
    for (int i = 0; i < threads; i++)
        pthread_join(tid[i], NULL);
    return 0;
}

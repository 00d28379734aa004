/*
 * fake_redis.c - the fake Redis of the unit tests (what it speaks and its
 * knobs: fake_redis.h). Runs in the test's thread, on the test's event_base.
 *
 * Each command is parsed, logged and answered into a buffer of its own while
 * its bytes are still in the input buffer (the arguments point into it), and
 * only then drained. The answer then takes one of four ways: dropped (a
 * stalled connection or script), queued behind the connection's held ones
 * until fake_redis_release, sent after script_delay_ms by a timer the fake
 * keeps (so fake_redis_stop frees the ones not sent), or sent at once.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cmocka.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>

#include "fake_redis.h"

/* A script answer waiting out script_delay_ms. */
typedef struct fake_redis_delayed {
    fake_redis *f;
    struct event *timer;
    int conn; /* by id: the connection may be closed by the time it fires */
    struct evbuffer *reply;
    struct fake_redis_delayed *prev, *next;
} fake_redis_delayed;

/* How an answer goes out. */
typedef enum answer_kind {
    ANSWER_NONE,   /* dropped */
    ANSWER_PLAIN,  /* at once unless something is held */
    ANSWER_PING,   /* held while hold_pings */
    ANSWER_SCRIPT, /* held while hold_scripts, else delayed by script_delay_ms */
    ANSWER_CLOSE,  /* no answer: the fake closes the connection */
} answer_kind;

void fake_redis_conn_close(fake_redis_conn *fc)
{
    fc->f->conns[fc->id] = NULL;
    bufferevent_free(fc->bev);
    evbuffer_free(fc->held);
    free(fc);
}

/* One RESP command at p: fills argc (at most max), argv (pointers into p) and
 * lens. Returns the bytes it takes, 0 while it is incomplete. */
static size_t parse_command(const char *p, size_t n, int *argc, const char **argv, size_t *lens, int max)
{
    const char *end = p + n, *q = p;
    if (q >= end || *q != '*')
        return 0;
    const char *eol = memchr(q, '\r', (size_t)(end - q));
    if (!eol || eol + 1 >= end)
        return 0;
    int count = atoi(q + 1);
    q = eol + 2;
    for (int i = 0; i < count; i++) {
        if (q >= end || *q != '$')
            return 0;
        eol = memchr(q, '\r', (size_t)(end - q));
        if (!eol || eol + 1 >= end)
            return 0;
        size_t len = (size_t)atol(q + 1);
        q = eol + 2;
        if ((size_t)(end - q) < len + 2)
            return 0;
        if (i < max) {
            argv[i] = q;
            lens[i] = len;
        }
        q += len + 2;
    }
    *argc = count < max ? count : max;
    return (size_t)(q - p);
}

static bool arg_is(const char *a, size_t n, const char *word)
{
    return n == strlen(word) && strncasecmp(a, word, n) == 0;
}

static void add_bulk(struct evbuffer *out, const void *s, size_t n)
{
    evbuffer_add_printf(out, "$%zu\r\n", n);
    evbuffer_add(out, s, n);
    evbuffer_add(out, "\r\n", 2);
}

static void log_command(fake_redis *f, const fake_redis_conn *fc, int argc, const char *const *argv,
                        const size_t *lens)
{
    if (f->nlog >= FAKE_REDIS_MAX_LOG)
        return;
    char *line = f->log[f->nlog++];
    int off = snprintf(line, FAKE_REDIS_LOG_LINE, "%d:", fc->id);
    for (int i = 0; i < argc && off < FAKE_REDIS_LOG_LINE - 1; i++)
        off += snprintf(line + off, FAKE_REDIS_LOG_LINE - (size_t)off, " %.*s", (int)lens[i], argv[i]);
}

static answer_kind answer_script(fake_redis *f, const fake_redis_conn *fc, bool eval, int argc,
                                 const char *const *argv, const size_t *lens, struct evbuffer *reply)
{
    if (argc < 3) {
        evbuffer_add_printf(reply, "-ERR wrong number of arguments for '%s' command\r\n",
                            eval ? "eval" : "evalsha");
        return ANSWER_PLAIN;
    }
    if (!eval && f->noscript_left > 0) {
        f->noscript_left--;
        evbuffer_add_printf(reply, "-NOSCRIPT No matching script. Please use EVAL.\r\n");
        return ANSWER_SCRIPT;
    }
    f->script(f->script_arg, fc, eval, argc, argv, lens, reply);
    if (f->stall_scripts || (eval && f->stall_eval))
        return ANSWER_NONE;
    return ANSWER_SCRIPT;
}

/* Writes the answer to one command into reply; says how it goes out. */
static answer_kind answer(fake_redis *f, fake_redis_conn *fc, int argc, const char *const *argv,
                          const size_t *lens, struct evbuffer *reply)
{
    if (fc->stalled)
        return ANSWER_NONE;
    const char *a0 = argc > 0 ? argv[0] : "";
    size_t l0 = argc > 0 ? lens[0] : 0;
    const char *a1 = argc > 1 ? argv[1] : "";
    size_t l1 = argc > 1 ? lens[1] : 0;
    if (arg_is(a0, l0, "PING")) {
        evbuffer_add_printf(reply, "+PONG\r\n");
        return ANSWER_PING;
    }
    if (arg_is(a0, l0, "ECHO")) {
        add_bulk(reply, a1, l1);
    } else if (arg_is(a0, l0, "AUTH")) {
        evbuffer_add_printf(reply, "%s", f->auth_reply ? f->auth_reply : "+OK\r\n");
    } else if (arg_is(a0, l0, "SUBSCRIBE")) {
        fc->subscribed = true;
        evbuffer_add_printf(reply, "*3\r\n");
        add_bulk(reply, "subscribe", 9);
        add_bulk(reply, a1, l1);
        evbuffer_add_printf(reply, ":1\r\n");
    } else if (f->script && (arg_is(a0, l0, "EVALSHA") || arg_is(a0, l0, "EVAL"))) {
        return answer_script(f, fc, arg_is(a0, l0, "EVAL"), argc, argv, lens, reply);
    } else if (arg_is(a0, l0, "STALL")) {
        fc->stalled = true;
        return ANSWER_NONE;
    } else if (arg_is(a0, l0, "CLOSE")) {
        return ANSWER_CLOSE;
    } else if (arg_is(a0, l0, "ERR")) {
        evbuffer_add_printf(reply, "-ERR asked for\r\n");
    } else {
        evbuffer_add_printf(reply, "+OK\r\n");
    }
    return ANSWER_PLAIN;
}

static void delayed_free(fake_redis_delayed *d)
{
    if (d->prev)
        d->prev->next = d->next;
    else
        d->f->delayed = d->next;
    if (d->next)
        d->next->prev = d->prev;
    event_free(d->timer);
    evbuffer_free(d->reply);
    free(d);
}

static void delayed_cb(evutil_socket_t fd, short what, void *arg)
{
    fake_redis_delayed *d = arg;
    fake_redis_conn *fc = d->f->conns[d->conn]; /* NULL once closed: the answer goes nowhere */
    if (fc)
        bufferevent_write_buffer(fc->bev, d->reply);
    delayed_free(d);
}

/* reply is taken. */
static void send_later(fake_redis *f, fake_redis_conn *fc, struct evbuffer *reply, int ms)
{
    fake_redis_delayed *d = calloc(1, sizeof *d);
    assert_non_null(d);
    *d = (fake_redis_delayed){.f = f, .conn = fc->id, .reply = reply, .next = f->delayed};
    d->timer = evtimer_new(f->base, delayed_cb, d);
    assert_non_null(d->timer);
    if (f->delayed)
        f->delayed->prev = d;
    f->delayed = d;
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    assert_int_equal(evtimer_add(d->timer, &tv), 0);
}

/* reply is taken. */
static void send_answer(fake_redis *f, fake_redis_conn *fc, answer_kind kind, struct evbuffer *reply)
{
    if (kind == ANSWER_NONE) {
        evbuffer_free(reply);
    } else if ((kind == ANSWER_SCRIPT && f->hold_scripts) || (kind == ANSWER_PING && f->hold_pings) ||
               evbuffer_get_length(fc->held) > 0) {
        evbuffer_add_buffer(fc->held, reply);
        evbuffer_free(reply);
    } else if (kind == ANSWER_SCRIPT && f->script_delay_ms > 0) {
        send_later(f, fc, reply, f->script_delay_ms);
    } else {
        bufferevent_write_buffer(fc->bev, reply);
        evbuffer_free(reply);
    }
}

static void conn_read_cb(struct bufferevent *bev, void *arg)
{
    fake_redis_conn *fc = arg;
    fake_redis *f = fc->f;
    struct evbuffer *in = bufferevent_get_input(bev);
    for (;;) {
        size_t n = evbuffer_get_length(in);
        if (n == 0)
            return;
        const char *p = (const char *)evbuffer_pullup(in, -1);
        int argc = 0;
        const char *argv[FAKE_REDIS_MAX_ARGS];
        size_t lens[FAKE_REDIS_MAX_ARGS];
        size_t used = parse_command(p, n, &argc, argv, lens, FAKE_REDIS_MAX_ARGS);
        if (used == 0)
            return;
        fc->commands++;
        log_command(f, fc, argc, argv, lens);
        struct evbuffer *reply = evbuffer_new();
        assert_non_null(reply);
        answer_kind kind = answer(f, fc, argc, argv, lens, reply);
        evbuffer_drain(in, used);
        if (kind == ANSWER_CLOSE) {
            evbuffer_free(reply);
            fake_redis_conn_close(fc);
            return;
        }
        send_answer(f, fc, kind, reply);
    }
}

static void conn_event_cb(struct bufferevent *bev, short what, void *arg)
{
    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR))
        fake_redis_conn_close(arg);
}

static void accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa, int len, void *arg)
{
    fake_redis *f = arg;
    assert_true(f->accepted < FAKE_REDIS_MAX_CONNS);
    fake_redis_conn *fc = calloc(1, sizeof *fc);
    assert_non_null(fc);
    fc->f = f;
    fc->id = f->accepted++;
    fc->stalled = f->stall_new;
    fc->peer_port = ntohs(((struct sockaddr_in *)sa)->sin_port);
    fc->held = evbuffer_new();
    assert_non_null(fc->held);
    fc->bev = bufferevent_socket_new(f->base, fd, BEV_OPT_CLOSE_ON_FREE);
    assert_non_null(fc->bev);
    bufferevent_setcb(fc->bev, conn_read_cb, NULL, conn_event_cb, fc);
    bufferevent_enable(fc->bev, EV_READ | EV_WRITE);
    f->conns[fc->id] = fc;
}

fake_redis *fake_redis_start(struct event_base *base)
{
    fake_redis *f = calloc(1, sizeof *f);
    assert_non_null(f);
    f->base = base;
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    f->listener = evconnlistener_new_bind(base, accept_cb, f, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE, 16,
                                          (struct sockaddr *)&sin, sizeof sin);
    assert_non_null(f->listener);
    struct sockaddr_in got;
    socklen_t glen = sizeof got;
    assert_int_equal(getsockname(evconnlistener_get_fd(f->listener), (struct sockaddr *)&got, &glen), 0);
    f->port = ntohs(got.sin_port);
    return f;
}

void fake_redis_stop(fake_redis *f)
{
    while (f->delayed)
        delayed_free(f->delayed);
    for (int i = 0; i < FAKE_REDIS_MAX_CONNS; i++)
        if (f->conns[i])
            fake_redis_conn_close(f->conns[i]);
    evconnlistener_free(f->listener);
    free(f);
}

void fake_redis_release(fake_redis *f)
{
    for (int i = 0; i < FAKE_REDIS_MAX_CONNS; i++)
        if (f->conns[i] && evbuffer_get_length(f->conns[i]->held) > 0)
            bufferevent_write_buffer(f->conns[i]->bev, f->conns[i]->held);
}

void fake_redis_publish(fake_redis *f, const char *channel, const void *payload, size_t len)
{
    for (int i = 0; i < FAKE_REDIS_MAX_CONNS; i++) {
        fake_redis_conn *fc = f->conns[i];
        if (!fc || !fc->subscribed)
            continue;
        struct evbuffer *msg = evbuffer_new();
        assert_non_null(msg);
        evbuffer_add_printf(msg, "*3\r\n");
        add_bulk(msg, "message", 7);
        add_bulk(msg, channel, strlen(channel));
        add_bulk(msg, payload, len);
        bufferevent_write_buffer(fc->bev, msg);
        evbuffer_free(msg);
    }
}

int fake_redis_open(const fake_redis *f)
{
    int n = 0;
    for (int i = 0; i < FAKE_REDIS_MAX_CONNS; i++)
        n += f->conns[i] != NULL;
    return n;
}

int fake_redis_index(const fake_redis *f, const char *line)
{
    for (int i = 0; i < f->nlog; i++)
        if (strcmp(f->log[i], line) == 0)
            return i;
    return -1;
}

bool fake_redis_saw(const fake_redis *f, const char *line)
{
    return fake_redis_index(f, line) >= 0;
}

int fake_redis_count(const fake_redis *f, const char *line)
{
    int n = 0;
    for (int i = 0; i < f->nlog; i++)
        n += strcmp(f->log[i], line) == 0;
    return n;
}

int fake_redis_client_fd(const fake_redis *f, const fake_redis_conn *fc)
{
    for (int fd = 3; fd < 1024; fd++) {
        struct sockaddr_in self, peer;
        socklen_t sl = sizeof self, pl = sizeof peer;
        if (getsockname(fd, (struct sockaddr *)&self, &sl) != 0 || self.sin_family != AF_INET ||
            getpeername(fd, (struct sockaddr *)&peer, &pl) != 0)
            continue;
        if (ntohs(self.sin_port) == fc->peer_port && ntohs(peer.sin_port) == f->port)
            return fd;
    }
    return -1;
}

uint64_t fake_redis_ms_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

void fake_redis_run_for(struct event_base *base, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    event_base_loopexit(base, &tv);
    event_base_dispatch(base);
}

/*
 * test_ratelimit_redis.c - the Redis store's batching (ratelimit/rlredis.c).
 *
 * First the arithmetic, pure: a batch of n asked of the script (a C model of
 * it: k allowed, wait = max(TAT, now) - now) and rl_redis_batch_decision()
 * give every request exactly what n calls of the one-request script (the
 * previous version, modelled in C) in sequence at the same instant gave, and
 * leave the same TAT; over random and edge cases.
 *
 * Then rl_redis against a fake Redis on the same loop that runs the same
 * model of the script (its clock fixed by the test) and can hold its script
 * replies: while a key's call is in flight the next calls wait and go as ONE
 * EVALSHA asking for n; other keys go at once; each call gets its own
 * decision; a batch holds at most 256; a cancelled waiting call is not sent,
 * a cancelled sent one is not answered; NOSCRIPT resends the batch with EVAL;
 * a waiting batch is answered (failed) redis.timeout after its first call
 * even when the call ahead of it took most of that; rl_redis_free, also from
 * inside a done callback, answers everything left as failed; done is never
 * called from inside rl_redis_take.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
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

#include "ratelimit/rlredis.h"

/* ---- models of the scripts ------------------------------------------------------------ */

/* The one-request script (the version before batching), in us: returns the
 * new TAT and fills d as the client made it from {allowed, remaining,
 * reset_us, retry_us}. */
static int64_t old_script(int64_t tat, int64_t now, int64_t period, int64_t limit, rl_decision *d)
{
    int64_t window = period * limit;
    int64_t base = tat > now ? tat : now;
    int64_t nxt = base + period;
    *d = (rl_decision){.limit = limit};
    if (nxt - now > window) {
        d->reset_ms = (base - now + 999) / 1000;
        d->retry_after_ms = (nxt - window - now + 999) / 1000;
        return tat;
    }
    d->allowed = true;
    d->remaining = (window - (nxt - now)) / period;
    d->reset_ms = (nxt - now + 999) / 1000;
    return nxt;
}

/* The batch script: k of n; *tat updated only when k > 0. */
static int64_t batch_script(int64_t *tat, int64_t now, int64_t period, int64_t limit, int64_t n,
                            int64_t *wait)
{
    int64_t window = period * limit;
    int64_t base = *tat > now ? *tat : now;
    int64_t room = now + window - base;
    int64_t k = room >= period ? room / period : 0;
    if (k > n)
        k = n;
    if (k > 0)
        *tat = base + k * period;
    *wait = base - now;
    return k;
}

static void check_batch_equals_sequence(int64_t tat, int64_t now, int64_t period, int64_t limit, int64_t n)
{
    int64_t seq_tat = tat, batch_tat = tat, wait;
    int64_t k = batch_script(&batch_tat, now, period, limit, n, &wait);
    int64_t allowed = 0;
    for (int64_t i = 0; i < n; i++) {
        rl_decision want, got;
        seq_tat = old_script(seq_tat, now, period, limit, &want);
        memset(&got, 0x5a, sizeof got);
        rl_redis_batch_decision(k, wait, period, limit, i, &got);
        if (want.allowed != got.allowed || want.remaining != got.remaining || want.reset_ms != got.reset_ms ||
            want.retry_after_ms != got.retry_after_ms || got.limit != limit || got.no_room) {
            fail_msg("tat %lld now %lld period %lld limit %lld n %lld, request %lld: want %d/%lld/%lld/%lld, "
                     "got %d/%lld/%lld/%lld",
                     (long long)tat, (long long)now, (long long)period, (long long)limit, (long long)n,
                     (long long)i, want.allowed, (long long)want.remaining, (long long)want.reset_ms,
                     (long long)want.retry_after_ms, got.allowed, (long long)got.remaining,
                     (long long)got.reset_ms, (long long)got.retry_after_ms);
        }
        allowed += want.allowed;
    }
    assert_int_equal(k, allowed);
    assert_int_equal(batch_tat, seq_tat);
}

#define NOW 1700000000000000LL /* us, as Redis's TIME gives it */

static void test_batch_arithmetic_hand_cases(void **state)
{
    (void)state;
    /* limit 5 per 10 s (period 2 s), empty key, 7 at once: 5 allowed counting
     * down, reset 2..10 s; then 2 refused, retry one period, reset 10 s. */
    int64_t tat = 0, wait;
    int64_t k = batch_script(&tat, NOW, 2000000, 5, 7, &wait);
    assert_int_equal(k, 5);
    assert_int_equal(wait, 0);
    assert_int_equal(tat, NOW + 10000000);
    for (int i = 0; i < 7; i++) {
        rl_decision d;
        rl_redis_batch_decision(k, wait, 2000000, 5, i, &d);
        assert_int_equal(d.limit, 5);
        if (i < 5) {
            assert_true(d.allowed);
            assert_int_equal(d.remaining, 4 - i);
            assert_int_equal(d.reset_ms, 2000 * (i + 1));
            assert_int_equal(d.retry_after_ms, 0);
        } else {
            assert_false(d.allowed);
            assert_int_equal(d.remaining, 0);
            assert_int_equal(d.reset_ms, 10000);
            assert_int_equal(d.retry_after_ms, 2000);
        }
    }
    /* 1.5 s later: one period (2 s) is not over, 3 asked: none, retry 0.5 s. */
    k = batch_script(&tat, NOW + 1500000, 2000000, 5, 3, &wait);
    assert_int_equal(k, 0);
    assert_int_equal(wait, 8500000);
    rl_decision d;
    rl_redis_batch_decision(k, wait, 2000000, 5, 2, &d);
    assert_false(d.allowed);
    assert_int_equal(d.retry_after_ms, 500);
    assert_int_equal(d.reset_ms, 8500);
    /* A TAT far ahead (the limit was lowered): room negative, none allowed. */
    tat = NOW + 100000000;
    k = batch_script(&tat, NOW, 2000000, 5, 4, &wait);
    assert_int_equal(k, 0);
    assert_int_equal(tat, NOW + 100000000);
    check_batch_equals_sequence(NOW + 100000000, NOW, 2000000, 5, 4);
}

static void test_batch_arithmetic_equals_sequence(void **state)
{
    (void)state;
    static const int64_t periods[] = {1, 3, 999, 1000, 1001, 2000000, 6000000, 60000000};
    static const int64_t limits[] = {1, 2, 5, 10, 50, 1000, 100000000};
    static const int64_t ns[] = {1, 2, 3, 7, 64, 256};
    for (size_t p = 0; p < sizeof periods / sizeof *periods; p++) {
        for (size_t l = 0; l < sizeof limits / sizeof *limits; l++) {
            int64_t period = periods[p], limit = limits[l], window = period * limit;
            if (window > 1000000LL * 86400 * 365)
                continue;
            int64_t tats[] = {0,
                              NOW - 1,
                              NOW,
                              NOW + 1,
                              NOW + period - 1,
                              NOW + period,
                              NOW + window - period - 1,
                              NOW + window - period,
                              NOW + window - period + 1,
                              NOW + window - 1,
                              NOW + window,
                              NOW + window + 1,
                              NOW + 3 * window};
            for (size_t t = 0; t < sizeof tats / sizeof *tats; t++)
                for (size_t n = 0; n < sizeof ns / sizeof *ns; n++)
                    check_batch_equals_sequence(tats[t], NOW, period, limit, ns[n]);
        }
    }
    /* random ones */
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (int i = 0; i < 20000; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        int64_t period = 1 + (int64_t)(x % 5000000);
        int64_t limit = 1 + (int64_t)((x >> 23) % 300);
        int64_t window = period * limit;
        int64_t tat =
            (x >> 40) % 4 == 0 ? 0 : NOW - window + (int64_t)((x >> 7) % (uint64_t)(3 * window + 1));
        int64_t n = 1 + (int64_t)((x >> 50) % 300);
        check_batch_equals_sequence(tat, NOW, period, limit, n);
    }
}

/* ---- a fake Redis running the batch model ------------------------------------------ */

#define FAKE_MAX_CONNS 16
#define FAKE_MAX_SCRIPTS 1024
#define FAKE_MAX_KEYS 16

typedef struct fake fake;

typedef struct fake_conn {
    fake *f;
    struct bufferevent *bev;
    int id;
    struct evbuffer *held; /* replies not sent yet (in order) */
} fake_conn;

typedef struct script_call {
    bool eval; /* EVAL, not EVALSHA */
    int conn;
    char key[64];
    int64_t n;
} script_call;

struct fake {
    struct event_base *base;
    struct evconnlistener *listener;
    int port;
    int accepted;
    fake_conn *conns[FAKE_MAX_CONNS];
    int64_t now_us;
    bool hold;         /* hold script replies until fake_release */
    bool stall;        /* never answer script calls */
    int noscript_left; /* answer this many EVALSHA with NOSCRIPT */
    script_call scripts[FAKE_MAX_SCRIPTS];
    int nscripts;
    char keys[FAKE_MAX_KEYS][64];
    int64_t tats[FAKE_MAX_KEYS];
    int nkeys;
};

static void fake_conn_close(fake_conn *fc)
{
    fc->f->conns[fc->id] = NULL;
    bufferevent_free(fc->bev);
    evbuffer_free(fc->held);
    free(fc);
}

static size_t parse_command(const char *p, size_t n, int *argc, const char **argv, size_t *lens, int max)
{
    const char *end = p + n, *q = p;
    if (q >= end || *q != '*')
        return 0;
    char *eol = memchr(q, '\r', (size_t)(end - q));
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

static int64_t arg_int(const char *a, size_t n)
{
    char buf[32];
    snprintf(buf, sizeof buf, "%.*s", (int)n, a);
    return atoll(buf);
}

static int64_t *fake_tat(fake *f, const char *key)
{
    for (int i = 0; i < f->nkeys; i++)
        if (strcmp(f->keys[i], key) == 0)
            return &f->tats[i];
    assert_true(f->nkeys < FAKE_MAX_KEYS);
    size_t len = strlen(key);
    assert_true(len < sizeof f->keys[0]);
    memcpy(f->keys[f->nkeys], key, len + 1);
    f->tats[f->nkeys] = 0;
    return &f->tats[f->nkeys++];
}

static void fake_read_cb(struct bufferevent *bev, void *arg)
{
    fake_conn *fc = arg;
    fake *f = fc->f;
    struct evbuffer *in = bufferevent_get_input(bev);
    for (;;) {
        size_t n = evbuffer_get_length(in);
        if (n == 0)
            return;
        const char *p = (const char *)evbuffer_pullup(in, -1);
        int argc = 0;
        const char *argv[8];
        size_t lens[8];
        size_t used = parse_command(p, n, &argc, argv, lens, 8);
        if (used == 0)
            return;
        bool evalsha = argc == 7 && lens[0] == 7 && strncasecmp(argv[0], "EVALSHA", 7) == 0;
        bool eval = argc == 7 && lens[0] == 4 && strncasecmp(argv[0], "EVAL", 4) == 0;
        char reply[128];
        bool script = false;
        if (evalsha && f->noscript_left > 0) {
            f->noscript_left--;
            snprintf(reply, sizeof reply, "-NOSCRIPT No matching script. Please use EVAL.\r\n");
        } else if (evalsha || eval) {
            script = true;
            assert_true(f->nscripts < FAKE_MAX_SCRIPTS);
            script_call *sc = &f->scripts[f->nscripts++];
            sc->eval = eval;
            sc->conn = fc->id;
            snprintf(sc->key, sizeof sc->key, "%.*s", (int)lens[3], argv[3]);
            sc->n = arg_int(argv[6], lens[6]);
            int64_t wait, k = batch_script(fake_tat(f, sc->key), f->now_us, arg_int(argv[4], lens[4]),
                                           arg_int(argv[5], lens[5]), sc->n, &wait);
            snprintf(reply, sizeof reply, "*2\r\n:%lld\r\n:%lld\r\n", (long long)k, (long long)wait);
        } else if (argc >= 1 && lens[0] == 4 && strncasecmp(argv[0], "PING", 4) == 0) {
            snprintf(reply, sizeof reply, "+PONG\r\n");
        } else {
            snprintf(reply, sizeof reply, "+OK\r\n");
        }
        evbuffer_drain(in, used);
        if (script && f->stall)
            continue;
        if ((script && f->hold) || evbuffer_get_length(fc->held))
            evbuffer_add(fc->held, reply, strlen(reply));
        else
            bufferevent_write(fc->bev, reply, strlen(reply));
    }
}

static void fake_event_cb(struct bufferevent *bev, short what, void *arg)
{
    (void)bev;
    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR))
        fake_conn_close(arg);
}

static void fake_accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa, int len,
                           void *arg)
{
    (void)l;
    (void)sa;
    (void)len;
    fake *f = arg;
    fake_conn *fc = calloc(1, sizeof *fc);
    assert_non_null(fc);
    fc->f = f;
    fc->id = f->accepted++;
    assert_true(fc->id < FAKE_MAX_CONNS);
    fc->held = evbuffer_new();
    fc->bev = bufferevent_socket_new(f->base, fd, BEV_OPT_CLOSE_ON_FREE);
    bufferevent_setcb(fc->bev, fake_read_cb, NULL, fake_event_cb, fc);
    bufferevent_enable(fc->bev, EV_READ | EV_WRITE);
    f->conns[fc->id] = fc;
}

/* Send the held replies. */
static void fake_release(fake *f)
{
    for (int i = 0; i < FAKE_MAX_CONNS; i++)
        if (f->conns[i] && evbuffer_get_length(f->conns[i]->held))
            bufferevent_write_buffer(f->conns[i]->bev, f->conns[i]->held);
}

static fake *fake_start(struct event_base *base)
{
    fake *f = calloc(1, sizeof *f);
    assert_non_null(f);
    f->base = base;
    f->now_us = NOW;
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    f->listener = evconnlistener_new_bind(base, fake_accept_cb, f, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE,
                                          16, (struct sockaddr *)&sin, sizeof sin);
    assert_non_null(f->listener);
    struct sockaddr_in got;
    socklen_t glen = sizeof got;
    getsockname(evconnlistener_get_fd(f->listener), (struct sockaddr *)&got, &glen);
    f->port = ntohs(got.sin_port);
    return f;
}

static void fake_stop(fake *f)
{
    for (int i = 0; i < FAKE_MAX_CONNS; i++)
        if (f->conns[i])
            fake_conn_close(f->conns[i]);
    evconnlistener_free(f->listener);
    free(f);
}

static int fake_open(const fake *f)
{
    int n = 0;
    for (int i = 0; i < FAKE_MAX_CONNS; i++)
        n += f->conns[i] != NULL;
    return n;
}

/* ---- the loop, the client ------------------------------------------------------------ */

static uint64_t ms_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void run_for(struct event_base *base, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    event_base_loopexit(base, &tv);
    event_base_dispatch(base);
}

#define RUN_UNTIL(base, cond, ms)                                                                            \
    do {                                                                                                     \
        uint64_t end_ = ms_now() + (ms);                                                                     \
        while (!(cond) && ms_now() < end_)                                                                   \
            run_for((base), 1);                                                                              \
        assert_true(cond);                                                                                   \
    } while (0)

static void test_log(config_log_level level, const char *message)
{
    (void)level;
    (void)message;
}

#define MAX_ANSWERS 512

typedef struct answers {
    int n;
    int order[MAX_ANSWERS];
    bool ok[MAX_ANSWERS];
    rl_decision d[MAX_ANSWERS];
    uint64_t at_ms[MAX_ANSWERS];
    bool in_take, called_inside;
    rl_redis *free_on_first; /* rl_redis_free from inside the first done */
    int n_after_free;
} answers;

typedef struct probe {
    answers *a;
    int id;
    bool answered;
} probe;

static void record_done(void *arg, bool ok, const rl_decision *d)
{
    probe *p = arg;
    answers *a = p->a;
    assert_false(p->answered); /* once */
    p->answered = true;
    if (a->in_take)
        a->called_inside = true;
    assert_true(a->n < MAX_ANSWERS);
    a->order[a->n] = p->id;
    a->ok[a->n] = ok;
    if (ok)
        a->d[a->n] = *d;
    a->at_ms[a->n] = ms_now();
    a->n++;
    if (a->free_on_first) {
        rl_redis *r = a->free_on_first;
        a->free_on_first = NULL;
        rl_redis_free(r);
        a->n_after_free = a->n;
    }
}

/* The index of probe id's answer, or -1. */
static int answer_of(const answers *a, int id)
{
    for (int i = 0; i < a->n; i++)
        if (a->order[i] == id)
            return i;
    return -1;
}

typedef struct env {
    struct event_base *base;
    fake *f;
    rl_redis *r;
    char url[128];
    config_redis cfg;
    answers a;
    probe p[MAX_ANSWERS];
} env;

static env *env_start(int timeout_ms, int conns)
{
    env *e = calloc(1, sizeof *e);
    assert_non_null(e);
    e->base = event_base_new();
    assert_non_null(e->base);
    e->f = fake_start(e->base);
    snprintf(e->url, sizeof e->url, "redis://127.0.0.1:%d", e->f->port);
    e->cfg = (config_redis){.enabled = true,
                            .url = e->url,
                            .password = "",
                            .timeout_ms = timeout_ms,
                            .connections_per_worker = conns};
    e->r = rl_redis_create(e->base, test_log);
    assert_non_null(e->r);
    rl_redis_configure(e->r, &e->cfg);
    RUN_UNTIL(e->base, rl_redis_up(e->r) && fake_open(e->f) == conns, 2000);
    run_for(e->base, 10); /* every connection through its handshake */
    for (int i = 0; i < MAX_ANSWERS; i++)
        e->p[i] = (probe){&e->a, i, false};
    return e;
}

static void env_stop(env *e)
{
    rl_redis_free(e->r);
    fake_stop(e->f);
    event_base_free(e->base);
    free(e);
}

/* Probe id takes one request of key for limit per window_ms. */
static rl_redis_call *take(env *e, int id, const char *key, int64_t limit, int64_t window_ms)
{
    e->a.in_take = true;
    rl_redis_call *c = rl_redis_take(e->r, key, strlen(key), limit, window_ms, record_done, &e->p[id]);
    e->a.in_take = false;
    return c;
}

/* ---- tests ------------------------------------------------------------------------------ */

/* limit 3 per 30 s (period 10 s): A goes alone; B..E wait while it is in
 * flight and go as one EVALSHA for 4; another key goes at once. Decisions as
 * five calls in sequence: 3 allowed counting down, then 2 refused. */
static void test_waiting_calls_go_as_one_batch(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    e->f->hold = true;
    assert_non_null(take(e, 0, "k1", 3, 30000));
    RUN_UNTIL(e->base, e->f->nscripts == 1, 2000);
    assert_int_equal(e->f->scripts[0].n, 1);
    for (int i = 1; i <= 4; i++)
        assert_non_null(take(e, i, "k1", 3, 30000));
    assert_non_null(take(e, 10, "k2", 3, 30000)); /* another key: not behind k1 */
    run_for(e->base, 30);
    assert_int_equal(e->f->nscripts, 2);
    assert_string_not_equal(e->f->scripts[1].key, e->f->scripts[0].key);
    assert_int_equal(e->f->scripts[1].n, 1);
    assert_int_equal(e->a.n, 0);

    e->f->hold = false;
    fake_release(e->f);
    RUN_UNTIL(e->base, e->a.n == 6, 2000);
    assert_false(e->a.called_inside);
    assert_int_equal(e->f->nscripts, 3);
    assert_false(e->f->scripts[2].eval);
    assert_string_equal(e->f->scripts[2].key, e->f->scripts[0].key);
    assert_int_equal(e->f->scripts[2].n, 4);
    for (int id = 0; id <= 4; id++) {
        int i = answer_of(&e->a, id);
        assert_true(i >= 0);
        assert_true(e->a.ok[i]);
        const rl_decision *d = &e->a.d[i];
        if (id < 3) {
            assert_true(d->allowed);
            assert_int_equal(d->remaining, 2 - id);
            assert_int_equal(d->reset_ms, 10000 * (id + 1));
        } else {
            assert_false(d->allowed);
            assert_int_equal(d->remaining, 0);
            assert_int_equal(d->reset_ms, 30000);
            assert_int_equal(d->retry_after_ms, 10000);
        }
    }
    /* answered in order within the batch */
    assert_true(answer_of(&e->a, 1) < answer_of(&e->a, 2) && answer_of(&e->a, 3) < answer_of(&e->a, 4));
    int i = answer_of(&e->a, 10);
    assert_true(e->a.ok[i] && e->a.d[i].allowed && e->a.d[i].remaining == 2);

    /* Nothing in flight any more: the next call goes alone at once. */
    e->f->now_us += 10000000; /* one period later: one more */
    assert_non_null(take(e, 20, "k1", 3, 30000));
    RUN_UNTIL(e->base, e->a.n == 7, 2000);
    assert_int_equal(e->f->scripts[3].n, 1);
    assert_true(e->a.d[6].allowed);
    assert_int_equal(e->a.d[6].remaining, 0);
    env_stop(e);
}

/* Same key, another limit (a reload changed the policy): not the same batch. */
static void test_other_limit_not_batched(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    e->f->hold = true;
    assert_non_null(take(e, 0, "k", 3, 30000));
    assert_non_null(take(e, 1, "k", 4, 30000));
    assert_non_null(take(e, 2, "k", 3, 60000));
    RUN_UNTIL(e->base, e->f->nscripts == 3, 2000);
    e->f->hold = false;
    fake_release(e->f);
    RUN_UNTIL(e->base, e->a.n == 3, 2000);
    env_stop(e);
}

/* 300 waiting calls: batches of 256 and 44, one after the other. Limit 100:
 * exactly 100 allowed, in call order. */
static void test_batch_cap(void **state)
{
    (void)state;
    env *e = env_start(2000, 1);
    e->f->hold = true;
    assert_non_null(take(e, 0, "cap", 100, 60000));
    RUN_UNTIL(e->base, e->f->nscripts == 1, 2000);
    for (int id = 1; id <= 300; id++)
        assert_non_null(take(e, id, "cap", 100, 60000));
    for (int round = 0; round < 3; round++) {
        fake_release(e->f);
        RUN_UNTIL(e->base, e->f->nscripts == round + 2 || e->a.n == 301, 2000);
    }
    e->f->hold = false;
    fake_release(e->f);
    RUN_UNTIL(e->base, e->a.n == 301, 2000);
    assert_int_equal(e->f->nscripts, 3);
    assert_int_equal(e->f->scripts[1].n, 256);
    assert_int_equal(e->f->scripts[2].n, 44);
    for (int id = 0; id <= 300; id++) {
        int i = answer_of(&e->a, id);
        assert_true(i >= 0 && e->a.ok[i]);
        assert_int_equal(e->a.d[i].allowed, id < 100);
        assert_int_equal(e->a.d[i].remaining, id < 100 ? 99 - id : 0);
    }
    env_stop(e);
}

/* A cancelled waiting call is not sent (n counts it out); a cancelled call in
 * flight is not answered; a waiting batch cancelled whole goes nowhere. */
static void test_cancel(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    e->f->hold = true;
    rl_redis_call *c0 = take(e, 0, "c", 10, 10000);
    assert_non_null(c0);
    RUN_UNTIL(e->base, e->f->nscripts == 1, 2000);
    rl_redis_call *c[4];
    for (int id = 1; id <= 3; id++)
        assert_non_null(c[id] = take(e, id, "c", 10, 10000));
    rl_redis_cancel(c[2]);
    rl_redis_cancel(c0); /* sent: its token is taken, it is not answered */
    e->f->hold = false;
    fake_release(e->f);
    RUN_UNTIL(e->base, e->a.n == 2, 2000);
    run_for(e->base, 20);
    assert_int_equal(e->a.n, 2);
    assert_int_equal(e->f->nscripts, 2);
    assert_int_equal(e->f->scripts[1].n, 2);
    assert_int_equal(answer_of(&e->a, 0), -1);
    assert_int_equal(answer_of(&e->a, 2), -1);
    /* 1 and 3 are the 2nd and 3rd requests of the key */
    assert_int_equal(e->a.d[answer_of(&e->a, 1)].remaining, 8);
    assert_int_equal(e->a.d[answer_of(&e->a, 3)].remaining, 7);

    /* A whole waiting batch cancelled: only the one in flight was sent. */
    e->f->hold = true;
    assert_non_null(take(e, 4, "c", 10, 10000));
    RUN_UNTIL(e->base, e->f->nscripts == 3, 2000);
    rl_redis_call *w1 = take(e, 5, "c", 10, 10000), *w2 = take(e, 6, "c", 10, 10000);
    rl_redis_cancel(w2);
    rl_redis_cancel(w1);
    e->f->hold = false;
    fake_release(e->f);
    RUN_UNTIL(e->base, e->a.n == 3, 2000);
    run_for(e->base, 20);
    assert_int_equal(e->f->nscripts, 3);
    assert_int_equal(e->a.n, 3);
    rl_redis_cancel(NULL);
    env_stop(e);
}

/* NOSCRIPT: the batch goes again with EVAL, same n; decisions as usual. */
static void test_noscript_resends_batch_with_eval(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    e->f->hold = true;
    assert_non_null(take(e, 0, "ns", 2, 10000));
    RUN_UNTIL(e->base, e->f->nscripts == 1, 2000);
    for (int id = 1; id <= 3; id++)
        assert_non_null(take(e, id, "ns", 2, 10000));
    e->f->noscript_left = 1;
    e->f->hold = false;
    fake_release(e->f);
    RUN_UNTIL(e->base, e->a.n == 4, 2000);
    assert_int_equal(e->f->nscripts, 2); /* the NOSCRIPT answer is not a script run */
    assert_true(e->f->scripts[1].eval);
    assert_int_equal(e->f->scripts[1].n, 3);
    int allowed = 0;
    for (int i = 0; i < 4; i++) {
        assert_true(e->a.ok[i]);
        allowed += e->a.d[i].allowed;
    }
    assert_int_equal(allowed, 2);
    env_stop(e);
}

/* redis.timeout 150 ms, two connections, Redis never answers scripts. A goes
 * at t=0 and fails at ~150 ms (gw_redis's deadline, its connection dropped);
 * B waited from t=70: it goes on the other connection then, and is answered
 * (failed) at ~220 ms, its own deadline, not at ~300 ms. */
static void test_waiting_batch_keeps_its_deadline(void **state)
{
    (void)state;
    env *e = env_start(150, 2);
    e->f->stall = true;
    uint64_t t0 = ms_now();
    assert_non_null(take(e, 0, "dl", 10, 10000));
    RUN_UNTIL(e->base, e->f->nscripts == 1, 2000);
    while (ms_now() < t0 + 70)
        run_for(e->base, 1);
    uint64_t tb = ms_now();
    assert_non_null(take(e, 1, "dl", 10, 10000));
    assert_non_null(take(e, 2, "dl", 10, 10000));
    RUN_UNTIL(e->base, e->a.n == 3, 2000);
    int ia = answer_of(&e->a, 0), ib = answer_of(&e->a, 1);
    assert_false(e->a.ok[ia]);
    assert_false(e->a.ok[ib]);
    assert_false(e->a.ok[answer_of(&e->a, 2)]);
    assert_int_equal(e->f->nscripts, 2); /* B went when A failed */
    assert_int_equal(e->f->scripts[1].n, 2);
    uint64_t b_waited = e->a.at_ms[ib] - tb;
    assert_true(b_waited >= 145);
    assert_true(b_waited <= 200);
    env_stop(e);
}

/* rl_redis_free from inside a done callback: the rest (a batch in flight,
 * the one waiting behind it, another key) answered as failed before it
 * returns; a cancelled one not at all. */
static void test_free_inside_done(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    e->f->hold = true;
    assert_non_null(take(e, 0, "f1", 10, 10000));
    RUN_UNTIL(e->base, e->f->nscripts == 1, 2000);
    assert_non_null(take(e, 1, "f1", 10, 10000));
    rl_redis_call *c2 = take(e, 2, "f1", 10, 10000);
    assert_non_null(take(e, 3, "f2", 10, 10000));
    RUN_UNTIL(e->base, e->f->nscripts == 2, 2000);
    rl_redis_cancel(c2);
    e->a.free_on_first = e->r;
    e->r = NULL;
    fake_release(e->f); /* f1's first reply only: f2's is behind it but held with it */
    RUN_UNTIL(e->base, e->a.n >= 1, 2000);
    assert_int_equal(e->a.n_after_free, 3);
    assert_int_equal(e->a.n, 3);
    assert_int_equal(e->a.order[0], 0);
    assert_true(e->a.ok[0]);
    assert_false(e->a.ok[answer_of(&e->a, 1)]);
    assert_false(e->a.ok[answer_of(&e->a, 3)]);
    assert_int_equal(answer_of(&e->a, 2), -1);
    run_for(e->base, 30);
    assert_int_equal(e->a.n, 3);
    env_stop(e);
}

/* rl_redis_free with calls in flight and waiting: all answered as failed. */
static void test_free_answers_everything(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    e->f->hold = true;
    for (int id = 0; id < 5; id++) {
        assert_non_null(take(e, id, id < 3 ? "g1" : "g2", 10, 10000));
        RUN_UNTIL(e->base, e->f->nscripts >= (id < 3 ? 1 : 2), 2000);
    }
    rl_redis_free(e->r);
    e->r = NULL;
    assert_int_equal(e->a.n, 5);
    for (int i = 0; i < 5; i++)
        assert_false(e->a.ok[i]);
    env_stop(e);
}

/* Not connected: NULL at once, nothing answered. */
static void test_not_connected(void **state)
{
    (void)state;
    struct event_base *base = event_base_new();
    rl_redis *r = rl_redis_create(base, test_log);
    assert_non_null(r);
    assert_false(rl_redis_up(r));
    answers a = {0};
    probe p = {&a, 0, false};
    assert_null(rl_redis_take(r, "x", 1, 1, 1000, record_done, &p));
    rl_redis_free(r);
    rl_redis_free(NULL);
    assert_int_equal(a.n, 0);
    event_base_free(base);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batch_arithmetic_hand_cases),
        cmocka_unit_test(test_batch_arithmetic_equals_sequence),
        cmocka_unit_test(test_waiting_calls_go_as_one_batch),
        cmocka_unit_test(test_other_limit_not_batched),
        cmocka_unit_test(test_batch_cap),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_noscript_resends_batch_with_eval),
        cmocka_unit_test(test_waiting_batch_keeps_its_deadline),
        cmocka_unit_test(test_free_inside_done),
        cmocka_unit_test(test_free_answers_everything),
        cmocka_unit_test(test_not_connected),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

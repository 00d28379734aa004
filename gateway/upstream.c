/*
 * upstream.c - per-worker upstream pools, passive health and proxied calls.
 *
 * Runs only on the owning worker's thread. The one idea: an upstream connection
 * is a nonblocking socket registered once with the event loop, edge-triggered
 * for both reading and writing, for its whole life. A request is written at
 * once (one send, or sendmsg with a body) when the connection is idle and
 * connected, and the answer is read until EAGAIN and fed to the incremental
 * parser (http1.c). So a proxied request costs no epoll_ctl and no ioctl on
 * the upstream side; evhttp's client re-arms its events for every request,
 * which is why it is not used here.
 *
 * Deadlines are ours: one timer per call, first at the connect deadline, then
 * at the call deadline (min of the upstream's `timeout` and the request's),
 * and once the answer streams, the idle deadline (the upstream's `timeout`
 * after the last read; moved lazily: the timer re-arms itself when it fires
 * early, so a read costs no timer work).
 * Connections are plain memory and a socket: they may be closed anywhere, as
 * long as the code that closes one returns without touching it again.
 *
 * Reads are bounded per event (UPSTREAM_READ_BUDGET): an edge-triggered socket
 * that still has data after that keeps its `readable` mark and is read again
 * from a zero-delay timer, i.e. after the loop has polled everyone else. A
 * streamed call that its caller paused keeps the mark too and is read again
 * when it goes on.
 */
#include "gateway/upstream.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/event_struct.h>

#include "gateway/http1.h"
#include "gateway/log.h"
#include "gateway/sockio.h"

typedef struct up_target up_target;
typedef struct up_upstream up_upstream;

enum { CONN_CONNECTING, CONN_BUSY, CONN_IDLE };

typedef struct up_conn {
    int fd;
    int state;
    bool reused;      /* has carried a complete exchange before */
    bool peer_eof;    /* the upstream closed its side */
    bool readable;    /* a read edge seen and the socket not read dry since */
    bool peer_closed; /* EV_CLOSED seen: read to the end, no edge will follow */
    struct event *ev;
    struct event more_ev; /* zero-delay timer: read on after the next poll */
    up_target *target;
    struct up_conn *next; /* idle stack */
    struct evbuffer *out;
    struct evbuffer *in;
    upstream_call_t *call;
    http1_response resp;
} up_conn;

struct up_target {
    const gw_target *addr;
    struct sockaddr_storage sa;
    socklen_t sa_len;
    up_upstream *up;
    up_conn *idle;
    unsigned active; /* calls using this target now (least_conn) */
    int fails;
    uint64_t window_start_ns;
    uint64_t ejected_until_ns;
    struct event *eject_timer;
    metrics_series_t *up_gauge;
};

struct up_upstream {
    const config_upstream *cfg;
    up_target *targets;
    size_t count;
    size_t rr;
    unsigned idle_count; /* idle connections over all targets (the keepalive cap) */
    metrics_series_t *duration;
    metrics_series_t *err_connect, *err_timeout, *err_other;
    upstream_pool_t *pool;
};

struct upstream_pool {
    struct event_base *base;
    gw_runtime *rt;
    up_upstream *ups;
    size_t count;
    struct evbuffer *scratch; /* request body being assembled */
};

enum { CALL_TIMER_NONE, CALL_TIMER_CONNECT, CALL_TIMER_DEADLINE, CALL_TIMER_DEFERRED, CALL_TIMER_IDLE };

/* Why an attempt failed: decides the status, the metric and the blame. */
enum { FAIL_CONNECT, FAIL_IO, FAIL_TIMEOUT, FAIL_PROTOCOL, FAIL_LOCAL };

struct upstream_call {
    upstream_pool_t *pool;
    up_upstream *up;
    enum evhttp_cmd_type cmd;
    const char *uri; /* borrowed from the caller until the call ends */
    bool idempotent;
    bool stale_retry_used; /* one free retry after a reused connection died */
    bool streaming;        /* the head went to the caller: body pieces follow */
    bool paused;           /* streaming, and the caller asked us not to read */
    bool head_checked;     /* this attempt's head was looked at for text/event-stream */
    bool event_stream;
    size_t buffer_max;     /* body buffered before the answer streams */
    uint64_t last_read_ns; /* streaming: the idle deadline counts from here */
    uint64_t deadline_ns;  /* the request's */
    uint64_t attempt_start_ns;
    uint64_t attempt_deadline_ns; /* min(request deadline, start + upstream timeout) */
    int attempts;
    up_target *target;
    up_conn *conn;
    struct event timer_ev; /* embedded: one allocation per call, not two */
    struct event *timer;   /* &timer_ev */
    int timer_phase;
    int deferred_fail;
    const upstream_handlers *h;
    void *arg;
};

uint64_t gw_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static struct timeval ns_to_tv(uint64_t ns)
{
    struct timeval tv = {(time_t)(ns / 1000000000ULL), (suseconds_t)((ns % 1000000000ULL) / 1000)};
    return tv;
}

static struct timeval ms_to_tv(int64_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000)};
    return tv;
}

static const char *method_token(enum evhttp_cmd_type cmd)
{
    switch (cmd) {
    case EVHTTP_REQ_GET:
        return "GET";
    case EVHTTP_REQ_POST:
        return "POST";
    case EVHTTP_REQ_HEAD:
        return "HEAD";
    case EVHTTP_REQ_PUT:
        return "PUT";
    case EVHTTP_REQ_DELETE:
        return "DELETE";
    case EVHTTP_REQ_OPTIONS:
        return "OPTIONS";
    case EVHTTP_REQ_TRACE:
        return "TRACE";
    case EVHTTP_REQ_CONNECT:
        return "CONNECT";
    case EVHTTP_REQ_PATCH:
        return "PATCH";
    default:
        return "GET";
    }
}

/* ---- connections ---------------------------------------------------------- */

static void conn_event_cb(evutil_socket_t fd, short what, void *arg);
static void conn_more_cb(evutil_socket_t fd, short what, void *arg);

static void conn_close(up_conn *c)
{
    if (c->ev) {
        event_free(c->ev);
        event_del(&c->more_ev);
    }
    if (c->fd >= 0)
        close(c->fd);
    if (c->out)
        evbuffer_free(c->out);
    if (c->in)
        evbuffer_free(c->in);
    http1_response_free(&c->resp);
    free(c);
}

/* A new connection, connecting. NULL with errno set when the socket could not
 * even be created or the connect was refused at once. */
static up_conn *conn_open(up_target *t)
{
    up_conn *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->fd = -1;
    c->target = t;
    c->out = evbuffer_new();
    c->in = evbuffer_new();
    /* The body limit is set per call (call_attempt). */
    if (!c->out || !c->in || http1_response_init(&c->resp, UPSTREAM_MAX_RESPONSE_HEADER_BYTES, 0) != 0)
        goto fail;
    c->fd = socket(t->sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        goto fail;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(c->fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&t->sa, t->sa_len) != 0 && errno != EINPROGRESS)
        goto fail;
    c->state = CONN_CONNECTING;
    c->ev = event_new(t->up->pool->base, c->fd, EV_READ | EV_WRITE | EV_CLOSED | EV_PERSIST | EV_ET,
                      conn_event_cb, c);
    if (!c->ev || evtimer_assign(&c->more_ev, t->up->pool->base, conn_more_cb, c) != 0 ||
        event_add(c->ev, NULL) != 0)
        goto fail;
    return c;
fail:;
    int saved = errno;
    conn_close(c);
    errno = saved;
    return NULL;
}

static up_conn *conn_take_idle(up_target *t)
{
    up_conn *c = t->idle;
    if (c) {
        t->idle = c->next;
        c->next = NULL;
        t->up->idle_count--;
    }
    return c;
}

static void conn_unlink_idle(up_conn *c)
{
    up_conn **pp = &c->target->idle;
    while (*pp && *pp != c)
        pp = &(*pp)->next;
    if (*pp) {
        *pp = c->next;
        c->target->up->idle_count--;
    }
}

/* Back to the idle stack, or closed when the keepalive cap is reached. */
static void conn_put(up_conn *c)
{
    up_upstream *u = c->target->up;
    if ((int)u->idle_count >= u->cfg->keepalive) {
        conn_close(c);
        return;
    }
    c->state = CONN_IDLE;
    c->call = NULL;
    c->readable = false;
    evtimer_del(&c->more_ev);
    c->next = c->target->idle;
    c->target->idle = c;
    u->idle_count++;
}

/* Write what is queued. 0 when all of it went or the socket is full; -1 on error. */
static int conn_flush(up_conn *c)
{
    while (evbuffer_get_length(c->out) > 0) {
        ssize_t n = gw_write_socket(c->fd, c->out);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            if (errno == EINTR)
                continue;
            return -1;
        }
    }
    return 0;
}

/* Read what has arrived, at most UPSTREAM_READ_BUDGET bytes: c->readable
 * stays set when the budget ran out first. Returns 1 at end of stream, 0
 * otherwise, -1 on error; *got: bytes read. */
static int conn_read(up_conn *c, size_t *got)
{
    switch (gw_read_socket(c->fd, c->in, UPSTREAM_READ_CHUNK, 1,
                           evbuffer_get_length(c->in) + UPSTREAM_READ_BUDGET, c->peer_closed, got)) {
    case GW_READ_EOF:
        c->peer_eof = true;
        c->readable = false;
        return 1;
    case GW_READ_ERROR:
        return -1;
    case GW_READ_DRAINED:
        c->readable = false;
        return 0;
    default:
        return 0; /* the budget: read on after the next poll */
    }
}

/* ---- passive health ------------------------------------------------------- */

static void eject_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    up_target *t = arg;
    /* Back in rotation on probation: one more failure ejects it again. */
    t->fails = t->up->cfg->max_fails > 0 ? t->up->cfg->max_fails - 1 : 0;
    t->window_start_ns = gw_now_ns();
    if (t->up_gauge)
        metrics_gauge_set(t->up_gauge, 1);
    gw_info("upstream %s: target %s back in rotation", t->up->cfg->name, t->addr->label);
}

static void target_failed(up_target *t, uint64_t now)
{
    const config_upstream *cfg = t->up->cfg;
    if (cfg->max_fails <= 0 || t->ejected_until_ns > now)
        return;
    if (now - t->window_start_ns > (uint64_t)cfg->fail_timeout_ms * 1000000ULL) {
        t->window_start_ns = now;
        t->fails = 0;
    }
    if (++t->fails < cfg->max_fails)
        return;
    t->ejected_until_ns = now + (uint64_t)cfg->fail_timeout_ms * 1000000ULL;
    struct timeval tv = ms_to_tv(cfg->fail_timeout_ms);
    evtimer_add(t->eject_timer, &tv);
    if (t->up_gauge)
        metrics_gauge_set(t->up_gauge, 0);
    gw_warn("upstream %s: target %s ejected for %lldms after %d failures", cfg->name, t->addr->label,
            (long long)cfg->fail_timeout_ms, t->fails);
}

/* Choose a target other than `exclude`. When every candidate is ejected, a
 * first attempt still gets the one whose ejection ends soonest (so a lone
 * target is never black-holed); a retry gets none. */
static up_target *pick_target(up_upstream *u, const up_target *exclude, uint64_t now)
{
    up_target *best = NULL;
    for (size_t i = 0; i < u->count; i++) {
        up_target *t = &u->targets[(u->rr + i) % u->count];
        if (t == exclude || t->ejected_until_ns > now)
            continue;
        if (u->cfg->balance == CONFIG_BALANCE_ROUND_ROBIN) {
            best = t;
            break;
        }
        if (!best || t->active < best->active)
            best = t;
    }
    if (best) {
        u->rr = (size_t)(best - u->targets) + 1;
        return best;
    }
    if (exclude)
        return NULL;
    for (size_t i = 0; i < u->count; i++)
        if (!best || u->targets[i].ejected_until_ns < best->ejected_until_ns)
            best = &u->targets[i];
    return best;
}

/* ---- pool ------------------------------------------------------------------ */

static int target_address(up_target *t)
{
    char port[8];
    struct addrinfo hints = {0}, *res = NULL;
    snprintf(port, sizeof port, "%u", (unsigned)t->addr->port);
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV; /* resolved by the runtime: no DNS here */
    if (getaddrinfo(t->addr->addr, port, &hints, &res) != 0)
        return -1;
    memcpy(&t->sa, res->ai_addr, res->ai_addrlen);
    t->sa_len = (socklen_t)res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

upstream_pool_t *upstream_pool_create(struct event_base *base, gw_runtime *rt, metrics_shard_t *shard,
                                      const gw_metrics *m)
{
    const config_t *cfg = rt->cfg;
    upstream_pool_t *pool = calloc(1, sizeof *pool);
    if (!pool)
        return NULL;
    pool->base = base;
    pool->rt = rt;
    pool->count = cfg->upstream_count;
    pool->ups = calloc(pool->count + 1, sizeof *pool->ups);
    pool->scratch = evbuffer_new();
    if (!pool->ups || !pool->scratch)
        goto fail;
    for (size_t i = 0; i < pool->count; i++) {
        up_upstream *u = &pool->ups[i];
        u->cfg = &cfg->upstreams[i];
        u->pool = pool;
        u->targets = calloc(rt->upstreams[i].count + 1, sizeof *u->targets);
        if (!u->targets)
            goto fail;
        const char *ulabel[1] = {u->cfg->name};
        u->duration = metrics_series(shard, m->upstream_duration, ulabel);
        const char *k1[2] = {u->cfg->name, "connect"}, *k2[2] = {u->cfg->name, "timeout"},
                   *k3[2] = {u->cfg->name, "other"};
        u->err_connect = metrics_series(shard, m->upstream_errors, k1);
        u->err_timeout = metrics_series(shard, m->upstream_errors, k2);
        u->err_other = metrics_series(shard, m->upstream_errors, k3);
        for (size_t j = 0; j < rt->upstreams[i].count; j++) {
            up_target *t = &u->targets[j];
            t->addr = &rt->upstreams[i].targets[j];
            t->up = u;
            t->eject_timer = evtimer_new(base, eject_timer_cb, t);
            u->count = j + 1;
            if (!t->eject_timer || target_address(t) != 0)
                goto fail;
            const char *labels[2] = {u->cfg->name, t->addr->label};
            t->up_gauge = metrics_series(shard, m->target_up, labels);
            if (t->up_gauge)
                metrics_gauge_set(t->up_gauge, 1);
        }
    }
    return pool;
fail:
    upstream_pool_free(pool);
    return NULL;
}

void upstream_pool_free(upstream_pool_t *pool)
{
    if (!pool)
        return;
    for (size_t i = 0; pool->ups && i < pool->count; i++) {
        up_upstream *u = &pool->ups[i];
        for (size_t j = 0; u->targets && j < u->count; j++) {
            up_target *t = &u->targets[j];
            up_conn *c;
            while ((c = conn_take_idle(t)) != NULL)
                conn_close(c);
            if (t->eject_timer)
                event_free(t->eject_timer);
        }
        free(u->targets);
    }
    if (pool->scratch)
        evbuffer_free(pool->scratch);
    free(pool->ups);
    free(pool);
}

/* ---- calls ----------------------------------------------------------------- */

static void call_attempt(upstream_call_t *call, up_target *t, bool fresh_conn);

static void call_free(upstream_call_t *call)
{
    event_del(call->timer);
    free(call);
}

static void call_stream_failed(upstream_call_t *call, int kind);

/* Free the call, then report: the callback may end the request (and release
 * the generation that owns this pool), so nothing here runs after it. */
static void call_finish(upstream_call_t *call, const upstream_response *resp, int status)
{
    const char *target = call->target ? call->target->addr->label : NULL; /* owned by the runtime */
    upstream_done_fn done = call->h->done;
    void *arg = call->arg;
    call_free(call);
    done(arg, resp, status, target);
}

static void arm_timer_now(upstream_call_t *call, int phase, uint64_t at_ns, uint64_t now)
{
    struct timeval tv = ns_to_tv(at_ns > now ? at_ns - now : 0);
    call->timer_phase = phase;
    evtimer_add(call->timer, &tv);
}

static void arm_timer(upstream_call_t *call, int phase, uint64_t at_ns)
{
    arm_timer_now(call, phase, at_ns, gw_now_ns());
}

static uint64_t idle_ns(const upstream_call_t *call)
{
    return (uint64_t)call->up->cfg->timeout_ms * 1000000ULL;
}

static void attempt_ended(upstream_call_t *call, uint64_t now)
{
    evtimer_del(call->timer);
    call->timer_phase = CALL_TIMER_NONE;
    call->conn = NULL;
    if (call->target) {
        call->target->active--;
        if (call->up->duration)
            metrics_histogram_observe(call->up->duration, (double)(now - call->attempt_start_ns) / 1e9);
    }
}

/* The attempt ended without an answer (its connection is already closed):
 * count it, then retry or give up. stale: it died on a reused connection
 * before any byte of an answer came (the upstream closed a keep-alive
 * connection as we wrote); that is not the target's fault. */
static void attempt_failed(upstream_call_t *call, int kind, bool stale)
{
    uint64_t now = gw_now_ns();
    up_target *t = call->target;
    attempt_ended(call, now);
    int status = kind == FAIL_TIMEOUT ? 504 : 502;
    if (t && !stale) {
        metrics_series_t *err = kind == FAIL_TIMEOUT    ? call->up->err_timeout
                                : kind == FAIL_PROTOCOL ? call->up->err_other
                                                        : call->up->err_connect;
        if (err)
            metrics_counter_add(err, 1);
        if (kind != FAIL_LOCAL && kind != FAIL_PROTOCOL)
            target_failed(t, now);
    }
    if (t && stale && call->idempotent && !call->stale_retry_used && now < call->deadline_ns) {
        call->stale_retry_used = true;
        call->attempts--; /* not the target's fault: it does not use up a retry */
        call_attempt(call, t, true);
        return;
    }
    if (t && call->idempotent && call->attempts <= call->up->cfg->retries && now < call->deadline_ns) {
        up_target *next = pick_target(call->up, t, now);
        if (next) {
            call_attempt(call, next, false);
            return;
        }
    }
    call_finish(call, NULL, status);
}

/* Fail the attempt from the event loop rather than from the current stack
 * (before upstream_call_start has returned). */
static void defer_failure(upstream_call_t *call, int kind)
{
    call->deferred_fail = kind;
    call->timer_phase = CALL_TIMER_DEFERRED;
    event_active(call->timer, EV_TIMEOUT, 0);
}

/* The connection's exchange failed: close it and fail the attempt (or, once
 * the answer streams, cut the stream). */
static void conn_failed(up_conn *c, int kind)
{
    upstream_call_t *call = c->call;
    bool stale = c->reused && !c->resp.got_bytes && kind == FAIL_IO;
    if (kind == FAIL_PROTOCOL && c->resp.error)
        gw_warn("upstream %s: target %s: %s", c->target->up->cfg->name, c->target->addr->label,
                c->resp.error);
    if (call && call->streaming) {
        call_stream_failed(call, kind); /* closes c after the last callback */
        return;
    }
    c->call = NULL;
    conn_close(c);
    if (call)
        attempt_failed(call, kind, stale);
}

/* Is the answer a text/event-stream (streamed at once, whatever its size)? */
static bool is_event_stream(const http1_response *r)
{
    const http1_field *f = http1_find(r, "Content-Type");
    if (!f)
        return false;
    const char *v = f->value;
    while (*v == ' ' || *v == '\t')
        v++;
    size_t n = strcspn(v, "; \t");
    return n == 17 && strncasecmp(v, "text/event-stream", 17) == 0;
}

/* Can c carry another request after this answer? Nothing unread after it
 * (a socket not read dry may hold more), and all of our request written (an
 * upstream that answers early and leaves part of a body unread would read the
 * rest as the next request). */
static bool conn_reusable(const up_conn *c)
{
    return c->resp.keep_alive && !c->peer_eof && !c->peer_closed && !c->readable &&
           evbuffer_get_length(c->in) == 0 && evbuffer_get_length(c->out) == 0;
}

/* After the exchange: back to the idle stack, or closed. */
static void conn_release(up_conn *c, bool keep)
{
    if (keep) {
        http1_response_reset(&c->resp, false);
        conn_put(c);
    } else {
        conn_close(c);
    }
}

/* A whole answer arrived on c. */
static void conn_answered(up_conn *c)
{
    upstream_call_t *call = c->call;
    uint64_t now = gw_now_ns();
    bool keep = conn_reusable(c);
    c->call = NULL;
    c->reused = true;
    call->target->fails = 0;
    if (call->streaming) {
        upstream_body_fn body = call->h->body;
        void *arg = call->arg;
        attempt_ended(call, now);
        call_free(call);
        body(arg, c->resp.body, UPSTREAM_BODY_END, true);
        conn_release(c, keep);
        return;
    }
    attempt_ended(call, now);
    upstream_response resp = {c->resp.status,      c->resp.reason, c->resp.fields,
                              c->resp.field_count, c->resp.body,   c->resp.content_length};
    /* Report first: the answer lives in c. The done callback cannot free the
     * pool (generations are released from a reaper event), so c survives it. */
    call_finish(call, &resp, 0);
    conn_release(c, keep);
}

/* A streamed answer broke off (the connection failed, the framing broke, or
 * nothing came within the idle deadline): what arrived before goes with the
 * report, then the connection is closed. Not the target's fault for passive
 * health (nginx does not count it either); counted in the upstream's errors. */
static void call_stream_failed(upstream_call_t *call, int kind)
{
    up_conn *c = call->conn;
    metrics_series_t *err = kind == FAIL_TIMEOUT ? call->up->err_timeout : call->up->err_other;
    if (err)
        metrics_counter_add(err, 1);
    if (c)
        c->call = NULL;
    upstream_body_fn body = call->h->body;
    void *arg = call->arg;
    attempt_ended(call, gw_now_ns());
    call_free(call);
    body(arg, c ? c->resp.body : NULL, kind == FAIL_TIMEOUT ? UPSTREAM_BODY_TIMEOUT : UPSTREAM_BODY_FAILED,
         true);
    if (c)
        conn_close(c);
}

/* The caller gave up on the call from one of its callbacks. */
static void call_abandon(upstream_call_t *call)
{
    up_conn *c = call->conn;
    if (c) {
        c->call = NULL;
        conn_close(c); /* mid-exchange: never reusable */
    }
    call->conn = NULL;
    if (call->target)
        call->target->active--;
    call_free(call);
}

/* The head is in and the answer does not complete within buffer_max (or is
 * an event stream): hand it over and stream the rest. false: the call is
 * gone (abandoned by the caller). */
static bool call_stream_start(upstream_call_t *call, up_conn *c)
{
    call->streaming = true;
    call->last_read_ns = gw_now_ns();
    arm_timer(call, CALL_TIMER_IDLE, call->last_read_ns + idle_ns(call));
    upstream_response resp = {c->resp.status,      c->resp.reason, c->resp.fields,
                              c->resp.field_count, c->resp.body,   c->resp.content_length};
    if (!call->h->head(call->arg, &resp, call->target->addr->label)) {
        call_abandon(call);
        return false;
    }
    evbuffer_drain(c->resp.body, evbuffer_get_length(c->resp.body));
    return true;
}

/* What the socket has for the call on c: read (within the budget), parse,
 * report. */
static void conn_process(up_conn *c)
{
    upstream_call_t *call = c->call;
    if (!call) /* busy without a call: cannot happen; do not leak it */
        return;
    if (evbuffer_get_length(c->out) > 0 && conn_flush(c) != 0) {
        conn_failed(c, FAIL_IO);
        return;
    }
    if (!c->readable || call->paused)
        return;
    size_t got = 0;
    int eof = conn_read(c, &got);
    if (eof < 0) {
        conn_failed(c, FAIL_IO);
        return;
    }
    if (eof == 1 && !c->resp.got_bytes && evbuffer_get_length(c->in) == 0) {
        /* Closed before a byte of the answer: a connection failure (and, on a
         * reused connection, a stale keep-alive), not a protocol error. */
        conn_failed(c, FAIL_IO);
        return;
    }
    if (call->streaming && got)
        call->last_read_ns = gw_now_ns();
    http1_result r = http1_parse(&c->resp, c->in, eof == 1);
    if (r == HTTP1_DONE) {
        /* Complete, but over buffer_max all the same (its end came in the
         * read that passed it): it streams, so that whether an answer is
         * buffered depends on its size only. */
        if (!call->streaming && call->h->head && evbuffer_get_length(c->resp.body) > call->buffer_max &&
            !call_stream_start(call, c))
            return;
        conn_answered(c);
        return;
    }
    if (r == HTTP1_ERROR) {
        conn_failed(c, FAIL_PROTOCOL);
        return;
    }
    if (!c->readable && got > 0 && eof == 0) {
        /* A short read, answer incomplete: dry, unless a reset came with
         * the same edge (epoll reports it as READ|WRITE without EV_CLOSED,
         * and no edge follows), or more came meanwhile. One peek tells
         * (large answers only: a small one is complete by now). */
        char b;
        ssize_t n = recv(c->fd, &b, 1, MSG_PEEK);
        if (n >= 0) {
            c->readable = true;
            c->peer_closed = c->peer_closed || n == 0;
        } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            conn_failed(c, FAIL_IO); /* (a streamed answer hands over what it got first) */
            return;
        }
    }
    if (call->streaming) {
        /* Hand over what arrived; a failure below still delivers it first. */
        if (eof != 1 && evbuffer_get_length(c->resp.body) > 0) {
            if (!call->h->body(call->arg, c->resp.body, UPSTREAM_BODY_MORE, !c->readable)) {
                call_abandon(call);
                return;
            }
            evbuffer_drain(c->resp.body, evbuffer_get_length(c->resp.body));
        }
    } else if (c->resp.head_done && call->h->head) {
        if (!call->head_checked) {
            call->head_checked = true;
            call->event_stream = is_event_stream(&c->resp);
        }
        if ((call->event_stream || c->resp.content_length > (int64_t)call->buffer_max ||
             evbuffer_get_length(c->resp.body) > call->buffer_max) &&
            eof != 1 && !call_stream_start(call, c))
            return;
    }
    if (eof == 1) {
        conn_failed(c, FAIL_IO);
        return;
    }
    if (c->readable && !call->paused) {
        static const struct timeval zero = {0, 0};
        evtimer_add(&c->more_ev, &zero); /* the budget ran out: on after the next poll */
    }
}

static void conn_more_cb(evutil_socket_t fd, short what, void *arg)
{
    conn_process(arg);
}

static void conn_event_cb(evutil_socket_t fd, short what, void *arg)
{
    up_conn *c = arg;
    if (c->state == CONN_IDLE) {
        /* An idle connection has nothing to say: data or EOF means it is closing. */
        char b;
        ssize_t r = recv(c->fd, &b, 1, MSG_PEEK);
        if (r > 0 || r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
            conn_unlink_idle(c);
            conn_close(c);
        }
        return;
    }
    if (c->state == CONN_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
            conn_failed(c, FAIL_CONNECT);
            return;
        }
        if (!(what & EV_WRITE))
            return;
        c->state = CONN_BUSY;
    }
    if (what & (EV_READ | EV_CLOSED))
        c->readable = true;
    if (what & EV_CLOSED)
        c->peer_closed = true;
    conn_process(c);
}

static void call_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    upstream_call_t *call = arg;
    switch (call->timer_phase) {
    case CALL_TIMER_DEFERRED:
        attempt_failed(call, call->deferred_fail, false);
        return;
    case CALL_TIMER_IDLE: {
        if (call->paused) /* waiting for the client, not the upstream: re-armed on resume */
            return;
        uint64_t due = call->last_read_ns + idle_ns(call);
        if (gw_now_ns() < due) {
            arm_timer(call, CALL_TIMER_IDLE, due);
            return;
        }
        gw_warn("upstream %s: target %s: nothing for %lldms in a streamed answer; cut", call->up->cfg->name,
                call->target->addr->label, (long long)call->up->cfg->timeout_ms);
        call_stream_failed(call, FAIL_TIMEOUT);
        return;
    }
    case CALL_TIMER_CONNECT:
        if (call->conn && call->conn->state != CONN_CONNECTING) {
            arm_timer(call, CALL_TIMER_DEADLINE, call->attempt_deadline_ns);
            return;
        }
        /* not connected by the connect deadline */
        __attribute__((fallthrough));
    case CALL_TIMER_DEADLINE:
        if (call->conn) {
            call->conn->call = NULL;
            conn_close(call->conn);
            call->conn = NULL;
        }
        attempt_failed(call, FAIL_TIMEOUT, false);
        return;
    default:
        return;
    }
}

/* Queue the request line, headers and body on c->out. */
static void build_request(upstream_call_t *call, up_conn *c)
{
    const char *method = method_token(call->cmd);
    size_t m = strlen(method), u = strlen(call->uri);
    char line[512]; /* the request line in one piece when it fits (it nearly always does) */
    if (m + u + 12 <= sizeof line) {
        memcpy(line, method, m);
        line[m] = ' ';
        memcpy(line + m + 1, call->uri, u);
        memcpy(line + m + 1 + u, " HTTP/1.1\r\n", 11);
        evbuffer_add(c->out, line, m + u + 12);
    } else {
        evbuffer_add(c->out, method, m);
        evbuffer_add(c->out, " ", 1);
        evbuffer_add(c->out, call->uri, u);
        evbuffer_add(c->out, " HTTP/1.1\r\n", 11);
    }
    call->h->fill(call->arg, c->out, call->pool->scratch, c->target->addr->label);
    evbuffer_add(c->out, "\r\n", 2);
    evbuffer_add_buffer(c->out, call->pool->scratch);
}

static void call_attempt(upstream_call_t *call, up_target *t, bool fresh_conn)
{
    uint64_t now = gw_now_ns();
    call->attempts++;
    call->target = t;
    call->attempt_start_ns = now;
    call->head_checked = false;
    uint64_t attempt_deadline = now + (uint64_t)call->up->cfg->timeout_ms * 1000000ULL;
    call->attempt_deadline_ns = attempt_deadline < call->deadline_ns ? attempt_deadline : call->deadline_ns;
    t->active++;

    up_conn *c = fresh_conn ? NULL : conn_take_idle(t);
    if (!c) {
        c = conn_open(t);
        if (!c) {
            int e = errno;
            gw_warn("upstream %s: target %s: %s", call->up->cfg->name, t->addr->label, strerror(e));
            defer_failure(call, e == EMFILE || e == ENFILE || e == ENOMEM ? FAIL_LOCAL : FAIL_CONNECT);
            return;
        }
    } else {
        c->state = CONN_BUSY;
    }
    c->call = call;
    call->conn = c;
    http1_response_reset(&c->resp, call->cmd == EVHTTP_REQ_HEAD);
    /* What may wait in the parser's body: a streaming caller takes it out
     * once it passes buffer_max, at most a read's budget later. */
    c->resp.max_body_bytes = call->h->head ? call->buffer_max + 2 * UPSTREAM_READ_BUDGET : call->buffer_max;
    build_request(call, c);

    uint64_t connect_deadline = now + (uint64_t)call->up->cfg->connect_timeout_ms * 1000000ULL;
    if (c->state == CONN_CONNECTING && connect_deadline < call->attempt_deadline_ns)
        arm_timer_now(call, CALL_TIMER_CONNECT, connect_deadline, now);
    else
        arm_timer_now(call, CALL_TIMER_DEADLINE, call->attempt_deadline_ns, now);

    if (c->state == CONN_BUSY && conn_flush(c) != 0) {
        /* The kept-alive connection is gone: fail from the loop (we may be
         * inside upstream_call_start). */
        bool stale = c->reused;
        c->call = NULL;
        call->conn = NULL;
        conn_close(c);
        if (stale && call->idempotent && !call->stale_retry_used) {
            call->stale_retry_used = true;
            call->attempts--;
            t->active--;
            evtimer_del(call->timer);
            call_attempt(call, t, true);
            return;
        }
        defer_failure(call, FAIL_IO);
    }
}

upstream_call_t *upstream_call_start(upstream_pool_t *pool, size_t index, enum evhttp_cmd_type cmd,
                                     const char *uri, bool idempotent, uint64_t deadline_ns,
                                     size_t buffer_max, const upstream_handlers *h, void *arg)
{
    upstream_call_t *call = calloc(1, sizeof *call);
    if (!call)
        return NULL;
    call->pool = pool;
    call->up = &pool->ups[index];
    call->cmd = cmd;
    call->uri = uri;
    call->idempotent = idempotent;
    call->deadline_ns = deadline_ns;
    call->buffer_max = buffer_max;
    call->h = h;
    call->arg = arg;
    call->timer = &call->timer_ev;
    if (evtimer_assign(call->timer, pool->base, call_timer_cb, call) != 0) {
        free(call);
        return NULL;
    }
    up_target *t = pick_target(call->up, NULL, gw_now_ns());
    if (t)
        call_attempt(call, t, false);
    else
        defer_failure(call, FAIL_LOCAL); /* no targets at all */
    return call;
}

void upstream_call_pause(upstream_call_t *call, bool paused)
{
    if (!call || !call->streaming || call->paused == paused)
        return;
    call->paused = paused;
    if (paused)
        return;
    call->last_read_ns = gw_now_ns(); /* the idle deadline starts afresh */
    if (!evtimer_pending(call->timer, NULL))
        arm_timer(call, CALL_TIMER_IDLE, call->last_read_ns + idle_ns(call));
    if (call->conn && call->conn->readable) {
        static const struct timeval zero = {0, 0};
        evtimer_add(&call->conn->more_ev, &zero);
    }
}

void upstream_call_cancel(upstream_call_t *call)
{
    if (!call)
        return;
    evtimer_del(call->timer);
    call_abandon(call);
}

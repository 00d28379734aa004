/*
 * upstream.c - per-worker upstream pools, passive health and proxied calls.
 *
 * Runs only on the owning worker's thread. The one idea: libevent's
 * evhttp_connection does the HTTP/1.1 work and reconnects by itself; this file
 * decides which connection and which target a request uses, and owns every
 * deadline, because evhttp has one inactivity timeout for connect and read
 * alike. A call's timer first fires at the connect deadline (is the socket
 * connected yet? getpeername says) and then at the call deadline.
 *
 * Connections are freed only from the pool's reaper event, never inside one of
 * evhttp's own callbacks, where the connection may still be on the stack.
 */
#include "gateway/upstream.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/bufferevent.h>
#include <event2/event.h>

#include "gateway/log.h"

typedef struct up_target up_target;
typedef struct up_upstream up_upstream;

typedef struct up_conn {
    struct evhttp_connection *evcon;
    up_target *target;
    struct up_conn *next; /* idle stack or graveyard */
} up_conn;

struct up_target {
    const gw_target *addr;
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
    up_conn *graveyard;
    struct event *reaper;
    unsigned calls;
};

enum { CALL_TIMER_NONE, CALL_TIMER_CONNECT, CALL_TIMER_DEADLINE, CALL_TIMER_DEFERRED };

struct upstream_call {
    upstream_pool_t *pool;
    up_upstream *up;
    enum evhttp_cmd_type cmd;
    char *uri;
    bool idempotent;
    uint64_t deadline_ns; /* the request's */
    uint64_t attempt_start_ns;
    uint64_t attempt_deadline_ns; /* min(request deadline, start + upstream timeout) */
    int attempts;
    up_target *target;
    up_conn *conn;
    struct evhttp_request *ureq;
    struct event *timer;
    int timer_phase;
    bool in_make_request; /* evhttp may fail synchronously; defer then */
    bool cancelling;
    int last_error; /* enum evhttp_request_error, or -1 */
    int deferred_status;
    upstream_fill_fn fill;
    upstream_done_fn done;
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

/* ---- connections ---------------------------------------------------------- */

static void reaper_cb(evutil_socket_t fd, short what, void *arg)
{
    upstream_pool_t *pool = arg;
    while (pool->graveyard) {
        up_conn *c = pool->graveyard;
        pool->graveyard = c->next;
        evhttp_connection_free(c->evcon);
        free(c);
    }
}

static void conn_bury(up_conn *c)
{
    upstream_pool_t *pool = c->target->up->pool;
    c->next = pool->graveyard;
    pool->graveyard = c;
    event_active(pool->reaper, EV_TIMEOUT, 0);
}

static up_conn *conn_get(up_target *t)
{
    up_upstream *u = t->up;
    if (t->idle) {
        up_conn *c = t->idle;
        t->idle = c->next;
        c->next = NULL;
        u->idle_count--;
        return c;
    }
    up_conn *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->target = t;
    c->evcon = evhttp_connection_base_new(u->pool->base, NULL, t->addr->addr, t->addr->port);
    if (!c->evcon) {
        free(c);
        return NULL;
    }
    struct timeval tv = ms_to_tv(u->cfg->timeout_ms + UPSTREAM_EVHTTP_TIMEOUT_SLACK_MS);
    evhttp_connection_set_timeout_tv(c->evcon, &tv);
    evhttp_connection_set_retries(c->evcon, 0);
    evhttp_connection_set_max_body_size(c->evcon, UPSTREAM_MAX_RESPONSE_BYTES);
    evhttp_connection_set_max_headers_size(c->evcon, UPSTREAM_MAX_RESPONSE_HEADER_BYTES);
    return c;
}

/* Back to the idle stack, or to the reaper when the keepalive cap is reached. */
static void conn_put(up_conn *c)
{
    up_upstream *u = c->target->up;
    if ((int)u->idle_count >= u->cfg->keepalive) {
        conn_bury(c);
        return;
    }
    c->next = c->target->idle;
    c->target->idle = c;
    u->idle_count++;
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

static void target_succeeded(up_target *t)
{
    t->fails = 0;
}

static bool target_usable(const up_target *t, uint64_t now)
{
    return t->ejected_until_ns <= now;
}

/* Choose a target other than `exclude`. When every candidate is ejected, a
 * first attempt still gets the one whose ejection ends soonest (so a lone
 * target is never black-holed); a retry gets none. */
static up_target *pick_target(up_upstream *u, const up_target *exclude, uint64_t now)
{
    up_target *best = NULL;
    for (size_t i = 0; i < u->count; i++) {
        up_target *t = &u->targets[(u->rr + i) % u->count];
        if (t == exclude || !target_usable(t, now))
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
    pool->reaper = event_new(base, -1, 0, reaper_cb, pool);
    if (!pool->ups || !pool->reaper)
        goto fail;
    for (size_t i = 0; i < pool->count; i++) {
        up_upstream *u = &pool->ups[i];
        u->cfg = &cfg->upstreams[i];
        u->pool = pool;
        u->count = rt->upstreams[i].count;
        u->targets = calloc(u->count + 1, sizeof *u->targets);
        if (!u->targets)
            goto fail;
        const char *ulabel[1] = {u->cfg->name};
        u->duration = metrics_series(shard, m->upstream_duration, ulabel);
        const char *k1[2] = {u->cfg->name, "connect"}, *k2[2] = {u->cfg->name, "timeout"},
                   *k3[2] = {u->cfg->name, "other"};
        u->err_connect = metrics_series(shard, m->upstream_errors, k1);
        u->err_timeout = metrics_series(shard, m->upstream_errors, k2);
        u->err_other = metrics_series(shard, m->upstream_errors, k3);
        for (size_t j = 0; j < u->count; j++) {
            up_target *t = &u->targets[j];
            t->addr = &rt->upstreams[i].targets[j];
            t->up = u;
            t->eject_timer = evtimer_new(base, eject_timer_cb, t);
            if (!t->eject_timer)
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
            while (t->idle) {
                up_conn *c = t->idle;
                t->idle = c->next;
                evhttp_connection_free(c->evcon);
                free(c);
            }
            if (t->eject_timer)
                event_free(t->eject_timer);
        }
        free(u->targets);
    }
    if (pool->reaper) {
        reaper_cb(-1, 0, pool);
        event_free(pool->reaper);
    }
    free(pool->ups);
    free(pool);
}

/* ---- calls ----------------------------------------------------------------- */

static void call_attempt(upstream_call_t *call, up_target *t);

static void call_free(upstream_call_t *call)
{
    call->pool->calls--;
    if (call->timer)
        event_free(call->timer);
    free(call->uri);
    free(call);
}

/* Free the call, then report: the callback may end the request and with it
 * the generation that owns this pool, so nothing here runs after it. */
static void call_finish(upstream_call_t *call, struct evhttp_request *resp, int status)
{
    const char *target = call->target ? call->target->addr->label : NULL; /* owned by the runtime */
    upstream_done_fn done = call->done;
    void *arg = call->arg;
    call_free(call);
    done(arg, resp, status, target);
}

static void arm_timer(upstream_call_t *call, int phase, uint64_t at_ns)
{
    uint64_t now = gw_now_ns();
    struct timeval tv = ns_to_tv(at_ns > now ? at_ns - now : 0);
    call->timer_phase = phase;
    evtimer_add(call->timer, &tv);
}

/* The attempt ended without an answer: count it, then retry or give up. */
static void attempt_failed(upstream_call_t *call, int status, bool count_against_target)
{
    uint64_t now = gw_now_ns();
    up_target *t = call->target;
    evtimer_del(call->timer);
    call->timer_phase = CALL_TIMER_NONE;
    if (call->conn) {
        conn_put(call->conn); /* evhttp has reset it; it reconnects on next use */
        call->conn = NULL;
    }
    call->ureq = NULL;
    if (t) {
        t->active--;
        if (call->up->duration)
            metrics_histogram_observe(call->up->duration, (double)(now - call->attempt_start_ns) / 1e9);
        if (count_against_target)
            target_failed(t, now);
    }
    metrics_series_t *err =
        status == 504 ? call->up->err_timeout
        : call->last_error == EVREQ_HTTP_DATA_TOO_LONG || call->last_error == EVREQ_HTTP_INVALID_HEADER
            ? call->up->err_other
            : call->up->err_connect;
    if (err && t)
        metrics_counter_add(err, 1);
    if (t && call->idempotent && call->attempts <= call->up->cfg->retries && now < call->deadline_ns) {
        up_target *next = pick_target(call->up, t, now);
        if (next) {
            call_attempt(call, next);
            return;
        }
    }
    call_finish(call, NULL, status);
}

/* Fail the attempt from the event loop rather than from the current stack
 * (inside evhttp_make_request, or before upstream_call_start has returned). */
static void defer_failure(upstream_call_t *call, int status)
{
    call->deferred_status = status;
    call->timer_phase = CALL_TIMER_DEFERRED;
    event_active(call->timer, EV_TIMEOUT, 0);
}

static int status_for_error(int error)
{
    return error == EVREQ_HTTP_TIMEOUT ? 504 : 502;
}

static void ureq_error_cb(enum evhttp_request_error error, void *arg)
{
    upstream_call_t *call = arg;
    call->last_error = (int)error;
}

static void ureq_done_cb(struct evhttp_request *resp, void *arg)
{
    upstream_call_t *call = arg;
    if (call->cancelling)
        return;
    if (!resp || evhttp_request_get_response_code(resp) == 0) {
        int status = status_for_error(call->last_error);
        bool blame = call->last_error != EVREQ_HTTP_DATA_TOO_LONG;
        if (call->in_make_request) {
            call->ureq = NULL; /* evhttp has freed it */
            defer_failure(call, status);
            return;
        }
        attempt_failed(call, status, blame);
        return;
    }
    uint64_t now = gw_now_ns();
    evtimer_del(call->timer);
    call->target->active--;
    target_succeeded(call->target);
    if (call->up->duration)
        metrics_histogram_observe(call->up->duration, (double)(now - call->attempt_start_ns) / 1e9);
    conn_put(call->conn);
    call->conn = NULL;
    call->ureq = NULL;
    call_finish(call, resp, 0);
}

static bool conn_is_connected(up_conn *c)
{
    struct bufferevent *bev = evhttp_connection_get_bufferevent(c->evcon);
    evutil_socket_t fd = bev ? bufferevent_getfd(bev) : -1;
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    return fd >= 0 && getpeername(fd, (struct sockaddr *)&ss, &len) == 0;
}

/* Give up on the attempt in flight: evhttp resets its connection. */
static void abandon_attempt(upstream_call_t *call)
{
    if (!call->ureq)
        return;
    call->cancelling = true;
    evhttp_cancel_request(call->ureq);
    call->cancelling = false;
    call->ureq = NULL;
}

static void call_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    upstream_call_t *call = arg;
    switch (call->timer_phase) {
    case CALL_TIMER_DEFERRED:
        attempt_failed(call, call->deferred_status, call->deferred_status != 502 || call->last_error != -1);
        return;
    case CALL_TIMER_CONNECT:
        if (conn_is_connected(call->conn)) {
            arm_timer(call, CALL_TIMER_DEADLINE, call->attempt_deadline_ns);
            return;
        }
        call->last_error = -1;
        abandon_attempt(call);
        attempt_failed(call, 504, true);
        return;
    case CALL_TIMER_DEADLINE:
        call->last_error = EVREQ_HTTP_TIMEOUT;
        abandon_attempt(call);
        attempt_failed(call, 504, true);
        return;
    default:
        return;
    }
}

static void call_attempt(upstream_call_t *call, up_target *t)
{
    uint64_t now = gw_now_ns();
    call->attempts++;
    call->target = t;
    call->last_error = -1;
    call->attempt_start_ns = now;
    uint64_t attempt_deadline = now + (uint64_t)call->up->cfg->timeout_ms * 1000000ULL;
    call->attempt_deadline_ns = attempt_deadline < call->deadline_ns ? attempt_deadline : call->deadline_ns;
    t->active++;

    call->conn = conn_get(t);
    call->ureq = call->conn ? evhttp_request_new(ureq_done_cb, call) : NULL;
    if (!call->ureq) {
        gw_error("upstream %s: out of memory starting a request", call->up->cfg->name);
        defer_failure(call, 502);
        return;
    }
    evhttp_request_set_error_cb(call->ureq, ureq_error_cb);
    call->fill(call->arg, call->ureq);

    uint64_t connect_deadline = now + (uint64_t)call->up->cfg->connect_timeout_ms * 1000000ULL;
    if (connect_deadline < call->attempt_deadline_ns)
        arm_timer(call, CALL_TIMER_CONNECT, connect_deadline);
    else
        arm_timer(call, CALL_TIMER_DEADLINE, call->attempt_deadline_ns);

    call->in_make_request = true;
    int rc = evhttp_make_request(call->conn->evcon, call->ureq, call->cmd, call->uri);
    call->in_make_request = false;
    if (rc != 0 && call->timer_phase != CALL_TIMER_DEFERRED) {
        /* The connect could not even start (no socket: EMFILE and the like).
         * evhttp dequeued the request without freeing it. */
        evhttp_request_free(call->ureq);
        call->ureq = NULL;
        defer_failure(call, 502);
    }
}

upstream_call_t *upstream_call_start(upstream_pool_t *pool, size_t index, enum evhttp_cmd_type cmd,
                                     const char *uri, bool idempotent, uint64_t deadline_ns,
                                     upstream_fill_fn fill, upstream_done_fn done, void *arg)
{
    upstream_call_t *call = calloc(1, sizeof *call);
    if (!call)
        return NULL;
    call->pool = pool;
    call->up = &pool->ups[index];
    call->cmd = cmd;
    call->uri = strdup(uri);
    call->idempotent = idempotent;
    call->deadline_ns = deadline_ns;
    call->fill = fill;
    call->done = done;
    call->arg = arg;
    call->timer = evtimer_new(pool->base, call_timer_cb, call);
    if (!call->uri || !call->timer) {
        if (call->timer)
            event_free(call->timer);
        free(call->uri);
        free(call);
        return NULL;
    }
    pool->calls++;
    up_target *t = pick_target(call->up, NULL, gw_now_ns());
    if (t)
        call_attempt(call, t);
    else
        defer_failure(call, 502); /* no targets at all */
    return call;
}

void upstream_call_cancel(upstream_call_t *call)
{
    if (!call)
        return;
    evtimer_del(call->timer);
    abandon_attempt(call);
    if (call->conn) {
        conn_put(call->conn);
        call->conn = NULL;
    }
    if (call->target)
        call->target->active--;
    call_free(call);
}

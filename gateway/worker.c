/*
 * worker.c - a worker thread and the request pipeline it runs.
 *
 * Every function here runs on the worker's own thread, except
 * the gw_worker_* life-cycle and mailbox calls, which the main thread calls. The
 * pipeline for one request: built-in endpoints, limits, route match (404/405),
 * request id and traceparent, then the backend (the route's upstream); the
 * answer is counted in the worker's metrics shard and written to its access log.
 *
 * Generations: a request pins the worker's generation (the runtime it started
 * with and this worker's upstream pools for it) until it ends, so a reload swaps
 * configuration for new requests without disturbing those in flight and without
 * a lock.
 */
#include "gateway/worker.h"

#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <sys/queue.h>

#include <event2/http_struct.h> /* the request's HTTP version (a streamed answer to HTTP/1.0) */
#include <event2/keyvalq_struct.h>
#include <event2/listener.h>

#include "cache/key.h"
#include "cache/rstore.h"
#include "gateway/compress.h"
#include "gateway/http1.h"
#include "gateway/httputil.h"
#include "gateway/log.h"
#include "gateway/sockio.h"
#include "gateway/sqlroute.h"
#include "gateway/upstream.h"
#include "ratelimit/rlredis.h"

typedef struct worker_gen {
    gw_runtime *rt;
    upstream_pool_t *ups;
    metrics_series_t **route_duration; /* per route */
    metrics_series_t **cache_series;   /* per route and CACHE_RESULT_*, made on first use */
    metrics_series_t *unmatched_duration;
    /* The http_requests_total series counted last, with its route, method and
     * status: a run of alike answers skips the label hashing. (Series live
     * as long as the worker's shard.) */
    metrics_series_t *last_requests;
    int last_route;
    unsigned last_method;
    int last_status;
    unsigned refs; /* the worker's own + one per request in flight */
    struct worker_gen *next_dead;
} worker_gen;

typedef struct gw_request gw_request;

/* One client connection. Its read timer bounds the time to read a whole request
 * (server.read_timeout): armed when the connection opens and after each answer,
 * stopped when a request has been read. evhttp's own timeout only measures the
 * gap between two reads, which a client trickling bytes never exceeds. */
typedef struct gw_conn {
    gw_worker *w;
    struct evhttp_connection *evcon;
    struct event *read_timer;
    bool replying; /* an answer is being written (counts in w->replying) */

    /* Direct I/O (plain HTTP; see client_pump): the socket is ours, evhttp
     * only sees the bufferevent's buffers. fd is -1 when evhttp's bufferevent
     * does the I/O itself (TLS, or GATEWAY_DIRECT_IO=0). */
    int fd;
    struct bufferevent *bev;
    struct event *io;
    bool readable, writable; /* edges seen and not yet used up */
    bool peer_closed;        /* EV_CLOSED seen: read to the end, no edge will follow */
    bool eof_pending;        /* the client closed while evhttp was not reading: tell it later */
    bool later;              /* on w->later: yielded, to be pumped after the next poll */
    struct gw_conn *next_later;
    bool dirty;  /* on w->dirty: output to write */
    bool closed; /* evhttp freed the connection; waits for the reaper */
    struct gw_conn *next_dirty, *next_dead;
    gw_request *stream; /* streaming its answer here: told when evhttp closes the connection */

    /* Our own server side (plain HTTP with direct I/O; see "own server side"
     * below): requests are parsed and answered here, evhttp only keeps the
     * connection object (its peer address, its close callback). */
    bool own;
    int own_state;                  /* OWN_READING, ... */
    bool own_close;                 /* close once the answer is out */
    bool own_chunked;               /* the streamed answer has chunked framing */
    bool own_continue_sent;         /* 100 Continue went for this request */
    http1_request *parser;          /* this connection's request parser */
    struct evhttp_request *own_req; /* the request being answered, ours until the answer is out */
    void (*own_chunk_cb)(struct evhttp_connection *, void *); /* once the output is written */
    void *own_chunk_arg;
    bool data_waiting;      /* seen (peeked) while an answer streamed: read it after the answer */
    uint64_t linger_end_ns; /* OWN_LINGERING: no later than this */
} gw_conn;

/* What an own-server connection is doing. */
enum {
    OWN_READING,   /* reading (and parsing) a request */
    OWN_BUSY,      /* on_request has the request; no answer yet */
    OWN_STREAMING, /* the answer's head went; pieces follow */
    OWN_REPLIED,   /* the whole answer is queued: done once it is written */
    OWN_CLOSING,   /* an error answer is queued: close once it is written */
    OWN_LINGERING  /* written and shut down for writing: what the client still sends is
                    * read and dropped until it closes or OWN_LINGER_MS pass */
};

/* How long a connection closed after an error answer (or with a request still
 * arriving) reads and drops what the client still sends: closing at once with
 * unread bytes makes the kernel send a reset, which can destroy the answer
 * before the client has read it (nginx's lingering_close, lingering_timeout
 * and lingering_time). OWN_LINGER_MS between two reads, OWN_LINGER_MAX_MS in
 * all. */
#define OWN_LINGER_MS 2000
#define OWN_LINGER_MAX_MS 30000

/* Answering a request, whichever server side read it: evhttp's (TLS, or
 * GATEWAY_OWN_HTTP=0) or ours. Same contracts as the evhttp_send_* calls. */
static void gw_reply(struct evhttp_request *req, int status, const char *reason, struct evbuffer *body);
static void gw_reply_start(struct evhttp_request *req, int status, const char *reason);
static void gw_reply_chunk(struct evhttp_request *req, struct evbuffer *buf,
                           void (*cb)(struct evhttp_connection *, void *), void *arg);
static void gw_reply_end(struct evhttp_request *req);
static void on_request(struct evhttp_request *req, void *arg);
static void client_pump_own(gw_conn *c);

/* Open addressing by evhttp_connection pointer, linear probing, backward-shift
 * deletion; grows at half load. */
typedef struct conn_table {
    gw_conn **slots;
    size_t cap; /* power of two, or 0 */
    size_t count;
} conn_table;

static size_t conn_home(const conn_table *t, const void *key)
{
    return (size_t)(((uint64_t)(uintptr_t)key * 0x9E3779B97F4A7C15ULL) >> 32) & (t->cap - 1);
}

static gw_conn *conn_find(const conn_table *t, const struct evhttp_connection *evcon)
{
    if (!t->cap || !evcon)
        return NULL;
    for (size_t i = conn_home(t, evcon);; i = (i + 1) & (t->cap - 1)) {
        if (!t->slots[i])
            return NULL;
        if (t->slots[i]->evcon == evcon)
            return t->slots[i];
    }
}

static int conn_insert(conn_table *t, gw_conn *c)
{
    if ((t->count + 1) * 2 > t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 256;
        gw_conn **slots = calloc(cap, sizeof *slots);
        if (!slots)
            return -1;
        conn_table grown = {slots, cap, 0};
        for (size_t i = 0; i < t->cap; i++)
            if (t->slots[i])
                conn_insert(&grown, t->slots[i]);
        free(t->slots);
        *t = grown;
    }
    size_t i = conn_home(t, c->evcon);
    while (t->slots[i])
        i = (i + 1) & (t->cap - 1);
    t->slots[i] = c;
    t->count++;
    return 0;
}

static void conn_remove(conn_table *t, const gw_conn *c)
{
    if (!t->cap)
        return;
    size_t i = conn_home(t, c->evcon);
    while (t->slots[i] && t->slots[i] != c)
        i = (i + 1) & (t->cap - 1);
    if (!t->slots[i])
        return;
    t->slots[i] = NULL;
    t->count--;
    for (size_t j = (i + 1) & (t->cap - 1); t->slots[j]; j = (j + 1) & (t->cap - 1)) {
        size_t home = conn_home(t, t->slots[j]->evcon);
        /* Move slots[j] into the hole at i unless its home lies in (i, j]. */
        bool stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            t->slots[i] = t->slots[j];
            t->slots[j] = NULL;
            i = j;
        }
    }
}

#define FLIGHT_BUCKETS 256
enum { CACHE_RESULT_HIT, CACHE_RESULT_MISS, CACHE_RESULT_BYPASS, CACHE_RESULT_STALE, CACHE_RESULTS };
#define INVAL_RETRY_MAX 64
#define INVAL_RETRY_MIN_MS 100
#define INVAL_RETRY_MAX_MS 2000
#define INVAL_HOLD_MAX_MS 1000 /* longest a write's answer waits for its invalidations in Redis */

struct gw_worker {
    int id;
    gw_server *srv;
    pthread_t thread;
    bool started;
    struct event_base *base;
    struct evhttp *http;
    struct evconnlistener **listeners;
    struct evhttp_bound_socket **bound;
    size_t listen_count;
    bool listening;

    int mailbox_fd;
    struct event *mailbox_ev;
    _Atomic(gw_runtime *) mailbox_rt;
    atomic_uint mailbox_bits;

    worker_gen *gen;
    pool_t *pool;                           /* PostgreSQL connections: outlive generations */
    rl_redis *rlr;                          /* the rate limiter's Redis client */
    cache_rstore *cstore;                   /* the response cache's Redis client */
    uint64_t cstore_errors_seen;            /* of cache_rstore_errors(), already counted */
    struct flight *flights[FLIGHT_BUCKETS]; /* cache misses being fetched, by key */
    char *inval_retry[INVAL_RETRY_MAX];     /* patterns Redis could not delete yet */
    size_t inval_retry_count;
    struct event *inval_retry_timer;
    int inval_retry_ms; /* backoff */
    gw_compressor *comp;
    metrics_shard_t *shard;
    metrics_series_t *in_flight_gauge;
    gw_access_log_t *access;
    gw_rng rng;

    struct bufferevent **pending; /* accepted, not yet known as a gw_conn */
    size_t pending_count, pending_cap;
    struct event *pending_ev;
    conn_table conns;                    /* evhttp_connection -> gw_conn */
    bool direct_io;                      /* take plain client sockets over (client_pump) */
    bool own_http;                       /* and parse and answer their requests ourselves */
    gw_conn *dirty, *dead;               /* connections to write to / to free */
    struct event *flush_ev;              /* writes dirty connections, then frees dead ones */
    gw_conn *later;                      /* connections that yielded with work left */
    bool in_flush;                       /* flush_cb or later_cb is running */
    struct event *later_timer;           /* zero timeout: runs after the next epoll_wait */
    const struct timeval *read_deadline; /* common timeout of server.read_timeout */
    size_t input_high; /* client bytes read ahead of evhttp before we stop (see client_pump) */
    unsigned replying; /* connections writing an answer */

    worker_gen *dead_gens; /* released inside evhttp callbacks; freed by gen_reaper */
    struct event *gen_reaper;

    gw_request *requests; /* in flight, for a forced stop */
    unsigned in_flight;
    bool draining;
    uint64_t drain_deadline_ns;
    struct event *drain_timer;
};

/* Identical concurrent cache misses on one worker: the first (the leader)
 * fetches, the others (followers) wait for its entry, at most
 * cache.lock_timeout. */
typedef struct flight {
    struct flight *next; /* in its bucket */
    gw_request *leader;
    gw_request *followers; /* linked by wait_next */
    struct event *timer;   /* lock_timeout: the followers stop waiting */
    bool listed;           /* in w->flights (new requests join it) */
    uint64_t hash;
    size_t key_len;
    char key[];
} flight;

/* One of a write's invalidations in Redis. */
typedef struct inval_wait {
    gw_request *r;
    cache_rstore_op *op;
    char *pattern; /* as sent, for a retry */
} inval_wait;

struct gw_request {
    gw_request *prev, *next;
    gw_worker *w;
    worker_gen *gen;
    struct evhttp_request *req;
    int route_index;
    unsigned method;
    const char *path; /* borrowed from req's parsed uri: only while on_request runs */
    char *log_path;   /* owned copy for the access log (req may be freed before the end) */
    upstream_call_t *call;
    pool_call *sql_call;
    sqlroute_params sql;
    router_match match;     /* the route's match (SQL params point into the request's path) */
    struct gw_rl_state *rl; /* rate-limit decisions, while Redis answers */
    bool limit_shown;       /* our RateLimit-* are in the answer (the upstream's are dropped) */
    const char *upstream_name;
    uint64_t start_ns;
    int status;
    size_t bytes;
    bool retry_body;          /* body may be sent twice: reference, don't move */
    char *uri_owned;          /* the upstream request-target when it had to be built */
    struct gw_stream *stream; /* the upstream's answer streams (see stream_head) */
    /* response cache */
    char *cache_key; /* a GET/HEAD the cache applies to; NULL otherwise */
    size_t cache_key_len;
    const char *cache_bypass;     /* why the cache was skipped (Cache-Status detail), or NULL */
    cache_entry *stale;           /* an expired entry to serve if the backend fails (stale_if_error) */
    cache_rstore_op *cache_op;    /* the Redis lookup in flight */
    flight *flight;               /* the flight this request leads */
    flight *waiting;              /* the flight this request follows */
    gw_request *wait_next;        /* next follower of the same flight */
    uint64_t cache_epoch;         /* the memory store's invalidation epoch when the miss began */
    bool cache_refresh;           /* fetching for an expired entry (served stale to others) */
    bool cache_counted;           /* in gateway_cache_requests_total already */
    bool cache_key_ambiguous;     /* a header the key names came more than once */
    bool cluster_lock;            /* holds the key's cluster-wide fill lock (coalesce: cluster) */
    char lock_token[33];          /* its value: 32 random hex digits */
    struct event *cache_poll;     /* coalesce: cluster: the next look for another instance's entry */
    int cache_poll_ms;            /* its backoff */
    uint64_t cache_poll_until_ns; /* lock_timeout: then fetch anyway */
    struct inval_wait *inval;     /* a write's invalidations in Redis, while its answer waits */
    size_t inval_count, inval_pending;
    struct evbuffer *held_body; /* the answer that waits for them */
    int held_status;
    char *held_reason;
    struct event *hold_timer; /* INVAL_HOLD_MAX_MS */
    char request_id[GW_REQUEST_ID_MAX + 1];
    char traceparent[GW_TRACEPARENT_LEN + 1];
    char client[INET6_ADDRSTRLEN];
};

static void limit_state_free(gw_request *r);
static void cache_request_end(gw_request *r);
static void cache_request_drop(gw_request *r);
static void stream_free(gw_request *r);
static void stream_client_gone(gw_request *r);

/* ---- generations ------------------------------------------------------------ */

static void gen_free(worker_gen *g)
{
    upstream_pool_free(g->ups);
    free(g->route_duration);
    free(g->cache_series);
    gw_runtime_unref(g->rt);
    free(g);
}

static void gen_reaper_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_worker *w = arg;
    while (w->dead_gens) {
        worker_gen *g = w->dead_gens;
        w->dead_gens = g->next_dead;
        gen_free(g);
    }
}

/* Drop a reference. The last one frees the generation at once, or, when the
 * caller is inside one of evhttp's callbacks (deferred), from the reaper
 * event: the pool's connections may be on the stack. */
static void gen_unref(gw_worker *w, worker_gen *g, bool deferred)
{
    if (!g || --g->refs > 0)
        return;
    if (!deferred || !w->gen_reaper) {
        gen_free(g);
        return;
    }
    g->next_dead = w->dead_gens;
    w->dead_gens = g;
    event_active(w->gen_reaper, EV_TIMEOUT, 0);
}

static worker_gen *gen_create(gw_worker *w, gw_runtime *rt)
{
    const gw_metrics *m = &w->srv->metrics;
    worker_gen *g = calloc(1, sizeof *g);
    if (!g)
        return NULL;
    g->refs = 1;
    g->rt = rt;
    g->route_duration = calloc(rt->cfg->route_count + 1, sizeof *g->route_duration);
    g->cache_series = calloc(rt->cfg->route_count * CACHE_RESULTS + 1, sizeof *g->cache_series);
    g->ups = upstream_pool_create(w->base, rt, w->shard, m);
    if (!g->route_duration || !g->cache_series || !g->ups) {
        upstream_pool_free(g->ups);
        free(g->route_duration);
        free(g->cache_series);
        free(g);
        return NULL;
    }
    for (size_t i = 0; i < rt->cfg->route_count; i++) {
        const char *labels[1] = {rt->cfg->routes[i].name};
        g->route_duration[i] = metrics_series(w->shard, m->request_duration, labels);
    }
    const char *unmatched[1] = {"_unmatched"};
    g->unmatched_duration = metrics_series(w->shard, m->request_duration, unmatched);
    return g;
}

static void apply_http_settings(gw_worker *w, const config_t *cfg)
{
    struct timeval tv = {(time_t)(cfg->server.read_timeout_ms / 1000),
                         (suseconds_t)(cfg->server.read_timeout_ms % 1000) * 1000};
    evhttp_set_timeout_tv(w->http, &tv);
    w->read_deadline = event_base_init_common_timeout(w->base, &tv);
    evhttp_set_max_headers_size(w->http,
                                (ev_ssize_t)(cfg->server.max_header_bytes * GW_HEADER_HARD_LIMIT_FACTOR));
    evhttp_set_max_body_size(w->http,
                             (ev_ssize_t)(cfg->server.max_body_bytes + GW_BODY_HARD_LIMIT_SLACK_BYTES));
    /* evhttp takes a Content-Length body out of the input only once all of it
     * is there, so the read-ahead bound must hold the largest request it
     * accepts, and no more. */
    w->input_high = (size_t)(cfg->server.max_header_bytes * GW_HEADER_HARD_LIMIT_FACTOR +
                             cfg->server.max_body_bytes + GW_BODY_HARD_LIMIT_SLACK_BYTES);
}

static void rl_log(config_log_level level, const char *message)
{
    gw_log(level, NULL, "%s", message);
}

/* The rate limiter's Redis client follows redis: when the store is redis. */
static void configure_redis(gw_worker *w, const config_t *cfg)
{
    config_redis off = {0};
    bool used = cfg->ratelimit.store == CONFIG_STORE_REDIS && cfg->ratelimit.policy_count > 0;
    rl_redis_configure(w->rlr, used ? &cfg->redis : &off);
    config_t cached = *cfg;
    if (cfg->cache.store != CONFIG_STORE_REDIS)
        cached.redis = off;
    cache_rstore_configure(w->cstore, &cached);
}

static void install_runtime(gw_worker *w, gw_runtime *rt)
{
    worker_gen *g = gen_create(w, rt);
    if (!g) {
        gw_error("worker %d: out of memory installing configuration %lu; keeping the old one", w->id,
                 rt->generation);
        gw_runtime_unref(rt);
        return;
    }
    worker_gen *old = w->gen;
    w->gen = g;
    apply_http_settings(w, rt->cfg);
    pool_configure(w->pool, rt->cfg);
    configure_redis(w, rt->cfg);
    gen_unref(w, old, false);
}

/* ---- answers ---------------------------------------------------------------- */

size_t gw_send_json_error(struct evhttp_request *req, int status, const char *text, const char *request_id)
{
    struct evbuffer *body = evbuffer_new();
    if (body)
        gw_error_body(body, status, text, request_id);
    struct evkeyvalq *oh = evhttp_request_get_output_headers(req);
    evhttp_remove_header(oh, "Content-Type");
    evhttp_add_header(oh, "Content-Type", "application/json");
    /* libevent 2.1's phrase table stops short of these. */
    const char *reason = status == 431   ? "Request Header Fields Too Large"
                         : status == 429 ? "Too Many Requests"
                                         : NULL;
    size_t len = body ? evbuffer_get_length(body) : 0;
    gw_reply(req, status, reason, body);
    if (body)
        evbuffer_free(body);
    return len;
}

static void request_end(gw_request *r)
{
    gw_worker *w = r->w;
    const gw_metrics *m = &w->srv->metrics;
    double seconds = (double)(gw_now_ns() - r->start_ns) / 1e9;
    const config_t *cfg = r->gen->rt->cfg;
    const char *route = r->route_index >= 0 ? cfg->routes[r->route_index].name : "_unmatched";
    worker_gen *g = r->gen;
    metrics_series_t *s = g->last_requests;
    if (!s || g->last_route != r->route_index || g->last_method != r->method || g->last_status != r->status) {
        char code[4] = {(char)('0' + r->status / 100 % 10), (char)('0' + r->status / 10 % 10),
                        (char)('0' + r->status % 10), '\0'};
        const char *labels[3] = {route, gw_method_name(r->method), code};
        s = metrics_series(w->shard, m->requests_total, labels);
        g->last_requests = s;
        g->last_route = r->route_index;
        g->last_method = r->method;
        g->last_status = r->status;
    }
    if (s)
        metrics_counter_add(s, 1);
    metrics_series_t *d =
        r->route_index >= 0 ? r->gen->route_duration[r->route_index] : r->gen->unmatched_duration;
    if (d)
        metrics_histogram_observe(d, seconds);
    if (w->in_flight_gauge)
        metrics_gauge_add(w->in_flight_gauge, -1);
    if (cfg->log.access && w->access) {
        gw_access_entry e = {.request_id = r->request_id,
                             .route = route,
                             .method = gw_method_name(r->method),
                             .path = r->log_path ? r->log_path : "-",
                             .client = r->client,
                             .upstream = r->upstream_name,
                             .status = r->status,
                             .bytes = r->bytes,
                             .duration_ms = seconds * 1000.0};
        gw_access_log_write(w->access, &e);
    }
    if (r->prev)
        r->prev->next = r->next;
    else
        w->requests = r->next;
    if (r->next)
        r->next->prev = r->prev;
    w->in_flight--;
    gen_unref(w, r->gen, true);
    limit_state_free(r);
    cache_request_end(r);
    stream_free(r);
    sqlroute_params_free(&r->sql);
    free(r->uri_owned);
    free(r->log_path);
    free(r);
}

/* While draining, every answer asks the client to go away. */
static void add_drain_header(gw_request *r)
{
    if (r->w->draining) {
        struct evkeyvalq *oh = evhttp_request_get_output_headers(r->req);
        evhttp_remove_header(oh, "Connection");
        evhttp_add_header(oh, "Connection", "close");
    }
}

static void add_common_headers(gw_request *r)
{
    struct evkeyvalq *oh = evhttp_request_get_output_headers(r->req);
    evhttp_remove_header(oh, "X-Request-Id");
    evhttp_add_header(oh, "X-Request-Id", r->request_id);
    add_drain_header(r);
}

/* Answer with a JSON error and end the request. close: the connection's
 * framing is not to be trusted after it (or, for CONNECT, a client may expect
 * a tunnel): close it. */
static void respond_error_close(gw_request *r, int status, const char *text, bool close)
{
    struct evkeyvalq *oh = evhttp_request_get_output_headers(r->req);
    if (close || r->method == CONFIG_METHOD_CONNECT)
        evhttp_add_header(oh, "Connection", "close");
    add_common_headers(r);
    r->status = status;
    r->bytes = gw_send_json_error(r->req, status, text, r->request_id);
    if (r->method == CONFIG_METHOD_HEAD)
        r->bytes = 0;
    request_end(r);
}

static void respond_error(gw_request *r, int status, const char *text)
{
    respond_error_close(r, status, text, status == 413 || status == 431 || status == 400);
}

/* ---- response cache --------------------------------------------------------------- */

#define CACHE_KEY_MAX 2048

static void fetch(gw_request *r);

/* How an entry is served, for X-Cache, Cache-Status and the metrics. */
typedef enum serve_kind {
    SERVE_HIT,       /* fresh, found */
    SERVE_COLLAPSED, /* fresh, fetched by the request this one waited for */
    SERVE_STALE_SWR, /* expired, within stale_while_revalidate, while another request refreshes it */
    SERVE_STALE_ERR, /* expired, within stale_if_error, the backend failed */
    SERVE_MISS,      /* fetched now and stored */
    SERVE_REFRESH,   /* fetched now for an expired entry, and stored */
} serve_kind;

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void count_cache(gw_request *r, int result)
{
    metrics_series_t **slot = &r->gen->cache_series[(size_t)r->route_index * CACHE_RESULTS + (size_t)result];
    if (!*slot) {
        static const char *const names[CACHE_RESULTS] = {"hit", "miss", "bypass", "stale"};
        const char *labels[2] = {r->gen->rt->cfg->routes[r->route_index].name, names[result]};
        *slot = metrics_series(r->w->shard, r->w->srv->metrics.cache_requests, labels);
    }
    if (*slot)
        metrics_counter_add(*slot, 1);
}

/* gateway_cache_store_errors_total follows the Redis client's own count. */
static void sync_store_errors(gw_worker *w)
{
    uint64_t n = cache_rstore_errors(w->cstore);
    if (n == w->cstore_errors_seen)
        return;
    metrics_series_t *s = metrics_series(w->shard, w->srv->metrics.cache_store_errors, NULL);
    if (s)
        metrics_counter_add(s, (double)(n - w->cstore_errors_seen));
    w->cstore_errors_seen = n;
}

static const char *key_path_param(void *arg, const char *name, size_t name_len, size_t *value_len)
{
    gw_request *r = arg;
    for (size_t i = 0; i < r->match.param_count; i++) {
        const router_param *p = &r->match.params[i];
        if (p->name_len == name_len && memcmp(p->name, name, name_len) == 0) {
            *value_len = p->value_len;
            return p->value;
        }
    }
    return NULL;
}

/* A header the key names. Sent more than once, it cannot make a key: the
 * upstream sees every line, the key only one, so one client could store an
 * answer under another's key (the request bypasses the cache). */
static const char *key_header(void *arg, const char *name)
{
    gw_request *r = arg;
    const char *first = NULL;
    const struct evkeyval *kv;
    TAILQ_FOREACH(kv, evhttp_request_get_input_headers(r->req), next)
    {
        if (strcasecmp(kv->key, name) != 0)
            continue;
        if (first)
            r->cache_key_ambiguous = true;
        else
            first = kv->value;
    }
    return first;
}

static void key_source(gw_request *r, cache_key_source *src)
{
    const struct evhttp_uri *u = evhttp_request_get_evhttp_uri(r->req);
    const char *path = u ? evhttp_uri_get_path(u) : NULL;
    src->method = gw_method_name(r->method);
    src->path = path && *path ? path : "/";
    src->query = u ? evhttp_uri_get_query(u) : NULL;
    src->path_param = key_path_param;
    src->header = key_header;
    src->arg = r;
}

/* Does one of the route's `unless:` conditions hold? */
static bool cache_unless(gw_request *r, const config_route_cache *rc)
{
    struct evkeyvalq query;
    bool parsed = false, hit = false;
    TAILQ_INIT(&query);
    for (size_t i = 0; i < rc->unless_count && !hit; i++) {
        const config_kv *kv = &rc->unless[i];
        const char *have = NULL;
        if (strcmp(kv->key, "method") == 0) {
            hit = strcasecmp(kv->value, gw_method_name(r->method)) == 0;
            continue;
        }
        if (strncmp(kv->key, "header.", 7) == 0) {
            have = evhttp_find_header(evhttp_request_get_input_headers(r->req), kv->key + 7);
        } else if (strncmp(kv->key, "query.", 6) == 0) {
            if (!parsed) {
                const struct evhttp_uri *u = evhttp_request_get_evhttp_uri(r->req);
                const char *q = u ? evhttp_uri_get_query(u) : NULL;
                parsed = true;
                if (q)
                    evhttp_parse_query_str(q, &query);
            }
            have = evhttp_find_header(&query, kv->key + 6);
        }
        hit = have && strcmp(have, kv->value) == 0;
    }
    evhttp_clear_headers(&query);
    return hit;
}

/* A key goes into the X-Cache-Key header: no control bytes. */
static bool header_safe(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
            return false;
    return true;
}

/* One of the RateLimit-* fields we send (name[0..len), any case): an
 * upstream's own, passed or stored, are dropped where ours are shown. */
static bool is_ratelimit_field(const char *name, size_t len)
{
    return (len == 15 && (strncasecmp(name, "RateLimit-Limit", 15) == 0 ||
                          strncasecmp(name, "RateLimit-Reset", 15) == 0)) ||
           (len == 19 && strncasecmp(name, "RateLimit-Remaining", 19) == 0);
}

static void entry_body_cleanup(const void *data, size_t len, void *arg)
{
    cache_entry_unref(arg);
}

/* Append "Name: value" to a header block being built (lines joined by CRLF). */
static void block_line(struct evbuffer *b, const char *name, const char *value, size_t value_len)
{
    if (evbuffer_get_length(b))
        evbuffer_add(b, "\r\n", 2);
    evbuffer_add_printf(b, "%s: ", name);
    evbuffer_add(b, value, value_len);
}

/* The block becomes ONE output entry, its first line's name the key (see
 * pass_response_fields for why). */
static void block_install(gw_request *r, struct evbuffer *b)
{
    struct evkeyvalq *oh = evhttp_request_get_output_headers(r->req);
    evbuffer_add(b, "", 1);
    char *all = (char *)evbuffer_pullup(b, -1);
    char *colon = all ? strchr(all, ':') : NULL;
    struct evkeyval *kv = colon ? calloc(1, sizeof *kv) : NULL;
    if (kv) {
        kv->key = strndup(all, (size_t)(colon - all));
        kv->value = strdup(colon + 2);
    }
    if (!kv || !kv->key || !kv->value) {
        if (kv) {
            free(kv->key);
            free(kv->value);
            free(kv);
        }
        evhttp_add_header(oh, "X-Request-Id", r->request_id);
        return;
    }
    TAILQ_INSERT_TAIL(oh, kv, next);
}

/* X-Cache, X-Cache-Key and Cache-Status of an answer that was not served
 * from an entry (a miss not stored, a bypass). */
static void cache_headers_plain(gw_request *r, struct evbuffer *b)
{
    const char *x = r->cache_bypass ? "BYPASS" : "MISS";
    block_line(b, "X-Cache", x, strlen(x));
    if (r->cache_key)
        block_line(b, "X-Cache-Key", r->cache_key, r->cache_key_len);
    char status[96];
    int n = r->cache_bypass
                ? snprintf(status, sizeof status, "gateway; fwd=bypass; detail=%s", r->cache_bypass)
                : snprintf(status, sizeof status, "gateway; fwd=%s", r->stale ? "stale" : "uri-miss");
    block_line(b, "Cache-Status", status, (size_t)n);
}

/* The variant of e this client takes. */
static cache_variant entry_variant(gw_request *r, const cache_entry *e)
{
    const config_compression *cc = &r->gen->rt->cfg->compression;
    if (!(e->flags & CACHE_ENTRY_VARY_AE) || !cc->enabled)
        return CACHE_IDENTITY;
    gw_encoding prefs[2], have[2];
    size_t n = gw_compress_prefs(cc, prefs), k = 0;
    for (size_t i = 0; i < n; i++)
        if (e->body[prefs[i]])
            have[k++] = prefs[i];
    if (!k)
        return CACHE_IDENTITY;
    char joined[1024];
    const char *ae = gw_accept_encoding_of(evhttp_request_get_input_headers(r->req), joined, sizeof joined);
    return (cache_variant)gw_encoding_choose(ae, have, k, NULL);
}

/* A header block being built: "Name: value" lines joined by CRLF, in one
 * allocation sized up front (a hit's header work is a few memcpy). */
typedef struct hblock {
    char *p;
    size_t len, cap;
} hblock;

static void hb_add(hblock *h, const char *s, size_t n)
{
    if (h->p && h->len + n <= h->cap) {
        memcpy(h->p + h->len, s, n);
        h->len += n;
    } else if (h->p) { /* sized wrong: never by more than the fields' length */
        free(h->p);
        h->p = NULL;
    }
}

static void hb_line(hblock *h, const char *name, size_t name_len, const char *value, size_t value_len)
{
    if (h->len)
        hb_add(h, "\r\n", 2);
    hb_add(h, name, name_len);
    hb_add(h, ": ", 2);
    hb_add(h, value, value_len);
}

#define HB_LINE(h, name, value, len) hb_line(h, name, sizeof name - 1, value, len)

/* The value of the stored field name (NUL-free, not terminated), or NULL. */
static const char *entry_field(const cache_entry *e, const char *name, size_t *len)
{
    size_t n = strlen(name);
    for (const char *p = e->fields, *end = e->fields + e->fields_len; p < end;) {
        const char *eol = memchr(p, '\r', (size_t)(end - p));
        if (!eol)
            break;
        if ((size_t)(eol - p) >= n + 2 && strncasecmp(p, name, n) == 0 && p[n] == ':') {
            *len = (size_t)(eol - p - n - 2);
            return p + n + 2;
        }
        p = eol + 2;
    }
    return NULL;
}

/* The next element of an If-None-Match list at *p, spaces trimmed, as
 * [*tag, *end); false at the end of the list. */
static bool next_entity_tag(const char **p, const char **tag, const char **end)
{
    const char *s = *p;
    while (*s == ' ' || *s == '\t' || *s == ',')
        s++;
    if (!*s)
        return false;
    *tag = s;
    while (*s && *s != ',')
        s++;
    const char *e = s;
    while (e > *tag && (e[-1] == ' ' || e[-1] == '\t'))
        e--;
    *end = e;
    *p = s;
    return true;
}

/* Does the request's If-None-Match name the entry's ETag (weak comparison,
 * RFC 9110 13.1.2), or "*"? Then a hit is answered 304, as nginx does. */
static bool entry_not_modified(gw_request *r, const cache_entry *e)
{
    const char *inm = evhttp_find_header(evhttp_request_get_input_headers(r->req), "If-None-Match");
    size_t elen;
    const char *etag = inm ? entry_field(e, "ETag", &elen) : NULL;
    if (!etag)
        return false;
    if (elen >= 2 && strncmp(etag, "W/", 2) == 0) {
        etag += 2;
        elen -= 2;
    }
    const char *p = inm, *tag, *end;
    while (next_entity_tag(&p, &tag, &end)) {
        if (end - tag == 1 && *tag == '*')
            return true;
        if (end - tag >= 2 && strncmp(tag, "W/", 2) == 0)
            tag += 2;
        if ((size_t)(end - tag) == elen && memcmp(tag, etag, elen) == 0)
            return true;
    }
    return false;
}

/* What a 304 repeats of the 200 (RFC 9110 15.4.5). */
static bool field_in_304(const char *name, size_t len)
{
    static const char *const kept[] = {"ETag", "Cache-Control", "Expires", "Vary", "Content-Location"};
    for (size_t i = 0; i < sizeof kept / sizeof kept[0]; i++)
        if (strlen(kept[i]) == len && strncasecmp(kept[i], name, len) == 0)
            return true;
    return false;
}

/* Answer r from e (e keeps its reference; the body is lent to evhttp with one
 * of its own) and end r. A GET or HEAD whose If-None-Match names the entry's
 * ETag gets 304. */
static void serve_entry(gw_request *r, cache_entry *e, serve_kind kind)
{
    bool head = r->method == CONFIG_METHOD_HEAD;
    /* HEAD is answered as an uncached route answers it: the GET's fields,
     * Vary included, uncompressed. */
    cache_variant v = head ? CACHE_IDENTITY : entry_variant(r, e);
    int status = e->status == 200 && entry_not_modified(r, e) ? 304 : e->status;
    bool no_body = status == 204 || status == 304;
    int64_t now = wall_ms();
    int64_t age_ms = now > e->stored_ms ? now - e->stored_ms : 0;
    size_t id_len = strlen(r->request_id);
    hblock h = {malloc(e->fields_len + r->cache_key_len + id_len + 384), 0,
                e->fields_len + r->cache_key_len + id_len + 384};
    struct evbuffer *body = evbuffer_new();
    char *key = strdup(!no_body ? "Content-Length" : "X-Cache");
    struct evkeyval *kv = calloc(1, sizeof *kv);
    if (!h.p || !body || !key || !kv) {
        free(h.p);
        free(key);
        free(kv);
        if (body)
            evbuffer_free(body);
        respond_error(r, 503, "out of memory");
        return;
    }
    static const char *const xcache[] = {"HIT", "HIT", "STALE", "STALE", "MISS", "MISS"};
    char num[160];
    int n;
    /* The entry's key leads: Content-Length (evhttp adds none), or X-Cache for a 204 or 304. */
    if (!no_body) {
        n = snprintf(num, sizeof num, "%zu", e->body_len[v]);
        hb_add(&h, num, (size_t)n);
    } else {
        hb_add(&h, xcache[kind], strlen(xcache[kind]));
    }
    /* The stored fields, a line at a time: a compressed variant weakens a
     * strong ETag and has no byte ranges of its own. */
    for (const char *p = e->fields, *end = e->fields + e->fields_len; p < end;) {
        const char *eol = memchr(p, '\r', (size_t)(end - p));
        if (!eol)
            break;
        const char *colon = memchr(p, ':', (size_t)(eol - p));
        if (colon && colon + 2 <= eol) {
            size_t name_len = (size_t)(colon - p);
            const char *value = colon + 2;
            if (status == 304 && !field_in_304(p, name_len)) {
                /* not repeated */
            } else if (r->limit_shown && is_ratelimit_field(p, name_len)) {
                /* the upstream's, stored with the entry: ours replace them */
            } else if (v == CACHE_IDENTITY) {
                hb_line(&h, p, name_len, value, (size_t)(eol - value));
            } else if (!(name_len == 13 && strncasecmp(p, "Accept-Ranges", 13) == 0)) {
                bool weaken = name_len == 4 && strncasecmp(p, "ETag", 4) == 0 && value < eol && *value == '"';
                hb_line(&h, p, name_len, "W/", weaken ? 2 : 0);
                hb_add(&h, value, (size_t)(eol - value));
            }
        }
        p = eol + 2;
    }
    if (e->flags & CACHE_ENTRY_VARY_AE)
        HB_LINE(&h, "Vary", "Accept-Encoding", 15);
    if (v != CACHE_IDENTITY && status != 304) {
        const char *name = gw_encoding_name((gw_encoding)v);
        HB_LINE(&h, "Content-Encoding", name, strlen(name));
    }
    n = snprintf(num, sizeof num, "%lld", (long long)(age_ms / 1000));
    HB_LINE(&h, "Age", num, (size_t)n);
    if (!no_body)
        HB_LINE(&h, "X-Cache", xcache[kind], strlen(xcache[kind]));
    HB_LINE(&h, "X-Cache-Key", r->cache_key, r->cache_key_len);
    long long ttl = (long long)((e->fresh_ms - age_ms) / 1000);
    switch (kind) {
    case SERVE_HIT:
        n = snprintf(num, sizeof num, "gateway; hit; ttl=%lld", ttl);
        break;
    case SERVE_COLLAPSED:
        n = snprintf(num, sizeof num, "gateway; hit; ttl=%lld; collapsed", ttl);
        break;
    case SERVE_STALE_SWR:
        n = snprintf(num, sizeof num, "gateway; hit; ttl=%lld; detail=stale-while-revalidate", ttl);
        break;
    case SERVE_STALE_ERR:
        n = snprintf(num, sizeof num, "gateway; fwd=stale; ttl=%lld; detail=stale-if-error", ttl);
        break;
    case SERVE_MISS:
        n = snprintf(num, sizeof num, "gateway; fwd=uri-miss; stored");
        break;
    default:
        n = snprintf(num, sizeof num, "gateway; fwd=stale; stored");
    }
    HB_LINE(&h, "Cache-Status", num, (size_t)n);
    HB_LINE(&h, "X-Request-Id", r->request_id, id_len);
    hb_add(&h, "", 1);
    if (!h.p) {
        free(key);
        free(kv);
        evbuffer_free(body);
        respond_error(r, 503, "out of memory");
        return;
    }
    kv->key = key;
    kv->value = h.p;
    TAILQ_INSERT_TAIL(evhttp_request_get_output_headers(r->req), kv, next);
    add_drain_header(r);
    if (!head && !no_body && e->body_len[v] > 0) {
        cache_entry_ref(e);
        if (evbuffer_add_reference(body, e->body[v], e->body_len[v], entry_body_cleanup, e) != 0)
            cache_entry_unref(e);
    }
    static const int result[] = {CACHE_RESULT_HIT,   CACHE_RESULT_HIT,  CACHE_RESULT_STALE,
                                 CACHE_RESULT_STALE, CACHE_RESULT_MISS, CACHE_RESULT_MISS};
    count_cache(r, result[kind]);
    r->cache_counted = true;
    r->status = status;
    r->bytes = head || no_body ? 0 : e->body_len[v];
    gw_reply(r->req, status, NULL, no_body ? NULL : body);
    evbuffer_free(body);
    request_end(r);
}

/* ---- flights: one fetch per key per worker ---- */

static uint64_t key_hash(const char *k, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)k[i]) * 1099511628211ULL;
    return h;
}

static flight *flight_find(gw_worker *w, const char *key, size_t len)
{
    uint64_t h = key_hash(key, len);
    for (flight *f = w->flights[h % FLIGHT_BUCKETS]; f; f = f->next)
        if (f->hash == h && f->key_len == len && memcmp(f->key, key, len) == 0)
            return f;
    return NULL;
}

static void flight_unlist(gw_worker *w, flight *f)
{
    if (!f->listed)
        return;
    f->listed = false;
    for (flight **pp = &w->flights[f->hash % FLIGHT_BUCKETS]; *pp; pp = &(*pp)->next)
        if (*pp == f) {
            *pp = f->next;
            break;
        }
}

/* Followers stop waiting: each fetches on its own. */
static void flight_release(flight *f)
{
    gw_request *q = f->followers;
    f->followers = NULL;
    while (q) {
        gw_request *next = q->wait_next;
        q->waiting = NULL;
        q->wait_next = NULL;
        fetch(q);
        q = next;
    }
}

static void flight_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    flight *f = arg;
    flight_unlist(f->leader->w, f);
    flight_release(f);
}

/* r leads a new flight for its key (no flight when out of memory). */
static void flight_start(gw_request *r)
{
    gw_worker *w = r->w;
    flight *f = calloc(1, sizeof *f + r->cache_key_len);
    if (!f)
        return;
    f->timer = evtimer_new(w->base, flight_timeout_cb, f);
    if (!f->timer) {
        free(f);
        return;
    }
    f->leader = r;
    f->hash = key_hash(r->cache_key, r->cache_key_len);
    f->key_len = r->cache_key_len;
    memcpy(f->key, r->cache_key, r->cache_key_len);
    f->next = w->flights[f->hash % FLIGHT_BUCKETS];
    w->flights[f->hash % FLIGHT_BUCKETS] = f;
    f->listed = true;
    int64_t ms = r->gen->rt->cfg->cache.lock_timeout_ms;
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
    evtimer_add(f->timer, &tv);
    r->flight = f;
}

static void flight_join(gw_request *r, flight *f)
{
    r->waiting = f;
    r->wait_next = f->followers;
    f->followers = r;
}

/* Serve every follower from e (kind), keeping the flight. */
static void flight_serve(flight *f, cache_entry *e, serve_kind kind)
{
    gw_request *q = f->followers;
    f->followers = NULL;
    while (q) {
        gw_request *next = q->wait_next;
        q->waiting = NULL;
        q->wait_next = NULL;
        serve_entry(q, e, kind);
        q = next;
    }
}

/* The leader is done with its flight: followers get e (kind) when there is
 * one, else fetch on their own. */
static void flight_end(gw_request *r, cache_entry *e, serve_kind kind)
{
    flight *f = r->flight;
    if (!f)
        return;
    r->flight = NULL;
    flight_unlist(r->w, f);
    evtimer_del(f->timer);
    if (e)
        flight_serve(f, e, kind);
    else
        flight_release(f);
    event_free(f->timer);
    free(f);
}

/* ---- lookup ---- */

/* Not found (or only an expired copy kept for stale_if_error): fetch, alone
 * or as the leader of this key's flight, or wait for the leader there is. */
static void cache_miss(gw_request *r)
{
    const config_cache *cc = &r->gen->rt->cfg->cache;
    if (!r->flight && cc->coalesce != CONFIG_COALESCE_OFF) {
        flight *f = flight_find(r->w, r->cache_key, r->cache_key_len);
        if (f && f->leader != r) {
            flight_join(r, f);
            return;
        }
        flight_start(r);
    }
    fetch(r);
}

/* An entry was found (e: a reference the request now owns). */
static void cache_consider(gw_request *r, cache_entry *e)
{
    const config_cache *cc = &r->gen->rt->cfg->cache;
    int64_t age = wall_ms() - e->stored_ms;
    if (age < 0)
        age = 0;
    if (age < e->fresh_ms) {
        flight_end(r, e, SERVE_COLLAPSED);
        serve_entry(r, e, SERVE_HIT);
        cache_entry_unref(e);
        return;
    }
    if (age < e->fresh_ms + cc->stale_while_revalidate_ms && age < e->keep_ms) {
        flight *f = r->flight ? r->flight : flight_find(r->w, r->cache_key, r->cache_key_len);
        if (f && f->leader != r) { /* being refreshed: the old copy meanwhile */
            serve_entry(r, e, SERVE_STALE_SWR);
            cache_entry_unref(e);
            return;
        }
        if (f)
            flight_serve(f, e, SERVE_STALE_SWR); /* those waiting on our lookup need not wait more */
        else
            flight_start(r);
        r->cache_refresh = true;
        r->stale = e;
        fetch(r);
        return;
    }
    if (age < e->fresh_ms + cc->stale_if_error_ms && age < e->keep_ms) {
        r->cache_refresh = true;
        r->stale = e;
    } else {
        cache_entry_unref(e);
    }
    cache_miss(r);
}

/* ---- coalesce: cluster ---- */

static void cluster_wait(gw_request *r);

/* A Redis lookup answered: an entry found is served (and copied into the hot
 * tier) unless a write's invalidation Redis has not done yet covers it, then
 * it counts as not found (*st). True when r was handed on. */
static bool redis_answered(gw_request *r, cache_r_status *st, cache_entry *e)
{
    r->cache_op = NULL;
    sync_store_errors(r->w);
    if (*st != CACHE_R_FOUND)
        return false;
    if (cache_mem_pending_blocks(r->w->srv->cache, r->cache_key, r->cache_key_len, e->stored_ms)) {
        cache_entry_unref(e);
        *st = CACHE_R_NOT_FOUND;
        return false;
    }
    if (r->gen->rt->cfg->cache.hot_tier)
        cache_mem_put_since(r->w->srv->cache, r->cache_key, r->cache_key_len, e, r->cache_epoch);
    cache_consider(r, e);
    return true;
}

/* cache_rstore_poll_fn: the entry another instance was fetching, or still
 * its lock, or neither (it let go without storing: fetch alone, as nginx's
 * proxy_cache_lock waiters do). */
static void cluster_polled(void *arg, cache_r_status st, cache_entry *e, bool locked)
{
    gw_request *r = arg;
    if (redis_answered(r, &st, e))
        return;
    if (st == CACHE_R_NOT_FOUND && locked) {
        cluster_wait(r);
        return;
    }
    fetch(r);
}

/* The next look at Redis for the entry another instance is fetching. */
static void cluster_poll_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_request *r = arg;
    if (gw_now_ns() >= r->cache_poll_until_ns) { /* waited lock_timeout: fetch ourselves */
        fetch(r);
        return;
    }
    r->cache_op = cache_rstore_poll(r->w->cstore, r->cache_key, r->cache_key_len, cluster_polled, r);
    if (!r->cache_op)
        fetch(r);
}

static void cluster_wait(gw_request *r)
{
    if (!r->cache_poll && !(r->cache_poll = evtimer_new(r->w->base, cluster_poll_cb, r))) {
        fetch(r);
        return;
    }
    r->cache_poll_ms = r->cache_poll_ms ? r->cache_poll_ms * 2 : 10;
    if (r->cache_poll_ms > 200)
        r->cache_poll_ms = 200;
    struct timeval tv = {0, r->cache_poll_ms * 1000};
    evtimer_add(r->cache_poll, &tv);
}

/* cache_rstore_lock_fn */
static void cluster_locked(void *arg, bool ok, bool acquired)
{
    gw_request *r = arg;
    r->cache_op = NULL;
    sync_store_errors(r->w);
    if (!ok || acquired) {
        r->cluster_lock = acquired;
        fetch(r);
        return;
    }
    cluster_wait(r); /* another instance fetches: look for its entry */
}

/* A miss in Redis with coalesce: cluster: take "<key>:lock" (for
 * lock_timeout) and fetch, or, when another instance holds it, look for its
 * entry with backoff (10 ms doubling to 200 ms) until lock_timeout. */
static void cluster_lock(gw_request *r)
{
    int64_t ms = r->gen->rt->cfg->cache.lock_timeout_ms;
    r->cache_poll_until_ns = gw_now_ns() + (uint64_t)ms * 1000000ULL;
    gw_rng_hex(&r->w->rng, r->lock_token, sizeof r->lock_token / 2);
    r->cache_op =
        cache_rstore_lock(r->w->cstore, r->cache_key, r->cache_key_len, r->lock_token, ms, cluster_locked, r);
    if (!r->cache_op)
        fetch(r);
}

/* cache_rstore_get_fn */
static void cache_redis_got(void *arg, cache_r_status st, cache_entry *e)
{
    gw_request *r = arg;
    if (redis_answered(r, &st, e))
        return;
    if (st == CACHE_R_ERROR) {
        r->cache_bypass = "store-unavailable";
        flight_end(r, NULL, SERVE_MISS);
        fetch(r);
        return;
    }
    if (r->gen->rt->cfg->cache.coalesce == CONFIG_COALESCE_CLUSTER) {
        cluster_lock(r);
        return;
    }
    fetch(r);
}

/* A GET or HEAD on a route with cache: (after rate limiting). */
static void cache_lookup(gw_request *r)
{
    gw_worker *w = r->w;
    const config_t *cfg = r->gen->rt->cfg;
    const config_route *route = &cfg->routes[r->route_index];
    if (cache_unless(r, &route->cache)) {
        r->cache_bypass = "unless";
        fetch(r);
        return;
    }
    if (evhttp_find_header(evhttp_request_get_input_headers(r->req), "Authorization") &&
        !cache_key_names_authorization(route->cache.key)) {
        r->cache_bypass = "authorization";
        fetch(r);
        return;
    }
    char key[CACHE_KEY_MAX];
    cache_key_source src;
    key_source(r, &src);
    size_t n = cache_key_build(cfg->cache.key_prefix ? cfg->cache.key_prefix : "", route->cache.key, &src,
                               key, sizeof key);
    if (!n || r->cache_key_ambiguous || !header_safe(key, n) || !(r->cache_key = malloc(n + 1))) {
        r->cache_bypass = "key";
        fetch(r);
        return;
    }
    memcpy(r->cache_key, key, n + 1);
    r->cache_key_len = n;
    r->cache_epoch = cache_mem_epoch(w->srv->cache);
    cache_entry *e = cache_mem_get(w->srv->cache, key, n, wall_ms());
    if (e) {
        cache_consider(r, e);
        return;
    }
    if (cfg->cache.store != CONFIG_STORE_REDIS) {
        cache_miss(r);
        return;
    }
    if (!cache_rstore_up(w->cstore)) {
        r->cache_bypass = "store-unavailable";
        fetch(r);
        return;
    }
    if (cfg->cache.coalesce != CONFIG_COALESCE_OFF) {
        flight *f = flight_find(w, key, n);
        if (f) {
            flight_join(r, f);
            return;
        }
        flight_start(r);
    }
    r->cache_op = cache_rstore_get(w->cstore, key, n, cache_redis_got, r);
    if (!r->cache_op) {
        r->cache_bypass = "store-unavailable";
        flight_end(r, NULL, SERVE_MISS);
        fetch(r);
    }
}

/* ---- storing ---- */

/* r's expired copy is still within stale_if_error. */
static bool cache_stale_usable(gw_request *r)
{
    const cache_entry *e = r->stale;
    int64_t age = e ? wall_ms() - e->stored_ms : 0;
    return e && age < e->fresh_ms + r->gen->rt->cfg->cache.stale_if_error_ms && age < e->keep_ms;
}

/* The backend failed (status) and an expired copy is within stale_if_error:
 * serve it. */
static bool cache_stale_on_error(gw_request *r, int status)
{
    if (!(status == 500 || status == 502 || status == 503 || status == 504) || !cache_stale_usable(r))
        return false;
    cache_entry *e = r->stale;
    r->stale = NULL;
    flight_end(r, e, SERVE_STALE_ERR);
    serve_entry(r, e, SERVE_STALE_ERR);
    cache_entry_unref(e);
    return true;
}

/* The route stores this status? */
static bool status_storable(const config_route_cache *rc, int status)
{
    static const int codes[] = {200, 203, 204, 300, 301, 404, 410};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++)
        if (codes[i] == status)
            return (rc->statuses & (1u << i)) != 0;
    return false;
}

/* An entry from an answer (status, its fields as "Name: value\r\n" lines,
 * its identity body), with each compressed variant when it qualifies. */
static cache_entry *entry_make(gw_request *r, int status, const char *lines, size_t lines_len,
                               struct evbuffer *body, bool compressible, int64_t fresh_ms, bool may_be_stale,
                               int64_t age_ms)
{
    const config_t *cfg = r->gen->rt->cfg;
    const config_compression *cc = &cfg->compression;
    struct evbuffer *packed[CACHE_VARIANTS] = {NULL, NULL, NULL};
    const void *bodies[CACHE_VARIANTS] = {NULL, NULL, NULL};
    size_t lens[CACHE_VARIANTS] = {0, 0, 0};
    size_t len = evbuffer_get_length(body);
    bodies[CACHE_IDENTITY] = len ? evbuffer_pullup(body, -1) : NULL;
    lens[CACHE_IDENTITY] = len;
    unsigned flags = 0;
    if (compressible && cc->enabled && len >= (size_t)cc->min_bytes && len <= (size_t)cc->max_bytes) {
        flags |= CACHE_ENTRY_VARY_AE;
        gw_encoding prefs[2];
        size_t n = gw_compress_prefs(cc, prefs);
        for (size_t i = 0; i < n; i++) {
            struct evbuffer *out = evbuffer_new();
            if (out && gw_compress(r->w->comp, cc, prefs[i], body, out) == 0 &&
                evbuffer_get_length(out) < len) {
                packed[prefs[i]] = out;
                lens[prefs[i]] = evbuffer_get_length(out);
                bodies[prefs[i]] = evbuffer_pullup(out, -1);
            } else if (out) {
                evbuffer_free(out);
            }
        }
    }
    int64_t stale = cfg->cache.stale_while_revalidate_ms > cfg->cache.stale_if_error_ms
                        ? cfg->cache.stale_while_revalidate_ms
                        : cfg->cache.stale_if_error_ms;
    if (!may_be_stale) /* must-revalidate, proxy-revalidate: never served past its freshness */
        stale = 0;
    cache_entry *e = cache_entry_make(status, flags, wall_ms() - age_ms, fresh_ms, fresh_ms + stale, lines,
                                      lines_len, bodies, lens);
    for (size_t i = 0; i < CACHE_VARIANTS; i++)
        if (packed[i])
            evbuffer_free(packed[i]);
    return e;
}

/* Store e (unless an invalidation that matches its key came while it was
 * fetched), serve r and its followers from it, and drop r's reference. */
static void cache_store_serve(gw_request *r, cache_entry *e)
{
    gw_worker *w = r->w;
    const config_cache *cc = &r->gen->rt->cfg->cache;
    if (!cache_mem_invalidated_since(w->srv->cache, r->cache_epoch, r->cache_key, r->cache_key_len)) {
        if (cc->store != CONFIG_STORE_REDIS || cc->hot_tier)
            cache_mem_put_since(w->srv->cache, r->cache_key, r->cache_key_len, e, r->cache_epoch);
        if (cc->store == CONFIG_STORE_REDIS) {
            cache_rstore_put(w->cstore, r->cache_key, r->cache_key_len, e);
            sync_store_errors(w);
        }
    }
    if (r->cluster_lock) {
        cache_rstore_unlock(w->cstore, r->cache_key, r->cache_key_len, r->lock_token);
        r->cluster_lock = false;
    }
    flight_end(r, e, SERVE_COLLAPSED);
    serve_entry(r, e, r->cache_refresh ? SERVE_REFRESH : SERVE_MISS);
    cache_entry_unref(e);
}

/* ---- invalidation after writes ---- */

static void stream_release(gw_request *r);

static void invalidation_done(gw_request *r)
{
    if (--r->inval_pending > 0)
        return;
    if (r->stream) { /* a streamed answer's head waited */
        stream_release(r);
        return;
    }
    struct evbuffer *body = r->held_body;
    r->held_body = NULL;
    gw_reply(r->req, r->held_status, r->held_reason, body);
    if (body)
        evbuffer_free(body);
    request_end(r);
}

/* ---- invalidations Redis missed ---- */

/* An invalidation Redis did not do (down, slow, failed part way) is done
 * again once it answers, so entries written before the write do not come
 * back with Redis. At most INVAL_RETRY_MAX patterns wait; past that, one
 * "<key_prefix>*" replaces them all (too much deleted beats stale answers). */
static void inval_retry_arm(gw_worker *w);

static void inval_retry_add(gw_worker *w, const char *pattern, size_t len, bool fresh)
{
    cache_mem *mem = w->srv->cache;
    for (size_t i = 0; i < w->inval_retry_count; i++)
        if (strlen(w->inval_retry[i]) == len && memcmp(w->inval_retry[i], pattern, len) == 0)
            return;
    /* From now until it is done, entries Redis still holds under it, stored
     * before now, are not served (cache_mem_pending_blocks). */
    if (fresh)
        cache_mem_pending_add(mem, pattern, len, wall_ms());
    if (w->inval_retry_count == INVAL_RETRY_MAX) {
        const char *prefix = w->gen->rt->cfg->cache.key_prefix ? w->gen->rt->cfg->cache.key_prefix : "";
        char *all = malloc(2 * strlen(prefix) + 2), *o = all;
        if (!all)
            return;
        for (const char *p = prefix; *p; p++) {
            if (strchr("*?[]\\", *p))
                *o++ = '\\';
            *o++ = *p;
        }
        strcpy(o, "*");
        /* From now on "<prefix>*" covers what was waiting. */
        int64_t now = wall_ms();
        cache_mem_pending_add(mem, all, strlen(all), now);
        for (size_t i = 0; i < w->inval_retry_count; i++) {
            cache_mem_pending_done(mem, w->inval_retry[i], strlen(w->inval_retry[i]), now);
            free(w->inval_retry[i]);
        }
        cache_mem_pending_done(mem, pattern, len, now);
        w->inval_retry[0] = all;
        w->inval_retry_count = 1;
        gw_warn("worker %d: more than %d invalidations waiting for Redis: all of %s* will go", w->id,
                INVAL_RETRY_MAX, prefix);
    } else {
        char *copy = strndup(pattern, len);
        if (!copy)
            return;
        w->inval_retry[w->inval_retry_count++] = copy;
    }
    inval_retry_arm(w);
}

/* cache_rstore_count_fn of a retried invalidation (arg: the worker). */
static void inval_retried(void *arg, bool ok, size_t deleted);

typedef struct inval_again {
    gw_worker *w;
    char *pattern;
    int64_t started_ms; /* when this deletion was sent */
} inval_again;

static void inval_retried(void *arg, bool ok, size_t deleted)
{
    inval_again *ia = arg;
    sync_store_errors(ia->w);
    if (!ok) {
        inval_retry_add(ia->w, ia->pattern, strlen(ia->pattern), false);
    } else {
        cache_mem_pending_done(ia->w->srv->cache, ia->pattern, strlen(ia->pattern), ia->started_ms);
        gw_info("worker %d: invalidation of %s done in Redis after all (%zu keys)", ia->w->id, ia->pattern,
                deleted);
    }
    free(ia->pattern);
    free(ia);
}

static void inval_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_worker *w = arg;
    if (!cache_rstore_up(w->cstore)) {
        inval_retry_arm(w);
        return;
    }
    size_t n = w->inval_retry_count;
    w->inval_retry_count = 0;
    w->inval_retry_ms = 0;
    for (size_t i = 0; i < n; i++) {
        inval_again *ia = malloc(sizeof *ia);
        char *pattern = w->inval_retry[i];
        if (ia) {
            ia->w = w;
            ia->pattern = pattern;
            ia->started_ms = wall_ms();
            if (cache_rstore_invalidate(w->cstore, pattern, strlen(pattern), inval_retried, ia))
                continue;
            free(ia);
        }
        inval_retry_add(w, pattern, strlen(pattern), false);
        free(pattern);
    }
}

static void inval_retry_arm(gw_worker *w)
{
    if (!w->inval_retry_timer && !(w->inval_retry_timer = evtimer_new(w->base, inval_retry_cb, w)))
        return;
    if (evtimer_pending(w->inval_retry_timer, NULL))
        return;
    w->inval_retry_ms = w->inval_retry_ms ? w->inval_retry_ms * 2 : INVAL_RETRY_MIN_MS;
    if (w->inval_retry_ms > INVAL_RETRY_MAX_MS)
        w->inval_retry_ms = INVAL_RETRY_MAX_MS;
    struct timeval tv = {w->inval_retry_ms / 1000, (w->inval_retry_ms % 1000) * 1000};
    evtimer_add(w->inval_retry_timer, &tv);
}

/* cache_rstore_count_fn */
static void invalidated_in_redis(void *arg, bool ok, size_t deleted)
{
    inval_wait *iw = arg;
    gw_request *r = iw->r;
    iw->op = NULL;
    sync_store_errors(r->w);
    if (!ok) {
        gw_log(CONFIG_LOG_WARN, r->request_id,
               "route %s: invalidation %s in Redis failed after %zu keys; retried later",
               r->gen->rt->cfg->routes[r->route_index].name, iw->pattern, deleted);
        inval_retry_add(r->w, iw->pattern, strlen(iw->pattern), true);
    }
    invalidation_done(r);
}

/* After a 2xx answer to a write on a route with invalidate: delete the
 * matching keys here (the in-process store, at once) and in Redis. The answer
 * waits for Redis (each command within redis.timeout), so a client that reads
 * after its write never gets the old entry. Returns how many Redis deletions
 * are pending (0: send now). */
static size_t invalidate_start(gw_request *r)
{
    const config_t *cfg = r->gen->rt->cfg;
    const config_route *route = &cfg->routes[r->route_index];
    cache_key_source src;
    key_source(r, &src);
    bool redis = cfg->cache.store == CONFIG_STORE_REDIS && cfg->redis.enabled;
    if (redis && !(r->inval = calloc(route->invalidate_count, sizeof *r->inval)))
        redis = false;
    r->inval_count = redis ? route->invalidate_count : 0;
    for (size_t i = 0; i < route->invalidate_count; i++) {
        char pattern[CACHE_KEY_MAX];
        size_t n = cache_pattern_build(route->invalidate[i], &src, pattern, sizeof pattern);
        if (!n) {
            gw_log(CONFIG_LOG_WARN, r->request_id, "route %s: invalidate pattern %zu too long; skipped",
                   route->name, i);
            continue;
        }
        cache_mem_delete_matching(r->w->srv->cache, pattern, n);
        if (!redis)
            continue;
        r->inval[i].r = r;
        r->inval[i].pattern = strndup(pattern, n);
        r->inval[i].op = r->inval[i].pattern ? cache_rstore_invalidate(r->w->cstore, pattern, n,
                                                                       invalidated_in_redis, &r->inval[i])
                                             : NULL;
        if (r->inval[i].op) {
            r->inval_pending++;
        } else {
            gw_log(CONFIG_LOG_WARN, r->request_id, "route %s: Redis unavailable; %s invalidated there later",
                   route->name, pattern);
            inval_retry_add(r->w, pattern, n, true);
            metrics_series_t *s = metrics_series(r->w->shard, r->w->srv->metrics.cache_store_errors, NULL);
            if (s)
                metrics_counter_add(s, 1);
        }
    }
    return r->inval_pending;
}

/* Whatever of the write's invalidations Redis has not done goes to the
 * worker's retries (and is kept from being served meanwhile). */
static void inval_hand_over(gw_request *r)
{
    for (size_t i = 0; i < r->inval_count; i++) {
        if (!r->inval[i].op)
            continue;
        cache_rstore_cancel(r->inval[i].op);
        r->inval[i].op = NULL;
        gw_log(CONFIG_LOG_WARN, r->request_id,
               "invalidation %s not done in Redis within %d ms; retried later", r->inval[i].pattern,
               INVAL_HOLD_MAX_MS);
        inval_retry_add(r->w, r->inval[i].pattern, strlen(r->inval[i].pattern), true);
    }
}

/* The write's invalidations took too long: whatever Redis has not done is
 * handed to the worker's retries, and the answer goes. */
static void hold_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_request *r = arg;
    inval_hand_over(r);
    r->inval_pending = 1;
    invalidation_done(r);
}

/* Does r's answer (status) wait for the route's invalidations? Starts them;
 * true when some run in Redis, and then arms the hold: at most
 * INVAL_HOLD_MAX_MS, or the request's deadline (a SCAN over a large database
 * must not hold the answer for long; what is not done by then is done again
 * later, and kept from being served meanwhile). */
static bool hold_for_invalidations(gw_request *r, int status)
{
    const config_route *route = &r->gen->rt->cfg->routes[r->route_index];
    if (!(route->invalidate_count && status >= 200 && status < 300 && r->method != CONFIG_METHOD_GET &&
          r->method != CONFIG_METHOD_HEAD && invalidate_start(r) > 0))
        return false;
    uint64_t now = gw_now_ns();
    uint64_t until = now + (uint64_t)INVAL_HOLD_MAX_MS * 1000000ULL;
    uint64_t deadline = r->start_ns + (uint64_t)r->gen->rt->cfg->server.request_timeout_ms * 1000000ULL;
    if (deadline < until)
        until = deadline;
    uint64_t wait = until > now ? until - now : 0;
    struct timeval tv = {(time_t)(wait / 1000000000ULL), (suseconds_t)(wait % 1000000000ULL / 1000)};
    r->hold_timer = evtimer_new(r->w->base, hold_timeout_cb, r);
    if (r->hold_timer)
        evtimer_add(r->hold_timer, &tv);
    return true;
}

/* Send the answer, or hold it while the write's invalidations run; end r. */
static void finish_reply(gw_request *r, int status, const char *reason, struct evbuffer *body)
{
    if (hold_for_invalidations(r, status)) {
        r->held_body = body ? evbuffer_new() : NULL;
        if (r->held_body)
            evbuffer_add_buffer(r->held_body, body);
        r->held_status = status;
        r->held_reason = reason ? strdup(reason) : NULL;
        return;
    }
    gw_reply(r->req, status, reason, body);
    request_end(r);
}

/* The cache's hold on r, let go without answering anyone (a forced stop
 * frees every request, followers included). */
static void cache_request_drop(gw_request *r)
{
    r->waiting = NULL;
    if (r->flight) {
        r->flight->followers = NULL;
        flight_end(r, NULL, SERVE_MISS);
    }
    r->cluster_lock = false;
    r->inval_pending = 0;
    cache_request_end(r);
}

/* What request_end undoes for the cache. */
static void cache_request_end(gw_request *r)
{
    if ((r->cache_key || r->cache_bypass) && !r->cache_counted && r->route_index >= 0)
        count_cache(r, r->cache_bypass ? CACHE_RESULT_BYPASS : CACHE_RESULT_MISS);
    if (r->waiting) {
        for (gw_request **pp = &r->waiting->followers; *pp; pp = &(*pp)->wait_next)
            if (*pp == r) {
                *pp = r->wait_next;
                break;
            }
        r->waiting = NULL;
    }
    flight_end(r, NULL, SERVE_MISS);
    cache_rstore_cancel(r->cache_op);
    r->cache_op = NULL;
    if (r->cache_poll)
        event_free(r->cache_poll);
    if (r->cluster_lock) /* fetched, not stored: let the others go on */
        cache_rstore_unlock(r->w->cstore, r->cache_key, r->cache_key_len, r->lock_token);
    for (size_t i = 0; i < r->inval_count; i++) {
        cache_rstore_cancel(r->inval[i].op);
        free(r->inval[i].pattern);
    }
    free(r->inval);
    r->inval = NULL;
    if (r->held_body)
        evbuffer_free(r->held_body);
    free(r->held_reason);
    if (r->hold_timer)
        event_free(r->hold_timer);
    cache_entry_unref(r->stale);
    free(r->cache_key);
}

/* ---- proxying --------------------------------------------------------------- */

static bool method_is_idempotent(unsigned method)
{
    return method & (CONFIG_METHOD_GET | CONFIG_METHOD_HEAD | CONFIG_METHOD_PUT | CONFIG_METHOD_DELETE |
                     CONFIG_METHOD_OPTIONS | CONFIG_METHOD_TRACE);
}

/* Headers the gateway writes itself on the way up. By length first: this runs
 * for every request header. */
static bool is_gateway_set_header(const char *name)
{
    switch (strlen(name)) {
    case 6:
        return strcasecmp(name, "Expect") == 0; /* the body is already here: nothing to wait for */
    case 11:
        return strcasecmp(name, "traceparent") == 0;
    case 12:
        return strcasecmp(name, "X-Request-Id") == 0;
    case 14:
        return strcasecmp(name, "Content-Length") == 0;
    case 15:
        return strcasecmp(name, "X-Forwarded-For") == 0;
    case 16:
        return strcasecmp(name, "X-Forwarded-Host") == 0;
    case 17:
        return strcasecmp(name, "X-Forwarded-Proto") == 0;
    default:
        return false;
    }
}

/* A cache fill asks for the whole representation: the client's validators
 * and ranges are answered from the entry (304) instead, as nginx does when it
 * fills its cache; an upstream 304 or 206 could not be stored. */
static bool is_conditional_header(const char *name)
{
    return strcasecmp(name, "If-None-Match") == 0 || strcasecmp(name, "If-Modified-Since") == 0 ||
           strcasecmp(name, "If-Match") == 0 || strcasecmp(name, "If-Unmodified-Since") == 0 ||
           strcasecmp(name, "If-Range") == 0 || strcasecmp(name, "Range") == 0;
}

/* A request's header lines gathered on the stack and added to the evbuffer in
 * one piece: evbuffer_add costs about 70 instructions a call, and a proxied
 * request has a dozen pieces. */
typedef struct line_buf {
    struct evbuffer *out;
    size_t len;
    char data[2048];
} line_buf;

static void line_buf_flush(line_buf *b)
{
    if (b->len)
        evbuffer_add(b->out, b->data, b->len);
    b->len = 0;
}

static void line_buf_add(line_buf *b, const char *s, size_t n)
{
    if (b->len + n > sizeof b->data) {
        line_buf_flush(b);
        if (n > sizeof b->data) {
            evbuffer_add(b->out, s, n);
            return;
        }
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
}

/* "Name: value\r\n" without printf: this runs for every header of every request. */
static void add_header_line(line_buf *b, const char *name, const char *value)
{
    size_t n = strlen(name), v = strlen(value);
    if (b->len + n + v + 4 > sizeof b->data) {
        line_buf_flush(b);
        if (n + v + 4 > sizeof b->data) {
            evbuffer_add(b->out, name, n);
            evbuffer_add(b->out, ": ", 2);
            evbuffer_add(b->out, value, v);
            evbuffer_add(b->out, "\r\n", 2);
            return;
        }
    }
    char *p = b->data + b->len;
    memcpy(p, name, n);
    p[n] = ':';
    p[n + 1] = ' ';
    memcpy(p + n + 2, value, v);
    p[n + v + 2] = '\r';
    p[n + v + 3] = '\n';
    b->len += n + v + 4;
}

/* upstream_fill_fn: one attempt's request headers and body. */
static void fill_upstream_request(void *arg, struct evbuffer *headers, struct evbuffer *body,
                                  const char *target)
{
    gw_request *r = arg;
    struct evkeyvalq *in = evhttp_request_get_input_headers(r->req);
    const char *connection = evhttp_find_header(in, "Connection");
    const char *host = NULL;
    bool xff_seen = false;
    const struct evkeyval *h;
    bool fill = r->cache_key && !r->cache_bypass;
    line_buf b;
    b.out = headers;
    b.len = 0;

    TAILQ_FOREACH(h, in, next)
    {
        if (!host && strcasecmp(h->key, "Host") == 0)
            host = h->value;
        if (gw_header_is_hop_by_hop(h->key, connection) || is_gateway_set_header(h->key) ||
            (fill && (h->key[0] == 'I' || h->key[0] == 'i' || h->key[0] == 'R' || h->key[0] == 'r') &&
             is_conditional_header(h->key)))
            continue;
        add_header_line(&b, h->key, h->value);
    }
    if (!host)
        add_header_line(&b, "Host", target);
    /* X-Forwarded-For: every inbound value, in order, then the client. */
    line_buf_add(&b, "X-Forwarded-For: ", 17);
    TAILQ_FOREACH(h, in, next)
    {
        if (strcasecmp(h->key, "X-Forwarded-For") != 0)
            continue;
        if (xff_seen)
            line_buf_add(&b, ", ", 2);
        line_buf_add(&b, h->value, strlen(h->value));
        xff_seen = true;
    }
    if (xff_seen)
        line_buf_add(&b, ", ", 2);
    line_buf_add(&b, r->client, strlen(r->client));
    line_buf_add(&b, "\r\n", 2);
    add_header_line(&b, "X-Forwarded-Proto", r->w->srv->tls ? "https" : "http");
    if (host)
        add_header_line(&b, "X-Forwarded-Host", host);
    add_header_line(&b, "X-Request-Id", r->request_id);
    add_header_line(&b, "traceparent", r->traceparent);

    struct evbuffer *in_body = evhttp_request_get_input_buffer(r->req);
    size_t len = evbuffer_get_length(in_body);
    if (len > 0 || (r->method & (CONFIG_METHOD_POST | CONFIG_METHOD_PUT | CONFIG_METHOD_PATCH))) {
        char digits[24];
        size_t n = 0;
        size_t v = len;
        do
            digits[n++] = (char)('0' + v % 10);
        while ((v /= 10) != 0);
        line_buf_add(&b, "Content-Length: ", 16);
        while (n > 0)
            line_buf_add(&b, &digits[--n], 1);
        line_buf_add(&b, "\r\n", 2);
    }
    line_buf_flush(&b);
    if (len > 0) {
        if (r->retry_body)
            evbuffer_add_buffer_reference(body, in_body);
        else
            evbuffer_add_buffer(body, in_body);
    }
}

static bool field_is(const http1_field *f, const char *name, size_t len)
{
    return f->name_len == len && strncasecmp(f->name, name, len) == 0;
}

/* Put the upstream's end-to-end fields, and our X-Request-Id, on the answer.
 * evhttp writes every output header with its own printf and keeps each in
 * three allocations, which made header handling the largest cost of a proxied
 * request. So the fields evhttp never looks at travel as ONE entry: its key is
 * the first field's name and its value the first value followed by
 * "\r\nName: value" for each other field, which evhttp's "key: value\r\n"
 * writes out as the original lines. That is safe because the parser refuses CR,
 * LF and NUL in values and request ids are [A-Za-z0-9._:-]. Date stays a real
 * entry (evhttp adds its own when it finds none). When the answer has a body,
 * the entry's key is Content-Length, with the body's length first in its value:
 * evhttp only checks that key's presence, and then adds no second one. For HEAD
 * the upstream's Content-Length passes as a field. */
/* How an answer leaves: its coding, and whether Vary must name Accept-Encoding. */
typedef struct answer_coding {
    gw_encoding enc;
    bool add_vary;
    bool weaken_etag; /* a 304 for a representation this client got compressed */
} answer_coding;

/* Does the field's comma-separated list have an element whose name (before
 * any '=') is token, case-insensitively? Reads the whole value, however long. */
static bool field_lists(const http1_field *f, const char *token)
{
    size_t tlen = strlen(token);
    const char *p = f->value, *end = f->value + f->value_len;
    while (p < end) {
        while (p < end && (*p == ' ' || *p == '\t' || *p == ','))
            p++;
        const char *name = p;
        while (p < end && *p != ',' && *p != '=' && *p != ' ' && *p != '\t' && *p != ';')
            p++;
        if ((size_t)(p - name) == tlen && strncasecmp(name, token, tlen) == 0)
            return true;
        while (p < end && *p != ',') /* the rest of the element (quoted commas are rare here) */
            p++;
    }
    return false;
}

/* compress.h's rules for an upstream answer, whoever asks: does it qualify?
 * *varies: its Vary names Accept-Encoding (or *) already. */
static bool upstream_compressible(const config_compression *cc, const upstream_response *resp, bool *varies)
{
    *varies = false;
    if (!cc->enabled || resp->status < 200 || resp->status == 204 || resp->status == 206 ||
        resp->status == 304)
        return false;
    bool type_ok = false;
    int types = 0;
    for (size_t i = 0; i < resp->field_count; i++) {
        const http1_field *f = &resp->fields[i];
        if (field_is(f, "Content-Encoding", 16) &&
            !(f->value_len == 8 && strncasecmp(f->value, "identity", 8) == 0))
            return false; /* encoded already: passed as it is */
        if (field_is(f, "Content-Range", 13))
            return false;
        if (field_is(f, "Cache-Control", 13) && field_lists(f, "no-transform"))
            return false;
        if (field_is(f, "Content-Type", 12)) {
            type_ok = gw_compress_type_ok(cc, f->value, f->value_len);
            types++;
        }
        if (field_is(f, "Vary", 4) && (field_lists(f, "Accept-Encoding") || field_lists(f, "*")))
            *varies = true;
    }
    return type_ok && types == 1; /* several Content-Types: which one is it? leave it alone */
}

#define GW_STREAM_BUFFER_BYTES (1024 * 1024) /* upstream answers up to this are buffered whole */
#define GW_STREAM_HIGH_BYTES (256 * 1024)    /* client output past which the upstream is not read */

/* Most body an upstream answer to r buffers before it streams: 1 MiB, or the
 * cache's max_object_bytes when r may fill the cache and that is larger (so
 * whatever may be stored is buffered whole, as it must be to be stored). */
static size_t stream_threshold(const gw_request *r)
{
    const config_t *cfg = r->gen->rt->cfg;
    size_t t = GW_STREAM_BUFFER_BYTES;
    if (r->cache_key && !r->cache_bypass && (size_t)cfg->cache.max_object_bytes > t)
        t = (size_t)cfg->cache.max_object_bytes;
    return t;
}

/* The client's choice for an upstream answer in ac. streamed: the answer is
 * compressed piece by piece as it passes, so compression.max_bytes (the most
 * compressed in one go) does not apply, and its size is its Content-Length
 * (unknown, -1, when chunked or close-delimited: it qualifies). */
/* Does the client's If-None-Match list W/ + the upstream's strong ETag, the
 * validator the gateway sent with a compressed 200 of it? */
static bool client_holds_weakened(gw_request *r, const upstream_response *resp)
{
    const http1_field *etag = NULL;
    for (size_t i = 0; i < resp->field_count; i++)
        if (field_is(&resp->fields[i], "ETag", 4))
            etag = &resp->fields[i];
    if (!etag || etag->value_len < 2 || etag->value[0] != '"')
        return false;
    const char *p = evhttp_find_header(evhttp_request_get_input_headers(r->req), "If-None-Match");
    const char *tag, *end;
    while (p && next_entity_tag(&p, &tag, &end)) {
        if ((size_t)(end - tag) == etag->value_len + 2 && strncmp(tag, "W/", 2) == 0 &&
            memcmp(tag + 2, etag->value, etag->value_len) == 0)
            return true;
    }
    return false;
}

static void choose_coding(gw_request *r, const upstream_response *resp, bool streamed, answer_coding *ac)
{
    const config_compression *cc = &r->gen->rt->cfg->compression;
    bool varies;
    ac->enc = GW_ENC_IDENTITY;
    ac->add_vary = false;
    ac->weaken_etag = false;
    if (!cc->enabled)
        return;
    if (resp->status == 304) {
        /* A 304 repeats the validator and Vary of the 200 the client holds
         * (RFC 9110 15.4.5). It has no type or size to judge that 200 by, but
         * the client says: it asks with W/"x" for the upstream's "x" only when
         * it was sent a compressed 200 (which also had Vary). Any other way
         * the 304 passes as the upstream sent it. */
        ac->weaken_etag = client_holds_weakened(r, resp);
        bool vary_ae = false;
        for (size_t i = 0; i < resp->field_count; i++)
            if (field_is(&resp->fields[i], "Vary", 4) &&
                (field_lists(&resp->fields[i], "Accept-Encoding") || field_lists(&resp->fields[i], "*")))
                vary_ae = true;
        ac->add_vary = ac->weaken_etag && !vary_ae;
        return;
    }
    gw_encoding prefs[2];
    size_t n = gw_compress_prefs(cc, prefs);
    char joined[1024];
    const char *ae = gw_accept_encoding_of(evhttp_request_get_input_headers(r->req), joined, sizeof joined);
    bool head = r->method == CONFIG_METHOD_HEAD;
    size_t size = evbuffer_get_length(resp->body);
    for (size_t i = 0; head && i < resp->field_count; i++) /* HEAD: the size a GET would have */
        if (field_is(&resp->fields[i], "Content-Length", 14))
            size = (size_t)strtoull(resp->fields[i].value, NULL, 10);
    bool unknown = false;
    if (streamed) {
        unknown = resp->content_length < 0;
        size = unknown ? 0 : (size_t)resp->content_length;
    }
    /* A HEAD is answered as its GET would be: streamed (max_bytes aside) past the threshold. */
    bool stream_sized = streamed || (head && size > stream_threshold(r));
    if (!unknown && (size < (size_t)cc->min_bytes || (size > (size_t)cc->max_bytes && !stream_sized)))
        return;
    if (!upstream_compressible(cc, resp, &varies))
        return;
    ac->add_vary = !varies; /* HEAD too: the same fields as the GET, uncompressed */
    if (!head)
        ac->enc = gw_encoding_choose(ae, prefs, n, NULL);
}

static void pass_response_fields(gw_request *r, const upstream_response *resp, int64_t body_length,
                                 const answer_coding *ac, const char *extra, size_t extra_len)
{
    struct evkeyvalq *oh = evhttp_request_get_output_headers(r->req);
    const http1_field *connection = NULL;
    bool head = r->method == CONFIG_METHOD_HEAD;
    size_t keep[HTTP1_MAX_FIELDS], kept = 0, len = 0;

    for (size_t i = 0; i < resp->field_count; i++)
        if (field_is(&resp->fields[i], "Connection", 10))
            connection = &resp->fields[i];
    for (size_t i = 0; i < resp->field_count; i++) {
        const http1_field *f = &resp->fields[i];
        /* (A name longer than the whole Connection value is none of its tokens.) */
        if (gw_header_is_hop_by_hop(
                f->name, connection && f->name_len <= connection->value_len ? connection->value : NULL) ||
            field_is(f, "X-Request-Id", 12) || (!head && field_is(f, "Content-Length", 14)))
            continue;
        /* Our RateLimit-* replace any the upstream sent (a client would
         * read two lists of numbers for one answer). */
        if (r->limit_shown && is_ratelimit_field(f->name, f->name_len))
            continue;
        /* On a cached route our cache's lines replace any the upstream sent. */
        if (extra_len &&
            (field_is(f, "X-Cache", 7) || field_is(f, "X-Cache-Key", 11) || field_is(f, "Cache-Status", 12)))
            continue;
        /* Compressed here: an upstream "Content-Encoding: identity" would read
         * as a coding list, and byte ranges of the identity body mean nothing. */
        if (ac->enc != GW_ENC_IDENTITY &&
            (field_is(f, "Content-Encoding", 16) || field_is(f, "Accept-Ranges", 13)))
            continue;
        if (field_is(f, "Date", 4)) {
            evhttp_add_header(oh, "Date", f->value);
            continue;
        }
        keep[kept++] = i;
        len += f->name_len + 2 + f->value_len + 2 + 2; /* + 2: "W/" on a weakened ETag */
    }
    /* Our own lines: "\r\nVary: Accept-Encoding" (23), "\r\nContent-Encoding: gzip" (24). */
    len += 23 + 24 + 2 + extra_len;
    /* With a body of known length, the entry's key is Content-Length (so
     * evhttp adds none, and a streamed answer is not chunked) and its value
     * starts with the length; otherwise the first field leads. */
    bool with_length =
        !head && resp->status >= 200 && resp->status != 204 && resp->status != 304 && body_length >= 0;
    char length[24];
    size_t length_len = 0;
    if (with_length) { /* the digits without snprintf (this runs for every answer) */
        char digits[24];
        uint64_t v = (uint64_t)body_length;
        do
            digits[length_len++] = (char)('0' + v % 10);
        while ((v /= 10) != 0);
        for (size_t i = 0; i < length_len; i++)
            length[i] = digits[length_len - 1 - i];
    }
    size_t id_len = strlen(r->request_id);
    len += length_len + 2 + 12 + 2 + id_len;
    /* Our RateLimit-* entry (set_limit_headers) joins this one: one printf
     * fewer when evhttp writes the head. */
    struct evkeyval *lim = NULL;
    size_t lim_len = 0;
    if (r->limit_shown) {
        TAILQ_FOREACH(lim, oh, next)
        {
            if (strcmp(lim->key, "RateLimit-Limit") == 0)
                break;
        }
        if (lim) {
            lim_len = strlen(lim->value);
            len += 2 + 17 + lim_len;
        }
    }
    const char *key = with_length ? "Content-Length" : kept ? resp->fields[keep[0]].name : "X-Request-Id";
    char *k = strdup(key);
    char *value = malloc(len + 1);
    struct evkeyval *kv = calloc(1, sizeof *kv);
    if (!k || !value || !kv) {
        free(k);
        free(value);
        free(kv);
        evhttp_add_header(oh, "X-Request-Id", r->request_id);
        return;
    }
    char *w = value;
    bool lead = !with_length && kept > 0; /* the first field's name is the key */
    if (with_length) {
        memcpy(w, length, length_len);
        w += length_len;
    }
    for (size_t j = 0; j < kept; j++) {
        const http1_field *f = &resp->fields[keep[j]];
        if (!(lead && j == 0)) {
            if (w != value) {
                memcpy(w, "\r\n", 2);
                w += 2;
            }
            memcpy(w, f->name, f->name_len);
            memcpy(w + f->name_len, ": ", 2);
            w += f->name_len + 2;
        }
        /* A compressed answer is not byte-equal to the strong validator's. */
        if ((ac->enc != GW_ENC_IDENTITY || ac->weaken_etag) && field_is(f, "ETag", 4) && f->value_len > 0 &&
            f->value[0] == '"') {
            memcpy(w, "W/", 2);
            w += 2;
        }
        memcpy(w, f->value, f->value_len);
        w += f->value_len;
    }
    if (ac->add_vary) {
        if (w != value) {
            memcpy(w, "\r\n", 2);
            w += 2;
        }
        memcpy(w, "Vary: Accept-Encoding", 21);
        w += 21;
    }
    if (ac->enc != GW_ENC_IDENTITY) {
        if (w != value) {
            memcpy(w, "\r\n", 2);
            w += 2;
        }
        const char *name = gw_encoding_name(ac->enc); /* "gzip" or "br" */
        size_t n = strlen(name);
        memcpy(w, "Content-Encoding: ", 18);
        memcpy(w + 18, name, n);
        w += 18 + n;
    }
    if (w != value) {
        memcpy(w, "\r\nX-Request-Id: ", 16);
        w += 16;
    }
    memcpy(w, r->request_id, id_len);
    w += id_len;
    if (extra_len) { /* after the id, which may be the entry's own key */
        memcpy(w, "\r\n", 2);
        memcpy(w + 2, extra, extra_len);
        w += 2 + extra_len;
    }
    if (lim) {
        memcpy(w, "\r\nRateLimit-Limit: ", 19);
        memcpy(w + 19, lim->value, lim_len);
        w += 19 + lim_len;
        TAILQ_REMOVE(oh, lim, next);
        free(lim->key);
        free(lim->value);
        free(lim);
    }
    *w = '\0';
    kv->key = k;
    kv->value = value;
    TAILQ_INSERT_TAIL(oh, kv, next);
}

/* An HTTP-date as seconds since the epoch: IMF-fixdate ("Sun, 06 Nov 1994
 * 08:49:37 GMT") and the two obsolete forms RFC 9110 5.6.7 asks recipients to
 * accept (RFC 850 "Sunday, 06-Nov-94 08:49:37 GMT", asctime "Sun Nov  6
 * 08:49:37 1994"). False when it is none of them. */
static bool http_date(const char *v, size_t len, int64_t *out)
{
    static const char *const formats[] = {"%a, %d %b %Y %H:%M:%S GMT", "%A, %d-%b-%y %H:%M:%S GMT",
                                          "%a %b %e %H:%M:%S %Y"};
    char buf[64];
    if (len >= sizeof buf)
        return false;
    memcpy(buf, v, len);
    buf[len] = '\0';
    for (size_t i = 0; i < sizeof formats / sizeof formats[0]; i++) {
        struct tm tm = {0};
        const char *end = strptime(buf, formats[i], &tm);
        if (end && !*end) {
            *out = (int64_t)timegm(&tm);
            return true;
        }
    }
    return false;
}

/* The seconds of a Cache-Control directive (max-age=N), or -1. */
static int64_t directive_seconds(const http1_field *f, const char *name)
{
    size_t nlen = strlen(name);
    const char *p = f->value, *end = f->value + f->value_len;
    while (p < end) {
        while (p < end && (*p == ' ' || *p == '\t' || *p == ','))
            p++;
        if ((size_t)(end - p) > nlen && strncasecmp(p, name, nlen) == 0 && p[nlen] == '=') {
            p += nlen + 1;
            if (p < end && *p == '"')
                p++;
            int64_t v = 0;
            bool digits = false;
            while (p < end && *p >= '0' && *p <= '9') {
                digits = true;
                v = v < INT64_C(100000000000) ? v * 10 + (*p - '0') : v;
                p++;
            }
            return digits ? v : -1;
        }
        while (p < end && *p != ',')
            p++;
    }
    return -1;
}

/* An entry for the upstream's answer, or NULL when it is not to be stored:
 * a status the route does not store, Set-Cookie, Cache-Control no-store,
 * private or no-cache (or max-age=0), a Vary on anything but
 * Accept-Encoding (the key does not hold those headers), an encoded or
 * partial body, or a body over max_object_bytes. The upstream's s-maxage,
 * else max-age, sets the lifetime (as nginx's proxy_cache_valid yields to
 * them); else the route's ttl. */
static cache_entry *upstream_entry(gw_request *r, const upstream_response *resp)
{
    const config_t *cfg = r->gen->rt->cfg;
    const config_route *route = &cfg->routes[r->route_index];
    if (!status_storable(&route->cache, resp->status) ||
        evbuffer_get_length(resp->body) > (size_t)cfg->cache.max_object_bytes)
        return NULL;
    int64_t max_age = -1, s_maxage = -1, age = 0, expires = 0, date = 0;
    bool has_expires = false, expires_ok = false, has_date = false;
    bool may_be_stale = true;
    const http1_field *connection = NULL;
    for (size_t i = 0; i < resp->field_count; i++) {
        const http1_field *f = &resp->fields[i];
        if (field_is(f, "Set-Cookie", 10) || field_is(f, "Content-Range", 13))
            return NULL;
        if (field_is(f, "Age", 3)) {
            long long a = strtoll(f->value, NULL, 10);
            age = a > 0 ? (a < INT32_MAX ? a : INT32_MAX) : 0; /* RFC 9111 1.2.2: cap, never wrap */
        }
        if (field_is(f, "Expires", 7)) {
            has_expires = true;
            expires_ok = http_date(f->value, f->value_len, &expires);
        }
        if (field_is(f, "Date", 4))
            has_date = http_date(f->value, f->value_len, &date);
        if (field_is(f, "Content-Encoding", 16) &&
            !(f->value_len == 8 && strncasecmp(f->value, "identity", 8) == 0))
            return NULL;
        if (field_is(f, "Vary", 4)) {
            for (const char *p = f->value, *end = f->value + f->value_len; p < end;) {
                while (p < end && (*p == ' ' || *p == '\t' || *p == ','))
                    p++;
                const char *tok = p;
                while (p < end && *p != ',' && *p != ' ' && *p != '\t')
                    p++;
                if (p > tok && !((size_t)(p - tok) == 15 && strncasecmp(tok, "Accept-Encoding", 15) == 0))
                    return NULL;
            }
        }
        if (field_is(f, "Cache-Control", 13)) {
            if (field_lists(f, "no-store") || field_lists(f, "private") || field_lists(f, "no-cache"))
                return NULL;
            if (field_lists(f, "must-revalidate") || field_lists(f, "proxy-revalidate"))
                may_be_stale = false;
            int64_t v = directive_seconds(f, "max-age");
            if (v >= 0)
                max_age = v;
            v = directive_seconds(f, "s-maxage");
            if (v >= 0)
                s_maxage = v;
        }
        if (field_is(f, "Connection", 10))
            connection = f;
    }
    /* RFC 9111 4.2.1: s-maxage, max-age, then Expires - Date (an Expires that
     * does not parse, "0" say, is in the past); then the route's ttl. Of a
     * lifetime the upstream gave, its Age (it came through another cache) is
     * already spent. */
    int64_t fresh_ms = s_maxage >= 0  ? s_maxage * 1000
                       : max_age >= 0 ? max_age * 1000
                       : has_expires
                           ? (expires_ok ? (expires - (has_date ? date : wall_ms() / 1000)) * 1000 : 0)
                           : route->cache.ttl_ms;
    /* The entry counts its age from when the upstream's answer was made
     * (stored_ms = now - Age), so the Age we send includes the time it spent in
     * caches before us; the route's ttl is ours, from now. */
    int64_t age_ms = age * 1000;
    if (!(s_maxage >= 0 || max_age >= 0 || has_expires))
        fresh_ms += age_ms;
    if (fresh_ms <= age_ms)
        return NULL;
    bool varies;
    bool compressible = upstream_compressible(&cfg->compression, resp, &varies);
    /* The entry writes Vary: Accept-Encoding itself when it has codings. */
    size_t size = evbuffer_get_length(resp->body);
    bool own_vary = compressible && size >= (size_t)cfg->compression.min_bytes &&
                    size <= (size_t)cfg->compression.max_bytes;
    struct evbuffer *lines = evbuffer_new();
    if (!lines)
        return NULL;
    for (size_t i = 0; i < resp->field_count; i++) {
        const http1_field *f = &resp->fields[i];
        if (gw_header_is_hop_by_hop(f->name, connection ? connection->value : NULL) ||
            field_is(f, "Content-Length", 14) || field_is(f, "Content-Encoding", 16) ||
            field_is(f, "Date", 4) || field_is(f, "Age", 3) || field_is(f, "X-Request-Id", 12) ||
            field_is(f, "X-Cache", 7) || field_is(f, "X-Cache-Key", 11) || field_is(f, "Cache-Status", 12))
            continue;
        if (own_vary && field_is(f, "Vary", 4))
            continue;
        evbuffer_add(lines, f->name, f->name_len);
        evbuffer_add(lines, ": ", 2);
        evbuffer_add(lines, f->value, f->value_len);
        evbuffer_add(lines, "\r\n", 2);
    }
    size_t n = evbuffer_get_length(lines);
    const char *text = n ? (const char *)evbuffer_pullup(lines, -1) : "";
    cache_entry *e =
        entry_make(r, resp->status, text, n, resp->body, compressible, fresh_ms, may_be_stale, age_ms);
    evbuffer_free(lines);
    return e;
}

/* upstream_done_fn: pass the upstream's answer back, or our 502/504. */
static void upstream_done(void *arg, const upstream_response *resp, int status, const char *target)
{
    gw_request *r = arg;
    r->call = NULL;
    if (r->stale && cache_stale_on_error(r, resp ? resp->status : status))
        return;
    if (resp && r->cache_key && !r->cache_bypass) {
        cache_entry *e = upstream_entry(r, resp);
        if (e) {
            cache_store_serve(r, e);
            return;
        }
    }
    if (!resp) {
        gw_log(CONFIG_LOG_WARN, r->request_id, "upstream %s (%s): %s", r->upstream_name,
               target ? target : "-", status == 504 ? "timed out" : "failed");
        if (r->cache_key || r->cache_bypass) {
            struct evbuffer *extra = evbuffer_new();
            if (extra) {
                cache_headers_plain(r, extra);
                block_install(r, extra);
                evbuffer_free(extra);
            }
        }
        respond_error(r, status, status == 504 ? "upstream timed out" : "upstream failed");
        return;
    }
    answer_coding ac;
    choose_coding(r, resp, false, &ac);
    struct evbuffer *body = resp->body, *packed = NULL;
    if (ac.enc != GW_ENC_IDENTITY) {
        packed = evbuffer_new();
        if (packed &&
            gw_compress(r->w->comp, &r->gen->rt->cfg->compression, ac.enc, resp->body, packed) == 0 &&
            evbuffer_get_length(packed) < evbuffer_get_length(resp->body))
            body = packed;
        else
            ac.enc = GW_ENC_IDENTITY; /* no smaller, or failed: as it came */
    }
    struct evbuffer *extra = NULL;
    if (r->cache_key || r->cache_bypass) {
        extra = evbuffer_new();
        if (extra)
            cache_headers_plain(r, extra);
    }
    size_t extra_len = extra ? evbuffer_get_length(extra) : 0;
    pass_response_fields(r, resp, (int64_t)evbuffer_get_length(body), &ac,
                         extra_len ? (const char *)evbuffer_pullup(extra, -1) : NULL,
                         extra_len); /* X-Request-Id included */
    if (extra)
        evbuffer_free(extra);
    add_drain_header(r);
    r->status = resp->status;
    r->bytes = r->method == CONFIG_METHOD_HEAD ? 0 : evbuffer_get_length(body);
    finish_reply(r, resp->status, resp->reason[0] ? resp->reason : NULL, body);
    if (packed)
        evbuffer_free(packed);
}

/* ---- streamed answers ----
 *
 * An upstream answer over stream_threshold() (or a text/event-stream) goes to
 * the client as it arrives: the head (evhttp_send_reply_start), then each
 * piece the upstream module hands over (compressed piece by piece when it
 * qualifies), then the end (evhttp_send_reply_end). It is not stored in the
 * cache. Flow control: once more than GW_STREAM_HIGH_BYTES wait in the client
 * connection's output, the upstream is not read until evhttp says that output
 * has drained (the chunk callback), so a slow client costs at most that much
 * plus one read (UPSTREAM_READ_BUDGET) here. The upstream's `timeout` is then
 * an idle one between reads (upstream.c). An upstream that fails or goes idle
 * mid-stream: what arrived is sent, then the client connection is closed
 * without the final chunk, so the client sees a cut answer (as with nginx). A
 * client that goes away: evhttp's close callback (on_connection_closed) finds
 * the stream through gw_conn.stream; the upstream connection is closed, not
 * reused.
 *
 * Reentrancy: evhttp may close the client connection from inside a send (a
 * TLS write error), i.e. inside this code. So every entry marks in_callback,
 * the close only marks client_gone then, and stream_settle() acts on it when
 * the entry is done. */

typedef struct gw_stream {
    gw_conn *conn;           /* the client connection, or NULL when not tracked */
    struct bufferevent *bev; /* its bufferevent: flow control reads its output */
    gw_encoder *enc;         /* compressing piece by piece, or NULL */
    struct evbuffer *piece;  /* compressed bytes on their way to evhttp */
    struct evbuffer *held;   /* what arrived while the head waits for invalidations */
    const char *target;      /* borrowed from the runtime (the request pins it) */
    char *reason;            /* the upstream's reason phrase, or NULL */
    int status;
    bool head_sent;
    bool paused;           /* the upstream is not read: the client is behind */
    bool in_callback;      /* one of the entries below is running */
    bool client_gone;      /* evhttp closed the client connection */
    bool cut;              /* the upstream broke off: close the client connection once its output drained */
    bool ended;            /* the upstream's body ended while the head was held */
    bool restore_timeouts; /* the bufferevent's read timeout was lifted for the stream */
} gw_stream;

static void stream_free(gw_request *r)
{
    gw_stream *s = r->stream;
    if (!s)
        return;
    if (s->conn && s->conn->stream == r)
        s->conn->stream = NULL;
    gw_encoder_end(s->enc);
    if (s->piece)
        evbuffer_free(s->piece);
    if (s->held)
        evbuffer_free(s->held);
    free(s->reason);
    free(s);
    r->stream = NULL;
}

static size_t stream_output_len(const gw_stream *s)
{
    return s->bev && !s->client_gone ? evbuffer_get_length(bufferevent_get_output(s->bev)) : 0;
}

/* The client connection's deadlines while the answer streams. Direct I/O
 * (ours, see client_pump): the send deadline runs only while output waits,
 * so between two pieces nothing runs but the upstream's idle timeout. evhttp's
 * own bufferevent (TLS): its read timeout, armed for close detection, would
 * cut a quiet stream (an event stream between events), so it is lifted until
 * the end; its write timeout stays. */
static void stream_client_deadlines(gw_request *r, bool streaming)
{
    gw_stream *s = r->stream;
    if (!s->bev || s->client_gone || (s->conn && s->conn->fd >= 0))
        return;
    int64_t ms = r->gen->rt->cfg->server.read_timeout_ms;
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
    if (streaming) {
        bufferevent_set_timeouts(s->bev, NULL, &tv);
        s->restore_timeouts = true;
    } else if (s->restore_timeouts) {
        bufferevent_set_timeouts(s->bev, &tv, &tv);
        s->restore_timeouts = false;
    }
}

static void stream_drained(struct evhttp_connection *evcon, void *arg);

/* Send a piece (compressed first when the answer is), and stop reading the
 * upstream when the client is behind. false: the encoder failed (the answer
 * cannot go on). */
static bool stream_push(gw_request *r, struct evbuffer *in, gw_encoder_op op)
{
    gw_stream *s = r->stream;
    struct evbuffer *piece = in;
    bool ok = true;
    if (s->enc) {
        if (in && gw_encoder_write(s->enc, in, s->piece, op) != 0) {
            gw_log(CONFIG_LOG_ERROR, r->request_id, "upstream %s: compressing a streamed answer failed",
                   r->upstream_name);
            ok = false;
        }
        piece = s->piece;
    }
    size_t n = piece ? evbuffer_get_length(piece) : 0;
    if (n && r->req && !s->client_gone) {
        r->bytes += n;
        gw_reply_chunk(r->req, piece, stream_drained, r);
    }
    if (piece)
        evbuffer_drain(piece, evbuffer_get_length(piece)); /* what evhttp did not take (client gone) */
    if (!s->paused && r->call && !s->client_gone && stream_output_len(s) > GW_STREAM_HIGH_BYTES) {
        s->paused = true;
        upstream_call_pause(r->call, true);
    }
    return ok;
}

/* Close the client connection without the answer's end (its body is cut),
 * and end r. */
static void stream_cut_close(gw_request *r)
{
    gw_stream *s = r->stream;
    struct evhttp_request *req = r->req;
    struct evhttp_connection *evcon = req ? evhttp_request_get_connection(req) : NULL;
    if (s->conn)
        s->conn->stream = NULL; /* its close callback must not find r */
    s->conn = NULL;
    r->req = NULL;
    request_end(r);
    if (evcon)
        evhttp_connection_free(evcon); /* frees req with it */
    else if (req)
        evhttp_request_free(req);
}

/* After an entry: act on a client that left or an upstream that broke off
 * meanwhile. true: the upstream call goes on. from_upstream: called from one
 * of the call's callbacks, which then returns false and upstream.c closes it;
 * otherwise the call is cancelled here. r may be gone when this returns
 * false. */
static bool stream_settle(gw_request *r, bool from_upstream)
{
    gw_stream *s = r->stream;
    s->in_callback = false;
    if (!s->client_gone && !s->cut)
        return true;
    if (r->call && !from_upstream)
        upstream_call_cancel(r->call);
    r->call = NULL;
    if (s->client_gone) {
        gw_log(CONFIG_LOG_INFO, r->request_id, "client went away during a streamed answer, after %zu bytes",
               r->bytes);
        inval_hand_over(r);
        request_end(r);
    } else if (!s->head_sent || r->bytes == 0 || stream_output_len(s) == 0) {
        /* (Before any piece evhttp has no chunk callback to call.) Otherwise
         * stream_drained closes it once what arrived is out. */
        stream_cut_close(r);
    }
    return false;
}

/* evhttp is closing the client connection (on_connection_closed): the client
 * left, failed, or missed its send deadline. */
static void stream_client_gone(gw_request *r)
{
    gw_stream *s = r->stream;
    s->client_gone = true;
    s->conn = NULL;
    s->bev = NULL; /* freed with the connection */
    /* A request evhttp let go of (an error while it was ours) is ours to
     * free; one still on the connection goes with it. */
    if (r->req && !evhttp_request_get_connection(r->req))
        evhttp_request_free(r->req);
    r->req = NULL;
    if (!s->in_callback)
        stream_settle(r, false);
}

/* The upstream's body ended: the last piece and the answer's end. */
static void stream_finish(gw_request *r)
{
    gw_stream *s = r->stream;
    stream_client_deadlines(r, false);
    if (s->conn)
        s->conn->stream = NULL;
    s->conn = NULL;
    if (r->req)
        gw_reply_end(r->req);
    r->req = NULL;
    request_end(r);
}

/* The upstream broke off: what arrived goes out first, then the close. */
static void stream_broke(gw_request *r, upstream_body_event ev)
{
    gw_stream *s = r->stream;
    gw_log(CONFIG_LOG_WARN, r->request_id, "upstream %s (%s): streamed answer cut after %zu bytes: %s",
           r->upstream_name, s->target ? s->target : "-", r->bytes,
           ev == UPSTREAM_BODY_TIMEOUT ? "timed out" : "failed");
    s->cut = true;
}

static void stream_send_head(gw_request *r)
{
    gw_stream *s = r->stream;
    s->head_sent = true;
    gw_reply_start(r->req, s->status, s->reason);
    stream_client_deadlines(r, true);
}

/* upstream_head_fn: the answer streams. */
static bool stream_head(void *arg, const upstream_response *resp, const char *target)
{
    gw_request *r = arg;
    if (r->stale && cache_stale_on_error(r, resp->status)) { /* an error answer, and a stale copy to serve */
        r->call = NULL;
        return false;
    }
    struct evhttp_connection *evcon = evhttp_request_get_connection(r->req);
    gw_stream *s = evcon ? calloc(1, sizeof *s) : NULL;
    if (!s) {
        r->call = NULL;
        if (evcon) {
            respond_error(r, 502, "out of memory");
            return false;
        }
        /* The client left before the head (evhttp let go of req). */
        evhttp_request_free(r->req);
        r->req = NULL;
        r->status = resp->status;
        request_end(r);
        return false;
    }
    r->stream = s;
    s->conn = conn_find(&r->w->conns, evcon);
    if (s->conn)
        s->conn->stream = r;
    s->bev = evhttp_connection_get_bufferevent(evcon);
    s->target = target;
    s->status = resp->status;
    s->reason = resp->reason[0] ? strdup(resp->reason) : NULL;
    s->in_callback = true;
    r->status = resp->status;
    /* Not stored (over max_object_bytes): whoever waits for this key fetches
     * on its own now rather than at the stream's end. */
    flight_end(r, NULL, SERVE_MISS);
    if (r->cluster_lock) {
        cache_rstore_unlock(r->w->cstore, r->cache_key, r->cache_key_len, r->lock_token);
        r->cluster_lock = false;
    }

    answer_coding ac;
    choose_coding(r, resp, true, &ac);
    if (ac.enc != GW_ENC_IDENTITY) {
        s->enc = gw_encoder_start(r->w->comp, &r->gen->rt->cfg->compression, ac.enc,
                                  resp->content_length > 0 ? (size_t)resp->content_length : 0);
        s->piece = evbuffer_new();
        if (!s->enc || !s->piece) {
            gw_encoder_end(s->enc);
            s->enc = NULL;
            ac.enc = GW_ENC_IDENTITY; /* as it came */
        }
    }
    bool head = r->method == CONFIG_METHOD_HEAD;
    int64_t length = ac.enc == GW_ENC_IDENTITY ? resp->content_length : -1;
    struct evbuffer *extra = NULL;
    if (r->cache_key || r->cache_bypass) {
        extra = evbuffer_new();
        if (extra)
            cache_headers_plain(r, extra);
    }
    size_t extra_len = extra ? evbuffer_get_length(extra) : 0;
    pass_response_fields(r, resp, length, &ac, extra_len ? (const char *)evbuffer_pullup(extra, -1) : NULL,
                         extra_len);
    if (extra)
        evbuffer_free(extra);
    add_drain_header(r);
    /* No length and no chunked coding for HTTP/1.0: the close ends the body.
     * evhttp judges keep-alive (and then adds Content-Length: 0) by the
     * request's own Connection field, so that goes. */
    if (length < 0 && !head && r->req->major == 1 && r->req->minor == 0) {
        evhttp_remove_header(evhttp_request_get_input_headers(r->req), "Connection");
        evhttp_add_header(evhttp_request_get_output_headers(r->req), "Connection", "close");
    }
    if (head) {
        /* A HEAD fetched as GET to fill the cache, and the answer is too
         * large to store: the head is all the client wants. */
        r->call = NULL;
        gw_reply(r->req, s->status, s->reason, NULL);
        r->req = NULL;
        request_end(r);
        return false;
    }
    if (hold_for_invalidations(r, resp->status)) {
        /* The head waits for the route's invalidations (as a buffered answer
         * does), and so does the upstream: nothing more is read meanwhile. */
        s->held = evbuffer_new();
        if (s->held)
            evbuffer_add_buffer(s->held, resp->body);
        s->paused = true;
        upstream_call_pause(r->call, true);
        return stream_settle(r, true);
    }
    stream_send_head(r);
    if (!stream_push(r, resp->body, GW_ENCODER_FLUSH))
        s->cut = true;
    return stream_settle(r, true);
}

/* The invalidations a streamed answer's head waited for are done (or
 * timed out): the head, what arrived, and the upstream goes on. */
static void stream_release(gw_request *r)
{
    gw_stream *s = r->stream;
    if (r->hold_timer)
        evtimer_del(r->hold_timer);
    s->in_callback = true;
    stream_send_head(r);
    if (!stream_push(r, s->held, s->ended ? GW_ENCODER_FINISH : GW_ENCODER_FLUSH))
        s->cut = true;
    if (s->ended && !s->cut && !s->client_gone) {
        s->in_callback = false;
        stream_finish(r);
        return;
    }
    if (s->paused && r->call && !s->cut && !s->client_gone && stream_output_len(s) <= GW_STREAM_HIGH_BYTES) {
        s->paused = false;
        upstream_call_pause(r->call, false);
    }
    stream_settle(r, false);
}

/* upstream_body_fn: more of the body, its end, or a break. */
static bool stream_body(void *arg, struct evbuffer *body, upstream_body_event ev, bool drained)
{
    gw_request *r = arg;
    gw_stream *s = r->stream;
    if (ev != UPSTREAM_BODY_MORE)
        r->call = NULL; /* already freed */
    s->in_callback = true;
    if (!s->head_sent) { /* held (cannot normally happen: the call is paused meanwhile) */
        if (s->held && body)
            evbuffer_add_buffer(s->held, body);
        if (ev == UPSTREAM_BODY_END)
            s->ended = true;
        else if (ev != UPSTREAM_BODY_MORE)
            stream_broke(r, ev);
        return stream_settle(r, true);
    }
    switch (ev) {
    case UPSTREAM_BODY_MORE:
        /* Flush a compressor when the upstream has nothing more just now:
         * the client gets all that arrived (an event stream's events at once);
         * while data keeps coming, the encoder keeps its own pace. */
        if (!stream_push(r, body, drained ? GW_ENCODER_FLUSH : GW_ENCODER_PROCESS))
            s->cut = true;
        break;
    case UPSTREAM_BODY_END:
        if (!stream_push(r, body, GW_ENCODER_FINISH)) {
            s->cut = true;
            break;
        }
        if (!s->client_gone) {
            s->in_callback = false;
            stream_finish(r);
            return false;
        }
        break;
    default:
        stream_push(r, body, GW_ENCODER_FLUSH);
        stream_broke(r, ev);
        break;
    }
    return stream_settle(r, true);
}

/* evhttp's chunk callback: the client connection's output is empty. */
static void stream_drained(struct evhttp_connection *evcon, void *arg)
{
    gw_request *r = arg;
    gw_stream *s = r->stream;
    if (!s)
        return;
    if (s->conn && s->conn->fd >= 0 && s->conn->read_timer)
        evtimer_del(s->conn->read_timer); /* no send deadline while nothing waits (see client_pump) */
    if (s->cut) {
        stream_cut_close(r);
        return;
    }
    if (s->paused && r->call && s->head_sent) {
        s->paused = false;
        upstream_call_pause(r->call, false);
    }
}

/* The request-target to send upstream: origin-form path and query. Usually
 * the client's own (borrowed from req); built into *owned for absolute-form. */
static const char *upstream_uri(struct evhttp_request *req, char **owned)
{
    const char *raw = evhttp_request_get_uri(req);
    *owned = NULL;
    if (raw[0] == '/')
        return raw;
    const struct evhttp_uri *u = evhttp_request_get_evhttp_uri(req);
    const char *path = u ? evhttp_uri_get_path(u) : NULL;
    const char *query = u ? evhttp_uri_get_query(u) : NULL;
    if (asprintf(owned, "%s%s%s", path && *path ? path : "/", query ? "?" : "", query ? query : "") < 0) {
        *owned = NULL;
        return NULL;
    }
    return *owned;
}

static void proxy(gw_request *r, int upstream_index)
{
    const gw_runtime *rt = r->gen->rt;
    const config_upstream *u = &rt->cfg->upstreams[upstream_index];
    r->upstream_name = u->name;
    bool idempotent = method_is_idempotent(r->method);
    /* An idempotent request may be sent again (another target, or a fresh
     * connection after a stale keep-alive one): keep its body, send references. */
    r->retry_body = idempotent;
    uint64_t deadline = r->start_ns + (uint64_t)rt->cfg->server.request_timeout_ms * 1000000ULL;
    const char *uri = upstream_uri(r->req, &r->uri_owned);
    if (!uri) {
        respond_error(r, 500, "out of memory");
        return;
    }
    enum evhttp_cmd_type cmd = evhttp_request_get_command(r->req);
    /* A HEAD the cache may answer fetches the GET entry it is answered from. */
    if (cmd == EVHTTP_REQ_HEAD && r->cache_key && !r->cache_bypass)
        cmd = EVHTTP_REQ_GET;
    static const upstream_handlers handlers = {fill_upstream_request, upstream_done, stream_head,
                                               stream_body};
    r->call = upstream_call_start(r->gen->ups, (size_t)upstream_index, cmd, uri, idempotent, deadline,
                                  stream_threshold(r), &handlers, r);
    if (!r->call)
        respond_error(r, 500, "out of memory");
}

/* ---- rate limiting ----------------------------------------------------------------- */

/* The client's address for client_ip keys: the peer, or, when the peer is a
 * trusted proxy, the last X-Forwarded-For entry that is not one (walking from
 * the right: entries left of an untrusted hop could be forged). */
static void limit_client(gw_request *r, char *out, size_t size)
{
    const gw_runtime *rt = r->gen->rt;
    size_t len = strnlen(r->client, size - 1);
    memcpy(out, r->client, len);
    out[len] = '\0';
    if (!rt->trusted_count || !gw_cidr_match(rt->trusted, rt->trusted_count, r->client))
        return;
    /* Every X-Forwarded-For line, as one list (RFC 9110 5.3): the proxy's
     * own is usually the last line, so they are walked from the last. */
    const char *lines[32];
    size_t nlines = 0;
    const struct evkeyval *h;
    TAILQ_FOREACH(h, evhttp_request_get_input_headers(r->req), next)
    {
        if (strcasecmp(h->key, "X-Forwarded-For") == 0) {
            if (nlines == sizeof lines / sizeof lines[0])
                memmove(lines, lines + 1, sizeof lines - sizeof lines[0]); /* keep the last ones */
            else
                nlines++;
            lines[nlines - 1] = h->value;
        }
    }
    for (size_t li = nlines; li-- > 0;) {
        if (!gw_forwarded_for_walk(rt->trusted, rt->trusted_count, lines[li], out, size))
            return;
    }
}

/* The first header field named name[0..len) (any case), or NULL. */
static const char *limit_header(gw_request *r, const char *name, size_t len)
{
    const struct evkeyval *h;
    TAILQ_FOREACH(h, evhttp_request_get_input_headers(r->req), next)
    {
        if (strncasecmp(h->key, name, len) == 0 && h->key[len] == '\0')
            return h->value;
    }
    return NULL;
}

/* Takes one part of a key's material: part[0..len] (its terminating NUL included). */
typedef void (*limit_part_fn)(void *arg, const char *part, size_t len);

/* The policy's key material, part by part to fn: its name, then each part of
 * `key` (client_ip, route, header:NAME; an absent header is "\n", which no
 * value can be, so it differs from an empty one and from every other), each
 * with its NUL. Nothing is cut, whatever the length of a header or the number
 * of parts: two requests whose parts differ anywhere never share a bucket. */
static void limit_key_parts(gw_request *r, const config_policy *pol, const char *route, limit_part_fn fn,
                            void *arg)
{
    char ip[INET6_ADDRSTRLEN + 1];
    bool have_ip = false;
    fn(arg, pol->name, strlen(pol->name));
    for (const char *p = pol->key; *p;) {
        size_t n = strcspn(p, "+");
        if (n == 9 && strncmp(p, "client_ip", 9) == 0) {
            if (!have_ip)
                limit_client(r, ip, sizeof ip);
            have_ip = true;
            fn(arg, ip, strlen(ip));
        } else if (n == 5 && strncmp(p, "route", 5) == 0) {
            fn(arg, route, strlen(route));
        } else if (n > 7) { /* header:NAME (the configuration allows nothing else) */
            const char *v = limit_header(r, p + 7, n - 7);
            fn(arg, v ? v : "\n", v ? strlen(v) : 1); /* no value is "\n": evhttp ends a line there */
        }
        p += n + (p[n] == '+');
    }
}

/* The local store's key: rl_hash over the parts one after the other. */
typedef struct limit_hash {
    uint64_t seed, h;
} limit_hash;

static void limit_hash_part(void *arg, const char *part, size_t len)
{
    limit_hash *k = arg;
    k->h = rl_hash(k->seed, part, len + 1, k->h);
}

#define GW_RL_KEY_STACK 1024 /* key material up to this size is built on the stack, longer on the heap */

/* The Redis store's key: the material itself (rlredis hashes it with SHA-1
 * into the key name), on the stack and moved to the heap when it outgrows it. */
typedef struct limit_material {
    char *buf; /* stack, or heap (caller frees) when heap */
    size_t len, cap;
    bool heap, oom;
    char stack[GW_RL_KEY_STACK];
} limit_material;

static void limit_material_part(void *arg, const char *part, size_t len)
{
    limit_material *m = arg;
    if (m->oom)
        return;
    if (len + 1 > m->cap - m->len) {
        size_t cap = m->cap;
        while (len + 1 > cap - m->len)
            cap *= 2;
        char *b = m->heap ? realloc(m->buf, cap) : malloc(cap);
        if (!b) {
            m->oom = true;
            return;
        }
        if (!m->heap)
            memcpy(b, m->buf, m->len);
        m->buf = b;
        m->cap = cap;
        m->heap = true;
    }
    memcpy(m->buf + m->len, part, len + 1);
    m->len += len + 1;
}

/* n >= 0 in decimal into out (at least 21 bytes), NUL-terminated: the
 * three RateLimit-* values of every limited answer, where snprintf's
 * machinery cost more than the rest of the header work. */
static const char *limit_decimal(int64_t n, char out[21])
{
    uint64_t v = n > 0 ? (uint64_t)n : 0;
    char *p = out + 20;
    *p = '\0';
    do {
        *--p = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return p;
}

/* The three RateLimit-* fields as ONE output entry, keyed RateLimit-Limit,
 * whose value holds the other two lines (as pass_response_fields joins the
 * upstream's fields): evhttp writes every entry with a printf of its own and
 * allocates three pieces per entry, which for three entries was most of what
 * a limited request cost. */
static void set_limit_headers(gw_request *r, const rl_decision *d)
{
    struct evkeyvalq *oh = evhttp_request_get_output_headers(r->req);
    char v[21], value[128];
    const char *s = limit_decimal(d->limit, v);
    size_t n = strlen(s);
    memcpy(value, s, n);
    memcpy(value + n, "\r\nRateLimit-Remaining: ", 23);
    n += 23;
    s = limit_decimal(d->remaining, v);
    memcpy(value + n, s, strlen(s));
    n += strlen(s);
    memcpy(value + n, "\r\nRateLimit-Reset: ", 19);
    n += 19;
    s = limit_decimal((d->reset_ms + 999) / 1000, v);
    memcpy(value + n, s, strlen(s) + 1);
    struct evkeyval *kv = calloc(1, sizeof *kv);
    if (kv) {
        kv->key = strdup("RateLimit-Limit");
        kv->value = strdup(value);
    }
    if (!kv || !kv->key || !kv->value) { /* out of memory: nothing half-made */
        if (kv) {
            free(kv->key);
            free(kv->value);
            free(kv);
        }
        return;
    }
    TAILQ_INSERT_TAIL(oh, kv, next);
    r->limit_shown = true;
}

/* A request's rate-limit decisions, while Redis answers: one call for all of
 * the route's policies (all or nothing). */
struct gw_rl_state {
    size_t n;                                     /* the route's policies */
    size_t m;                                     /* the ones defined, in the call */
    unsigned char idx[CONFIG_ROUTE_POLICIES_MAX]; /* call position -> route position */
    rl_redis_call *call;
    rl_decision dec[CONFIG_ROUTE_POLICIES_MAX];
    /* No store decided: on_store_error allow or deny did, by configuration
     * (dec[] then holds no numbers worth showing, only allowed). */
    bool undecided;
};

static void count_fallback(gw_request *r)
{
    metrics_series_t *fb = metrics_series(r->w->shard, r->w->srv->metrics.ratelimit_fallbacks, NULL);
    if (fb)
        metrics_counter_add(fb, 1);
}

/* Every policy through the local store, all or nothing; fallback: each
 * decision counts as a store fallback (on_store_error: local). */
static void limit_local(gw_request *r, bool fallback)
{
    const gw_runtime *rt = r->gen->rt;
    const config_route *route = &rt->cfg->routes[r->route_index];
    struct gw_rl_state *st = r->rl;
    rl_local_policy lp[CONFIG_ROUTE_POLICIES_MAX];
    rl_decision d[CONFIG_ROUTE_POLICIES_MAX];
    size_t m = 0;
    for (size_t j = 0; j < st->m; j++) {
        const config_policy *pol = rt->route_policies[r->route_index][st->idx[j]];
        limit_hash key = {r->w->srv->rl_seed, 0};
        limit_key_parts(r, pol, route->name, limit_hash_part, &key);
        lp[m++] = (rl_local_policy){key.h, pol->limit, pol->window_ms, pol->dry_run};
    }
    rl_local_take_all(r->w->srv->rl, lp, m, gw_now_ns(), d);
    for (size_t j = 0; j < m; j++) {
        st->dec[st->idx[j]] = d[j];
        if (fallback || d[j].no_room)
            count_fallback(r);
    }
}

/* Decide every policy without Redis: ratelimit.on_store_error. With local
 * the local store decides; with allow or deny no store does (undecided):
 * allow lets the request go with no numbers, deny refuses it (a 429 in the
 * name of each enforced policy: Remaining 0, the window as Reset,
 * Retry-After 1 s). */
static void limit_fallback(gw_request *r)
{
    const gw_runtime *rt = r->gen->rt;
    const config_ratelimit *rc = &rt->cfg->ratelimit;
    struct gw_rl_state *st = r->rl;
    if (rc->on_store_error == CONFIG_ON_ERROR_LOCAL) {
        limit_local(r, true);
        return;
    }
    bool allow = rc->on_store_error == CONFIG_ON_ERROR_ALLOW;
    st->undecided = true;
    for (size_t j = 0; j < st->m; j++) {
        const config_policy *pol = rt->route_policies[r->route_index][st->idx[j]];
        count_fallback(r);
        st->dec[st->idx[j]] = (rl_decision){.allowed = allow,
                                            .limit = pol->limit,
                                            .remaining = 0,
                                            .reset_ms = pol->window_ms,
                                            .retry_after_ms = allow ? 0 : 1000};
    }
}

static void backend(gw_request *r);

/* Every policy has decided: count, then 429 or go on. False when the
 * request was answered.
 *
 * Counted (gateway_ratelimit_requests_total): a policy's decision when a
 * store (Redis, or the local one) made it, allowed or limited, dry-run ones
 * included; not a policy that had room for a request another refused
 * (other_refused), and nothing that on_store_error allow or deny decided,
 * except an enforced policy's 429 under deny (limited: it was sent).
 *
 * Shown (RateLimit-*): on a 429 the refusing policy that frees up last (and
 * Retry-After); else the enforced policy with the least room; on a route
 * whose policies are all dry-run, the dry-run one with the least room (never
 * a 429, never Retry-After). Nothing when no store decided and the request
 * goes on (on_store_error allow): there are no numbers to tell. */
static bool limit_finish(gw_request *r)
{
    const gw_runtime *rt = r->gen->rt;
    const gw_metrics *m = &r->w->srv->metrics;
    struct gw_rl_state *st = r->rl;
    rl_decision shown = {0}, refused = {0}, dry = {0};
    bool any = false, any_dry = false, limited = false;
    for (size_t i = 0; i < st->n; i++) {
        const config_policy *pol = rt->route_policies[r->route_index][i];
        const rl_decision *d = &st->dec[i];
        if (!pol || d->other_refused)
            continue;
        if (st->undecided && (d->allowed || pol->dry_run))
            continue;
        const char *labels[2] = {pol->name, d->allowed ? "allowed" : "limited"};
        metrics_series_t *s = metrics_series(r->w->shard, m->ratelimit, labels);
        if (s)
            metrics_counter_add(s, 1);
        if (pol->dry_run) {
            if (!any_dry || d->remaining < dry.remaining)
                dry = *d;
            any_dry = true;
            continue;
        }
        if (!d->allowed) {
            if (!limited || d->retry_after_ms > refused.retry_after_ms)
                refused = *d;
            limited = true;
        } else if (!any || d->remaining < shown.remaining) {
            shown = *d;
        }
        any = true;
    }
    if (limited) {
        set_limit_headers(r, &refused);
        char secs[24];
        long long wait_s = (refused.retry_after_ms + 999) / 1000;
        snprintf(secs, sizeof secs, "%lld", wait_s > 0 ? wait_s : 1);
        evhttp_add_header(evhttp_request_get_output_headers(r->req), "Retry-After", secs);
        respond_error_close(r, 429, "rate limited", false);
        return false;
    }
    if (any)
        set_limit_headers(r, &shown);
    else if (any_dry)
        set_limit_headers(r, &dry);
    return true;
}

/* rl_redis_done_fn: the request's policies decided by Redis (or not:
 * on_store_error decides them all). */
static void limit_redis_done(void *arg, bool ok, const rl_decision *d)
{
    gw_request *r = arg;
    struct gw_rl_state *st = r->rl;
    st->call = NULL;
    if (ok) {
        for (size_t j = 0; j < st->m; j++)
            st->dec[st->idx[j]] = d[j];
    } else {
        limit_fallback(r);
    }
    if (limit_finish(r))
        backend(r);
}

static void limit_state_free(gw_request *r)
{
    struct gw_rl_state *st = r->rl;
    if (!st)
        return;
    rl_redis_cancel(st->call);
    free(st);
    r->rl = NULL;
}

/* The route's policies, all or nothing: a request one of them refuses costs
 * the others nothing. 0: go on to the backend; 1: answered (429 or an
 * error); 2: waiting for Redis (limit_redis_done goes on). */
static int rate_limit(gw_request *r)
{
    const gw_runtime *rt = r->gen->rt;
    const config_route *route = &rt->cfg->routes[r->route_index];
    const config_ratelimit *rc = &rt->cfg->ratelimit;
    size_t n = route->ratelimit_count;
    struct gw_rl_state *st = calloc(1, sizeof *st);
    r->rl = st;
    if (!st || n > CONFIG_ROUTE_POLICIES_MAX) { /* the configuration allows no more */
        respond_error(r, 503, !st ? "out of memory" : "too many rate-limit policies");
        return 1;
    }
    st->n = n;
    for (size_t i = 0; i < n; i++)
        if (rt->route_policies[r->route_index][i])
            st->idx[st->m++] = (unsigned char)i;
    if (rc->store != CONFIG_STORE_REDIS) {
        limit_local(r, false);
        return limit_finish(r) ? 0 : 1;
    }
    limit_material keys[CONFIG_ROUTE_POLICIES_MAX];
    rl_redis_policy rp[CONFIG_ROUTE_POLICIES_MAX];
    bool oom = false;
    for (size_t j = 0; j < st->m; j++) {
        const config_policy *pol = rt->route_policies[r->route_index][st->idx[j]];
        limit_material *k = &keys[j];
        k->buf = k->stack;
        k->len = 0;
        k->cap = sizeof k->stack;
        k->heap = k->oom = false;
        limit_key_parts(r, pol, route->name, limit_material_part, k);
        oom |= k->oom;
        rp[j] = (rl_redis_policy){.key = k->buf,
                                  .key_len = k->len,
                                  .limit = pol->limit,
                                  .window_ms = pol->window_ms,
                                  .dry_run = pol->dry_run};
    }
    /* The material is hashed into key names within rl_redis_take: freed after. */
    st->call = st->m && !oom ? rl_redis_take(r->w->rlr, rp, st->m, limit_redis_done, r) : NULL;
    for (size_t j = 0; j < st->m; j++)
        if (keys[j].heap)
            free(keys[j].buf);
    if (oom) {
        respond_error(r, 503, "out of memory");
        return 1;
    }
    if (st->call)
        return 2;
    if (st->m)
        limit_fallback(r); /* not connected: decide now */
    return limit_finish(r) ? 0 : 1;
}

/* ---- SQL routes ------------------------------------------------------------------ */

/* Move the output header entries after mark (all when NULL) into lines as
 * "Name: value\r\n" (dropped when lines is NULL). */
static void take_fields_after(struct evkeyvalq *oh, struct evkeyval *mark, struct evbuffer *lines)
{
    struct evkeyval *kv = mark ? TAILQ_NEXT(mark, next) : TAILQ_FIRST(oh);
    while (kv) {
        struct evkeyval *next = TAILQ_NEXT(kv, next);
        if (lines)
            evbuffer_add_printf(lines, "%s: %s\r\n", kv->key, kv->value);
        TAILQ_REMOVE(oh, kv, next);
        free(kv->key);
        free(kv->value);
        free(kv);
        kv = next;
    }
}

/* pool_done_fn: the statement's result becomes the answer. */
static void sql_done(void *arg, const pool_result *result)
{
    gw_request *r = arg;
    r->sql_call = NULL;
    const config_route_sql *sql = &r->gen->rt->cfg->routes[r->route_index].sql;
    if (result->status >= 500) {
        const char *state = result->res ? PQresultErrorField(result->res, PG_DIAG_SQLSTATE) : NULL;
        const char *msg = result->res ? PQresultErrorField(result->res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
        gw_log(result->status == 503 ? CONFIG_LOG_DEBUG : CONFIG_LOG_WARN, r->request_id,
               "route %s: %s%s%s%s%s", r->gen->rt->cfg->routes[r->route_index].name,
               result->error ? result->error : "statement failed", state ? ": SQLSTATE " : "",
               state ? state : "", msg ? ": " : "", msg ? msg : "");
    }
    struct evbuffer *body = evbuffer_new();
    if (!body) {
        respond_error(r, 503, "out of memory");
        return;
    }
    struct evkeyvalq *oh = evhttp_request_get_output_headers(r->req);
    struct evkeyval *mark = TAILQ_LAST(oh, evkeyvalq); /* what is there before the answer's fields */
    int status = sqlroute_build(r->req, sql, &r->sql, result, r->request_id, body);
    if (r->stale && status >= 500 && cache_stale_usable(r)) {
        take_fields_after(oh, mark, NULL);
        cache_stale_on_error(r, status);
        evbuffer_free(body);
        return;
    }
    const config_t *cfg = r->gen->rt->cfg;
    const config_route *route = &cfg->routes[r->route_index];
    if (r->cache_key && !r->cache_bypass && status_storable(&route->cache, status) &&
        evbuffer_get_length(body) <= (size_t)cfg->cache.max_object_bytes) {
        /* The fields sqlroute_build gave the answer become the entry's. */
        struct evbuffer *lines = evbuffer_new();
        if (lines)
            take_fields_after(oh, mark, lines);
        size_t n = lines ? evbuffer_get_length(lines) : 0;
        const char *text = n ? (const char *)evbuffer_pullup(lines, -1) : "";
        bool json = status == 200 && gw_compress_type_ok(&cfg->compression, "application/json", 16);
        cache_entry *e =
            lines ? entry_make(r, status, text, n, body, json, route->cache.ttl_ms, true, 0) : NULL;
        if (lines)
            evbuffer_free(lines);
        if (e) {
            evbuffer_free(body);
            cache_store_serve(r, e);
            return;
        }
    }
    add_common_headers(r);
    if (r->cache_key || r->cache_bypass) {
        struct evbuffer *extra = evbuffer_new();
        if (extra) {
            cache_headers_plain(r, extra);
            block_install(r, extra);
            evbuffer_free(extra);
        }
    }
    struct evbuffer *out = body, *packed = NULL;
    if (status == 200) {
        char joined[1024];
        const char *ae =
            gw_accept_encoding_of(evhttp_request_get_input_headers(r->req), joined, sizeof joined);
        out = gw_compress_own(r->w->comp, &cfg->compression, ae, r->method == CONFIG_METHOD_HEAD, 200,
                              "application/json", body, oh, &packed);
    }
    r->status = status;
    r->bytes = r->method == CONFIG_METHOD_HEAD || status == 204 ? 0 : evbuffer_get_length(out);
    finish_reply(r, status, status == 409 ? "Conflict" : NULL, status == 204 ? NULL : out);
    if (packed)
        evbuffer_free(packed);
    evbuffer_free(body);
}

static void sql_route(gw_request *r, const router_match *m)
{
    const gw_runtime *rt = r->gen->rt;
    const config_route_sql *sql = &rt->cfg->routes[r->route_index].sql;
    const gw_sql_plan *plan = &rt->route_sql[r->route_index];
    r->upstream_name = sql->database;
    const char *why = NULL;
    int status = sqlroute_params_build(sql, plan, m, r->req, &r->sql, &why);
    if (status != 0) {
        respond_error_close(r, status, why, false); /* a well-formed request: keep the connection */
        return;
    }
    pool_request pr = {
        .database = sql->database,
        .query = plan->query,
        .nparams = r->sql.count,
        .values = (const char *const *)r->sql.values,
        .session = evhttp_request_get_connection(r->req),
        .deadline_ns = r->start_ns + (uint64_t)rt->cfg->server.request_timeout_ms * 1000000ULL,
    };
    r->sql_call = pool_exec(r->w->pool, &pr, sql_done, r);
    if (!r->sql_call)
        respond_error(r, 500, "out of memory");
}

/* ---- the pipeline ------------------------------------------------------------ */

/* RFC 9110 tchar, without a library call: this runs for every byte of every
 * header name. */
static bool is_tchar(unsigned char c)
{
    unsigned char lower = c | 0x20;
    if ((lower >= 'a' && lower <= 'z') || (c >= '0' && c <= '9'))
        return true;
    switch (c) {
    case '!':
    case '#':
    case '$':
    case '%':
    case '&':
    case '\'':
    case '*':
    case '+':
    case '-':
    case '.':
    case '^':
    case '_':
    case '`':
    case '|':
    case '~':
        return true;
    default:
        return false;
    }
}

/* What on_request checks of the request line and headers, gathered in one
 * walk over them. */
typedef struct request_shape {
    size_t header_bytes; /* the header block as received, request line included */
    bool well_formed;
    int host_count;
} request_shape;

/* evhttp 2.1 accepts spaces and bare CRs in the request-target and any bytes
 * before a header's colon; passed on verbatim they would let a client smuggle a
 * second request or framing header to an upstream that parses differently. So
 * the target must have no space or control byte, names must be tokens and
 * values free of CR and LF. */
static void inspect_request(struct evhttp_request *req, const struct evkeyvalq *in, request_shape *shape)
{
    const unsigned char *p = (const unsigned char *)evhttp_request_get_uri(req);
    shape->well_formed = true;
    shape->host_count = 0;
    shape->header_bytes = 20 + 2; /* method, version, CRLFs */
    for (; *p; p++, shape->header_bytes++)
        if (*p <= 0x20 || *p == 0x7f)
            shape->well_formed = false;
    const struct evkeyval *h;
    TAILQ_FOREACH(h, in, next)
    {
        const unsigned char *k = (const unsigned char *)h->key, *v = (const unsigned char *)h->value;
        if (!*k)
            shape->well_formed = false;
        for (p = k; *p; p++)
            if (!is_tchar(*p))
                shape->well_formed = false;
        for (p = v; *p; p++)
            if (*p == '\r' || *p == '\n')
                shape->well_formed = false;
        shape->header_bytes += (size_t)(p - v) + strlen(h->key) + 4;
        shape->host_count += strcasecmp(h->key, "Host") == 0;
    }
}

static void client_address(struct evhttp_request *req, char *out, size_t size)
{
    struct evhttp_connection *evcon = evhttp_request_get_connection(req);
    char *addr = NULL;
    ev_uint16_t port = 0;
    if (evcon)
        evhttp_connection_get_peer(evcon, &addr, &port);
    const char *a = addr ? addr : "-";
    size_t n = strnlen(a, size - 1);
    memcpy(out, a, n);
    out[n] = '\0';
}

/* evhttp wrote the whole answer: the connection waits for its next request. */
static void reply_done(struct evhttp_request *req, void *arg)
{
    gw_conn *c = arg;
    c->replying = false;
    c->w->replying--;
    if (evhttp_request_get_command(req) == EVHTTP_REQ_CONNECT) {
        /* evhttp keeps a CONNECT connection open (a tunnel, it assumes) and sends
         * no Content-Length: end the answer by closing, from the timer, outside
         * evhttp's stack. */
        static const struct timeval now = {0, 0};
        evtimer_add(c->read_timer, &now);
        return;
    }
    if (!c->w->draining)
        evtimer_add(c->read_timer, c->w->read_deadline);
}

static void on_request(struct evhttp_request *req, void *arg)
{
    gw_worker *w = arg;
    worker_gen *gen = w->gen;
    const config_t *cfg = gen->rt->cfg;
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
    if (!path || !*path)
        path = "/";

    gw_conn *c = conn_find(&w->conns, evhttp_request_get_connection(req));
    if (c) {
        evtimer_del(c->read_timer);
        c->replying = true;
        w->replying++;
        evhttp_request_set_on_complete_cb(req, reply_done, c);
    }
    if (gw_builtin_serve(w->srv, cfg, req, path))
        return;

    gw_request *r = calloc(1, sizeof *r);
    if (!r) {
        gw_send_json_error(req, 503, "out of memory", "-");
        return;
    }
    r->w = w;
    r->gen = gen;
    gen->refs++;
    r->req = req;
    r->path = path;
    if (cfg->log.access)
        r->log_path = strdup(path);
    r->route_index = -1;
    r->method = (unsigned)evhttp_request_get_command(req);
    r->start_ns = gw_now_ns();
    r->next = w->requests;
    if (w->requests)
        w->requests->prev = r;
    w->requests = r;
    w->in_flight++;
    if (w->in_flight_gauge)
        metrics_gauge_add(w->in_flight_gauge, 1);
    client_address(req, r->client, sizeof r->client);

    struct evkeyvalq *in = evhttp_request_get_input_headers(req);
    const char *rid = evhttp_find_header(in, "X-Request-Id");
    if (gw_request_id_is_sane(rid))
        snprintf(r->request_id, sizeof r->request_id, "%s", rid);
    else
        gw_rng_hex(&w->rng, r->request_id, GW_REQUEST_ID_MINTED / 2);
    const char *tp = evhttp_find_header(in, "traceparent");
    if (tp && strlen(tp) == GW_TRACEPARENT_LEN && gw_traceparent_is_valid(tp))
        memcpy(r->traceparent, tp, GW_TRACEPARENT_LEN + 1);
    else
        gw_traceparent_mint(&w->rng, r->traceparent);

    request_shape shape;
    inspect_request(req, in, &shape);
    if (shape.header_bytes > (size_t)cfg->server.max_header_bytes) {
        respond_error(r, 431, "request header fields too large");
        return;
    }
    if (evbuffer_get_length(evhttp_request_get_input_buffer(req)) > (size_t)cfg->server.max_body_bytes) {
        respond_error(r, 413, "request body too large");
        return;
    }

    if (!shape.well_formed) {
        respond_error(r, 400, "malformed request line or header field");
        return;
    }
    if (!gw_path_is_safe(path)) {
        respond_error(r, 400, "path with a dot-segment or NUL");
        return;
    }
    if (shape.host_count > 1) {
        respond_error(r, 400, "more than one Host header");
        return;
    }

    router_match m;
    router_match_path(gen->rt->router, path, r->method, &m);
    if (m.status == 405) {
        char allow[96];
        router_allow_header(m.allow, allow, sizeof allow);
        evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", allow);
        respond_error(r, 405, "method not allowed");
        return;
    }
    if (m.status != 0) {
        respond_error(r, 404, "no route");
        return;
    }
    r->route_index = m.route_index;
    r->match = m;
    if (cfg->routes[m.route_index].ratelimit_count && rate_limit(r) != 0)
        return;
    backend(r);
}

/* After routing and rate limiting: the cache, when the route has one and
 * the method is GET or HEAD; else straight to the backend. */
static void backend(gw_request *r)
{
    const config_route *route = &r->gen->rt->cfg->routes[r->route_index];
    if (route->cache.enabled && (r->method == CONFIG_METHOD_GET || r->method == CONFIG_METHOD_HEAD)) {
        cache_lookup(r);
        return;
    }
    fetch(r);
}

/* The route's upstream or its SQL. */
static void fetch(gw_request *r)
{
    int up = r->gen->rt->route_upstream[r->route_index];
    if (up < 0) {
        sql_route(r, &r->match);
        return;
    }
    proxy(r, up);
}

/* ---- built-in endpoints -------------------------------------------------------- */

static void free_rendered(const void *data, size_t len, void *arg)
{
    free((void *)data);
}

static void send_text(struct evhttp_request *req, int status, const char *type, const char *text)
{
    struct evbuffer *b = evbuffer_new();
    if (b)
        evbuffer_add(b, text, strlen(text));
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", type);
    gw_reply(req, status, NULL, b);
    if (b)
        evbuffer_free(b);
}

bool gw_builtin_serve(gw_server *srv, const config_t *cfg, struct evhttp_request *req, const char *path)
{
    bool is_metrics = strcmp(path, cfg->metrics.path) == 0;
    bool is_live = strcmp(path, "/live") == 0;
    bool is_ready = strcmp(path, "/ready") == 0;
    if (!is_metrics && !is_live && !is_ready)
        return false;
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    if (cmd != EVHTTP_REQ_GET && cmd != EVHTTP_REQ_HEAD) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET, HEAD");
        gw_send_json_error(req, 405, "method not allowed", "");
        return true;
    }
    if (is_live) {
        send_text(req, 200, "application/json", "{\"status\":\"live\"}\n");
    } else if (is_ready) {
        bool ready = atomic_load(&srv->ready) && !atomic_load(&srv->draining) && pool_ready(srv->pool, cfg);
        send_text(req, ready ? 200 : 503, "application/json",
                  ready ? "{\"status\":\"ready\"}\n" : "{\"status\":\"not ready\"}\n");
    } else {
        size_t len = 0;
        char *text = metrics_render(srv->metrics.reg, &len);
        struct evbuffer *b = evbuffer_new();
        if (!text || !b) {
            free(text);
            if (b)
                evbuffer_free(b);
            gw_send_json_error(req, 500, "cannot render metrics", "");
            return true;
        }
        evbuffer_add_reference(b, text, len, free_rendered, NULL);
        evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
                          "text/plain; version=0.0.4; charset=utf-8");
        gw_reply(req, 200, NULL, b);
        evbuffer_free(b);
    }
    return true;
}

/* ---- connections and the connection cap ------------------------------------------ */

static void set_listening(gw_worker *w, bool on)
{
    if (w->draining || w->listening == on)
        return;
    for (size_t i = 0; i < w->listen_count; i++) {
        if (on)
            evconnlistener_enable(w->listeners[i]);
        else
            evconnlistener_disable(w->listeners[i]);
    }
    w->listening = on;
}

static void broadcast_accept(gw_server *srv, gw_worker *self)
{
    for (int i = 0; i < srv->worker_count; i++) {
        if (srv->workers[i] == self)
            set_listening(self, !atomic_load(&srv->accept_paused));
        else
            gw_worker_post(srv->workers[i], GW_WORKER_MSG_ACCEPT);
    }
}

static void uncount_connection(gw_worker *w)
{
    gw_server *srv = w->srv;
    long open = atomic_fetch_sub(&srv->connections, 1) - 1;
    bool paused = true;
    /* While draining, workers are being joined and freed: post to none. */
    if (!atomic_load(&srv->draining) && open < srv->max_connections &&
        atomic_compare_exchange_strong(&srv->accept_paused, &paused, false))
        broadcast_accept(srv, w);
}

/* evhttp is freeing the connection. The socket is closed, and c freed, from
 * the flush event: evhttp still shuts the fd down after this callback, and
 * pump code up the stack may still look at c->closed. */
static void on_connection_closed(struct evhttp_connection *evcon, void *arg)
{
    gw_conn *c = arg;
    gw_worker *w = c->w;
    if (c->stream) { /* the client left (or timed out) while its answer streamed */
        gw_request *r = c->stream;
        c->stream = NULL;
        stream_client_gone(r);
    }
    if (c->replying)
        w->replying--;
    c->replying = false;
    if (c->own_req) {
        /* Ours alone: answered (or being written), or the pipeline is gone
         * (a forced stop); one the pipeline still holds was let go before. */
        c->own_req->evcon = NULL;
        evhttp_request_free(c->own_req);
        c->own_req = NULL;
    }
    c->own_chunk_cb = NULL;
    conn_remove(&w->conns, c);
    pool_session_end(w->pool, evcon);
    if (c->read_timer)
        event_free(c->read_timer);
    c->read_timer = NULL;
    if (c->io)
        event_free(c->io); /* out of epoll while the fd is still open */
    c->io = NULL;
    c->closed = true;
    c->next_dead = w->dead;
    w->dead = c;
    event_active(w->flush_ev, EV_TIMEOUT, 0);
    uncount_connection(w);
}

static void own_fail(gw_conn *c);

static void read_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_conn *c = arg;
    if (c->own) {
        own_fail(c); /* lets a request the pipeline holds go first */
        return;
    }
    /* Not inside any evhttp callback, and the only request of ours that can be
     * in flight on it is one streaming its answer to a client that stopped
     * reading (the timer stops when a request has been read, and runs again
     * only while an answer waits to be written): its close callback tells that
     * request (stream_client_gone). Safe to free here. */
    evhttp_connection_free(c->evcon);
}

/* ---- direct client I/O -------------------------------------------------------------
 *
 * For plain HTTP, evhttp keeps its bufferevent but loses the socket: once evhttp
 * has wrapped a new connection, the fd is taken from the bufferevent (which is
 * left with fd -1, so it never touches epoll) and registered once, edge-
 * triggered for reading and writing, for the connection's life. We move bytes
 * between the socket and the bufferevent's buffers and run evhttp's callbacks
 * with bufferevent_trigger(), only when evhttp has that direction enabled, just
 * as the socket bufferevent would. What it saves per request: evhttp toggles its
 * events three times (three epoll_ctl), reads with an ioctl(FIONREAD) first,
 * and writes only on the next loop iteration; here there is none of that, and
 * answers go out in the iteration that produced them. */

static void client_pump(gw_conn *c);

static void mark_later(gw_conn *c);

static void mark_dirty(gw_conn *c)
{
    if (c->dirty || c->closed)
        return;
    if (c->w->in_flush) {
        /* Marked by its own pump, or another's, during a flush pass: an event
         * activated now would run in this same pass, before the loop polls
         * again, and a pipelining client could keep it going forever. */
        mark_later(c);
        return;
    }
    c->dirty = true;
    c->next_dirty = c->w->dirty;
    c->w->dirty = c;
    event_active(c->w->flush_ev, EV_TIMEOUT, 0);
}

/* A connection with work left after its turn goes to the back: it runs again
 * only after the loop has polled every socket, so one busy client cannot
 * starve the others. */
static void mark_later(gw_conn *c)
{
    static const struct timeval now = {0, 0};
    if (c->later || c->closed)
        return;
    c->later = true;
    c->next_later = c->w->later;
    c->w->later = c;
    evtimer_add(c->w->later_timer, &now);
}

/* evbuffer callback on the bufferevent's output: evhttp queued bytes. */
static void client_output_cb(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg)
{
    if (info->n_added > 0)
        mark_dirty(arg);
}

/* Free connections evhttp has closed, unless still listed for a later turn. */
static void reap_dead(gw_worker *w)
{
    gw_conn *keep = NULL;
    while (w->dead) {
        gw_conn *c = w->dead;
        w->dead = c->next_dead;
        if (c->dirty || c->later) {
            c->next_dead = keep;
            keep = c;
            continue;
        }
        if (c->fd >= 0)
            close(c->fd);
        if (c->parser) {
            http1_request_free(c->parser);
            free(c->parser);
        }
        free(c);
    }
    w->dead = keep;
}

static void flush_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_worker *w = arg;
    /* Take the list as it is now: connections marked while it runs wait for
     * the next poll (mark_dirty sends them to the later list). */
    gw_conn *list = w->dirty;
    w->dirty = NULL;
    w->in_flush = true;
    while (list) {
        gw_conn *c = list;
        list = c->next_dirty;
        c->dirty = false;
        if (!c->closed)
            client_pump(c);
    }
    w->in_flush = false;
    reap_dead(w);
}

static void later_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_worker *w = arg;
    gw_conn *list = w->later;
    w->later = NULL;
    w->in_flush = true;
    while (list) {
        gw_conn *c = list;
        list = c->next_later;
        c->later = false;
        if (!c->closed)
            client_pump(c);
    }
    w->in_flush = false;
    reap_dead(w);
}

static void client_io_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_conn *c = arg;
    if (what & (EV_READ | EV_CLOSED))
        c->readable = true;
    if (what & EV_CLOSED)
        c->peer_closed = true;
    if (what & EV_WRITE)
        c->writable = true;
    client_pump(c);
}

/* Write what waits in out until it is empty or the socket is full. -1: a
 * write error (the caller fails the connection). A client slow to read has
 * read_timeout between two writes that make progress (the timer is otherwise
 * idle while an answer is out: it stops when the request has been read). */
static int client_write(gw_conn *c, struct evbuffer *out)
{
    bool wrote = false;
    while (evbuffer_get_length(out) > 0) {
        ssize_t n = gw_write_socket(c->fd, out);
        if (n >= 0) {
            wrote = true;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            c->writable = false;
            break;
        }
        return -1;
    }
    if (evbuffer_get_length(out) > 0 && (wrote || !evtimer_pending(c->read_timer, NULL)))
        evtimer_add(c->read_timer, c->w->read_deadline);
    return 0;
}

/* Read what the client sent into in, up to w->input_high. 1: end of stream;
 * 0: fine; -1: error. *got: bytes read. */
static int client_read(gw_conn *c, struct evbuffer *in, size_t *got)
{
    switch (gw_read_socket(c->fd, in, GW_CLIENT_READ_CHUNK, 2, c->w->input_high, c->peer_closed, got)) {
    case GW_READ_DRAINED:
        c->readable = false;
        return 0;
    case GW_READ_LIMIT:
        return 0; /* enough waiting for evhttp; c->readable stays set */
    case GW_READ_EOF:
        return 1;
    default:
        return -1;
    }
}

/* Move what can move, in both directions, and tell evhttp. Any trigger may end
 * in evhttp freeing the connection: c->closed says so (c itself lives on until
 * the flush event). Reading stops while evhttp has reading off (it is working
 * on a request) or w->input_high bytes (the largest request evhttp accepts)
 * are waiting for it, so a pipelining client cannot make us buffer without
 * bound; the socket's own buffer holds the rest. An end of stream seen while evhttp is not reading is
 * held until it reads again, as a socket bufferevent would only notice it then:
 * a client that half-closes after its request still gets the answer. */
static void client_pump(gw_conn *c)
{
    if (c->own) {
        client_pump_own(c);
        return;
    }
    struct bufferevent *bev = c->bev;
    gw_worker *w = c->w;
    for (int round = 0; round < 8 && !c->closed; round++) {
        bool progress = false;
        struct evbuffer *out = bufferevent_get_output(bev);
        struct evbuffer *in = bufferevent_get_input(bev);
        if (c->writable && evbuffer_get_length(out) > 0) {
            if (client_write(c, out) != 0) {
                bufferevent_trigger_event(bev, BEV_EVENT_ERROR | BEV_EVENT_WRITING, 0);
                return;
            }
            if (evbuffer_get_length(out) == 0 && (bufferevent_get_enabled(bev) & EV_WRITE)) {
                bufferevent_trigger(bev, EV_WRITE, 0); /* evhttp: the answer is out */
                if (c->closed)
                    return;
                progress = true;
                /* A pipelined request may already be buffered: evhttp re-enabled
                 * reading and waits for a read callback. */
                if ((bufferevent_get_enabled(bev) & EV_READ) && evbuffer_get_length(in) > 0) {
                    bufferevent_trigger(bev, EV_READ, 0);
                    if (c->closed)
                        return;
                }
            }
        }
        bool reading = (bufferevent_get_enabled(bev) & EV_READ) != 0;
        if (c->eof_pending && reading && evbuffer_get_length(in) == 0) {
            bufferevent_trigger_event(bev, BEV_EVENT_EOF | BEV_EVENT_READING, 0);
            return;
        }
        if (c->readable && !c->eof_pending && reading && evbuffer_get_length(in) < w->input_high) {
            size_t got;
            int r = client_read(c, in, &got);
            if (r < 0) {
                bufferevent_trigger_event(bev, BEV_EVENT_ERROR | BEV_EVENT_READING, 0);
                return;
            }
            if (r > 0)
                c->eof_pending = true;
            if (got > 0) {
                bufferevent_trigger(bev, EV_READ, 0);
                if (c->closed)
                    return;
                progress = true;
            } else if (r > 0) {
                progress = true; /* deliver the end of stream on the next round */
            }
        }
        if (!progress)
            return;
    }
    if (!c->closed && (c->readable || c->writable || c->eof_pending))
        mark_later(c); /* more to do: after everyone else */
}

/* Take the socket from evhttp's bufferevent (see above). On failure the
 * connection simply stays with evhttp's own I/O. */
static void client_take_over(gw_conn *c)
{
    gw_worker *w = c->w;
    int fd = bufferevent_getfd(c->bev);
    if (fd < 0)
        return;
    c->io = event_new(w->base, fd, EV_READ | EV_WRITE | EV_CLOSED | EV_PERSIST | EV_ET, client_io_cb, c);
    if (!c->io)
        return;
    if (!evbuffer_add_cb(bufferevent_get_output(c->bev), client_output_cb, c)) {
        event_free(c->io);
        c->io = NULL;
        return;
    }
    bufferevent_setfd(c->bev, -1);                /* its events leave epoll; it never reads or writes again */
    bufferevent_set_timeouts(c->bev, NULL, NULL); /* read deadlines are ours (c->read_timer) */
    c->fd = fd;
    if (event_add(c->io, NULL) != 0) {
        /* Cannot watch it: let evhttp fail it like a dead peer. */
        bufferevent_trigger_event(c->bev, BEV_EVENT_ERROR | BEV_EVENT_READING, 0);
    }
}

/* ---- own server side ---------------------------------------------------------------
 *
 * For plain HTTP with direct I/O, evhttp does not parse requests or write
 * answers either: the connection object it made at accept stays idle (its
 * bufferevent has no fd and evhttp never runs again on it), kept for its peer
 * address and its close callback (on_connection_closed, as before). Requests
 * are parsed by gateway/http1.c from the bytes client_pump_own reads; each
 * becomes an evhttp_request made here (so the pipeline reads it with the same
 * calls), tagged by its callback (own_request_tag) with the connection as its
 * argument, and handed to on_request. Answers go through gw_reply*, which
 * write the head with http1_write_head. One request at a time per connection,
 * as with evhttp: a pipelined request is parsed once the answer before it has
 * been written. */

static void own_request_tag(struct evhttp_request *req, void *arg)
{
    (void)req;
    (void)arg;
}

/* The connection of one of our requests, NULL when the client left (the
 * request is then the caller's to free, as evhttp does with one it let go). */
static gw_conn *own_conn_of(struct evhttp_request *req)
{
    return req->cb_arg;
}

static bool is_own_request(const struct evhttp_request *req)
{
    return req->cb == own_request_tag;
}

_Static_assert(CONFIG_METHOD_GET == EVHTTP_REQ_GET && CONFIG_METHOD_POST == EVHTTP_REQ_POST &&
                   CONFIG_METHOD_HEAD == EVHTTP_REQ_HEAD && CONFIG_METHOD_PUT == EVHTTP_REQ_PUT &&
                   CONFIG_METHOD_DELETE == EVHTTP_REQ_DELETE && CONFIG_METHOD_OPTIONS == EVHTTP_REQ_OPTIONS &&
                   CONFIG_METHOD_TRACE == EVHTTP_REQ_TRACE && CONFIG_METHOD_CONNECT == EVHTTP_REQ_CONNECT &&
                   CONFIG_METHOD_PATCH == EVHTTP_REQ_PATCH,
               "CONFIG_METHOD_* are evhttp's command values");

/* The method token as evhttp's command (the CONFIG_METHOD_* bits are its
 * values, see on_request); false for one evhttp 2.1 has none for. */
static bool own_method(const char *m, size_t n, enum evhttp_cmd_type *type)
{
    for (unsigned bit = CONFIG_METHOD_GET; bit <= CONFIG_METHOD_PATCH; bit <<= 1) {
        const char *name = gw_method_name(bit);
        if (strlen(name) == n && memcmp(name, m, n) == 0) {
            *type = (enum evhttp_cmd_type)bit;
            return true;
        }
    }
    return false;
}

/* The client is gone (or broke the protocol) while a request may be ours or
 * the pipeline's: let the pipeline's copy go (it frees it when it answers,
 * as with evhttp), then close. */
static void own_fail(gw_conn *c)
{
    if (c->own_req && (c->own_state == OWN_BUSY || c->own_state == OWN_STREAMING)) {
        c->own_req->evcon = NULL;
        c->own_req->cb_arg = NULL;
        c->own_req = NULL;
    }
    c->own_chunk_cb = NULL;
    evhttp_connection_free(c->evcon);
}

/* A request we cannot take: a JSON error, then the connection closes (its
 * framing cannot be trusted after it). Not counted in http_requests_total:
 * no route or method is known (evhttp's own error pages were not either). */
static void own_error(gw_conn *c, int status, const char *text)
{
    struct evbuffer *out = bufferevent_get_output(c->bev);
    struct evbuffer *body = evbuffer_new();
    char id[GW_REQUEST_ID_MINTED + 1];
    gw_rng_hex(&c->w->rng, id, GW_REQUEST_ID_MINTED / 2);
    if (body)
        gw_error_body(body, status, text, id);
    struct evkeyvalq h;
    struct evkeyval type = {.key = "Content-Type", .value = "application/json"};
    struct evkeyval rid = {.key = "X-Request-Id", .value = id};
    TAILQ_INIT(&h);
    TAILQ_INSERT_TAIL(&h, &type, next);
    TAILQ_INSERT_TAIL(&h, &rid, next);
    http1_head_framing fr = {.content_length = body ? (int64_t)evbuffer_get_length(body) : 0,
                             .close = true,
                             .date = http1_date(time(NULL))};
    if (http1_write_head(out, 1, status, NULL, &h, &fr) == 0 && body)
        evbuffer_add_buffer(out, body);
    if (body)
        evbuffer_free(body);
    c->own_state = OWN_CLOSING;
}

/* The answer before a close is out: stop writing, and read and drop what the
 * client still sends until it closes or OWN_LINGER_MS pass (the read timer,
 * whose callback closes). */
static void own_linger(gw_conn *c)
{
    static const struct timeval tv = {OWN_LINGER_MS / 1000, (OWN_LINGER_MS % 1000) * 1000};
    if (c->eof_pending) { /* the client has closed its side already */
        evhttp_connection_free(c->evcon);
        return;
    }
    shutdown(c->fd, SHUT_WR);
    c->own_state = OWN_LINGERING;
    c->linger_end_ns = gw_now_ns() + (uint64_t)OWN_LINGER_MAX_MS * 1000000ULL;
    evbuffer_drain(bufferevent_get_input(c->bev), evbuffer_get_length(bufferevent_get_input(c->bev)));
    if (c->data_waiting)
        c->readable = true;
    evtimer_add(c->read_timer, &tv);
    mark_dirty(c); /* read what is already waiting */
}

/* While an answer streams: has the client closed? Looked for without taking
 * what it sent, so a pipelined request stays in the socket under TCP's flow
 * control, and the close behind it (if any) is seen after the answer, as a
 * half-closing client is owed. true: closed or failed (at its end of stream
 * a client is gone, as nginx judges it: 499). */
static bool client_closed_while_streaming(gw_conn *c)
{
    char b;
    ssize_t n = recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0)
        return true;
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            return true;
        c->readable = false; /* nothing there */
        return false;
    }
    c->readable = false; /* a request waits: read once the answer is out */
    c->data_waiting = true;
    return false;
}

/* A complete request: make it an evhttp_request and hand it to on_request. */
static void own_dispatch(gw_conn *c)
{
    http1_request *p = c->parser;
    enum evhttp_cmd_type type;
    if (!own_method(p->method, p->method_len, &type)) {
        own_error(c, 501, "method not implemented");
        return;
    }
    struct evhttp_request *req = evhttp_request_new(own_request_tag, c);
    if (!req) {
        own_error(c, 503, "out of memory");
        return;
    }
    req->kind = EVHTTP_REQUEST;
    req->type = type;
    req->major = 1;
    req->minor = (char)p->minor_version;
    req->evcon = c->evcon;
    req->uri = malloc(p->target_len + 1);
    if (req->uri) {
        memcpy(req->uri, p->target, p->target_len + 1);
        /* CONNECT's target is host:port (authority-form), no URI: an empty one,
         * so that routing sees "/" and answers 405, as with evhttp. */
        req->uri_elems = type == EVHTTP_REQ_CONNECT
                             ? evhttp_uri_new()
                             : evhttp_uri_parse_with_flags(req->uri, EVHTTP_URI_NONCONFORMANT);
    }
    bool ok = req->uri_elems != NULL;
    for (size_t i = 0; ok && i < p->field_count; i++)
        ok = evhttp_add_header(req->input_headers, p->fields[i].name, p->fields[i].value) == 0;
    if (!ok) {
        req->evcon = NULL;
        evhttp_request_free(req);
        own_error(c, 400, "malformed request target or header field");
        return;
    }
    evbuffer_add_buffer(req->input_buffer, p->body);
    c->own_req = req;
    c->own_state = OWN_BUSY;
    on_request(req, c->w);
}

/* Parse what is buffered while the connection is reading: dispatch each
 * complete request (one at a time), answer a malformed one. */
static void own_parse(gw_conn *c)
{
    struct evbuffer *in = bufferevent_get_input(c->bev);
    while (c->own_state == OWN_READING && !c->closed) {
        /* Without the end of stream first: an error in what did arrive is
         * answered; only a request cut short by the end is closed silently. */
        http1_result res = http1_parse(c->parser, in, false);
        if (res == HTTP1_NEED_MORE && c->eof_pending) {
            own_fail(c); /* gone between requests, or in the middle of one */
            return;
        }
        if (res == HTTP1_NEED_MORE) {
            if (c->parser->head_done && c->parser->expect_continue && !c->own_continue_sent) {
                c->own_continue_sent = true;
                evbuffer_add(bufferevent_get_output(c->bev), "HTTP/1.1 100 Continue\r\n\r\n", 25);
            }
            return;
        }
        if (res == HTTP1_ERROR) {
            own_error(c, c->parser->error_status, c->parser->error);
            return;
        }
        own_dispatch(c);
    }
}

/* The whole answer is written: the request is done; the connection closes or
 * reads the next one (perhaps already buffered). */
static void own_complete(gw_conn *c)
{
    struct evhttp_request *req = c->own_req;
    c->own_req = NULL;
    c->own_state = OWN_READING;
    c->own_chunked = false;
    c->own_continue_sent = false;
    if (req) {
        req->evcon = NULL;
        if (req->on_complete_cb)
            req->on_complete_cb(req, req->on_complete_cb_arg); /* reply_done */
        evhttp_request_free(req);
    }
    if (c->closed)
        return;
    if (c->own_close) {
        /* A client that sent more (pipelined, or a body we did not read)
         * gets the answer before the close. */
        if (evbuffer_get_length(bufferevent_get_input(c->bev)) > 0 || c->readable)
            own_linger(c);
        else
            evhttp_connection_free(c->evcon);
        return;
    }
    http1_request_reset(c->parser);
    if (c->data_waiting) {
        c->data_waiting = false;
        c->readable = true;
    }
    own_parse(c);
}

/* The answer's head: the status line, the output entries, and the framing
 * evhttp would have added (Content-Length, chunked for a stream of unknown
 * length over HTTP/1.1, Date, Connection). */
static bool own_write_head(gw_conn *c, struct evhttp_request *req, int status, const char *reason,
                           size_t body_len, bool streaming)
{
    struct evkeyvalq *oh = evhttp_request_get_output_headers(req);
    bool has_length = false, has_date = false, says_close = false;
    struct evkeyval *connection = NULL;
    struct evkeyval *h;
    TAILQ_FOREACH(h, oh, next)
    {
        switch (strlen(h->key)) {
        case 4:
            has_date = has_date || strcasecmp(h->key, "Date") == 0;
            break;
        case 10:
            if (strcasecmp(h->key, "Connection") == 0) {
                connection = h;
                says_close = says_close || gw_header_list_has_token(h->value, "close");
            }
            break;
        case 14:
            has_length = has_length || strcasecmp(h->key, "Content-Length") == 0;
            break;
        case 17:
            has_length = has_length || strcasecmp(h->key, "Transfer-Encoding") == 0;
            break;
        default:
            break;
        }
    }
    bool head = req->type == EVHTTP_REQ_HEAD;
    bool bodiless = status < 200 || status == 204 || status == 304;
    bool close = !c->parser->keep_alive || says_close || req->type == EVHTTP_REQ_CONNECT;
    http1_head_framing fr = {.content_length = -1};
    c->own_chunked = false;
    if (!bodiless && !has_length && !head) {
        if (!streaming)
            fr.content_length = (int64_t)body_len;
        else if (req->minor >= 1)
            fr.chunked = c->own_chunked = true;
        else
            close = true; /* HTTP/1.0 and no length: the close ends the body */
    }
    if (close && connection && !says_close) {
        TAILQ_REMOVE(oh, connection, next);
        free(connection->key);
        free(connection->value);
        free(connection);
        connection = NULL;
    }
    fr.close = close && !says_close;
    if (!close && req->minor == 0 && !connection)
        evhttp_add_header(oh, "Connection", "keep-alive");
    fr.date = has_date ? NULL : http1_date(time(NULL));
    c->own_close = close;
    if (http1_write_head(bufferevent_get_output(c->bev), req->minor, status, reason, oh, &fr) == 0)
        return true;
    c->own_close = true; /* out of memory: no head, so no body either, and the close */
    return false;
}

static void gw_reply(struct evhttp_request *req, int status, const char *reason, struct evbuffer *body)
{
    if (!is_own_request(req)) {
        evhttp_send_reply(req, status, reason, body);
        return;
    }
    gw_conn *c = own_conn_of(req);
    if (!c) {
        evhttp_request_free(req); /* the client left */
        return;
    }
    size_t len = body ? evbuffer_get_length(body) : 0;
    bool head_ok = own_write_head(c, req, status, reason, len, false);
    if (head_ok && len && req->type != EVHTTP_REQ_HEAD && status >= 200 && status != 204 && status != 304)
        evbuffer_add_buffer(bufferevent_get_output(c->bev), body);
    else if (len)
        evbuffer_drain(body, len);
    c->own_state = OWN_REPLIED;
    mark_dirty(c); /* finished from the pump, even with nothing written */
}

static void gw_reply_start(struct evhttp_request *req, int status, const char *reason)
{
    if (!is_own_request(req)) {
        evhttp_send_reply_start(req, status, reason);
        return;
    }
    gw_conn *c = own_conn_of(req);
    if (!c)
        return; /* freed by the stream's end (stream_client_gone) */
    c->own_state = OWN_STREAMING;
    if (!own_write_head(c, req, status, reason, 0, true))
        own_fail(c); /* out of memory for the head: the stream ends as if the client left */
}

static void gw_reply_chunk(struct evhttp_request *req, struct evbuffer *buf,
                           void (*cb)(struct evhttp_connection *, void *), void *arg)
{
    if (!is_own_request(req)) {
        evhttp_send_reply_chunk_with_cb(req, buf, cb, arg);
        return;
    }
    gw_conn *c = own_conn_of(req);
    size_t len = evbuffer_get_length(buf);
    if (!c || len == 0 || c->own_state != OWN_STREAMING)
        return;
    struct evbuffer *out = bufferevent_get_output(c->bev);
    if (c->own_chunked) {
        char size[24];
        static const char hex[] = "0123456789abcdef";
        size_t n = sizeof size;
        size[--n] = '\n';
        size[--n] = '\r';
        do
            size[--n] = hex[len & 15];
        while ((len >>= 4) != 0);
        evbuffer_add(out, size + n, sizeof size - n);
    }
    evbuffer_add_buffer(out, buf);
    if (c->own_chunked)
        evbuffer_add(out, "\r\n", 2);
    c->own_chunk_cb = cb;
    c->own_chunk_arg = arg;
}

static void gw_reply_end(struct evhttp_request *req)
{
    if (!is_own_request(req)) {
        evhttp_send_reply_end(req);
        return;
    }
    gw_conn *c = own_conn_of(req);
    if (!c) {
        evhttp_request_free(req);
        return;
    }
    if (c->own_chunked && c->own_state == OWN_STREAMING)
        evbuffer_add(bufferevent_get_output(c->bev), "0\r\n\r\n", 5);
    c->own_chunk_cb = NULL;
    c->own_state = OWN_REPLIED;
    /* Nothing left to write (the last piece is out): done now, from the pump. */
    mark_dirty(c);
}

/* client_pump for our own server side: write what waits, finish what the
 * written output finishes, read and parse. Any step may close the connection
 * (c->closed; c itself lives until the flush event). */
static void client_pump_own(gw_conn *c)
{
    struct evbuffer *out = bufferevent_get_output(c->bev);
    struct evbuffer *in = bufferevent_get_input(c->bev);
    gw_worker *w = c->w;
    for (int round = 0; round < 8 && !c->closed; round++) {
        bool progress = false;
        if (c->writable && evbuffer_get_length(out) > 0 && client_write(c, out) != 0) {
            own_fail(c);
            return;
        }
        if (evbuffer_get_length(out) == 0) {
            if (c->own_chunk_cb) {
                void (*cb)(struct evhttp_connection *, void *) = c->own_chunk_cb;
                c->own_chunk_cb = NULL;
                cb(c->evcon, c->own_chunk_arg);
                if (c->closed)
                    return;
                progress = true;
            }
            if (c->own_state == OWN_CLOSING) {
                own_linger(c);
                if (c->closed)
                    return;
                progress = true;
            }
            if (c->own_state == OWN_REPLIED) {
                own_complete(c);
                if (c->closed)
                    return;
                progress = true;
            }
        }
        bool reading = c->own_state == OWN_READING;
        bool lingering = c->own_state == OWN_LINGERING;
        if (c->own_state == OWN_STREAMING && (c->readable || c->peer_closed) && !c->data_waiting &&
            evbuffer_get_length(in) == 0 && (c->eof_pending || client_closed_while_streaming(c))) {
            own_fail(c); /* the client left while its answer streamed */
            return;
        }
        if (c->readable && !c->eof_pending && (reading || lingering) &&
            evbuffer_get_length(in) < w->input_high) {
            size_t got;
            int r = client_read(c, in, &got);
            if (r < 0) {
                own_fail(c);
                return;
            }
            if (r > 0)
                c->eof_pending = true;
            if (lingering) {
                evbuffer_drain(in, evbuffer_get_length(in));
                if (r > 0 || gw_now_ns() >= c->linger_end_ns) {
                    evhttp_connection_free(c->evcon);
                    return;
                }
                if (got > 0) { /* still sending: another OWN_LINGER_MS */
                    static const struct timeval tv = {OWN_LINGER_MS / 1000, (OWN_LINGER_MS % 1000) * 1000};
                    evtimer_add(c->read_timer, &tv);
                    progress = true;
                }
            } else if (got > 0 || r > 0) {
                own_parse(c);
                if (c->closed)
                    return;
                progress = true;
            }
        } else if (c->eof_pending && lingering) {
            evhttp_connection_free(c->evcon);
            return;
        } else if (c->eof_pending && reading) {
            own_parse(c); /* what is buffered, then the end */
            if (c->closed)
                return;
            if (c->own_state == OWN_READING) {
                own_fail(c);
                return;
            }
        }
        if (!progress)
            return;
    }
    if (!c->closed && (c->readable || c->writable || c->eof_pending))
        mark_later(c);
}

static void pending_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_worker *w = arg;
    for (size_t i = 0; i < w->pending_count; i++) {
        void *cbarg = NULL;
        bufferevent_getcb(w->pending[i], NULL, NULL, NULL, &cbarg);
        struct evhttp_connection *evcon = cbarg;
        gw_conn *c = evcon ? calloc(1, sizeof *c) : NULL;
        if (c) {
            c->w = w;
            c->evcon = evcon;
            c->fd = -1;
            c->bev = w->pending[i];
            c->read_timer = evtimer_new(w->base, read_deadline_cb, c);
        }
        if (!c || !c->read_timer || conn_insert(&w->conns, c) != 0) {
            if (c && c->read_timer)
                event_free(c->read_timer);
            free(c);
            if (evcon) {
                gw_error("worker %d: out of memory tracking a connection; closing it", w->id);
                evhttp_connection_free(evcon); /* no closecb set yet */
            }
            uncount_connection(w);
            continue;
        }
        evhttp_connection_set_closecb(evcon, on_connection_closed, c);
        evtimer_add(c->read_timer, w->read_deadline);
        if (w->direct_io && !w->srv->tls) {
            client_take_over(c);
            if (c->fd >= 0 && w->own_http) {
                c->parser = malloc(sizeof *c->parser);
                if (c->parser &&
                    http1_request_init(c->parser, 2 * (size_t)w->gen->rt->cfg->server.max_header_bytes,
                                       (size_t)w->gen->rt->cfg->server.max_body_bytes) == 0) {
                    c->own = true;
                } else {
                    free(c->parser);
                    c->parser = NULL;
                }
            }
        }
    }
    w->pending_count = 0;
}

/* evhttp's bufferevent factory: the one hook evhttp 2.1 offers per accepted
 * connection. We count the connection here and, once evhttp has wrapped it
 * (later in this loop iteration), attach a close callback that uncounts it. */
static struct bufferevent *make_bufferevent(struct event_base *base, void *arg)
{
    gw_worker *w = arg;
    gw_server *srv = w->srv;
    struct bufferevent *bev;
    if (srv->tls && w->gen->rt->ssl_ctx) {
        SSL *ssl = SSL_new(w->gen->rt->ssl_ctx);
        if (!ssl)
            return NULL;
        bev = bufferevent_openssl_socket_new(base, -1, ssl, BUFFEREVENT_SSL_ACCEPTING, BEV_OPT_CLOSE_ON_FREE);
        if (!bev) {
            SSL_free(ssl);
            return NULL;
        }
        bufferevent_openssl_set_allow_dirty_shutdown(bev, 1);
    } else {
        bev = bufferevent_socket_new(base, -1, BEV_OPT_CLOSE_ON_FREE);
        if (!bev)
            return NULL;
    }
    if (w->pending_count == w->pending_cap) {
        size_t cap = w->pending_cap ? w->pending_cap * 2 : 64;
        struct bufferevent **p = realloc(w->pending, cap * sizeof *p);
        if (!p) {
            bufferevent_free(bev);
            return NULL;
        }
        w->pending = p;
        w->pending_cap = cap;
    }
    w->pending[w->pending_count++] = bev;
    event_active(w->pending_ev, EV_TIMEOUT, 0);
    long open = atomic_fetch_add(&srv->connections, 1) + 1;
    bool paused = false;
    if (!atomic_load(&srv->draining) && open >= srv->max_connections &&
        atomic_compare_exchange_strong(&srv->accept_paused, &paused, true))
        broadcast_accept(srv, w);
    return bev;
}

/* ---- drain and mailbox ---------------------------------------------------------- */

static void worker_stop(gw_worker *w)
{
    if (w->in_flight > 0)
        gw_warn("worker %d: drain deadline passed with %u requests in flight; closing them", w->id,
                w->in_flight);
    while (w->requests) {
        gw_request *r = w->requests;
        upstream_call_cancel(r->call);
        r->call = NULL;
        pool_cancel(r->sql_call);
        r->sql_call = NULL;
        limit_state_free(r);
        cache_request_drop(r);
        stream_free(r);
        sqlroute_params_free(&r->sql);
        w->requests = r->next;
        w->in_flight--;
        gen_unref(w, r->gen, false);
        free(r->uri_owned);
        free(r->log_path);
        free(r);
    }
    gw_access_log_flush(w->access);
    evhttp_free(w->http); /* closes idle client connections */
    w->http = NULL;
    later_cb(-1, 0, w);
    flush_cb(-1, 0, w); /* close their sockets */
    event_base_loopexit(w->base, NULL);
}

static void drain_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_worker *w = arg;
    if ((w->in_flight == 0 && w->replying == 0) || gw_now_ns() >= w->drain_deadline_ns) {
        worker_stop(w);
        return;
    }
    struct timeval tv = {0, GW_DRAIN_POLL_MS * 1000};
    evtimer_add(w->drain_timer, &tv);
}

static void start_drain(gw_worker *w)
{
    if (w->draining)
        return;
    w->draining = true;
    for (size_t i = 0; i < w->listen_count; i++) {
        evhttp_del_accept_socket(w->http, w->bound[i]); /* frees the listener, closes the socket */
        w->bound[i] = NULL;
        w->listeners[i] = NULL;
    }
    w->drain_deadline_ns = gw_now_ns() + (uint64_t)w->gen->rt->cfg->server.drain_timeout_ms * 1000000ULL;
    drain_timer_cb(-1, 0, w);
}

static void mailbox_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_worker *w = arg;
    uint64_t v;
    if (read(w->mailbox_fd, &v, sizeof v) < 0 && errno != EAGAIN)
        gw_warn("worker %d: mailbox read: %s", w->id, strerror(errno));
    gw_runtime *rt = atomic_exchange(&w->mailbox_rt, NULL);
    if (rt)
        install_runtime(w, rt);
    unsigned bits = atomic_exchange(&w->mailbox_bits, 0);
    if (bits & GW_WORKER_MSG_ACCEPT)
        set_listening(w, !atomic_load(&w->srv->accept_paused));
    if (bits & GW_WORKER_MSG_DRAIN)
        start_drain(w);
}

void gw_worker_post_runtime(gw_worker *w, gw_runtime *rt)
{
    gw_runtime_ref(rt);
    gw_runtime *old = atomic_exchange(&w->mailbox_rt, rt);
    gw_runtime_unref(old); /* never installed: superseded */
    uint64_t one = 1;
    if (write(w->mailbox_fd, &one, sizeof one) < 0)
        gw_error("worker %d: mailbox write: %s", w->id, strerror(errno));
}

void gw_worker_post(gw_worker *w, unsigned bits)
{
    atomic_fetch_or(&w->mailbox_bits, bits);
    uint64_t one = 1;
    if (write(w->mailbox_fd, &one, sizeof one) < 0)
        gw_error("worker %d: mailbox write: %s", w->id, strerror(errno));
}

/* ---- life cycle ----------------------------------------------------------------- */

static void worker_free(gw_worker *w)
{
    if (!w)
        return;
    pool_free(w->pool); /* before evhttp: calls still running are answered */
    w->pool = NULL;
    gw_compressor_free(w->comp);
    w->comp = NULL;
    rl_redis_free(w->rlr);
    w->rlr = NULL;
    cache_rstore_free(w->cstore);
    w->cstore = NULL;
    if (w->inval_retry_timer)
        event_free(w->inval_retry_timer);
    for (size_t i = 0; i < w->inval_retry_count; i++)
        free(w->inval_retry[i]);
    if (w->http)
        evhttp_free(w->http);
    if (w->later_timer) {
        later_cb(-1, 0, w);
        event_free(w->later_timer);
    }
    if (w->flush_ev) {
        flush_cb(-1, 0, w);
        event_free(w->flush_ev);
    }
    gen_unref(w, w->gen, false);
    gen_reaper_cb(-1, 0, w);
    if (w->gen_reaper)
        event_free(w->gen_reaper);
    gw_runtime_unref(atomic_exchange(&w->mailbox_rt, NULL));
    gw_access_log_free(w->access);
    if (w->mailbox_ev)
        event_free(w->mailbox_ev);
    if (w->pending_ev)
        event_free(w->pending_ev);
    if (w->drain_timer)
        event_free(w->drain_timer);
    if (w->mailbox_fd >= 0)
        close(w->mailbox_fd);
    if (w->base)
        event_base_free(w->base);
    free(w->pending);
    free(w->conns.slots);
    free(w->listeners);
    free(w->bound);
    free(w);
}

/* An epoll base with the change list on: evhttp enables and disables a
 * connection's read and write events several times per request, and the change
 * list folds those into at most one epoll_ctl per fd per loop iteration. The
 * base is used by this worker's thread only, so it needs no locks. */
static struct event_base *worker_base_new(void)
{
    struct event_config *ec = event_config_new();
    if (!ec)
        return NULL;
    event_config_set_flag(ec, EVENT_BASE_FLAG_NOLOCK | EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
    struct event_base *base = event_base_new_with_config(ec);
    event_config_free(ec);
    return base ? base : event_base_new();
}

gw_worker *gw_worker_create(gw_server *srv, int id, gw_runtime *rt, const int *listen_fds,
                            size_t listen_count)
{
    gw_worker *w = calloc(1, sizeof *w);
    if (!w)
        goto fail_fds;
    w->id = id;
    w->srv = srv;
    w->mailbox_fd = -1;
    atomic_init(&w->mailbox_rt, NULL);
    atomic_init(&w->mailbox_bits, 0);
    gw_rng_seed(&w->rng);
    w->base = worker_base_new();
    w->shard = metrics_shard_create(srv->metrics.reg);
    w->listeners = calloc(listen_count + 1, sizeof *w->listeners);
    w->bound = calloc(listen_count + 1, sizeof *w->bound);
    if (!w->base || !w->shard || !w->listeners || !w->bound)
        goto fail;
    w->http = evhttp_new(w->base);
    w->mailbox_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!w->http || w->mailbox_fd < 0)
        goto fail;
    w->mailbox_ev = event_new(w->base, w->mailbox_fd, EV_READ | EV_PERSIST, mailbox_cb, w);
    w->pending_ev = event_new(w->base, -1, 0, pending_cb, w);
    w->gen_reaper = event_new(w->base, -1, 0, gen_reaper_cb, w);
    w->flush_ev = event_new(w->base, -1, 0, flush_cb, w);
    w->later_timer = evtimer_new(w->base, later_cb, w);
    const char *dio = getenv("GATEWAY_DIRECT_IO"); /* "0": evhttp's own socket I/O, for comparison */
    w->direct_io = !(dio && strcmp(dio, "0") == 0);
    const char *own = getenv("GATEWAY_OWN_HTTP"); /* "0": evhttp parses and answers, for comparison */
    w->own_http = !(own && strcmp(own, "0") == 0);
    w->drain_timer = evtimer_new(w->base, drain_timer_cb, w);
    w->access = gw_access_log_create(w->base, STDOUT_FILENO);
    if (!w->mailbox_ev || !w->pending_ev || !w->gen_reaper || !w->flush_ev || !w->later_timer ||
        !w->drain_timer || !w->access || event_add(w->mailbox_ev, NULL) != 0)
        goto fail;
    w->in_flight_gauge = metrics_series(w->shard, srv->metrics.in_flight, NULL);
    w->pool = pool_create(w->base, srv->pool, id, w->shard, &srv->metrics.pool);
    w->comp = gw_compressor_create();
    w->rlr = rl_redis_create(w->base, rl_log);
    w->cstore = cache_rstore_create(w->base, rl_log);
    if (!w->pool || !w->comp || !w->rlr || !w->cstore)
        goto fail;

    evhttp_set_gencb(w->http, on_request, w);
    evhttp_set_bevcb(w->http, make_bufferevent, w);
    evhttp_set_default_content_type(w->http, NULL);
    evhttp_set_allowed_methods(w->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD | EVHTTP_REQ_PUT |
                                            EVHTTP_REQ_DELETE | EVHTTP_REQ_OPTIONS | EVHTTP_REQ_TRACE |
                                            EVHTTP_REQ_CONNECT | EVHTTP_REQ_PATCH);
    gw_runtime_ref(rt);
    w->gen = gen_create(w, rt);
    if (!w->gen) {
        gw_runtime_unref(rt);
        goto fail;
    }
    apply_http_settings(w, rt->cfg);
    pool_configure(w->pool, rt->cfg);
    configure_redis(w, rt->cfg);

    for (size_t i = 0; i < listen_count; i++) {
        w->listeners[i] = evconnlistener_new(w->base, NULL, NULL,
                                             LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, 0, listen_fds[i]);
        if (!w->listeners[i]) {
            for (size_t j = i; j < listen_count; j++)
                close(listen_fds[j]);
            w->listen_count = i;
            goto fail;
        }
        w->listen_count = i + 1;
        w->bound[i] = evhttp_bind_listener(w->http, w->listeners[i]);
        if (!w->bound[i]) {
            for (size_t j = i + 1; j < listen_count; j++)
                close(listen_fds[j]);
            goto fail;
        }
    }
    w->listening = true;
    return w;
fail:
    worker_free(w);
    return NULL;
fail_fds:
    for (size_t i = 0; i < listen_count; i++)
        close(listen_fds[i]);
    return NULL;
}

static void *worker_main(void *arg)
{
    gw_worker *w = arg;
    event_base_dispatch(w->base);
    gw_access_log_flush(w->access);
    return NULL;
}

int gw_worker_start(gw_worker *w)
{
    if (pthread_create(&w->thread, NULL, worker_main, w) != 0)
        return -1;
    w->started = true;
    return 0;
}

void gw_worker_join_free(gw_worker *w)
{
    if (!w)
        return;
    if (w->started)
        pthread_join(w->thread, NULL);
    worker_free(w);
}

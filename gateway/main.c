/*
 * main.c - the gateway process: command line, start-up, signals, reload and
 * shutdown.
 *
 * The main thread owns the configuration. It loads and validates the file,
 * builds a runtime, opens one SO_REUSEPORT socket per worker and listen
 * address, starts the workers, and then runs its own small event loop for
 * signals and the admin listener. SIGHUP (or POST /admin/reload) builds a new
 * runtime and posts it to every worker; a file that fails to load changes
 * nothing. SIGTERM/SIGINT asks every worker to drain, then joins them.
 */
#include <errno.h>
#include <getopt.h>
#include <malloc.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <sys/queue.h>

#include <event2/keyvalq_struct.h>
#include <openssl/crypto.h>

#include "cache/rstore.h"
#include "config/config.h"
#include "gateway/httputil.h"
#include "gateway/log.h"
#include "gateway/runtime.h"
#include "gateway/server.h"
#include "gateway/worker.h"
#include "metrics/metrics.h"

#define GW_MAX_WORKERS 256
/* glibc gives freed memory back with madvise() once this much sits free at the
 * top of a heap. Buffers come and go with every request, so at the default
 * (128 KiB, adjusted dynamically) a worker madvised about once per request and
 * paid the page faults and TLB shootdowns after it. Keep that much instead. */
#define GW_MALLOC_TRIM_THRESHOLD_BYTES (64 * 1024 * 1024)
/* Allocations above this come from mmap (and go back with munmap at once). */
#define GW_MALLOC_MMAP_THRESHOLD_BYTES (4 * 1024 * 1024)

#ifdef GATEWAY_JEMALLOC
/* jemalloc reads this variable at its first allocation. A proxied request
 * allocates buffer chains of 1 and 2 KiB (four per request), and a worker
 * allocates those of a whole loop iteration's requests (tens of them) before
 * it frees any: a thread cache of 20 slots per size class (the default for
 * classes with few regions per slab) then overflowed and refilled in turn,
 * making and unmaking slabs, about 1,000 instructions per request (callgrind,
 * wrk -c64). 64 slots per class keep an iteration's worth; jemalloc's own
 * garbage collection still trims what goes unused. */
const char *malloc_conf = "tcache_nslots_small_min:64";
#endif

typedef struct gw_main {
    gw_server srv;
    struct event_base *base;
    struct evhttp *admin;
    struct event *sig_hup, *sig_term, *sig_int;
    cache_rstore *cstore;     /* admin invalidations and INFO, on the main loop */
    cache_rsub *csub;         /* other instances' invalidations, for the hot tier */
    struct event *redis_tick; /* INFO memory every second */
    cache_rstore_op *info_op; /* the INFO in flight */
} gw_main;

/* ---- the cache's process-wide half ------------------------------------------------ */

/* The in-process store's size: the store itself, or the hot tier; 0 (kept
 * only for its invalidation epochs) when Redis alone holds entries. */
static size_t cache_memory_limit(const config_t *cfg)
{
    if (cfg->cache.store != CONFIG_STORE_REDIS || cfg->cache.hot_tier)
        return (size_t)cfg->cache.memory_max_bytes;
    return 0;
}

static void main_redis_log(config_log_level level, const char *message)
{
    gw_log(level, NULL, "%s", message);
}

/* cache_rstore_heard_fn: an invalidation published by some instance (or the
 * subscription made again: whatever was missed, the hot tier forgets all). */
static void heard_invalidation(void *arg, const char *pattern, size_t len)
{
    gw_server *srv = arg;
    if (pattern)
        cache_mem_delete_matching(srv->cache, pattern, len);
    else
        cache_mem_delete_matching(srv->cache, "*", 1);
}

static void set_redis_gauges(gw_server *srv, bool up, int64_t used)
{
    metrics_series_t *s = metrics_series(srv->main_shard, srv->metrics.redis_up, NULL);
    if (s)
        metrics_gauge_set(s, up ? 1 : 0);
    if (up && (s = metrics_series(srv->main_shard, srv->metrics.redis_memory, NULL)))
        metrics_gauge_set(s, (double)used);
}

/* cache_rstore_info_fn */
static void info_done(void *arg, bool ok, int64_t used)
{
    gw_main *gm = arg;
    gm->info_op = NULL;
    set_redis_gauges(&gm->srv, ok, used);
}

static void redis_tick_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_main *gm = arg;
    if (gm->info_op) /* the last one has not answered (it will, by redis.timeout) */
        return;
    if (!gm->srv.current->cfg->redis.enabled) {
        set_redis_gauges(&gm->srv, false, 0);
        return;
    }
    gm->info_op = cache_rstore_info(gm->cstore, info_done, gm);
    if (!gm->info_op)
        set_redis_gauges(&gm->srv, false, 0);
}

static void configure_cache(gw_main *gm, const config_t *cfg)
{
    cache_mem_set_limit(gm->srv.cache, cache_memory_limit(cfg));
    if (gm->cstore)
        cache_rstore_configure(gm->cstore, cfg);
    if (gm->csub)
        cache_rsub_configure(gm->csub, cfg);
}

static void usage(FILE *out)
{
    fprintf(out, "usage: gateway -c FILE          run with the configuration in FILE\n"
                 "       gateway --check -c FILE  validate FILE: print every error, exit 1 if any\n"
                 "       gateway --reference      print the configuration keys as Markdown\n"
                 "       gateway --version\n");
}

/* Print each line of a multi-line error text as a log line. */
static void log_error_lines(const char *prefix, const char *errors)
{
    const char *p = errors;
    while (p && *p) {
        const char *nl = strchr(p, '\n');
        int len = nl ? (int)(nl - p) : (int)strlen(p);
        if (len > 0)
            gw_log(CONFIG_LOG_ERROR, NULL, "%s%.*s", prefix, len, p);
        p = nl ? nl + 1 : NULL;
    }
}

/* ---- metrics ----------------------------------------------------------------- */

/* pool_log_fn: the pool's lines go to the diagnostic log. */
static void pool_log(config_log_level level, const char *message)
{
    gw_log(level, NULL, "%s", message);
}

int gw_metrics_register(gw_metrics *m, const double *buckets, size_t bucket_count)
{
    static const char *const route_method_code[] = {"route", "method", "code"};
    static const char *const route[] = {"route"};
    static const char *const upstream[] = {"upstream"};
    static const char *const upstream_target[] = {"upstream", "target"};
    static const char *const upstream_kind[] = {"upstream", "kind"};
    static const char *const version[] = {"version"};
    static const char *const result[] = {"result"};

    m->reg = metrics_registry_create(buckets, bucket_count);
    if (!m->reg)
        return -1;
    m->requests_total =
        metrics_family_register(m->reg, "http_requests_total", "HTTP requests answered, by route.",
                                METRICS_COUNTER, METRICS_MERGE_SUM, 3, route_method_code, NULL, 0);
    m->request_duration = metrics_family_register(m->reg, "http_request_duration_seconds",
                                                  "Time from request received to answer sent.",
                                                  METRICS_HISTOGRAM, METRICS_MERGE_SUM, 1, route, NULL, 0);
    m->in_flight = metrics_family_register(m->reg, "http_requests_in_flight", "Requests being answered now.",
                                           METRICS_GAUGE, METRICS_MERGE_SUM, 0, NULL, NULL, 0);
    m->upstream_duration =
        metrics_family_register(m->reg, "gateway_upstream_request_duration_seconds",
                                "Time of one upstream attempt, to answer or failure.", METRICS_HISTOGRAM,
                                METRICS_MERGE_SUM, 1, upstream, NULL, 0);
    m->target_up =
        metrics_family_register(m->reg, "gateway_upstream_target_up",
                                "1 when the target is in rotation, 0 while passive health ejects it.",
                                METRICS_GAUGE, METRICS_MERGE_MIN, 2, upstream_target, NULL, 0);
    m->upstream_errors =
        metrics_family_register(m->reg, "gateway_upstream_errors_total",
                                "Upstream attempts that failed, by kind (connect, timeout, other).",
                                METRICS_COUNTER, METRICS_MERGE_SUM, 2, upstream_kind, NULL, 0);
    static const char *const policy_decision[] = {"policy", "decision"};
    m->ratelimit =
        metrics_family_register(m->reg, "gateway_ratelimit_requests_total",
                                "Rate-limit decisions by policy (allowed, limited; dry-run policies "
                                "count limited without refusing).",
                                METRICS_COUNTER, METRICS_MERGE_SUM, 2, policy_decision, NULL, 0);
    m->ratelimit_fallbacks = metrics_family_register(
        m->reg, "gateway_ratelimit_store_fallbacks_total",
        "Rate-limit decisions made by ratelimit.on_store_error because the store could not decide.",
        METRICS_COUNTER, METRICS_MERGE_SUM, 0, NULL, NULL, 0);
    static const char *const route_result[] = {"route", "result"};
    m->cache_requests =
        metrics_family_register(m->reg, "gateway_cache_requests_total",
                                "Cache lookups by route and result (hit, miss, bypass, stale).",
                                METRICS_COUNTER, METRICS_MERGE_SUM, 2, route_result, NULL, 0);
    m->cache_store_errors = metrics_family_register(
        m->reg, "gateway_cache_store_errors_total",
        "Cache store commands that failed or timed out (the request went on without the store).",
        METRICS_COUNTER, METRICS_MERGE_SUM, 0, NULL, NULL, 0);
    m->redis_up = metrics_family_register(m->reg, "gateway_redis_up",
                                          "1 when Redis answered the last INFO within redis.timeout, else 0.",
                                          METRICS_GAUGE, METRICS_MERGE_MAX, 0, NULL, NULL, 0);
    m->redis_memory = metrics_family_register(m->reg, "redis_memory_used_bytes",
                                              "Redis's used_memory, read from INFO memory every second.",
                                              METRICS_GAUGE, METRICS_MERGE_MAX, 0, NULL, NULL, 0);
    m->build_info = metrics_family_register(m->reg, "gateway_build_info", "Always 1; the version is a label.",
                                            METRICS_GAUGE, METRICS_MERGE_MAX, 1, version, NULL, 0);
    m->config_reloads = metrics_family_register(m->reg, "gateway_config_reloads_total",
                                                "Configuration reloads, by result (success, failure).",
                                                METRICS_COUNTER, METRICS_MERGE_SUM, 1, result, NULL, 0);
    if (!m->requests_total || !m->request_duration || !m->in_flight || !m->upstream_duration ||
        !m->target_up || !m->upstream_errors || !m->build_info || !m->config_reloads)
        return -1;
    return 0;
}

/* Collector: values that live in atomics rather than shards. */
static void server_collector(void *arg, metrics_append_fn append, void *out)
{
    gw_server *srv = arg;
    char buf[512];
    int n = snprintf(buf, sizeof buf,
                     "# HELP gateway_client_connections Client connections open now.\n"
                     "# TYPE gateway_client_connections gauge\n"
                     "gateway_client_connections %ld\n"
                     "# HELP gateway_client_connections_max The server.max_connections cap.\n"
                     "# TYPE gateway_client_connections_max gauge\n"
                     "gateway_client_connections_max %ld\n",
                     atomic_load(&srv->connections), srv->max_connections);
    if (n > 0)
        append(out, buf, (size_t)n);
}

static void count_reload(gw_server *srv, bool ok)
{
    const char *labels[1] = {ok ? "success" : "failure"};
    metrics_series_t *s = metrics_series(srv->main_shard, srv->metrics.config_reloads, labels);
    if (s)
        metrics_counter_add(s, 1);
}

/* ---- listeners ------------------------------------------------------------------- */

/* Open a listening socket. reuseport: one of several sockets sharing the
 * address (one per worker); before the first of them is made, probe_free()
 * checks that no other process listens there, since SO_REUSEPORT would
 * otherwise let a second gateway share the port silently. */
static int open_listener(const char *addr, bool reuseport, char **err)
{
    char host[256];
    const char *port;
    struct addrinfo hints = {0}, *res = NULL;
    int fd = -1, one = 1;

    if (gw_split_host_port(addr, host, sizeof host, &port) != 0) {
        if (asprintf(err, "listen \"%s\": expected host:port", addr) < 0)
            *err = NULL;
        return -1;
    }
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int rc = getaddrinfo(strcmp(host, "*") == 0 || !*host ? NULL : host, port, &hints, &res);
    if (rc != 0) {
        if (asprintf(err, "listen \"%s\": %s", addr, gai_strerror(rc)) < 0)
            *err = NULL;
        return -1;
    }
    fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        goto fail;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0))
        goto fail;
    if (res->ai_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, GW_LISTEN_BACKLOG) != 0)
        goto fail;
    freeaddrinfo(res);
    return fd;
fail:
    if (asprintf(err, "listen \"%s\": %s", addr, strerror(errno)) < 0)
        *err = NULL;
    if (fd >= 0)
        close(fd);
    freeaddrinfo(res);
    return -1;
}

/* Is anyone listening on addr already? A plain bind (no SO_REUSEPORT) fails
 * with EADDRINUSE when so. 0 when free, -1 with *err otherwise. */
static int probe_free(const char *addr, char **err)
{
    int fd = open_listener(addr, false, err);
    if (fd < 0)
        return -1;
    close(fd);
    return 0;
}

/* ---- reload ------------------------------------------------------------------------ */

/* Load the file again and hand the result to every worker. Returns 0, or -1
 * with the reasons in *why (caller frees). */
static int reload(gw_main *gm, char **why)
{
    gw_server *srv = &gm->srv;
    char *errors = NULL;
    *why = NULL;
    config_t *cfg = config_load(srv->config_path, &errors);
    if (!cfg) {
        log_error_lines("reload refused: ", errors);
        *why = errors;
        count_reload(srv, false);
        return -1;
    }
    if (srv->tls && !cfg->server.tls_cert) {
        asprintf(why, "server.tls: the listeners speak TLS; removing server.tls needs a restart");
        gw_error("reload refused: %s", *why);
        config_free(cfg);
        free(errors);
        count_reload(srv, false);
        return -1;
    }
    if (pool_shared_sync(srv->pool, cfg, why) != 0) {
        gw_error("reload refused: %s", *why ? *why : "out of memory");
        config_free(cfg);
        free(errors);
        count_reload(srv, false);
        return -1;
    }
    char *fixed = config_unreloadable_changes(srv->current->cfg, cfg);
    gw_runtime *rt = gw_runtime_create(cfg, ++srv->generation, why);
    if (!rt) {
        gw_error("reload refused: %s", *why ? *why : "cannot build the configuration");
        free(fixed);
        count_reload(srv, false);
        return -1;
    }
    if (fixed)
        log_error_lines("reload: needs a restart, old value kept: ", fixed);
    if (!srv->tls && cfg->server.tls_cert)
        gw_warn("reload: server.tls: the listeners speak plain HTTP; adding TLS needs a restart");
    free(fixed);
    gw_log_configure(rt->cfg->log.level, rt->cfg->log.format);
    configure_cache(gm, rt->cfg);
    for (int i = 0; i < srv->worker_count; i++)
        gw_worker_post_runtime(srv->workers[i], rt);
    gw_runtime_unref(srv->current);
    srv->current = rt;
    count_reload(srv, true);
    gw_info("configuration %lu loaded from %s", rt->generation, srv->config_path);
    return 0;
}

/* ---- admin listener ------------------------------------------------------------------- */

static bool admin_authorized(gw_server *srv, struct evhttp_request *req)
{
    const char *token = srv->current->cfg->admin.token;
    const char *auth = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
    if (!token || !*token || !auth || strncmp(auth, "Bearer ", 7) != 0)
        return false;
    const char *given = auth + 7;
    size_t a = strlen(given), b = strlen(token);
    /* Compare in constant time over the token's length; the length itself is
     * not secret enough to hide. */
    return a == b && CRYPTO_memcmp(given, token, b) == 0;
}

/* An admin invalidation waiting for Redis. */
typedef struct admin_inval {
    struct evhttp_request *req; /* NULL once its connection closed */
    size_t memory_deleted;
    char *pattern;
} admin_inval;

static void admin_send_json(struct evhttp_request *req, int status, struct evbuffer *b)
{
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "application/json");
    evhttp_send_reply(req, status, NULL, b);
}

static void admin_inval_answer(struct evhttp_request *req, const char *pattern, bool ok, bool redis,
                               size_t deleted, size_t memory_deleted)
{
    struct evbuffer *b = evbuffer_new();
    if (!b) {
        gw_send_json_error(req, 500, "out of memory", "");
        return;
    }
    evbuffer_add_printf(b, "{\"pattern\":\"");
    gw_json_escape(b, pattern);
    if (!ok)
        evbuffer_add_printf(b,
                            "\",\"error\":\"redis unavailable or failed part way\",\"deleted\":%zu,"
                            "\"memory_deleted\":%zu}\n",
                            deleted, memory_deleted);
    else if (redis)
        evbuffer_add_printf(b, "\",\"deleted\":%zu,\"memory_deleted\":%zu}\n", deleted, memory_deleted);
    else
        evbuffer_add_printf(b, "\",\"deleted\":%zu}\n", memory_deleted);
    admin_send_json(req, ok ? 200 : 503, b);
    evbuffer_free(b);
}

static void admin_inval_gone(struct evhttp_connection *evcon, void *arg)
{
    admin_inval *ai = arg;
    ai->req = NULL;
}

/* cache_rstore_count_fn */
static void admin_inval_done(void *arg, bool ok, size_t deleted)
{
    admin_inval *ai = arg;
    if (ai->req) {
        evhttp_connection_set_closecb(evhttp_request_get_connection(ai->req), NULL, NULL);
        admin_inval_answer(ai->req, ai->pattern, ok, true, deleted, ai->memory_deleted);
    }
    free(ai->pattern);
    free(ai);
}

/* POST /admin/cache/invalidate?pattern=GLOB, POST /admin/cache/clear (every
 * key under cache.key_prefix): the in-process store at once, Redis by SCAN
 * and UNLINK (then published to every instance's hot tier); the answer says
 * how many keys went. */
static void admin_cache(gw_main *gm, struct evhttp_request *req, bool clear)
{
    gw_server *srv = &gm->srv;
    const config_t *cfg = srv->current->cfg;
    if (evhttp_request_get_command(req) != EVHTTP_REQ_POST) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "POST");
        gw_send_json_error(req, 405, "method not allowed", "");
        return;
    }
    char *pattern = NULL;
    if (clear) {
        const char *prefix = cfg->cache.key_prefix ? cfg->cache.key_prefix : "";
        if (!*prefix && cfg->cache.store == CONFIG_STORE_REDIS) {
            /* Every key of the database would go, the rate limiter's too. */
            gw_send_json_error(req, 409,
                               "cache.key_prefix is empty: clear would delete every key in Redis; use "
                               "/admin/cache/invalidate with a pattern",
                               "");
            return;
        }
        pattern = malloc(2 * strlen(prefix) + 2);
        if (pattern) {
            char *w = pattern;
            for (const char *p = prefix; *p; p++) {
                if (strchr("*?[]\\", *p))
                    *w++ = '\\';
                *w++ = *p;
            }
            strcpy(w, "*");
        }
    } else {
        struct evkeyvalq q;
        TAILQ_INIT(&q);
        const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
        const char *query = uri ? evhttp_uri_get_query(uri) : NULL;
        if (query)
            evhttp_parse_query_str(query, &q);
        const char *given = evhttp_find_header(&q, "pattern");
        if (given && *given)
            pattern = strdup(given);
        evhttp_clear_headers(&q);
        if (!pattern) {
            gw_send_json_error(req, 400, "pattern query parameter required", "");
            return;
        }
    }
    if (!pattern) {
        gw_send_json_error(req, 500, "out of memory", "");
        return;
    }
    size_t len = strlen(pattern);
    size_t memory_deleted = cache_mem_delete_matching(srv->cache, pattern, len);
    if (cfg->cache.store != CONFIG_STORE_REDIS) {
        admin_inval_answer(req, pattern, true, false, 0, memory_deleted);
        free(pattern);
        return;
    }
    admin_inval *ai = calloc(1, sizeof *ai);
    cache_rstore_op *op = ai ? cache_rstore_invalidate(gm->cstore, pattern, len, admin_inval_done, ai) : NULL;
    if (!op) {
        free(ai);
        admin_inval_answer(req, pattern, false, true, 0, memory_deleted);
        free(pattern);
        return;
    }
    ai->req = req;
    ai->pattern = pattern;
    ai->memory_deleted = memory_deleted;
    evhttp_connection_set_closecb(evhttp_request_get_connection(req), admin_inval_gone, ai);
}

static void admin_request(struct evhttp_request *req, void *arg)
{
    gw_main *gm = arg;
    gw_server *srv = &gm->srv;
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *path = uri ? evhttp_uri_get_path(uri) : "/";
    if (!path || !*path)
        path = "/";
    if (gw_builtin_serve(srv, srv->current->cfg, req, path))
        return;
    if (strncmp(path, "/admin/", 7) != 0) {
        gw_send_json_error(req, 404, "no route", "");
        return;
    }
    if (!admin_authorized(srv, req)) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "WWW-Authenticate", "Bearer");
        gw_send_json_error(req, 401, "unauthorized", "");
        return;
    }
    if (strcmp(path, "/admin/reload") == 0) {
        if (evhttp_request_get_command(req) != EVHTTP_REQ_POST) {
            evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "POST");
            gw_send_json_error(req, 405, "method not allowed", "");
            return;
        }
        char *why = NULL;
        int rc = reload(gm, &why);
        struct evbuffer *b = evbuffer_new();
        if (rc == 0) {
            evbuffer_add_printf(b, "{\"result\":\"success\",\"generation\":%lu}\n", srv->current->generation);
        } else {
            evbuffer_add_printf(b, "{\"result\":\"failure\",\"errors\":\"");
            gw_json_escape(b, why ? why : "");
            evbuffer_add_printf(b, "\"}\n");
        }
        free(why);
        evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "application/json");
        evhttp_send_reply(req, rc == 0 ? 200 : 422, NULL, b);
        evbuffer_free(b);
        return;
    }
    if (strcmp(path, "/admin/cache/invalidate") == 0 || strcmp(path, "/admin/cache/clear") == 0) {
        admin_cache(gm, req, strcmp(path, "/admin/cache/clear") == 0);
        return;
    }
    char *(*show)(pool_shared *, const config_t *) = NULL;
    if (strcmp(path, "/admin/pools") == 0)
        show = pool_show_pools_json;
    else if (strcmp(path, "/admin/stats") == 0)
        show = pool_show_stats_json;
    else if (strcmp(path, "/admin/databases") == 0)
        show = pool_show_databases_json;
    else if (strcmp(path, "/admin/config") != 0) {
        gw_send_json_error(req, 404, "no such admin endpoint", "");
        return;
    }
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    if (cmd != EVHTTP_REQ_GET && cmd != EVHTTP_REQ_HEAD) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET, HEAD");
        gw_send_json_error(req, 405, "method not allowed", "");
        return;
    }
    char *json = show ? show(srv->pool, srv->current->cfg) : config_show_json(srv->current->cfg);
    struct evbuffer *b = evbuffer_new();
    if (!json || !b) {
        free(json);
        if (b)
            evbuffer_free(b);
        gw_send_json_error(req, 500, "out of memory", "");
        return;
    }
    evbuffer_add(b, json, strlen(json));
    free(json);
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "application/json");
    evhttp_send_reply(req, 200, NULL, b);
    evbuffer_free(b);
}

static int start_admin(gw_main *gm, char **err)
{
    const config_t *cfg = gm->srv.current->cfg;
    if (!cfg->admin.listen || !cfg->admin.token || !*cfg->admin.token)
        return 0;
    int fd = open_listener(cfg->admin.listen, false, err);
    if (fd < 0)
        return -1;
    gm->admin = evhttp_new(gm->base);
    if (!gm->admin || evhttp_accept_socket(gm->admin, fd) != 0) {
        close(fd);
        asprintf(err, "admin.listen \"%s\": cannot start the admin listener", cfg->admin.listen);
        return -1;
    }
    evhttp_set_default_content_type(gm->admin, NULL);
    evhttp_set_gencb(gm->admin, admin_request, gm);
    struct timeval tv = {10, 0};
    evhttp_set_timeout_tv(gm->admin, &tv);
    return 0;
}

/* ---- signals ------------------------------------------------------------------------- */

static void on_sighup(evutil_socket_t sig, short what, void *arg)
{
    char *why = NULL;
    reload(arg, &why);
    free(why);
}

static void on_sigterm(evutil_socket_t sig, short what, void *arg)
{
    gw_main *gm = arg;
    gw_server *srv = &gm->srv;
    if (atomic_exchange(&srv->draining, true))
        return;
    gw_info("signal %d: draining (up to %lldms)", (int)sig,
            (long long)srv->current->cfg->server.drain_timeout_ms);
    for (int i = 0; i < srv->worker_count; i++)
        gw_worker_post(srv->workers[i], GW_WORKER_MSG_DRAIN);
    event_base_loopexit(gm->base, NULL);
}

/* ---- main ------------------------------------------------------------------------------ */

static int resolve_workers(int configured)
{
    if (configured > 0)
        return configured > GW_MAX_WORKERS ? GW_MAX_WORKERS : configured;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > GW_MAX_WORKERS ? GW_MAX_WORKERS : (int)n;
}

static int run(const char *path)
{
    gw_main gm = {0};
    gw_server *srv = &gm.srv;
    char *errors = NULL, *err = NULL;
    int status = 1;

    config_t *cfg = config_load(path, &errors);
    if (!cfg) {
        fputs(errors ? errors : "cannot load configuration\n", stderr);
        free(errors);
        return 1;
    }
    gw_log_configure(cfg->log.level, cfg->log.format);
    srv->config_path = path;
    srv->tls = cfg->server.tls_cert != NULL;
    srv->max_connections = (long)cfg->server.max_connections;
    atomic_init(&srv->connections, 0);
    atomic_init(&srv->accept_paused, false);
    atomic_init(&srv->draining, false);
    atomic_init(&srv->ready, false);
    if (gw_metrics_register(&srv->metrics, cfg->metrics.buckets, cfg->metrics.bucket_count) != 0) {
        gw_error("cannot create metrics");
        config_free(cfg);
        goto out;
    }
    srv->worker_count = resolve_workers(cfg->server.workers);
    srv->pool = pool_shared_create(srv->worker_count, pool_log);
    if (!srv->pool || pool_metrics_register(srv->pool, srv->metrics.reg, &srv->metrics.pool) != 0 ||
        pool_shared_sync(srv->pool, cfg, &err) != 0) {
        gw_error("%s", err ? err : "cannot create the PostgreSQL pool");
        config_free(cfg);
        goto out;
    }
    srv->rl = rl_local_create(GW_RATELIMIT_SLOTS);
    if (!srv->rl) {
        gw_error("cannot create the rate limiter's store");
        config_free(cfg);
        goto out;
    }
    {
        gw_rng seed_rng;
        gw_rng_seed(&seed_rng);
        srv->rl_seed = gw_rng_next(&seed_rng);
    }
    metrics_collector_register(srv->metrics.reg, server_collector, srv);
    metrics_collector_register(srv->metrics.reg, metrics_process_collector, NULL);
    srv->main_shard = metrics_shard_create(srv->metrics.reg);
    const char *version[1] = {GATEWAY_VERSION};
    metrics_series_t *bi =
        srv->main_shard ? metrics_series(srv->main_shard, srv->metrics.build_info, version) : NULL;
    if (bi)
        metrics_gauge_set(bi, 1);
    const char *success[1] = {"success"}, *failure[1] = {"failure"};
    if (srv->main_shard) { /* both series exist from the start, at 0 */
        metrics_series(srv->main_shard, srv->metrics.config_reloads, success);
        metrics_series(srv->main_shard, srv->metrics.config_reloads, failure);
    }

    srv->current = gw_runtime_create(cfg, ++srv->generation, &err);
    if (!srv->current) {
        gw_error("%s", err ? err : "cannot build the configuration");
        goto out;
    }
    cfg = srv->current->cfg;
    gm.base = event_base_new();
    if (!gm.base)
        goto out;
    srv->cache = cache_mem_new(cache_memory_limit(cfg));
    gm.cstore = cache_rstore_create(gm.base, main_redis_log);
    gm.csub = cache_rsub_create(gm.base, main_redis_log, heard_invalidation, srv);
    gm.redis_tick = event_new(gm.base, -1, EV_PERSIST, redis_tick_cb, &gm);
    if (!srv->cache || !gm.cstore || !gm.csub || !gm.redis_tick)
        goto out;
    configure_cache(&gm, cfg);
    {
        struct timeval second = {1, 0};
        event_add(gm.redis_tick, &second);
        set_redis_gauges(srv, false, 0);
    }

    srv->workers = calloc((size_t)srv->worker_count, sizeof *srv->workers);
    if (!srv->workers)
        goto out;
    for (size_t j = 0; j < cfg->server.listen_count; j++) {
        if (probe_free(cfg->server.listen[j], &err) != 0) {
            gw_error("server.%s (is another gateway running?)", err ? err : "listen: cannot bind");
            goto out;
        }
    }
    for (int i = 0; i < srv->worker_count; i++) {
        int fds[64];
        size_t n = cfg->server.listen_count < 64 ? cfg->server.listen_count : 64;
        for (size_t j = 0; j < n; j++) {
            fds[j] = open_listener(cfg->server.listen[j], true, &err);
            if (fds[j] < 0) {
                gw_error("server.%s", err);
                while (j-- > 0)
                    close(fds[j]);
                goto out;
            }
        }
        srv->workers[i] = gw_worker_create(srv, i, srv->current, fds, n);
        if (!srv->workers[i]) {
            gw_error("cannot create worker %d", i);
            goto out;
        }
    }
    if (start_admin(&gm, &err) != 0) {
        gw_error("%s", err);
        goto out;
    }
    gm.sig_hup = evsignal_new(gm.base, SIGHUP, on_sighup, &gm);
    gm.sig_term = evsignal_new(gm.base, SIGTERM, on_sigterm, &gm);
    gm.sig_int = evsignal_new(gm.base, SIGINT, on_sigterm, &gm);
    if (!gm.sig_hup || !gm.sig_term || !gm.sig_int || evsignal_add(gm.sig_hup, NULL) != 0 ||
        evsignal_add(gm.sig_term, NULL) != 0 || evsignal_add(gm.sig_int, NULL) != 0)
        goto out;
    for (int i = 0; i < srv->worker_count; i++) {
        if (gw_worker_start(srv->workers[i]) != 0) {
            gw_error("cannot start worker %d", i);
            for (int j = 0; j < i; j++)
                gw_worker_post(srv->workers[j], GW_WORKER_MSG_DRAIN);
            goto out;
        }
    }
    atomic_store(&srv->ready, true);
    gw_info("gateway %s: %d workers on %s%s", GATEWAY_VERSION, srv->worker_count, cfg->server.listen[0],
            srv->tls ? " (TLS)" : "");
    event_base_dispatch(gm.base);
    status = 0;
out:
    if (srv->workers) {
        for (int i = 0; i < srv->worker_count; i++)
            gw_worker_join_free(srv->workers[i]);
        free(srv->workers);
    }
    if (status == 0)
        gw_info("stopped");
    if (gm.admin)
        evhttp_free(gm.admin);
    if (gm.sig_hup)
        event_free(gm.sig_hup);
    if (gm.sig_term)
        event_free(gm.sig_term);
    if (gm.sig_int)
        event_free(gm.sig_int);
    if (gm.redis_tick)
        event_free(gm.redis_tick);
    cache_rstore_cancel(gm.info_op);
    cache_rstore_free(gm.cstore);
    cache_rsub_free(gm.csub);
    if (gm.base)
        event_base_free(gm.base);
    gw_runtime_unref(srv->current);
    cache_mem_free(srv->cache);
    metrics_registry_free(srv->metrics.reg);
    pool_shared_free(srv->pool);
    rl_local_free(srv->rl);
    free(err);
    return status;
}

int main(int argc, char **argv)
{
    static const struct option options[] = {
        {"config", required_argument, NULL, 'c'}, {"check", no_argument, NULL, 'k'},
        {"version", no_argument, NULL, 'v'},      {"reference", no_argument, NULL, 'r'},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0}};
    const char *path = NULL;
    bool check = false;
    int opt;
    while ((opt = getopt_long(argc, argv, "c:hv", options, NULL)) != -1) {
        switch (opt) {
        case 'c':
            path = optarg;
            break;
        case 'k':
            check = true;
            break;
        case 'v':
            printf("gateway %s\n", GATEWAY_VERSION);
            return 0;
        case 'r':
            config_print_reference(stdout);
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (!path || optind != argc) {
        usage(stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
#ifndef GATEWAY_JEMALLOC
    /* Only glibc's malloc reads these (the sanitizer build runs on it). */
    mallopt(M_TRIM_THRESHOLD, GW_MALLOC_TRIM_THRESHOLD_BYTES);
    mallopt(M_MMAP_THRESHOLD, GW_MALLOC_MMAP_THRESHOLD_BYTES);
#endif
    if (check) {
        char *errors = NULL;
        config_t *cfg = config_load(path, &errors);
        if (!cfg) {
            fputs(errors ? errors : "cannot load configuration\n", stderr);
            free(errors);
            return 1;
        }
        config_free(cfg);
        printf("%s: configuration is valid\n", path);
        return 0;
    }
    return run(path);
}

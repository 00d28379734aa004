/*
 * shared.c - the process-wide half of the pool: per-database entries every
 * worker agrees on, readiness, and PgBouncer's SHOW POOLS / STATS /
 * DATABASES for the admin listener and /metrics.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/buffer.h>

#include "pool/pool_internal.h"
#include "pool/result.h"

/* Seconds over which SHOW STATS averages, as PgBouncer's stats_period. */
#define POOL_STATS_PERIOD_NS (60ULL * 1000000000ULL)

uint64_t pool_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

void pool_logf(pool_shared *sh, config_log_level level, const char *fmt, ...)
{
    if (!sh->log)
        return;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    sh->log(level, line);
}

int pool_share(int64_t total, int workers, int worker, int floor_min)
{
    if (workers < 1)
        workers = 1;
    int64_t share = total / workers + (worker < total % workers ? 1 : 0);
    return share < floor_min ? floor_min : (int)share;
}

pool_shared *pool_shared_create(int worker_count, pool_log_fn log)
{
    pool_shared *sh = calloc(1, sizeof *sh);
    if (!sh)
        return NULL;
    sh->worker_count = worker_count < 1 ? 1 : worker_count;
    sh->log = log;
    return sh;
}

void pool_shared_free(pool_shared *sh)
{
    if (!sh)
        return;
    size_t n = atomic_load(&sh->db_count);
    for (size_t i = 0; i < n; i++) {
        free(sh->dbs[i].name);
        free(sh->dbs[i].workers);
    }
    free(sh);
}

pool_shared_db *pool_shared_find(pool_shared *sh, const char *name)
{
    size_t n = atomic_load_explicit(&sh->db_count, memory_order_acquire);
    for (size_t i = 0; i < n; i++)
        if (strcmp(sh->dbs[i].name, name) == 0)
            return &sh->dbs[i];
    return NULL;
}

int pool_shared_sync(pool_shared *sh, const config_t *cfg, char **err)
{
    *err = NULL;
    atomic_store(&sh->max_client_conn, (long)cfg->postgres.max_client_conn);
    for (size_t i = 0; i < cfg->postgres.database_count; i++) {
        const char *name = cfg->postgres.databases[i].name;
        if (pool_shared_find(sh, name))
            continue;
        size_t n = atomic_load(&sh->db_count);
        if (n == POOL_MAX_DATABASES) {
            if (asprintf(err, "postgres.databases: more than %d database names over the process's life",
                         POOL_MAX_DATABASES) < 0)
                *err = NULL;
            return -1;
        }
        pool_shared_db *d = &sh->dbs[n];
        d->name = strdup(name);
        d->workers = calloc((size_t)sh->worker_count, sizeof *d->workers);
        if (!d->name || !d->workers) {
            free(d->name);
            free(d->workers);
            d->name = NULL;
            d->workers = NULL;
            return -1;
        }
        atomic_init(&d->server_conns, 0);
        atomic_init(&d->state, POOL_DB_UNKNOWN);
        atomic_init(&d->wanted, 0);
        d->period.at_ns = d->previous.at_ns = pool_now_ns();
        atomic_store_explicit(&sh->db_count, n + 1, memory_order_release);
    }
    return 0;
}

bool pool_ready(pool_shared *sh, const config_t *cfg)
{
    for (size_t i = 0; i < cfg->postgres.database_count; i++) {
        pool_shared_db *d = pool_shared_find(sh, cfg->postgres.databases[i].name);
        if (!d || atomic_load_explicit(&d->state, memory_order_relaxed) != POOL_DB_UP)
            return false;
    }
    return true;
}

/* ---- sums over workers -------------------------------------------------------- */

typedef struct pool_sums {
    long cl_active, cl_waiting, sv_active, sv_idle, sv_used, sv_tested, sv_login;
    uint64_t oldest_wait_ns; /* 0: nobody waits */
    pool_stats_snapshot totals;
} pool_sums;

#define LOAD(x) atomic_load_explicit(&(x), memory_order_relaxed)

static void sum_db(const pool_shared *sh, const pool_shared_db *d, pool_sums *s)
{
    memset(s, 0, sizeof *s);
    for (int w = 0; w < sh->worker_count; w++) {
        const pool_worker_stats *st = &d->workers[w];
        s->cl_active += LOAD(st->cl_active);
        s->cl_waiting += LOAD(st->cl_waiting);
        s->sv_active += LOAD(st->sv_active);
        s->sv_idle += LOAD(st->sv_idle);
        s->sv_used += LOAD(st->sv_used);
        s->sv_tested += LOAD(st->sv_tested);
        s->sv_login += LOAD(st->sv_login);
        uint64_t head = LOAD(st->wait_head_ns);
        if (head && (!s->oldest_wait_ns || head < s->oldest_wait_ns))
            s->oldest_wait_ns = head;
        s->totals.xact_count += LOAD(st->xact_count);
        s->totals.query_count += LOAD(st->query_count);
        s->totals.received += LOAD(st->received);
        s->totals.sent += LOAD(st->sent);
        s->totals.xact_time_us += LOAD(st->xact_time_us);
        s->totals.query_time_us += LOAD(st->query_time_us);
        s->totals.wait_time_us += LOAD(st->wait_time_us);
    }
}

static int64_t db_pool_size(const config_t *cfg, const config_database *db)
{
    return db->pool_size > 0 ? db->pool_size : cfg->postgres.default_pool_size;
}

static int64_t db_max_connections(const config_t *cfg, const config_database *db)
{
    return db->max_db_connections > 0 ? db->max_db_connections : cfg->postgres.max_db_connections;
}

static const char *pool_mode_name(const config_t *cfg)
{
    return cfg->postgres.pool_mode == CONFIG_POOL_SESSION ? "session" : "transaction";
}

/* ---- JSON writing ------------------------------------------------------------------ */

static void put_key(struct evbuffer *b, bool *first, const char *key)
{
    evbuffer_add_printf(b, "%s\"%s\":", *first ? "" : ",", key);
    *first = false;
}

static void put_str(struct evbuffer *b, bool *first, const char *key, const char *value)
{
    put_key(b, first, key);
    if (value)
        pool_json_string(b, value, strlen(value));
    else
        evbuffer_add(b, "null", 4);
}

static void put_int(struct evbuffer *b, bool *first, const char *key, long long value)
{
    put_key(b, first, key);
    evbuffer_add_printf(b, "%lld", value);
}

static char *finish(struct evbuffer *b)
{
    size_t len = evbuffer_get_length(b);
    char *out = malloc(len + 1);
    if (out) {
        evbuffer_remove(b, out, len);
        out[len] = '\0';
    }
    evbuffer_free(b);
    return out;
}

char *pool_show_pools_json(pool_shared *sh, const config_t *cfg)
{
    struct evbuffer *b = evbuffer_new();
    if (!b)
        return NULL;
    uint64_t now = pool_now_ns();
    evbuffer_add(b, "[", 1);
    for (size_t i = 0; i < cfg->postgres.database_count; i++) {
        const config_database *db = &cfg->postgres.databases[i];
        pool_shared_db *d = pool_shared_find(sh, db->name);
        pool_sums s;
        if (d)
            sum_db(sh, d, &s);
        else
            memset(&s, 0, sizeof s);
        uint64_t waited_us = s.oldest_wait_ns && now > s.oldest_wait_ns ? (now - s.oldest_wait_ns) / 1000 : 0;
        bool first = true;
        evbuffer_add(b, i ? ",{" : "{", i ? 2 : 1);
        put_str(b, &first, "database", db->name);
        put_str(b, &first, "user", db->user);
        put_int(b, &first, "cl_active", s.cl_active);
        put_int(b, &first, "cl_waiting", s.cl_waiting);
        put_int(b, &first, "cl_active_cancel_req", 0);
        put_int(b, &first, "cl_waiting_cancel_req", 0);
        put_int(b, &first, "sv_active", s.sv_active);
        put_int(b, &first, "sv_active_cancel", 0);
        put_int(b, &first, "sv_being_canceled", 0);
        put_int(b, &first, "sv_idle", s.sv_idle);
        put_int(b, &first, "sv_used", s.sv_used);
        put_int(b, &first, "sv_tested", s.sv_tested);
        put_int(b, &first, "sv_login", s.sv_login);
        put_int(b, &first, "maxwait", (long long)(waited_us / 1000000));
        put_int(b, &first, "maxwait_us", (long long)(waited_us % 1000000));
        put_str(b, &first, "pool_mode", pool_mode_name(cfg));
        evbuffer_add(b, "}", 1);
    }
    evbuffer_add(b, "]\n", 2);
    return finish(b);
}

/* Start a new averaging period when the current one is over. Admin thread. */
static void roll_period(pool_shared_db *d, const pool_stats_snapshot *now_totals, uint64_t now)
{
    if (now - d->period.at_ns < POOL_STATS_PERIOD_NS)
        return;
    d->previous = d->period;
    d->period = *now_totals;
    d->period.at_ns = now;
}

char *pool_show_stats_json(pool_shared *sh, const config_t *cfg)
{
    struct evbuffer *b = evbuffer_new();
    if (!b)
        return NULL;
    uint64_t now = pool_now_ns();
    evbuffer_add(b, "[", 1);
    for (size_t i = 0; i < cfg->postgres.database_count; i++) {
        const config_database *db = &cfg->postgres.databases[i];
        pool_shared_db *d = pool_shared_find(sh, db->name);
        pool_sums s;
        memset(&s, 0, sizeof s);
        /* Averages over the last whole period, as PgBouncer's: per second for
         * counts and bytes, per transaction / query for times (microseconds). */
        pool_stats_snapshot from = {0}, to = {0};
        if (d) {
            sum_db(sh, d, &s);
            s.totals.at_ns = now;
            roll_period(d, &s.totals, now);
            from = d->previous;
            to = d->period;
            if (to.at_ns == from.at_ns) { /* no whole period yet: average since start */
                to = s.totals;
            }
        }
        double secs = to.at_ns > from.at_ns ? (double)(to.at_ns - from.at_ns) / 1e9 : 0;
        uint64_t dx = to.xact_count - from.xact_count, dq = to.query_count - from.query_count;
        bool first = true;
        evbuffer_add(b, i ? ",{" : "{", i ? 2 : 1);
        put_str(b, &first, "database", db->name);
        put_int(b, &first, "total_xact_count", (long long)s.totals.xact_count);
        put_int(b, &first, "total_query_count", (long long)s.totals.query_count);
        put_int(b, &first, "total_received", (long long)s.totals.received);
        put_int(b, &first, "total_sent", (long long)s.totals.sent);
        put_int(b, &first, "total_xact_time", (long long)s.totals.xact_time_us);
        put_int(b, &first, "total_query_time", (long long)s.totals.query_time_us);
        put_int(b, &first, "total_wait_time", (long long)s.totals.wait_time_us);
        put_int(b, &first, "avg_xact_count", secs > 0 ? (long long)((double)dx / secs) : 0);
        put_int(b, &first, "avg_query_count", secs > 0 ? (long long)((double)dq / secs) : 0);
        put_int(b, &first, "avg_recv",
                secs > 0 ? (long long)((double)(to.received - from.received) / secs) : 0);
        put_int(b, &first, "avg_sent", secs > 0 ? (long long)((double)(to.sent - from.sent) / secs) : 0);
        put_int(b, &first, "avg_xact_time", dx ? (long long)((to.xact_time_us - from.xact_time_us) / dx) : 0);
        put_int(b, &first, "avg_query_time",
                dq ? (long long)((to.query_time_us - from.query_time_us) / dq) : 0);
        put_int(b, &first, "avg_wait_time", dx ? (long long)((to.wait_time_us - from.wait_time_us) / dx) : 0);
        evbuffer_add(b, "}", 1);
    }
    evbuffer_add(b, "]\n", 2);
    return finish(b);
}

char *pool_show_databases_json(pool_shared *sh, const config_t *cfg)
{
    struct evbuffer *b = evbuffer_new();
    if (!b)
        return NULL;
    evbuffer_add(b, "[", 1);
    for (size_t i = 0; i < cfg->postgres.database_count; i++) {
        const config_database *db = &cfg->postgres.databases[i];
        pool_shared_db *d = pool_shared_find(sh, db->name);
        bool first = true;
        evbuffer_add(b, i ? ",{" : "{", i ? 2 : 1);
        put_str(b, &first, "name", db->name);
        put_str(b, &first, "host", db->host);
        put_int(b, &first, "port", atoll(db->port));
        put_str(b, &first, "database", db->dbname);
        put_str(b, &first, "force_user", db->user);
        put_int(b, &first, "pool_size", db_pool_size(cfg, db));
        put_int(b, &first, "min_pool_size", cfg->postgres.min_pool_size);
        put_int(b, &first, "reserve_pool", cfg->postgres.reserve_pool_size);
        put_str(b, &first, "pool_mode", pool_mode_name(cfg));
        put_int(b, &first, "max_connections", db_max_connections(cfg, db));
        put_int(b, &first, "current_connections", d ? LOAD(d->server_conns) : 0);
        put_int(b, &first, "paused", 0);
        put_int(b, &first, "disabled", 0);
        evbuffer_add(b, "}", 1);
    }
    evbuffer_add(b, "]\n", 2);
    return finish(b);
}

/* ---- metrics ------------------------------------------------------------------------ */

typedef struct pool_collector {
    pool_shared *sh;
} pool_collector;

static pool_collector collector_arg; /* one pool_shared per process */

static void append_str(metrics_append_fn append, void *out, const char *s)
{
    append(out, s, strlen(s));
}

/* Label values are database names: letters, digits, '_', '.', '-' (config
 * rule), so they need no escaping. */
static void collect(void *arg, metrics_append_fn append, void *out)
{
    pool_collector *c = arg;
    pool_shared *sh = c->sh;
    size_t n = atomic_load_explicit(&sh->db_count, memory_order_acquire);
    char line[256];
    append_str(append, out,
               "# HELP gateway_pool_server_connections Server connections to PostgreSQL, by state.\n"
               "# TYPE gateway_pool_server_connections gauge\n");
    for (size_t i = 0; i < n; i++) {
        pool_sums s;
        sum_db(sh, &sh->dbs[i], &s);
        const char *name = sh->dbs[i].name;
        static const char *states[] = {"active", "idle", "used", "login"};
        long values[] = {s.sv_active + s.sv_tested, s.sv_idle, s.sv_used, s.sv_login};
        for (size_t k = 0; k < 4; k++) {
            snprintf(line, sizeof line, "gateway_pool_server_connections{database=\"%s\",state=\"%s\"} %ld\n",
                     name, states[k], values[k]);
            append_str(append, out, line);
        }
    }
    append_str(
        append, out,
        "# HELP gateway_pool_client_requests SQL requests holding or waiting for a server connection.\n"
        "# TYPE gateway_pool_client_requests gauge\n");
    for (size_t i = 0; i < n; i++) {
        pool_sums s;
        sum_db(sh, &sh->dbs[i], &s);
        snprintf(line, sizeof line, "gateway_pool_client_requests{database=\"%s\",state=\"active\"} %ld\n",
                 sh->dbs[i].name, s.cl_active);
        append_str(append, out, line);
        snprintf(line, sizeof line, "gateway_pool_client_requests{database=\"%s\",state=\"waiting\"} %ld\n",
                 sh->dbs[i].name, s.cl_waiting);
        append_str(append, out, line);
    }
}

/* gateway_pool_max_connections needs the configured cap: the workers publish
 * it per database in a gauge family (see pool.c), so only the states above
 * are collected here. */
int pool_metrics_register(pool_shared *sh, metrics_registry_t *reg, pool_metric_families *out)
{
    static const char *db_label[] = {"database"};
    static const char *db_kind[] = {"database", "kind"};
    out->wait_seconds = metrics_family_register(reg, "gateway_pool_wait_seconds",
                                                "Time SQL requests waited for a server connection.",
                                                METRICS_HISTOGRAM, METRICS_MERGE_SUM, 1, db_label, NULL, 0);
    out->errors =
        metrics_family_register(reg, "gateway_pool_errors_total",
                                "Pool failures: connect, broken, wait_timeout, full, query_timeout.",
                                METRICS_COUNTER, METRICS_MERGE_SUM, 2, db_kind, NULL, 0);
    out->max_connections = metrics_family_register(reg, "gateway_pool_max_connections",
                                                   "max_db_connections: the cap on server connections.",
                                                   METRICS_GAUGE, METRICS_MERGE_MAX, 1, db_label, NULL, 0);
    if (!out->wait_seconds || !out->errors || !out->max_connections)
        return -1;
    collector_arg.sh = sh;
    metrics_collector_register(reg, collect, &collector_arg);
    return 0;
}

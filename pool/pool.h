/*
 * pool.h - the PostgreSQL connection pool: PgBouncer's job, inside the gateway.
 *
 * Two halves:
 *
 * - pool_shared: one per process, made by the main thread. It holds, per
 *   database name, what all workers must agree on: the count of server
 *   connections (max_db_connections is a hard cap for the whole process), the
 *   database's reachability (for /ready), the SQL requests admitted
 *   (max_client_conn) and every worker's statistics, written by that worker
 *   only (relaxed atomics) and summed by whoever reads them: the admin
 *   endpoints (PgBouncer's SHOW POOLS / STATS / DATABASES) and /metrics.
 *
 * - pool_t: one per worker, on the worker's event_base, never touched by
 *   another thread. It keeps that worker's server connections (asynchronous
 *   libpq: PQconnectStart/PQconnectPoll, nonblocking sends, PQconsumeInput /
 *   PQisBusy / PQgetResult), its queue of waiting requests and their deadlines.
 *   A worker gets an equal share of default_pool_size, min_pool_size and
 *   reserve_pool_size (at least one connection each); max_db_connections is
 *   enforced exactly, over all workers, by the shared count. Pools outlive
 *   configuration generations: pool_configure() applies a new configuration,
 *   and connections whose connection settings changed are closed when idle.
 *
 * A call runs one statement, prepared once per server connection (and again
 * after a reconnect), with text parameters that are always bound, never
 * spliced. transaction mode gives the connection back when the statement
 * ends; session mode keeps it bound to the caller's session (the client's
 * HTTP connection) until pool_session_end().
 */
#ifndef GATEWAY_POOL_H
#define GATEWAY_POOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/event.h>
#include <libpq-fe.h>

#include "config/config.h"
#include "metrics/metrics.h"

#define POOL_MAX_DATABASES 64       /* distinct database names over the process's life */
#define POOL_BACKOFF_MIN_MS 50      /* first retry after a failed connect */
#define POOL_BACKOFF_MAX_MS 500     /* capped: a returning server is used within a second */
#define POOL_TICK_MS 250            /* maintenance: min_pool_size, idle and lifetime limits */
#define POOL_QUERY_GRACE_MS 1000    /* our own deadline past statement_timeout */
#define POOL_RETRY_AFTER_SECONDS 1  /* Retry-After on 503 */
#define POOL_PIPELINE_MAX_AGE_MS 10 /* pipeline only behind statements younger than this */
#define POOL_PIPELINE_FAST_US 2000  /* ... and known to run faster than this (moving average) */
#define POOL_CANCEL_GRACE_MS 5000   /* after our deadline and a cancel request, then close */

typedef struct pool_shared pool_shared;
typedef struct pool pool_t;
typedef struct pool_call pool_call;

/* ---- process-wide half (main thread creates; any thread reads) ---------------- */

typedef struct pool_metric_families {
    metrics_family_t *wait_seconds;    /* gateway_pool_wait_seconds{database} histogram */
    metrics_family_t *errors;          /* gateway_pool_errors_total{database,kind} counter */
    metrics_family_t *max_connections; /* gateway_pool_max_connections{database} gauge */
} pool_metric_families;

/* Diagnostic lines of the pool (connect failures, a database going down or
 * coming back) go through this; any thread. */
typedef void (*pool_log_fn)(config_log_level level, const char *message);

/* worker_count workers will each create one pool_t. NULL when out of memory. */
pool_shared *pool_shared_create(int worker_count, pool_log_fn log);
void pool_shared_free(pool_shared *sh);

/* Register the pool's metric families in reg, and a collector that renders
 * the gauges (gateway_pool_server_connections, gateway_pool_client_requests,
 * gateway_pool_max_connections) from the shared statistics. Start-up only. */
int pool_metrics_register(pool_shared *sh, metrics_registry_t *reg, pool_metric_families *out);

/* Main thread, before a configuration reaches the workers: make sure every
 * database of cfg has its shared entry. -1 past POOL_MAX_DATABASES. */
int pool_shared_sync(pool_shared *sh, const config_t *cfg, char **err);

/* Every database of cfg reachable (its last connect or query succeeded)?
 * Any thread. True when cfg has no databases. */
bool pool_ready(pool_shared *sh, const config_t *cfg);

/* PgBouncer's SHOW POOLS, SHOW STATS and SHOW DATABASES as JSON arrays of
 * objects with PgBouncer 1.18's column names, for the databases of cfg.
 * Caller frees; NULL when out of memory. Any thread. */
char *pool_show_pools_json(pool_shared *sh, const config_t *cfg);
char *pool_show_stats_json(pool_shared *sh, const config_t *cfg);
char *pool_show_databases_json(pool_shared *sh, const config_t *cfg);

/* ---- per-worker half (the worker's thread only) --------------------------------- */

pool_t *pool_create(struct event_base *base, pool_shared *sh, int worker_id, metrics_shard_t *shard,
                    const pool_metric_families *fam);
/* Apply a configuration (start-up and every reload). What the pool keeps of
 * cfg is copied; the query texts of calls are the caller's (see pool_request). */
void pool_configure(pool_t *p, const config_t *cfg);
/* Close every connection and free the pool; calls still running are
 * answered with status 503 first. */
void pool_free(pool_t *p);

typedef struct pool_request {
    const char *database;
    const char *query; /* must stay alive until the call ends */
    int nparams;
    const char *const *values; /* copied by pool_exec; NULL entries bind SQL NULL */
    const void *session;       /* session mode: the owner (client connection); NULL otherwise */
    uint64_t deadline_ns;      /* CLOCK_MONOTONIC: a running statement past it ends with 504 (0: none) */
} pool_request;

typedef struct pool_result {
    int status;          /* 200 with res; else the HTTP status to answer: 503, 504, 500 */
    const PGresult *res; /* the statement's result (tuples or an error), owned by the pool */
    const char *error;   /* short reason for a non-200 status without res */
} pool_result;

/* Called exactly once per call, on the worker's loop, never from inside
 * pool_exec(). The result is valid during the call only. */
typedef void (*pool_done_fn)(void *arg, const pool_result *result);

/* Start a call. Never fails synchronously except out of memory (NULL);
 * refusals (max_client_conn, database down, wait timeout) come through done. */
pool_call *pool_exec(pool_t *p, const pool_request *req, pool_done_fn done, void *arg);

/* The caller is gone: done will not be called. A statement already sent
 * runs to its end on the server; its connection is then reused. */
void pool_cancel(pool_call *call);

/* session mode: the owner's server connections go back to the pool. */
void pool_session_end(pool_t *p, const void *session);

/* Map a SQLSTATE to the HTTP status a SQL route answers: class 22 (data
 * exception: a parameter the type rejects) 400; 23503/23505 409, other 23 400;
 * 57014 (statement_timeout) 504; classes 08, 53, 40 and 57P01-57P03 503;
 * anything else 500. Pure. */
int pool_sqlstate_status(const char *sqlstate);

#endif

/*
 * server.h - the process: its workers, the current runtime, the metric
 * families, and the connection count they share.
 *
 * Ownership (HAProxy-style, stated once): the main thread owns gw_server and
 * is the only writer of `current`; each worker owns its event_base, evhttp,
 * upstream pools, access log and metrics shard. Workers and the main thread
 * meet only through each worker's mailbox (an eventfd plus atomics, see
 * worker.h) and through the atomics below.
 */
#ifndef GATEWAY_SERVER_H
#define GATEWAY_SERVER_H

#include <stdatomic.h>
#include <stdbool.h>

#include "cache/memstore.h"
#include "gateway/runtime.h"
#include "metrics/metrics.h"
#include "pool/pool.h"
#include "ratelimit/ratelimit.h"

typedef struct gw_worker gw_worker;

typedef struct gw_metrics {
    metrics_registry_t *reg;
    metrics_family_t *requests_total;    /* {route,method,code} */
    metrics_family_t *request_duration;  /* {route} */
    metrics_family_t *in_flight;         /* no labels */
    metrics_family_t *upstream_duration; /* {upstream} */
    metrics_family_t *target_up;         /* {upstream,target} */
    metrics_family_t *build_info;        /* {version} */
    metrics_family_t *config_reloads;    /* {result} */
    metrics_family_t *upstream_errors;   /* {upstream,kind} */
    pool_metric_families pool;           /* gateway_pool_* */
    metrics_family_t *ratelimit;         /* {policy,decision} */
    metrics_family_t *ratelimit_fallbacks;
    metrics_family_t *cache_requests;     /* {route,result} */
    metrics_family_t *cache_store_errors; /* no labels */
    metrics_family_t *redis_up;           /* no labels; main thread */
    metrics_family_t *redis_memory;       /* no labels; main thread */
} gw_metrics;

typedef struct gw_server {
    const char *config_path;
    gw_runtime *current; /* main thread only; workers get copies by mailbox */
    unsigned long generation;
    bool tls; /* listeners speak TLS (fixed at start) */

    gw_worker **workers;
    int worker_count;

    gw_metrics metrics;
    metrics_shard_t *main_shard;
    pool_shared *pool; /* the PostgreSQL pool's process-wide half */
    rl_local *rl;      /* the rate limiter's per-process store, shared by the workers */
    uint64_t rl_seed;  /* of the rate-limit key hash */
    cache_mem *cache;  /* the in-process cache store or hot tier, shared by the workers; NULL: none */

    atomic_long connections;   /* open client connections, all workers */
    long max_connections;      /* fixed at start (not reloadable) */
    atomic_bool accept_paused; /* at max_connections: listeners disabled */
    atomic_bool draining;
    atomic_bool ready;
} gw_server;

/* Register every metric family of the gateway in m->reg. 0 or -1. */
int gw_metrics_register(gw_metrics *m, const double *buckets, size_t bucket_count);

#endif

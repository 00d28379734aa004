/*
 * pool_internal.h - what pool.c (the workers' half) and shared.c (the
 * process-wide half) share. Not for other modules.
 */
#ifndef GATEWAY_POOL_INTERNAL_H
#define GATEWAY_POOL_INTERNAL_H

#include <stdatomic.h>

#include "pool/pool.h"

/* One worker's figures for one database. Written by that worker only, with
 * relaxed load + store (single writer); read by the admin endpoints and the
 * metrics collector from any thread. Names follow PgBouncer's columns. */
typedef struct pool_worker_stats {
    atomic_long cl_active;      /* calls holding a server connection (sessions bound, in session mode) */
    atomic_long cl_waiting;     /* calls queued for one */
    atomic_long sv_active;      /* server connections running a statement or bound to a session */
    atomic_long sv_idle;        /* idle, usable at once */
    atomic_long sv_used;        /* idle longer than server_check_delay: checked before reuse */
    atomic_long sv_tested;      /* running server_check_query */
    atomic_long sv_login;       /* connecting or logging in */
    atomic_ullong wait_head_ns; /* when the oldest waiting call was queued; 0: none */
    atomic_ullong xact_count, query_count;
    atomic_ullong received, sent; /* parameter bytes in, result bytes out */
    atomic_ullong xact_time_us, query_time_us, wait_time_us;
} pool_worker_stats;

typedef enum { POOL_DB_UNKNOWN, POOL_DB_UP, POOL_DB_DOWN } pool_db_state;

/* The averages of SHOW STATS: figures at the start of the current period. */
typedef struct pool_stats_snapshot {
    uint64_t at_ns;
    uint64_t xact_count, query_count, received, sent, xact_time_us, query_time_us, wait_time_us;
} pool_stats_snapshot;

typedef struct pool_shared_db {
    char *name;
    atomic_int server_conns; /* open or opening, all workers: the max_db_connections cap */
    atomic_int state;        /* pool_db_state, written by whichever worker learnt it last */
    atomic_int wanted;       /* workers whose calls wait on the cap: the others give idle connections back */
    pool_worker_stats *workers;           /* [worker_count] */
    pool_stats_snapshot period, previous; /* SHOW STATS averages; read by the admin thread only */
} pool_shared_db;

struct pool_shared {
    int worker_count;
    pool_log_fn log;
    atomic_long clients;         /* SQL calls admitted, all workers and databases: max_client_conn */
    atomic_long max_client_conn; /* from the current configuration */
    atomic_size_t db_count;      /* entries published (release) in dbs */
    pool_shared_db dbs[POOL_MAX_DATABASES];
};

/* The entry for name, or NULL. Any thread. */
pool_shared_db *pool_shared_find(pool_shared *sh, const char *name);

/* Log through sh->log, printf-style. */
void pool_logf(pool_shared *sh, config_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

uint64_t pool_now_ns(void);

/* The share of `total` that worker `worker` of `workers` holds: equal parts,
 * the remainder to the first workers; at least `floor_min`. */
int pool_share(int64_t total, int workers, int worker, int floor_min);

#endif

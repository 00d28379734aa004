/*
 * config.h - the one public header of the config module.
 *
 * The gateway is configured by one YAML file (see gateway.example.yaml in the
 * spec). config_load() reads it with libyaml, expands ${VAR} and ${VAR:-default}
 * from the environment, walks it against one declarative table of keys (key,
 * type, default as text, reloadable, help) and fills a config_t. Defaults go
 * through the same parser as user input, so there is one validation path.
 *
 * Threads: config_load() runs on the main thread (start-up and reload). The
 * config_t it returns is immutable afterwards and may be read from any thread;
 * the gateway module owns its lifetime (a reference count lives there, not here).
 *
 * Units: every duration is held in milliseconds (int64_t, suffix _ms), every size
 * in bytes (int64_t, suffix _bytes or a name ending in _bytes).
 */
#ifndef GATEWAY_CONFIG_H
#define GATEWAY_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* HTTP method bits. The values equal libevent's EVHTTP_REQ_* so the gateway can
 * test them against evhttp_request_get_command() without a translation table. */
#define CONFIG_METHOD_GET 0x001
#define CONFIG_METHOD_POST 0x002
#define CONFIG_METHOD_HEAD 0x004
#define CONFIG_METHOD_PUT 0x008
#define CONFIG_METHOD_DELETE 0x010
#define CONFIG_METHOD_OPTIONS 0x020
#define CONFIG_METHOD_TRACE 0x040
#define CONFIG_METHOD_CONNECT 0x080
#define CONFIG_METHOD_PATCH 0x100
#define CONFIG_METHOD_ALL 0x1ff

typedef enum { CONFIG_LOG_ERROR, CONFIG_LOG_WARN, CONFIG_LOG_INFO, CONFIG_LOG_DEBUG } config_log_level;
typedef enum { CONFIG_LOG_JSON, CONFIG_LOG_TEXT } config_log_format;
typedef enum { CONFIG_BALANCE_ROUND_ROBIN, CONFIG_BALANCE_LEAST_CONN } config_balance;
typedef enum { CONFIG_POOL_TRANSACTION, CONFIG_POOL_SESSION } config_pool_mode;
typedef enum { CONFIG_STORE_REDIS, CONFIG_STORE_MEMORY, CONFIG_STORE_LOCAL } config_store;
typedef enum { CONFIG_COALESCE_WORKER, CONFIG_COALESCE_CLUSTER, CONFIG_COALESCE_OFF } config_coalesce;

/* routes[].cache.statuses: the statuses a route may store, as bits. */
#define CONFIG_CACHE_200 (1u << 0)
#define CONFIG_CACHE_203 (1u << 1)
#define CONFIG_CACHE_204 (1u << 2)
#define CONFIG_CACHE_300 (1u << 3)
#define CONFIG_CACHE_301 (1u << 4)
#define CONFIG_CACHE_404 (1u << 5)
#define CONFIG_CACHE_410 (1u << 6)
typedef enum { CONFIG_ON_ERROR_LOCAL, CONFIG_ON_ERROR_ALLOW, CONFIG_ON_ERROR_DENY } config_on_store_error;
typedef enum { CONFIG_RESULT_OBJECT, CONFIG_RESULT_ARRAY } config_sql_result;

/* A string pair, in file order: `unless:` conditions, SQL `defaults:`. */
typedef struct config_kv {
    char *key;
    char *value;
} config_kv;

typedef struct config_server {
    char **listen; /* "host:port" or "[v6]:port", at least one */
    size_t listen_count;
    int workers; /* as written: 0 = one per core (the gateway resolves it) */
    int64_t max_connections;
    int64_t max_header_bytes;
    int64_t max_body_bytes;
    int64_t read_timeout_ms;
    int64_t request_timeout_ms;
    int64_t drain_timeout_ms;
    char *tls_cert; /* both NULL when server.tls is absent; both set otherwise */
    char *tls_key;
} config_server;

typedef struct config_admin {
    char *listen; /* NULL when admin.listen is absent */
    char *token;  /* NULL or "" means no admin listener */
} config_admin;

typedef struct config_metrics {
    char *path;      /* starts with '/' */
    double *buckets; /* strictly increasing, finite, at least one */
    size_t bucket_count;
} config_metrics;

typedef struct config_log {
    config_log_level level;
    config_log_format format;
    bool access;
} config_log;

typedef struct config_redis {
    bool enabled; /* false when the file has no redis: section */
    char *url;
    char *password;
    int64_t timeout_ms;
    int connections_per_worker;
} config_redis;

typedef struct config_database {
    char *name; /* the key under postgres.databases */
    char *host;
    char *port;
    char *dbname;
    char *user;
    char *password;
    int64_t pool_size;          /* -1: postgres.default_pool_size */
    int64_t max_db_connections; /* -1: postgres.max_db_connections */
} config_database;

typedef struct config_postgres {
    config_database *databases;
    size_t database_count;
    config_pool_mode pool_mode;
    int64_t max_client_conn;
    int64_t default_pool_size;
    int64_t min_pool_size;
    int64_t reserve_pool_size;
    int64_t reserve_pool_timeout_ms;
    int64_t max_db_connections;
    int64_t query_wait_timeout_ms;
    int64_t query_timeout_ms;
    int64_t server_connect_timeout_ms;
    int64_t server_idle_timeout_ms;
    int64_t server_lifetime_ms;
    char *server_check_query;
    int64_t server_check_delay_ms;
    int64_t pipeline_depth; /* statements in flight per server connection when all are busy */
} config_postgres;

typedef struct config_cache {
    config_store store; /* REDIS or MEMORY; MEMORY is the default without redis: */
    char *key_prefix;
    int64_t default_ttl_ms;
    int64_t max_object_bytes;
    int64_t memory_max_bytes;
    int64_t stale_while_revalidate_ms;
    int64_t stale_if_error_ms;
    bool hot_tier;            /* store: redis: the in-process store in front of it */
    config_coalesce coalesce; /* identical concurrent misses: one backend request per worker or cluster */
    int64_t lock_timeout_ms;  /* how long a request waits for another's fetch of its key */
} config_cache;

typedef struct config_compression {
    bool enabled;      /* the file has a compression: section */
    char **algorithms; /* each "br" or "gzip", server preference order */
    size_t algorithm_count;
    int64_t min_bytes;
    int64_t max_bytes; /* larger answers pass uncompressed (compressing blocks the worker's loop) */
    char **types;      /* "type/subtype" or "type/ *" (without the space) */
    size_t type_count;
    int brotli_quality; /* 0..11 */
    int gzip_level;     /* 1..9 */
} config_compression;

/* Policies on one route, at most: a request takes them all in one Redis
 * script call, all or nothing (ratelimit/ratelimit.h: RL_POLICIES_MAX). */
#define CONFIG_ROUTE_POLICIES_MAX 8

typedef struct config_policy {
    char *name; /* the key under ratelimit.policies */
    int64_t limit;
    int64_t window_ms; /* at least limit microseconds with store: redis (nanoseconds: local) */
    char *key;         /* client_ip | route | header:NAME, several joined by '+' */
    bool dry_run;
} config_policy;

typedef struct config_ratelimit {
    config_store store; /* REDIS or LOCAL */
    config_on_store_error on_store_error;
    config_policy *policies;
    size_t policy_count;
    char **trusted_proxies; /* addresses or CIDR blocks whose X-Forwarded-For is believed */
    size_t trusted_proxy_count;
} config_ratelimit;

typedef struct config_upstream {
    char *name;     /* the key under upstreams */
    char **targets; /* "host:port" */
    size_t target_count;
    config_balance balance;
    int64_t connect_timeout_ms;
    int64_t timeout_ms;
    int keepalive;
    int max_fails;
    int64_t fail_timeout_ms;
    int retries;
} config_upstream;

typedef struct config_route_cache {
    bool enabled;   /* the route has a cache: section */
    int64_t ttl_ms; /* cache.default_ttl when not given */
    char *key;      /* NULL: the default key */
    config_kv *unless;
    size_t unless_count;
    unsigned statuses; /* CONFIG_CACHE_* bits; 200 when not given */
} config_route_cache;

typedef struct config_route_sql {
    bool enabled; /* the route has a sql: section */
    char *database;
    char *query;
    char **params; /* "path.X", "query.X", "header.X" */
    size_t param_count;
    config_kv *defaults;
    size_t default_count;
    config_sql_result result;
    int64_t max_rows; /* result: array: page size cap */
} config_route_sql;

typedef struct config_route {
    char *name;
    char *path; /* exactly one of path and prefix is set */
    char *prefix;
    unsigned methods;              /* CONFIG_METHOD_* bits; CONFIG_METHOD_ALL when omitted */
    char *upstream;                /* exactly one of upstream and sql is set */
    config_upstream *upstream_ref; /* resolved by config_load */
    char **ratelimit;              /* policy names, each defined; CONFIG_ROUTE_POLICIES_MAX at most */
    size_t ratelimit_count;
    config_route_cache cache;
    char **invalidate; /* glob patterns */
    size_t invalidate_count;
    config_route_sql sql;
    int line; /* line of the route in the file, for messages */
} config_route;

typedef struct config {
    char *file; /* the path it was loaded from */
    config_server server;
    config_admin admin;
    config_metrics metrics;
    config_log log;
    config_redis redis;
    config_postgres postgres;
    config_cache cache;
    config_compression compression;
    config_ratelimit ratelimit;
    config_upstream *upstreams;
    size_t upstream_count;
    config_route *routes; /* file order */
    size_t route_count;
} config_t;

/*
 * Load and validate FILE. On success returns a new config_t (caller frees with
 * config_free) and sets *errors to NULL. On failure returns NULL and sets *errors
 * to every error found, one per line, each "FILE:LINE:COL: key.path: expected ...,
 * found ..." (caller frees with free()). Never exits, never prints.
 */
config_t *config_load(const char *file, char **errors);

/* Free a config_t and everything it owns. NULL is fine. */
void config_free(config_t *cfg);

/*
 * Compare two valid configurations and describe the keys that differ but cannot
 * change without a restart (the table's reloadable flag), one per line. Returns
 * NULL when every difference is reloadable; caller frees the string.
 */
char *config_unreloadable_changes(const config_t *old_cfg, const config_t *new_cfg);

/* Print the key table as a Markdown reference (key, type, default, reloadable, help). */
void config_print_reference(FILE *out);

/*
 * Every key of CFG as PgBouncer's SHOW CONFIG, in JSON, for /admin/config:
 * [{"key":"server.listen","value":"0.0.0.0:8080","default":"0.0.0.0:8080",
 * "changeable":"no"}, ...]. Keys are full paths (upstreams.NAME.timeout,
 * routes[0].match.path); values are text in the file's units ("30s", "16KiB");
 * passwords, the admin token and a URL's password are shown as "********".
 * Caller frees; NULL when out of memory.
 */
char *config_show_json(const config_t *cfg);

/* Names for the enums, as written in the file. config_method_name takes one
 * CONFIG_METHOD_* bit and returns "GET", "POST", ... ("TRACE" and "CONNECT"
 * too); NULL for any other value. */
const char *config_method_name(unsigned method_bit);

#endif

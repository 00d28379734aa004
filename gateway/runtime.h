/*
 * runtime.h - one loaded configuration, made ready to serve.
 *
 * A runtime is built on the main thread from a validated config_t (start-up or
 * reload): it compiles the router, resolves every upstream target to a numeric
 * address (so workers never block on DNS), and loads the TLS certificate. After
 * that it is immutable and shared by all workers; a reference count decides when
 * the last worker is done with it. Swapping a runtime is how reload is atomic:
 * a request keeps the runtime it started with until it ends.
 */
#ifndef GATEWAY_RUNTIME_H
#define GATEWAY_RUNTIME_H

#include <stdatomic.h>
#include <stdbool.h>

#include <openssl/ssl.h>

#include "config/config.h"
#include "gateway/router.h"

typedef struct gw_target {
    char *label; /* "host:port" as written, for metrics and logs */
    char *addr;  /* numeric address evhttp connects to */
    unsigned short port;
} gw_target;

typedef struct gw_upstream_addrs {
    gw_target *targets; /* parallel to config_upstream.targets */
    size_t count;
} gw_upstream_addrs;

/* An address block of ratelimit.trusted_proxies. */
typedef struct gw_cidr {
    int family; /* AF_INET or AF_INET6 */
    unsigned char bytes[16];
    int bits;
} gw_cidr;

/* Is the textual address addr inside one of the blocks? */
bool gw_cidr_match(const gw_cidr *blocks, size_t count, const char *addr);

/* How a SQL route runs, worked out once per configuration. */
typedef struct gw_sql_plan {
    char *query;      /* the statement sent: the route's, or wrapped for paging */
    int nparams;      /* the route's params, plus 2 when the gateway pages (limit + 1, offset) */
    int limit_param;  /* result: array paged by the query itself: index of its query.limit, else -1 */
    int offset_param; /* likewise query.offset, else -1 */
    bool wrapped;     /* the gateway pages: LIMIT/OFFSET bound after the route's params */
} gw_sql_plan;

typedef struct gw_runtime {
    atomic_int refs;
    unsigned long generation;
    config_t *cfg;
    router_t *router;
    gw_upstream_addrs *upstreams;          /* parallel to cfg->upstreams */
    int *route_upstream;                   /* per route: index into cfg->upstreams, or -1 */
    gw_sql_plan *route_sql;                /* per route; query NULL for upstream routes */
    const config_policy ***route_policies; /* per route: its ratelimit policies, resolved */
    gw_cidr *trusted;                      /* ratelimit.trusted_proxies, parsed */
    size_t trusted_count;
    SSL_CTX *ssl_ctx; /* NULL without server.tls */
} gw_runtime;

/* Build a runtime that takes ownership of cfg (freed with the runtime, or at
 * once on failure). Returns NULL and a malloc'd message in *err on failure. One
 * reference is held by the caller. */
gw_runtime *gw_runtime_create(config_t *cfg, unsigned long generation, char **err);

void gw_runtime_ref(gw_runtime *rt);
/* Drop a reference; the last one frees the runtime. NULL is fine. */
void gw_runtime_unref(gw_runtime *rt);

/* Split "host:port" or "[v6]:port": the host (without brackets) is written
 * into buf, *port points into hp. 0, or -1 when malformed or too long. */
int gw_split_host_port(const char *hp, char *buf, size_t size, const char **port);

/* A TLS 1.2+ server context from PEM files; NULL and *err on failure. */
SSL_CTX *gw_tls_context_create(const char *cert, const char *key, char **err);

#endif

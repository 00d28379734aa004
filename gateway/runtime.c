/*
 * runtime.c - building and releasing runtimes (see runtime.h).
 *
 * Runs on the main thread; only gw_runtime_unref() is called from workers. The
 * blocking work (getaddrinfo, reading certificate files) happens here, never on
 * a worker's event loop.
 */
#include "gateway/runtime.h"

#include "pool/result.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <openssl/err.h>

static char *format_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *format_err(const char *fmt, ...)
{
    char *s = NULL;
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&s, fmt, ap) < 0)
        s = NULL;
    va_end(ap);
    return s;
}

int gw_split_host_port(const char *hp, char *buf, size_t size, const char **port)
{
    const char *colon;
    if (hp[0] == '[') {
        const char *close = strchr(hp, ']');
        if (!close || close[1] != ':')
            return -1;
        if ((size_t)(close - hp - 1) >= size)
            return -1;
        memcpy(buf, hp + 1, (size_t)(close - hp - 1));
        buf[close - hp - 1] = '\0';
        *port = close + 2;
        return 0;
    }
    colon = strrchr(hp, ':');
    if (!colon || (size_t)(colon - hp) >= size)
        return -1;
    memcpy(buf, hp, (size_t)(colon - hp));
    buf[colon - hp] = '\0';
    *port = colon + 1;
    return 0;
}

static int resolve_target(const char *label, gw_target *t, char **err)
{
    char host[256];
    const char *port;
    struct addrinfo hints = {0}, *res = NULL;
    char numeric[NI_MAXHOST];

    if (gw_split_host_port(label, host, sizeof host, &port) != 0) {
        *err = format_err("upstream target \"%s\": expected host:port", label);
        return -1;
    }
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        *err = format_err("upstream target \"%s\": cannot resolve: %s", label, gai_strerror(rc));
        return -1;
    }
    rc = getnameinfo(res->ai_addr, res->ai_addrlen, numeric, sizeof numeric, NULL, 0, NI_NUMERICHOST);
    freeaddrinfo(res);
    if (rc != 0) {
        *err = format_err("upstream target \"%s\": %s", label, gai_strerror(rc));
        return -1;
    }
    t->label = strdup(label);
    t->addr = strdup(numeric);
    t->port = (unsigned short)atoi(port);
    if (!t->label || !t->addr) {
        *err = format_err("out of memory");
        return -1;
    }
    return 0;
}

SSL_CTX *gw_tls_context_create(const char *cert, const char *key, char **err)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx)
        goto fail;
    if (!SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION))
        goto fail;
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1)
        goto fail;
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1)
        goto fail;
    if (SSL_CTX_check_private_key(ctx) != 1)
        goto fail;
    return ctx;
fail:;
    char buf[256];
    unsigned long e = ERR_get_error();
    ERR_error_string_n(e, buf, sizeof buf);
    ERR_clear_error();
    *err =
        format_err("server.tls: cannot load certificate %s and key %s: %s", cert, key, e ? buf : "unknown");
    SSL_CTX_free(ctx);
    return NULL;
}

static void runtime_free(gw_runtime *rt)
{
    if (!rt)
        return;
    if (rt->upstreams && rt->cfg) {
        for (size_t i = 0; i < rt->cfg->upstream_count; i++) {
            for (size_t j = 0; j < rt->upstreams[i].count; j++) {
                free(rt->upstreams[i].targets[j].label);
                free(rt->upstreams[i].targets[j].addr);
            }
            free(rt->upstreams[i].targets);
        }
    }
    free(rt->upstreams);
    free(rt->route_upstream);
    for (size_t i = 0; rt->route_sql && i < rt->cfg->route_count; i++)
        free(rt->route_sql[i].query);
    free(rt->route_sql);
    for (size_t i = 0; rt->route_policies && i < rt->cfg->route_count; i++)
        free(rt->route_policies[i]);
    free(rt->route_policies);
    free(rt->trusted);
    router_free(rt->router);
    SSL_CTX_free(rt->ssl_ctx);
    config_free(rt->cfg);
    free(rt);
}

static int parse_cidr(const char *text, gw_cidr *out)
{
    char addr[64];
    const char *slash = strchr(text, '/');
    size_t n = slash ? (size_t)(slash - text) : strlen(text);
    if (n == 0 || n >= sizeof addr)
        return -1;
    memcpy(addr, text, n);
    addr[n] = '\0';
    out->family = strchr(addr, ':') ? AF_INET6 : AF_INET;
    if (inet_pton(out->family, addr, out->bytes) != 1)
        return -1;
    int max = out->family == AF_INET ? 32 : 128;
    out->bits = slash ? atoi(slash + 1) : max;
    return out->bits < 0 || out->bits > max ? -1 : 0;
}

bool gw_cidr_match(const gw_cidr *blocks, size_t count, const char *addr)
{
    unsigned char bytes[16];
    int family = strchr(addr, ':') ? AF_INET6 : AF_INET;
    if (inet_pton(family, addr, bytes) != 1)
        return false;
    for (size_t i = 0; i < count; i++) {
        const gw_cidr *b = &blocks[i];
        if (b->family != family)
            continue;
        int full = b->bits / 8, rest = b->bits % 8;
        if (memcmp(b->bytes, bytes, (size_t)full) != 0)
            continue;
        if (rest && ((b->bytes[full] ^ bytes[full]) & (unsigned char)(0xff << (8 - rest))))
            continue;
        return true;
    }
    return false;
}

/* A SQL route's plan. result: array is paged: by the query itself when it
 * binds query.limit / query.offset (the gateway validates them and binds
 * limit + 1, to see whether there are more), otherwise by the gateway, which
 * wraps the query and binds LIMIT and OFFSET after the route's params. */
static int plan_sql(const config_route_sql *sql, gw_sql_plan *plan)
{
    plan->nparams = (int)sql->param_count;
    plan->limit_param = plan->offset_param = -1;
    if (sql->result == CONFIG_RESULT_ARRAY) {
        for (size_t i = 0; i < sql->param_count; i++) {
            if (strcmp(sql->params[i], "query.limit") == 0)
                plan->limit_param = (int)i;
            else if (strcmp(sql->params[i], "query.offset") == 0)
                plan->offset_param = (int)i;
        }
        if (plan->limit_param < 0) {
            plan->query = pool_page_wrap(sql->query, (int)sql->param_count);
            plan->wrapped = true;
            plan->nparams += 2;
            return plan->query ? 0 : -1;
        }
    }
    plan->query = strdup(sql->query);
    return plan->query ? 0 : -1;
}

gw_runtime *gw_runtime_create(config_t *cfg, unsigned long generation, char **err)
{
    *err = NULL;
    gw_runtime *rt = calloc(1, sizeof *rt);
    if (!rt) {
        config_free(cfg);
        *err = format_err("out of memory");
        return NULL;
    }
    atomic_init(&rt->refs, 1);
    rt->generation = generation;
    rt->cfg = cfg;
    rt->router = router_create(cfg->routes, cfg->route_count);
    rt->upstreams = calloc(cfg->upstream_count + 1, sizeof *rt->upstreams);
    rt->route_upstream = calloc(cfg->route_count + 1, sizeof *rt->route_upstream);
    rt->route_sql = calloc(cfg->route_count + 1, sizeof *rt->route_sql);
    if (!rt->router || !rt->upstreams || !rt->route_upstream || !rt->route_sql) {
        *err = format_err("routes: cannot compile (out of memory or more than %d params in a path)",
                          ROUTER_MAX_PARAMS);
        goto fail;
    }
    for (size_t i = 0; i < cfg->upstream_count; i++) {
        const config_upstream *u = &cfg->upstreams[i];
        rt->upstreams[i].targets = calloc(u->target_count + 1, sizeof(gw_target));
        if (!rt->upstreams[i].targets) {
            *err = format_err("out of memory");
            goto fail;
        }
        for (size_t j = 0; j < u->target_count; j++) {
            if (resolve_target(u->targets[j], &rt->upstreams[i].targets[j], err) != 0)
                goto fail;
            rt->upstreams[i].count++;
        }
    }
    for (size_t r = 0; r < cfg->route_count; r++) {
        rt->route_upstream[r] = -1;
        for (size_t i = 0; cfg->routes[r].upstream && i < cfg->upstream_count; i++)
            if (strcmp(cfg->routes[r].upstream, cfg->upstreams[i].name) == 0)
                rt->route_upstream[r] = (int)i;
    }
    rt->route_policies = calloc(cfg->route_count + 1, sizeof *rt->route_policies);
    rt->trusted = calloc(cfg->ratelimit.trusted_proxy_count + 1, sizeof *rt->trusted);
    if (!rt->route_policies || !rt->trusted) {
        *err = format_err("out of memory");
        goto fail;
    }
    for (size_t i = 0; i < cfg->ratelimit.trusted_proxy_count; i++) {
        if (parse_cidr(cfg->ratelimit.trusted_proxies[i], &rt->trusted[i]) != 0) {
            *err = format_err("ratelimit.trusted_proxies: \"%s\" is not an address or CIDR block",
                              cfg->ratelimit.trusted_proxies[i]);
            goto fail;
        }
        rt->trusted_count++;
    }
    for (size_t r = 0; r < cfg->route_count; r++) {
        const config_route *route = &cfg->routes[r];
        rt->route_policies[r] = calloc(route->ratelimit_count + 1, sizeof **rt->route_policies);
        if (!rt->route_policies[r]) {
            *err = format_err("out of memory");
            goto fail;
        }
        for (size_t k = 0; k < route->ratelimit_count; k++)
            for (size_t i = 0; i < cfg->ratelimit.policy_count; i++)
                if (strcmp(route->ratelimit[k], cfg->ratelimit.policies[i].name) == 0)
                    rt->route_policies[r][k] = &cfg->ratelimit.policies[i];
    }
    for (size_t r = 0; r < cfg->route_count; r++) {
        if (cfg->routes[r].sql.enabled && plan_sql(&cfg->routes[r].sql, &rt->route_sql[r]) != 0) {
            *err = format_err("out of memory");
            goto fail;
        }
    }
    if (cfg->server.tls_cert) {
        rt->ssl_ctx = gw_tls_context_create(cfg->server.tls_cert, cfg->server.tls_key, err);
        if (!rt->ssl_ctx)
            goto fail;
    }
    return rt;
fail:
    runtime_free(rt);
    return NULL;
}

void gw_runtime_ref(gw_runtime *rt)
{
    atomic_fetch_add_explicit(&rt->refs, 1, memory_order_relaxed);
}

void gw_runtime_unref(gw_runtime *rt)
{
    if (rt && atomic_fetch_sub_explicit(&rt->refs, 1, memory_order_acq_rel) == 1)
        runtime_free(rt);
}

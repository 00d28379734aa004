/*
 * router.c - route compilation and matching.
 *
 * Runs on the main thread (router_create) and on every worker (matching, which
 * only reads). The one idea: every route gets a rank (kind, then prefix length,
 * then file order) and a request takes the best-ranked route that matches both
 * path and method. Routes are few (tens), so a linear scan over precompiled
 * patterns is faster than any tree for them and keeps the rules obvious.
 */
#include "gateway/router.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { ROUTE_PREFIX = 1, ROUTE_PARAM = 2, ROUTE_EXACT = 3 };

typedef struct segment {
    const char *text; /* literal text, or the param name after ':' */
    size_t len;
    int is_param;
} segment;

typedef struct compiled_route {
    int kind;
    const char *pattern; /* path or prefix */
    size_t pattern_len;
    unsigned methods;
    segment *segments; /* ROUTE_PARAM only */
    size_t segment_count;
} compiled_route;

struct router {
    compiled_route *routes;
    size_t count;
};

/* GET implies HEAD; TRACE and CONNECT are never proxied (TRACE echoes
 * credentials back, CONNECT asks for a tunnel), whatever `methods` says. */
static unsigned effective_methods(unsigned methods)
{
    if (methods & CONFIG_METHOD_GET)
        methods |= CONFIG_METHOD_HEAD;
    return methods & ~(unsigned)(CONFIG_METHOD_TRACE | CONFIG_METHOD_CONNECT);
}

/* Split "/a/:b/c" into segments; the leading '/' is implied. */
static int compile_segments(compiled_route *cr)
{
    size_t n = 0;
    for (const char *p = cr->pattern; *p; p++)
        if (*p == '/')
            n++;
    cr->segments = calloc(n ? n : 1, sizeof *cr->segments);
    if (!cr->segments)
        return -1;
    size_t params = 0;
    const char *p = cr->pattern;
    while (*p == '/') {
        const char *start = ++p;
        while (*p && *p != '/')
            p++;
        segment *s = &cr->segments[cr->segment_count++];
        s->is_param = start[0] == ':';
        s->text = s->is_param ? start + 1 : start;
        s->len = (size_t)(p - s->text);
        if (s->is_param && ++params > ROUTER_MAX_PARAMS)
            return -1;
    }
    return 0;
}

router_t *router_create(const config_route *routes, size_t count)
{
    router_t *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->routes = calloc(count ? count : 1, sizeof *r->routes);
    if (!r->routes)
        goto fail;
    r->count = count;
    for (size_t i = 0; i < count; i++) {
        compiled_route *cr = &r->routes[i];
        const config_route *cfg = &routes[i];
        cr->methods = effective_methods(cfg->methods ? cfg->methods : CONFIG_METHOD_ALL);
        if (cfg->prefix) {
            cr->kind = ROUTE_PREFIX;
            cr->pattern = cfg->prefix;
        } else {
            cr->pattern = cfg->path ? cfg->path : "/";
            cr->kind = strstr(cr->pattern, "/:") ? ROUTE_PARAM : ROUTE_EXACT;
        }
        cr->pattern_len = strlen(cr->pattern);
        if (cr->kind == ROUTE_PARAM && compile_segments(cr) != 0)
            goto fail;
    }
    return r;
fail:
    router_free(r);
    return NULL;
}

void router_free(router_t *r)
{
    if (!r)
        return;
    for (size_t i = 0; r->routes && i < r->count; i++)
        free(r->routes[i].segments);
    free(r->routes);
    free(r);
}

/* Match "/x/y/z" against the segments; fills params on success. */
static int match_params(const compiled_route *cr, const char *path, router_match *out)
{
    size_t params = 0;
    const char *p = path;
    for (size_t i = 0; i < cr->segment_count; i++) {
        if (*p != '/')
            return 0;
        const char *start = ++p;
        while (*p && *p != '/')
            p++;
        size_t len = (size_t)(p - start);
        const segment *s = &cr->segments[i];
        if (s->is_param) {
            if (len == 0)
                return 0;
            out->params[params].name = s->text;
            out->params[params].name_len = s->len;
            out->params[params].value = start;
            out->params[params].value_len = len;
            params++;
        } else if (len != s->len || memcmp(start, s->text, len) != 0) {
            return 0;
        }
    }
    if (*p != '\0')
        return 0;
    out->param_count = params;
    return 1;
}

static int path_matches(const compiled_route *cr, const char *path, size_t path_len, router_match *scratch)
{
    switch (cr->kind) {
    case ROUTE_EXACT:
        return path_len == cr->pattern_len && memcmp(path, cr->pattern, path_len) == 0;
    case ROUTE_PREFIX:
        return path_len >= cr->pattern_len && memcmp(path, cr->pattern, cr->pattern_len) == 0;
    default:
        return match_params(cr, path, scratch);
    }
}

/* Is a better than b? Kind first, then prefix length; file order breaks ties
 * because the scan only replaces on strictly better. */
static int better(const compiled_route *a, const compiled_route *b)
{
    if (a->kind != b->kind)
        return a->kind > b->kind;
    return a->kind == ROUTE_PREFIX && a->pattern_len > b->pattern_len;
}

void router_match_path(const router_t *r, const char *path, unsigned method, router_match *out)
{
    router_match scratch;
    const compiled_route *best = NULL;
    size_t path_len = strlen(path);

    out->status = 404;
    out->route_index = -1;
    out->allow = 0;
    out->param_count = 0;
    for (size_t i = 0; i < r->count; i++) {
        const compiled_route *cr = &r->routes[i];
        if (best && !better(cr, best))
            continue; /* cannot win; Allow matters only when nothing matched */
        scratch.param_count = 0;
        if (!path_matches(cr, path, path_len, &scratch))
            continue;
        out->allow |= cr->methods;
        if (!(cr->methods & method))
            continue;
        best = cr;
        out->route_index = (int)i;
        out->param_count = scratch.param_count;
        memcpy(out->params, scratch.params, scratch.param_count * sizeof scratch.params[0]);
    }
    if (best) {
        out->status = 0;
        return;
    }
    out->status = out->allow ? 405 : 404;
}

void router_allow_header(unsigned allow, char *buf, size_t size)
{
    static const struct {
        unsigned bit;
        const char *name;
    } names[] = {{CONFIG_METHOD_GET, "GET"},        {CONFIG_METHOD_HEAD, "HEAD"},
                 {CONFIG_METHOD_POST, "POST"},      {CONFIG_METHOD_PUT, "PUT"},
                 {CONFIG_METHOD_PATCH, "PATCH"},    {CONFIG_METHOD_DELETE, "DELETE"},
                 {CONFIG_METHOD_OPTIONS, "OPTIONS"}};
    size_t n = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (!(allow & names[i].bit))
            continue;
        int w = snprintf(buf + n, size - n, "%s%s", n ? ", " : "", names[i].name);
        if (w < 0 || (size_t)w >= size - n)
            break;
        n += (size_t)w;
    }
}

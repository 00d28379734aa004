/*
 * router.h - matching a request's path and method to a configured route.
 *
 * Built once per configuration on the main thread, then read-only and shared
 * by every worker. A route matches when its path and its methods both match;
 * among matches the most specific path wins: exact, then `:param` patterns,
 * then the longest prefix; ties go to the earlier route in the file. When some
 * route's path matches but none accepts the method, the answer is 405 with the
 * union of their methods for `Allow`. A route that accepts GET accepts HEAD too;
 * no route accepts TRACE or CONNECT.
 */
#ifndef GATEWAY_ROUTER_H
#define GATEWAY_ROUTER_H

#include <stddef.h>

#include "config/config.h"

#define ROUTER_MAX_PARAMS 16

typedef struct router router_t;

typedef struct router_param {
    const char *name; /* borrowed from the route's config */
    size_t name_len;
    const char *value; /* points into the matched path; not NUL-terminated */
    size_t value_len;
} router_param;

typedef struct router_match {
    int status;      /* 0: matched; 404: no path matched; 405: path matched, method did not */
    int route_index; /* index into the config's routes when status is 0, else -1 */
    unsigned allow;  /* with 405: CONFIG_METHOD_* bits of the routes whose path matched */
    size_t param_count;
    router_param params[ROUTER_MAX_PARAMS];
} router_match;

/* Compile routes (borrowed: they must outlive the router). Returns NULL on
 * allocation failure or a pattern with more than ROUTER_MAX_PARAMS params. */
router_t *router_create(const config_route *routes, size_t count);
void router_free(router_t *r);

/* Match path (without the query) and method (one CONFIG_METHOD_* bit). */
void router_match_path(const router_t *r, const char *path, unsigned method, router_match *out);

/* Write "GET, HEAD, POST" for the bits in allow into buf (size >= 64). */
void router_allow_header(unsigned allow, char *buf, size_t size);

#endif

/*
 * key.h - cache keys and key patterns; pure.
 *
 * A key is key_prefix followed by either the route's template expanded or,
 * without a template, "<METHOD>:<path>?<query>" (no '?' when the query is
 * empty), the default that PRODUCT.md names (cache:GET:/api/blueprints?a=1).
 * The method of a HEAD request is written GET: HEAD is answered from GET
 * entries.
 *
 * Template parts: {method}, {path} (as received, still percent-encoded),
 * {path.X} (the route's :X segment, percent-decoded and encoded again like a
 * query value), {query} (the normalised query), {query.X} (the first X,
 * normalised), {header.X} (the request header X, every byte outside the
 * unreserved set as %XX; Authorization, Proxy-Authorization and Cookie are
 * written as "h:" and 32 hex digits of their SHA-256, so a credential never
 * becomes a key name or a response header). Values are encoded so that none
 * can hold the template's own separators: two requests never share a key by
 * shifting text from one part into another. A part the request lacks expands to nothing. Any other
 * text is copied.
 *
 * The normalised query: each name=value pair with %XX decoded, then encoded
 * again with only RFC 3986 unreserved bytes left as they are (%XX in upper
 * case otherwise; a '+' stays '+', since upstreams differ on whether it is a
 * space), a missing '=' written as "name=", empty pairs dropped, pairs sorted
 * by name (bytewise, decoded), pairs of one name keeping their order, joined
 * by '&'. So ?b=2&a=1, ?a=1&b=2 and ?a=%31&b=2 share a key, and ?s=x&s=y
 * and ?s=y&s=x do not.
 */
#ifndef GATEWAY_CACHE_KEY_H
#define GATEWAY_CACHE_KEY_H

#include <stdbool.h>
#include <stddef.h>

/* Where the template's values come from. */
typedef struct cache_key_source {
    const char *method; /* "GET", "POST", ...; "HEAD" is written "GET" */
    const char *path;   /* as received, without the query */
    const char *query;  /* the raw query string (after '?'), NULL when none */
    /* The route's :name segment (not NUL-terminated), or NULL. */
    const char *(*path_param)(void *arg, const char *name, size_t name_len, size_t *value_len);
    /* The request header name (NUL-terminated name), or NULL. */
    const char *(*header)(void *arg, const char *name);
    void *arg;
} cache_key_source;

/* Write the key into out (NUL-terminated). Returns its length, or 0 when it
 * does not fit in size bytes, the query has more than 256 pairs or a
 * {header.X} name is 256 bytes or longer (the request then bypasses the
 * cache). tmpl NULL: the default key. */
size_t cache_key_build(const char *prefix, const char *tmpl, const cache_key_source *src, char *out,
                       size_t size);

/* Like cache_key_build for an invalidate: pattern: the template's parts are
 * filled in with glob characters in their values escaped (\*, \?, \[, \], \\),
 * the rest of the pattern kept as written. No prefix is added (patterns are
 * whole key patterns, cache:GET:/api/blueprints*). 0 when it does not fit. */
size_t cache_pattern_build(const char *pattern, const cache_key_source *src, char *out, size_t size);

/* Does tmpl name {header.Authorization} (any case)? Then requests with
 * Authorization may be cached under it. NULL: no. */
bool cache_key_names_authorization(const char *tmpl);

/* Redis's glob (MATCH, PSUBSCRIBE): '*', '?', [abc], [^a], [a-z], '\' escapes.
 * As in Redis, an empty string matches only the empty pattern (not "*").
 * Iterative, O(pattern_len x len) whatever the pattern; bytes compare
 * unsigned in ranges. */
bool cache_glob_match(const char *pattern, size_t pattern_len, const char *s, size_t len);

/* Does pattern contain an unescaped glob character? (Else it names one key.) */
bool cache_glob_is_literal(const char *pattern, size_t len);

#endif

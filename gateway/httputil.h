/*
 * httputil.h - small HTTP helpers with no state of their own: request ids,
 * W3C traceparent, hop-by-hop header rules, the gateway's JSON error body,
 * the X-Forwarded-For walk behind the rate limiter's client address, and a
 * per-thread random generator for the ids.
 */
#ifndef GATEWAY_HTTPUTIL_H
#define GATEWAY_HTTPUTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define GW_REQUEST_ID_MAX 128   /* longest inbound X-Request-Id kept */
#define GW_REQUEST_ID_MINTED 32 /* hex characters of a minted id */
#define GW_TRACEPARENT_LEN 55   /* "00-" 32 "-" 16 "-" 2 */

struct evbuffer;
struct evkeyvalq;
struct gw_cidr; /* gateway/runtime.h */

/* xoshiro256** state; one per thread, seeded from getrandom(). */
typedef struct gw_rng {
    uint64_t s[4];
} gw_rng;

void gw_rng_seed(gw_rng *rng);
uint64_t gw_rng_next(gw_rng *rng);

/* Write 2*nbytes lowercase hex characters and a NUL into out. */
void gw_rng_hex(gw_rng *rng, char *out, size_t nbytes);

/* 1..GW_REQUEST_ID_MAX characters of [A-Za-z0-9._:-]. */
bool gw_request_id_is_sane(const char *id);

/* version "00" (or a later version with the same first fields), 32 hex trace
 * id not all zero, 16 hex parent id not all zero, 2 hex flags; lowercase. */
bool gw_traceparent_is_valid(const char *tp);
/* A new traceparent into out (GW_TRACEPARENT_LEN + 1 bytes), sampled flag set. */
void gw_traceparent_mint(gw_rng *rng, char *out);

/* Is header `name` hop-by-hop, either by the fixed list (Connection, Keep-Alive,
 * TE, Trailer, Transfer-Encoding, Upgrade, Proxy-*) or because the message's
 * Connection header (`connection`, may be NULL) names it? */
bool gw_header_is_hop_by_hop(const char *name, const char *connection);

/* The next element of the comma-separated list at *p (blanks and empty
 * elements skipped, the element's trailing blanks trimmed): true with the
 * element at *elem (*len bytes) and *p past it; false at the list's end. */
bool gw_list_next(const char **p, const char **elem, size_t *len);

/* Does the comma-separated token list (a Connection header, say) contain
 * name, compared case-insensitively? */
bool gw_header_list_has_token(const char *list, const char *name);

/* The body of an error the gateway answers itself:
 * {"error": "<text>", "status": <code>, "request_id": "<id>"} */
void gw_error_body(struct evbuffer *out, int status, const char *text, const char *request_id);

/* False when the path, once percent-decoded, has a "." or ".." segment
 * (separated by '/' or '\\', encoded or not) or a NUL: such a path could
 * escape a prefix route at an upstream that normalises it. */
bool gw_path_is_safe(const char *path);

/* One X-Forwarded-For field value (hops separated by commas, the nearest
 * proxy's on the right) walked from its right end, as the rate limiter finds
 * a client behind trusted proxies. Each hop has its blanks trimmed, loses a
 * port ("[v6]:port", "v4:port"), is written in inet_ntop's spelling when it is
 * an address (lower case, shortest IPv6: one key per address), and is then
 * written into out, cut to size - 1 bytes (nothing written when size is 0).
 * Returns false at the first hop outside the `trusted_count` blocks of
 * `trusted` (out holds it: nothing left of it is believed, as anyone could
 * have written it) or at a malformed hop, which is an empty element (but
 * for a leading one, passed over) or one longer than INET6_ADDRSTRLEN bytes
 * (out keeps what it held: the hop to its right, or the caller's value if it
 * is the first). Returns true when every hop is trusted (out holds the
 * leftmost; untouched when xff is ""): the caller goes on with the field line
 * before. Everything is borrowed for the call. */
bool gw_forwarded_for_walk(const struct gw_cidr *trusted, size_t trusted_count, const char *xff, char *out,
                           size_t size);

/* Method bit (CONFIG_METHOD_*) to its name; "OTHER" when unknown. */
const char *gw_method_name(unsigned method_bit);

#endif

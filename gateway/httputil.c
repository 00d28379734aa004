/*
 * httputil.c - stateless HTTP helpers; callable from any thread (the random
 * generator state is the caller's, one per thread).
 */
#include "gateway/httputil.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>

#include <event2/buffer.h>

#include "config/config.h"
#include "gateway/log.h"
#include "gateway/runtime.h"

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

uint64_t gw_rng_next(gw_rng *rng)
{
    uint64_t *s = rng->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

void gw_rng_seed(gw_rng *rng)
{
    if (getrandom(rng->s, sizeof rng->s, 0) != (ssize_t)sizeof rng->s) {
        /* No entropy source: ids only need to be unique, not secret. */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        rng->s[0] = (uint64_t)ts.tv_nsec ^ 0x9e3779b97f4a7c15ULL;
        rng->s[1] = (uint64_t)ts.tv_sec ^ (uint64_t)(uintptr_t)rng;
        rng->s[2] = 0xbf58476d1ce4e5b9ULL;
        rng->s[3] = 0x94d049bb133111ebULL;
    }
    if (!(rng->s[0] | rng->s[1] | rng->s[2] | rng->s[3]))
        rng->s[0] = 1;
}

/* Eight hex digits of x without a table: each nibble spread to its own byte,
 * then '0' + n, and 39 more for n >= 10 ('a' - '0' - 10), added to all eight
 * bytes at once. The digits come in a shuffled order, which does not matter
 * for random bits. This runs three times for every request. */
static void hex_digits8(uint32_t x, char *out)
{
    uint64_t v = x;
    v = (v | (v << 16)) & 0x0000FFFF0000FFFFULL;
    v = (v | (v << 8)) & 0x00FF00FF00FF00FFULL;
    v = (v | (v << 4)) & 0x0F0F0F0F0F0F0F0FULL;
    uint64_t letters = ((v + 0x0606060606060606ULL) >> 4) & 0x0101010101010101ULL;
    v += 0x3030303030303030ULL + letters * 0x27;
    memcpy(out, &v, 8);
}

void gw_rng_hex(gw_rng *rng, char *out, size_t nbytes)
{
    static const char hex[] = "0123456789abcdef";
    size_t i = 0;
    /* Eight bytes from each draw, sixteen digits. */
    for (; i + 8 <= nbytes; i += 8) {
        uint64_t v = gw_rng_next(rng);
        hex_digits8((uint32_t)v, out + 2 * i);
        hex_digits8((uint32_t)(v >> 32), out + 2 * i + 8);
    }
    if (i < nbytes) {
        uint64_t v = gw_rng_next(rng);
        for (; i < nbytes; i++, v >>= 8) {
            out[2 * i] = hex[(v >> 4) & 15];
            out[2 * i + 1] = hex[v & 15];
        }
    }
    out[2 * nbytes] = '\0';
}

bool gw_request_id_is_sane(const char *id)
{
    size_t n = 0;
    if (!id)
        return false;
    for (; id[n]; n++) {
        char c = id[n];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                  c == '_' || c == ':' || c == '-';
        if (!ok || n >= GW_REQUEST_ID_MAX)
            return false;
    }
    return n > 0;
}

static bool is_lower_hex(const char *s, size_t n, bool *all_zero)
{
    *all_zero = true;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return false;
        if (c != '0')
            *all_zero = false;
    }
    return true;
}

bool gw_traceparent_is_valid(const char *tp)
{
    bool zero;
    if (!tp)
        return false;
    size_t len = strlen(tp);
    if (len < GW_TRACEPARENT_LEN)
        return false;
    if (!is_lower_hex(tp, 2, &zero) || strncmp(tp, "ff", 2) == 0)
        return false;
    /* Version 00 is exactly 55 characters; later versions may append "-..." */
    if (strncmp(tp, "00", 2) == 0 ? len != GW_TRACEPARENT_LEN : (len > GW_TRACEPARENT_LEN && tp[55] != '-'))
        return false;
    if (tp[2] != '-' || tp[35] != '-' || tp[52] != '-')
        return false;
    if (!is_lower_hex(tp + 3, 32, &zero) || zero)
        return false;
    if (!is_lower_hex(tp + 36, 16, &zero) || zero)
        return false;
    return is_lower_hex(tp + 53, 2, &zero);
}

/* Are the n digits at s all '0'? */
static bool all_zero_digits(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] != '0')
            return false;
    return true;
}

void gw_traceparent_mint(gw_rng *rng, char *out)
{
    /* "00-" trace-id "-" parent-id "-01", written in place (this runs for
     * every request without one); all-zero ids are invalid, so draw again. */
    memcpy(out, "00-", 3);
    do
        gw_rng_hex(rng, out + 3, 16);
    while (all_zero_digits(out + 3, 32));
    out[35] = '-';
    do
        gw_rng_hex(rng, out + 36, 8);
    while (all_zero_digits(out + 36, 16));
    memcpy(out + 52, "-01", 4); /* the NUL included */
}

bool gw_list_next(const char **p, const char **elem, size_t *len)
{
    const char *s = *p;
    while (*s == ' ' || *s == '\t' || *s == ',')
        s++;
    if (!*s) {
        *p = s;
        return false;
    }
    const char *start = s;
    while (*s && *s != ',')
        s++;
    const char *end = s;
    while (end > start && (end[-1] == ' ' || end[-1] == '\t'))
        end--;
    *p = s;
    *elem = start;
    *len = (size_t)(end - start);
    return true;
}

/* Is name (name_len bytes) an element of the comma-separated list? */
static bool list_has_token(const char *p, const char *name, size_t name_len)
{
    const char *elem;
    size_t len;
    while (gw_list_next(&p, &elem, &len))
        if (len == name_len && strncasecmp(elem, name, name_len) == 0)
            return true;
    return false;
}

bool gw_header_list_has_token(const char *list, const char *name)
{
    return list_has_token(list, name, strlen(name));
}

bool gw_header_is_hop_by_hop(const char *name, const char *connection)
{
    /* Runs for every header of every request and answer: decide by length
     * first, so most names cost one strlen and no comparison. */
    size_t n = strlen(name);
    bool fixed = false;
    switch (n) {
    case 2:
        fixed = strcasecmp(name, "TE") == 0;
        break;
    case 7:
        fixed = strcasecmp(name, "Trailer") == 0 || strcasecmp(name, "Upgrade") == 0;
        break;
    case 8:
        fixed = strcasecmp(name, "Trailers") == 0;
        break;
    case 10:
        fixed = strcasecmp(name, "Connection") == 0 || strcasecmp(name, "Keep-Alive") == 0;
        break;
    case 17:
        fixed = strcasecmp(name, "Transfer-Encoding") == 0;
        break;
    default:
        break;
    }
    if (fixed || (n > 6 && (name[0] | 0x20) == 'p' && strncasecmp(name, "Proxy-", 6) == 0))
        return true;
    return connection && list_has_token(connection, name, n);
}

void gw_error_body(struct evbuffer *out, int status, const char *text, const char *request_id)
{
    evbuffer_add_printf(out, "{\"error\":\"");
    gw_json_escape(out, text);
    evbuffer_add_printf(out, "\",\"status\":%d,\"request_id\":\"", status);
    gw_json_escape(out, request_id ? request_id : "");
    evbuffer_add_printf(out, "\"}\n");
}

/* An X-Forwarded-For hop as one spelling per address: "[v6]:port" and
 * "v4:port" lose the port, and a parsable address is written back by
 * inet_ntop (lower case, shortest IPv6). Otherwise left as it is. hop has
 * room for INET6_ADDRSTRLEN + 1 bytes. */
static void canonical_address(char *hop)
{
    unsigned char bytes[16];
    char tmp[INET6_ADDRSTRLEN + 1];
    if (hop[0] == '[') {
        char *close = strchr(hop, ']');
        if (close) {
            size_t n = (size_t)(close - hop - 1);
            memmove(hop, hop + 1, n);
            hop[n] = '\0';
        }
    } else {
        char *colon = strchr(hop, ':');
        if (colon && !strchr(colon + 1, ':'))
            *colon = '\0'; /* one colon: IPv4 with a port */
    }
    int family = strchr(hop, ':') ? AF_INET6 : AF_INET;
    if (inet_pton(family, hop, bytes) == 1 && inet_ntop(family, bytes, tmp, sizeof tmp))
        memcpy(hop, tmp, strlen(tmp) + 1);
}

bool gw_forwarded_for_walk(const struct gw_cidr *trusted, size_t trusted_count, const char *xff, char *out,
                           size_t size)
{
    const char *end = xff + strlen(xff);
    while (end > xff) {
        const char *start = end;
        while (start > xff && start[-1] != ',')
            start--;
        const char *a = start, *b = end;
        while (a < b && (*a == ' ' || *a == '\t'))
            a++;
        while (b > a && (b[-1] == ' ' || b[-1] == '\t'))
            b--;
        char hop[INET6_ADDRSTRLEN + 1];
        size_t n = (size_t)(b - a);
        if (n == 0 || n >= sizeof hop)
            return false; /* malformed: keep what we have */
        memcpy(hop, a, n);
        hop[n] = '\0';
        canonical_address(hop);
        snprintf(out, size, "%s", hop);
        if (!gw_cidr_match(trusted, trusted_count, hop))
            return false;
        end = start > xff ? start - 1 : xff;
    }
    return true;
}

const char *gw_method_name(unsigned method_bit)
{
    switch (method_bit) {
    case CONFIG_METHOD_GET:
        return "GET";
    case CONFIG_METHOD_POST:
        return "POST";
    case CONFIG_METHOD_HEAD:
        return "HEAD";
    case CONFIG_METHOD_PUT:
        return "PUT";
    case CONFIG_METHOD_DELETE:
        return "DELETE";
    case CONFIG_METHOD_OPTIONS:
        return "OPTIONS";
    case CONFIG_METHOD_TRACE:
        return "TRACE";
    case CONFIG_METHOD_CONNECT:
        return "CONNECT";
    case CONFIG_METHOD_PATCH:
        return "PATCH";
    default:
        return "OTHER";
    }
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

bool gw_path_is_safe(const char *path)
{
    /* Walk the path as an upstream would see it once decoded: %XX decoded, and
     * '/', '\\' and their encodings all separating segments. A "." or ".."
     * segment could climb out of a prefix route; a NUL truncates paths in C
     * backends. Everything else is left to the upstream. */
    size_t seg_len = 0;
    int dots = 0; /* leading dots of the current segment, -1 once it has anything else */
    for (const char *p = path;; p++) {
        int c = (unsigned char)*p;
        if (c == '%') {
            int hi = hex_value(p[1]), lo = hi >= 0 ? hex_value(p[2]) : -1;
            if (hi >= 0 && lo >= 0) {
                c = hi * 16 + lo;
                p += 2;
                if (c == 0)
                    return false;
            }
        }
        if (c == '\0' || c == '/' || c == '\\') {
            if (seg_len > 0 && seg_len <= 2 && dots > 0 && (size_t)dots == seg_len)
                return false;
            if (*p == '\0')
                return true;
            seg_len = 0;
            dots = 0;
            continue;
        }
        seg_len++;
        if (c == '.' && dots >= 0)
            dots++;
        else
            dots = -1;
    }
}

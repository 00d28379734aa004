/*
 * key.c - cache keys, invalidation patterns and Redis's glob (see key.h).
 *
 * Pure string work into the caller's buffer: no allocation, no state, any
 * thread. Everything written goes through one bounded writer (key_out) that
 * remembers when the key stopped fitting, so the build functions answer 0
 * rather than a truncated key: two truncated keys could name different
 * answers, a bypassed request is only slower.
 *
 * The glob is Redis's stringmatchlen() (MATCH, PSUBSCRIBE, and what our
 * Redis store's SCAN MATCH does), but matched iteratively with the classic
 * last-star backtracking: Redis recurses once per '*' and relies on a nesting
 * cap, we stay O(pattern x string) whatever an invalidation pattern holds.
 */
#include "cache/key.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/sha.h>

#define CACHE_KEY_MAX_PAIRS 256 /* query pairs sorted on the stack; more and the request bypasses */
#define CACHE_KEY_NAME_MAX 256  /* a {header.X} name, NUL-terminated on the stack */
#define CACHE_KEY_HASH_BYTES 16 /* of a credential's SHA-256, written as 32 hex digits */

/* ---- the bounded writer ---------------------------------------------------------------- */

typedef struct key_out {
    char *buf;
    size_t size;
    size_t len; /* < size while !overflow: room for the NUL is kept */
    bool overflow;
    bool escape_glob; /* cache_pattern_build: a '\' before glob bytes in values */
} key_out;

static void out_init(key_out *o, char *buf, size_t size, bool escape_glob)
{
    o->buf = buf;
    o->size = size;
    o->len = 0;
    o->overflow = size == 0 || buf == NULL;
    o->escape_glob = escape_glob;
}

static void out_raw(key_out *o, const char *s, size_t n)
{
    if (o->overflow)
        return;
    if (n >= o->size - o->len) {
        o->overflow = true;
        return;
    }
    memcpy(o->buf + o->len, s, n);
    o->len += n;
}

static void out_byte(key_out *o, char c)
{
    out_raw(o, &c, 1);
}

static bool is_glob_byte(char c)
{
    return c == '*' || c == '?' || c == '[' || c == ']' || c == '\\';
}

/* A value filled in from the request: escaped in a pattern, so a request's
 * '*' cannot widen an invalidation. */
static void out_value(key_out *o, const char *s, size_t n)
{
    if (!o->escape_glob) {
        out_raw(o, s, n);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        if (is_glob_byte(s[i]))
            out_byte(o, '\\');
        out_byte(o, s[i]);
    }
}

static size_t out_finish(key_out *o)
{
    if (o->overflow || o->len == 0) {
        if (o->buf && o->size)
            o->buf[0] = '\0';
        return 0;
    }
    o->buf[o->len] = '\0';
    return o->len;
}

/* ---- query normalisation ----------------------------------------------------------------- */

static int hex_value(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* The next decoded byte of a raw query component at *i, which advances: %XX
 * and '+' decoded, a '%' not followed by two hex digits taken literally. */
static unsigned char query_decode_next(const char *s, size_t n, size_t *i)
{
    unsigned char c = (unsigned char)s[*i];
    if (c == '+') {
        *i += 1;
        return ' ';
    }
    if (c == '%' && n - *i >= 3) {
        int hi = hex_value((unsigned char)s[*i + 1]), lo = hex_value((unsigned char)s[*i + 2]);
        if (hi >= 0 && lo >= 0) {
            *i += 3;
            return (unsigned char)(hi << 4 | lo);
        }
    }
    *i += 1;
    return c;
}

static bool is_unreserved(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '.' || c == '_' || c == '~';
}

/* A raw component decoded, then encoded again with only unreserved bytes kept.
 * A '+' stays '+': to some upstreams it is a space (form encoding), to others
 * a plus, so it shares a key with neither %20 nor %2B. */
static void out_query_component(key_out *o, const char *s, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t i = 0;
    while (i < n && !o->overflow) {
        if (s[i] == '+') {
            out_byte(o, '+');
            i++;
            continue;
        }
        unsigned char c = query_decode_next(s, n, &i);
        if (is_unreserved(c)) {
            out_byte(o, (char)c);
        } else {
            char e[3] = {'%', hex[c >> 4], hex[c & 15]};
            out_raw(o, e, 3);
        }
    }
}

/* A {path.X} or {header.X} value in the key: every byte outside the
 * unreserved set as %XX, so no value can hold the template's own separators
 * and two different requests never share a key ("t:{path.id}:{header.T}" with
 * id "5:1" and T "x" must not meet id "5" and T "1:x"). A path segment is
 * percent-decoded first (so %3A and ':' are one value); a header value is
 * taken byte for byte ('%' itself is encoded). */
static void out_encoded(key_out *o, const char *s, size_t n, bool decode)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t i = 0;
    while (i < n && !o->overflow) {
        unsigned char c = (unsigned char)s[i];
        if (decode && c == '%' && n - i >= 3 && hex_value((unsigned char)s[i + 1]) >= 0 &&
            hex_value((unsigned char)s[i + 2]) >= 0) {
            c = (unsigned char)(hex_value((unsigned char)s[i + 1]) << 4 | hex_value((unsigned char)s[i + 2]));
            i += 3;
        } else {
            i++;
        }
        if (is_unreserved(c)) {
            out_byte(o, (char)c);
        } else {
            char e[3] = {'%', hex[c >> 4], hex[c & 15]};
            out_raw(o, e, 3);
        }
    }
}

/* Compare two raw components by their decoded bytes. */
static int query_component_cmp(const char *a, size_t an, const char *b, size_t bn)
{
    size_t i = 0, j = 0;
    while (i < an && j < bn) {
        unsigned char x = query_decode_next(a, an, &i), y = query_decode_next(b, bn, &j);
        if (x != y)
            return x < y ? -1 : 1;
    }
    if (i < an)
        return 1;
    if (j < bn)
        return -1;
    return 0;
}

/* Does the raw component decode to exactly the n bytes of plain? */
static bool query_component_is(const char *s, size_t sn, const char *plain, size_t n)
{
    size_t i = 0, j = 0;
    while (i < sn && j < n) {
        if (query_decode_next(s, sn, &i) != (unsigned char)plain[j++])
            return false;
    }
    return i == sn && j == n;
}

typedef struct query_pair {
    const char *name, *value; /* raw, as received */
    size_t name_len, value_len;
    size_t at; /* its place in the query: repeated names keep their order */
} query_pair;

/* The next non-empty pair of the raw query at *pos, which advances. */
static bool query_next_pair(const char *q, size_t qlen, size_t *pos, query_pair *p)
{
    while (*pos < qlen) {
        const char *seg = q + *pos;
        const char *amp = memchr(seg, '&', qlen - *pos);
        size_t n = amp ? (size_t)(amp - seg) : qlen - *pos;
        *pos += n + (amp ? 1 : 0);
        if (n == 0)
            continue;
        const char *eq = memchr(seg, '=', n);
        p->name = seg;
        p->name_len = eq ? (size_t)(eq - seg) : n;
        p->value = eq ? eq + 1 : seg + n;
        p->value_len = eq ? n - p->name_len - 1 : 0;
        return true;
    }
    return false;
}

static int query_pair_cmp(const void *a, const void *b)
{
    const query_pair *x = a, *y = b;
    int c = query_component_cmp(x->name, x->name_len, y->name, y->name_len);
    /* By name only: ?sort=price&sort=name and ?sort=name&sort=price may mean
     * different things to the upstream, so they keep their order (and keys). */
    return c ? c : x->at < y->at ? -1 : x->at > y->at;
}

/* The query's pairs, sorted; false when there are more than fit. */
static bool query_sorted_pairs(const char *q, query_pair *pairs, size_t *count)
{
    size_t n = 0, pos = 0, qlen = q ? strlen(q) : 0;
    query_pair p;
    while (query_next_pair(q, qlen, &pos, &p)) {
        if (n == CACHE_KEY_MAX_PAIRS)
            return false;
        p.at = n;
        pairs[n++] = p;
    }
    qsort(pairs, n, sizeof *pairs, query_pair_cmp);
    *count = n;
    return true;
}

static void out_query_pairs(key_out *o, const query_pair *pairs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (i)
            out_byte(o, '&');
        out_query_component(o, pairs[i].name, pairs[i].name_len);
        out_byte(o, '=');
        out_query_component(o, pairs[i].value, pairs[i].value_len);
    }
}

static void out_query(key_out *o, const char *q)
{
    query_pair pairs[CACHE_KEY_MAX_PAIRS];
    size_t n = 0;
    if (!query_sorted_pairs(q, pairs, &n)) {
        o->overflow = true;
        return;
    }
    out_query_pairs(o, pairs, n);
}

static void out_query_param(key_out *o, const char *q, const char *name, size_t name_len)
{
    size_t pos = 0, qlen = q ? strlen(q) : 0;
    query_pair p;
    while (query_next_pair(q, qlen, &pos, &p)) {
        if (query_component_is(p.name, p.name_len, name, name_len)) {
            out_query_component(o, p.value, p.value_len);
            return;
        }
    }
}

/* ---- templates --------------------------------------------------------------------------- */

typedef enum key_part_kind {
    PART_TEXT,
    PART_METHOD,
    PART_PATH,
    PART_PATH_PARAM,
    PART_QUERY,
    PART_QUERY_PARAM,
    PART_HEADER,
} key_part_kind;

typedef struct key_part {
    key_part_kind kind;
    const char *s; /* PART_TEXT: the text; *_PARAM and PART_HEADER: the name X */
    size_t len;
} key_part;

static bool part_named(const char *s, size_t n, const char *word)
{
    return strlen(word) == n && memcmp(s, word, n) == 0;
}

static bool part_prefixed(const char *s, size_t n, const char *prefix, key_part *part)
{
    size_t pn = strlen(prefix);
    if (n <= pn || memcmp(s, prefix, pn) != 0)
        return false;
    part->s = s + pn;
    part->len = n - pn;
    return true;
}

/* The part "{...}" at t, or false when t does not open one (then '{' is text). */
static bool parse_part(const char *t, key_part *part, size_t *used)
{
    const char *close = strchr(t + 1, '}');
    if (!close)
        return false;
    const char *s = t + 1;
    size_t n = (size_t)(close - s);
    if (memchr(s, '{', n))
        return false;
    *used = n + 2;
    part->s = NULL;
    part->len = 0;
    if (part_named(s, n, "method"))
        part->kind = PART_METHOD;
    else if (part_named(s, n, "path"))
        part->kind = PART_PATH;
    else if (part_named(s, n, "query"))
        part->kind = PART_QUERY;
    else if (part_prefixed(s, n, "path.", part))
        part->kind = PART_PATH_PARAM;
    else if (part_prefixed(s, n, "query.", part))
        part->kind = PART_QUERY_PARAM;
    else if (part_prefixed(s, n, "header.", part))
        part->kind = PART_HEADER;
    else
        return false;
    return true;
}

/* The next part of the template at *t, which advances; false at its end. */
static bool next_part(const char **t, key_part *part)
{
    const char *s = *t;
    if (!*s)
        return false;
    size_t used;
    if (*s == '{' && parse_part(s, part, &used)) {
        *t = s + used;
        return true;
    }
    /* Text up to the next '{' (a '{' that opens no part is one byte of text). */
    const char *brace = strchr(s + 1, '{');
    size_t n = brace ? (size_t)(brace - s) : strlen(s);
    part->kind = PART_TEXT;
    part->s = s;
    part->len = n;
    *t = s + n;
    return true;
}

static const char *method_of(const cache_key_source *src)
{
    if (!src->method)
        return "";
    return strcmp(src->method, "HEAD") == 0 ? "GET" : src->method;
}

static bool is_credential_header(const char *name)
{
    return strcasecmp(name, "Authorization") == 0 || strcasecmp(name, "Proxy-Authorization") == 0 ||
           strcasecmp(name, "Cookie") == 0;
}

static void out_header(key_out *o, const cache_key_source *src, const char *name, size_t name_len)
{
    char z[CACHE_KEY_NAME_MAX];
    if (name_len >= sizeof z) {
        o->overflow = true; /* a name no request header can have: no key rather than a wrong one */
        return;
    }
    memcpy(z, name, name_len);
    z[name_len] = '\0';
    const char *v = src->header ? src->header(src->arg, z) : NULL;
    if (!v)
        return;
    if (!is_credential_header(z)) {
        out_encoded(o, v, strlen(v), false);
        return;
    }
    static const char hex[] = "0123456789abcdef";
    unsigned char md[SHA256_DIGEST_LENGTH];
    char h[2 + 2 * CACHE_KEY_HASH_BYTES];
    SHA256((const unsigned char *)v, strlen(v), md);
    h[0] = 'h';
    h[1] = ':';
    for (size_t i = 0; i < CACHE_KEY_HASH_BYTES; i++) {
        h[2 + 2 * i] = hex[md[i] >> 4];
        h[3 + 2 * i] = hex[md[i] & 15];
    }
    out_raw(o, h, sizeof h);
}

static void expand(key_out *o, const char *tmpl, const cache_key_source *src)
{
    key_part part;
    while (!o->overflow && next_part(&tmpl, &part)) {
        switch (part.kind) {
        case PART_TEXT:
            out_raw(o, part.s, part.len);
            break;
        case PART_METHOD: {
            const char *m = method_of(src);
            out_value(o, m, strlen(m));
            break;
        }
        case PART_PATH:
            if (src->path)
                out_value(o, src->path, strlen(src->path));
            break;
        case PART_PATH_PARAM: {
            size_t vlen = 0;
            const char *v = src->path_param ? src->path_param(src->arg, part.s, part.len, &vlen) : NULL;
            if (v)
                out_encoded(o, v, vlen, true);
            break;
        }
        case PART_QUERY:
            out_query(o, src->query);
            break;
        case PART_QUERY_PARAM:
            out_query_param(o, src->query, part.s, part.len);
            break;
        case PART_HEADER:
            out_header(o, src, part.s, part.len);
            break;
        }
    }
}

size_t cache_key_build(const char *prefix, const char *tmpl, const cache_key_source *src, char *out,
                       size_t size)
{
    key_out o;
    out_init(&o, out, size, false);
    if (prefix)
        out_raw(&o, prefix, strlen(prefix));
    if (tmpl) {
        expand(&o, tmpl, src);
        return out_finish(&o);
    }
    const char *m = method_of(src);
    out_raw(&o, m, strlen(m));
    out_byte(&o, ':');
    if (src->path)
        out_raw(&o, src->path, strlen(src->path));
    query_pair pairs[CACHE_KEY_MAX_PAIRS];
    size_t n = 0;
    if (!query_sorted_pairs(src->query, pairs, &n))
        o.overflow = true;
    else if (n) {
        out_byte(&o, '?');
        out_query_pairs(&o, pairs, n);
    }
    return out_finish(&o);
}

size_t cache_pattern_build(const char *pattern, const cache_key_source *src, char *out, size_t size)
{
    key_out o;
    out_init(&o, out, size, true);
    if (pattern)
        expand(&o, pattern, src);
    return out_finish(&o);
}

bool cache_key_names_authorization(const char *tmpl)
{
    if (!tmpl)
        return false;
    key_part part;
    while (next_part(&tmpl, &part)) {
        if (part.kind == PART_HEADER && part.len == strlen("Authorization") &&
            strncasecmp(part.s, "Authorization", part.len) == 0)
            return true;
    }
    return false;
}

/* ---- glob -------------------------------------------------------------------------------- */

/* Does the one-byte token at pat[*pp] (anything but '*') match c? *pp moves
 * past the token. Classes follow Redis to the byte: '\' escapes inside them,
 * a range's ends may come in either order, a class the pattern ends inside
 * takes the rest of the pattern. Bytes compare unsigned (Redis compares
 * plain char, whose sign depends on the platform). */
static bool glob_token(const unsigned char *pat, size_t plen, size_t *pp, unsigned char c)
{
    size_t p = *pp;
    bool match = false;
    if (pat[p] == '?') {
        match = true;
    } else if (pat[p] == '[') {
        p++;
        bool negate = p < plen && pat[p] == '^';
        if (negate)
            p++;
        for (;;) {
            if (p + 1 < plen && pat[p] == '\\') {
                p++;
                if (pat[p] == c)
                    match = true;
            } else if (p < plen && pat[p] == ']') {
                break;
            } else if (p >= plen) {
                p--; /* unterminated: the last byte ends the token */
                break;
            } else if (p + 2 < plen && pat[p + 1] == '-') {
                unsigned char lo = pat[p], hi = pat[p + 2];
                if (lo > hi) {
                    unsigned char t = lo;
                    lo = hi;
                    hi = t;
                }
                if (c >= lo && c <= hi)
                    match = true;
                p += 2;
            } else if (pat[p] == c) {
                match = true;
            }
            p++;
        }
        if (negate)
            match = !match;
    } else {
        if (pat[p] == '\\' && p + 1 < plen)
            p++;
        match = pat[p] == c;
    }
    *pp = p + 1;
    return match;
}

bool cache_glob_match(const char *pattern, size_t pattern_len, const char *s, size_t len)
{
    const unsigned char *pat = (const unsigned char *)pattern, *str = (const unsigned char *)s;
    /* Redis's loop needs a byte of string to start: an empty string matches
     * only the empty pattern, not even "*". */
    if (len == 0)
        return pattern_len == 0;
    size_t p = 0, i = 0;
    size_t star_p = SIZE_MAX, star_i = 0; /* after the last '*' seen, and where it stopped */
    while (i < len) {
        if (p < pattern_len && pat[p] == '*') {
            while (p < pattern_len && pat[p] == '*')
                p++;
            if (p == pattern_len)
                return true;
            star_p = p;
            star_i = i;
            continue;
        }
        if (p < pattern_len) {
            size_t next = p;
            if (glob_token(pat, pattern_len, &next, str[i])) {
                p = next;
                i++;
                continue;
            }
        }
        /* Mismatch: let the last '*' take one more byte. Earlier stars never
         * need to: every other token is one byte wide. */
        if (star_p == SIZE_MAX)
            return false;
        p = star_p;
        i = ++star_i;
    }
    while (p < pattern_len && pat[p] == '*')
        p++;
    return p == pattern_len;
}

bool cache_glob_is_literal(const char *pattern, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        char c = pattern[i];
        if (c == '\\' && i + 1 < len)
            i++;
        else if (c == '*' || c == '?' || c == '[')
            return false;
    }
    return true;
}

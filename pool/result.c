/*
 * result.c - a query's PGresult as the JSON a SQL route answers, and the
 * paging helpers around it. Pure functions; any thread.
 *
 * This runs for every row of every SQL answer, so the string encoder works in
 * runs: bytes that need no escaping (printable ASCII and well-formed UTF-8)
 * are scanned with a class table and appended with one evbuffer_add per run;
 * only escapes and replacement characters break a run. An ill-formed UTF-8
 * sequence is replaced the way Unicode recommends ("maximal subpart"): one
 * U+FFFD for the longest prefix of a valid sequence, then decoding restarts at
 * the byte that broke it, so a stray byte never swallows the text after it.
 * Results are assumed to be in text format (what the pool asks for).
 */
#include "pool/result.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Byte classes of the string encoder. */
enum {
    JS_PLAIN = 0,  /* copied as is */
    JS_ESCAPE = 1, /* '"', '\\' or a control byte */
    JS_LEAD = 2,   /* 0x80..0xff: start of a multi-byte sequence, or invalid */
};

/* JS_PLAIN, JS_ESCAPE or JS_LEAD for each byte: '"' is 0x22, '\\' 0x5c. */
static const unsigned char json_class[256] = {
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, /* 0x00 */
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, /* 0x10 */
    0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 0x20 */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 0x30 */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 0x40 */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, /* 0x50 */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 0x60 */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 0x70 */
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, /* 0x80 */
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, /* 0x90 */
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, /* 0xa0 */
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, /* 0xb0 */
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, /* 0xc0 */
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, /* 0xd0 */
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, /* 0xe0 */
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, /* 0xf0 */
};

static const char json_replacement[3] = {(char)0xef, (char)0xbf, (char)0xbd}; /* U+FFFD */

/* Length of the well-formed UTF-8 sequence at s[0..avail) (avail >= 1, s[0] >=
 * 0x80), or, when it is ill-formed, minus the length of its maximal subpart
 * (the bytes to replace by one U+FFFD; at least 1). The ranges are those of
 * Unicode's table 3-7: they exclude overlongs, surrogates and > U+10FFFF. */
static int utf8_sequence(const unsigned char *s, size_t avail)
{
    unsigned char b = s[0];
    unsigned char lo = 0x80, hi = 0xbf; /* range of the second byte */
    int need;                           /* bytes after the lead */
    if (b >= 0xc2 && b <= 0xdf) {
        need = 1;
    } else if (b >= 0xe0 && b <= 0xef) {
        need = 2;
        if (b == 0xe0)
            lo = 0xa0; /* overlong */
        else if (b == 0xed)
            hi = 0x9f; /* surrogates */
    } else if (b >= 0xf0 && b <= 0xf4) {
        need = 3;
        if (b == 0xf0)
            lo = 0x90; /* overlong */
        else if (b == 0xf4)
            hi = 0x8f; /* above U+10FFFF */
    } else {
        return -1; /* continuation byte, 0xc0, 0xc1 or 0xf5..0xff */
    }
    if (avail < 2 || s[1] < lo || s[1] > hi)
        return -1;
    for (int i = 2; i <= need; i++) {
        if ((size_t)i >= avail || (s[i] & 0xc0) != 0x80)
            return -i;
    }
    return need + 1;
}

static void json_escape_byte(struct evbuffer *out, unsigned char c)
{
    static const char hex[] = "0123456789abcdef";
    char esc[6] = {'\\', 0, 0, 0, 0, 0};
    size_t n = 2;
    switch (c) {
    case '"':
        esc[1] = '"';
        break;
    case '\\':
        esc[1] = '\\';
        break;
    case '\n':
        esc[1] = 'n';
        break;
    case '\r':
        esc[1] = 'r';
        break;
    case '\t':
        esc[1] = 't';
        break;
    case '\b':
        esc[1] = 'b';
        break;
    case '\f':
        esc[1] = 'f';
        break;
    default:
        esc[1] = 'u';
        esc[2] = '0';
        esc[3] = '0';
        esc[4] = hex[c >> 4];
        esc[5] = hex[c & 0xf];
        n = 6;
        break;
    }
    evbuffer_add(out, esc, n);
}

void pool_json_string(struct evbuffer *out, const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t run = 0; /* start of the pending run of bytes copied as they are */
    size_t i = 0;
    evbuffer_add(out, "\"", 1);
    while (i < len) {
        unsigned char cls = json_class[p[i]];
        if (cls == JS_PLAIN) {
            i++;
            continue;
        }
        if (cls == JS_LEAD) {
            int n = utf8_sequence(p + i, len - i);
            if (n > 0) {
                i += (size_t)n;
                continue;
            }
            if (i > run)
                evbuffer_add(out, s + run, i - run);
            evbuffer_add(out, json_replacement, sizeof json_replacement);
            i += (size_t)-n;
        } else {
            if (i > run)
                evbuffer_add(out, s + run, i - run);
            json_escape_byte(out, p[i]);
            i++;
        }
        run = i;
    }
    if (len > run)
        evbuffer_add(out, s + run, len - run);
    evbuffer_add(out, "\"", 1);
}

bool pool_result_single_json(const PGresult *res)
{
    if (PQnfields(res) != 1)
        return false;
    Oid t = PQftype(res, 0);
    return t == POOL_OID_JSON || t == POOL_OID_JSONB;
}

/* Is s[0..len) a number by JSON's grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
 * The server's text for finite numbers always is; "NaN" and "Infinity" are not. */
static bool json_is_number(const char *s, size_t len)
{
    size_t i = 0;
    if (i < len && s[i] == '-')
        i++;
    if (i >= len)
        return false;
    if (s[i] == '0') {
        i++;
    } else if (s[i] >= '1' && s[i] <= '9') {
        while (i < len && s[i] >= '0' && s[i] <= '9')
            i++;
    } else {
        return false;
    }
    if (i < len && s[i] == '.') {
        size_t start = ++i;
        while (i < len && s[i] >= '0' && s[i] <= '9')
            i++;
        if (i == start)
            return false;
    }
    if (i < len && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < len && (s[i] == '+' || s[i] == '-'))
            i++;
        size_t start = i;
        while (i < len && s[i] >= '0' && s[i] <= '9')
            i++;
        if (i == start)
            return false;
    }
    return i == len;
}

/* One field's value, by its column's type. */
static void json_value(struct evbuffer *out, const PGresult *res, int row, int col, Oid type)
{
    if (PQgetisnull(res, row, col)) {
        evbuffer_add(out, "null", 4);
        return;
    }
    const char *v = PQgetvalue(res, row, col);
    size_t len = (size_t)PQgetlength(res, row, col);
    switch (type) {
    case POOL_OID_INT2:
    case POOL_OID_INT4:
    case POOL_OID_INT8:
    case POOL_OID_OID:
    case POOL_OID_FLOAT4:
    case POOL_OID_FLOAT8:
    case POOL_OID_NUMERIC:
        /* Non-finite floats and numerics ("NaN", "Infinity", "-Infinity")
         * have no JSON number: they, and anything else that is not one,
         * become strings. */
        if (json_is_number(v, len)) {
            evbuffer_add(out, v, len);
            return;
        }
        break;
    case POOL_OID_BOOL:
        if (len == 1 && v[0] == 't') {
            evbuffer_add(out, "true", 4);
            return;
        }
        if (len == 1 && v[0] == 'f') {
            evbuffer_add(out, "false", 5);
            return;
        }
        break;
    case POOL_OID_JSON:
    case POOL_OID_JSONB:
        /* The server only stores valid JSON, and never an empty text. */
        if (len > 0) {
            evbuffer_add(out, v, len);
            return;
        }
        evbuffer_add(out, "null", 4);
        return;
    default:
        break;
    }
    pool_json_string(out, v, len);
}

/* Column keys, encoded once per result rather than once per row: fragment i
 * is "{\"name\":" for the first column and ",\"name\":" for the others. */
typedef struct json_keys {
    char *text;
    size_t *off; /* nfields + 1 offsets into text */
} json_keys;

static int json_keys_build(json_keys *k, const PGresult *res)
{
    int nfields = PQnfields(res);
    struct evbuffer *b = evbuffer_new();
    k->text = NULL;
    k->off = malloc(((size_t)nfields + 1) * sizeof *k->off);
    if (!b || !k->off)
        goto fail;
    for (int c = 0; c < nfields; c++) {
        const char *name = PQfname(res, c);
        k->off[c] = evbuffer_get_length(b);
        evbuffer_add(b, c == 0 ? "{" : ",", 1);
        pool_json_string(b, name, strlen(name));
        evbuffer_add(b, ":", 1);
    }
    size_t total = evbuffer_get_length(b);
    k->off[nfields] = total;
    k->text = malloc(total + 1);
    if (!k->text || evbuffer_remove(b, k->text, total) != (int)total)
        goto fail;
    evbuffer_free(b);
    return 0;
fail:
    if (b)
        evbuffer_free(b);
    free(k->off);
    free(k->text);
    k->off = NULL;
    k->text = NULL;
    return -1;
}

static void json_keys_free(json_keys *k)
{
    free(k->off);
    free(k->text);
    k->off = NULL;
    k->text = NULL;
}

static void json_object(struct evbuffer *out, const PGresult *res, int row, const json_keys *k)
{
    int nfields = PQnfields(res);
    if (nfields == 0) {
        evbuffer_add(out, "{}", 2);
        return;
    }
    for (int c = 0; c < nfields; c++) {
        if (k) {
            evbuffer_add(out, k->text + k->off[c], k->off[c + 1] - k->off[c]);
        } else {
            const char *name = PQfname(res, c);
            evbuffer_add(out, c == 0 ? "{" : ",", 1);
            pool_json_string(out, name, strlen(name));
            evbuffer_add(out, ":", 1);
        }
        json_value(out, res, row, c, PQftype(res, c));
    }
    evbuffer_add(out, "}", 1);
}

void pool_json_row(struct evbuffer *out, const PGresult *res, int row)
{
    if (pool_result_single_json(res)) {
        json_value(out, res, row, 0, PQftype(res, 0));
        return;
    }
    json_object(out, res, row, NULL);
}

void pool_json_rows(struct evbuffer *out, const PGresult *res, int nrows)
{
    bool single = pool_result_single_json(res);
    json_keys keys;
    const json_keys *k = NULL;
    if (nrows > PQntuples(res))
        nrows = PQntuples(res);
    evbuffer_add(out, "[", 1);
    /* Without memory for the keys, each row encodes them itself. */
    if (!single && nrows > 1 && json_keys_build(&keys, res) == 0)
        k = &keys;
    for (int r = 0; r < nrows; r++) {
        if (r > 0)
            evbuffer_add(out, ",", 1);
        if (single)
            json_value(out, res, r, 0, PQftype(res, 0));
        else
            json_object(out, res, r, k);
    }
    evbuffer_add(out, "]", 1);
    if (k)
        json_keys_free(&keys);
}

/* A non-negative decimal integer, digits only, up to INT64_MAX. */
static int page_parse_count(const char *s, int64_t *out)
{
    int64_t v = 0;
    if (*s == '\0')
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        int d = *s - '0';
        if (v > (INT64_MAX - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}

int pool_page_parse(const char *limit, const char *offset, int64_t max_rows, int64_t *out_limit,
                    int64_t *out_offset)
{
    int64_t l = max_rows, o = 0;
    if (limit && page_parse_count(limit, &l) < 0)
        return -1;
    if (offset && page_parse_count(offset, &o) < 0)
        return -1;
    if (l > max_rows)
        l = max_rows;
    *out_limit = l;
    *out_offset = o;
    return 0;
}

char *pool_page_wrap(const char *query, int nparams)
{
    static const char head[] = "SELECT * FROM (";
    size_t qlen = strlen(query);
    while (qlen > 0) {
        char c = query[qlen - 1];
        if (c != ';' && c != ' ' && c != '\t' && c != '\n' && c != '\r' && c != '\f' && c != '\v')
            break;
        qlen--;
    }
    char tail[80];
    int tlen = snprintf(tail, sizeof tail, "\n) AS gw_page LIMIT $%lld OFFSET $%lld", (long long)nparams + 1,
                        (long long)nparams + 2);
    if (tlen < 0 || (size_t)tlen >= sizeof tail)
        return NULL;
    size_t hlen = sizeof head - 1;
    char *sql = malloc(hlen + qlen + (size_t)tlen + 1);
    if (!sql)
        return NULL;
    memcpy(sql, head, hlen);
    memcpy(sql + hlen, query, qlen);
    memcpy(sql + hlen + qlen, tail, (size_t)tlen + 1);
    return sql;
}

size_t pool_page_content_range(char *buf, size_t size, int64_t offset, int64_t rows)
{
    int n;
    if (size == 0)
        return 0;
    if (rows <= 0) {
        n = snprintf(buf, size, "*/*");
    } else {
        /* offset and rows are at most INT64_MAX each: the last index fits in
         * 64 unsigned bits. A negative offset is the caller's bug; read as 0. */
        uint64_t first = offset > 0 ? (uint64_t)offset : 0;
        uint64_t last = first + (uint64_t)(rows - 1);
        n = snprintf(buf, size, "%" PRIu64 "-%" PRIu64 "/*", first, last);
    }
    if (n < 0) {
        buf[0] = '\0';
        return 0;
    }
    return (size_t)n < size ? (size_t)n : size - 1;
}

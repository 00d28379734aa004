/*
 * test_pool_result.c - JSON encoding of query results and the paging helpers
 * (pool/result.c). PGresults are built without a server (PQmakeEmptyPGresult,
 * PQsetResultAttrs, PQsetvalue). Every output is compared byte for byte and
 * also run through a small strict JSON validator of our own (RFC 8259 plus
 * well-formed UTF-8), which the last test checks can fail.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <event2/buffer.h>
#include <libpq-fe.h>

#include "pool/result.h"

#define OID_TEXT 25
#define OID_BYTEA 17
#define OID_VARCHAR 1043
#define OID_TIMESTAMPTZ 1184
#define OID_UUID 2950

/* ---- a strict JSON validator ------------------------------------------------ */

typedef struct jv {
    const unsigned char *p, *end;
    unsigned char *dec; /* when set, the first string's decoded bytes go here */
    size_t dec_len;
    bool decoding;
    int depth;
} jv;

static void jv_ws(jv *v)
{
    while (v->p < v->end && (*v->p == ' ' || *v->p == '\t' || *v->p == '\n' || *v->p == '\r'))
        v->p++;
}

static void jv_emit(jv *v, const unsigned char *b, size_t n)
{
    if (v->decoding) {
        memcpy(v->dec + v->dec_len, b, n);
        v->dec_len += n;
    }
}

/* Code point of the well-formed UTF-8 sequence at s, by decoding first and
 * then checking the value (unlike the encoder, which checks byte ranges):
 * returns its length, 0 when ill-formed. */
static size_t utf8_decode(const unsigned char *s, const unsigned char *end, uint32_t *cp)
{
    size_t n;
    uint32_t c, min;
    if (s[0] < 0x80) {
        *cp = s[0];
        return 1;
    } else if ((s[0] & 0xe0) == 0xc0) {
        n = 2, c = s[0] & 0x1f, min = 0x80;
    } else if ((s[0] & 0xf0) == 0xe0) {
        n = 3, c = s[0] & 0x0f, min = 0x800;
    } else if ((s[0] & 0xf8) == 0xf0) {
        n = 4, c = s[0] & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    if ((size_t)(end - s) < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        c = (c << 6) | (s[i] & 0x3f);
    }
    if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff))
        return 0;
    *cp = c;
    return n;
}

static bool utf8_is_valid(const unsigned char *s, size_t len)
{
    const unsigned char *end = s + len;
    uint32_t cp;
    while (s < end) {
        size_t n = utf8_decode(s, end, &cp);
        if (n == 0)
            return false;
        s += n;
    }
    return true;
}

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static bool jv_hex4(jv *v, uint32_t *out)
{
    uint32_t x = 0;
    if (v->end - v->p < 4)
        return false;
    for (int i = 0; i < 4; i++) {
        int h = hexval(v->p[i]);
        if (h < 0)
            return false;
        x = x << 4 | (uint32_t)h;
    }
    v->p += 4;
    *out = x;
    return true;
}

static void jv_emit_cp(jv *v, uint32_t c)
{
    unsigned char b[4];
    size_t n;
    if (c < 0x80) {
        b[0] = (unsigned char)c, n = 1;
    } else if (c < 0x800) {
        b[0] = (unsigned char)(0xc0 | c >> 6), b[1] = (unsigned char)(0x80 | (c & 0x3f)), n = 2;
    } else if (c < 0x10000) {
        b[0] = (unsigned char)(0xe0 | c >> 12), b[1] = (unsigned char)(0x80 | (c >> 6 & 0x3f));
        b[2] = (unsigned char)(0x80 | (c & 0x3f)), n = 3;
    } else {
        b[0] = (unsigned char)(0xf0 | c >> 18), b[1] = (unsigned char)(0x80 | (c >> 12 & 0x3f));
        b[2] = (unsigned char)(0x80 | (c >> 6 & 0x3f)), b[3] = (unsigned char)(0x80 | (c & 0x3f)), n = 4;
    }
    jv_emit(v, b, n);
}

static bool jv_string(jv *v)
{
    if (v->p >= v->end || *v->p != '"')
        return false;
    v->p++;
    while (v->p < v->end) {
        unsigned char c = *v->p;
        if (c == '"') {
            v->p++;
            v->decoding = false;
            return true;
        }
        if (c < 0x20)
            return false;
        if (c == '\\') {
            uint32_t u, lo;
            if (v->end - v->p < 2)
                return false;
            c = v->p[1];
            v->p += 2;
            switch (c) {
            case '"':
            case '\\':
            case '/':
                jv_emit(v, &c, 1);
                break;
            case 'b':
                jv_emit(v, (const unsigned char *)"\b", 1);
                break;
            case 'f':
                jv_emit(v, (const unsigned char *)"\f", 1);
                break;
            case 'n':
                jv_emit(v, (const unsigned char *)"\n", 1);
                break;
            case 'r':
                jv_emit(v, (const unsigned char *)"\r", 1);
                break;
            case 't':
                jv_emit(v, (const unsigned char *)"\t", 1);
                break;
            case 'u':
                if (!jv_hex4(v, &u))
                    return false;
                if (u >= 0xdc00 && u <= 0xdfff)
                    return false; /* lone low surrogate */
                if (u >= 0xd800 && u <= 0xdbff) {
                    if (v->end - v->p < 2 || v->p[0] != '\\' || v->p[1] != 'u')
                        return false;
                    v->p += 2;
                    if (!jv_hex4(v, &lo) || lo < 0xdc00 || lo > 0xdfff)
                        return false;
                    u = 0x10000 + ((u - 0xd800) << 10) + (lo - 0xdc00);
                }
                jv_emit_cp(v, u);
                break;
            default:
                return false;
            }
            continue;
        }
        uint32_t cp;
        size_t n = utf8_decode(v->p, v->end, &cp);
        if (n == 0)
            return false;
        jv_emit(v, v->p, n);
        v->p += n;
    }
    return false;
}

static bool jv_digits(jv *v)
{
    const unsigned char *start = v->p;
    while (v->p < v->end && *v->p >= '0' && *v->p <= '9')
        v->p++;
    return v->p > start;
}

static bool jv_number(jv *v)
{
    if (v->p < v->end && *v->p == '-')
        v->p++;
    if (v->p < v->end && *v->p == '0')
        v->p++;
    else if (v->p >= v->end || *v->p < '1' || *v->p > '9' || !jv_digits(v))
        return false;
    if (v->p < v->end && *v->p == '.') {
        v->p++;
        if (!jv_digits(v))
            return false;
    }
    if (v->p < v->end && (*v->p == 'e' || *v->p == 'E')) {
        v->p++;
        if (v->p < v->end && (*v->p == '+' || *v->p == '-'))
            v->p++;
        if (!jv_digits(v))
            return false;
    }
    return true;
}

static bool jv_word(jv *v, const char *w)
{
    size_t n = strlen(w);
    if ((size_t)(v->end - v->p) < n || memcmp(v->p, w, n) != 0)
        return false;
    v->p += n;
    return true;
}

static bool jv_value(jv *v)
{
    bool ok;
    jv_ws(v);
    if (v->p >= v->end || ++v->depth > 64)
        return false;
    switch (*v->p) {
    case '{':
        v->p++;
        jv_ws(v);
        ok = true;
        if (v->p < v->end && *v->p == '}') {
            v->p++;
            break;
        }
        for (;;) {
            jv_ws(v);
            if (!jv_string(v))
                return false;
            jv_ws(v);
            if (v->p >= v->end || *v->p != ':')
                return false;
            v->p++;
            if (!jv_value(v))
                return false;
            jv_ws(v);
            if (v->p < v->end && *v->p == ',') {
                v->p++;
                continue;
            }
            if (v->p < v->end && *v->p == '}') {
                v->p++;
                break;
            }
            return false;
        }
        break;
    case '[':
        v->p++;
        jv_ws(v);
        ok = true;
        if (v->p < v->end && *v->p == ']') {
            v->p++;
            break;
        }
        for (;;) {
            if (!jv_value(v))
                return false;
            jv_ws(v);
            if (v->p < v->end && *v->p == ',') {
                v->p++;
                continue;
            }
            if (v->p < v->end && *v->p == ']') {
                v->p++;
                break;
            }
            return false;
        }
        break;
    case '"':
        ok = jv_string(v);
        break;
    case 't':
        ok = jv_word(v, "true");
        break;
    case 'f':
        ok = jv_word(v, "false");
        break;
    case 'n':
        ok = jv_word(v, "null");
        break;
    default:
        ok = jv_number(v);
        break;
    }
    v->depth--;
    return ok;
}

/* Is s[0..len) one JSON text? When dec is given (len bytes at least), the
 * first string met is decoded there and its length stored in *dec_len. */
static bool json_valid(const char *s, size_t len, unsigned char *dec, size_t *dec_len)
{
    jv v = {(const unsigned char *)s, (const unsigned char *)s + len, dec, 0, dec != NULL, 0};
    if (!jv_value(&v))
        return false;
    jv_ws(&v);
    if (dec_len)
        *dec_len = v.dec_len;
    return v.p == v.end;
}

/* ---- helpers ---------------------------------------------------------------- */

/* A result with ncols columns and nrows rows of values[row * ncols + col]
 * (NULL: SQL NULL). Caller PQclear()s. */
static PGresult *make_result(int ncols, const char *const *names, const Oid *types, int nrows,
                             const char *const *values)
{
    PGresult *res = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);
    PGresAttDesc attrs[16];
    assert_non_null(res);
    assert_true(ncols <= 16);
    for (int c = 0; c < ncols; c++) {
        attrs[c].name = (char *)names[c];
        attrs[c].tableid = 0;
        attrs[c].columnid = 0;
        attrs[c].format = 0;
        attrs[c].typid = types[c];
        attrs[c].typlen = -1;
        attrs[c].atttypmod = -1;
    }
    assert_int_equal(PQsetResultAttrs(res, ncols, attrs), 1);
    for (int r = 0; r < nrows; r++) {
        for (int c = 0; c < ncols; c++) {
            const char *val = values[r * ncols + c];
            assert_int_equal(PQsetvalue(res, r, c, (char *)val, val ? (int)strlen(val) : -1), 1);
        }
    }
    assert_int_equal(PQntuples(res), nrows);
    return res;
}

/* b holds exactly `expected` (len bytes), which is valid JSON; b is emptied. */
static void want_bytes(struct evbuffer *b, const char *expected, size_t len)
{
    size_t n = evbuffer_get_length(b);
    char *got = malloc(n + 1);
    assert_non_null(got);
    assert_int_equal(evbuffer_remove(b, got, n), (int)n);
    got[n] = '\0';
    assert_string_equal(got, expected); /* readable diff; JSON never holds a NUL */
    assert_int_equal(n, len);
    assert_memory_equal(got, expected, len);
    assert_true(json_valid(got, n, NULL, NULL));
    free(got);
}

static void want_json(struct evbuffer *b, const char *expected)
{
    want_bytes(b, expected, strlen(expected));
}

static void want_string(const char *in, size_t len, const char *expected)
{
    struct evbuffer *b = evbuffer_new();
    assert_non_null(b);
    pool_json_string(b, in, len);
    want_json(b, expected);
    evbuffer_free(b);
}

#define WANT_STRING(in, expected) want_string((in), sizeof(in) - 1, (expected))

/* pool_json_row of every row and pool_json_rows of all rows. */
static void want_rows(const PGresult *res, const char *const *rows, const char *all)
{
    struct evbuffer *b = evbuffer_new();
    assert_non_null(b);
    for (int r = 0; r < PQntuples(res); r++) {
        pool_json_row(b, res, r);
        want_json(b, rows[r]);
    }
    pool_json_rows(b, res, PQntuples(res));
    want_json(b, all);
    evbuffer_free(b);
}

/* One column of type `type` holding `value`, as pool_json_row writes it. */
static void want_value(Oid type, const char *value, const char *expected)
{
    const char *names[] = {"v", "w"};
    const Oid types[] = {type, OID_TEXT};
    const char *values[] = {value, "x"};
    char want[256], all[sizeof want + 2];
    /* Two columns, so even json values make an object. */
    PGresult *res = make_result(2, names, types, 1, values);
    snprintf(want, sizeof want, "{\"v\":%s,\"w\":\"x\"}", expected);
    snprintf(all, sizeof all, "[%s]", want);
    want_rows(res, (const char *const[]){want}, all);
    PQclear(res);
}

/* ---- strings ---------------------------------------------------------------- */

static void test_string_plain(void **state)
{
    (void)state;
    want_string("", 0, "\"\"");
    WANT_STRING("abc", "\"abc\"");
    WANT_STRING("a/b <c> 'd' \x7f", "\"a/b <c> 'd' \x7f\"");
    want_string("abcdef", 3, "\"abc\"");
}

static void test_string_escapes(void **state)
{
    (void)state;
    WANT_STRING("\"", "\"\\\"\"");
    WANT_STRING("\\", "\"\\\\\"");
    WANT_STRING("say \"hi\" \\o/", "\"say \\\"hi\\\" \\\\o/\"");
    WANT_STRING("a\nb\rc\td\be\ff", "\"a\\nb\\rc\\td\\be\\ff\"");
    WANT_STRING("\x01\x1f\x0b\x7f", "\"\\u0001\\u001f\\u000b\x7f\"");
    WANT_STRING("nul\0byte", "\"nul\\u0000byte\"");
    WANT_STRING("\"\"\\\\", "\"\\\"\\\"\\\\\\\\\"");

    /* Every control byte, alone and between plain bytes. */
    for (int c = 0; c < 0x20; c++) {
        char in[3] = {'a', (char)c, 'b'};
        char esc[8], want[16];
        switch (c) {
        case '\b':
            strcpy(esc, "\\b");
            break;
        case '\t':
            strcpy(esc, "\\t");
            break;
        case '\n':
            strcpy(esc, "\\n");
            break;
        case '\f':
            strcpy(esc, "\\f");
            break;
        case '\r':
            strcpy(esc, "\\r");
            break;
        default:
            snprintf(esc, sizeof esc, "\\u%04x", c);
            break;
        }
        snprintf(want, sizeof want, "\"%s\"", esc);
        want_string(in + 1, 1, want);
        snprintf(want, sizeof want, "\"a%sb\"", esc);
        want_string(in, 3, want);
    }
    /* Nothing at or above 0x20 but '"' and '\\' is escaped. */
    for (int c = 0x20; c < 0x80; c++) {
        char in[1] = {(char)c};
        char want[8];
        if (c == '"' || c == '\\')
            snprintf(want, sizeof want, "\"\\%c\"", c);
        else
            snprintf(want, sizeof want, "\"%c\"", c);
        want_string(in, 1, want);
    }
}

static void test_string_utf8_valid(void **state)
{
    (void)state;
    WANT_STRING("caf\xc3\xa9", "\"caf\xc3\xa9\"");                           /* U+00E9 */
    WANT_STRING("\xe2\x82\xac 5", "\"\xe2\x82\xac 5\"");                     /* U+20AC */
    WANT_STRING("\xf0\x9f\x98\x80!", "\"\xf0\x9f\x98\x80!\"");               /* U+1F600 */
    WANT_STRING("\xc2\x80\xdf\xbf", "\"\xc2\x80\xdf\xbf\"");                 /* U+0080, U+07FF */
    WANT_STRING("\xe0\xa0\x80\xed\x9f\xbf", "\"\xe0\xa0\x80\xed\x9f\xbf\""); /* U+0800, U+D7FF */
    WANT_STRING("\xee\x80\x80\xef\xbf\xbf", "\"\xee\x80\x80\xef\xbf\xbf\""); /* U+E000, U+FFFF */
    WANT_STRING("\xf0\x90\x80\x80", "\"\xf0\x90\x80\x80\"");                 /* U+10000 */
    WANT_STRING("\xf4\x8f\xbf\xbf", "\"\xf4\x8f\xbf\xbf\"");                 /* U+10FFFF */
    WANT_STRING("\xf3\xbf\xbf\xbf", "\"\xf3\xbf\xbf\xbf\"");                 /* U+FFFFF */
    WANT_STRING("\xe1\x80\x80\xec\xbf\xbf", "\"\xe1\x80\x80\xec\xbf\xbf\"");
    WANT_STRING("\xef\xbf\xbd", "\"\xef\xbf\xbd\""); /* U+FFFD itself */
    WANT_STRING("\xc3\xa9\n\xc3\xa9\"", "\"\xc3\xa9\\n\xc3\xa9\\\"\"");
}

#define R "\xef\xbf\xbd" /* U+FFFD */

static void test_string_utf8_invalid(void **state)
{
    (void)state;
    /* Stray continuation bytes and bytes that never start a sequence. */
    WANT_STRING("\x80", "\"" R "\"");
    WANT_STRING("\xbf", "\"" R "\"");
    WANT_STRING("a\x80\x80z", "\"a" R R "z\"");
    WANT_STRING("\xc0", "\"" R "\"");
    WANT_STRING("\xc1", "\"" R "\"");
    WANT_STRING("\xf5", "\"" R "\"");
    WANT_STRING("\xf8\xfc\xfe\xff", "\"" R R R R "\"");
    for (int c = 0xf5; c <= 0xff; c++) {
        char in[2] = {(char)c, 'x'};
        want_string(in, 2, "\"" R "x\"");
    }
    /* Overlongs: the lead is refused, and the continuations after it one by one. */
    WANT_STRING("\xc0\xaf", "\"" R R "\"");             /* '/' in 2 bytes */
    WANT_STRING("\xc1\xbf", "\"" R R "\"");             /* U+007F in 2 bytes */
    WANT_STRING("\xe0\x80\xaf", "\"" R R R "\"");       /* '/' in 3 bytes */
    WANT_STRING("\xe0\x9f\xbf", "\"" R R R "\"");       /* U+07FF in 3 bytes */
    WANT_STRING("\xf0\x80\x80\xaf", "\"" R R R R "\""); /* '/' in 4 bytes */
    WANT_STRING("\xf0\x8f\xbf\xbf", "\"" R R R R "\""); /* U+FFFF in 4 bytes */
    /* Surrogates U+D800..U+DFFF. */
    WANT_STRING("\xed\xa0\x80", "\"" R R R "\"");
    WANT_STRING("\xed\xbf\xbf", "\"" R R R "\"");
    WANT_STRING("\xed\xa0\xbd\xed\xb8\x80", "\"" R R R R R R "\""); /* CESU-8 pair */
    /* Above U+10FFFF. */
    WANT_STRING("\xf4\x90\x80\x80", "\"" R R R R "\"");
    WANT_STRING("\xf7\xbf\xbf\xbf", "\"" R R R R "\"");
    /* Truncated sequences: the valid prefix is one U+FFFD. */
    WANT_STRING("a\xc3", "\"a" R "\"");
    WANT_STRING("\xe2\x82", "\"" R "\"");
    WANT_STRING("\xe2\x82z", "\"" R "z\"");
    WANT_STRING("\xf0\x9f\x98", "\"" R "\"");
    WANT_STRING("\xf0\x9f\x98z", "\"" R "z\"");
    WANT_STRING("\xf0\x9f", "\"" R "\"");
    WANT_STRING("\xf0", "\"" R "\"");
    WANT_STRING("\xc3\xc3\xa9", "\"" R "\xc3\xa9\""); /* a new lead ends it */
    WANT_STRING("\xe2\x82\xe2\x82\xac", "\"" R "\xe2\x82\xac\"");
    WANT_STRING("\xe2\"", "\"" R "\\\"\""); /* an escape ends it */
    WANT_STRING("\xf0\x9f\x98\n", "\"" R "\\n\"");
    WANT_STRING("\xe2\x82\x00", "\"" R "\\u0000\"");
    /* A bad byte in a long run splits it; the text around survives. */
    WANT_STRING("hello\xffworld\xc3\xa9!", "\"hello" R "world\xc3\xa9!\"");
    /* The length bounds the scan: a lead at the end never reads past it. */
    want_string("\xe2\x82\xac", 2, "\"" R "\"");
    want_string("\xf0\x9f\x98\x80", 3, "\"" R "\"");
    want_string("\xc3\xa9", 1, "\"" R "\"");
}

/* Deterministic generator for the property test. */
static uint32_t rng_next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return (uint32_t)(*s >> 16);
}

/* Whatever the bytes, the output is one valid JSON string; when the input is
 * UTF-8 it decodes back to the input, otherwise it holds U+FFFD. */
static void check_roundtrip(struct evbuffer *b, const unsigned char *in, size_t len)
{
    unsigned char dec[64];
    size_t dec_len = 0, n;
    char *got;
    assert_true(len <= 16);
    pool_json_string(b, (const char *)in, len);
    n = evbuffer_get_length(b);
    got = (char *)evbuffer_pullup(b, -1);
    assert_non_null(got);
    assert_true(json_valid(got, n, dec, &dec_len));
    if (utf8_is_valid(in, len)) {
        assert_int_equal(dec_len, len);
        assert_memory_equal(dec, in, len);
    } else {
        assert_non_null(memmem(dec, dec_len, R, 3));
        assert_true(dec_len <= 3 * len);
    }
    evbuffer_drain(b, n);
}

static void test_string_property(void **state)
{
    static const unsigned char alphabet[] = {'a',  '"',  '\\', '\n', 0x00, 0x1f, 0x7f, 0x80, 0x8f, 0x90,
                                             0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc2, 0xdf, 0xe0, 0xe1, 0xec,
                                             0xed, 0xee, 0xef, 0xf0, 0xf1, 0xf3, 0xf4, 0xf5, 0xff};
    struct evbuffer *b = evbuffer_new();
    unsigned char in[16];
    uint64_t seed = 0x9e3779b97f4a7c15ULL;
    (void)state;
    assert_non_null(b);
    /* Every one- and two-byte input. */
    for (int x = 0; x < 256; x++) {
        in[0] = (unsigned char)x;
        check_roundtrip(b, in, 1);
        for (int y = 0; y < 256; y++) {
            in[1] = (unsigned char)y;
            check_roundtrip(b, in, 2);
        }
    }
    /* Every three-byte input over the bytes at the edges of UTF-8's ranges. */
    for (size_t x = 0; x < sizeof alphabet; x++)
        for (size_t y = 0; y < sizeof alphabet; y++)
            for (size_t z = 0; z < sizeof alphabet; z++) {
                in[0] = alphabet[x], in[1] = alphabet[y], in[2] = alphabet[z];
                check_roundtrip(b, in, 3);
            }
    /* Longer inputs, at random. */
    for (int i = 0; i < 200000; i++) {
        size_t len = rng_next(&seed) % 17;
        for (size_t j = 0; j < len; j++) {
            uint32_t r = rng_next(&seed);
            in[j] = (r & 0x100) ? alphabet[r % sizeof alphabet] : (unsigned char)r;
        }
        check_roundtrip(b, in, len);
    }
    evbuffer_free(b);
}

/* ---- values by type --------------------------------------------------------- */

static void test_types_integers(void **state)
{
    (void)state;
    want_value(POOL_OID_INT2, "-32768", "-32768");
    want_value(POOL_OID_INT2, "0", "0");
    want_value(POOL_OID_INT4, "42", "42");
    want_value(POOL_OID_INT4, "-2147483648", "-2147483648");
    want_value(POOL_OID_INT8, "9223372036854775807", "9223372036854775807");
    want_value(POOL_OID_INT8, "-9223372036854775808", "-9223372036854775808");
    want_value(POOL_OID_OID, "4294967295", "4294967295");
}

static void test_types_floats(void **state)
{
    (void)state;
    want_value(POOL_OID_FLOAT4, "1.5", "1.5");
    want_value(POOL_OID_FLOAT4, "-0", "-0");
    want_value(POOL_OID_FLOAT8, "3.141592653589793", "3.141592653589793");
    want_value(POOL_OID_FLOAT8, "-1.25e-07", "-1.25e-07");
    want_value(POOL_OID_FLOAT8, "1e+308", "1e+308");
    want_value(POOL_OID_NUMERIC, "123.4500", "123.4500");
    want_value(POOL_OID_NUMERIC, "-0.000001", "-0.000001");
    want_value(POOL_OID_NUMERIC, "123456789012345678901234567890.5", "123456789012345678901234567890.5");
    /* Not finite: no JSON number, so a string. */
    want_value(POOL_OID_FLOAT4, "NaN", "\"NaN\"");
    want_value(POOL_OID_FLOAT4, "Infinity", "\"Infinity\"");
    want_value(POOL_OID_FLOAT4, "-Infinity", "\"-Infinity\"");
    want_value(POOL_OID_FLOAT8, "NaN", "\"NaN\"");
    want_value(POOL_OID_FLOAT8, "Infinity", "\"Infinity\"");
    want_value(POOL_OID_FLOAT8, "-Infinity", "\"-Infinity\"");
    want_value(POOL_OID_NUMERIC, "NaN", "\"NaN\"");
    want_value(POOL_OID_NUMERIC, "Infinity", "\"Infinity\"");
    want_value(POOL_OID_NUMERIC, "-Infinity", "\"-Infinity\"");
    /* Text that is no JSON number never goes out bare. */
    want_value(POOL_OID_NUMERIC, "", "\"\"");
    want_value(POOL_OID_NUMERIC, ".5", "\".5\"");
    want_value(POOL_OID_INT4, "+1", "\"+1\"");
    want_value(POOL_OID_INT4, "01", "\"01\"");
    want_value(POOL_OID_FLOAT8, "1.", "\"1.\"");
    want_value(POOL_OID_FLOAT8, "1e", "\"1e\"");
}

static void test_types_bool_text_json(void **state)
{
    (void)state;
    want_value(POOL_OID_BOOL, "t", "true");
    want_value(POOL_OID_BOOL, "f", "false");
    want_value(POOL_OID_BOOL, "x", "\"x\"");
    want_value(POOL_OID_BOOL, "tt", "\"tt\"");
    want_value(POOL_OID_BOOL, "", "\"\"");
    want_value(POOL_OID_JSON, "{\"a\": [1, 2]}", "{\"a\": [1, 2]}");
    want_value(POOL_OID_JSONB, "[1, \"x\", null]", "[1, \"x\", null]");
    want_value(POOL_OID_JSONB, "\"s\"", "\"s\"");
    want_value(POOL_OID_JSON, "12", "12");
    want_value(POOL_OID_JSON, "", "null"); /* never sent by a server; still valid JSON */
    want_value(OID_TEXT, "plain", "\"plain\"");
    want_value(OID_TEXT, "", "\"\"");
    want_value(OID_TEXT, "12", "\"12\"");
    want_value(OID_TEXT, "t", "\"t\"");
    want_value(OID_TEXT, "{\"a\":1}", "\"{\\\"a\\\":1}\"");
    want_value(OID_VARCHAR, "tab\there", "\"tab\\there\"");
    want_value(OID_BYTEA, "\\x00ff", "\"\\\\x00ff\"");
    want_value(OID_TIMESTAMPTZ, "2024-01-02 03:04:05.678+00", "\"2024-01-02 03:04:05.678+00\"");
    want_value(OID_UUID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "\"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11\"");
    want_value(OID_TEXT, "bad\xff", "\"bad" R "\"");
}

static void test_types_null(void **state)
{
    static const Oid types[] = {POOL_OID_BOOL, POOL_OID_INT2,   POOL_OID_INT4,   POOL_OID_INT8,
                                POOL_OID_OID,  POOL_OID_FLOAT4, POOL_OID_FLOAT8, POOL_OID_NUMERIC,
                                POOL_OID_JSON, POOL_OID_JSONB,  OID_TEXT,        OID_BYTEA,
                                OID_VARCHAR,   OID_UUID,        OID_TIMESTAMPTZ};
    (void)state;
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
        want_value(types[i], NULL, "null");
}

/* ---- rows ------------------------------------------------------------------- */

static void test_rows_objects(void **state)
{
    const char *names[] = {"id", "name", "doc", "ok", "score"};
    const Oid types[] = {POOL_OID_INT8, OID_TEXT, POOL_OID_JSONB, POOL_OID_BOOL, POOL_OID_FLOAT8};
    const char *values[] = {
        "1",  "Ann",       "{\"tags\": [\"a\"]}",
        "t",  "2.5", /* */
        "2",  NULL,        NULL,
        "f",  "NaN", /* */
        "3",  "B\"o\\b\n", "[]",
        NULL, "-1e-05", /* */
    };
    PGresult *res = make_result(5, names, types, 3, values);
    (void)state;
    want_rows(res,
              (const char *const[]){
                  "{\"id\":1,\"name\":\"Ann\",\"doc\":{\"tags\": [\"a\"]},\"ok\":true,\"score\":2.5}",
                  "{\"id\":2,\"name\":null,\"doc\":null,\"ok\":false,\"score\":\"NaN\"}",
                  "{\"id\":3,\"name\":\"B\\\"o\\\\b\\n\",\"doc\":[],\"ok\":null,\"score\":-1e-05}",
              },
              "[{\"id\":1,\"name\":\"Ann\",\"doc\":{\"tags\": [\"a\"]},\"ok\":true,\"score\":2.5},"
              "{\"id\":2,\"name\":null,\"doc\":null,\"ok\":false,\"score\":\"NaN\"},"
              "{\"id\":3,\"name\":\"B\\\"o\\\\b\\n\",\"doc\":[],\"ok\":null,\"score\":-1e-05}]");
    PQclear(res);
}

static void test_rows_column_names(void **state)
{
    /* Names are strings like any other: escaped, and made UTF-8. */
    const char *names[] = {"a\"b", "c\\d", "e\tf", "\xc3\xa9t\xc3\xa9", "bad\xff", "dup", "dup"};
    const Oid types[] = {POOL_OID_INT4, POOL_OID_INT4, POOL_OID_INT4, POOL_OID_INT4,
                         POOL_OID_INT4, POOL_OID_INT4, POOL_OID_INT4};
    const char *values[] = {"1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14"};
    PGresult *res = make_result(7, names, types, 2, values);
    (void)state;
    want_rows(res,
              (const char *const[]){
                  "{\"a\\\"b\":1,\"c\\\\d\":2,\"e\\tf\":3,\"\xc3\xa9t\xc3\xa9\":4,\"bad" R
                  "\":5,\"dup\":6,\"dup\":7}",
                  "{\"a\\\"b\":8,\"c\\\\d\":9,\"e\\tf\":10,\"\xc3\xa9t\xc3\xa9\":11,\"bad" R
                  "\":12,\"dup\":13,\"dup\":14}",
              },
              "[{\"a\\\"b\":1,\"c\\\\d\":2,\"e\\tf\":3,\"\xc3\xa9t\xc3\xa9\":4,\"bad" R
              "\":5,\"dup\":6,\"dup\":7},"
              "{\"a\\\"b\":8,\"c\\\\d\":9,\"e\\tf\":10,\"\xc3\xa9t\xc3\xa9\":11,\"bad" R
              "\":12,\"dup\":13,\"dup\":14}]");
    PQclear(res);
}

static void test_rows_single_json(void **state)
{
    const char *json_name[] = {"row_to_json"};
    const Oid json_type[] = {POOL_OID_JSON};
    const Oid jsonb_type[] = {POOL_OID_JSONB};
    const Oid text_type[] = {OID_TEXT};
    const char *values[] = {"{\"a\":1,\"b\":\"x\"}", "[2, 3]", NULL, "\"s\""};
    PGresult *res = make_result(1, json_name, json_type, 4, values);
    (void)state;
    assert_true(pool_result_single_json(res));
    want_rows(res, (const char *const[]){"{\"a\":1,\"b\":\"x\"}", "[2, 3]", "null", "\"s\""},
              "[{\"a\":1,\"b\":\"x\"},[2, 3],null,\"s\"]");
    PQclear(res);

    res = make_result(1, json_name, jsonb_type, 2, values);
    assert_true(pool_result_single_json(res));
    want_rows(res, (const char *const[]){"{\"a\":1,\"b\":\"x\"}", "[2, 3]"},
              "[{\"a\":1,\"b\":\"x\"},[2, 3]]");
    PQclear(res);

    /* One text column holding JSON text is not passed through. */
    res = make_result(1, json_name, text_type, 1, values);
    assert_false(pool_result_single_json(res));
    want_rows(res, (const char *const[]){"{\"row_to_json\":\"{\\\"a\\\":1,\\\"b\\\":\\\"x\\\"}\"}"},
              "[{\"row_to_json\":\"{\\\"a\\\":1,\\\"b\\\":\\\"x\\\"}\"}]");
    PQclear(res);

    /* Nor are two json columns. */
    {
        const char *names2[] = {"a", "b"};
        const Oid types2[] = {POOL_OID_JSON, POOL_OID_JSONB};
        const char *values2[] = {"{}", "[]"};
        res = make_result(2, names2, types2, 1, values2);
        assert_false(pool_result_single_json(res));
        want_rows(res, (const char *const[]){"{\"a\":{},\"b\":[]}"}, "[{\"a\":{},\"b\":[]}]");
        PQclear(res);
    }
}

static void test_rows_counts(void **state)
{
    const char *names[] = {"n", "s"};
    const Oid types[] = {POOL_OID_INT4, OID_TEXT};
    const char *values[] = {"1", "a", "2", "b", "3", "c"};
    const char *json_name[] = {"j"};
    const Oid json_type[] = {POOL_OID_JSONB};
    PGresult *res = make_result(2, names, types, 3, values);
    struct evbuffer *b = evbuffer_new();
    (void)state;
    assert_non_null(b);
    /* The gateway fetches limit + 1 rows and answers limit of them. */
    pool_json_rows(b, res, 2);
    want_json(b, "[{\"n\":1,\"s\":\"a\"},{\"n\":2,\"s\":\"b\"}]");
    pool_json_rows(b, res, 1);
    want_json(b, "[{\"n\":1,\"s\":\"a\"}]");
    pool_json_rows(b, res, 0);
    want_json(b, "[]");
    pool_json_rows(b, res, 3);
    want_json(b, "[{\"n\":1,\"s\":\"a\"},{\"n\":2,\"s\":\"b\"},{\"n\":3,\"s\":\"c\"}]");
    /* More than there are, or fewer than none: bounded by the result. */
    pool_json_rows(b, res, 10);
    want_json(b, "[{\"n\":1,\"s\":\"a\"},{\"n\":2,\"s\":\"b\"},{\"n\":3,\"s\":\"c\"}]");
    pool_json_rows(b, res, -1);
    want_json(b, "[]");
    /* Appends: what the buffer held stays in front. */
    evbuffer_add(b, "[", 1);
    pool_json_row(b, res, 2);
    evbuffer_add(b, ",", 1);
    pool_json_rows(b, res, 1);
    evbuffer_add(b, "]", 1);
    want_json(b, "[{\"n\":3,\"s\":\"c\"},[{\"n\":1,\"s\":\"a\"}]]");
    PQclear(res);

    /* No rows at all. */
    res = make_result(2, names, types, 0, NULL);
    pool_json_rows(b, res, 0);
    want_json(b, "[]");
    pool_json_rows(b, res, 25);
    want_json(b, "[]");
    PQclear(res);
    res = make_result(1, json_name, json_type, 0, NULL);
    pool_json_rows(b, res, 25);
    want_json(b, "[]");
    PQclear(res);
    evbuffer_free(b);
}

/* ---- paging ----------------------------------------------------------------- */

static void want_page(const char *limit, const char *offset, int64_t max_rows, int64_t want_limit,
                      int64_t want_offset)
{
    int64_t l = -7, o = -7;
    assert_int_equal(pool_page_parse(limit, offset, max_rows, &l, &o), 0);
    assert_int_equal(l, want_limit);
    assert_int_equal(o, want_offset);
}

static void want_page_error(const char *limit, const char *offset)
{
    int64_t l = -7, o = -7;
    assert_int_equal(pool_page_parse(limit, offset, 100, &l, &o), -1);
}

static void test_page_parse(void **state)
{
    (void)state;
    want_page(NULL, NULL, 100, 100, 0); /* absent: max_rows, 0 */
    want_page("0", NULL, 100, 0, 0);    /* limit 0 is a limit */
    want_page("25", "50", 100, 25, 50);
    want_page("100", "0", 100, 100, 0);  /* at the cap */
    want_page("101", NULL, 100, 100, 0); /* over it */
    want_page("9223372036854775807", "9223372036854775807", 100, 100, INT64_MAX);
    want_page("007", "010", 100, 7, 10); /* leading zeros are digits */
    want_page(NULL, "5", 1000, 1000, 5);
    want_page("5", NULL, 1000, 5, 0);
    /* Not a non-negative decimal integer, in either parameter. */
    static const char *const bad[] = {"-1",
                                      "+1",
                                      " 1",
                                      "1 ",
                                      "1a",
                                      "",
                                      "a",
                                      "0x10",
                                      "1.5",
                                      "1e3",
                                      "99999999999999999999",
                                      "9223372036854775808",
                                      "-0"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        want_page_error(bad[i], NULL);
        want_page_error(NULL, bad[i]);
        want_page_error("10", bad[i]);
        want_page_error(bad[i], "10");
    }
}

static void want_wrap(const char *query, int nparams, const char *want)
{
    char *sql = pool_page_wrap(query, nparams);
    assert_non_null(sql);
    assert_string_equal(sql, want);
    free(sql);
}

static void test_page_wrap(void **state)
{
    (void)state;
    want_wrap("SELECT id FROM t", 0, "SELECT * FROM (SELECT id FROM t\n) AS gw_page LIMIT $1 OFFSET $2");
    want_wrap("SELECT id FROM t WHERE a = $1 AND b = $2", 2,
              "SELECT * FROM (SELECT id FROM t WHERE a = $1 AND b = $2\n) AS gw_page LIMIT $3 OFFSET $4");
    want_wrap("SELECT 1; \n", 0, "SELECT * FROM (SELECT 1\n) AS gw_page LIMIT $1 OFFSET $2");
    want_wrap("SELECT 1 ;; \t\r\n ;\n", 1, "SELECT * FROM (SELECT 1\n) AS gw_page LIMIT $2 OFFSET $3");
    want_wrap("SELECT ';'", 0, "SELECT * FROM (SELECT ';'\n) AS gw_page LIMIT $1 OFFSET $2");
    want_wrap("\n  SELECT 1\n  FROM t\n", 0,
              "SELECT * FROM (\n  SELECT 1\n  FROM t\n) AS gw_page LIMIT $1 OFFSET $2");
    want_wrap("SELECT $1", 99, "SELECT * FROM (SELECT $1\n) AS gw_page LIMIT $100 OFFSET $101");
    /* a trailing line comment stays inside the subselect */
    want_wrap("SELECT 1 -- note", 0, "SELECT * FROM (SELECT 1 -- note\n) AS gw_page LIMIT $1 OFFSET $2");
}

static void want_range(int64_t offset, int64_t rows, const char *want)
{
    char buf[48];
    memset(buf, 'Z', sizeof buf);
    assert_int_equal(pool_page_content_range(buf, sizeof buf, offset, rows), strlen(want));
    assert_string_equal(buf, want);
}

static void test_page_content_range(void **state)
{
    char small[4];
    (void)state;
    want_range(0, 25, "0-24/*");
    want_range(0, 1, "0-0/*");
    want_range(10, 1, "10-10/*");
    want_range(100, 50, "100-149/*");
    want_range(0, 0, "*/*");
    want_range(500, 0, "*/*");
    want_range(INT64_MAX, 1, "9223372036854775807-9223372036854775807/*");
    want_range(INT64_MAX, INT64_MAX, "9223372036854775807-18446744073709551613/*");
    /* Truncated to the buffer, like snprintf, but the length is what was written. */
    memset(small, 'Z', sizeof small);
    assert_int_equal(pool_page_content_range(small, sizeof small, 0, 25), 3);
    assert_string_equal(small, "0-2");
    assert_int_equal(pool_page_content_range(small, 1, 0, 25), 0);
    assert_string_equal(small, "");
    small[0] = 'Z';
    assert_int_equal(pool_page_content_range(small, 0, 0, 25), 0);
    assert_int_equal(small[0], 'Z');
}

/* ---- the validator itself --------------------------------------------------- */

static void test_validator(void **state)
{
    static const char *const good[] = {
        "null",
        "true",
        "false",
        "0",
        "-0",
        "1.5e+3",
        "-12.25E-2",
        "\"\"",
        "\"\\u00e9\\ud83d\\ude00\\/\"",
        "[]",
        "{}",
        " [1, {\"a\": [null, \"x\"]}] ",
        "\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"",
    };
    static const char *const bad[] = {
        "",
        "nul",
        "True",
        "01",
        "1.",
        ".5",
        "+1",
        "1e",
        "NaN",
        "Infinity",
        "-Infinity",
        "[1,]",
        "{\"a\":1,}",
        "{a:1}",
        "[1 2]",
        "\"a",
        "\"\\x\"",
        "\"\\ud800\"",
        "\"\\udc00\"",
        "\"\\u12\"",
        "\"\t\"",
        "\"\x1f\"",
        "\"\x80\"",
        "\"\xc0\xaf\"",
        "\"\xed\xa0\x80\"",
        "\"\xf4\x90\x80\x80\"",
        "\"\xe2\x82\"",
        "{} {}",
        "[1]]",
        "{\"a\"}",
        "'a'",
    };
    (void)state;
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
        assert_true(json_valid(good[i], strlen(good[i]), NULL, NULL));
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (json_valid(bad[i], strlen(bad[i]), NULL, NULL))
            fail_msg("validator accepted %s", bad[i]);
    }
    assert_false(json_valid("\"a\0b\"", 5, NULL, NULL));
    {
        unsigned char dec[16];
        size_t n = 0;
        const char *in = "\"a\\n\\u00e9\\ud83d\\ude00\"";
        assert_true(json_valid(in, strlen(in), dec, &n));
        assert_int_equal(n, 8);
        assert_memory_equal(dec, "a\n\xc3\xa9\xf0\x9f\x98\x80", 8);
    }
    assert_true(utf8_is_valid((const unsigned char *)"\xf4\x8f\xbf\xbf", 4));
    assert_false(utf8_is_valid((const unsigned char *)"\xf4\x90\x80\x80", 4));
    assert_false(utf8_is_valid((const unsigned char *)"\xe0\x9f\xbf", 3));
    assert_false(utf8_is_valid((const unsigned char *)"\xed\xb0\x80", 3));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_string_plain),      cmocka_unit_test(test_string_escapes),
        cmocka_unit_test(test_string_utf8_valid), cmocka_unit_test(test_string_utf8_invalid),
        cmocka_unit_test(test_string_property),   cmocka_unit_test(test_types_integers),
        cmocka_unit_test(test_types_floats),      cmocka_unit_test(test_types_bool_text_json),
        cmocka_unit_test(test_types_null),        cmocka_unit_test(test_rows_objects),
        cmocka_unit_test(test_rows_column_names), cmocka_unit_test(test_rows_single_json),
        cmocka_unit_test(test_rows_counts),       cmocka_unit_test(test_page_parse),
        cmocka_unit_test(test_page_wrap),         cmocka_unit_test(test_page_content_range),
        cmocka_unit_test(test_validator),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

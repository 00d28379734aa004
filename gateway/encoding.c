/*
 * encoding.c - Accept-Encoding parsing and content-coding negotiation; called
 * on a worker thread for each response the gateway may compress, and from
 * anywhere else (no state, no allocation).
 *
 * The one idea: the value is cut into elements at commas outside
 * quoted-strings first, and only then is each element judged against the
 * grammar. A malformed element therefore costs only itself, and a comma or
 * semicolon inside a quoted parameter value can never start a new element.
 * Every scan is bounded by the element's end, which is never past the NUL.
 */
#include "gateway/encoding.h"

#include <stdint.h>
#include <string.h>

/* What an element's coding token names. AE_OTHER is any coding the gateway
 * does not produce (deflate, zstd, ...): it still occupies its element. */
enum ae_coding { AE_OTHER, AE_IDENTITY, AE_GZIP, AE_BR, AE_STAR, AE_CODING_COUNT };

/* One well-formed element: its coding token (borrowed from the header) and
 * the q it carries, GW_ENCODING_Q_MAX when it has none. */
typedef struct ae_element {
    const char *coding;
    size_t coding_len; /* 0 for an empty element ("gzip,,br") */
    int q;
} ae_element;

static bool is_ows(char c)
{
    return c == ' ' || c == '\t';
}

/* RFC 9110 §5.6.2 tchar. */
static bool is_tchar(char ch)
{
    unsigned char c = (unsigned char)ch;
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
        return true;
    return c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* ASCII only: a locale must not change what a coding is called. */
static char ascii_lower(char c)
{
    return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
}

static bool token_equal(const char *a, size_t a_len, const char *b, size_t b_len)
{
    if (a_len != b_len)
        return false;
    for (size_t i = 0; i < a_len; i++)
        if (ascii_lower(a[i]) != ascii_lower(b[i]))
            return false;
    return true;
}

static enum ae_coding classify(const char *tok, size_t len)
{
    if (token_equal(tok, len, "identity", 8))
        return AE_IDENTITY;
    if (token_equal(tok, len, "gzip", 4) || token_equal(tok, len, "x-gzip", 6))
        return AE_GZIP;
    if (token_equal(tok, len, "br", 2))
        return AE_BR;
    if (token_equal(tok, len, "*", 1))
        return AE_STAR;
    return AE_OTHER;
}

/* Where the element starting at s ends: at the next comma outside a
 * quoted-string, or at the NUL. A backslash inside quotes escapes the next
 * byte, unless that byte is the NUL. */
static const char *element_end(const char *s)
{
    bool quoted = false;
    for (;; s++) {
        char c = *s;
        if (c == '\0')
            return s;
        if (quoted) {
            if (c == '\\') {
                if (s[1] == '\0')
                    return s + 1;
                s++;
            } else if (c == '"') {
                quoted = false;
            }
        } else if (c == '"') {
            quoted = true;
        } else if (c == ',') {
            return s;
        }
    }
}

/* Just past the quoted-string opening at p (RFC 9110 §5.6.4), or NULL when it
 * holds a byte the grammar forbids or is not closed before e. */
static const char *skip_quoted(const char *p, const char *e)
{
    for (p++; p < e; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"')
            return p + 1;
        if (c == '\\') {
            /* quoted-pair: HTAB / SP / VCHAR / obs-text */
            if (e - p < 2)
                return NULL;
            c = (unsigned char)p[1];
            if (c != '\t' && (c < 0x20 || c == 0x7f))
                return NULL;
            p++;
            continue;
        }
        /* qdtext: HTAB / SP / %x21 / %x23-5B / %x5D-7E / obs-text */
        if (c != '\t' && (c < 0x20 || c == 0x7f))
            return NULL;
    }
    return NULL;
}

/* The qvalue filling [p, e) in thousandths, or -1 when it is not one:
 * ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] ). */
static int parse_qvalue(const char *p, const char *e)
{
    size_t n = (size_t)(e - p);
    if (n == 0 || (p[0] != '0' && p[0] != '1'))
        return -1;
    int q = (p[0] - '0') * GW_ENCODING_Q_MAX;
    if (n == 1)
        return q;
    if (p[1] != '.' || n > 5)
        return -1;
    int scale = 100;
    for (size_t i = 2; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        q += (p[i] - '0') * scale;
        scale /= 10;
    }
    return q > GW_ENCODING_Q_MAX ? -1 : q;
}

/* Judge the element [s, e): token *( OWS ";" OWS [ name "=" value ] ) OWS.
 * False when malformed; true with el->coding_len == 0 when empty. */
static bool parse_element(const char *s, const char *e, ae_element *el)
{
    const char *p = s;
    bool have_q = false;

    el->coding = NULL;
    el->coding_len = 0;
    el->q = GW_ENCODING_Q_MAX;
    while (p < e && is_ows(*p))
        p++;
    if (p == e)
        return true;
    el->coding = p;
    while (p < e && is_tchar(*p))
        p++;
    el->coding_len = (size_t)(p - el->coding);
    if (el->coding_len == 0)
        return false;

    for (;;) {
        while (p < e && is_ows(*p))
            p++;
        if (p == e)
            return true;
        if (*p != ';')
            return false;
        p++;
        while (p < e && is_ows(*p))
            p++;
        if (p == e || *p == ';')
            continue; /* an empty parameter is allowed (§5.6.6) */

        const char *name = p;
        while (p < e && is_tchar(*p))
            p++;
        if (p == name || p == e || *p != '=')
            return false;
        bool is_q = p - name == 1 && ascii_lower(name[0]) == 'q';
        const char *value = ++p;
        if (p < e && *p == '"') {
            /* The weight grammar is "q=" qvalue: no quotes. */
            if (is_q)
                return false;
            p = skip_quoted(p, e);
            if (p == NULL)
                return false;
            continue;
        }
        while (p < e && is_tchar(*p))
            p++;
        if (p == value)
            return false;
        if (is_q) {
            int q = parse_qvalue(value, p);
            if (q < 0)
                return false;
            if (!have_q)
                el->q = q;
            have_q = true;
        }
    }
}

/* The next well-formed, non-empty element at or after *cursor, which is
 * moved past it; false when the value is used up. */
static bool next_element(const char **cursor, ae_element *el)
{
    const char *s = *cursor;
    while (*s != '\0') {
        const char *e = element_end(s);
        bool ok = parse_element(s, e, el);
        s = *e == ',' ? e + 1 : e;
        if (ok && el->coding_len > 0) {
            *cursor = s;
            return true;
        }
    }
    *cursor = s;
    return false;
}

/* q of a coding: its own first element's, else `*`'s, else -1. */
static int effective_q(const int q[AE_CODING_COUNT], enum ae_coding c)
{
    return q[c] >= 0 ? q[c] : q[AE_STAR];
}

gw_encoding gw_encoding_choose(const char *accept_encoding, const gw_encoding *prefs, size_t pref_count,
                               bool *identity_refused)
{
    int q[AE_CODING_COUNT] = {-1, -1, -1, -1, -1};
    gw_encoding best = GW_ENC_IDENTITY;
    int best_q = 0;
    ae_element el;

    if (identity_refused != NULL)
        *identity_refused = false;
    if (accept_encoding == NULL)
        return GW_ENC_IDENTITY;
    for (const char *cur = accept_encoding; next_element(&cur, &el);) {
        enum ae_coding c = classify(el.coding, el.coding_len);
        if (c != AE_OTHER && q[c] < 0)
            q[c] = el.q;
    }
    for (size_t i = 0; prefs != NULL && i < pref_count; i++) {
        enum ae_coding c;
        switch (prefs[i]) {
        case GW_ENC_GZIP:
            c = AE_GZIP;
            break;
        case GW_ENC_BR:
            c = AE_BR;
            break;
        default:
            continue;
        }
        /* Strictly greater: an equal q leaves the earlier pref in place. */
        int w = effective_q(q, c);
        if (w > best_q) {
            best = prefs[i];
            best_q = w;
        }
    }
    if (best == GW_ENC_IDENTITY && identity_refused != NULL)
        *identity_refused = effective_q(q, AE_IDENTITY) == 0;
    return best;
}

int gw_accept_encoding_q(const char *accept_encoding, const char *name)
{
    size_t name_len;
    enum ae_coding id;
    int star = -1;
    ae_element el;

    if (accept_encoding == NULL || name == NULL)
        return -1;
    for (name_len = 0; name[name_len] != '\0'; name_len++)
        if (!is_tchar(name[name_len]))
            return -1;
    if (name_len == 0)
        return -1;
    id = classify(name, name_len);
    for (const char *cur = accept_encoding; next_element(&cur, &el);) {
        enum ae_coding c = classify(el.coding, el.coding_len);
        bool same = id == AE_OTHER ? token_equal(el.coding, el.coding_len, name, name_len) : c == id;
        if (same)
            return el.q;
        if (c == AE_STAR && star < 0)
            star = el.q;
    }
    return star;
}

const char *gw_encoding_name(gw_encoding e)
{
    switch (e) {
    case GW_ENC_GZIP:
        return "gzip";
    case GW_ENC_BR:
        return "br";
    default:
        return "identity";
    }
}

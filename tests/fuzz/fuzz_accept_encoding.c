/*
 * fuzz_accept_encoding.c - libFuzzer target for the Accept-Encoding parser
 * (gateway/encoding.c). Each input, cut at its first NUL, is negotiated
 * against every server preference order, and the answer is checked against
 * gw_accept_encoding_q() as the oracle: the chosen coding is one the server
 * offers, acceptable, and has the highest q, ties going to the earlier pref.
 * Two rewrites that must not change anything (extra empty elements around the
 * value, ASCII letters upper-cased) are negotiated too and compared.
 *
 * Built by scripts/fuzz.sh (GATEWAY_FUZZ, clang -fsanitize=fuzzer); every
 * build also replays the seed corpus, tests/fuzz/corpus/accept_encoding/
 * (see fuzz.h).
 */
#define FUZZ_NAME "fuzz_accept_encoding"
#include "tests/fuzz/fuzz.h"

#include <string.h>

#include "gateway/encoding.h"

typedef struct pref_order {
    const gw_encoding *prefs;
    size_t count;
} pref_order;

static const gw_encoding BR_GZIP[] = {GW_ENC_BR, GW_ENC_GZIP};
static const gw_encoding GZIP_BR[] = {GW_ENC_GZIP, GW_ENC_BR};
static const gw_encoding GZIP_ONLY[] = {GW_ENC_GZIP};
static const gw_encoding BR_ONLY[] = {GW_ENC_BR};
static const pref_order ORDERS[] = {{BR_GZIP, 2}, {GZIP_BR, 2}, {GZIP_ONLY, 1}, {BR_ONLY, 1}, {NULL, 0}};
#define ORDER_COUNT (sizeof ORDERS / sizeof ORDERS[0])

/* Names whose q is looked up; "fuzz-unlisted" stands for a coding the input
 * does not name (checked before it is relied on). */
static const char *const NAMES[] = {"gzip", "br", "identity", "*", "x-gzip", "GZIP", "Br", "fuzz-unlisted"};
#define NAME_COUNT (sizeof NAMES / sizeof NAMES[0])
enum { N_GZIP, N_BR, N_IDENTITY, N_STAR, N_XGZIP, N_GZIP_UPPER, N_BR_UPPER, N_UNLISTED };

/* Everything the API says about one header value. */
typedef struct verdict {
    int q[NAME_COUNT];
    gw_encoding chosen[ORDER_COUNT];
    bool refused[ORDER_COUNT];
} verdict;

static int q_of(const verdict *v, gw_encoding e)
{
    switch (e) {
    case GW_ENC_GZIP:
        return v->q[N_GZIP];
    case GW_ENC_BR:
        return v->q[N_BR];
    default:
        return v->q[N_IDENTITY];
    }
}

static void check_choice(const verdict *v, const pref_order *o, gw_encoding chosen, bool refused)
{
    size_t at = o->count;
    for (size_t i = 0; i < o->count; i++) {
        if (o->prefs[i] == chosen) {
            at = i;
            break;
        }
    }
    if (chosen == GW_ENC_IDENTITY) {
        /* Nothing the server offers was acceptable. */
        for (size_t i = 0; i < o->count; i++)
            FUZZ_CHECK(q_of(v, o->prefs[i]) <= 0);
        FUZZ_CHECK(refused == (v->q[N_IDENTITY] == 0));
        return;
    }
    FUZZ_CHECK(at < o->count); /* one of the prefs */
    FUZZ_CHECK(!refused);
    int best = q_of(v, chosen);
    FUZZ_CHECK(best > 0);
    for (size_t i = 0; i < o->count; i++) {
        int other = q_of(v, o->prefs[i]);
        FUZZ_CHECK(other <= best);
        if (i < at)
            FUZZ_CHECK(other < best); /* a tie goes to the earlier pref */
    }
}

/* Does s contain the lowercase word w, ASCII case-insensitively? */
static bool contains_word(const char *s, const char *w)
{
    size_t wl = strlen(w);
    for (; *s != '\0'; s++) {
        size_t i = 0;
        while (i < wl && s[i] != '\0' &&
               (s[i] == w[i] || (s[i] >= 'A' && s[i] <= 'Z' && s[i] - 'A' + 'a' == w[i])))
            i++;
        if (i == wl)
            return true;
    }
    return false;
}

static void judge(const char *header, verdict *v)
{
    for (size_t n = 0; n < NAME_COUNT; n++) {
        v->q[n] = gw_accept_encoding_q(header, NAMES[n]);
        FUZZ_CHECK(v->q[n] >= -1 && v->q[n] <= GW_ENCODING_Q_MAX);
    }
    FUZZ_CHECK(v->q[N_XGZIP] == v->q[N_GZIP]);
    FUZZ_CHECK(v->q[N_GZIP_UPPER] == v->q[N_GZIP]);
    FUZZ_CHECK(v->q[N_BR_UPPER] == v->q[N_BR]);
    if (!contains_word(header, "fuzz-unlisted"))
        FUZZ_CHECK(v->q[N_UNLISTED] == v->q[N_STAR]);
    if (!contains_word(header, "gzip"))
        FUZZ_CHECK(v->q[N_GZIP] == v->q[N_STAR]);
    if (!contains_word(header, "br"))
        FUZZ_CHECK(v->q[N_BR] == v->q[N_STAR]);
    if (!contains_word(header, "identity"))
        FUZZ_CHECK(v->q[N_IDENTITY] == v->q[N_STAR]);

    for (size_t i = 0; i < ORDER_COUNT; i++) {
        const pref_order *o = &ORDERS[i];
        bool refused = false;
        v->chosen[i] = gw_encoding_choose(header, o->prefs, o->count, &refused);
        v->refused[i] = refused;
        check_choice(v, o, v->chosen[i], refused);
        FUZZ_CHECK(gw_encoding_choose(header, o->prefs, o->count, NULL) == v->chosen[i]);
        FUZZ_CHECK(strlen(gw_encoding_name(v->chosen[i])) > 0);
    }
}

static bool same_verdict(const verdict *a, const verdict *b)
{
    for (size_t n = 0; n < NAME_COUNT; n++)
        if (a->q[n] != b->q[n])
            return false;
    for (size_t i = 0; i < ORDER_COUNT; i++)
        if (a->chosen[i] != b->chosen[i] || a->refused[i] != b->refused[i])
            return false;
    return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *header = malloc(size + 1);
    char *variant = malloc(size + 4);
    verdict plain, other;

    if (header == NULL || variant == NULL) {
        free(header);
        free(variant);
        return 0;
    }
    memcpy(header, data, size);
    header[size] = '\0';
    judge(header, &plain);

    /* Empty elements before and after change nothing. */
    size_t len = strlen(header);
    memcpy(variant, ", ", 2);
    memcpy(variant + 2, header, len);
    memcpy(variant + 2 + len, ",", 2);
    judge(variant, &other);
    FUZZ_CHECK(same_verdict(&plain, &other));

    /* Codings, parameter names and q are case-insensitive. */
    for (size_t i = 0; i <= len; i++)
        variant[i] = (header[i] >= 'a' && header[i] <= 'z') ? (char)(header[i] - 'a' + 'A') : header[i];
    judge(variant, &other);
    FUZZ_CHECK(same_verdict(&plain, &other));

    FUZZ_CHECK(gw_encoding_choose(NULL, BR_GZIP, 2, NULL) == GW_ENC_IDENTITY);
    free(header);
    header = NULL;
    free(variant);
    variant = NULL;
    return 0;
}

/*
 * test_encoding.c - Accept-Encoding parsing and content-coding negotiation
 * (gateway/encoding.c): a table of headers against server preference orders,
 * then the q-value lookup, the names, and headers of 64 KiB.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gateway/encoding.h"

#define LONG_HEADER_BYTES (64 * 1024)

/* The server preference orders the table uses. */
enum pref_set { BR_GZIP, GZIP_BR, GZIP_ONLY, BR_ONLY, NO_PREFS };

static const gw_encoding PREF_BR_GZIP[] = {GW_ENC_BR, GW_ENC_GZIP};
static const gw_encoding PREF_GZIP_BR[] = {GW_ENC_GZIP, GW_ENC_BR};
static const gw_encoding PREF_GZIP[] = {GW_ENC_GZIP};
static const gw_encoding PREF_BR[] = {GW_ENC_BR};

typedef struct negotiation_case {
    const char *header; /* NULL: no Accept-Encoding */
    enum pref_set prefs;
    gw_encoding expected;
    bool identity_refused;
} negotiation_case;

#define ID GW_ENC_IDENTITY
#define GZ GW_ENC_GZIP
#define BR GW_ENC_BR

static const negotiation_case CASES[] = {
    /* The issue's examples. */
    {NULL, BR_GZIP, ID, false},
    {"", BR_GZIP, ID, false}, /* empty: only identity is acceptable */
    {"gzip, deflate, br", BR_GZIP, BR, false},
    {"gzip, deflate, br", GZIP_BR, GZ, false},
    {"gzip;q=1, br;q=0.5", BR_GZIP, GZ, false},
    {"br;q=0, *", BR_GZIP, GZ, false},
    {"*;q=0", BR_GZIP, ID, true},
    {"identity", BR_GZIP, ID, false},
    /* Plain lists. */
    {"gzip", BR_GZIP, GZ, false},
    {"br", BR_GZIP, BR, false},
    {"deflate", BR_GZIP, ID, false},
    {"*", BR_GZIP, BR, false},
    {"*", GZIP_BR, GZ, false},
    {"br;q=0.5, gzip;q=0.5", BR_GZIP, BR, false}, /* tie: server order */
    {"br;q=0.5, gzip;q=0.5", GZIP_BR, GZ, false},
    {"*;q=0.5, gzip", BR_GZIP, GZ, false}, /* named 1 beats br's 0.5 via * */
    {"gzip;level=9;q=0.3, br;q=0.2", BR_GZIP, GZ, false},
    {"identity;q=1, gzip;q=0.1", BR_GZIP, GZ, false}, /* identity does not compete */
    /* Refusals. */
    {"identity;q=0", BR_GZIP, ID, true},
    {"identity;q=0, gzip", BR_GZIP, GZ, false},
    {"*;q=0, identity", BR_GZIP, ID, false},
    {"*;q=0, identity;q=0.5", BR_GZIP, ID, false},
    {"gzip;q=0, br;q=0, identity;q=0", BR_GZIP, ID, true},
    {"gzip;q=0, br;q=0", BR_GZIP, ID, false},
    {"identity;q=0, *;q=0, deflate", BR_GZIP, ID, true},
    {"*, *;q=0", BR_GZIP, BR, false}, /* the first * counts */
    /* Preference sets. */
    {"gzip, br", NO_PREFS, ID, false},
    {"*;q=0", NO_PREFS, ID, true},
    {"br", GZIP_ONLY, ID, false},
    {"gzip, br;q=0.1", BR_ONLY, BR, false},
    {"identity;q=0, gzip", BR_ONLY, ID, true},
    /* Whitespace and case. */
    {"  gzip ;  q=0.5 ,\tbr ; q=0.4 ", BR_GZIP, GZ, false},
    {"gzip\t,\tbr", BR_GZIP, BR, false},
    {"gzip;q=0.5 ;foo=bar", GZIP_ONLY, GZ, false},
    {"GZIP, BR", BR_GZIP, BR, false},
    {"Gzip;Q=0.5, bR;q=0.4", BR_GZIP, GZ, false},
    {"IDENTITY;Q=0", BR_GZIP, ID, true},
    /* x-gzip is gzip; a coding's first valid element counts. */
    {"x-gzip", BR_GZIP, GZ, false},
    {"X-GZIP;q=0.9, br;q=0.8", BR_GZIP, GZ, false},
    {"x-gzip;q=0, gzip", BR_GZIP, ID, false},
    {"gzip;q=0.1, x-gzip;q=1, br;q=0.2", GZIP_BR, BR, false},
    {"br;q=0.2, br;q=1, gzip;q=0.5", BR_GZIP, GZ, false},
    /* Parameters with quoted-strings: commas and semicolons inside stay inside. */
    {"gzip;foo=\"a, br, b;c\";q=0.5", BR_GZIP, GZ, false},
    {"gzip;foo=\"a,b;c\";q=0.5, br;q=0.4", BR_GZIP, GZ, false},
    {"gzip;foo=\"x\\\"y, br\";q=0.5", BR_GZIP, GZ, false},     /* escaped quote */
    {"gzip;foo=\"\\\\\";q=0.5, br;q=0.4", BR_GZIP, GZ, false}, /* escaped backslash */
    {"br;foo=\"unterminated, gzip", BR_GZIP, ID, false},
    {"br;foo=\"x\"y, gzip", BR_GZIP, GZ, false},             /* text after the quote */
    {"gzip;a=\"x\001y\", br;q=0.1", GZIP_BR, BR, false},     /* control byte in quotes */
    {"gzip;a=\"x\\", GZIP_ONLY, ID, false},                  /* backslash at the end */
    {"gzip;a=\"\\\001\", br;q=0.1", GZIP_BR, BR, false},     /* control byte escaped */
    {"gzip;a=\"\\\t\\\x80\", br;q=0.1", GZIP_BR, GZ, false}, /* HTAB, obs-text escaped */
    /* q edges. */
    {"gzip;q=0", GZIP_ONLY, ID, false},
    {"gzip;q=0.000", GZIP_ONLY, ID, false},
    {"gzip;q=0.", GZIP_ONLY, ID, false},
    {"gzip;q=1.000, br;q=0.999", GZIP_BR, GZ, false},
    {"gzip;q=0.001", GZIP_ONLY, GZ, false},
    {"gzip;q=0.001, br;q=0.002", GZIP_BR, BR, false},
    {"gzip;q=1., br", GZIP_BR, GZ, false},
    {"br;q=0., gzip", BR_GZIP, GZ, false},
    /* A malformed q drops its element (GZIP_BR: gzip would win if it counted). */
    {"gzip;q=1.0001, br;q=0.1", GZIP_BR, BR, false},
    {"gzip;q=1.001, br;q=0.1", GZIP_BR, BR, false},
    {"gzip;q=2, br;q=0.1", GZIP_BR, BR, false},
    {"gzip;q=0.5555, br;q=0.1", GZIP_BR, BR, false},
    {"gzip;q=abc, br;q=0.1", GZIP_BR, BR, false},
    {"gzip;q=-1, br;q=0.1", GZIP_BR, BR, false},
    {"gzip;q=1.5, br;q=0.1", GZIP_BR, BR, false},
    {"gzip;q=, br;q=0.1", GZIP_BR, BR, false},
    {"gzip;q=.5, br;q=0.1", GZIP_BR, BR, false},
    {"gzip;q=0.5a, br;q=0.1", GZIP_BR, BR, false},
    {"gzip;q=0.5.1, br;q=0.1", GZIP_BR, BR, false},
    {"gzip;q=\"1\", br;q=0.1", GZIP_BR, BR, false},
    {"gzip; q = 0.5, br;q=0.1", GZIP_BR, BR, false},
    {"gzip;q=0.5;q=9, br;q=0.1", GZIP_BR, BR, false},
    {"gzip;q=0;q=1", GZIP_ONLY, ID, false}, /* the first q counts */
    {"identity;q=0.00000", BR_GZIP, ID, false},
    /* Multiple header lines joined by ", ". */
    {"gzip;q=0.2, identity, br;q=0.3", BR_GZIP, BR, false},
    {"gzip, deflate, br;q=0", BR_GZIP, GZ, false},
    {"deflate, identity;q=0, gzip", BR_GZIP, GZ, false},
    /* Empty elements and garbage. */
    {",,gzip,,", GZIP_ONLY, GZ, false},
    {", , ,br", BR_GZIP, BR, false},
    {",", BR_GZIP, ID, false},
    {"   ", BR_GZIP, ID, false},
    {";q=1", BR_GZIP, ID, false},
    {"gzip;;q=0.5;, br;q=0.4", BR_GZIP, GZ, false}, /* empty parameters */
    {"@@@, gzip", BR_GZIP, GZ, false},
    {"gz ip", GZIP_ONLY, ID, false},
    {"gzip br", GZIP_ONLY, ID, false},
    {"gzip\r\n, br", GZIP_ONLY, ID, false},
    {"\x80\xff, gzip", GZIP_ONLY, GZ, false},
    {"gzip;q", GZIP_ONLY, ID, false},
    {"gzip;=1", GZIP_ONLY, ID, false},
    {"gzip;a=", GZIP_ONLY, ID, false},
    {"gzip;q=0.5=", GZIP_ONLY, ID, false},
    {"\"gzip\"", GZIP_ONLY, ID, false},
    {"gzip/1", GZIP_ONLY, ID, false},
    {"**, gzip;q=0.5", BR_GZIP, GZ, false}, /* "**" is just a coding name */
    {"identity;q=0, @@@", BR_GZIP, ID, true},
};

static void choose_for(const char *header, enum pref_set set, gw_encoding *got, bool *refused)
{
    switch (set) {
    case BR_GZIP:
        *got = gw_encoding_choose(header, PREF_BR_GZIP, 2, refused);
        break;
    case GZIP_BR:
        *got = gw_encoding_choose(header, PREF_GZIP_BR, 2, refused);
        break;
    case GZIP_ONLY:
        *got = gw_encoding_choose(header, PREF_GZIP, 1, refused);
        break;
    case BR_ONLY:
        *got = gw_encoding_choose(header, PREF_BR, 1, refused);
        break;
    case NO_PREFS:
        *got = gw_encoding_choose(header, NULL, 0, refused);
        break;
    }
}

static void test_negotiation_table(void **state)
{
    (void)state;
    size_t failures = 0;
    for (size_t i = 0; i < sizeof CASES / sizeof CASES[0]; i++) {
        const negotiation_case *c = &CASES[i];
        gw_encoding got = (gw_encoding)-1;
        /* Start from the wrong answer so an unwritten flag shows. */
        bool refused = !c->identity_refused;
        choose_for(c->header, c->prefs, &got, &refused);
        if (got != c->expected || refused != c->identity_refused) {
            print_error("case %zu [%s] prefs %d: got %s refused=%d, expected %s refused=%d\n", i,
                        c->header ? c->header : "(null)", (int)c->prefs, gw_encoding_name(got), refused,
                        gw_encoding_name(c->expected), c->identity_refused);
            failures++;
        }
    }
    assert_int_equal(failures, 0);
    /* The table must stay at its promised size. */
    assert_true(sizeof CASES / sizeof CASES[0] >= 40);
}

static void test_choose_edges(void **state)
{
    (void)state;
    static const gw_encoding odd_prefs[] = {GW_ENC_IDENTITY, (gw_encoding)7, GW_ENC_GZIP, GW_ENC_GZIP};
    bool refused = true;

    /* No flag pointer is fine. */
    assert_int_equal(gw_encoding_choose("*;q=0", PREF_BR_GZIP, 2, NULL), GW_ENC_IDENTITY);
    assert_int_equal(gw_encoding_choose("gzip", PREF_BR_GZIP, 2, NULL), GW_ENC_GZIP);
    /* Identity and unknown values in the prefs are skipped. */
    assert_int_equal(gw_encoding_choose("*", odd_prefs, 4, &refused), GW_ENC_GZIP);
    assert_false(refused);
    /* NULL prefs with a count are no prefs. */
    assert_int_equal(gw_encoding_choose("gzip", NULL, 2, &refused), GW_ENC_IDENTITY);
    assert_false(refused);
    /* Absent header: never a refusal. */
    refused = true;
    assert_int_equal(gw_encoding_choose(NULL, PREF_BR_GZIP, 2, &refused), GW_ENC_IDENTITY);
    assert_false(refused);
    /* The flag is cleared when a coding is chosen. */
    refused = true;
    assert_int_equal(gw_encoding_choose("identity;q=0, br", PREF_BR_GZIP, 2, &refused), GW_ENC_BR);
    assert_false(refused);
}

static void test_q_lookup(void **state)
{
    (void)state;
    assert_int_equal(gw_accept_encoding_q("gzip;q=0.5", "gzip"), 500);
    assert_int_equal(gw_accept_encoding_q("gzip;q=0.5", "GZIP"), 500);
    assert_int_equal(gw_accept_encoding_q("gzip;q=0.5", "x-gzip"), 500);
    assert_int_equal(gw_accept_encoding_q("X-Gzip;q=0.3", "gzip"), 300);
    assert_int_equal(gw_accept_encoding_q("gzip", "gzip"), 1000);
    assert_int_equal(gw_accept_encoding_q("gzip;q=1.000", "gzip"), 1000);
    assert_int_equal(gw_accept_encoding_q("gzip;q=0.001", "gzip"), 1);
    assert_int_equal(gw_accept_encoding_q("gzip;q=0.05", "gzip"), 50);
    assert_int_equal(gw_accept_encoding_q("gzip;q=0", "gzip"), 0);
    assert_int_equal(gw_accept_encoding_q("gzip;q=1.0001, gzip;q=0.4", "gzip"), 400);
    assert_int_equal(gw_accept_encoding_q("gzip;q=0.4, gzip;q=0.9", "gzip"), 400);
    assert_int_equal(gw_accept_encoding_q("br", "gzip"), -1);
    assert_int_equal(gw_accept_encoding_q("br, *;q=0.2", "gzip"), 200);
    assert_int_equal(gw_accept_encoding_q("*;q=0.2, gzip;q=0.7", "gzip"), 700);
    assert_int_equal(gw_accept_encoding_q("*;q=0.2", "*"), 200);
    assert_int_equal(gw_accept_encoding_q("br", "*"), -1);
    assert_int_equal(gw_accept_encoding_q("deflate;q=0.7", "Deflate"), 700);
    assert_int_equal(gw_accept_encoding_q("deflate, deflate;q=0", "deflate"), 1000);
    assert_int_equal(gw_accept_encoding_q("deflate;q=0.7", "zstd"), -1);
    assert_int_equal(gw_accept_encoding_q("*;q=0", "identity"), 0);
    assert_int_equal(gw_accept_encoding_q("identity;q=0.1, *;q=0", "identity"), 100);
    assert_int_equal(gw_accept_encoding_q("", "identity"), -1);
    assert_int_equal(gw_accept_encoding_q("gzip;foo=\"gzip;q=0\";q=0.25", "gzip"), 250);
    /* Not a coding name, or nothing to look in. */
    assert_int_equal(gw_accept_encoding_q("gzip", "gz ip"), -1);
    assert_int_equal(gw_accept_encoding_q("gzip", ""), -1);
    assert_int_equal(gw_accept_encoding_q("*", "a,b"), -1);
    assert_int_equal(gw_accept_encoding_q(NULL, "gzip"), -1);
    assert_int_equal(gw_accept_encoding_q("gzip", NULL), -1);
}

static void test_names(void **state)
{
    (void)state;
    assert_string_equal(gw_encoding_name(GW_ENC_IDENTITY), "identity");
    assert_string_equal(gw_encoding_name(GW_ENC_GZIP), "gzip");
    assert_string_equal(gw_encoding_name(GW_ENC_BR), "br");
    assert_string_equal(gw_encoding_name((gw_encoding)42), "identity");
}

/* Fill buf (LONG_HEADER_BYTES + 1) with `unit` repeated, then put `tail` at the end. */
static void fill_long(char *buf, const char *unit, const char *tail)
{
    size_t unit_len = strlen(unit), tail_len = strlen(tail);
    size_t n = 0;
    while (n + unit_len + tail_len <= LONG_HEADER_BYTES) {
        memcpy(buf + n, unit, unit_len);
        n += unit_len;
    }
    memcpy(buf + n, tail, tail_len + 1);
}

static void test_long_headers(void **state)
{
    (void)state;
    char *buf = malloc(LONG_HEADER_BYTES + 1);
    bool refused = true;
    assert_non_null(buf);

    /* Many other codings, then the one that counts. */
    fill_long(buf, "deflate;q=0.1, ", "gzip;q=0.2");
    assert_true(strlen(buf) > LONG_HEADER_BYTES - 32);
    assert_int_equal(gw_encoding_choose(buf, PREF_BR_GZIP, 2, &refused), GW_ENC_GZIP);
    assert_false(refused);
    assert_int_equal(gw_accept_encoding_q(buf, "gzip"), 200);
    assert_int_equal(gw_accept_encoding_q(buf, "deflate"), 100);

    /* One element of 64 KiB: a parameter value that is a huge quoted-string. */
    memcpy(buf, "gzip;x=\"", 8);
    memset(buf + 8, 'a', LONG_HEADER_BYTES - 8);
    buf[LONG_HEADER_BYTES - 1] = '"';
    buf[LONG_HEADER_BYTES] = '\0';
    assert_int_equal(gw_encoding_choose(buf, PREF_GZIP, 1, &refused), GW_ENC_GZIP);

    /* The same, unterminated: the whole element goes. */
    buf[LONG_HEADER_BYTES - 1] = 'a';
    assert_int_equal(gw_encoding_choose(buf, PREF_GZIP, 1, &refused), GW_ENC_IDENTITY);
    assert_int_equal(gw_accept_encoding_q(buf, "gzip"), -1);

    /* Only separators, only whitespace, only quotes, only backslashes. */
    fill_long(buf, ",", "");
    assert_int_equal(gw_encoding_choose(buf, PREF_BR_GZIP, 2, &refused), GW_ENC_IDENTITY);
    fill_long(buf, " \t", "br");
    assert_int_equal(gw_encoding_choose(buf, PREF_BR_GZIP, 2, &refused), GW_ENC_BR);
    fill_long(buf, "\"", "");
    assert_int_equal(gw_encoding_choose(buf, PREF_BR_GZIP, 2, &refused), GW_ENC_IDENTITY);
    fill_long(buf, "\\", "");
    assert_int_equal(gw_encoding_choose(buf, PREF_BR_GZIP, 2, &refused), GW_ENC_IDENTITY);

    /* A 64 KiB coding name is just another coding; the refusal after it counts. */
    fill_long(buf, "z", ", identity;q=0");
    assert_int_equal(gw_encoding_choose(buf, PREF_BR_GZIP, 2, &refused), GW_ENC_IDENTITY);
    assert_true(refused);

    free(buf);
    buf = NULL;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_negotiation_table), cmocka_unit_test(test_choose_edges),
        cmocka_unit_test(test_q_lookup),          cmocka_unit_test(test_names),
        cmocka_unit_test(test_long_headers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

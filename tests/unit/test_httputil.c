/*
 * test_httputil.c - request ids, traceparent, hop-by-hop rules, the JSON
 * error body and the X-Forwarded-For walk (gateway/httputil.c).
 */
#include <arpa/inet.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <event2/buffer.h>

#include "gateway/httputil.h"
#include "gateway/runtime.h"

static void test_request_id(void **state)
{
    char long_id[GW_REQUEST_ID_MAX + 2];
    assert_true(gw_request_id_is_sane("abc-123_X.y:z"));
    assert_false(gw_request_id_is_sane(""));
    assert_false(gw_request_id_is_sane(NULL));
    assert_false(gw_request_id_is_sane("has space"));
    assert_false(gw_request_id_is_sane("quote\""));
    assert_false(gw_request_id_is_sane("new\nline"));
    memset(long_id, 'a', sizeof long_id - 1);
    long_id[GW_REQUEST_ID_MAX] = '\0';
    assert_true(gw_request_id_is_sane(long_id));
    long_id[GW_REQUEST_ID_MAX] = 'a';
    long_id[GW_REQUEST_ID_MAX + 1] = '\0';
    assert_false(gw_request_id_is_sane(long_id));
}

static void test_minted_ids(void **state)
{
    gw_rng rng;
    char a[33], b[33];
    gw_rng_seed(&rng);
    gw_rng_hex(&rng, a, 16);
    gw_rng_hex(&rng, b, 16);
    assert_int_equal(strlen(a), 32);
    assert_int_equal(strspn(a, "0123456789abcdef"), 32);
    assert_string_not_equal(a, b);
    assert_true(gw_request_id_is_sane(a));
    /* Every digit turns up (the sixteen-at-a-time path maps all of them). */
    bool seen[16] = {false};
    for (int i = 0; i < 64; i++) {
        gw_rng_hex(&rng, a, 16);
        assert_int_equal(strspn(a, "0123456789abcdef"), 32);
        for (size_t k = 0; k < 32; k++)
            seen[a[k] <= '9' ? a[k] - '0' : a[k] - 'a' + 10] = true;
    }
    for (int d = 0; d < 16; d++)
        assert_true(seen[d]);
    /* Lengths that are not a multiple of a draw's eight bytes. */
    for (size_t n = 0; n <= 13; n++) {
        char c[40];
        memset(c, 'x', sizeof c);
        gw_rng_hex(&rng, c, n);
        assert_int_equal(strlen(c), 2 * n);
        assert_int_equal(strspn(c, "0123456789abcdef"), 2 * n);
    }
}

static void test_traceparent(void **state)
{
    gw_rng rng;
    char tp[GW_TRACEPARENT_LEN + 1];
    assert_true(gw_traceparent_is_valid("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
    assert_false(gw_traceparent_is_valid("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
    assert_false(gw_traceparent_is_valid("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"));
    assert_false(gw_traceparent_is_valid("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"));
    assert_false(gw_traceparent_is_valid("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
    assert_false(gw_traceparent_is_valid("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x"));
    assert_false(gw_traceparent_is_valid("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"));
    assert_false(gw_traceparent_is_valid(NULL));
    assert_true(gw_traceparent_is_valid("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"));
    gw_rng_seed(&rng);
    gw_traceparent_mint(&rng, tp);
    assert_int_equal(strlen(tp), GW_TRACEPARENT_LEN);
    assert_true(gw_traceparent_is_valid(tp));
    assert_memory_equal(tp, "00-", 3);
    assert_string_equal(tp + 52, "-01");
    /* Every one valid, no two alike. */
    char prev[GW_TRACEPARENT_LEN + 1];
    for (int i = 0; i < 1000; i++) {
        memcpy(prev, tp, sizeof prev);
        gw_traceparent_mint(&rng, tp);
        assert_int_equal(strlen(tp), GW_TRACEPARENT_LEN);
        assert_true(gw_traceparent_is_valid(tp));
        assert_string_not_equal(tp, prev);
    }
}

static void test_hop_by_hop(void **state)
{
    assert_true(gw_header_is_hop_by_hop("connection", NULL));
    assert_true(gw_header_is_hop_by_hop("Keep-Alive", NULL));
    assert_true(gw_header_is_hop_by_hop("TE", NULL));
    assert_true(gw_header_is_hop_by_hop("Trailer", NULL));
    assert_true(gw_header_is_hop_by_hop("Transfer-Encoding", NULL));
    assert_true(gw_header_is_hop_by_hop("Upgrade", NULL));
    assert_true(gw_header_is_hop_by_hop("Proxy-Authorization", NULL));
    assert_true(gw_header_is_hop_by_hop("proxy-connection", NULL));
    assert_false(gw_header_is_hop_by_hop("Content-Type", NULL));
    assert_false(gw_header_is_hop_by_hop("X-Foo", NULL));
    assert_true(gw_header_is_hop_by_hop("X-Foo", "keep-alive, x-foo"));
    assert_true(gw_header_is_hop_by_hop("x-bar", "X-Foo ,X-Bar"));
    assert_false(gw_header_is_hop_by_hop("X-Fo", "x-foo"));
    assert_false(gw_header_is_hop_by_hop("X-Foo", ""));
}

static void test_error_body(void **state)
{
    struct evbuffer *b = evbuffer_new();
    gw_error_body(b, 404, "no \"route\"", "id-1");
    size_t len = evbuffer_get_length(b);
    char *s = (char *)evbuffer_pullup(b, -1);
    assert_int_equal(len,
                     strlen("{\"error\":\"no \\\"route\\\"\",\"status\":404,\"request_id\":\"id-1\"}\n"));
    assert_memory_equal(s, "{\"error\":\"no \\\"route\\\"\",\"status\":404,\"request_id\":\"id-1\"}\n", len);
    evbuffer_free(b);
}

static void test_path_safety(void **state)
{
    assert_true(gw_path_is_safe("/"));
    assert_true(gw_path_is_safe("/public/a/b"));
    assert_true(gw_path_is_safe("/public/a..b/.c/..."));
    assert_true(gw_path_is_safe("/100%25/%zz/%2"));
    assert_false(gw_path_is_safe("/public/../admin"));
    assert_false(gw_path_is_safe("/public/.."));
    assert_false(gw_path_is_safe("/public/./x"));
    assert_false(gw_path_is_safe("/public/%2e%2e/admin"));
    assert_false(gw_path_is_safe("/public/%2E%2E/x"));
    assert_false(gw_path_is_safe("/public/.%2e/x"));
    assert_false(gw_path_is_safe("/public/..%2fadmin"));
    assert_false(gw_path_is_safe("/public/..%5cadmin"));
    assert_false(gw_path_is_safe("/public\\..\\admin"));
    assert_false(gw_path_is_safe("/a%00b"));
}

/* ---- X-Forwarded-For ---- */

/* The trusted blocks of these tests: 10.0.0.0/8, 192.0.2.1 and fd00::/8. */
static gw_cidr trusted[3];
#define TRUSTED_COUNT (sizeof trusted / sizeof trusted[0])

static void block(gw_cidr *c, int family, const char *addr, int bits)
{
    c->family = family;
    c->bits = bits;
    memset(c->bytes, 0, sizeof c->bytes);
    assert_int_equal(inet_pton(family, addr, c->bytes), 1);
}

static int xff_setup(void **state)
{
    block(&trusted[0], AF_INET, "10.0.0.0", 8);
    block(&trusted[1], AF_INET, "192.0.2.1", 32);
    block(&trusted[2], AF_INET6, "fd00::", 8);
    return 0;
}

/* The walk over xff with out starting as "peer" (or "" when that does not
 * fit), as the gateway starts it with the peer's address. */
static bool walk(const char *xff, char *out, size_t size)
{
    if (size >= sizeof "peer")
        memcpy(out, "peer", sizeof "peer");
    else if (size > 0)
        out[0] = '\0';
    return gw_forwarded_for_walk(trusted, TRUSTED_COUNT, xff, out, size);
}

static void test_xff_one_hop(void **state)
{
    char out[INET6_ADDRSTRLEN + 1];
    assert_false(walk("203.0.113.7", out, sizeof out));
    assert_string_equal(out, "203.0.113.7");
    /* A trusted hop alone: true, the walk goes on to the line before. */
    assert_true(walk("10.1.2.3", out, sizeof out));
    assert_string_equal(out, "10.1.2.3");
    /* Nothing at all: true, out untouched. */
    assert_true(walk("", out, sizeof out));
    assert_string_equal(out, "peer");
    /* No trusted blocks: the rightmost hop, whatever it is. */
    assert_false(gw_forwarded_for_walk(trusted, 0, "203.0.113.7, 10.1.2.3", out, sizeof out));
    assert_string_equal(out, "10.1.2.3");
}

static void test_xff_trusted_hops(void **state)
{
    char out[INET6_ADDRSTRLEN + 1];
    assert_false(walk("203.0.113.7, 10.0.0.2, 192.0.2.1, 10.255.255.255", out, sizeof out));
    assert_string_equal(out, "203.0.113.7");
    /* Every hop trusted: out holds the leftmost. */
    assert_true(walk("10.0.0.5, 192.0.2.1, 10.0.0.6", out, sizeof out));
    assert_string_equal(out, "10.0.0.5");
    /* 192.0.2.1/32 is one address, not its neighbours. */
    assert_false(walk("10.0.0.5, 192.0.2.2", out, sizeof out));
    assert_string_equal(out, "192.0.2.2");
}

static void test_xff_untrusted_in_the_middle(void **state)
{
    char out[INET6_ADDRSTRLEN + 1];
    /* What is left of an untrusted hop could be forged: never reached. */
    assert_false(walk("10.9.9.9, 198.51.100.1, 10.0.0.2", out, sizeof out));
    assert_string_equal(out, "198.51.100.1");
    assert_false(walk("192.0.2.1, 203.0.113.50, 198.51.100.1, 10.0.0.2", out, sizeof out));
    assert_string_equal(out, "198.51.100.1");
}

static void test_xff_malformed(void **state)
{
    char out[INET6_ADDRSTRLEN + 1];
    /* Not an address: an untrusted hop like any other, kept as written. */
    assert_false(walk("203.0.113.7, unknown", out, sizeof out));
    assert_string_equal(out, "unknown");
    assert_false(walk("10.0.0.256, 10.0.0.1", out, sizeof out));
    assert_string_equal(out, "10.0.0.256");
    /* Ports go, for IPv4 and bracketed IPv6. */
    assert_false(walk("203.0.113.7:5555, 10.0.0.1:8080", out, sizeof out));
    assert_string_equal(out, "203.0.113.7");
    assert_false(walk("[2001:db8::7]:443, [fd00::1]:80", out, sizeof out));
    assert_string_equal(out, "2001:db8::7");
    /* An unclosed bracket is left alone, and is no address. */
    assert_false(walk("[fd00::1", out, sizeof out));
    assert_string_equal(out, "[fd00::1");
    /* Two colons and no brackets: not IPv4 with a port. */
    assert_false(walk("10.0.0.1:80:90", out, sizeof out));
    assert_string_equal(out, "10.0.0.1:80:90");
}

static void test_xff_spaces(void **state)
{
    char out[INET6_ADDRSTRLEN + 1];
    assert_false(walk("  203.0.113.7 ,\t10.0.0.2\t ,  192.0.2.1", out, sizeof out));
    assert_string_equal(out, "203.0.113.7");
    assert_true(walk(" \t10.0.0.2 \t", out, sizeof out));
    assert_string_equal(out, "10.0.0.2");
    /* Blanks inside a hop stay: it is no address. */
    assert_false(walk("203.0 .113.7", out, sizeof out));
    assert_string_equal(out, "203.0 .113.7");
}

static void test_xff_empty_items(void **state)
{
    char out[INET6_ADDRSTRLEN + 1];
    /* An empty element is malformed: the walk stops and out keeps the hop
     * to its right (a trusted one here). */
    assert_false(walk("203.0.113.7,,10.0.0.2", out, sizeof out));
    assert_string_equal(out, "10.0.0.2");
    assert_false(walk("203.0.113.7, \t , 10.0.0.2", out, sizeof out));
    assert_string_equal(out, "10.0.0.2");
    /* At the right end: out keeps the caller's value. */
    assert_false(walk("203.0.113.7,", out, sizeof out));
    assert_string_equal(out, "peer");
    assert_false(walk(" ", out, sizeof out));
    assert_string_equal(out, "peer");
    assert_false(walk(",", out, sizeof out));
    assert_string_equal(out, "peer");
    /* At the left end it is passed over: the walk ends as if it were not
     * there (as the walk over lines did before it moved here). */
    assert_true(walk(", 10.0.0.2", out, sizeof out));
    assert_string_equal(out, "10.0.0.2");
    assert_false(walk(" ,203.0.113.7", out, sizeof out));
    assert_string_equal(out, "203.0.113.7");
}

static void test_xff_ipv6(void **state)
{
    char out[INET6_ADDRSTRLEN + 1];
    /* One spelling per address: lower case, zeros compressed. */
    assert_false(walk("2001:DB8:0:0:0:0:0:0001, FD00::1", out, sizeof out));
    assert_string_equal(out, "2001:db8::1");
    assert_true(walk("fd12:3456::1, [FD00:0::2]:8443", out, sizeof out));
    assert_string_equal(out, "fd12:3456::1");
    assert_false(walk("fe80::1, fd00::1", out, sizeof out));
    assert_string_equal(out, "fe80::1");
    /* An IPv4-mapped address is IPv6: 10.0.0.0/8 does not hold it. */
    assert_false(walk("::FFFF:10.0.0.1", out, sizeof out));
    assert_string_equal(out, "::ffff:10.0.0.1");
    /* The longest IPv6 spelling (45 characters) fits, and is written shorter. */
    assert_false(walk("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", out, sizeof out));
    assert_string_equal(out, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff");
}

static void test_xff_long_lines(void **state)
{
    char out[INET6_ADDRSTRLEN + 1];
    /* A long line of trusted hops is walked to its end. */
    size_t hops = 2000, cap = hops * 12 + 32, len = 0;
    char *line = malloc(cap);
    assert_non_null(line);
    len += (size_t)snprintf(line + len, cap - len, "198.51.100.9");
    for (size_t i = 0; i < hops; i++)
        len += (size_t)snprintf(line + len, cap - len, ", 10.0.%zu.%zu", (i / 256) % 256, i % 256);
    assert_false(walk(line, out, sizeof out));
    assert_string_equal(out, "198.51.100.9");
    free(line);

    /* A hop longer than INET6_ADDRSTRLEN bytes is malformed: out keeps the
     * hop to its right; one of INET6_ADDRSTRLEN is still taken (and is no
     * address). */
    char hop[INET6_ADDRSTRLEN + 32];
    memset(hop, 'a', INET6_ADDRSTRLEN + 1);
    strcpy(hop + INET6_ADDRSTRLEN + 1, ", 10.0.0.3");
    assert_false(walk(hop, out, sizeof out));
    assert_string_equal(out, "10.0.0.3");
    memset(hop, 'a', INET6_ADDRSTRLEN);
    strcpy(hop + INET6_ADDRSTRLEN, ", 10.0.0.3");
    assert_false(walk(hop, out, sizeof out));
    assert_int_equal(strlen(out), INET6_ADDRSTRLEN);
    assert_int_equal(strspn(out, "a"), INET6_ADDRSTRLEN);
    /* A bracketed IPv6 address with a port can be longer than that: then it
     * is malformed too, though the address itself would fit. */
    assert_false(
        walk("203.0.113.7, [2001:0db8:1111:2222:3333:4444:5555:6666]:65535, 10.0.0.4", out, sizeof out));
    assert_string_equal(out, "10.0.0.4");
    /* Blanks around a hop do not count towards its length. */
    char padded[200];
    snprintf(padded, sizeof padded, "%60s203.0.113.7%60s", "", "");
    assert_false(walk(padded, out, sizeof out));
    assert_string_equal(out, "203.0.113.7");
}

static void test_xff_small_output(void **state)
{
    char out[8];
    /* The hop is cut to size - 1 bytes; the trust decision is not. */
    assert_false(walk("203.0.113.7", out, sizeof out));
    assert_string_equal(out, "203.0.1");
    assert_true(walk("10.0.0.1, 10.200.0.2", out, 4));
    assert_string_equal(out, "10.");
    assert_false(walk("203.0.113.7, 10.0.0.1", out, 1));
    assert_string_equal(out, "");
    /* Size 0: nothing written at all. */
    memcpy(out, "keep", 5);
    assert_false(gw_forwarded_for_walk(trusted, TRUSTED_COUNT, "203.0.113.7, 10.0.0.1", out, 0));
    assert_string_equal(out, "keep");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_request_id),
        cmocka_unit_test(test_minted_ids),
        cmocka_unit_test(test_traceparent),
        cmocka_unit_test(test_hop_by_hop),
        cmocka_unit_test(test_error_body),
        cmocka_unit_test(test_path_safety),
        cmocka_unit_test_setup(test_xff_one_hop, xff_setup),
        cmocka_unit_test_setup(test_xff_trusted_hops, xff_setup),
        cmocka_unit_test_setup(test_xff_untrusted_in_the_middle, xff_setup),
        cmocka_unit_test_setup(test_xff_malformed, xff_setup),
        cmocka_unit_test_setup(test_xff_spaces, xff_setup),
        cmocka_unit_test_setup(test_xff_empty_items, xff_setup),
        cmocka_unit_test_setup(test_xff_ipv6, xff_setup),
        cmocka_unit_test_setup(test_xff_long_lines, xff_setup),
        cmocka_unit_test_setup(test_xff_small_output, xff_setup),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

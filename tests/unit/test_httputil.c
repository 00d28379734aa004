/*
 * test_httputil.c - request ids, traceparent, hop-by-hop rules and the JSON
 * error body (gateway/httputil.c).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>
#include <event2/buffer.h>

#include "gateway/httputil.h"

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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_request_id),  cmocka_unit_test(test_minted_ids),
        cmocka_unit_test(test_traceparent), cmocka_unit_test(test_hop_by_hop),
        cmocka_unit_test(test_error_body),  cmocka_unit_test(test_path_safety),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

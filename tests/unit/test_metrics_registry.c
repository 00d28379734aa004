/*
 * test_metrics_registry.c - unit tests for metrics/registry.c: family validation,
 * series lookup, the recording operations, histogram bucket maths and the merge of
 * one label set across shards (read back with metrics_value() or the exposition).
 *
 * Single-threaded; test_metrics_concurrency.c covers recording during scrapes.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metrics/metrics.h"

/* Enough series to double the shard's index several times. */
#define MANY_SERIES 5000

static const double BUCKETS[] = {0.005, 0.01, 1, 2.5};
#define BUCKET_COUNT (sizeof BUCKETS / sizeof BUCKETS[0])

static const char *const ROUTE_LABEL[] = {"route"};

static metrics_family_t *register_plain(metrics_registry_t *reg, const char *name, metrics_type type)
{
    return metrics_family_register(reg, name, "help", type, METRICS_MERGE_SUM, 0, NULL, NULL, 0);
}

static void test_registry_rejects_bad_buckets(void **state)
{
    const double decreasing[] = {1, 0.5};
    const double equal[] = {1, 1};
    const double with_nan[] = {1, NAN};
    const double inf_first[] = {-INFINITY, 1};
    const double inf_last[] = {0.5, 1, INFINITY};

    assert_null(metrics_registry_create(decreasing, 2));
    assert_null(metrics_registry_create(equal, 2));
    assert_null(metrics_registry_create(with_nan, 2));
    assert_null(metrics_registry_create(inf_first, 2));
    assert_null(metrics_registry_create(NULL, 3));

    /* A trailing +Inf is the implicit one said out loud: accepted. */
    metrics_registry_t *reg = metrics_registry_create(inf_last, 3);
    assert_non_null(reg);
    metrics_registry_free(reg);
    /* No finite bucket at all: only +Inf. */
    reg = metrics_registry_create(NULL, 0);
    assert_non_null(reg);
    metrics_registry_free(reg);
    metrics_registry_free(NULL);
}

static void test_family_register_validates(void **state)
{
    metrics_registry_t *reg = metrics_registry_create(BUCKETS, BUCKET_COUNT);
    assert_non_null(reg);
    const char *const five[] = {"a", "b", "c", "d", "e"};
    const char *const dup[] = {"a", "a"};
    const char *const le[] = {"le"};
    const char *const reserved[] = {"__name"};
    const char *const digit[] = {"1a"};
    const double bad[] = {2, 1};

    assert_null(register_plain(reg, "", METRICS_COUNTER));
    assert_null(register_plain(reg, "9lives", METRICS_COUNTER));
    assert_null(register_plain(reg, "has-dash", METRICS_COUNTER));
    assert_null(register_plain(reg, NULL, METRICS_COUNTER));
    assert_null(metrics_family_register(reg, "x", "h", (metrics_type)7, METRICS_MERGE_SUM, 0, NULL, NULL, 0));
    assert_null(metrics_family_register(reg, "x", "h", METRICS_GAUGE, (metrics_merge)7, 0, NULL, NULL, 0));
    assert_null(metrics_family_register(reg, "x", "h", METRICS_COUNTER, METRICS_MERGE_SUM, 5, five, NULL, 0));
    assert_null(metrics_family_register(reg, "x", "h", METRICS_COUNTER, METRICS_MERGE_SUM, 2, dup, NULL, 0));
    assert_null(metrics_family_register(reg, "x", "h", METRICS_HISTOGRAM, METRICS_MERGE_SUM, 1, le, NULL, 0));
    assert_null(
        metrics_family_register(reg, "x", "h", METRICS_COUNTER, METRICS_MERGE_SUM, 1, reserved, NULL, 0));
    assert_null(
        metrics_family_register(reg, "x", "h", METRICS_COUNTER, METRICS_MERGE_SUM, 1, digit, NULL, 0));
    assert_null(metrics_family_register(reg, "x", "h", METRICS_COUNTER, METRICS_MERGE_SUM, 1, NULL, NULL, 0));
    assert_null(
        metrics_family_register(reg, "x", "h", METRICS_HISTOGRAM, METRICS_MERGE_SUM, 0, NULL, bad, 2));

    /* "le" is an ordinary label outside histograms; colons are fine in names. */
    assert_non_null(
        metrics_family_register(reg, "x", "h", METRICS_COUNTER, METRICS_MERGE_SUM, 1, le, NULL, 0));
    assert_non_null(register_plain(reg, "ns:sub_total", METRICS_COUNTER));

    /* Names must not collide, histograms' _bucket/_sum/_count included. */
    assert_non_null(register_plain(reg, "latency", METRICS_HISTOGRAM));
    assert_null(register_plain(reg, "x", METRICS_GAUGE));
    assert_null(register_plain(reg, "latency", METRICS_GAUGE));
    assert_null(register_plain(reg, "latency_count", METRICS_COUNTER));
    assert_null(register_plain(reg, "latency_bucket", METRICS_GAUGE));
    assert_non_null(register_plain(reg, "latency_counts", METRICS_GAUGE));
    assert_non_null(register_plain(reg, "wait_sum", METRICS_GAUGE));
    assert_null(register_plain(reg, "wait", METRICS_HISTOGRAM));

    /* NULL help is empty help. */
    assert_non_null(
        metrics_family_register(reg, "quiet", NULL, METRICS_GAUGE, METRICS_MERGE_SUM, 0, NULL, NULL, 0));
    metrics_registry_free(reg);
}

static void test_series_lookup_identity(void **state)
{
    metrics_registry_t *reg = metrics_registry_create(NULL, 0);
    const char *const labels[] = {"route", "code"};
    metrics_family_t *a =
        metrics_family_register(reg, "a_total", "h", METRICS_COUNTER, METRICS_MERGE_SUM, 2, labels, NULL, 0);
    metrics_family_t *b =
        metrics_family_register(reg, "b_total", "h", METRICS_COUNTER, METRICS_MERGE_SUM, 2, labels, NULL, 0);
    metrics_shard_t *shard = metrics_shard_create(reg);
    assert_non_null(shard);

    const char *const users_200[] = {"users", "200"};
    char route[] = "users", code[] = "200";
    const char *const users_200_copy[] = {route, code};
    const char *const users_500[] = {"users", "500"};
    /* Values are compared whole: "ab"+"c" must not equal "a"+"bc". */
    const char *const ab_c[] = {"ab", "c"};
    const char *const a_bc[] = {"a", "bc"};
    const char *const empty_null[] = {"", NULL};
    const char *const empty_empty[] = {"", ""};

    metrics_series_t *s = metrics_series(shard, a, users_200);
    assert_non_null(s);
    assert_ptr_equal(s, metrics_series(shard, a, users_200_copy));
    /* The labels were copied: changing the caller's buffer changes nothing. */
    route[0] = 'X';
    assert_ptr_equal(s, metrics_series(shard, a, users_200));
    assert_ptr_not_equal(s, metrics_series(shard, a, users_500));
    assert_ptr_not_equal(s, metrics_series(shard, b, users_200));
    assert_ptr_not_equal(metrics_series(shard, a, ab_c), metrics_series(shard, a, a_bc));
    assert_ptr_equal(metrics_series(shard, a, empty_null), metrics_series(shard, a, empty_empty));
    assert_ptr_equal(metrics_series(shard, a, NULL), metrics_series(shard, a, empty_empty));

    metrics_counter_add(s, 1);
    assert_true(metrics_value(reg, a, users_200) == 1.0);
    assert_true(metrics_value(reg, b, users_200) == 0.0);
    metrics_registry_free(reg);
}

static void test_many_series_keep_their_identity(void **state)
{
    metrics_registry_t *reg = metrics_registry_create(NULL, 0);
    metrics_family_t *f = metrics_family_register(reg, "items_total", "h", METRICS_COUNTER, METRICS_MERGE_SUM,
                                                  1, ROUTE_LABEL, NULL, 0);
    metrics_shard_t *shard = metrics_shard_create(reg);
    metrics_series_t **made = calloc(MANY_SERIES, sizeof *made);
    assert_non_null(made);
    char name[32];
    const char *const values[] = {name};

    for (int i = 0; i < MANY_SERIES; i++) {
        snprintf(name, sizeof name, "r%d", i);
        made[i] = metrics_series(shard, f, values);
        assert_non_null(made[i]);
        metrics_counter_add(made[i], (uint64_t)i);
    }
    for (int i = 0; i < MANY_SERIES; i++) {
        snprintf(name, sizeof name, "r%d", i);
        assert_ptr_equal(made[i], metrics_series(shard, f, values));
        assert_true(metrics_value(reg, f, values) == (double)i);
    }
    free(made);
    metrics_registry_free(reg);
}

static void test_counter_and_gauge_operations(void **state)
{
    metrics_registry_t *reg = metrics_registry_create(NULL, 0);
    metrics_family_t *c = register_plain(reg, "c_total", METRICS_COUNTER);
    metrics_family_t *g = register_plain(reg, "g", METRICS_GAUGE);
    metrics_shard_t *shard = metrics_shard_create(reg);
    metrics_series_t *cs = metrics_series(shard, c, NULL);
    metrics_series_t *gs = metrics_series(shard, g, NULL);

    assert_true(metrics_value(reg, c, NULL) == 0.0);
    metrics_counter_add(cs, 1);
    metrics_counter_add(cs, 41);
    metrics_counter_add(cs, 0);
    assert_true(metrics_value(reg, c, NULL) == 42.0);

    assert_true(metrics_value(reg, g, NULL) == 0.0);
    metrics_gauge_add(gs, 1.5);
    metrics_gauge_add(gs, -4);
    assert_true(metrics_value(reg, g, NULL) == -2.5);
    metrics_gauge_set(gs, 1e300);
    assert_true(metrics_value(reg, g, NULL) == 1e300);
    metrics_gauge_set(gs, -0.25);
    metrics_gauge_add(gs, 0.125);
    assert_true(metrics_value(reg, g, NULL) == -0.125);
    metrics_registry_free(reg);
}

/* The one histogram of a registry, rendered. Caller frees. */
static char *render(metrics_registry_t *reg)
{
    size_t len = 0;
    char *text = metrics_render(reg, &len);
    assert_non_null(text);
    assert_int_equal(len, strlen(text));
    return text;
}

static void test_histogram_le_is_inclusive(void **state)
{
    metrics_registry_t *reg = metrics_registry_create(BUCKETS, BUCKET_COUNT);
    metrics_family_t *h = metrics_family_register(reg, "h_seconds", "Latency.", METRICS_HISTOGRAM,
                                                  METRICS_MERGE_SUM, 0, NULL, NULL, 0);
    metrics_shard_t *shard = metrics_shard_create(reg);
    metrics_series_t *s = metrics_series(shard, h, NULL);

    metrics_histogram_observe(s, 0.005);  /* == first bound: le="0.005" */
    metrics_histogram_observe(s, -3);     /* below everything: first bucket */
    metrics_histogram_observe(s, 0.0051); /* just above: le="0.01" */
    metrics_histogram_observe(s, 0.01);   /* == bound */
    metrics_histogram_observe(s, 1);      /* == bound */
    metrics_histogram_observe(s, 2.5);    /* == last bound, not +Inf */
    metrics_histogram_observe(s, 2.5000001);
    metrics_histogram_observe(s, 1000);
    metrics_histogram_observe(s, NAN); /* dropped: would poison _sum */

    char *text = render(reg);
    assert_string_equal(text, "# HELP h_seconds Latency.\n"
                              "# TYPE h_seconds histogram\n"
                              "h_seconds_bucket{le=\"0.005\"} 2\n"
                              "h_seconds_bucket{le=\"0.01\"} 4\n"
                              "h_seconds_bucket{le=\"1\"} 5\n"
                              "h_seconds_bucket{le=\"2.5\"} 6\n"
                              "h_seconds_bucket{le=\"+Inf\"} 8\n"
                              "h_seconds_sum 1003.0201001\n"
                              "h_seconds_count 8\n");
    assert_true(metrics_value(reg, h, NULL) == 8.0);
    free(text);
    metrics_registry_free(reg);
}

static void test_histogram_own_buckets_and_only_inf(void **state)
{
    const double own[] = {10, 20};
    metrics_registry_t *reg = metrics_registry_create(BUCKETS, BUCKET_COUNT);
    metrics_family_t *own_h = metrics_family_register(reg, "a_bytes", "Sizes.", METRICS_HISTOGRAM,
                                                      METRICS_MERGE_SUM, 1, ROUTE_LABEL, own, 2);
    const double only_inf[] = {INFINITY};
    metrics_family_t *inf_h = metrics_family_register(reg, "b_bytes", "Sizes.", METRICS_HISTOGRAM,
                                                      METRICS_MERGE_SUM, 0, NULL, only_inf, 1);
    assert_non_null(own_h);
    assert_non_null(inf_h);
    metrics_shard_t *shard = metrics_shard_create(reg);
    const char *const route[] = {"x"};
    metrics_series_t *s = metrics_series(shard, own_h, route);
    metrics_histogram_observe(s, 10);
    metrics_histogram_observe(s, 15);
    metrics_histogram_observe(s, 25);
    metrics_series_t *t = metrics_series(shard, inf_h, NULL);
    metrics_histogram_observe(t, 1);
    metrics_histogram_observe(t, INFINITY);

    char *text = render(reg);
    assert_string_equal(text, "# HELP a_bytes Sizes.\n"
                              "# TYPE a_bytes histogram\n"
                              "a_bytes_bucket{route=\"x\",le=\"10\"} 1\n"
                              "a_bytes_bucket{route=\"x\",le=\"20\"} 2\n"
                              "a_bytes_bucket{route=\"x\",le=\"+Inf\"} 3\n"
                              "a_bytes_sum{route=\"x\"} 50\n"
                              "a_bytes_count{route=\"x\"} 3\n"
                              "# HELP b_bytes Sizes.\n"
                              "# TYPE b_bytes histogram\n"
                              "b_bytes_bucket{le=\"+Inf\"} 2\n"
                              "b_bytes_sum +Inf\n"
                              "b_bytes_count 2\n");
    free(text);
    metrics_registry_free(reg);
}

static void test_merge_across_shards(void **state)
{
    metrics_registry_t *reg = metrics_registry_create(BUCKETS, BUCKET_COUNT);
    metrics_family_t *sum =
        metrics_family_register(reg, "g_sum", "h", METRICS_GAUGE, METRICS_MERGE_SUM, 1, ROUTE_LABEL, NULL, 0);
    metrics_family_t *max =
        metrics_family_register(reg, "g_max", "h", METRICS_GAUGE, METRICS_MERGE_MAX, 1, ROUTE_LABEL, NULL, 0);
    metrics_family_t *min =
        metrics_family_register(reg, "g_min", "h", METRICS_GAUGE, METRICS_MERGE_MIN, 1, ROUTE_LABEL, NULL, 0);
    /* A merge mode on a counter is ignored: counters always sum. */
    metrics_family_t *count = metrics_family_register(reg, "c_total", "h", METRICS_COUNTER, METRICS_MERGE_MAX,
                                                      1, ROUTE_LABEL, NULL, 0);
    metrics_family_t *hist =
        metrics_family_register(reg, "h", "h", METRICS_HISTOGRAM, METRICS_MERGE_MIN, 1, ROUTE_LABEL, NULL, 0);
    metrics_shard_t *shards[3];
    for (int i = 0; i < 3; i++)
        shards[i] = metrics_shard_create(reg);
    const char *const x[] = {"x"}, *const y[] = {"y"}, *const absent[] = {"nobody"};
    const double values[] = {3, 7, -2};
    for (int i = 0; i < 3; i++) {
        metrics_gauge_set(metrics_series(shards[i], sum, x), values[i]);
        metrics_gauge_set(metrics_series(shards[i], max, x), values[i]);
        metrics_gauge_set(metrics_series(shards[i], min, x), values[i]);
        metrics_counter_add(metrics_series(shards[i], count, x), (uint64_t)(i + 1) * 10);
        metrics_histogram_observe(metrics_series(shards[i], hist, x), values[i]);
    }
    /* Only shards that have the series take part: an absent one is not a 0. */
    metrics_gauge_set(metrics_series(shards[0], max, y), -5);
    metrics_gauge_set(metrics_series(shards[1], max, y), -3);
    metrics_gauge_set(metrics_series(shards[1], min, y), 4);
    metrics_gauge_set(metrics_series(shards[2], min, y), 9);

    assert_true(metrics_value(reg, sum, x) == 8.0);
    assert_true(metrics_value(reg, max, x) == 7.0);
    assert_true(metrics_value(reg, min, x) == -2.0);
    assert_true(metrics_value(reg, max, y) == -3.0);
    assert_true(metrics_value(reg, min, y) == 4.0);
    assert_true(metrics_value(reg, count, x) == 60.0);
    assert_true(metrics_value(reg, hist, x) == 3.0);
    assert_true(metrics_value(reg, sum, absent) == 0.0);
    assert_true(metrics_value(reg, NULL, x) == 0.0);

    char *text = render(reg);
    assert_string_equal(text, "# HELP c_total h\n"
                              "# TYPE c_total counter\n"
                              "c_total{route=\"x\"} 60\n"
                              "# HELP g_max h\n"
                              "# TYPE g_max gauge\n"
                              "g_max{route=\"x\"} 7\n"
                              "g_max{route=\"y\"} -3\n"
                              "# HELP g_min h\n"
                              "# TYPE g_min gauge\n"
                              "g_min{route=\"x\"} -2\n"
                              "g_min{route=\"y\"} 4\n"
                              "# HELP g_sum h\n"
                              "# TYPE g_sum gauge\n"
                              "g_sum{route=\"x\"} 8\n"
                              "# HELP h h\n"
                              "# TYPE h histogram\n"
                              "h_bucket{route=\"x\",le=\"0.005\"} 1\n"
                              "h_bucket{route=\"x\",le=\"0.01\"} 1\n"
                              "h_bucket{route=\"x\",le=\"1\"} 1\n"
                              "h_bucket{route=\"x\",le=\"2.5\"} 1\n"
                              "h_bucket{route=\"x\",le=\"+Inf\"} 3\n"
                              "h_sum{route=\"x\"} 8\n"
                              "h_count{route=\"x\"} 3\n");
    free(text);
    metrics_registry_free(reg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_registry_rejects_bad_buckets),
        cmocka_unit_test(test_family_register_validates),
        cmocka_unit_test(test_series_lookup_identity),
        cmocka_unit_test(test_many_series_keep_their_identity),
        cmocka_unit_test(test_counter_and_gauge_operations),
        cmocka_unit_test(test_histogram_le_is_inclusive),
        cmocka_unit_test(test_histogram_own_buckets_and_only_inf),
        cmocka_unit_test(test_merge_across_shards),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

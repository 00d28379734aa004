/*
 * test_metrics_render.c - unit tests for metrics/render.c: the exact exposition
 * text (golden strings) for counters, gauges and histograms, escaping of HELP and
 * label values, sorting of families and series, the merge of equal label sets
 * from different shards into one line, number formatting, collectors, and one
 * rendered sample checked by `promtool check metrics` when promtool is installed.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "metrics/metrics.h"

#define PROMTOOL_PATH "/usr/bin/promtool"
/* The shell's exit status when it could not run the command. */
#define PROMTOOL_NOT_RUN 127

static const double BUCKETS[] = {0.005, 0.125, 0.5, 1};
#define BUCKET_COUNT (sizeof BUCKETS / sizeof BUCKETS[0])

static char *render(metrics_registry_t *reg)
{
    size_t len = 0;
    char *text = metrics_render(reg, &len);
    assert_non_null(text);
    assert_int_equal(len, strlen(text));
    return text;
}

static void append_text(metrics_append_fn append, void *out, const char *text)
{
    append(out, text, strlen(text));
}

static void collector_z(void *arg, metrics_append_fn append, void *out)
{
    int *calls = arg;
    (*calls)++;
    append_text(append, out, "# HELP z_extra Registered first.\n# TYPE z_extra gauge\nz_extra 1\n");
}

static void collector_a(void *arg, metrics_append_fn append, void *out)
{
    append_text(append, out, "# HELP a_extra Registered second.\n# TYPE a_extra gauge\na_extra 2\n");
}

/* The registry of the golden test: what the gateway's own families look like,
 * spread over two shards, with a label value and a HELP text that need escaping. */
static metrics_registry_t *golden_registry(int *collector_calls)
{
    metrics_registry_t *reg = metrics_registry_create(BUCKETS, BUCKET_COUNT);
    assert_non_null(reg);
    const char *const request_labels[] = {"route", "method", "code"};
    const char *const route_label[] = {"route"};
    /* Registered out of name order on purpose. */
    metrics_family_t *requests =
        metrics_family_register(reg, "http_requests_total", "Requests handled, by route, method and status.",
                                METRICS_COUNTER, METRICS_MERGE_SUM, 3, request_labels, NULL, 0);
    metrics_family_t *in_flight =
        metrics_family_register(reg, "http_requests_in_flight", "Requests being served.", METRICS_GAUGE,
                                METRICS_MERGE_SUM, 0, NULL, NULL, 0);
    metrics_family_t *duration =
        metrics_family_register(reg, "http_request_duration_seconds",
                                "Time from request to response.\nIn seconds, \\ and \"quotes\".",
                                METRICS_HISTOGRAM, METRICS_MERGE_SUM, 1, route_label, NULL, 0);
    metrics_family_t *unused =
        metrics_family_register(reg, "gateway_cache_store_errors_total", "Cache writes that failed.",
                                METRICS_COUNTER, METRICS_MERGE_SUM, 0, NULL, NULL, 0);
    assert_non_null(requests);
    assert_non_null(in_flight);
    assert_non_null(duration);
    assert_non_null(unused);
    metrics_collector_register(reg, collector_z, collector_calls);
    metrics_collector_register(reg, collector_a, NULL);

    metrics_shard_t *a = metrics_shard_create(reg);
    metrics_shard_t *b = metrics_shard_create(reg);
    const char *const users_get_200[] = {"users", "GET", "200"};
    const char *const api_get_404[] = {"api", "GET", "404"};
    const char *const hostile_post_500[] = {"say \"hi\"\\now\n", "POST", "500"};
    const char *const users[] = {"users"};

    metrics_counter_add(metrics_series(a, requests, users_get_200), 3);
    metrics_counter_add(metrics_series(a, requests, hostile_post_500), 1);
    metrics_counter_add(metrics_series(b, requests, users_get_200), 2);
    metrics_counter_add(metrics_series(b, requests, api_get_404), 7);
    metrics_gauge_add(metrics_series(a, in_flight, NULL), 2);
    metrics_gauge_add(metrics_series(b, in_flight, NULL), 1);
    metrics_series_t *da = metrics_series(a, duration, users);
    metrics_series_t *db = metrics_series(b, duration, users);
    metrics_histogram_observe(da, 0.125);
    metrics_histogram_observe(da, 0.25);
    metrics_histogram_observe(db, 2);
    metrics_histogram_observe(db, 0.5);
    return reg;
}

static const char GOLDEN[] =
    "# HELP gateway_cache_store_errors_total Cache writes that failed.\n"
    "# TYPE gateway_cache_store_errors_total counter\n"
    "# HELP http_request_duration_seconds Time from request to response.\\nIn seconds, \\\\ and \"quotes\".\n"
    "# TYPE http_request_duration_seconds histogram\n"
    "http_request_duration_seconds_bucket{route=\"users\",le=\"0.005\"} 0\n"
    "http_request_duration_seconds_bucket{route=\"users\",le=\"0.125\"} 1\n"
    "http_request_duration_seconds_bucket{route=\"users\",le=\"0.5\"} 3\n"
    "http_request_duration_seconds_bucket{route=\"users\",le=\"1\"} 3\n"
    "http_request_duration_seconds_bucket{route=\"users\",le=\"+Inf\"} 4\n"
    "http_request_duration_seconds_sum{route=\"users\"} 2.875\n"
    "http_request_duration_seconds_count{route=\"users\"} 4\n"
    "# HELP http_requests_in_flight Requests being served.\n"
    "# TYPE http_requests_in_flight gauge\n"
    "http_requests_in_flight 3\n"
    "# HELP http_requests_total Requests handled, by route, method and status.\n"
    "# TYPE http_requests_total counter\n"
    "http_requests_total{route=\"api\",method=\"GET\",code=\"404\"} 7\n"
    "http_requests_total{route=\"say \\\"hi\\\"\\\\now\\n\",method=\"POST\",code=\"500\"} 1\n"
    "http_requests_total{route=\"users\",method=\"GET\",code=\"200\"} 5\n"
    "# HELP z_extra Registered first.\n# TYPE z_extra gauge\nz_extra 1\n"
    "# HELP a_extra Registered second.\n# TYPE a_extra gauge\na_extra 2\n";

static void test_golden_exposition(void **state)
{
    int calls = 0;
    metrics_registry_t *reg = golden_registry(&calls);
    char *text = render(reg);
    assert_string_equal(text, GOLDEN);
    assert_int_equal(calls, 1);
    free(text);
    /* Rendering reads, never resets: the second scrape is the same text. */
    text = render(reg);
    assert_string_equal(text, GOLDEN);
    assert_int_equal(calls, 2);
    free(text);
    metrics_registry_free(reg);
}

static void test_empty_registry_and_empty_help(void **state)
{
    metrics_registry_t *reg = metrics_registry_create(NULL, 0);
    size_t len = 99;
    char *text = metrics_render(reg, &len);
    assert_non_null(text);
    assert_string_equal(text, "");
    assert_int_equal(len, 0);
    free(text);

    metrics_family_t *quiet =
        metrics_family_register(reg, "quiet", "", METRICS_GAUGE, METRICS_MERGE_SUM, 0, NULL, NULL, 0);
    metrics_gauge_set(metrics_series(metrics_shard_create(reg), quiet, NULL), 1);
    text = render(reg);
    assert_string_equal(text, "# TYPE quiet gauge\nquiet 1\n");
    free(text);
    /* len may be NULL. */
    text = metrics_render(reg, NULL);
    assert_non_null(text);
    free(text);
    assert_null(metrics_render(NULL, &len));
    metrics_registry_free(reg);
}

static void test_series_sorted_by_label_values(void **state)
{
    metrics_registry_t *reg = metrics_registry_create(NULL, 0);
    const char *const labels[] = {"a", "b"};
    metrics_family_t *f = metrics_family_register(reg, "s_total", "Sorted.", METRICS_COUNTER,
                                                  METRICS_MERGE_SUM, 2, labels, NULL, 0);
    metrics_shard_t *one = metrics_shard_create(reg);
    metrics_shard_t *two = metrics_shard_create(reg);
    const char *const order[][2] = {{"b", "1"}, {"a", "2"}, {"", "z"}, {"a", "10"}, {"B", "0"}, {"a", "1"}};
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++) {
        metrics_counter_add(metrics_series(i % 2 ? one : two, f, order[i]), i + 1);
        /* Every label set also exists, with 100 more, in the other shard. */
        metrics_counter_add(metrics_series(i % 2 ? two : one, f, order[i]), 100);
    }
    char *text = render(reg);
    assert_string_equal(text, "# HELP s_total Sorted.\n"
                              "# TYPE s_total counter\n"
                              "s_total{a=\"\",b=\"z\"} 103\n"
                              "s_total{a=\"B\",b=\"0\"} 105\n"
                              "s_total{a=\"a\",b=\"1\"} 106\n"
                              "s_total{a=\"a\",b=\"10\"} 104\n"
                              "s_total{a=\"a\",b=\"2\"} 102\n"
                              "s_total{a=\"b\",b=\"1\"} 101\n");
    free(text);
    metrics_registry_free(reg);
}

static void test_number_formats(void **state)
{
    metrics_registry_t *reg = metrics_registry_create(NULL, 0);
    const char *const label[] = {"case"};
    metrics_family_t *g =
        metrics_family_register(reg, "n", "Numbers.", METRICS_GAUGE, METRICS_MERGE_SUM, 1, label, NULL, 0);
    metrics_family_t *c = metrics_family_register(reg, "big_total", "Big.", METRICS_COUNTER,
                                                  METRICS_MERGE_SUM, 0, NULL, NULL, 0);
    metrics_shard_t *shard = metrics_shard_create(reg);
    const struct {
        const char *name;
        double value;
    } cases[] = {
        {"a_int", 42},        {"b_tenth", 0.1},
        {"c_third", 1.0 / 3}, {"d_sum", 0.1 + 0.2},
        {"e_big", 1e21},      {"f_2p53", 9007199254740992.0},
        {"g_tiny", 1e-9},     {"h_negzero", -0.0},
        {"i_inf", INFINITY},  {"j_neginf", -INFINITY},
        {"k_nan", NAN},       {"l_decimal", 123456.789},
        {"m_negative", -2.5}, {"n_max", 1.7976931348623157e308},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *const value[] = {cases[i].name};
        metrics_gauge_set(metrics_series(shard, g, value), cases[i].value);
    }
    metrics_counter_add(metrics_series(shard, c, NULL), UINT64_MAX);

    char *text = render(reg);
    assert_string_equal(text, "# HELP big_total Big.\n"
                              "# TYPE big_total counter\n"
                              "big_total 18446744073709551615\n"
                              "# HELP n Numbers.\n"
                              "# TYPE n gauge\n"
                              "n{case=\"a_int\"} 42\n"
                              "n{case=\"b_tenth\"} 0.1\n"
                              "n{case=\"c_third\"} 0.3333333333333333\n"
                              "n{case=\"d_sum\"} 0.30000000000000004\n"
                              "n{case=\"e_big\"} 1e+21\n"
                              "n{case=\"f_2p53\"} 9007199254740992\n"
                              "n{case=\"g_tiny\"} 1e-09\n"
                              "n{case=\"h_negzero\"} -0\n"
                              "n{case=\"i_inf\"} +Inf\n"
                              "n{case=\"j_neginf\"} -Inf\n"
                              "n{case=\"k_nan\"} NaN\n"
                              "n{case=\"l_decimal\"} 123456.789\n"
                              "n{case=\"m_negative\"} -2.5\n"
                              "n{case=\"n_max\"} 1.7976931348623157e+308\n");
    free(text);
    metrics_registry_free(reg);
}

/* Feed text to `promtool check metrics` on its stdin; returns its exit status.
 * Its complaints go to stderr unless quiet. */
static int promtool_check(const char *text, bool quiet)
{
    FILE *p = popen(quiet ? PROMTOOL_PATH " check metrics 2>/dev/null" : PROMTOOL_PATH " check metrics", "w");
    assert_non_null(p);
    size_t len = strlen(text);
    size_t written = fwrite(text, 1, len, p);
    int status = pclose(p);
    assert_int_equal(written, len);
    assert_true(WIFEXITED(status));
    return WEXITSTATUS(status);
}

static void test_promtool_accepts_the_exposition(void **state)
{
    if (access(PROMTOOL_PATH, X_OK) != 0) {
        print_message("promtool not installed at %s: skipped\n", PROMTOOL_PATH);
        skip();
    }
    signal(SIGPIPE, SIG_IGN); /* a promtool that quits early must fail the test, not kill it */

    int calls = 0;
    metrics_registry_t *reg = golden_registry(&calls);
    const char *const state_label[] = {"database", "state"};
    metrics_family_t *pool =
        metrics_family_register(reg, "gateway_pool_server_connections", "Server connections.", METRICS_GAUGE,
                                METRICS_MERGE_MAX, 2, state_label, NULL, 0);
    const char *const db_active[] = {"app", "active"};
    metrics_gauge_set(metrics_series(metrics_shard_create(reg), pool, db_active), 12);
    metrics_collector_register(reg, metrics_process_collector, NULL);
    char *text = render(reg);
    assert_int_equal(promtool_check(text, false), 0);
    free(text);
    metrics_registry_free(reg);

    /* The check can fail: a counter without _total and without help is linted. */
    int rc = promtool_check("# TYPE requests counter\nrequests 1\n", true);
    assert_int_not_equal(rc, 0);
    assert_int_not_equal(rc, PROMTOOL_NOT_RUN);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_golden_exposition),
        cmocka_unit_test(test_empty_registry_and_empty_help),
        cmocka_unit_test(test_series_sorted_by_label_values),
        cmocka_unit_test(test_number_formats),
        cmocka_unit_test(test_promtool_accepts_the_exposition),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

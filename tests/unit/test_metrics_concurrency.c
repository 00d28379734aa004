/*
 * test_metrics_concurrency.c - recording on several threads while another scrapes.
 *
 * WRITERS threads each create their own shard (at the same time, to exercise the
 * shard list) and record INCREMENTS counter increments into one label set shared by
 * all of them, plus a gauge, a histogram and a stream of new series created while
 * the main thread renders and reads values in a loop. Every scrape must be sane
 * (totals never go backwards and never exceed what will be recorded) and, once the
 * writers are joined, every total must be exact. Built with -fsanitize=thread this
 * test is the data-race check of the module.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metrics/metrics.h"

#define WRITERS 4
#define INCREMENTS 1000000
/* A new series every this many increments, so series appear during scrapes. */
#define NEW_SERIES_EVERY 1000
#define SERIES_PER_WRITER (INCREMENTS / NEW_SERIES_EVERY)
/* One histogram observation every this many increments. */
#define OBSERVE_EVERY 10

static const double BUCKETS[] = {1, 10, 100};
#define BUCKET_COUNT (sizeof BUCKETS / sizeof BUCKETS[0])

typedef struct {
    metrics_registry_t *reg;
    metrics_family_t *requests;
    metrics_family_t *spread;
    metrics_family_t *in_flight;
    metrics_family_t *latency;
    atomic_int running;
} fixture;

typedef struct {
    fixture *fx;
    int id;
    bool ok;
} writer_arg;

static const char *const SHARED_LABELS[] = {"users", "GET", "200"};
#define SHARED_LINE "http_requests_total{route=\"users\",method=\"GET\",code=\"200\"} "

static void *writer_main(void *p)
{
    writer_arg *w = p;
    fixture *fx = w->fx;
    metrics_shard_t *shard = metrics_shard_create(fx->reg);
    metrics_series_t *shared = shard ? metrics_series(shard, fx->requests, SHARED_LABELS) : NULL;
    metrics_series_t *gauge = shard ? metrics_series(shard, fx->in_flight, NULL) : NULL;
    metrics_series_t *latency = shard ? metrics_series(shard, fx->latency, NULL) : NULL;
    metrics_series_t *spread = NULL;
    char name[32];
    const char *const spread_labels[] = {name};

    w->ok = shared && gauge && latency;
    for (int i = 0; w->ok && i < INCREMENTS; i++) {
        if (i % NEW_SERIES_EVERY == 0) {
            snprintf(name, sizeof name, "w%d-%d", w->id, i / NEW_SERIES_EVERY);
            spread = metrics_series(shard, fx->spread, spread_labels);
            w->ok = spread != NULL;
            if (!spread)
                break;
        }
        metrics_counter_add(shared, 1);
        metrics_counter_add(spread, 1);
        metrics_gauge_add(gauge, 1);
        if (i % OBSERVE_EVERY == 0)
            metrics_histogram_observe(latency, (double)(i % 200));
        metrics_gauge_add(gauge, i % 2 ? 0 : -1); /* ends at +INCREMENTS/2 */
    }
    atomic_fetch_sub(&fx->running, 1);
    return NULL;
}

/* The value on the line that starts with `prefix`; -1 when there is none. */
static double line_value(const char *text, const char *prefix)
{
    size_t len = strlen(prefix);
    for (const char *line = text; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        if (strncmp(line, prefix, len) == 0)
            return strtod(line + len, NULL);
    }
    return -1;
}

static size_t count_lines_with(const char *text, const char *prefix)
{
    size_t n = 0, len = strlen(prefix);
    for (const char *line = text; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        if (strncmp(line, prefix, len) == 0)
            n++;
    }
    return n;
}

static void test_record_while_scraping(void **state)
{
    fixture fx = {0};
    fx.reg = metrics_registry_create(BUCKETS, BUCKET_COUNT);
    assert_non_null(fx.reg);
    const char *const request_labels[] = {"route", "method", "code"};
    const char *const spread_label[] = {"series"};
    fx.requests = metrics_family_register(fx.reg, "http_requests_total", "Requests.", METRICS_COUNTER,
                                          METRICS_MERGE_SUM, 3, request_labels, NULL, 0);
    fx.spread = metrics_family_register(fx.reg, "spread_total", "Series made while scraping.",
                                        METRICS_COUNTER, METRICS_MERGE_SUM, 1, spread_label, NULL, 0);
    fx.in_flight = metrics_family_register(fx.reg, "in_flight", "Gauge.", METRICS_GAUGE, METRICS_MERGE_SUM, 0,
                                           NULL, NULL, 0);
    fx.latency = metrics_family_register(fx.reg, "latency", "Histogram.", METRICS_HISTOGRAM,
                                         METRICS_MERGE_SUM, 0, NULL, NULL, 0);
    assert_non_null(fx.requests);
    assert_non_null(fx.spread);
    assert_non_null(fx.in_flight);
    assert_non_null(fx.latency);
    metrics_collector_register(fx.reg, metrics_process_collector, NULL);

    pthread_t threads[WRITERS];
    writer_arg args[WRITERS];
    atomic_store(&fx.running, WRITERS);
    for (int i = 0; i < WRITERS; i++) {
        args[i] = (writer_arg){.fx = &fx, .id = i};
        assert_int_equal(pthread_create(&threads[i], NULL, writer_main, &args[i]), 0);
    }

    const double final_total = (double)WRITERS * INCREMENTS;
    double last = 0;
    size_t scrapes = 0, partial_scrapes = 0;
    do {
        char *text = metrics_render(fx.reg, NULL);
        assert_non_null(text);
        double now = line_value(text, SHARED_LINE);
        /* A series not yet created has no line; once there it only grows. */
        if (now >= 0) {
            assert_true(now >= last);
            assert_true(now <= final_total);
            last = now;
            if (now < final_total)
                partial_scrapes++;
        }
        double count = line_value(text, "latency_count ");
        double inf = line_value(text, "latency_bucket{le=\"+Inf\"} ");
        assert_true(count == inf);
        free(text);
        double value = metrics_value(fx.reg, fx.requests, SHARED_LABELS);
        assert_true(value >= last && value <= final_total);
        scrapes++;
    } while (atomic_load(&fx.running) > 0);

    for (int i = 0; i < WRITERS; i++) {
        assert_int_equal(pthread_join(threads[i], NULL), 0);
        assert_true(args[i].ok);
    }

    char *text = metrics_render(fx.reg, NULL);
    assert_non_null(text);
    assert_true(line_value(text, SHARED_LINE) == final_total);
    assert_true(metrics_value(fx.reg, fx.requests, SHARED_LABELS) == final_total);
    assert_true(metrics_value(fx.reg, fx.in_flight, NULL) == (double)WRITERS * INCREMENTS / 2);
    assert_true(metrics_value(fx.reg, fx.latency, NULL) == (double)WRITERS * INCREMENTS / OBSERVE_EVERY);
    assert_true(line_value(text, "latency_count ") == (double)WRITERS * INCREMENTS / OBSERVE_EVERY);
    /* i % 200 over every 10th i: 0, 10, ..., 190 repeated; <= 1 is only 0 (5000 per writer). */
    assert_true(line_value(text, "latency_bucket{le=\"1\"} ") == (double)WRITERS * INCREMENTS / 200);
    assert_true(line_value(text, "latency_sum ") ==
                (double)WRITERS * (INCREMENTS / 200) * (0 + 190) * 20 / 2);
    /* Each spread series got exactly NEW_SERIES_EVERY increments, and none was lost. */
    assert_int_equal(count_lines_with(text, "spread_total{"), (size_t)WRITERS * SERIES_PER_WRITER);
    assert_int_equal(count_lines_with(text, "spread_total{series=\"w3-999\"} 1000\n"), 1);
    char name[32];
    const char *const spread_labels[] = {name};
    for (int w = 0; w < WRITERS; w++) {
        for (int s = 0; s < SERIES_PER_WRITER; s++) {
            snprintf(name, sizeof name, "w%d-%d", w, s);
            assert_true(metrics_value(fx.reg, fx.spread, spread_labels) == NEW_SERIES_EVERY);
        }
    }
    free(text);
    print_message("%zu scrapes during recording, %zu saw a partial total\n", scrapes, partial_scrapes);
    metrics_registry_free(fx.reg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_record_while_scraping),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

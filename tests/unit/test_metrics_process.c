/*
 * test_metrics_process.c - unit tests for metrics/process.c: the process_*
 * collector names its metrics with HELP and TYPE, and its values match what this
 * very process can check for itself (an fd it opens, CPU it burns, its rlimit, a
 * start time just before main()).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "metrics/metrics.h"

/* How long before main() the kernel may have started this process: exec, the
 * dynamic loader and sanitizer start-up take far less. */
#define PROCESS_START_SLACK_SECONDS 60
/* btime and time(NULL) are both truncated to whole seconds. */
#define CLOCK_ROUNDING_SECONDS 2
/* CPU time to burn before checking that process_cpu_seconds_total moved. */
#define BURN_CPU_SECONDS 0.2
/* The kernel counts CPU time in clock ticks; allow a generous share of slack. */
#define CPU_SECONDS_SLACK 0.1

typedef struct {
    char *data;
    size_t len;
} text_buf;

static void collect(void *out, const char *text, size_t len)
{
    text_buf *b = out;
    char *data = realloc(b->data, b->len + len + 1);
    assert_non_null(data);
    memcpy(data + b->len, text, len);
    b->data = data;
    b->len += len;
    b->data[b->len] = '\0';
}

/* The collector's text, called directly. Caller frees. */
static char *collect_process(void)
{
    text_buf b = {0};
    metrics_process_collector(NULL, collect, &b);
    assert_non_null(b.data);
    assert_int_equal(strlen(b.data), b.len);
    return b.data;
}

/* The sample of `name` (a line "name value"); fails the test when missing. */
static double sample(const char *text, const char *name)
{
    size_t len = strlen(name);
    for (const char *line = text; *line;) {
        if (strncmp(line, name, len) == 0 && line[len] == ' ')
            return strtod(line + len + 1, NULL);
        const char *nl = strchr(line, '\n');
        if (!nl)
            break;
        line = nl + 1;
    }
    fail_msg("no sample %s in:\n%s", name, text);
    return 0;
}

static void assert_declared(const char *text, const char *name, const char *type)
{
    char want[256];
    snprintf(want, sizeof want, "# HELP %s ", name);
    assert_non_null(strstr(text, want));
    snprintf(want, sizeof want, "\n# TYPE %s %s\n%s ", name, type, name);
    assert_non_null(strstr(text, want));
}

/* time(NULL) when main() began. */
static time_t main_started;

static void test_names_types_and_order(void **state)
{
    char *text = collect_process();
    static const char *const names[][2] = {
        {"process_cpu_seconds_total", "counter"},
        {"process_max_fds", "gauge"},
        {"process_open_fds", "gauge"},
        {"process_resident_memory_bytes", "gauge"},
        {"process_start_time_seconds", "gauge"},
        {"process_virtual_memory_bytes", "gauge"},
    };
    const char *previous = text;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        assert_declared(text, names[i][0], names[i][1]);
        /* In name order, each once. */
        char help[128];
        snprintf(help, sizeof help, "# HELP %s ", names[i][0]);
        const char *at = strstr(text, help);
        assert_true(at >= previous);
        assert_null(strstr(at + 1, help));
        previous = at;
    }
    /* Six metrics, three lines each, nothing else. */
    size_t lines = 0;
    for (const char *p = text; *p; p++)
        lines += *p == '\n';
    assert_int_equal(lines, 18);
    assert_int_equal(text[strlen(text) - 1], '\n');
    free(text);
}

static void test_open_fds_counts_exactly(void **state)
{
    char *before = collect_process();
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    assert_true(fd >= 0);
    char *during = collect_process();
    close(fd);
    char *after = collect_process();

    double open_before = sample(before, "process_open_fds");
    assert_true(open_before >= 1);
    assert_true(sample(during, "process_open_fds") == open_before + 1);
    assert_true(sample(after, "process_open_fds") == open_before);
    free(before);
    free(during);
    free(after);
}

static void test_limits_memory_and_start_time(void **state)
{
    char *text = collect_process();
    struct rlimit limit;
    assert_int_equal(getrlimit(RLIMIT_NOFILE, &limit), 0);
    if (limit.rlim_cur != RLIM_INFINITY)
        assert_true(sample(text, "process_max_fds") == (double)limit.rlim_cur);

    double resident = sample(text, "process_resident_memory_bytes");
    double virtual_bytes = sample(text, "process_virtual_memory_bytes");
    long page = sysconf(_SC_PAGESIZE);
    assert_true(resident >= (double)page);
    assert_true(virtual_bytes >= resident);
    assert_true(fmod(resident, (double)page) == 0);

    /* The kernel started us a moment before main() ran. */
    double start = sample(text, "process_start_time_seconds");
    assert_true(start <= (double)main_started + CLOCK_ROUNDING_SECONDS);
    assert_true(start >= (double)main_started - PROCESS_START_SLACK_SECONDS);
    free(text);
}

static double process_cpu_now(void)
{
    struct timespec ts;
    assert_int_equal(clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts), 0);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void test_cpu_seconds_follow_work(void **state)
{
    char *before = collect_process();
    double start = process_cpu_now();
    volatile uint64_t spin = 0;
    while (process_cpu_now() - start < BURN_CPU_SECONDS)
        spin++;
    char *after = collect_process();

    double cpu_before = sample(before, "process_cpu_seconds_total");
    double cpu_after = sample(after, "process_cpu_seconds_total");
    assert_true(cpu_before >= 0);
    assert_true(cpu_after - cpu_before >= BURN_CPU_SECONDS - CPU_SECONDS_SLACK);
    assert_true(cpu_after <= process_cpu_now() + CPU_SECONDS_SLACK);
    free(before);
    free(after);
}

static void test_collector_through_the_registry(void **state)
{
    metrics_registry_t *reg = metrics_registry_create(NULL, 0);
    metrics_family_t *g =
        metrics_family_register(reg, "aaa", "First.", METRICS_GAUGE, METRICS_MERGE_SUM, 0, NULL, NULL, 0);
    assert_non_null(g);
    metrics_collector_register(reg, metrics_process_collector, NULL);
    char *text = metrics_render(reg, NULL);
    assert_non_null(text);
    const char *head = "# HELP aaa First.\n# TYPE aaa gauge\n# HELP process_cpu_seconds_total ";
    assert_memory_equal(text, head, strlen(head));
    assert_true(sample(text, "process_open_fds") >= 1);
    free(text);
    metrics_registry_free(reg);
}

int main(void)
{
    main_started = time(NULL);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names_types_and_order),          cmocka_unit_test(test_open_fds_counts_exactly),
        cmocka_unit_test(test_limits_memory_and_start_time),   cmocka_unit_test(test_cpu_seconds_follow_work),
        cmocka_unit_test(test_collector_through_the_registry),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

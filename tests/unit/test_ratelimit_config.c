/*
 * test_ratelimit_config.c - the rate limiter's rules in config_load
 * (config/rules.c): a route takes at most CONFIG_ROUTE_POLICIES_MAX
 * policies (one store call takes them all), and a policy's limit may not
 * exceed its window counted in the store's unit (microseconds with store:
 * redis, nanoseconds with store: local), since its period window/limit is a
 * whole number of them. Each error is checked whole: place, key path, text.
 *
 * Single-threaded cmocka program; it writes YAML to temporary files.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "config/config.h"
#include "ratelimit/ratelimit.h"

/* Load text; returns the config (caller frees) and the errors with the file
 * name cut from each line in *errors (caller frees; NULL when none). */
static config_t *load_text(const char *text, char **errors)
{
    char path[] = "/tmp/gwrlcfg-XXXXXX.yaml";
    int fd = mkstemps(path, 5);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    char *raw = NULL;
    config_t *cfg = config_load(path, &raw);
    unlink(path);
    *errors = NULL;
    if (raw) {
        size_t n = strlen(path), len = strlen(raw);
        char *out = calloc(1, len + 1), *at = out;
        assert_non_null(out);
        for (const char *line = raw; *line;) {
            const char *end = strchr(line, '\n');
            size_t l = end ? (size_t)(end - line) + 1 : strlen(line);
            if (strncmp(line, path, n) == 0 && line[n] == ':') {
                line += n + 1;
                l -= n + 1;
            }
            memcpy(at, line, l);
            at += l;
            line += l;
        }
        *errors = out;
        free(raw);
    }
    return cfg;
}

static void expect_errors(const char *text, const char *want)
{
    char *errors = NULL;
    config_t *cfg = load_text(text, &errors);
    if (!want) {
        if (!cfg)
            fail_msg("expected no error, got:\n%s", errors ? errors : "(none)");
        config_free(cfg);
        free(errors);
        return;
    }
    if (cfg)
        fail_msg("expected:\n%sgot no error", want);
    assert_non_null(errors);
    if (strcmp(errors, want) != 0)
        fail_msg("expected:\n%sgot:\n%s", want, errors);
    free(errors);
}

static void test_policies_per_route(void **state)
{
    (void)state;
    assert_true(CONFIG_ROUTE_POLICIES_MAX <= RL_POLICIES_MAX);
    static const char head[] = "upstreams:\n"
                               "  api: { targets: [\"127.0.0.1:1\"] }\n"
                               "ratelimit:\n"
                               "  policies:\n"
                               "    p1: { limit: 1, window: 1s, key: client_ip }\n"
                               "    p2: { limit: 2, window: 1s, key: client_ip }\n"
                               "    p3: { limit: 3, window: 1s, key: client_ip }\n"
                               "    p4: { limit: 4, window: 1s, key: client_ip }\n"
                               "    p5: { limit: 5, window: 1s, key: client_ip }\n"
                               "    p6: { limit: 6, window: 1s, key: client_ip }\n"
                               "    p7: { limit: 7, window: 1s, key: client_ip }\n"
                               "    p8: { limit: 8, window: 1s, key: client_ip }\n"
                               "    p9: { limit: 9, window: 1s, key: client_ip, dry_run: true }\n"
                               "routes:\n"
                               "  - name: r\n"
                               "    match: { prefix: / }\n"
                               "    upstream: api\n";
    char text[2048];
    snprintf(text, sizeof text, "%s    ratelimit: [p1, p2, p3, p4, p5, p6, p7, p8]\n", head);
    expect_errors(text, NULL);
    snprintf(text, sizeof text, "%s    ratelimit: [p1, p2, p3, p4, p5, p6, p7, p8, p9]\n", head);
    expect_errors(text,
                  "18:16: routes[0].ratelimit: expected at most 8 policies (a request takes them all in one "
                  "store call), found 9\n");
}

static void test_limit_within_window_units(void **state)
{
    (void)state;
    /* store: redis (a redis: section): microseconds */
    static const char redis_fmt[] = "redis: { url: \"redis://127.0.0.1:6379/0\" }\n"
                                    "ratelimit:\n"
                                    "  policies:\n"
                                    "    ok: { limit: 1000, window: 1ms, key: route }\n"
                                    "    also_ok: { limit: 1000000, window: 1s, key: route }\n"
                                    "    bad: { limit: %s, window: %s, key: route }\n";
    char text[1024];
    snprintf(text, sizeof text, redis_fmt, "1001", "1ms");
    expect_errors(text, "6:19: ratelimit.policies.bad.limit: expected at most 1000 (the window, 1ms, in "
                        "microseconds: with store: redis the period window/limit is a whole number of them), "
                        "found \"1001\"\n");
    snprintf(text, sizeof text, redis_fmt, "100000000", "1s");
    expect_errors(text, "6:19: ratelimit.policies.bad.limit: expected at most 1000000 (the window, 1s, in "
                        "microseconds: with store: redis the period window/limit is a whole number of them), "
                        "found \"100000000\"\n");
    snprintf(text, sizeof text, redis_fmt, "100000000", "100s");
    expect_errors(text, NULL);
    /* store: local: nanoseconds */
    static const char local_fmt[] = "ratelimit:\n"
                                    "  store: local\n"
                                    "  policies:\n"
                                    "    p: { limit: %s, window: 1ms, key: route }\n";
    snprintf(text, sizeof text, local_fmt, "1000000");
    expect_errors(text, NULL);
    snprintf(text, sizeof text, local_fmt, "1000001");
    expect_errors(text, "4:17: ratelimit.policies.p.limit: expected at most 1000000 (the window, 1ms, in "
                        "nanoseconds: with store: local the period window/limit is a whole number of them), "
                        "found \"1000001\"\n");
    /* a window that did not parse is reported once, not again here */
    snprintf(text, sizeof text,
             "redis: { url: \"redis://127.0.0.1:6379/0\" }\n"
             "ratelimit:\n"
             "  policies:\n"
             "    p: { limit: 5000, window: soon, key: route }\n");
    char *errors = NULL;
    config_t *cfg = load_text(text, &errors);
    assert_null(cfg);
    assert_non_null(errors);
    assert_non_null(strstr(errors, "ratelimit.policies.p.window"));
    assert_null(strstr(errors, "ratelimit.policies.p.limit"));
    free(errors);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_policies_per_route),
        cmocka_unit_test(test_limit_within_window_units),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

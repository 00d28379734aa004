/*
 * test_config_table.c - unit tests of what is built from the key table: the Markdown
 * reference, /admin/config's JSON, the restart-only changes seen on reload, and the
 * method names.
 *
 * Single-threaded cmocka program writing its YAML to temporary files. The one idea:
 * these outputs are read by people and by the gateway, so the tests pin their exact
 * text, and check that every row of the table shows up and no secret leaks.
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

#include "config/config_internal.h"

#define TEST_PATH_MAX 4096

static config_t *load_ok(const char *text)
{
    const char *dir = getenv("TMPDIR");
    char path[TEST_PATH_MAX], *errors = NULL;
    config_t *cfg;
    FILE *f;
    int fd;

    snprintf(path, sizeof path, "%s/gwcfg-XXXXXX.yaml", dir && *dir ? dir : "/tmp");
    fd = mkstemps(path, 5);
    assert_true(fd >= 0);
    f = fdopen(fd, "w");
    assert_non_null(f);
    assert_int_equal(fwrite(text, 1, strlen(text), f), strlen(text));
    assert_int_equal(fclose(f), 0);
    cfg = config_load(path, &errors);
    unlink(path);
    if (!cfg)
        fail_msg("expected the file to load, got:\n%s", errors ? errors : "(no errors)");
    return cfg;
}

static size_t count_keys(const config_key *keys)
{
    size_t n = 0;

    for (const config_key *k = keys; k->name; k++)
        n += 1 + (k->sub ? count_keys(k->sub) : 0);
    return n;
}

static size_t count_occurrences(const char *text, const char *needle)
{
    size_t n = 0;

    for (const char *p = strstr(text, needle); p; p = strstr(p + 1, needle))
        n++;
    return n;
}

/* ---- Reference ---- */

static char *reference(void)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);

    assert_non_null(f);
    config_print_reference(f);
    assert_int_equal(fclose(f), 0);
    /* A copy: GCC 12 at -O3 (-Wdangling-pointer) took pointers into the
     * memstream's buffer, once this was inlined, for pointers to `buf`. */
    char *text = strdup(buf);
    free(buf);
    assert_non_null(text);
    return text;
}

static void test_reference_has_a_row_per_key(void **state)
{
    char *text = reference();

    (void)state;
    assert_non_null(
        strstr(text, "| Key | Type | Default | Reloadable | Description |\n|---|---|---|---|---|\n"));
    assert_int_equal(count_occurrences(text, "\n| `"), count_keys(config_root_keys));
    /* The six restart-only keys, and nothing else, say "no". */
    assert_int_equal(count_occurrences(text, " | no | "), 6);
    free(text);
}

static void test_reference_rows(void **state)
{
    char *text = reference();

    (void)state;
    assert_non_null(strstr(text,
                           "\n| `server.listen` | string or list of strings | `0.0.0.0:8080` | no | Where to "
                           "accept HTTP: `host:port` or `[v6addr]:port` (port 1..65535); one string or a "
                           "list. |\n"));
    assert_non_null(strstr(text,
                           "\n| `upstreams.<name>.timeout` | duration > 0 | `10s` | yes | Deadline for a "
                           "target's whole answer; past it 504. |\n"));
    assert_non_null(strstr(text, "\n| `server.max_header_bytes` | size 1KiB..1MiB | `16KiB` | yes | "));
    assert_non_null(strstr(text, "\n| `server.workers` | integer 0..256 | `0` | no | "));
    assert_non_null(strstr(text, "\n| `cache.stale_if_error` | duration (0 allowed) | `0s` | yes | "));
    assert_non_null(strstr(text, "\n| `log.level` | error, warn, info or debug | `info` | yes | "));
    assert_non_null(strstr(text, "\n| `redis.password` | string | `\"\"` | yes | "));
    assert_non_null(
        strstr(text, "\n| `ratelimit.policies.<name>.limit` | integer 1..1000000000 | required | yes | "));
    assert_non_null(strstr(text, "\n| `postgres.databases.<name>.pool_size` | integer 1..10000 | "
                                 "postgres.default_pool_size | yes | "));
    assert_non_null(strstr(text,
                           "\n| `cache.store` | redis or memory | redis when there is a redis: section, else "
                           "memory | yes | "));
    assert_non_null(strstr(text, "\n| `routes[].match.path` | string | none | yes | "));
    assert_non_null(
        strstr(text, "\n| `routes[].cache.key` | string | cache:&lt;method>:&lt;path>?&lt;sorted query> | "
                     "yes | "));
    assert_non_null(strstr(text, "\n| `routes` | list of routes | none | yes | "));
    assert_non_null(strstr(text, "\n| `server` | section |  | partly | "));
    assert_non_null(strstr(text,
                           "\n| `metrics.buckets` | list of numbers | `[0.001, 0.0025, 0.005, 0.01, 0.025, "
                           "0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]` | no | "));
    free(text);
}

/* ---- /admin/config ---- */

static const char show_yaml[] = "admin: { listen: \"127.0.0.1:9901\", token: s3cret-token }\n"
                                "redis: { url: \"redis://:hunter2@cache:6379/0\", password: hunter3 }\n"
                                "postgres:\n"
                                "  databases:\n"
                                "    main: { dbname: app, user: app, password: hunter4 }\n"
                                "    other: { dbname: app, user: app }\n"
                                "  server_check_query: 'select \"x\"'\n"
                                "compression: { gzip_level: 6 }\n"
                                "upstreams: { api: { targets: [\"a:1\"] } }\n"
                                "routes:\n"
                                "  - { name: r, match: { path: /r, methods: [GET, POST] }, upstream: api }\n";

static void test_show_json_values_and_redaction(void **state)
{
    config_t *cfg = load_ok(show_yaml);
    char *json = config_show_json(cfg);

    (void)state;
    assert_non_null(json);
    {
        static const char head[] = "[{\"key\":\"server.listen\",\"value\":\"0.0.0.0:8080\","
                                   "\"default\":\"0.0.0.0:8080\",\"changeable\":\"no\"},";
        assert_memory_equal(json, head, sizeof head - 1);
    }
    assert_int_equal(json[strlen(json) - 1], ']');
    assert_non_null(strstr(json, "{\"key\":\"server.read_timeout\",\"value\":\"30s\",\"default\":\"30s\","
                                 "\"changeable\":\"yes\"}"));
    assert_non_null(strstr(json, "{\"key\":\"server.tls.cert\",\"value\":null,\"default\":null,"
                                 "\"changeable\":\"yes\"}"));
    assert_non_null(strstr(json, "{\"key\":\"admin.token\",\"value\":\"********\",\"default\":\"none\","
                                 "\"changeable\":\"yes\"}"));
    assert_non_null(strstr(json, "{\"key\":\"redis.url\",\"value\":\"redis://********@cache:6379/0\""));
    assert_non_null(strstr(json, "{\"key\":\"redis.password\",\"value\":\"********\",\"default\":\"\""));
    assert_non_null(strstr(json, "{\"key\":\"postgres.databases.main.password\",\"value\":\"********\""));
    assert_non_null(strstr(json, "{\"key\":\"postgres.databases.other.password\",\"value\":\"\""));
    assert_non_null(strstr(json, "{\"key\":\"postgres.databases.main.pool_size\",\"value\":\"-1\","
                                 "\"default\":\"postgres.default_pool_size\""));
    assert_non_null(strstr(json, "{\"key\":\"postgres.server_check_query\",\"value\":\"select \\\"x\\\"\""));
    assert_non_null(strstr(json,
                           "{\"key\":\"metrics.buckets\",\"value\":\"0.001, 0.0025, 0.005, 0.01, 0.025, "
                           "0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10\""));
    assert_non_null(
        strstr(json, "{\"key\":\"routes[0].match.methods\",\"value\":\"GET, POST\",\"default\":\"ALL\""));
    assert_non_null(strstr(json, "{\"key\":\"compression.min_bytes\",\"value\":\"1KiB\""));
    /* Sections the route does not have are not shown; no secret is. */
    assert_null(strstr(json, "routes[0].sql."));
    assert_null(strstr(json, "routes[0].cache."));
    assert_null(strstr(json, "hunter"));
    assert_null(strstr(json, "s3cret"));
    free(json);
    config_free(cfg);
}

static void test_show_json_skips_absent_redis(void **state)
{
    config_t *cfg = load_ok("log: { level: debug }\n");
    char *json = config_show_json(cfg);

    (void)state;
    assert_null(strstr(json, "\"redis."));
    assert_null(strstr(json, "\"compression.")); /* absent: answers are not compressed */
    assert_non_null(strstr(json, "{\"key\":\"log.level\",\"value\":\"debug\",\"default\":\"info\""));
    assert_non_null(strstr(json, "{\"key\":\"cache.store\",\"value\":\"memory\""));
    free(json);
    config_free(cfg);
}

/* ---- Reload ---- */

static const char reload_old[] = "server: { listen: \"0.0.0.0:8080\", workers: 2, read_timeout: 5s }\n"
                                 "admin: { listen: \"127.0.0.1:9901\", token: a }\n"
                                 "metrics: { buckets: [0.1, 1] }\n"
                                 "redis: { connections_per_worker: 1 }\n"
                                 "upstreams: { api: { targets: [\"a:1\"] } }\n";

static void test_unreloadable_changes_listed(void **state)
{
    config_t *old_cfg = load_ok(reload_old);
    config_t *new_cfg = load_ok("server:\n"
                                "  listen: [\"0.0.0.0:8080\", \"[::]:8081\"]\n"
                                "  workers: 4\n"
                                "  max_connections: 500\n"
                                "  read_timeout: 10s\n"
                                "admin: { token: b }\n"
                                "metrics: { buckets: [0.1, 2] }\n"
                                "redis: { connections_per_worker: 2, timeout: 1s }\n"
                                "upstreams: { api: { targets: [\"b:1\"] }, web: { targets: [\"c:1\"] } }\n");
    char *changes = config_unreloadable_changes(old_cfg, new_cfg);

    (void)state;
    assert_non_null(changes);
    assert_string_equal(changes, "server.listen: 0.0.0.0:8080 -> 0.0.0.0:8080, [::]:8081 (needs a restart)\n"
                                 "server.workers: 2 -> 4 (needs a restart)\n"
                                 "server.max_connections: 10000 -> 500 (needs a restart)\n"
                                 "admin.listen: 127.0.0.1:9901 -> (none) (needs a restart)\n"
                                 "metrics.buckets: 0.1, 1 -> 0.1, 2 (needs a restart)\n"
                                 "redis.connections_per_worker: 1 -> 2 (needs a restart)\n");
    free(changes);
    config_free(old_cfg);
    config_free(new_cfg);
}

static void test_reloadable_changes_are_not_listed(void **state)
{
    config_t *old_cfg = load_ok(reload_old);
    config_t *same = load_ok(reload_old);
    config_t *tuned = load_ok("server: { listen: \"0.0.0.0:8080\", workers: 2, read_timeout: 1m,\n"
                              "          tls: { cert: /dev/null, key: /dev/null } }\n"
                              "admin: { listen: \"127.0.0.1:9901\", token: other }\n"
                              "metrics: { buckets: [0.1, 1], path: /m }\n"
                              "redis: { connections_per_worker: 1, url: \"redis://elsewhere:6379/1\" }\n"
                              "log: { level: debug }\n"
                              "upstreams: { web: { targets: [\"c:1\"] } }\n"
                              "routes:\n"
                              "  - { name: r, match: { prefix: / }, upstream: web }\n");

    (void)state;
    assert_null(config_unreloadable_changes(old_cfg, same));
    assert_null(config_unreloadable_changes(old_cfg, tuned));
    assert_null(config_unreloadable_changes(tuned, old_cfg));
    config_free(old_cfg);
    config_free(same);
    config_free(tuned);
}

/* ---- The rest of the public surface ---- */

static void test_method_names(void **state)
{
    (void)state;
    assert_string_equal(config_method_name(CONFIG_METHOD_GET), "GET");
    assert_string_equal(config_method_name(CONFIG_METHOD_POST), "POST");
    assert_string_equal(config_method_name(CONFIG_METHOD_HEAD), "HEAD");
    assert_string_equal(config_method_name(CONFIG_METHOD_PUT), "PUT");
    assert_string_equal(config_method_name(CONFIG_METHOD_DELETE), "DELETE");
    assert_string_equal(config_method_name(CONFIG_METHOD_OPTIONS), "OPTIONS");
    assert_string_equal(config_method_name(CONFIG_METHOD_TRACE), "TRACE");
    assert_string_equal(config_method_name(CONFIG_METHOD_CONNECT), "CONNECT");
    assert_string_equal(config_method_name(CONFIG_METHOD_PATCH), "PATCH");
    assert_null(config_method_name(0));
    assert_null(config_method_name(CONFIG_METHOD_GET | CONFIG_METHOD_POST));
    assert_null(config_method_name(CONFIG_METHOD_ALL));
    assert_null(config_method_name(0x200));
}

static void test_free_accepts_null(void **state)
{
    (void)state;
    config_free(NULL);
    assert_null(config_unreloadable_changes(NULL, NULL));
}

/* Every default in the table passes its own rules: a file of empty sections loads. */
static void test_every_default_is_valid(void **state)
{
    config_t *cfg = load_ok("server: {}\nadmin: {}\nmetrics: {}\nlog: {}\nredis: {}\ncache: {}\n"
                            "compression: {}\nratelimit: {}\nupstreams: {}\nroutes: []\n"
                            "postgres: { databases: { d: { dbname: a, user: b } } }\n");

    (void)state;
    assert_int_equal(cfg->postgres.databases[0].pool_size, -1);
    assert_string_equal(cfg->postgres.databases[0].port, "5432");
    assert_int_equal(cfg->cache.store, CONFIG_STORE_REDIS);
    config_free(cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reference_has_a_row_per_key),
        cmocka_unit_test(test_reference_rows),
        cmocka_unit_test(test_show_json_values_and_redaction),
        cmocka_unit_test(test_show_json_skips_absent_redis),
        cmocka_unit_test(test_unreloadable_changes_listed),
        cmocka_unit_test(test_reloadable_changes_are_not_listed),
        cmocka_unit_test(test_method_names),
        cmocka_unit_test(test_free_accepts_null),
        cmocka_unit_test(test_every_default_is_valid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

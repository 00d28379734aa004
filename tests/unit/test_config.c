/*
 * test_config.c - unit tests of config_load: good files load with the right values
 * and defaults, and every kind of mistake is reported as the exact line
 * "LINE:COL: key.path: expected ..., found ..." the user will read.
 *
 * Single-threaded cmocka program; it writes YAML to temporary files and reads the
 * fixtures in $GATEWAY_TEST_DATA (tests/unit/data, set by CTest). The one idea: the
 * error tests compare the whole error text, so a wrong position, a wrong key path,
 * a missing or an extra error all fail.
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

#define TEST_PATH_MAX 4096

/* ---- Helpers ---- */

/* Write TEXT to a new temporary .yaml file; returns its path (caller frees). */
static char *write_temp(const char *text)
{
    const char *dir = getenv("TMPDIR");
    char *path = malloc(TEST_PATH_MAX);
    FILE *f;
    int fd;

    assert_non_null(path);
    snprintf(path, TEST_PATH_MAX, "%s/gwcfg-XXXXXX.yaml", dir && *dir ? dir : "/tmp");
    fd = mkstemps(path, 5);
    assert_true(fd >= 0);
    f = fdopen(fd, "w");
    assert_non_null(f);
    assert_int_equal(fwrite(text, 1, strlen(text), f), strlen(text));
    assert_int_equal(fclose(f), 0);
    return path;
}

/* ERRORS with "FILE:" cut from the start of every line (caller frees). */
static char *strip_file(const char *errors, const char *file)
{
    size_t n = strlen(file);
    char *out = calloc(1, strlen(errors) + 1), *at = out;

    assert_non_null(out);
    for (const char *line = errors; *line;) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) + 1 : strlen(line);
        if (strncmp(line, file, n) == 0 && line[n] == ':') {
            line += n + 1;
            len -= n + 1;
        }
        memcpy(at, line, len);
        at += len;
        line += len;
    }
    return out;
}

/* Load TEXT from a temporary file. On failure *ERRORS holds the errors without the file name. */
static config_t *load_text(const char *text, char **errors)
{
    char *path = write_temp(text), *raw = NULL;
    config_t *cfg = config_load(path, &raw);

    *errors = raw ? strip_file(raw, path) : NULL;
    free(raw);
    unlink(path);
    free(path);
    return cfg;
}

static config_t *load_ok(const char *text)
{
    char *errors = NULL;
    config_t *cfg = load_text(text, &errors);

    if (!cfg)
        fail_msg("expected the file to load, got:\n%s", errors ? errors : "(no errors)");
    assert_null(errors);
    return cfg;
}

static void expect_errors(const char *text, const char *want)
{
    char *errors = NULL;
    config_t *cfg = load_text(text, &errors);

    assert_null(cfg);
    assert_non_null(errors);
    assert_string_equal(errors, want);
    free(errors);
}

static char *data_path(const char *name)
{
    const char *dir = getenv("GATEWAY_TEST_DATA");
    char *path = malloc(TEST_PATH_MAX);

    if (!dir)
        fail_msg("GATEWAY_TEST_DATA is not set (CTest sets it to tests/unit/data)");
    assert_non_null(path);
    snprintf(path, TEST_PATH_MAX, "%s/%s", dir, name);
    return path;
}

static char *read_all(const char *path)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long n;

    if (!f)
        fail_msg("cannot open %s", path);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    n = ftell(f);
    assert_true(n >= 0);
    rewind(f);
    buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

/* TEXT with every FROM replaced by TO (caller frees). */
static char *replace_all(const char *text, const char *from, const char *to)
{
    size_t count = 0, nf = strlen(from), nt = strlen(to);
    char *out, *at;

    for (const char *p = strstr(text, from); p; p = strstr(p + nf, from))
        count++;
    out = malloc(strlen(text) + count * nt + 1);
    assert_non_null(out);
    at = out;
    for (const char *p = text;;) {
        const char *hit = strstr(p, from);
        if (!hit) {
            strcpy(at, p);
            break;
        }
        memcpy(at, p, (size_t)(hit - p));
        at += hit - p;
        memcpy(at, to, nt);
        at += nt;
        p = hit + nf;
    }
    return out;
}

static void clear_example_env(void)
{
    static const char *const names[] = {"REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD",
                                        "DB_HOST",    "DB_PORT",    "DB_PASSWORD"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        unsetenv(names[i]);
}

/*
 * The spec example with its TLS paths pointed at two readable temporary files.
 * Returns the path of the rewritten copy; *CERT and *KEY get the temp files' paths.
 */
static char *example_with_tls(char **cert, char **key)
{
    char *example_path = data_path("example.yaml");
    char *text = read_all(example_path), *step, *final, *path;

    *cert = write_temp("cert\n");
    *key = write_temp("key\n");
    step = replace_all(text, "/etc/gateway/tls.crt", *cert);
    final = replace_all(step, "/etc/gateway/tls.key", *key);
    path = write_temp(final);
    free(example_path);
    free(text);
    free(step);
    free(final);
    return path;
}

/* ---- Good files ---- */

static void test_example_loads_with_every_value(void **state)
{
    char *cert, *key, *path = NULL, *errors = NULL;
    config_t *cfg;
    const config_route *r;

    (void)state;
    clear_example_env();
    setenv("GATEWAY_ADMIN_TOKEN", "s3cret", 1);
    path = example_with_tls(&cert, &key);
    cfg = config_load(path, &errors);
    if (!cfg)
        fail_msg("example did not load:\n%s", errors);
    assert_null(errors);
    assert_string_equal(cfg->file, path);

    assert_int_equal(cfg->server.listen_count, 1);
    assert_string_equal(cfg->server.listen[0], "0.0.0.0:8080");
    assert_int_equal(cfg->server.workers, 0);
    assert_int_equal(cfg->server.max_connections, 10000);
    assert_int_equal(cfg->server.max_header_bytes, 16384);
    assert_int_equal(cfg->server.max_body_bytes, 10485760);
    assert_int_equal(cfg->server.read_timeout_ms, 30000);
    assert_int_equal(cfg->server.request_timeout_ms, 30000);
    assert_int_equal(cfg->server.drain_timeout_ms, 15000);
    assert_string_equal(cfg->server.tls_cert, cert);
    assert_string_equal(cfg->server.tls_key, key);

    assert_string_equal(cfg->admin.listen, "127.0.0.1:9901");
    assert_string_equal(cfg->admin.token, "s3cret");

    assert_string_equal(cfg->metrics.path, "/metrics");
    assert_int_equal(cfg->metrics.bucket_count, 13);
    assert_true(cfg->metrics.buckets[0] == 0.001);
    assert_true(cfg->metrics.buckets[1] == 0.0025);
    assert_true(cfg->metrics.buckets[9] == 1.0);
    assert_true(cfg->metrics.buckets[12] == 10.0);

    assert_int_equal(cfg->log.level, CONFIG_LOG_INFO);
    assert_int_equal(cfg->log.format, CONFIG_LOG_JSON);
    assert_true(cfg->log.access);

    assert_true(cfg->redis.enabled);
    assert_string_equal(cfg->redis.url, "redis://127.0.0.1:6379/0");
    assert_string_equal(cfg->redis.password, "");
    assert_int_equal(cfg->redis.timeout_ms, 50);
    assert_int_equal(cfg->redis.connections_per_worker, 1);

    assert_int_equal(cfg->postgres.database_count, 1);
    assert_string_equal(cfg->postgres.databases[0].name, "main");
    assert_string_equal(cfg->postgres.databases[0].host, "127.0.0.1");
    assert_string_equal(cfg->postgres.databases[0].port, "5432");
    assert_string_equal(cfg->postgres.databases[0].dbname, "app");
    assert_string_equal(cfg->postgres.databases[0].user, "app");
    assert_string_equal(cfg->postgres.databases[0].password, "");
    assert_int_equal(cfg->postgres.databases[0].pool_size, -1);
    assert_int_equal(cfg->postgres.databases[0].max_db_connections, -1);
    assert_int_equal(cfg->postgres.pool_mode, CONFIG_POOL_TRANSACTION);
    assert_int_equal(cfg->postgres.max_client_conn, 1000);
    assert_int_equal(cfg->postgres.default_pool_size, 25);
    assert_int_equal(cfg->postgres.min_pool_size, 2);
    assert_int_equal(cfg->postgres.reserve_pool_size, 5);
    assert_int_equal(cfg->postgres.reserve_pool_timeout_ms, 1000);
    assert_int_equal(cfg->postgres.max_db_connections, 100);
    assert_int_equal(cfg->postgres.query_wait_timeout_ms, 5000);
    assert_int_equal(cfg->postgres.query_timeout_ms, 10000);
    assert_int_equal(cfg->postgres.server_connect_timeout_ms, 5000);
    assert_int_equal(cfg->postgres.server_idle_timeout_ms, 600000);
    assert_int_equal(cfg->postgres.server_lifetime_ms, 3600000);
    assert_string_equal(cfg->postgres.server_check_query, "select 1");
    assert_int_equal(cfg->postgres.server_check_delay_ms, 30000);

    assert_int_equal(cfg->cache.store, CONFIG_STORE_REDIS);
    assert_string_equal(cfg->cache.key_prefix, "cache:");
    assert_int_equal(cfg->cache.default_ttl_ms, 300000);
    assert_int_equal(cfg->cache.max_object_bytes, 1048576);
    assert_int_equal(cfg->cache.memory_max_bytes, 268435456);
    assert_int_equal(cfg->cache.stale_while_revalidate_ms, 10000);
    assert_int_equal(cfg->cache.stale_if_error_ms, 60000);

    assert_int_equal(cfg->compression.algorithm_count, 2);
    assert_string_equal(cfg->compression.algorithms[0], "br");
    assert_string_equal(cfg->compression.algorithms[1], "gzip");
    assert_int_equal(cfg->compression.min_bytes, 1024);
    assert_int_equal(cfg->compression.type_count, 4);
    assert_string_equal(cfg->compression.types[0], "application/json");
    assert_string_equal(cfg->compression.types[1], "text/*");
    assert_string_equal(cfg->compression.types[2], "application/javascript");
    assert_string_equal(cfg->compression.types[3], "image/svg+xml");
    assert_int_equal(cfg->compression.brotli_quality, 5);
    assert_int_equal(cfg->compression.gzip_level, 6);

    assert_int_equal(cfg->ratelimit.store, CONFIG_STORE_REDIS);
    assert_int_equal(cfg->ratelimit.on_store_error, CONFIG_ON_ERROR_LOCAL);
    assert_int_equal(cfg->ratelimit.policy_count, 2);
    assert_string_equal(cfg->ratelimit.policies[0].name, "per_ip");
    assert_int_equal(cfg->ratelimit.policies[0].limit, 100);
    assert_int_equal(cfg->ratelimit.policies[0].window_ms, 1000);
    assert_string_equal(cfg->ratelimit.policies[0].key, "client_ip");
    assert_false(cfg->ratelimit.policies[0].dry_run);
    assert_string_equal(cfg->ratelimit.policies[1].name, "per_key");
    assert_int_equal(cfg->ratelimit.policies[1].limit, 5000);
    assert_int_equal(cfg->ratelimit.policies[1].window_ms, 60000);
    assert_string_equal(cfg->ratelimit.policies[1].key, "header:X-API-Key");

    assert_int_equal(cfg->upstream_count, 1);
    assert_string_equal(cfg->upstreams[0].name, "blueprints");
    assert_int_equal(cfg->upstreams[0].target_count, 2);
    assert_string_equal(cfg->upstreams[0].targets[0], "blueprint-service:3001");
    assert_string_equal(cfg->upstreams[0].targets[1], "blueprint-service-2:3001");
    assert_int_equal(cfg->upstreams[0].balance, CONFIG_BALANCE_ROUND_ROBIN);
    assert_int_equal(cfg->upstreams[0].connect_timeout_ms, 2000);
    assert_int_equal(cfg->upstreams[0].timeout_ms, 10000);
    assert_int_equal(cfg->upstreams[0].keepalive, 64);
    assert_int_equal(cfg->upstreams[0].max_fails, 3);
    assert_int_equal(cfg->upstreams[0].fail_timeout_ms, 10000);
    assert_int_equal(cfg->upstreams[0].retries, 1);

    assert_int_equal(cfg->route_count, 5);
    r = &cfg->routes[0];
    assert_string_equal(r->name, "blueprints-list");
    assert_string_equal(r->path, "/api/blueprints");
    assert_null(r->prefix);
    assert_int_equal(r->methods, CONFIG_METHOD_GET);
    assert_string_equal(r->upstream, "blueprints");
    assert_ptr_equal(r->upstream_ref, &cfg->upstreams[0]);
    assert_int_equal(r->ratelimit_count, 1);
    assert_string_equal(r->ratelimit[0], "per_ip");
    assert_true(r->cache.enabled);
    assert_int_equal(r->cache.ttl_ms, 300000);
    assert_null(r->cache.key);
    assert_int_equal(r->cache.unless_count, 0);
    assert_false(r->sql.enabled);
    assert_int_equal(r->invalidate_count, 0);
    assert_int_equal(r->line, 99);

    r = &cfg->routes[1];
    assert_string_equal(r->name, "blueprints-write");
    assert_int_equal(r->methods, CONFIG_METHOD_POST | CONFIG_METHOD_PUT | CONFIG_METHOD_DELETE);
    assert_false(r->cache.enabled);
    assert_int_equal(r->invalidate_count, 1);
    assert_string_equal(r->invalidate[0], "cache:GET:/api/blueprints*");
    assert_int_equal(r->line, 105);

    r = &cfg->routes[2];
    assert_string_equal(r->name, "project");
    assert_string_equal(r->path, "/api/projects/:id");
    assert_null(r->upstream);
    assert_null(r->upstream_ref);
    assert_true(r->sql.enabled);
    assert_string_equal(r->sql.database, "main");
    assert_string_equal(r->sql.query, "select row_to_json(p) from projects p where p.id = $1");
    assert_int_equal(r->sql.param_count, 1);
    assert_string_equal(r->sql.params[0], "path.id");
    assert_int_equal(r->sql.default_count, 0);
    assert_int_equal(r->sql.result, CONFIG_RESULT_OBJECT);
    assert_true(r->cache.enabled);
    assert_int_equal(r->cache.ttl_ms, 600000);
    assert_string_equal(r->cache.key, "project:{path.id}");
    assert_int_equal(r->cache.unless_count, 1);
    assert_string_equal(r->cache.unless[0].key, "query.cache");
    assert_string_equal(r->cache.unless[0].value, "false");

    r = &cfg->routes[3];
    assert_string_equal(r->name, "project-list");
    assert_int_equal(r->sql.param_count, 2);
    assert_string_equal(r->sql.params[0], "query.limit");
    assert_string_equal(r->sql.params[1], "query.offset");
    assert_int_equal(r->sql.default_count, 2);
    assert_string_equal(r->sql.defaults[0].key, "query.limit");
    assert_string_equal(r->sql.defaults[0].value, "50");
    assert_string_equal(r->sql.defaults[1].key, "query.offset");
    assert_string_equal(r->sql.defaults[1].value, "0");
    assert_int_equal(r->sql.result, CONFIG_RESULT_ARRAY);
    assert_int_equal(r->cache.ttl_ms, 60000);
    assert_string_equal(r->cache.key, "projects:{query.limit}:{query.offset}");

    r = &cfg->routes[4];
    assert_string_equal(r->name, "everything-else");
    assert_null(r->path);
    assert_string_equal(r->prefix, "/api/");
    assert_int_equal(r->methods, CONFIG_METHOD_ALL);
    assert_ptr_equal(r->upstream_ref, &cfg->upstreams[0]);
    assert_int_equal(r->ratelimit_count, 2);
    assert_string_equal(r->ratelimit[1], "per_key");
    assert_false(r->cache.enabled);

    config_free(cfg);
    unlink(path);
    unlink(cert);
    unlink(key);
    free(path);
    free(cert);
    free(key);
}

static void test_example_environment_overrides(void **state)
{
    char *cert, *key, *path, *errors = NULL;
    config_t *cfg;

    (void)state;
    clear_example_env();
    setenv("GATEWAY_ADMIN_TOKEN", "t", 1);
    setenv("REDIS_HOST", "cache.internal", 1);
    setenv("REDIS_PASSWORD", "pw", 1);
    setenv("DB_PORT", "6543", 1);
    setenv("DB_HOST", "", 1); /* empty: ${DB_HOST:-127.0.0.1} takes the default */
    path = example_with_tls(&cert, &key);
    cfg = config_load(path, &errors);
    if (!cfg)
        fail_msg("example did not load:\n%s", errors);
    assert_string_equal(cfg->redis.url, "redis://cache.internal:6379/0");
    assert_string_equal(cfg->redis.password, "pw");
    assert_string_equal(cfg->postgres.databases[0].port, "6543");
    assert_string_equal(cfg->postgres.databases[0].host, "127.0.0.1");
    config_free(cfg);
    clear_example_env();
    unlink(path);
    unlink(cert);
    unlink(key);
    free(path);
    free(cert);
    free(key);
}

/* The repo copy as it is: all that fails is the TLS files it names, which do not exist here. */
static void test_example_verbatim_fails_only_on_tls_files(void **state)
{
    char *path = data_path("example.yaml"), *raw = NULL, *errors;
    config_t *cfg;

    (void)state;
    if (access("/etc/gateway/tls.crt", R_OK) == 0 || access("/etc/gateway/tls.key", R_OK) == 0) {
        free(path);
        skip();
    }
    clear_example_env();
    setenv("GATEWAY_ADMIN_TOKEN", "t", 1);
    cfg = config_load(path, &raw);
    assert_null(cfg);
    errors = strip_file(raw, path);
    assert_string_equal(errors,
                        "18:11: server.tls.cert: expected a readable file, found \"/etc/gateway/tls.crt\" "
                        "(No such file or directory)\n"
                        "19:10: server.tls.key: expected a readable file, found \"/etc/gateway/tls.key\" "
                        "(No such file or directory)\n");
    free(errors);
    free(raw);

    /* Without the token the unset variable is named too. */
    unsetenv("GATEWAY_ADMIN_TOKEN");
    cfg = config_load(path, &raw);
    assert_null(cfg);
    errors = strip_file(raw, path);
    assert_non_null(strstr(errors,
                           "23:10: admin.token: expected environment variable GATEWAY_ADMIN_TOKEN to be set "
                           "(or a default: ${GATEWAY_ADMIN_TOKEN:-value}), found it unset\n"));
    free(errors);
    free(raw);
    free(path);
}

static void test_minimal_file_gets_every_default(void **state)
{
    char *path = data_path("minimal.yaml"), *errors = NULL;
    config_t *cfg = config_load(path, &errors);
    const config_route *r;

    (void)state;
    if (!cfg)
        fail_msg("minimal.yaml did not load:\n%s", errors);
    assert_int_equal(cfg->server.listen_count, 1);
    assert_string_equal(cfg->server.listen[0], "0.0.0.0:8080");
    assert_int_equal(cfg->server.workers, 0);
    assert_int_equal(cfg->server.max_connections, 10000);
    assert_int_equal(cfg->server.max_header_bytes, 16 * 1024);
    assert_int_equal(cfg->server.max_body_bytes, 10 * 1024 * 1024);
    assert_int_equal(cfg->server.read_timeout_ms, 30000);
    assert_int_equal(cfg->server.request_timeout_ms, 30000);
    assert_int_equal(cfg->server.drain_timeout_ms, 15000);
    assert_null(cfg->server.tls_cert);
    assert_null(cfg->server.tls_key);
    assert_null(cfg->admin.listen);
    assert_null(cfg->admin.token);
    assert_string_equal(cfg->metrics.path, "/metrics");
    assert_int_equal(cfg->metrics.bucket_count, 13);
    assert_true(cfg->metrics.buckets[0] == 0.001);
    assert_true(cfg->metrics.buckets[12] == 10.0);
    assert_int_equal(cfg->log.level, CONFIG_LOG_INFO);
    assert_int_equal(cfg->log.format, CONFIG_LOG_JSON);
    assert_true(cfg->log.access);
    assert_false(cfg->redis.enabled);
    assert_string_equal(cfg->redis.url, "redis://127.0.0.1:6379/0");
    assert_string_equal(cfg->redis.password, "");
    assert_int_equal(cfg->redis.timeout_ms, 50);
    assert_int_equal(cfg->redis.connections_per_worker, 1);
    assert_int_equal(cfg->postgres.database_count, 0);
    assert_null(cfg->postgres.databases);
    assert_int_equal(cfg->postgres.pool_mode, CONFIG_POOL_TRANSACTION);
    assert_int_equal(cfg->postgres.max_client_conn, 1000);
    assert_int_equal(cfg->postgres.default_pool_size, 25);
    assert_int_equal(cfg->postgres.min_pool_size, 0);
    assert_int_equal(cfg->postgres.reserve_pool_size, 0);
    assert_int_equal(cfg->postgres.reserve_pool_timeout_ms, 5000);
    assert_int_equal(cfg->postgres.max_db_connections, 100);
    assert_int_equal(cfg->postgres.query_wait_timeout_ms, 5000);
    assert_int_equal(cfg->postgres.query_timeout_ms, 10000);
    assert_int_equal(cfg->postgres.server_connect_timeout_ms, 5000);
    assert_int_equal(cfg->postgres.server_idle_timeout_ms, 600000);
    assert_int_equal(cfg->postgres.server_lifetime_ms, 3600000);
    assert_string_equal(cfg->postgres.server_check_query, "select 1");
    assert_int_equal(cfg->postgres.server_check_delay_ms, 30000);
    assert_int_equal(cfg->cache.store, CONFIG_STORE_MEMORY);
    assert_string_equal(cfg->cache.key_prefix, "cache:");
    assert_int_equal(cfg->cache.default_ttl_ms, 300000);
    assert_int_equal(cfg->cache.max_object_bytes, 1024 * 1024);
    assert_int_equal(cfg->cache.memory_max_bytes, 256 * 1024 * 1024);
    assert_int_equal(cfg->cache.stale_while_revalidate_ms, 0);
    assert_int_equal(cfg->cache.stale_if_error_ms, 0);
    assert_int_equal(cfg->compression.algorithm_count, 2);
    assert_string_equal(cfg->compression.algorithms[0], "br");
    assert_string_equal(cfg->compression.algorithms[1], "gzip");
    assert_int_equal(cfg->compression.min_bytes, 1024);
    assert_int_equal(cfg->compression.type_count, 4);
    assert_string_equal(cfg->compression.types[1], "text/*");
    assert_string_equal(cfg->compression.types[3], "image/svg+xml");
    assert_int_equal(cfg->compression.brotli_quality, 5);
    assert_int_equal(cfg->compression.gzip_level, 6);
    assert_int_equal(cfg->ratelimit.store, CONFIG_STORE_LOCAL);
    assert_int_equal(cfg->ratelimit.on_store_error, CONFIG_ON_ERROR_LOCAL);
    assert_int_equal(cfg->ratelimit.policy_count, 0);

    assert_int_equal(cfg->upstream_count, 1);
    assert_string_equal(cfg->upstreams[0].name, "app");
    assert_int_equal(cfg->upstreams[0].target_count, 1);
    assert_string_equal(cfg->upstreams[0].targets[0], "127.0.0.1:3001");
    assert_int_equal(cfg->upstreams[0].balance, CONFIG_BALANCE_ROUND_ROBIN);
    assert_int_equal(cfg->upstreams[0].connect_timeout_ms, 2000);
    assert_int_equal(cfg->upstreams[0].timeout_ms, 10000);
    assert_int_equal(cfg->upstreams[0].keepalive, 64);
    assert_int_equal(cfg->upstreams[0].max_fails, 3);
    assert_int_equal(cfg->upstreams[0].fail_timeout_ms, 10000);
    assert_int_equal(cfg->upstreams[0].retries, 1);

    assert_int_equal(cfg->route_count, 1);
    r = &cfg->routes[0];
    assert_string_equal(r->name, "all");
    assert_null(r->path);
    assert_string_equal(r->prefix, "/");
    assert_int_equal(r->methods, CONFIG_METHOD_ALL);
    assert_ptr_equal(r->upstream_ref, &cfg->upstreams[0]);
    assert_int_equal(r->ratelimit_count, 0);
    assert_false(r->cache.enabled);
    assert_int_equal(r->cache.ttl_ms, 300000);
    assert_false(r->sql.enabled);
    assert_int_equal(r->sql.result, CONFIG_RESULT_OBJECT);
    assert_int_equal(r->line, 6);
    config_free(cfg);
    free(path);
}

static void test_redis_section_makes_redis_the_default_store(void **state)
{
    config_t *cfg = load_ok("redis: {}\n");

    (void)state;
    assert_true(cfg->redis.enabled);
    assert_string_equal(cfg->redis.url, "redis://127.0.0.1:6379/0");
    assert_int_equal(cfg->cache.store, CONFIG_STORE_REDIS);
    assert_int_equal(cfg->ratelimit.store, CONFIG_STORE_REDIS);
    config_free(cfg);

    cfg = load_ok("redis: {}\ncache: { store: memory }\nratelimit: { store: local, on_store_error: deny }\n");
    assert_int_equal(cfg->cache.store, CONFIG_STORE_MEMORY);
    assert_int_equal(cfg->ratelimit.store, CONFIG_STORE_LOCAL);
    assert_int_equal(cfg->ratelimit.on_store_error, CONFIG_ON_ERROR_DENY);
    config_free(cfg);
}

static void test_empty_values(void **state)
{
    /* A bare key: an empty section, an empty list, or "" for strings that may be empty. */
    config_t *cfg = load_ok("admin:\nroutes:\nupstreams:\nredis:\n  password:\ncache:\n  key_prefix: \"\"\n");

    (void)state;
    assert_null(cfg->admin.listen);
    assert_null(cfg->admin.token);
    assert_int_equal(cfg->route_count, 0);
    assert_int_equal(cfg->upstream_count, 0);
    assert_true(cfg->redis.enabled);
    assert_string_equal(cfg->redis.password, "");
    assert_string_equal(cfg->cache.key_prefix, "");
    config_free(cfg);

    cfg = load_ok("admin: { listen: \"127.0.0.1:9000\", token: \"\" }\n");
    assert_string_equal(cfg->admin.listen, "127.0.0.1:9000");
    assert_string_equal(cfg->admin.token, "");
    config_free(cfg);
}

static void test_listen_forms(void **state)
{
    config_t *cfg = load_ok("server:\n  listen: [\"127.0.0.1:80\", \"[::1]:8080\", \"gw.local:8443\"]\n");

    (void)state;
    assert_int_equal(cfg->server.listen_count, 3);
    assert_string_equal(cfg->server.listen[0], "127.0.0.1:80");
    assert_string_equal(cfg->server.listen[1], "[::1]:8080");
    assert_string_equal(cfg->server.listen[2], "gw.local:8443");
    config_free(cfg);

    cfg = load_ok("server:\n  listen: \"[::]:9090\"\n");
    assert_int_equal(cfg->server.listen_count, 1);
    assert_string_equal(cfg->server.listen[0], "[::]:9090");
    config_free(cfg);
}

static void test_route_forms(void **state)
{
    config_t *cfg =
        load_ok("upstreams:\n"
                "  api: { targets: [\"127.0.0.1:1\"], balance: least_conn }\n"
                "ratelimit:\n"
                "  policies:\n"
                "    a: { limit: 1, window: 1.5s, key: [client_ip, \"header:X-Key\"], dry_run: yes }\n"
                "    b: { limit: 1000000000, window: 1h, key: route+client_ip }\n"
                "routes:\n"
                "  - name: v1.items_all-3\n"
                "    match: { path: \"/items/:item_id/parts/:Part2\", methods: [get, Post, patch] }\n"
                "    upstream: api\n"
                "    ratelimit: b\n"
                "    invalidate: \"cache:GET:/items*\"\n"
                "  - name: opts\n"
                "    match: { prefix: /, methods: OPTIONS }\n"
                "    upstream: api\n"
                "    cache: { ttl: 1m, key: \"{method}:{path}?{query}:{header.X-Key}\",\n"
                "             unless: { method: HEAD, header.Cookie: \"\" } }\n");
    const config_route *r;

    (void)state;
    assert_int_equal(cfg->upstreams[0].balance, CONFIG_BALANCE_LEAST_CONN);
    assert_string_equal(cfg->ratelimit.policies[0].key, "client_ip+header:X-Key");
    assert_int_equal(cfg->ratelimit.policies[0].window_ms, 1500);
    assert_true(cfg->ratelimit.policies[0].dry_run);
    assert_string_equal(cfg->ratelimit.policies[1].key, "route+client_ip");
    assert_int_equal(cfg->ratelimit.policies[1].limit, 1000000000);
    r = &cfg->routes[0];
    assert_int_equal(r->methods, CONFIG_METHOD_GET | CONFIG_METHOD_POST | CONFIG_METHOD_PATCH);
    assert_int_equal(r->ratelimit_count, 1);
    assert_string_equal(r->ratelimit[0], "b");
    assert_int_equal(r->invalidate_count, 1);
    assert_string_equal(r->invalidate[0], "cache:GET:/items*");
    assert_int_equal(r->line, 8);
    r = &cfg->routes[1];
    assert_int_equal(r->methods, CONFIG_METHOD_OPTIONS);
    assert_true(r->cache.enabled);
    assert_int_equal(r->cache.ttl_ms, 60000);
    assert_int_equal(r->cache.unless_count, 2);
    assert_string_equal(r->cache.unless[0].key, "method");
    assert_string_equal(r->cache.unless[0].value, "HEAD");
    assert_string_equal(r->cache.unless[1].key, "header.Cookie");
    assert_string_equal(r->cache.unless[1].value, "");
    assert_int_equal(r->line, 13);
    config_free(cfg);
}

static void test_route_ttl_defaults_to_cache_default_ttl(void **state)
{
    config_t *cfg = load_ok("cache: { default_ttl: 45s }\n"
                            "upstreams: { api: { targets: [\"127.0.0.1:1\"] } }\n"
                            "routes:\n"
                            "  - { name: a, match: { path: /a }, upstream: api, cache: {} }\n");

    (void)state;
    assert_true(cfg->routes[0].cache.enabled);
    assert_int_equal(cfg->routes[0].cache.ttl_ms, 45000);
    config_free(cfg);
}

static void test_env_expansion_in_values(void **state)
{
    config_t *cfg;

    (void)state;
    setenv("GW_T_DB_PORT", "6543", 1);
    setenv("GW_T_PREFIX", "x\nrouted: {injected: true}", 1);
    unsetenv("GW_T_UNSET");
    cfg = load_ok("postgres:\n"
                  "  databases:\n"
                  "    a: { dbname: app, user: app, port: \"${GW_T_DB_PORT}\" }\n"
                  "    b: { dbname: app, user: app, port: 15432, host: \"${GW_T_UNSET:-db.b}\" }\n"
                  "cache:\n"
                  "  key_prefix: \"${GW_T_PREFIX}\"\n"
                  "  default_ttl: ${GW_T_UNSET:-90s}\n"
                  "upstreams:\n"
                  "  api: { targets: [\"${GW_T_UNSET:-localhost}:${GW_T_DB_PORT}\"] }\n");
    assert_string_equal(cfg->postgres.databases[0].port, "6543");
    assert_string_equal(cfg->postgres.databases[1].port, "15432");
    assert_string_equal(cfg->postgres.databases[1].host, "db.b");
    /* An environment value is text, never YAML structure. */
    assert_string_equal(cfg->cache.key_prefix, "x\nrouted: {injected: true}");
    assert_int_equal(cfg->cache.default_ttl_ms, 90000);
    assert_string_equal(cfg->upstreams[0].targets[0], "localhost:6543");
    config_free(cfg);
}

/* ---- Every kind of error ---- */

static void test_error_unknown_key_suggests(void **state)
{
    (void)state;
    expect_errors(
        "server:\n"
        "  lisen: \"0.0.0.0:8080\"\n"
        "servr: {}\n"
        "log:\n"
        "  zzz: 1\n",
        "2:3: server.lisen: expected a key of server (listen, workers, max_connections, max_header_bytes, "
        "max_body_bytes, read_timeout, request_timeout, drain_timeout, tls), found \"lisen\"; did you mean "
        "\"listen\"?\n"
        "3:1: servr: expected a top-level key (server, admin, metrics, log, redis, postgres, cache, "
        "compression, ratelimit, upstreams, routes), found \"servr\"; did you mean \"server\"?\n"
        "5:3: log.zzz: expected a key of log (level, format, access), found \"zzz\"\n");
    expect_errors(
        "upstreams:\n"
        "  api:\n"
        "    targets: [\"a:1\"]\n"
        "    tiemout: 5s\n",
        "4:5: upstreams.api.tiemout: expected a key of upstreams.api (targets, balance, connect_timeout, "
        "timeout, keepalive, max_fails, fail_timeout, retries), found \"tiemout\"; did you mean "
        "\"timeout\"?\n");
}

static void test_error_duplicate_key(void **state)
{
    (void)state;
    expect_errors("log:\n"
                  "  level: info\n"
                  "  format: json\n"
                  "  level: debug\n"
                  "log: {}\n",
                  "4:3: log.level: expected each key once, found \"level\" again (first at line 2)\n"
                  "5:1: log: expected each key once, found \"log\" again (first at line 1)\n");
    expect_errors("upstreams:\n"
                  "  api: { targets: [\"a:1\"] }\n"
                  "  api: { targets: [\"b:1\"] }\n"
                  "log: { level: info, level: warn, level: debug }\n",
                  "3:3: upstreams.api: expected each key once, found \"api\" again (first at line 2)\n"
                  "4:21: log.level: expected each key once, found \"level\" again (first at line 4)\n"
                  "4:34: log.level: expected each key once, found \"level\" again (first at line 4)\n");
}

static void test_error_wrong_type(void **state)
{
    (void)state;
    expect_errors("server:\n"
                  "  workers: { a: 1 }\n"
                  "  listen: { a: 1 }\n"
                  "log: [info]\n"
                  "upstreams:\n"
                  "  - api\n"
                  "routes: api\n",
                  "2:12: server.workers: expected an integer 0..256, found a mapping\n"
                  "3:11: server.listen: expected a string or a list of strings, found a mapping\n"
                  "4:6: log: expected a mapping with keys level, format, access, found a list\n"
                  "6:3: upstreams: expected a mapping of upstream names to their settings, found a list\n"
                  "7:9: routes: expected a list of routes, found \"api\"\n");
    expect_errors(
        "routes:\n"
        "  - just a string\n"
        "  -\n"
        "upstreams:\n"
        "  api: [x]\n"
        "  web: { targets: \"x:1\" }\n"
        "log:\n"
        "  level:\n"
        "  [a]: 1\n",
        "2:5: routes[0]: expected a route (a mapping with keys name, match, upstream, sql, ratelimit, "
        "cache, invalidate), found \"just a string\"\n"
        "3:4: routes[1]: expected a route (a mapping with keys name, match, upstream, sql, ratelimit, "
        "cache, invalidate), found nothing\n"
        "5:8: upstreams.api: expected a mapping with keys targets, balance, connect_timeout, timeout, "
        "keepalive, max_fails, fail_timeout, retries, found a list\n"
        "6:19: upstreams.web.targets: expected a list of strings, found \"x:1\"\n"
        "8:9: log.level: expected one of error, warn, info or debug, found nothing\n"
        "9:3: log: expected a key name, found a list\n");
}

static void test_error_bad_duration(void **state)
{
    (void)state;
    expect_errors(
        "server:\n"
        "  read_timeout: fast\n"
        "  request_timeout: 0s\n"
        "  drain_timeout: 10\n"
        "redis:\n"
        "  timeout: 0.5ms\n"
        "cache:\n"
        "  stale_if_error: -1s\n"
        "upstreams:\n"
        "  api: { targets: [\"a:1\"], timeout: 87601h }\n",
        "2:17: server.read_timeout: expected a duration like 250ms, 5s, 10m, found \"fast\"\n"
        "3:20: server.request_timeout: expected a duration > 0, found \"0s\"\n"
        "4:18: server.drain_timeout: expected a duration like 250ms, 5s, 10m, found \"10\" (a number "
        "needs a unit: ms, s, m or h)\n"
        "6:12: redis.timeout: expected a whole number of milliseconds, found \"0.5ms\"\n"
        "8:19: cache.stale_if_error: expected a duration like 250ms, 5s, 10m, found \"-1s\"\n"
        "10:37: upstreams.api.timeout: expected a duration of at most 87600h, found \"87601h\"\n");
}

static void test_zero_durations_where_allowed(void **state)
{
    config_t *cfg = load_ok("cache: { stale_while_revalidate: 0, stale_if_error: 0s }\n"
                            "postgres:\n"
                            "  databases: { main: { dbname: a, user: a } }\n"
                            "  query_timeout: 0s\n"
                            "  server_lifetime: 0\n");

    (void)state;
    assert_int_equal(cfg->cache.stale_while_revalidate_ms, 0);
    assert_int_equal(cfg->cache.stale_if_error_ms, 0);
    assert_int_equal(cfg->postgres.query_timeout_ms, 0);
    assert_int_equal(cfg->postgres.server_lifetime_ms, 0);
    config_free(cfg);
}

static void test_error_bad_size(void **state)
{
    (void)state;
    expect_errors("server:\n"
                  "  max_header_bytes: 2MiB\n"
                  "  max_body_bytes: big\n"
                  "cache:\n"
                  "  max_object_bytes: 0.1KiB\n"
                  "compression:\n"
                  "  min_bytes: 99999999999999999999\n",
                  "2:21: server.max_header_bytes: expected a size 1KiB..1MiB, found \"2MiB\"\n"
                  "3:19: server.max_body_bytes: expected a size like 512, 16KiB, 10MiB, found \"big\"\n"
                  "5:21: cache.max_object_bytes: expected a whole number of bytes, found \"0.1KiB\"\n"
                  "7:14: compression.min_bytes: expected a size 0..1GiB, found \"99999999999999999999\"\n");
}

static void test_error_out_of_range(void **state)
{
    (void)state;
    expect_errors("server:\n"
                  "  workers: 300\n"
                  "  max_connections: lots\n"
                  "compression:\n"
                  "  gzip_level: 0\n"
                  "redis:\n"
                  "  connections_per_worker: 65\n",
                  "2:12: server.workers: expected an integer 0..256, found \"300\"\n"
                  "3:20: server.max_connections: expected an integer 1..1000000, found \"lots\"\n"
                  "5:15: compression.gzip_level: expected an integer 1..9, found \"0\"\n"
                  "7:27: redis.connections_per_worker: expected an integer 1..64, found \"65\"\n");
}

static void test_error_bad_enum_and_bool(void **state)
{
    (void)state;
    expect_errors(
        "log:\n"
        "  level: verbose\n"
        "  format: JSON\n"
        "  access: maybe\n"
        "upstreams:\n"
        "  api: { targets: [\"a:1\"], balance: round-robin }\n",
        "2:10: log.level: expected one of error, warn, info or debug, found \"verbose\"\n"
        "3:11: log.format: expected one of json or text, found \"JSON\"; did you mean \"json\"?\n"
        "4:11: log.access: expected true or false, found \"maybe\"\n"
        "6:37: upstreams.api.balance: expected one of round_robin or least_conn, found \"round-robin\"; "
        "did you mean \"round_robin\"?\n");
}

static void test_error_missing_required(void **state)
{
    (void)state;
    expect_errors(
        "postgres:\n"
        "  databases:\n"
        "    main: { host: db }\n"
        "ratelimit:\n"
        "  policies:\n"
        "    per_ip: { window: 1s }\n"
        "upstreams:\n"
        "  api: {}\n"
        "server:\n"
        "  tls: { cert: /dev/null }\n"
        "routes:\n"
        "  - match: { path: /x }\n"
        "    upstream: api\n",
        "3:11: postgres.databases.main.dbname: expected a non-empty string (required), found no such key\n"
        "3:11: postgres.databases.main.user: expected a non-empty string (required), found no such key\n"
        "6:13: ratelimit.policies.per_ip.limit: expected an integer 1..1000000000 (required), found no "
        "such key\n"
        "6:13: ratelimit.policies.per_ip.key: expected a string or a list of strings (required), found no "
        "such key\n"
        "8:8: upstreams.api.targets: expected a list of strings (required), found no such key\n"
        "10:8: server.tls.key: expected a non-empty string (required), found no such key\n"
        "12:5: routes[0].name: expected a non-empty string (required), found no such key\n");
    expect_errors(
        "postgres:\n"
        "  pool_mode: session\n"
        "server:\n"
        "  tls:\n",
        "2:3: postgres.databases: expected a mapping of database names to their settings (required), "
        "found no such key\n"
        "4:7: server.tls.cert: expected a non-empty string (required), found no such key\n"
        "4:7: server.tls.key: expected a non-empty string (required), found no such key\n");
    expect_errors(
        "routes:\n"
        "  - name: \"\"\n"
        "    match: { path: /a }\n"
        "    sql: { database: main }\n",
        "2:11: routes[0].name: expected a non-empty string, found \"\"\n"
        "4:10: routes[0].sql.query: expected a non-empty string (required), found no such key\n"
        "4:22: routes[0].sql.database: expected the name of a database under postgres.databases, found "
        "\"main\" (none is defined)\n");
}

static void test_error_unset_variable(void **state)
{
    (void)state;
    unsetenv("GW_T_UNSET_TOKEN");
    setenv("GW_T_WORKERS", "lots", 1);
    expect_errors(
        "admin:\n"
        "  token: \"${GW_T_UNSET_TOKEN}\"\n"
        "  listen: \"127.0.0.1:${GW_T_ADMIN_PORT\"\n"
        "server:\n"
        "  workers: \"${GW_T_WORKERS}\"\n"
        "log:\n"
        "  level: ${9}\n",
        "2:10: admin.token: expected environment variable GW_T_UNSET_TOKEN to be set (or a default: "
        "${GW_T_UNSET_TOKEN:-value}), found it unset\n"
        "3:11: admin.listen: expected ${NAME} or ${NAME:-default} closed by '}', found "
        "\"${GW_T_ADMIN_PORT\"\n"
        "5:12: server.workers: expected an integer 0..256, found \"lots\" (from \"${GW_T_WORKERS}\")\n"
        "7:10: log.level: expected ${NAME} or ${NAME:-default} with NAME of letters, digits and '_' "
        "(write $${ for a literal ${), found \"${9}\"\n");
}

static void test_error_undefined_references(void **state)
{
    (void)state;
    expect_errors(
        "postgres:\n"
        "  databases:\n"
        "    main: { dbname: app, user: app }\n"
        "ratelimit:\n"
        "  policies:\n"
        "    per_ip: { limit: 10, window: 1s, key: client_ip }\n"
        "upstreams:\n"
        "  api: { targets: [\"127.0.0.1:1\"] }\n"
        "routes:\n"
        "  - name: a\n"
        "    match: { prefix: / }\n"
        "    upstream: apx\n"
        "    ratelimit: [per_ip, per_ipp, other]\n"
        "  - name: b\n"
        "    match: { path: /b }\n"
        "    sql: { database: mian, query: \"select 1\" }\n"
        "  - name: c\n"
        "    match: { path: /c }\n"
        "    upstream: web\n"
        "    ratelimit: nobody\n",
        "12:15: routes[0].upstream: expected the name of an upstream (api), found \"apx\"; did you mean "
        "\"api\"?\n"
        "13:25: routes[0].ratelimit[1]: expected the name of a policy under ratelimit.policies (per_ip), "
        "found \"per_ipp\"; did you mean \"per_ip\"?\n"
        "13:34: routes[0].ratelimit[2]: expected the name of a policy under ratelimit.policies (per_ip), "
        "found \"other\"\n"
        "16:22: routes[1].sql.database: expected the name of a database under postgres.databases (main), "
        "found \"mian\"; did you mean \"main\"?\n"
        "19:15: routes[2].upstream: expected the name of an upstream (api), found \"web\"\n"
        "20:16: routes[2].ratelimit: expected the name of a policy under ratelimit.policies (per_ip), "
        "found \"nobody\"\n");
}

static void test_error_route_match(void **state)
{
    (void)state;
    expect_errors(
        "upstreams:\n"
        "  api: { targets: [\"127.0.0.1:1\"] }\n"
        "routes:\n"
        "  - name: a\n"
        "    match: { methods: [GET] }\n"
        "    upstream: api\n"
        "  - name: b\n"
        "    match: { path: /b, prefix: /b/ }\n"
        "    upstream: api\n"
        "  - name: c\n"
        "    upstream: api\n"
        "  - name: d\n"
        "    match: { path: b, prefix: \"/d e\" }\n"
        "    upstream: api\n",
        "5:12: routes[0].match: expected a path or a prefix, found neither\n"
        "8:24: routes[1].match.prefix: expected exactly one of path and prefix, found both\n"
        "10:5: routes[2].match: expected a mapping with keys path, prefix, methods (required), found no "
        "such key\n"
        "13:20: routes[3].match.path: expected a path starting with '/', without spaces, '?' or '#', found "
        "\"b\"\n"
        "13:23: routes[3].match.prefix: expected exactly one of path and prefix, found both\n"
        "13:31: routes[3].match.prefix: expected a path starting with '/', without spaces, '?' or '#', "
        "found \"/d e\"\n");
}

static void test_error_upstream_and_sql(void **state)
{
    (void)state;
    expect_errors("postgres:\n"
                  "  databases:\n"
                  "    main: { dbname: app, user: app }\n"
                  "upstreams:\n"
                  "  api: { targets: [\"127.0.0.1:1\"] }\n"
                  "routes:\n"
                  "  - name: a\n"
                  "    match: { path: /a }\n"
                  "    upstream: api\n"
                  "    sql: { database: main, query: \"select 1\" }\n"
                  "  - name: b\n"
                  "    match: { path: /b }\n",
                  "10:5: routes[0].sql: expected exactly one of upstream and sql, found both\n"
                  "11:5: routes[1]: expected an upstream or a sql section, found neither\n");
}

static void test_error_bad_method(void **state)
{
    (void)state;
    expect_errors(
        "upstreams:\n"
        "  api: { targets: [\"127.0.0.1:1\"] }\n"
        "routes:\n"
        "  - name: a\n"
        "    match: { path: /a, methods: [get, Post, TRACE, GTE] }\n"
        "    upstream: api\n"
        "  - name: b\n"
        "    match: { path: /b, methods: [] }\n"
        "    upstream: api\n"
        "  - name: c\n"
        "    match: { path: /c, methods: CONNECT }\n"
        "    upstream: api\n",
        "5:45: routes[0].match.methods[2]: expected one of GET, POST, PUT, DELETE, PATCH, HEAD, OPTIONS or "
        "ALL, found \"TRACE\"\n"
        "5:52: routes[0].match.methods[3]: expected one of GET, POST, PUT, DELETE, PATCH, HEAD, OPTIONS or "
        "ALL, found \"GTE\"; did you mean \"GET\"?\n"
        "8:33: routes[1].match.methods: expected at least 1 method, found an empty list\n"
        "11:33: routes[2].match.methods: expected one of GET, POST, PUT, DELETE, PATCH, HEAD, OPTIONS or "
        "ALL, found \"CONNECT\"\n");
}

static void test_error_bad_param_reference(void **state)
{
    (void)state;
    expect_errors(
        "postgres:\n"
        "  databases:\n"
        "    main: { dbname: app, user: app }\n"
        "routes:\n"
        "  - name: a\n"
        "    match: { path: \"/p/:id\" }\n"
        "    sql:\n"
        "      database: main\n"
        "      query: \"select $1, $2, $3\"\n"
        "      params: [path.id, path.pid, cookie.x]\n"
        "      defaults: { query.limit: \"5\" }\n"
        "  - name: b\n"
        "    match: { path: \"/q/:x/:x\" }\n"
        "    sql: { database: main, query: q }\n"
        "  - name: c\n"
        "    match: { prefix: /c }\n"
        "    sql: { database: main, query: q, params: [path.id] }\n"
        "  - name: d\n"
        "    match: { path: \"/d/:1x/a:b\" }\n"
        "    sql: { database: main, query: q }\n",
        "10:25: routes[0].sql.params[1]: expected path.X with X a :param of the route's path (id), found "
        "\"path.pid\"\n"
        "10:35: routes[0].sql.params[2]: expected path.X, query.X or header.X, found \"cookie.x\"\n"
        "11:19: routes[0].sql.defaults.query.limit: expected one of the route's sql.params (path.id, "
        "path.pid), found \"query.limit\"\n"
        "13:20: routes[1].match.path: expected a path whose :param names are unique, found \"/q/:x/:x\" "
        "(:x repeats)\n"
        "17:47: routes[2].sql.params[0]: expected path.X with X a :param of the route's path, found "
        "\"path.id\" (the route's path has no :param)\n"
        "19:20: routes[3].match.path: expected a path whose ':' only starts a segment (/:name), found "
        "\"/d/:1x/a:b\"\n");
    expect_errors(
        "routes:\n"
        "  - name: d\n"
        "    match: { path: \"/d/:1x\" }\n"
        "    upstream: x\n",
        "3:20: routes[0].match.path: expected a path whose :param segments are names of letters, digits "
        "and '_', found \"/d/:1x\"\n"
        "4:15: routes[0].upstream: expected the name of an upstream, found \"x\" (none is defined)\n");
}

static void test_error_bucket_order(void **state)
{
    (void)state;
    expect_errors(
        "metrics:\n"
        "  buckets: [0.1, 0.5, 0.5, 0.25, 1]\n",
        "2:23: metrics.buckets[2]: expected a number greater than 0.5 (buckets strictly increase), found "
        "\"0.5\"\n"
        "2:28: metrics.buckets[3]: expected a number greater than 0.5 (buckets strictly increase), found "
        "\"0.25\"\n");
    expect_errors("metrics:\n"
                  "  buckets: []\n"
                  "  path: metrics\n",
                  "2:12: metrics.buckets: expected at least 1 bucket, found an empty list\n"
                  "3:9: metrics.path: expected a path starting with '/', without spaces, '?' or '#', found "
                  "\"metrics\"\n");
    expect_errors("metrics:\n"
                  "  buckets: [0.1, fast, .inf, [1]]\n",
                  "2:18: metrics.buckets[1]: expected a finite number, found \"fast\"\n"
                  "2:24: metrics.buckets[2]: expected a finite number, found \".inf\"\n"
                  "2:30: metrics.buckets[3]: expected a finite number, found a list\n");
}

static void test_error_store_without_redis(void **state)
{
    (void)state;
    expect_errors("cache:\n"
                  "  store: redis\n"
                  "ratelimit:\n"
                  "  store: redis\n",
                  "2:10: cache.store: expected memory (there is no redis: section), found \"redis\"\n"
                  "4:10: ratelimit.store: expected local (there is no redis: section), found \"redis\"\n");
    expect_errors(
        "cache:\n"
        "  store: memory\n"
        "  memory_max_bytes: 512KiB\n",
        "3:21: cache.memory_max_bytes: expected at least max_object_bytes (1MiB) with store: memory, found "
        "\"512KiB\"\n");
}

static void test_error_pool_sizes(void **state)
{
    (void)state;
    expect_errors(
        "postgres:\n"
        "  databases:\n"
        "    main: { dbname: a, user: a, pool_size: 50, max_db_connections: 40 }\n"
        "  default_pool_size: 200\n",
        "3:44: postgres.databases.main.pool_size: expected at most max_db_connections (40), found \"50\"\n"
        "4:22: postgres.default_pool_size: expected at most max_db_connections (100), found \"200\"\n");
    expect_errors("postgres:\n"
                  "  databases:\n"
                  "    main: { dbname: a, user: a, port: 99999 }\n"
                  "  min_pool_size: 30\n"
                  "  max_db_connections: 0\n",
                  "3:39: postgres.databases.main.port: expected a port 1..65535, found \"99999\"\n"
                  "4:18: postgres.min_pool_size: expected at most default_pool_size (25), found \"30\"\n"
                  "5:23: postgres.max_db_connections: expected an integer 1..10000, found \"0\"\n");
}

static void test_error_addresses(void **state)
{
    (void)state;
    expect_errors(
        "server:\n"
        "  listen: [localhost, \"host:0\", \"::1:80\", \"[::1]:99999\", \"0.0.0.0:9901\"]\n"
        "admin:\n"
        "  listen: 127.0.0.1:9901\n"
        "upstreams:\n"
        "  api:\n"
        "    targets: [\"a:1\", \"a:1\", \"b\"]\n",
        "2:12: server.listen[0]: expected an address host:port or [v6addr]:port with a port 1..65535, "
        "found \"localhost\"\n"
        "2:23: server.listen[1]: expected an address host:port or [v6addr]:port with a port 1..65535, "
        "found \"host:0\"\n"
        "2:33: server.listen[2]: expected an address host:port, with an IPv6 address in brackets like "
        "[::1]:8080, found \"::1:80\"\n"
        "2:43: server.listen[3]: expected an address host:port or [v6addr]:port with a port 1..65535, "
        "found \"[::1]:99999\"\n"
        "4:11: admin.listen: expected an address apart from server.listen (0.0.0.0:9901), found "
        "\"127.0.0.1:9901\"\n"
        "7:22: upstreams.api.targets[1]: expected each value once, found \"a:1\" again\n"
        "7:29: upstreams.api.targets[2]: expected an address host:port or [v6addr]:port with a port "
        "1..65535, found \"b\"\n");
}

static void test_error_names(void **state)
{
    (void)state;
    expect_errors(
        "upstreams:\n"
        "  bad name: { targets: [\"127.0.0.1:1\"] }\n"
        "routes:\n"
        "  - name: a b\n"
        "    match: { path: /a }\n"
        "    upstream: bad name\n"
        "  - name: ok\n"
        "    match: { path: /ok }\n"
        "    upstream: bad name\n"
        "  - name: ok\n"
        "    match: { path: /ok2 }\n"
        "    upstream: bad name\n",
        "2:3: upstreams.bad name: expected a name of letters, digits, '_', '.' and '-', found \"bad "
        "name\"\n"
        "4:11: routes[0].name: expected a name of letters, digits, '_', '.' and '-', found \"a b\"\n"
        "10:11: routes[2].name: expected a unique route name, found \"ok\" again (first at line 7)\n");
}

static void test_error_policy_key(void **state)
{
    (void)state;
    expect_errors(
        "ratelimit:\n"
        "  policies:\n"
        "    a: { limit: 1, window: 1s, key: cookie }\n"
        "    b: { limit: 1, window: 1s, key: [client_ip, \"header:\"] }\n"
        "    c: { limit: 1, window: 1s, key: \"client_ip+route+\" }\n"
        "    d: { limit: 1, window: 1s, key: {} }\n"
        "    e: { limit: 0, window: 0s, key: [] }\n",
        "3:37: ratelimit.policies.a.key: expected client_ip, route or header:NAME, alone or joined with "
        "'+', found \"cookie\"\n"
        "4:49: ratelimit.policies.b.key[1]: expected client_ip, route or header:NAME, alone or joined "
        "with '+', found \"header:\"\n"
        "5:37: ratelimit.policies.c.key: expected client_ip, route or header:NAME, alone or joined with "
        "'+', found \"client_ip+route+\"\n"
        "6:37: ratelimit.policies.d.key: expected a string or a list of strings, found a mapping\n"
        "7:17: ratelimit.policies.e.limit: expected an integer 1..1000000000, found \"0\"\n"
        "7:28: ratelimit.policies.e.window: expected a duration > 0, found \"0s\"\n"
        "7:37: ratelimit.policies.e.key: expected at least one string, found an empty list\n");
}

static void test_error_route_cache(void **state)
{
    (void)state;
    expect_errors(
        "upstreams:\n"
        "  api: { targets: [\"127.0.0.1:1\"] }\n"
        "routes:\n"
        "  - name: a\n"
        "    match: { path: \"/a/:id\" }\n"
        "    upstream: api\n"
        "    cache: { key: \"{path.idd}\" }\n"
        "  - name: b\n"
        "    match: { path: /b }\n"
        "    upstream: api\n"
        "    cache: { key: \"x{nope}\", unless: { cookie.x: \"1\" } }\n"
        "  - name: c\n"
        "    match: { path: /c }\n"
        "    upstream: api\n"
        "    cache: { key: \"x{query.a\", ttl: 0s }\n",
        "7:19: routes[0].cache.key: expected path.X with X a :param of the route's path (id), found "
        "\"path.idd\"\n"
        "11:19: routes[1].cache.key: expected {method}, {path}, {query}, {path.X}, {query.X} or "
        "{header.X}, found \"nope\"\n"
        "11:40: routes[1].cache.unless.cookie.x: expected query.X, header.X or method, found \"cookie.x\"\n"
        "15:19: routes[2].cache.key: expected a template with balanced {braces}, found \"x{query.a\"\n"
        "15:37: routes[2].cache.ttl: expected a duration > 0, found \"0s\"\n");
}

/* A cached SQL route's key must hold every value its query binds. */
static void test_error_sql_cache_key(void **state)
{
    (void)state;
    expect_errors(
        "postgres:\n"
        "  databases: { main: { host: 127.0.0.1, dbname: app, user: app } }\n"
        "routes:\n"
        "  - name: me\n"
        "    match: { path: /me }\n"
        "    sql: { database: main, query: \"select $1\", params: [header.X-User], result: object }\n"
        "    cache: { ttl: 60s }\n"
        "  - name: p\n"
        "    match: { path: \"/p/:id\" }\n"
        "    sql: { database: main, query: \"select $1, $2\", params: [path.id, query.q], result: object }\n"
        "    cache: { key: \"p:{path.id}\" }\n"
        "  - name: ok\n"
        "    match: { path: \"/ok/:id\" }\n"
        "    sql: { database: main, query: \"select $1, $2, $3\", params: [path.id, query.q, header.X-T],\n"
        "           result: object }\n"
        "    cache: { key: \"ok:{path}:{query}:{header.x-t}\" }\n"
        "  - name: list\n"
        "    match: { path: /list }\n"
        "    sql: { database: main, query: \"select 1\", result: array }\n"
        "    cache: { key: \"list:{query.limit}\" }\n",
        "7:12: routes[0].cache.key: expected a key that names {header.X-User} (the route's SQL binds it, so "
        "its "
        "answer depends on it), found \"cache:<method>:<path>?<sorted query>\"\n"
        "11:19: routes[1].cache.key: expected a key that names {query.q} (the route's SQL binds it, so its "
        "answer "
        "depends on it), found \"p:{path.id}\"\n"
        "20:19: routes[3].cache.key: expected a key that names {query}, or {query.limit} and {query.offset} "
        "(the "
        "route answers pages by them), found \"list:{query.limit}\"\n");
}

static void test_error_compression_and_redis(void **state)
{
    (void)state;
    expect_errors("compression:\n"
                  "  algorithms: [br, br, zstd]\n"
                  "  types: [text, \"*/*\", \"text/*\", application/json]\n"
                  "redis:\n"
                  "  url: http://x\n",
                  "2:20: compression.algorithms[1]: expected each value once, found \"br\" again\n"
                  "2:24: compression.algorithms[2]: expected br or gzip, found \"zstd\"\n"
                  "3:11: compression.types[0]: expected a media type like application/json or text/*, found "
                  "\"text\"\n"
                  "3:17: compression.types[1]: expected a media type like application/json or text/*, found "
                  "\"*/*\"\n"
                  "5:8: redis.url: expected a URL starting with redis://, found \"http://x\"\n");
}

static void test_error_tls_unreadable(void **state)
{
    (void)state;
    expect_errors(
        "server:\n"
        "  tls:\n"
        "    cert: /nonexistent/x.crt\n"
        "    key: /dev/null\n",
        "3:11: server.tls.cert: expected a readable file, found \"/nonexistent/x.crt\" (No such file or "
        "directory)\n");
}

static void test_error_syntax(void **state)
{
    (void)state;
    expect_errors(
        "server:\n  listen: [a\n",
        "3:1: (syntax): expected valid YAML, found a syntax error: did not find expected ',' or ']' "
        "(while parsing a flow sequence at line 2 column 11)\n");
    expect_errors(
        "server:\n  listen: \"x:1\"\n bad: 1\n",
        "3:2: (syntax): expected valid YAML, found a syntax error: did not find expected key (while "
        "parsing a block mapping at line 1 column 1)\n");
    expect_errors("server:\n  workers: \xff\n",
                  "2:12: (syntax): expected valid YAML, found a syntax error: invalid leading UTF-8 octet\n");
    expect_errors("log: {}\n---\nlog: {}\n",
                  "3:1: (top level): expected one YAML document, found a second\n");
}

static void test_error_empty_file(void **state)
{
    static const char want[] = "1:1: (top level): expected a mapping of sections (server, upstreams, routes, "
                               "...), found an empty file\n";

    (void)state;
    expect_errors("", want);
    expect_errors("# only a comment\n\n", want);
    expect_errors(
        "- a\n",
        "1:1: (top level): expected a mapping of sections (server, upstreams, routes, ...), found a list\n");
    expect_errors("just text\n",
                  "1:1: (top level): expected a mapping of sections (server, upstreams, routes, ...), "
                  "found \"just text\"\n");
}

static void test_error_missing_file(void **state)
{
    char *errors = (char *)"untouched";
    config_t *cfg = config_load("/nonexistent/dir/gateway.yaml", &errors);

    (void)state;
    assert_null(cfg);
    assert_string_equal(errors,
                        "/nonexistent/dir/gateway.yaml:1:1: (file): expected a readable file, found it "
                        "unreadable (No such file or directory)\n");
    free(errors);
}

/* The fixture holds many mistakes; each is reported, in file order, and nothing else. */
static void test_errors_fixture_reports_all(void **state)
{
    char *path = data_path("errors.yaml"), *raw = NULL, *errors;
    config_t *cfg = config_load(path, &raw);

    (void)state;
    assert_null(cfg);
    assert_non_null(raw);
    errors = strip_file(raw, path);
    assert_string_equal(
        errors,
        "3:28: server.listen[1]: expected an address host:port or [v6addr]:port with a port 1..65535, found "
        "\"localhost:70000\"\n"
        "4:12: server.workers: expected an integer 0..256, found \"many\"\n"
        "5:17: server.read_timeout: expected a duration like 250ms, 5s, 10m, found \"10\" (a number needs a "
        "unit: "
        "ms, s, m or h)\n"
        "7:3: server.request_timeout: expected each key once, found \"request_timeout\" again (first at line "
        "6)\n"
        "9:9: metrics.path: expected a path starting with '/', without spaces, '?' or '#', found "
        "\"metrics\"\n"
        "10:18: metrics.buckets[1]: expected a number greater than 0.5 (buckets strictly increase), found "
        "\"0.1\"\n"
        "12:3: log.levle: expected a key of log (level, format, access), found \"levle\"; did you mean "
        "\"level\"?\n"
        "14:10: cache.store: expected memory (there is no redis: section), found \"redis\"\n"
        "18:14: upstreams.api.retries: expected an integer 0..5, found \"9\"\n"
        "21:41: routes[0].match.methods[1]: expected one of GET, POST, PUT, DELETE, PATCH, HEAD, OPTIONS or "
        "ALL, "
        "found \"FETCH\"; did you mean \"PATCH\"?\n"
        "22:15: routes[0].upstream: expected the name of an upstream (api), found \"apii\"; did you mean "
        "\"api\"?\n"
        "23:11: routes[1].name: expected a unique route name, found \"one\" again (first at line 20)\n"
        "26:17: routes[1].ratelimit[0]: expected the name of a policy under ratelimit.policies, found "
        "\"nobody\" "
        "(none is defined)\n");
    free(errors);
    free(raw);
    free(path);
}

static void test_error_strings_with_nul(void **state)
{
    (void)state;
    expect_errors("log:\n  level: \"in\\0fo\"\n", "2:10: log.level: expected text, found a string with a NUL "
                                                  "character\n");
}

/* Errors past the cap are counted, not listed, so a hostile file cannot flood memory. */
static void test_error_cap(void **state)
{
    size_t n = 1200, len = 32 + n * 32;
    char *text = malloc(len), *errors = NULL, *last;
    size_t at = 0, lines = 0;
    config_t *cfg;

    (void)state;
    assert_non_null(text);
    at += (size_t)snprintf(text + at, len - at, "routes:\n");
    for (size_t i = 0; i < n; i++)
        at += (size_t)snprintf(text + at, len - at, "  - { name: \"r%zu\" }\n", i);
    cfg = load_text(text, &errors);
    assert_null(cfg);
    for (const char *p = errors; *p; p++)
        lines += *p == '\n';
    /* Each route lacks match and an upstream: 2400 errors, 1000 listed, then one summary line. */
    assert_int_equal(lines, 1001);
    last = strstr(errors, "(more)");
    assert_non_null(last);
    assert_string_equal(last, "(more): expected at most 1000 errors, found 1400 more\n");
    free(errors);
    free(text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_example_loads_with_every_value),
        cmocka_unit_test(test_example_environment_overrides),
        cmocka_unit_test(test_example_verbatim_fails_only_on_tls_files),
        cmocka_unit_test(test_minimal_file_gets_every_default),
        cmocka_unit_test(test_redis_section_makes_redis_the_default_store),
        cmocka_unit_test(test_empty_values),
        cmocka_unit_test(test_listen_forms),
        cmocka_unit_test(test_route_forms),
        cmocka_unit_test(test_route_ttl_defaults_to_cache_default_ttl),
        cmocka_unit_test(test_env_expansion_in_values),
        cmocka_unit_test(test_zero_durations_where_allowed),
        cmocka_unit_test(test_error_unknown_key_suggests),
        cmocka_unit_test(test_error_duplicate_key),
        cmocka_unit_test(test_error_wrong_type),
        cmocka_unit_test(test_error_bad_duration),
        cmocka_unit_test(test_error_bad_size),
        cmocka_unit_test(test_error_out_of_range),
        cmocka_unit_test(test_error_bad_enum_and_bool),
        cmocka_unit_test(test_error_missing_required),
        cmocka_unit_test(test_error_unset_variable),
        cmocka_unit_test(test_error_undefined_references),
        cmocka_unit_test(test_error_route_match),
        cmocka_unit_test(test_error_upstream_and_sql),
        cmocka_unit_test(test_error_bad_method),
        cmocka_unit_test(test_error_bad_param_reference),
        cmocka_unit_test(test_error_bucket_order),
        cmocka_unit_test(test_error_store_without_redis),
        cmocka_unit_test(test_error_pool_sizes),
        cmocka_unit_test(test_error_addresses),
        cmocka_unit_test(test_error_names),
        cmocka_unit_test(test_error_policy_key),
        cmocka_unit_test(test_error_route_cache),
        cmocka_unit_test(test_error_sql_cache_key),
        cmocka_unit_test(test_error_compression_and_redis),
        cmocka_unit_test(test_error_tls_unreadable),
        cmocka_unit_test(test_error_syntax),
        cmocka_unit_test(test_error_empty_file),
        cmocka_unit_test(test_error_missing_file),
        cmocka_unit_test(test_errors_fixture_reports_all),
        cmocka_unit_test(test_error_strings_with_nul),
        cmocka_unit_test(test_error_cap),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

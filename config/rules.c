/*
 * rules.c - the validation rules the key table points at: the shape of one value
 * (an address, a route path, a rate-limit key) and the checks that tie keys together
 * (pool sizes, store versus redis:, route references).
 *
 * Runs on the thread that calls config_load. The one idea: a value rule sees only its
 * text and says what it expected; a check sees a filled struct and the YAML node it
 * came from, and places each error on the node the user has to change. Cross checks
 * read what the user wrote (node presence) rather than what was stored, so a value
 * that was already reported as bad does not cause a second, confusing error.
 */
#include "config/config_internal.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CONFIG_PORT_MAX 65535
#define CONFIG_PARAMS_MAX 64
#define CONFIG_NAMES_TEXT_MAX 200
#define CONFIG_MESSAGE_PATH_MAX 512
#define CONFIG_PATH_NS "path."
#define CONFIG_PATH_NS_LEN (sizeof CONFIG_PATH_NS - 1)

static bool fail(config_why *why, const char *expected)
{
    config_bprintf(why->expected, sizeof why->expected, "%s", expected);
    return false;
}

/* RFC 9110 token characters (header names, media types). */
static bool is_tchar(char c)
{
    return isalnum((unsigned char)c) || (c && strchr("!#$%&'*+-.^_`|~", c));
}

static bool all_tchars(const char *s, size_t n)
{
    if (n == 0)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!is_tchar(s[i]))
            return false;
    return true;
}

static bool is_identifier(const char *s, size_t n)
{
    if (n == 0 || !(isalpha((unsigned char)s[0]) || s[0] == '_'))
        return false;
    for (size_t i = 1; i < n; i++)
        if (!(isalnum((unsigned char)s[i]) || s[i] == '_'))
            return false;
    return true;
}

static bool valid_port_text(const char *s)
{
    size_t n = strlen(s);
    long port;

    if (n == 0 || n > 5 || strspn(s, "0123456789") != n)
        return false;
    port = strtol(s, NULL, 10);
    return port >= 1 && port <= CONFIG_PORT_MAX;
}

bool config_valid_address(const char *value, config_why *why)
{
    static const char expected[] = "an address host:port or [v6addr]:port with a port 1..65535";
    const char *port;

    if (value[0] == '[') {
        const char *close = strchr(value, ']');
        size_t n;
        if (!close || close[1] != ':')
            return fail(why, expected);
        n = (size_t)(close - value - 1);
        if (n == 0 || strspn(value + 1, "0123456789abcdefABCDEF:.") != n || !memchr(value + 1, ':', n))
            return fail(why, expected);
        port = close + 2;
    } else {
        const char *colon = strrchr(value, ':');
        size_t n;
        if (!colon || colon == value)
            return fail(why, expected);
        n = (size_t)(colon - value);
        if (memchr(value, ':', n))
            return fail(why, "an address host:port, with an IPv6 address in brackets like [::1]:8080");
        if (strspn(value, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_") != n)
            return fail(why, expected);
        port = colon + 1;
    }
    if (!valid_port_text(port))
        return fail(why, expected);
    return true;
}

bool config_valid_readable_file(const char *value, config_why *why)
{
    if (access(value, R_OK) == 0)
        return true;
    config_bprintf(why->detail, sizeof why->detail, "%s", strerror(errno));
    return fail(why, "a readable file");
}

/* Printable, no spaces, and none of the characters that end a path. */
static bool clean_path(const char *value)
{
    for (const char *p = value; *p; p++)
        if ((unsigned char)*p <= ' ' || *p == 0x7f || *p == '?' || *p == '#')
            return false;
    return value[0] == '/';
}

bool config_valid_http_path(const char *value, config_why *why)
{
    if (!clean_path(value))
        return fail(why, "a path starting with '/', without spaces, '?' or '#'");
    return true;
}

bool config_valid_route_prefix(const char *value, config_why *why)
{
    return config_valid_http_path(value, why);
}

size_t config_path_params(const char *path, const char **names, size_t *lens, size_t max)
{
    size_t n = 0;

    for (const char *p = path; *p && n < max; p++) {
        if (*p == ':' && p > path && p[-1] == '/') {
            size_t len = strcspn(p + 1, "/");
            names[n] = p + 1;
            lens[n] = len;
            n++;
        }
    }
    return n;
}

bool config_valid_route_path(const char *value, config_why *why)
{
    const char *names[CONFIG_PARAMS_MAX];
    size_t lens[CONFIG_PARAMS_MAX], n;

    if (!clean_path(value))
        return fail(why, "a path starting with '/', without spaces, '?' or '#'");
    for (const char *p = strchr(value, ':'); p; p = strchr(p + 1, ':')) {
        if (p[-1] != '/')
            return fail(why, "a path whose ':' only starts a segment (/:name)");
    }
    n = config_path_params(value, names, lens, CONFIG_PARAMS_MAX);
    for (size_t i = 0; i < n; i++) {
        if (!is_identifier(names[i], lens[i]))
            return fail(why, "a path whose :param segments are names of letters, digits and '_'");
        for (size_t j = 0; j < i; j++) {
            if (lens[i] == lens[j] && memcmp(names[i], names[j], lens[i]) == 0) {
                config_bprintf(why->detail, sizeof why->detail, ":%.*s repeats", (int)lens[i], names[i]);
                return fail(why, "a path whose :param names are unique");
            }
        }
    }
    return true;
}

bool config_valid_redis_url(const char *value, config_why *why)
{
    static const char scheme[] = "redis://";

    if (strncmp(value, scheme, sizeof scheme - 1) != 0 || value[sizeof scheme - 1] == '\0')
        return fail(why, "a URL starting with redis://");
    return true;
}

bool config_valid_port(const char *value, config_why *why)
{
    if (!valid_port_text(value))
        return fail(why, "a port 1..65535");
    return true;
}

bool config_valid_label(const char *value, config_why *why)
{
    size_t n = strlen(value);

    if (n == 0 || strspn(value, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-") != n)
        return fail(why, "a name of letters, digits, '_', '.' and '-'");
    return true;
}

bool config_valid_algorithm(const char *value, config_why *why)
{
    if (strcmp(value, "br") != 0 && strcmp(value, "gzip") != 0)
        return fail(why, "br or gzip");
    return true;
}

bool config_valid_media_type(const char *value, config_why *why)
{
    const char *slash = strchr(value, '/');

    if (!slash || slash == value || !all_tchars(value, (size_t)(slash - value)) ||
        (slash - value == 1 && value[0] == '*'))
        return fail(why, "a media type like application/json or text/*");
    if (strcmp(slash + 1, "*") != 0 && !all_tchars(slash + 1, strlen(slash + 1)))
        return fail(why, "a media type like application/json or text/*");
    return true;
}

bool config_valid_cidr(const char *value, config_why *why)
{
    char addr[64];
    unsigned char bytes[16];
    const char *slash = strchr(value, '/');
    size_t n = slash ? (size_t)(slash - value) : strlen(value);
    if (n == 0 || n >= sizeof addr)
        return fail(why, "an IP address or CIDR block like 10.0.0.0/8 or fd00::/8");
    memcpy(addr, value, n);
    addr[n] = '\0';
    int family = strchr(addr, ':') ? AF_INET6 : AF_INET;
    if (inet_pton(family, addr, bytes) != 1)
        return fail(why, "an IP address or CIDR block like 10.0.0.0/8 or fd00::/8");
    if (slash) {
        char *end = NULL;
        long bits = strtol(slash + 1, &end, 10);
        if (!slash[1] || *end || bits < 0 || bits > (family == AF_INET ? 32 : 128))
            return fail(why, "a prefix length 0..32 (IPv4) or 0..128 (IPv6) after '/'");
    }
    return true;
}

bool config_valid_policy_key(const char *value, config_why *why)
{
    static const char expected[] = "client_ip, route or header:NAME, alone or joined with '+'";
    static const char header[] = "header:";
    const char *p = value;

    for (;;) {
        size_t n = strcspn(p, "+");
        if (!((n == 9 && strncmp(p, "client_ip", n) == 0) || (n == 5 && strncmp(p, "route", n) == 0) ||
              (n > sizeof header - 1 && strncmp(p, header, sizeof header - 1) == 0 &&
               all_tchars(p + sizeof header - 1, n - (sizeof header - 1)))))
            return fail(why, expected);
        if (p[n] == '\0')
            return true;
        p += n + 1;
    }
}

/* "NAMESPACE.X" with X non-empty and fit for its namespace. */
static bool sourced(const char *value, const char *ns)
{
    size_t n = strlen(ns);
    const char *x = value + n + 1;

    if (strncmp(value, ns, n) != 0 || value[n] != '.' || !*x)
        return false;
    if (strcmp(ns, "path") == 0)
        return is_identifier(x, strlen(x));
    if (strcmp(ns, "header") == 0)
        return all_tchars(x, strlen(x));
    for (; *x; x++)
        if ((unsigned char)*x <= ' ' || *x == 0x7f)
            return false;
    return true;
}

bool config_valid_param_source(const char *value, config_why *why)
{
    if (!sourced(value, "path") && !sourced(value, "query") && !sourced(value, "header"))
        return fail(why, "path.X, query.X or header.X");
    return true;
}

bool config_valid_unless_condition(const char *value, config_why *why)
{
    if (strcmp(value, "method") != 0 && !sourced(value, "query") && !sourced(value, "header"))
        return fail(why, "query.X, header.X or method");
    return true;
}

bool config_valid_sql_default(const char *value, config_why *why)
{
    if (!sourced(value, "query") && !sourced(value, "header"))
        return fail(why, "query.X or header.X");
    return true;
}

/* ---- Checks ---- */

static void child_path(char *out, const char *parent, const char *name)
{
    config_bprintf(out, CONFIG_MESSAGE_PATH_MAX, "%s.%s", parent, name);
}

/* The quoted text of scalar NODE, or the number when the key was not written. */
static void found_number(yaml_node_t *node, int64_t value, char *buf, size_t len)
{
    if (node && node->type == YAML_SCALAR_NODE)
        config_quote((const char *)node->data.scalar.value, buf, len);
    else
        config_bprintf(buf, len, "%" PRId64 " (the default)", value);
}

void config_check_buckets(config_loader *ld, void *obj, yaml_node_t *node, const char *path)
{
    config_metrics *m = obj;
    char child[CONFIG_MESSAGE_PATH_MAX], found[128];

    for (size_t i = 1; i < m->bucket_count; i++) {
        if (m->buckets[i] > m->buckets[i - 1])
            continue;
        yaml_node_t *item = config_node_item(ld, node, i);
        config_bprintf(child, sizeof child, "%s[%zu]", path, i);
        config_quote(item ? (const char *)item->data.scalar.value : "", found, sizeof found);
        config_error_at(ld, item, child,
                        "expected a number greater than %g (buckets strictly increase), found %s",
                        m->buckets[i - 1], found);
    }
}

/* "KEY: expected at most LIMIT_NAME (LIMIT), found VALUE" at KEY's node in SECTION (or SECTION). */
static void at_most(config_loader *ld, yaml_node_t *section, const char *path, const char *key, int64_t value,
                    const char *limit_name, int64_t limit)
{
    yaml_node_t *node = config_node_value(ld, section, key);
    char child[CONFIG_MESSAGE_PATH_MAX], found[128];

    child_path(child, path, key);
    found_number(node, value, found, sizeof found);
    config_error_at(ld, node ? node : section, child, "expected at most %s (%" PRId64 "), found %s",
                    limit_name, limit, found);
}

/* Whether two listen addresses would take the same socket (same port, same or wildcard host). */
static bool same_socket(const char *a, const char *b)
{
    const char *pa = strrchr(a, ':'), *pb = strrchr(b, ':');
    size_t ha, hb;

    if (!pa || !pb || strcmp(pa, pb) != 0)
        return false;
    ha = (size_t)(pa - a);
    hb = (size_t)(pb - b);
    if (ha == hb && memcmp(a, b, ha) == 0)
        return true;
    return (ha == 7 && memcmp(a, "0.0.0.0", 7) == 0) || (hb == 7 && memcmp(b, "0.0.0.0", 7) == 0) ||
           (ha == 4 && memcmp(a, "[::]", 4) == 0) || (hb == 4 && memcmp(b, "[::]", 4) == 0);
}

void config_check_admin(config_loader *ld, void *obj, yaml_node_t *node, const char *path)
{
    config_admin *admin = obj;
    config_server *server = &ld->cfg->server;
    char child[CONFIG_MESSAGE_PATH_MAX], found[128];

    if (!admin->listen)
        return;
    for (size_t i = 0; i < server->listen_count; i++) {
        if (!same_socket(admin->listen, server->listen[i]))
            continue;
        child_path(child, path, "listen");
        config_quote(admin->listen, found, sizeof found);
        config_error_at(ld, config_node_value(ld, node, "listen"), child,
                        "expected an address apart from server.listen (%s), found %s", server->listen[i],
                        found);
        return;
    }
}

void config_check_postgres(config_loader *ld, void *obj, yaml_node_t *node, const char *path)
{
    config_postgres *pg = obj;
    yaml_node_t *databases = config_node_value(ld, node, "databases");

    if (pg->min_pool_size > pg->default_pool_size)
        at_most(ld, node, path, "min_pool_size", pg->min_pool_size, "default_pool_size",
                pg->default_pool_size);
    if (pg->default_pool_size > pg->max_db_connections)
        at_most(ld, node, path, "default_pool_size", pg->default_pool_size, "max_db_connections",
                pg->max_db_connections);
    for (size_t i = 0; i < pg->database_count; i++) {
        config_database *db = &pg->databases[i];
        int64_t cap = db->max_db_connections >= 0 ? db->max_db_connections : pg->max_db_connections;
        char db_path[CONFIG_MESSAGE_PATH_MAX];

        if (db->pool_size < 0 || db->pool_size <= cap)
            continue;
        config_bprintf(db_path, sizeof db_path, "%s.databases.%s", path, db->name);
        at_most(ld, config_node_value(ld, databases, db->name), db_path, "pool_size", db->pool_size,
                "max_db_connections", cap);
    }
}

/* store: redis without a redis: section. */
static void check_store(config_loader *ld, yaml_node_t *node, const char *path, config_store store,
                        const char *alternative)
{
    yaml_node_t *written = config_node_value(ld, node, "store");
    char child[CONFIG_MESSAGE_PATH_MAX];

    if (store != CONFIG_STORE_REDIS || ld->has_redis)
        return;
    child_path(child, path, "store");
    config_error_at(ld, written ? written : node, child,
                    "expected %s (there is no redis: section), found \"redis\"", alternative);
}

void config_check_cache(config_loader *ld, void *obj, yaml_node_t *node, const char *path)
{
    config_cache *c = obj;

    check_store(ld, node, path, c->store, "memory");
    if (c->store == CONFIG_STORE_MEMORY && c->memory_max_bytes < c->max_object_bytes) {
        yaml_node_t *written = config_node_value(ld, node, "memory_max_bytes");
        char child[CONFIG_MESSAGE_PATH_MAX], found[128], limit[32];
        child_path(child, path, "memory_max_bytes");
        found_number(written, c->memory_max_bytes, found, sizeof found);
        config_format_size(c->max_object_bytes, limit, sizeof limit);
        config_error_at(ld, written ? written : node, child,
                        "expected at least max_object_bytes (%s) with store: memory, found %s", limit, found);
    }
}

/*
 * A policy's period (window / limit, rounded down) is counted in whole
 * microseconds in Redis and nanoseconds in the local store: a limit above the
 * window in those units would need a period under one, which the store
 * cannot hold (it would round to one and count a longer window). Refused
 * rather than approximated.
 */
void config_check_ratelimit(config_loader *ld, void *obj, yaml_node_t *node, const char *path)
{
    config_ratelimit *r = obj;
    bool redis = r->store == CONFIG_STORE_REDIS;
    int64_t per_ms = redis ? 1000 : 1000000;
    yaml_node_t *policies = config_node_value(ld, node, "policies");

    check_store(ld, node, path, r->store, "local");
    for (size_t i = 0; i < r->policy_count; i++) {
        const config_policy *pol = &r->policies[i];
        yaml_node_t *policy = config_node_value(ld, policies, pol->name);
        yaml_node_t *limit = config_node_value(ld, policy, "limit");
        char child[CONFIG_MESSAGE_PATH_MAX], window[64], found[128];

        if (pol->limit <= 0 || pol->window_ms <= 0 || pol->limit / per_ms < pol->window_ms ||
            (pol->limit / per_ms == pol->window_ms && pol->limit % per_ms == 0))
            continue;
        config_bprintf(child, sizeof child, "%s.policies.%s.limit", path, pol->name);
        config_format_duration(pol->window_ms, window, sizeof window);
        found_number(limit, pol->limit, found, sizeof found);
        config_error_at(ld, limit ? limit : node, child,
                        "expected at most %" PRId64 " (the window, %s, in %s: with store: %s the period "
                        "window/limit is a whole number of them), found %s",
                        pol->window_ms * per_ms, window, redis ? "microseconds" : "nanoseconds",
                        redis ? "redis" : "local", found);
    }
}

void config_check_match(config_loader *ld, void *obj, yaml_node_t *node, const char *path)
{
    yaml_node_t *path_key = config_node_key(ld, node, "path"),
                *prefix_key = config_node_key(ld, node, "prefix");
    char child[CONFIG_MESSAGE_PATH_MAX];

    (void)obj;
    if (path_key && prefix_key) {
        yaml_node_t *second = config_node_first(path_key, prefix_key) == path_key ? prefix_key : path_key;
        child_path(child, path, (const char *)second->data.scalar.value);
        config_error_at(ld, second, child, "expected exactly one of path and prefix, found both");
    } else if (!path_key && !prefix_key) {
        config_error_at(ld, node, path, "expected a path or a prefix, found neither");
    }
}

/* "a, b, c" from the names of N items of SIZE bytes whose char *name is at OFFSET. */
static void item_names(const void *items, size_t n, size_t size, size_t offset, char *buf, size_t len)
{
    size_t at = 0;

    buf[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        const char *name = *(char *const *)((const char *)items + i * size + offset);
        int w = snprintf(buf + at, len - at, "%s%s", i ? ", " : "", name ? name : "");
        if (w < 0 || (size_t)w >= len - at) {
            config_bprintf(buf + at, len - at, ", ...");
            return;
        }
        at += (size_t)w;
    }
}

/*
 * The index of the item named NAME among N items, or -1 after reporting at NODE
 * that WHAT (e.g. "an upstream") is undefined, with a suggestion when one is close.
 */
static long find_named(config_loader *ld, const char *name, const void *items, size_t n, size_t size,
                       size_t offset, const char *what, yaml_node_t *node, const char *path)
{
    const char **candidates;
    char names[CONFIG_NAMES_TEXT_MAX], found[128], hint[160] = "";
    const char *suggestion;

    for (size_t i = 0; i < n; i++) {
        const char *candidate = *(char *const *)((const char *)items + i * size + offset);
        if (candidate && strcmp(candidate, name) == 0)
            return (long)i;
    }
    config_quote(name, found, sizeof found);
    if (n == 0) {
        config_error_at(ld, node, path, "expected the name of %s, found %s (none is defined)", what, found);
        return -1;
    }
    candidates = calloc(n, sizeof *candidates);
    if (candidates) {
        for (size_t i = 0; i < n; i++) {
            const char *candidate = *(char *const *)((const char *)items + i * size + offset);
            candidates[i] = candidate ? candidate : "";
        }
        suggestion = config_suggest(name, candidates, n);
        if (suggestion)
            config_bprintf(hint, sizeof hint, "; did you mean \"%s\"?", suggestion);
        free(candidates);
    }
    item_names(items, n, size, offset, names, sizeof names);
    config_error_at(ld, node, path, "expected the name of %s (%s), found %s%s", what, names, found, hint);
    return -1;
}

/* Whether "path.X" names a :param of ROUTE_PATH. */
static bool is_path_param(const char *route_path, const char *x)
{
    const char *names[CONFIG_PARAMS_MAX];
    size_t lens[CONFIG_PARAMS_MAX], n;

    if (!route_path)
        return false;
    n = config_path_params(route_path, names, lens, CONFIG_PARAMS_MAX);
    for (size_t i = 0; i < n; i++)
        if (strlen(x) == lens[i] && memcmp(x, names[i], lens[i]) == 0)
            return true;
    return false;
}

static void bad_path_param(config_loader *ld, const config_route *route, const char *value, yaml_node_t *node,
                           const char *path)
{
    const char *names[CONFIG_PARAMS_MAX];
    size_t lens[CONFIG_PARAMS_MAX], n = 0, at = 0;
    char params[CONFIG_NAMES_TEXT_MAX] = "", found[128];

    if (route->path)
        n = config_path_params(route->path, names, lens, CONFIG_PARAMS_MAX);
    for (size_t i = 0; i < n && at < sizeof params; i++) {
        int w = snprintf(params + at, sizeof params - at, "%s%.*s", i ? ", " : "", (int)lens[i], names[i]);
        if (w < 0)
            break;
        at += (size_t)w;
    }
    config_quote(value, found, sizeof found);
    if (n == 0)
        config_error_at(ld, node, path,
                        "expected path.X with X a :param of the route's path, found %s "
                        "(the route's path has no :param)",
                        found);
    else
        config_error_at(ld, node, path, "expected path.X with X a :param of the route's path (%s), found %s",
                        params, found);
}

/*
 * The element of LIST (as written) whose text is VALUE, and its index in *INDEX;
 * stored lists skip bad elements, so positions are found by text, not by index.
 * A list written as one scalar is its own element (*INDEX = SIZE_MAX).
 */
static yaml_node_t *item_written(config_loader *ld, yaml_node_t *list, const char *value, size_t *index)
{
    *index = SIZE_MAX;
    if (!list || list->type != YAML_SEQUENCE_NODE)
        return list;
    for (size_t i = 0;; i++) {
        yaml_node_t *item = config_node_item(ld, list, i);
        if (!item)
            return list;
        if (item->type == YAML_SCALAR_NODE && strcmp((const char *)item->data.scalar.value, value) == 0) {
            *index = i;
            return item;
        }
    }
}

/* PARENT.NAME[INDEX], or PARENT.NAME when INDEX is SIZE_MAX. */
static void element_path(char *out, const char *parent, const char *name, size_t index)
{
    if (index == SIZE_MAX)
        config_bprintf(out, CONFIG_MESSAGE_PATH_MAX, "%s.%s", parent, name);
    else
        config_bprintf(out, CONFIG_MESSAGE_PATH_MAX, "%s.%s[%zu]", parent, name, index);
}

static void check_route_sql(config_loader *ld, config_route *route, yaml_node_t *node, const char *path)
{
    config_t *cfg = ld->cfg;
    yaml_node_t *sql = config_node_value(ld, node, "sql");
    yaml_node_t *params = config_node_value(ld, sql, "params"),
                *defaults = config_node_value(ld, sql, "defaults");
    bool path_known = route->path || route->prefix;
    char child[CONFIG_MESSAGE_PATH_MAX];

    if (route->sql.database) {
        config_bprintf(child, sizeof child, "%s.sql.database", path);
        find_named(ld, route->sql.database, cfg->postgres.databases, cfg->postgres.database_count,
                   sizeof(config_database), offsetof(config_database, name),
                   "a database under postgres.databases", config_node_value(ld, sql, "database"), child);
    }
    for (size_t i = 0; i < route->sql.param_count && path_known; i++) {
        const char *p = route->sql.params[i];
        yaml_node_t *item;
        size_t at;
        if (strncmp(p, CONFIG_PATH_NS, CONFIG_PATH_NS_LEN) != 0 ||
            is_path_param(route->path, p + CONFIG_PATH_NS_LEN))
            continue;
        item = item_written(ld, params, p, &at);
        element_path(child, path, "sql.params", at);
        bad_path_param(ld, route, p, item, child);
    }
    for (size_t i = 0; i < route->sql.default_count; i++) {
        const char *key = route->sql.defaults[i].key;
        bool listed = false;
        for (size_t j = 0; j < route->sql.param_count && !listed; j++)
            listed = strcmp(route->sql.params[j], key) == 0;
        if (listed)
            continue;
        char names[CONFIG_NAMES_TEXT_MAX], found[128];
        item_names(route->sql.params, route->sql.param_count, sizeof(char *), 0, names, sizeof names);
        config_quote(key, found, sizeof found);
        config_bprintf(child, sizeof child, "%s.sql.defaults.%s", path, key);
        config_error_at(ld, config_node_key(ld, defaults, key), child,
                        "expected one of the route's sql.params (%s), found %s", names, found);
    }
}

/* A cache key template or invalidate pattern: balanced {braces} around names
 * we can fill in, no control characters (a key is sent as X-Cache-Key). */
static void check_template(config_loader *ld, config_route *route, const char *text, yaml_node_t *written,
                           const char *child)
{
    char found[128];
    for (const char *p = text; *p; p++) {
        const char *close;
        char name[128];
        size_t n;

        if ((unsigned char)*p < 0x20 || *p == 0x7f) {
            config_quote(text, found, sizeof found);
            config_error_at(ld, written, child, "expected a template without control characters, found %s",
                            found);
            return;
        }
        if (*p == '}') {
            config_quote(text, found, sizeof found);
            config_error_at(ld, written, child, "expected a template with balanced {braces}, found %s",
                            found);
            return;
        }
        if (*p != '{')
            continue;
        close = strchr(p, '}');
        n = close ? (size_t)(close - p - 1) : 0;
        if (!close || memchr(p + 1, '{', n)) {
            config_quote(text, found, sizeof found);
            config_error_at(ld, written, child, "expected a template with balanced {braces}, found %s",
                            found);
            return;
        }
        config_bprintf(name, sizeof name, "%.*s", (int)n, p + 1);
        if (strcmp(name, "method") != 0 && strcmp(name, "path") != 0 && strcmp(name, "query") != 0 &&
            !config_valid_param_source(name, &(config_why){{0}, {0}})) {
            config_quote(name, found, sizeof found);
            config_error_at(ld, written, child,
                            "expected {method}, {path}, {query}, {path.X}, {query.X} or {header.X}, found %s",
                            found);
        } else if (strncmp(name, CONFIG_PATH_NS, CONFIG_PATH_NS_LEN) == 0 && (route->path || route->prefix) &&
                   !is_path_param(route->path, name + CONFIG_PATH_NS_LEN)) {
            bad_path_param(ld, route, name, written, child);
        }
        p = close;
    }
}

/* Does the key template name the part {name} (header names in any case)? */
static bool template_names(const char *tmpl, const char *name)
{
    size_t n = strlen(name);
    bool header = strncmp(name, "header.", 7) == 0;
    for (const char *p = tmpl ? strchr(tmpl, '{') : NULL; p; p = strchr(p + 1, '{')) {
        const char *close = strchr(p, '}');
        if (close && (size_t)(close - p - 1) == n &&
            (header ? strncmp(p + 1, "header.", 7) == 0 && strncasecmp(p + 8, name + 7, n - 7) == 0
                    : strncmp(p + 1, name, n) == 0))
            return true;
    }
    return false;
}

/* A cached SQL route's answer depends on every value it binds: each must be
 * in its key, or one client's rows would be served to another. The default
 * key holds the path and the whole query, never a header. */
static void check_sql_cache_key(config_loader *ld, config_route *route, yaml_node_t *node, const char *path)
{
    const char *key = route->cache.key;
    yaml_node_t *written = config_node_value(ld, config_node_value(ld, node, "cache"), "key");
    if (!written)
        written = config_node_value(ld, node, "cache");
    char child[CONFIG_MESSAGE_PATH_MAX], found[160];
    config_bprintf(child, sizeof child, "%s.cache.key", path);
    for (size_t i = 0; i < route->sql.param_count; i++) {
        const char *param = route->sql.params[i];
        bool covered;
        if (strncmp(param, "header.", 7) == 0)
            covered = template_names(key, param);
        else if (strncmp(param, "query.", 6) == 0)
            covered = !key || template_names(key, param) || template_names(key, "query");
        else /* path.X */
            covered = !key || template_names(key, param) || template_names(key, "path");
        if (covered)
            continue;
        config_quote(key ? key : "cache:<method>:<path>?<sorted query>", found, sizeof found);
        config_error_at(ld, written, child,
                        "expected a key that names {%s} (the route's SQL binds it, so its answer depends on "
                        "it), found %s",
                        param, found);
    }
    /* result: array pages by the client's ?limit= and ?offset= (unless its SQL
     * binds query.limit, checked above): the key must hold them too. */
    bool own_paging = false;
    for (size_t i = 0; i < route->sql.param_count; i++)
        own_paging = own_paging || strcmp(route->sql.params[i], "query.limit") == 0;
    if (key && route->sql.result == CONFIG_RESULT_ARRAY && !own_paging && !template_names(key, "query") &&
        !(template_names(key, "query.limit") && template_names(key, "query.offset"))) {
        config_quote(key, found, sizeof found);
        config_error_at(ld, written, child,
                        "expected a key that names {query}, or {query.limit} and {query.offset} (the route "
                        "answers pages by them), found %s",
                        found);
    }
}

static void check_cache_templates(config_loader *ld, config_route *route, yaml_node_t *node, const char *path)
{
    char child[CONFIG_MESSAGE_PATH_MAX];
    if (route->cache.enabled && route->cache.key) {
        config_bprintf(child, sizeof child, "%s.cache.key", path);
        check_template(ld, route, route->cache.key,
                       config_node_value(ld, config_node_value(ld, node, "cache"), "key"), child);
    }
    if (route->cache.enabled && route->sql.enabled)
        check_sql_cache_key(ld, route, node, path);
    yaml_node_t *list = config_node_value(ld, node, "invalidate");
    for (size_t i = 0; i < route->invalidate_count; i++) {
        size_t at;
        yaml_node_t *item = item_written(ld, list, route->invalidate[i], &at);
        element_path(child, path, "invalidate", at);
        check_template(ld, route, route->invalidate[i], item, child);
    }
}

void config_check_route(config_loader *ld, void *obj, yaml_node_t *node, const char *path)
{
    config_route *route = obj;
    config_t *cfg = ld->cfg;
    size_t index = (size_t)(route - cfg->routes);
    yaml_node_t *upstream_key = config_node_key(ld, node, "upstream"),
                *sql_key = config_node_key(ld, node, "sql");
    yaml_node_t *ratelimit = config_node_value(ld, node, "ratelimit");
    char child[CONFIG_MESSAGE_PATH_MAX];

    for (size_t j = 0; route->name && j < index; j++) {
        if (cfg->routes[j].name && strcmp(cfg->routes[j].name, route->name) == 0) {
            char found[128];
            config_quote(route->name, found, sizeof found);
            config_bprintf(child, sizeof child, "%s.name", path);
            config_error_at(ld, config_node_value(ld, node, "name"), child,
                            "expected a unique route name, found %s again (first at line %d)", found,
                            cfg->routes[j].line);
            break;
        }
    }
    if (upstream_key && sql_key) {
        yaml_node_t *second =
            config_node_first(upstream_key, sql_key) == upstream_key ? sql_key : upstream_key;
        config_bprintf(child, sizeof child, "%s.%s", path, (const char *)second->data.scalar.value);
        config_error_at(ld, second, child, "expected exactly one of upstream and sql, found both");
    } else if (!upstream_key && !sql_key) {
        config_error_at(ld, node, path, "expected an upstream or a sql section, found neither");
    }
    if (route->upstream) {
        long i;
        config_bprintf(child, sizeof child, "%s.upstream", path);
        i = find_named(ld, route->upstream, cfg->upstreams, cfg->upstream_count, sizeof(config_upstream),
                       offsetof(config_upstream, name), "an upstream",
                       config_node_value(ld, node, "upstream"), child);
        if (i >= 0)
            route->upstream_ref = &cfg->upstreams[i];
    }
    if (route->ratelimit_count > CONFIG_ROUTE_POLICIES_MAX) {
        config_bprintf(child, sizeof child, "%s.ratelimit", path);
        config_error_at(ld, ratelimit ? ratelimit : node, child,
                        "expected at most %d policies (a request takes them all in one store call), "
                        "found %zu",
                        CONFIG_ROUTE_POLICIES_MAX, route->ratelimit_count);
    }
    for (size_t i = 0; i < route->ratelimit_count; i++) {
        size_t at;
        yaml_node_t *item = item_written(ld, ratelimit, route->ratelimit[i], &at);
        element_path(child, path, "ratelimit", at);
        find_named(ld, route->ratelimit[i], cfg->ratelimit.policies, cfg->ratelimit.policy_count,
                   sizeof(config_policy), offsetof(config_policy, name), "a policy under ratelimit.policies",
                   item, child);
    }
    if (route->sql.enabled)
        check_route_sql(ld, route, node, path);
    check_cache_templates(ld, route, node, path);
}

const char *config_default_store_cache(config_loader *ld)
{
    return ld->has_redis ? "redis" : "memory";
}

const char *config_default_store_ratelimit(config_loader *ld)
{
    return ld->has_redis ? "redis" : "local";
}

const char *config_default_route_ttl(config_loader *ld)
{
    config_format_duration(ld->cfg->cache.default_ttl_ms, ld->default_text, sizeof ld->default_text);
    return ld->default_text;
}

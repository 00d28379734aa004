/*
 * rstore.c - the response cache in Redis (see rstore.h).
 */
#include "cache/rstore.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cache/key.h"

#define SCAN_COUNT "1000"
#define CHANNEL_SUFFIX "invalidate"

struct cache_rstore {
    gw_redis *redis;
    char *channel; /* "<key_prefix>invalidate" */
    uint64_t errors;
};

typedef enum { OP_GET, OP_SCAN, OP_UNLINK, OP_PUBLISH, OP_LOCK, OP_POLL, OP_INFO } op_kind;

struct cache_rstore_op {
    cache_rstore *s;
    op_kind kind;
    gw_redis_call *call;
    union {
        cache_rstore_get_fn get;
        cache_rstore_count_fn count;
        cache_rstore_lock_fn lock;
        cache_rstore_poll_fn poll;
        cache_rstore_info_fn info;
    } fn;
    void *arg;
    /* invalidation */
    char cursor[24];
    size_t deleted;
    size_t pattern_len;
    char pattern[]; /* NUL-terminated too */
};

cache_rstore *cache_rstore_create(struct event_base *base, gw_redis_log_fn log)
{
    cache_rstore *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->redis = gw_redis_create(base, log);
    if (!s->redis) {
        free(s);
        return NULL;
    }
    return s;
}

static char *channel_of(const config_t *cfg)
{
    const char *prefix = cfg->cache.key_prefix ? cfg->cache.key_prefix : "";
    size_t n = strlen(prefix);
    char *c = malloc(n + sizeof CHANNEL_SUFFIX);
    if (c) {
        memcpy(c, prefix, n);
        memcpy(c + n, CHANNEL_SUFFIX, sizeof CHANNEL_SUFFIX);
    }
    return c;
}

void cache_rstore_configure(cache_rstore *s, const config_t *cfg)
{
    char *c = channel_of(cfg);
    if (c) {
        free(s->channel);
        s->channel = c;
    }
    gw_redis_configure(s->redis, &cfg->redis);
}

void cache_rstore_free(cache_rstore *s)
{
    if (!s)
        return;
    gw_redis_free(s->redis);
    free(s->channel);
    free(s);
}

bool cache_rstore_up(const cache_rstore *s)
{
    return s && gw_redis_up(s->redis);
}

uint64_t cache_rstore_errors(const cache_rstore *s)
{
    return s ? s->errors : 0;
}

void cache_rstore_cancel(cache_rstore_op *op)
{
    if (!op)
        return;
    gw_redis_cancel(op->call); /* its reply, when it comes, goes nowhere */
    free(op);
}

static cache_rstore_op *op_new(cache_rstore *s, op_kind kind, void *arg, size_t pattern_len)
{
    cache_rstore_op *op = calloc(1, sizeof *op + pattern_len + 1);
    if (op) {
        op->s = s;
        op->kind = kind;
        op->arg = arg;
        op->pattern_len = pattern_len;
    }
    return op;
}

/* A failed command (no reply, or an error reply) counts once. */
static bool failed(cache_rstore *s, const redisReply *rep)
{
    if (!rep || rep->type == REDIS_REPLY_ERROR) {
        s->errors++;
        return true;
    }
    return false;
}

/* ---- get ---------------------------------------------------------------------- */

static void get_reply(void *arg, const redisReply *rep)
{
    cache_rstore_op *op = arg;
    op->call = NULL;
    bool bad = failed(op->s, rep);
    cache_entry *e = NULL;
    cache_r_status st = CACHE_R_ERROR;
    if (!bad) {
        if (rep->type == REDIS_REPLY_STRING)
            e = cache_entry_parse(rep->str, rep->len);
        st = e ? CACHE_R_FOUND : CACHE_R_NOT_FOUND;
    }
    cache_rstore_get_fn fn = op->fn.get;
    void *a = op->arg;
    free(op);
    fn(a, st, e);
}

cache_rstore_op *cache_rstore_get(cache_rstore *s, const char *key, size_t key_len, cache_rstore_get_fn fn,
                                  void *arg)
{
    if (!cache_rstore_up(s))
        return NULL;
    cache_rstore_op *op = op_new(s, OP_GET, arg, 0);
    if (!op)
        return NULL;
    op->fn.get = fn;
    const char *argv[2] = {"GET", key};
    size_t lens[2] = {3, key_len};
    op->call = gw_redis_command(s->redis, get_reply, op, 2, argv, lens);
    if (!op->call) {
        free(op);
        return NULL;
    }
    return op;
}

/* ---- put ---------------------------------------------------------------------- */

static void count_reply(void *arg, const redisReply *rep)
{
    failed(arg, rep);
}

bool cache_rstore_put(cache_rstore *s, const char *key, size_t key_len, const cache_entry *e)
{
    if (!cache_rstore_up(s))
        return false;
    /* Kept until stored_ms + keep_ms (stored_ms may lie in the past: an
     * upstream Age). */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t left = e->stored_ms + e->keep_ms - ((int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000);
    char px[24];
    int n = snprintf(px, sizeof px, "%lld", (long long)(left > 0 ? left : 1));
    const char *argv[5] = {"SET", key, e->blob, "PX", px};
    size_t lens[5] = {3, key_len, e->blob_len, 2, (size_t)n};
    return gw_redis_command(s->redis, count_reply, s, 5, argv, lens) != NULL;
}

/* ---- invalidate --------------------------------------------------------------- */

static void op_finish_count(cache_rstore_op *op, bool ok)
{
    cache_rstore_count_fn fn = op->fn.count;
    void *a = op->arg;
    size_t deleted = op->deleted;
    free(op);
    fn(a, ok, deleted);
}

static void publish_reply(void *arg, const redisReply *rep)
{
    cache_rstore_op *op = arg;
    op->call = NULL;
    op_finish_count(op, !failed(op->s, rep));
}

/* Tell every instance's hot tier, ours included. */
static void publish(cache_rstore_op *op)
{
    cache_rstore *s = op->s;
    if (s->channel) {
        const char *argv[3] = {"PUBLISH", s->channel, op->pattern};
        size_t lens[3] = {7, strlen(s->channel), op->pattern_len};
        op->kind = OP_PUBLISH;
        op->call = gw_redis_command(s->redis, publish_reply, op, 3, argv, lens);
        if (op->call)
            return;
        op_finish_count(op, false);
        return;
    }
    op_finish_count(op, true);
}

static void scan_next(cache_rstore_op *op);

static void unlink_reply(void *arg, const redisReply *rep)
{
    cache_rstore_op *op = arg;
    op->call = NULL;
    if (failed(op->s, rep)) {
        op_finish_count(op, false);
        return;
    }
    if (rep->type == REDIS_REPLY_INTEGER)
        op->deleted += (size_t)rep->integer;
    if (op->kind == OP_UNLINK || strcmp(op->cursor, "0") == 0) {
        publish(op);
        return;
    }
    scan_next(op);
}

static void scan_reply(void *arg, const redisReply *rep)
{
    cache_rstore_op *op = arg;
    op->call = NULL;
    if (failed(op->s, rep) || rep->type != REDIS_REPLY_ARRAY || rep->elements != 2 ||
        rep->element[0]->type != REDIS_REPLY_STRING || rep->element[1]->type != REDIS_REPLY_ARRAY ||
        rep->element[0]->len >= sizeof op->cursor) {
        op_finish_count(op, false);
        return;
    }
    memcpy(op->cursor, rep->element[0]->str, rep->element[0]->len);
    op->cursor[rep->element[0]->len] = '\0';
    const redisReply *keys = rep->element[1];
    if (keys->elements == 0) {
        if (strcmp(op->cursor, "0") == 0)
            publish(op);
        else
            scan_next(op);
        return;
    }
    const char **argv = malloc((keys->elements + 1) * sizeof *argv);
    size_t *lens = malloc((keys->elements + 1) * sizeof *lens);
    if (argv && lens) {
        argv[0] = "UNLINK";
        lens[0] = 6;
        for (size_t i = 0; i < keys->elements; i++) {
            argv[i + 1] = keys->element[i]->str;
            lens[i + 1] = keys->element[i]->len;
        }
        op->call = gw_redis_command(op->s->redis, unlink_reply, op, (int)keys->elements + 1, argv, lens);
    }
    free(argv);
    free(lens);
    if (!op->call)
        op_finish_count(op, false);
}

static void scan_next(cache_rstore_op *op)
{
    const char *argv[6] = {"SCAN", op->cursor, "MATCH", op->pattern, "COUNT", SCAN_COUNT};
    size_t lens[6] = {4, strlen(op->cursor), 5, op->pattern_len, 5, sizeof SCAN_COUNT - 1};
    op->call = gw_redis_command(op->s->redis, scan_reply, op, 6, argv, lens);
    if (!op->call)
        op_finish_count(op, false);
}

cache_rstore_op *cache_rstore_invalidate(cache_rstore *s, const char *pattern, size_t pattern_len,
                                         cache_rstore_count_fn fn, void *arg)
{
    if (!cache_rstore_up(s))
        return NULL;
    cache_rstore_op *op = op_new(s, OP_SCAN, arg, pattern_len);
    if (!op)
        return NULL;
    op->fn.count = fn;
    memcpy(op->pattern, pattern, pattern_len);
    op->pattern[pattern_len] = '\0';
    if (cache_glob_is_literal(pattern, pattern_len)) {
        /* One key: its name is the pattern without its escapes. */
        char *name = malloc(pattern_len + 1);
        size_t n = 0;
        if (name)
            for (size_t i = 0; i < pattern_len; i++) {
                if (pattern[i] == '\\' && i + 1 < pattern_len)
                    i++;
                name[n++] = pattern[i];
            }
        op->kind = OP_UNLINK;
        const char *argv[2] = {"UNLINK", name};
        size_t lens[2] = {6, n};
        op->call = name ? gw_redis_command(s->redis, unlink_reply, op, 2, argv, lens) : NULL;
        free(name);
    } else {
        strcpy(op->cursor, "0");
        const char *argv[6] = {"SCAN", op->cursor, "MATCH", op->pattern, "COUNT", SCAN_COUNT};
        size_t lens[6] = {4, 1, 5, pattern_len, 5, sizeof SCAN_COUNT - 1};
        op->call = gw_redis_command(s->redis, scan_reply, op, 6, argv, lens);
    }
    if (!op->call) {
        free(op);
        return NULL;
    }
    return op;
}

/* ---- lock --------------------------------------------------------------------- */

static void lock_reply(void *arg, const redisReply *rep)
{
    cache_rstore_op *op = arg;
    op->call = NULL;
    bool bad = failed(op->s, rep);
    bool acquired = !bad && rep->type == REDIS_REPLY_STATUS; /* +OK; nil when taken */
    cache_rstore_lock_fn fn = op->fn.lock;
    void *a = op->arg;
    free(op);
    fn(a, !bad, acquired);
}

static size_t lock_name(const char *key, size_t key_len, char **out)
{
    *out = malloc(key_len + 5);
    if (!*out)
        return 0;
    memcpy(*out, key, key_len);
    memcpy(*out + key_len, ":lock", 5);
    return key_len + 5;
}

cache_rstore_op *cache_rstore_lock(cache_rstore *s, const char *key, size_t key_len, const char *token,
                                   int64_t ttl_ms, cache_rstore_lock_fn fn, void *arg)
{
    if (!cache_rstore_up(s))
        return NULL;
    cache_rstore_op *op = op_new(s, OP_LOCK, arg, 0);
    char *name = NULL;
    size_t n = lock_name(key, key_len, &name);
    if (!op || !n) {
        free(op);
        free(name);
        return NULL;
    }
    op->fn.lock = fn;
    char px[24];
    int pn = snprintf(px, sizeof px, "%lld", (long long)(ttl_ms > 0 ? ttl_ms : 1));
    const char *argv[6] = {"SET", name, token, "NX", "PX", px};
    size_t lens[6] = {3, n, strlen(token), 2, 2, (size_t)pn};
    op->call = gw_redis_command(s->redis, lock_reply, op, 6, argv, lens);
    free(name);
    if (!op->call) {
        free(op);
        return NULL;
    }
    return op;
}

static void poll_reply(void *arg, const redisReply *rep)
{
    cache_rstore_op *op = arg;
    op->call = NULL;
    bool bad = failed(op->s, rep) || rep->type != REDIS_REPLY_ARRAY || rep->elements != 2;
    cache_entry *e = NULL;
    bool locked = false;
    if (!bad) {
        const redisReply *v = rep->element[0];
        if (v->type == REDIS_REPLY_STRING)
            e = cache_entry_parse(v->str, v->len);
        locked = rep->element[1]->type != REDIS_REPLY_NIL;
    }
    cache_rstore_poll_fn fn = op->fn.poll;
    void *a = op->arg;
    free(op);
    fn(a, bad ? CACHE_R_ERROR : e ? CACHE_R_FOUND : CACHE_R_NOT_FOUND, e, locked);
}

cache_rstore_op *cache_rstore_poll(cache_rstore *s, const char *key, size_t key_len, cache_rstore_poll_fn fn,
                                   void *arg)
{
    if (!cache_rstore_up(s))
        return NULL;
    cache_rstore_op *op = op_new(s, OP_POLL, arg, 0);
    char *name = NULL;
    size_t n = lock_name(key, key_len, &name);
    if (!op || !n) {
        free(op);
        free(name);
        return NULL;
    }
    op->fn.poll = fn;
    const char *argv[3] = {"MGET", key, name};
    size_t lens[3] = {4, key_len, n};
    op->call = gw_redis_command(s->redis, poll_reply, op, 3, argv, lens);
    free(name);
    if (!op->call) {
        free(op);
        return NULL;
    }
    return op;
}

/* Delete the lock only while it is still ours. */
static const char unlock_script[] =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

void cache_rstore_unlock(cache_rstore *s, const char *key, size_t key_len, const char *token)
{
    char *name = NULL;
    size_t n = lock_name(key, key_len, &name);
    if (n && cache_rstore_up(s)) {
        const char *argv[5] = {"EVAL", unlock_script, "1", name, token};
        size_t lens[5] = {4, sizeof unlock_script - 1, 1, n, strlen(token)};
        gw_redis_command(s->redis, count_reply, s, 5, argv, lens);
    }
    free(name);
}

/* ---- info --------------------------------------------------------------------- */

static void info_reply(void *arg, const redisReply *rep)
{
    cache_rstore_op *op = arg;
    op->call = NULL;
    bool ok = !failed(op->s, rep) && rep->type == REDIS_REPLY_STRING;
    int64_t used = 0;
    if (ok) {
        const char *p = strstr(rep->str, "\nused_memory:");
        if (!p && strncmp(rep->str, "used_memory:", 12) == 0)
            p = rep->str - 1;
        ok = p != NULL;
        if (ok)
            used = strtoll(p + 13, NULL, 10);
    }
    cache_rstore_info_fn fn = op->fn.info;
    void *a = op->arg;
    free(op);
    fn(a, ok, used);
}

cache_rstore_op *cache_rstore_info(cache_rstore *s, cache_rstore_info_fn fn, void *arg)
{
    if (!cache_rstore_up(s))
        return NULL;
    cache_rstore_op *op = op_new(s, OP_INFO, arg, 0);
    if (!op)
        return NULL;
    op->fn.info = fn;
    const char *argv[2] = {"INFO", "memory"};
    size_t lens[2] = {4, 6};
    op->call = gw_redis_command(s->redis, info_reply, op, 2, argv, lens);
    if (!op->call) {
        free(op);
        return NULL;
    }
    return op;
}

/* ---- subscriber --------------------------------------------------------------- */

struct cache_rsub {
    struct event_base *base;
    gw_redis_log_fn log;
    cache_rstore_heard_fn fn;
    void *arg;
    gw_redis *redis;
    char *channel;
};

static void sub_message(void *arg, const char *payload, size_t len)
{
    cache_rsub *sub = arg;
    sub->fn(sub->arg, payload, len);
}

static void sub_subscribed(void *arg)
{
    cache_rsub *sub = arg;
    sub->fn(sub->arg, NULL, 0);
}

cache_rsub *cache_rsub_create(struct event_base *base, gw_redis_log_fn log, cache_rstore_heard_fn fn,
                              void *arg)
{
    cache_rsub *sub = calloc(1, sizeof *sub);
    if (sub) {
        sub->base = base;
        sub->log = log;
        sub->fn = fn;
        sub->arg = arg;
    }
    return sub;
}

void cache_rsub_configure(cache_rsub *sub, const config_t *cfg)
{
    bool wanted = cfg->redis.enabled && cfg->cache.store == CONFIG_STORE_REDIS && cfg->cache.hot_tier;
    char *c = wanted ? channel_of(cfg) : NULL;
    if (sub->redis && (!c || strcmp(c, sub->channel) != 0)) {
        gw_redis_free(sub->redis);
        sub->redis = NULL;
        free(sub->channel);
        sub->channel = NULL;
    }
    if (c && !sub->redis) {
        sub->redis = gw_redis_create_subscriber(sub->base, sub->log, c, sub_message, sub_subscribed, sub);
        free(sub->channel); /* left from a create that failed */
        sub->channel = c;
        c = NULL;
    }
    free(c);
    if (sub->redis)
        gw_redis_configure(sub->redis, &cfg->redis);
}

void cache_rsub_free(cache_rsub *sub)
{
    if (!sub)
        return;
    gw_redis_free(sub->redis);
    free(sub->channel);
    free(sub);
}

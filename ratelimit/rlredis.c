/*
 * rlredis.c - GCRA in Redis, one atomic script per decision (see rlredis.h),
 * on the worker's gw_redis client (redis/redis.h), which owns the connections,
 * the deadlines and the reconnects.
 *
 * Runs on the worker thread. A decision is one EVALSHA; when Redis answers
 * NOSCRIPT (restarted, SCRIPT FLUSH) the same call is sent again with EVAL,
 * which loads the script for the next ones. So a call keeps its arguments:
 * it is one allocation holding the Redis key and the two numbers, built
 * without printf.
 */
#include "ratelimit/rlredis.h"

#include <stdlib.h>
#include <string.h>

#include <hiredis/hiredis.h>
#include <openssl/evp.h>
#include <openssl/sha.h>

#include "redis/redis.h"

#define RLR_KEY_PREFIX "rl:"
#define RLR_KEY_LEN (sizeof RLR_KEY_PREFIX - 1 + 2 * SHA_DIGEST_LENGTH)
#define RLR_SHA_LEN (2 * SHA_DIGEST_LENGTH)
#define RLR_U64_DIGITS 20

/* KEYS[1]: the key; ARGV[1]: period (us); ARGV[2]: limit (the bucket holds
 * limit periods: never limit + 1 in a burst, whatever the rounding). Returns
 * {allowed, remaining, reset_us, retry_after_us}. Redis's clock, so every
 * gateway instance sees the same time. */
static const char script[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local period = tonumber(ARGV[1])\n"
    "local window = period * tonumber(ARGV[2])\n"
    "local tat = tonumber(redis.call('GET', KEYS[1])) or 0\n"
    "local base = tat > now and tat or now\n"
    "local nxt = base + period\n"
    "if nxt - now > window then\n"
    "  return {0, 0, base - now, nxt - window - now}\n"
    "end\n"
    "redis.call('SET', KEYS[1], string.format('%d', nxt), 'PX', math.floor((nxt - now) / 1000) + 1)\n"
    "return {1, math.floor((window - (nxt - now)) / period), nxt - now, 0}\n";

struct rl_redis_call {
    rl_redis *r;
    gw_redis_call *pending; /* the EVALSHA (or EVAL) in flight */
    rl_redis_done_fn done;
    void *arg;
    bool noscript; /* retried with EVAL */
    unsigned char period_len, limit_len;
    char key[RLR_KEY_LEN]; /* not NUL-terminated: the commands are binary safe */
    char period[RLR_U64_DIGITS], limit[RLR_U64_DIGITS];
};

struct rl_redis {
    gw_redis *redis;
    rl_redis_log_fn log;
    char sha[RLR_SHA_LEN + 1];
    /* SHA-1 of the keys with the digest fetched once and one context reused:
     * OpenSSL 3's one-shot SHA1() fetches the algorithm on every call, which
     * cost more than the rest of building the command. */
    EVP_MD *sha1;
    EVP_MD_CTX *sha1_ctx;
};

static void hex(const unsigned char *in, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
}

/* n in decimal, not NUL-terminated; returns the length (at most 20). */
static unsigned char u64_decimal(uint64_t n, char *out)
{
    char tmp[RLR_U64_DIGITS];
    unsigned char len = 0;
    do {
        tmp[len++] = (char)('0' + n % 10);
        n /= 10;
    } while (n);
    for (unsigned char i = 0; i < len; i++)
        out[i] = tmp[len - 1 - i];
    return len;
}

rl_redis *rl_redis_create(struct event_base *base, rl_redis_log_fn log)
{
    rl_redis *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->log = log;
    r->redis = gw_redis_create(base, log);
    r->sha1 = EVP_MD_fetch(NULL, "SHA1", NULL);
    r->sha1_ctx = EVP_MD_CTX_new();
    if (!r->redis || !r->sha1 || !r->sha1_ctx)
        goto fail;
    unsigned char digest[SHA_DIGEST_LENGTH];
    SHA1((const unsigned char *)script, sizeof script - 1, digest);
    hex(digest, sizeof digest, r->sha);
    r->sha[RLR_SHA_LEN] = '\0';
    return r;

fail:
    rl_redis_free(r);
    return NULL;
}

void rl_redis_configure(rl_redis *r, const config_redis *cfg)
{
    gw_redis_configure(r->redis, cfg);
}

void rl_redis_free(rl_redis *r)
{
    if (!r)
        return;
    gw_redis_free(r->redis); /* answers the pending calls (take_reply frees them) */
    r->redis = NULL;
    EVP_MD_CTX_free(r->sha1_ctx);
    EVP_MD_free(r->sha1);
    free(r);
}

bool rl_redis_up(const rl_redis *r)
{
    return r && gw_redis_up(r->redis);
}

static void take_reply(void *arg, const redisReply *rep);

static gw_redis_call *send_script(rl_redis_call *call)
{
    const char *argv[6] = {"EVALSHA", call->r->sha, "1", call->key, call->period, call->limit};
    size_t len[6] = {7, RLR_SHA_LEN, 1, RLR_KEY_LEN, call->period_len, call->limit_len};
    if (call->noscript) {
        argv[0] = "EVAL";
        len[0] = 4;
        argv[1] = script;
        len[1] = sizeof script - 1;
    }
    return gw_redis_command(call->r->redis, take_reply, call, 6, argv, len);
}

/* gw_redis_done_fn: the script's answer, or NULL (timeout, connection lost). */
static void take_reply(void *arg, const redisReply *rep)
{
    rl_redis_call *call = arg;
    call->pending = NULL;
    if (rep && rep->type == REDIS_REPLY_ERROR && !call->noscript && rep->len >= 8 &&
        memcmp(rep->str, "NOSCRIPT", 8) == 0) {
        call->noscript = true;
        call->pending = send_script(call);
        if (call->pending)
            return; /* this call comes back with EVAL's reply */
    }
    rl_decision d = {0};
    bool ok = rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 4;
    for (size_t i = 0; ok && i < 4; i++)
        ok = rep->element[i]->type == REDIS_REPLY_INTEGER;
    if (ok) {
        d.allowed = rep->element[0]->integer == 1;
        d.remaining = rep->element[1]->integer;
        d.reset_ms = (rep->element[2]->integer + 999) / 1000;
        d.retry_after_ms = (rep->element[3]->integer + 999) / 1000;
    } else if (rep && rep->type == REDIS_REPLY_ERROR && call->r->log) {
        char line[512];
        size_t n = rep->len < sizeof line - 8 ? rep->len : sizeof line - 8;
        memcpy(line, "redis: ", 7);
        memcpy(line + 7, rep->str, n);
        line[7 + n] = '\0';
        call->r->log(CONFIG_LOG_WARN, line);
    }
    call->done(call->arg, ok, &d);
    free(call);
}

rl_redis_call *rl_redis_take(rl_redis *r, const void *key, size_t key_len, int64_t limit, int64_t window_ms,
                             rl_redis_done_fn done, void *arg)
{
    if (!rl_redis_up(r))
        return NULL;
    rl_redis_call *call = malloc(sizeof *call);
    if (!call)
        return NULL;
    call->r = r;
    call->done = done;
    call->arg = arg;
    call->noscript = false;
    unsigned char digest[EVP_MAX_MD_SIZE];
    if (EVP_DigestInit_ex(r->sha1_ctx, r->sha1, NULL) != 1 ||
        EVP_DigestUpdate(r->sha1_ctx, key, key_len) != 1 ||
        EVP_DigestFinal_ex(r->sha1_ctx, digest, NULL) != 1) {
        free(call);
        return NULL;
    }
    memcpy(call->key, RLR_KEY_PREFIX, sizeof RLR_KEY_PREFIX - 1);
    hex(digest, SHA_DIGEST_LENGTH, call->key + sizeof RLR_KEY_PREFIX - 1);
    uint64_t window_us = (uint64_t)window_ms * 1000ULL;
    uint64_t period_us = limit > 0 ? window_us / (uint64_t)limit : window_us;
    call->period_len = u64_decimal(period_us ? period_us : 1, call->period);
    call->limit_len = u64_decimal(limit > 0 ? (uint64_t)limit : 1, call->limit);
    call->pending = send_script(call);
    if (!call->pending) {
        free(call);
        return NULL;
    }
    return call;
}

void rl_redis_cancel(rl_redis_call *call)
{
    if (!call)
        return;
    gw_redis_cancel(call->pending); /* done will not come: ours is free to go */
    free(call);
}

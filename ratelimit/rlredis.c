/*
 * rlredis.c - GCRA in Redis, one atomic script per decision (see rlredis.h).
 */
#include "ratelimit/rlredis.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/adapters/libevent.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <openssl/sha.h>

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
    rl_redis_call *prev, *next;
    rl_redis *r;
    rl_redis_done_fn done;
    void *arg;
    struct event *timer;
    bool answered; /* done was called (or the caller cancelled) */
    bool noscript; /* retried with EVAL */
    char key[3 + 2 * SHA_DIGEST_LENGTH + 1];
    char period[24], window[24];
};

struct rl_redis {
    struct event_base *base;
    rl_redis_log_fn log;
    char host[256];
    int port;
    char password[256];
    int db;
    int64_t timeout_ms;
    bool configured;
    redisAsyncContext *ac;
    bool connected;
    int backoff_ms;
    struct event *retry_timer;
    struct event *connect_timer;
    char sha[2 * SHA_DIGEST_LENGTH + 1];
    rl_redis_call *calls; /* sent and not yet replied to */
};

static void connect_now(rl_redis *r);

static void logf_(rl_redis *r, config_log_level level, const char *fmt, ...)
{
    if (!r->log)
        return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    r->log(level, line);
}

static void hex(const unsigned char *in, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
    out[2 * n] = '\0';
}

rl_redis *rl_redis_create(struct event_base *base, rl_redis_log_fn log)
{
    rl_redis *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->base = base;
    r->log = log;
    unsigned char digest[SHA_DIGEST_LENGTH];
    SHA1((const unsigned char *)script, sizeof script - 1, digest);
    hex(digest, sizeof digest, r->sha);
    return r;
}

/* ---- connection --------------------------------------------------------------- */

static void schedule_retry(rl_redis *r)
{
    /* A failed connect can report through both callbacks: once is enough. */
    if (!r->configured || evtimer_pending(r->retry_timer, NULL))
        return;
    r->backoff_ms = r->backoff_ms ? r->backoff_ms * 2 : RLR_BACKOFF_MIN_MS;
    if (r->backoff_ms > RLR_BACKOFF_MAX_MS)
        r->backoff_ms = RLR_BACKOFF_MAX_MS;
    struct timeval tv = {r->backoff_ms / 1000, (r->backoff_ms % 1000) * 1000};
    evtimer_add(r->retry_timer, &tv);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    rl_redis *r = ac->data;
    if (r->connect_timer)
        evtimer_del(r->connect_timer);
    if (status != REDIS_OK) {
        /* hiredis frees the context after this callback. */
        if (r->ac == ac)
            r->ac = NULL;
        r->connected = false;
        schedule_retry(r);
        return;
    }
    r->connected = true;
    r->backoff_ms = 0;
    logf_(r, CONFIG_LOG_INFO, "redis %s:%d: connected", r->host, r->port);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    rl_redis *r = ac->data;
    if (r->ac == ac)
        r->ac = NULL;
    if (r->connected)
        logf_(r, CONFIG_LOG_WARN, "redis %s:%d: connection lost", r->host, r->port);
    r->connected = false;
    schedule_retry(r);
}

static void drop_connection(rl_redis *r)
{
    if (r->ac) {
        redisAsyncContext *ac = r->ac;
        r->ac = NULL;
        r->connected = false;
        /* Now, not after pending replies (redisAsyncDisconnect would wait for
         * them); pending callbacks get NULL replies. Inside a hiredis callback
         * hiredis defers the free itself (REDIS_IN_CALLBACK). */
        redisAsyncFree(ac);
    }
}

static void connect_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    rl_redis *r = arg;
    if (r->connected)
        return;
    logf_(r, CONFIG_LOG_DEBUG, "redis %s:%d: connect timed out", r->host, r->port);
    drop_connection(r);
}

static void retry_cb(evutil_socket_t fd, short what, void *arg)
{
    connect_now(arg);
}

static void auth_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    rl_redis *r = privdata;
    const redisReply *rep = reply;
    if (rep && rep->type == REDIS_REPLY_ERROR) {
        logf_(r, CONFIG_LOG_WARN, "redis %s:%d: %.*s", r->host, r->port, (int)rep->len, rep->str);
        drop_connection(r);
    }
}

static void connect_now(rl_redis *r)
{
    if (!r->configured || r->ac)
        return;
    redisAsyncContext *ac = redisAsyncConnect(r->host, r->port);
    if (!ac || ac->err) {
        if (ac)
            redisAsyncFree(ac);
        schedule_retry(r);
        return;
    }
    ac->data = r;
    if (redisLibeventAttach(ac, r->base) != REDIS_OK) {
        redisAsyncFree(ac);
        schedule_retry(r);
        return;
    }
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    r->ac = ac;
    if (r->password[0])
        redisAsyncCommand(ac, auth_reply, r, "AUTH %s", r->password);
    if (r->db)
        redisAsyncCommand(ac, auth_reply, r, "SELECT %d", r->db);
    struct timeval tv = {(time_t)(r->timeout_ms / 1000), (suseconds_t)(r->timeout_ms % 1000) * 1000};
    evtimer_add(r->connect_timer, &tv);
}

/* redis://[user][:password@]host[:port][/db] */
static int parse_url(rl_redis *r, const char *url, const char *password)
{
    const char *p = url + strlen("redis://");
    const char *at = strrchr(p, '@');
    r->password[0] = '\0';
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (colon) {
            size_t n = (size_t)(at - colon - 1);
            if (n >= sizeof r->password)
                return -1;
            memcpy(r->password, colon + 1, n);
            r->password[n] = '\0';
        }
        p = at + 1;
    }
    if (password && *password)
        snprintf(r->password, sizeof r->password, "%s", password);
    size_t hlen = strcspn(p, ":/");
    if (hlen == 0 || hlen >= sizeof r->host)
        return -1;
    memcpy(r->host, p, hlen);
    r->host[hlen] = '\0';
    p += hlen;
    r->port = 6379;
    if (*p == ':') {
        r->port = atoi(p + 1);
        p += 1 + strspn(p + 1, "0123456789");
    }
    r->db = *p == '/' ? atoi(p + 1) : 0;
    return r->port > 0 && r->port < 65536 ? 0 : -1;
}

void rl_redis_configure(rl_redis *r, const config_redis *cfg)
{
    if (!r->retry_timer) {
        r->retry_timer = evtimer_new(r->base, retry_cb, r);
        r->connect_timer = evtimer_new(r->base, connect_timeout_cb, r);
    }
    char old_host[sizeof r->host], old_password[sizeof r->password];
    int old_port = r->port, old_db = r->db;
    memcpy(old_host, r->host, sizeof old_host);
    memcpy(old_password, r->password, sizeof old_password);
    bool was = r->configured;
    r->configured = cfg->enabled && cfg->url && parse_url(r, cfg->url, cfg->password) == 0;
    r->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : 1000;
    bool changed = !was || strcmp(old_host, r->host) != 0 || old_port != r->port || old_db != r->db ||
                   strcmp(old_password, r->password) != 0;
    if (!r->configured || changed)
        drop_connection(r);
    if (r->configured && !r->ac)
        connect_now(r);
}

void rl_redis_free(rl_redis *r)
{
    if (!r)
        return;
    r->configured = false;
    r->connected = false; /* a shutdown, not a lost connection */
    if (r->ac) {
        redisAsyncContext *ac = r->ac;
        r->ac = NULL;
        redisAsyncFree(ac); /* pending callbacks get NULL replies, then the calls are freed */
    }
    if (r->retry_timer)
        event_free(r->retry_timer);
    if (r->connect_timer)
        event_free(r->connect_timer);
    free(r);
}

bool rl_redis_up(const rl_redis *r)
{
    return r && r->connected && r->ac;
}

/* ---- calls -------------------------------------------------------------------- */

static void call_unlink(rl_redis_call *call)
{
    rl_redis *r = call->r;
    if (call->prev)
        call->prev->next = call->next;
    else if (r->calls == call)
        r->calls = call->next;
    if (call->next)
        call->next->prev = call->prev;
    call->prev = call->next = NULL;
}

static void answer(rl_redis_call *call, bool ok, const rl_decision *d)
{
    if (call->answered)
        return;
    call->answered = true;
    evtimer_del(call->timer);
    call->done(call->arg, ok, d);
}

static void call_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    rl_redis_call *call = arg;
    rl_redis *r = call->r;
    answer(call, false, NULL);
    /* A Redis that does not answer in time is not trusted with the next
     * commands either: start over (pending replies come back as NULL). */
    logf_(r, CONFIG_LOG_WARN, "redis %s:%d: no answer within %lld ms; reconnecting", r->host, r->port,
          (long long)r->timeout_ms);
    drop_connection(r);
}

static int send_script(rl_redis_call *call);

static void reply_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    rl_redis_call *call = privdata;
    const redisReply *rep = reply;
    if (rep && rep->type == REDIS_REPLY_ERROR && !call->noscript && strncmp(rep->str, "NOSCRIPT", 8) == 0 &&
        !call->answered && call->r->ac == ac) {
        call->noscript = true;
        if (send_script(call) == 0)
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
    } else if (rep && rep->type == REDIS_REPLY_ERROR) {
        logf_(call->r, CONFIG_LOG_WARN, "redis: %.*s", (int)rep->len, rep->str);
    }
    answer(call, ok, &d);
    call_unlink(call);
    event_free(call->timer);
    free(call);
}

static int send_script(rl_redis_call *call)
{
    rl_redis *r = call->r;
    if (!r->ac)
        return -1;
    if (call->noscript)
        return redisAsyncCommand(r->ac, reply_cb, call, "EVAL %s 1 %s %s %s", script, call->key, call->period,
                                 call->window) == REDIS_OK
                   ? 0
                   : -1;
    return redisAsyncCommand(r->ac, reply_cb, call, "EVALSHA %s 1 %s %s %s", r->sha, call->key, call->period,
                             call->window) == REDIS_OK
               ? 0
               : -1;
}

rl_redis_call *rl_redis_take(rl_redis *r, const void *key, size_t key_len, int64_t limit, int64_t window_ms,
                             rl_redis_done_fn done, void *arg)
{
    if (!rl_redis_up(r))
        return NULL;
    rl_redis_call *call = calloc(1, sizeof *call);
    if (!call)
        return NULL;
    call->timer = evtimer_new(r->base, call_timeout_cb, call);
    if (!call->timer) {
        free(call);
        return NULL;
    }
    call->r = r;
    call->done = done;
    call->arg = arg;
    unsigned char digest[SHA_DIGEST_LENGTH];
    SHA1(key, key_len, digest);
    memcpy(call->key, "rl:", 3);
    hex(digest, sizeof digest, call->key + 3);
    uint64_t window_us = (uint64_t)window_ms * 1000ULL;
    uint64_t period_us = limit > 0 ? window_us / (uint64_t)limit : window_us;
    snprintf(call->period, sizeof call->period, "%llu", (unsigned long long)(period_us ? period_us : 1));
    snprintf(call->window, sizeof call->window, "%lld", (long long)(limit > 0 ? limit : 1));
    if (send_script(call) != 0) {
        event_free(call->timer);
        free(call);
        return NULL;
    }
    call->next = r->calls;
    if (r->calls)
        r->calls->prev = call;
    r->calls = call;
    struct timeval tv = {(time_t)(r->timeout_ms / 1000), (suseconds_t)(r->timeout_ms % 1000) * 1000};
    evtimer_add(call->timer, &tv);
    return call;
}

void rl_redis_cancel(rl_redis_call *call)
{
    if (!call)
        return;
    call->answered = true; /* freed when its reply (or the disconnect) comes */
    evtimer_del(call->timer);
}

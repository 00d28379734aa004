/*
 * rlredis.c - GCRA in Redis, one atomic script per batch of decisions (see
 * rlredis.h), on the worker's gw_redis client (redis/redis.h), which owns the
 * connections, the deadlines and the reconnects.
 *
 * Runs on the worker thread. Calls for one key (the Redis key name, with the
 * same period and limit) meet in a per-worker hash of the keys that have a
 * script call in flight. A key's batches form a queue: the head is in flight
 * (one EVALSHA asking for n requests), the ones behind it collect the calls
 * that come meanwhile (at most RLR_BATCH_MAX each) and the next one goes when
 * the head's reply comes back. A key with nothing in flight has no entry: its
 * first call goes at once, alone. When Redis answers NOSCRIPT (restarted,
 * SCRIPT FLUSH) the same batch is sent again with EVAL, which loads the
 * script for the next ones.
 *
 * Deadlines: a batch sent at once has gw_redis's (redis.timeout from its
 * send). A batch that waited behind another is on a deadline list, oldest
 * first, with one timer armed for the oldest: redis.timeout after its first
 * call came, so its calls are answered (as failed, when Redis has not
 * decided) within redis.timeout as when each call was sent on its own.
 *
 * Per call: one allocation (rl_redis_call); key entries and batches are
 * reused from free lists.
 */
#include "ratelimit/rlredis.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <hiredis/hiredis.h>
#include <openssl/evp.h>
#include <openssl/sha.h>

#include "redis/redis.h"

#define RLR_KEY_PREFIX "rl:"
#define RLR_KEY_LEN (sizeof RLR_KEY_PREFIX - 1 + 2 * SHA_DIGEST_LENGTH)
#define RLR_SHA_LEN (2 * SHA_DIGEST_LENGTH)
#define RLR_U64_DIGITS 20
#define RLR_BATCH_MAX 256           /* calls in one script call; more wait for the next */
#define RLR_DEFAULT_TIMEOUT_MS 1000 /* as gw_redis, when the config has none */
#define RLR_BUCKETS_MIN 64

/* KEYS[1]: the key; ARGV[1]: period (us); ARGV[2]: limit (the bucket holds
 * limit periods: never limit + 1 in a burst, whatever the rounding); ARGV[3]:
 * n, the requests asked for. Takes k = the most of them that fit, at most n,
 * and returns {k, max(TAT, now) - now} (us): rl_redis_batch_decision() makes
 * each request's decision from it. Redis's clock, so every gateway instance
 * sees the same time. k is computed with exact integer checks around the
 * division (Lua numbers are doubles). redis.replicate_commands() first: before
 * Redis 5 a script may not write after a non-deterministic TIME otherwise. */
static const char script[] =
    "redis.replicate_commands()\n" /* writes after TIME: needed by Redis 3.2 to 4, a no-op from 5 */
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local period = tonumber(ARGV[1])\n"
    "local window = period * tonumber(ARGV[2])\n"
    "local n = tonumber(ARGV[3])\n"
    "local tat = tonumber(redis.call('GET', KEYS[1])) or 0\n"
    "local base = tat > now and tat or now\n"
    "local room = now + window - base\n"
    "local k = 0\n"
    "if room >= period then\n"
    "  k = math.floor(room / period)\n"
    "  if k * period > room then k = k - 1 elseif (k + 1) * period <= room then k = k + 1 end\n"
    "  if k > n then k = n end\n"
    "  local nxt = base + k * period\n"
    "  redis.call('SET', KEYS[1], string.format('%d', nxt), 'PX', math.floor((nxt - now) / 1000) + 1)\n"
    "end\n"
    "return {k, base - now}\n";

typedef struct rlr_key rlr_key;
typedef struct rlr_batch rlr_batch;

struct rl_redis_call {
    rl_redis_call *next, *prev; /* in its batch, in arrival order */
    rlr_batch *batch;
    rl_redis_done_fn done; /* NULL: cancelled after its batch was sent */
    void *arg;
};

struct rlr_batch {
    rl_redis *r;
    rlr_key *key;                 /* NULL once taken off its key to be answered */
    rlr_batch *next;              /* the key's queue; the free list */
    rlr_batch *dl_prev, *dl_next; /* the deadline list, when on_dl */
    gw_redis_call *pending;       /* the EVALSHA (or EVAL) in flight */
    rl_redis_call *first, *last;
    uint32_t n; /* calls in the list (sent: the n asked for) */
    bool sent, noscript, on_dl;
    uint64_t born_ns; /* its first call (a batch that waited) */
};

struct rlr_key {
    rlr_key *hnext; /* hash chain; the free list */
    uint64_t hash;
    rlr_batch *head, *tail; /* head in flight, the others waiting */
    int64_t period_us, limit;
    unsigned char period_len, limit_len;
    char name[RLR_KEY_LEN]; /* not NUL-terminated: the commands are binary safe */
    char period[RLR_U64_DIGITS], limit_s[RLR_U64_DIGITS];
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
    /* keys with a batch in flight */
    rlr_key **buckets;
    size_t mask, nkeys;
    rlr_key *free_keys;
    rlr_batch *free_batches;
    /* batches that waited, oldest first, and the timer of the oldest */
    rlr_batch *dl_head, *dl_tail;
    struct event *timer;
    uint64_t timeout_ns;
    int depth; /* callbacks running: free waits for them */
    bool closing;
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

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void timer_arm_ns(struct event *ev, uint64_t ns)
{
    uint64_t us = (ns + 999) / 1000; /* never early: an early fire re-arms */
    struct timeval tv = {(time_t)(us / 1000000), (suseconds_t)(us % 1000000)};
    evtimer_add(ev, &tv);
}

/* ---- the arithmetic ------------------------------------------------------------- */

void rl_redis_batch_decision(int64_t allowed, int64_t wait_us, int64_t period_us, int64_t limit, int64_t i,
                             rl_decision *d)
{
    int64_t window = period_us * limit;
    *d = (rl_decision){.limit = limit};
    if (i < allowed) {
        /* the i-th allowed: TAT base + (i+1) periods */
        int64_t reset = wait_us + (i + 1) * period_us;
        int64_t room = window - reset; /* >= 0: the script allowed it */
        d->allowed = true;
        d->remaining = room >= 0 ? room / period_us : 0;
        d->reset_ms = (reset + 999) / 1000;
        return;
    }
    /* refused against the TAT the allowed ones left; one more period past the window */
    int64_t reset = wait_us + allowed * period_us;
    int64_t retry = reset + period_us - window;
    d->reset_ms = (reset + 999) / 1000;
    d->retry_after_ms = retry > 0 ? (retry + 999) / 1000 : 0;
}

/* ---- lifetime --------------------------------------------------------------------- */

static void deadline_cb(evutil_socket_t fd, short what, void *arg);

rl_redis *rl_redis_create(struct event_base *base, rl_redis_log_fn log)
{
    rl_redis *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->log = log;
    r->timeout_ns = (uint64_t)RLR_DEFAULT_TIMEOUT_MS * 1000000ULL;
    r->redis = gw_redis_create(base, log);
    r->sha1 = EVP_MD_fetch(NULL, "SHA1", NULL);
    r->sha1_ctx = EVP_MD_CTX_new();
    r->buckets = calloc(RLR_BUCKETS_MIN, sizeof *r->buckets);
    r->mask = RLR_BUCKETS_MIN - 1;
    r->timer = evtimer_new(base, deadline_cb, r);
    if (!r->redis || !r->sha1 || !r->sha1_ctx || !r->buckets || !r->timer)
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

static void destroy(rl_redis *r)
{
    /* Everything was answered: only the free lists hold memory (and, would a
     * key be left, its batches and calls). */
    for (size_t i = 0; r->buckets && i <= r->mask; i++) {
        for (rlr_key *k = r->buckets[i], *kn; k; k = kn) {
            kn = k->hnext;
            for (rlr_batch *b = k->head, *bn; b; b = bn) {
                bn = b->next;
                for (rl_redis_call *c = b->first, *cn; c; c = cn) {
                    cn = c->next;
                    free(c);
                }
                free(b);
            }
            free(k);
        }
    }
    free(r->buckets);
    for (rlr_key *k = r->free_keys, *kn; k; k = kn) {
        kn = k->hnext;
        free(k);
    }
    for (rlr_batch *b = r->free_batches, *bn; b; b = bn) {
        bn = b->next;
        free(b);
    }
    if (r->timer)
        event_free(r->timer);
    EVP_MD_CTX_free(r->sha1_ctx);
    EVP_MD_free(r->sha1);
    free(r);
}

static void enter(rl_redis *r)
{
    r->depth++;
}

/* r must not be touched after leave(): it may be gone. */
static void leave(rl_redis *r)
{
    if (--r->depth == 0 && r->closing)
        destroy(r);
}

void rl_redis_configure(rl_redis *r, const config_redis *cfg)
{
    if (!r || r->closing)
        return;
    uint64_t was = r->timeout_ns;
    r->timeout_ns =
        (uint64_t)(cfg && cfg->timeout_ms > 0 ? cfg->timeout_ms : RLR_DEFAULT_TIMEOUT_MS) * 1000000ULL;
    if (r->timeout_ns < was && r->dl_head) {
        evtimer_del(r->timer); /* sooner now: the callback re-arms for the oldest */
        timer_arm_ns(r->timer, 0);
    }
    enter(r);
    gw_redis_configure(r->redis, cfg); /* may answer calls (a dropped connection) */
    leave(r);
}

bool rl_redis_up(const rl_redis *r)
{
    return r && !r->closing && gw_redis_up(r->redis);
}

/* ---- keys, batches --------------------------------------------------------------- */

static rlr_key *key_find(const rl_redis *r, uint64_t hash, const char *name, int64_t period_us, int64_t limit)
{
    for (rlr_key *k = r->buckets[hash & r->mask]; k; k = k->hnext)
        if (k->hash == hash && k->period_us == period_us && k->limit == limit &&
            memcmp(k->name, name, RLR_KEY_LEN) == 0)
            return k;
    return NULL;
}

static void key_insert(rl_redis *r, rlr_key *k)
{
    if (r->nkeys > r->mask) { /* more keys than buckets: twice the buckets (or longer chains) */
        size_t size = 2 * (r->mask + 1);
        rlr_key **nb = calloc(size, sizeof *nb);
        if (nb) {
            for (size_t i = 0; i <= r->mask; i++) {
                for (rlr_key *e = r->buckets[i], *en; e; e = en) {
                    en = e->hnext;
                    e->hnext = nb[e->hash & (size - 1)];
                    nb[e->hash & (size - 1)] = e;
                }
            }
            free(r->buckets);
            r->buckets = nb;
            r->mask = size - 1;
        }
    }
    rlr_key **slot = &r->buckets[k->hash & r->mask];
    k->hnext = *slot;
    *slot = k;
    r->nkeys++;
}

/* Off the table (it has no batch left), onto the free list. */
static void key_remove(rl_redis *r, rlr_key *k)
{
    for (rlr_key **p = &r->buckets[k->hash & r->mask]; *p; p = &(*p)->hnext) {
        if (*p == k) {
            *p = k->hnext;
            r->nkeys--;
            break;
        }
    }
    k->hnext = r->free_keys;
    r->free_keys = k;
}

static rlr_batch *batch_new(rl_redis *r, rlr_key *k)
{
    rlr_batch *b = r->free_batches;
    if (b)
        r->free_batches = b->next;
    else if (!(b = malloc(sizeof *b)))
        return NULL;
    *b = (rlr_batch){.r = r, .key = k};
    return b;
}

static void batch_release(rl_redis *r, rlr_batch *b)
{
    b->next = r->free_batches;
    r->free_batches = b;
}

static void dl_add(rl_redis *r, rlr_batch *b)
{
    b->born_ns = now_ns();
    b->on_dl = true;
    b->dl_next = NULL;
    b->dl_prev = r->dl_tail;
    if (r->dl_tail)
        r->dl_tail->dl_next = b;
    else
        r->dl_head = b;
    r->dl_tail = b;
    if (!evtimer_pending(r->timer, NULL)) /* else armed for an older one: it re-arms */
        timer_arm_ns(r->timer, r->timeout_ns);
}

static void dl_remove(rl_redis *r, rlr_batch *b)
{
    if (!b->on_dl)
        return;
    b->on_dl = false;
    if (b->dl_prev)
        b->dl_prev->dl_next = b->dl_next;
    else
        r->dl_head = b->dl_next;
    if (b->dl_next)
        b->dl_next->dl_prev = b->dl_prev;
    else
        r->dl_tail = b->dl_prev;
}

/* Take b off its key's queue (and the deadline list): it is about to be
 * answered, and its key no longer leads to it. */
static void batch_detach(rl_redis *r, rlr_batch *b)
{
    rlr_key *k = b->key;
    rlr_batch *prev = NULL;
    for (rlr_batch *e = k->head; e && e != b; e = e->next)
        prev = e;
    if (prev)
        prev->next = b->next;
    else
        k->head = b->next;
    if (k->tail == b)
        k->tail = prev;
    b->key = NULL;
    b->next = NULL;
    dl_remove(r, b);
}

/* Answer b's calls, in order, and release b. b is detached, so the callbacks
 * (which may take, cancel, or free r) see every key as consistent; a call
 * they cancel in b is unlinked (not sent) or left unanswered (sent). */
static void batch_answer(rl_redis *r, rlr_batch *b, bool ok, int64_t allowed, int64_t wait_us,
                         int64_t period_us, int64_t limit)
{
    int64_t i = 0;
    rl_redis_call *c;
    while ((c = b->first)) {
        b->first = c->next;
        if (b->first)
            b->first->prev = NULL;
        else
            b->last = NULL;
        rl_redis_done_fn done = c->done;
        void *arg = c->arg;
        free(c);
        if (done) {
            rl_decision d = {0};
            if (ok)
                rl_redis_batch_decision(allowed, wait_us, period_us, limit, i, &d);
            done(arg, ok, &d);
        }
        i++;
    }
    batch_release(r, b);
}

static void batch_reply(void *arg, const redisReply *rep);

static bool batch_send(rlr_batch *b)
{
    rl_redis *r = b->r;
    rlr_key *k = b->key;
    char n[RLR_U64_DIGITS];
    const char *argv[7] = {"EVALSHA", r->sha, "1", k->name, k->period, k->limit_s, n};
    size_t len[7] = {7, RLR_SHA_LEN, 1, RLR_KEY_LEN, k->period_len, k->limit_len, u64_decimal(b->n, n)};
    if (b->noscript) {
        argv[0] = "EVAL";
        len[0] = 4;
        argv[1] = script;
        len[1] = sizeof script - 1;
    }
    b->pending = r->closing ? NULL : gw_redis_command(r->redis, batch_reply, b, 7, argv, len);
    if (b->pending)
        b->sent = true;
    return b->pending != NULL;
}

/* k's head is gone: send the next batch, or fail the ones that cannot go
 * (not connected, past their deadline); k leaves the table when it has no
 * batch left. Answers (callbacks) come last, with k consistent. */
static void key_advance(rl_redis *r, rlr_key *k)
{
    rlr_batch *failed = NULL, **failed_tail = &failed;
    uint64_t now = 0;
    while (k->head && !k->head->sent) {
        rlr_batch *b = k->head;
        if (b->on_dl && !now)
            now = now_ns();
        if ((!b->on_dl || b->born_ns + r->timeout_ns > now) && batch_send(b))
            break;
        batch_detach(r, b);
        *failed_tail = b;
        failed_tail = &b->next;
    }
    if (!k->head)
        key_remove(r, k);
    while (failed) {
        rlr_batch *b = failed;
        failed = b->next;
        b->next = NULL;
        batch_answer(r, b, false, 0, 0, 0, 0);
    }
}

/* gw_redis_done_fn: the script's answer for b (the head of its key), or NULL
 * (timeout, connection lost). */
static void batch_reply(void *arg, const redisReply *rep)
{
    rlr_batch *b = arg;
    rl_redis *r = b->r;
    rlr_key *k = b->key;
    b->pending = NULL;
    if (rep && rep->type == REDIS_REPLY_ERROR && !b->noscript && rep->len >= 8 &&
        memcmp(rep->str, "NOSCRIPT", 8) == 0) {
        b->noscript = true;
        if (batch_send(b))
            return; /* this batch comes back with EVAL's reply */
    }
    bool ok = rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 &&
              rep->element[0]->type == REDIS_REPLY_INTEGER && rep->element[1]->type == REDIS_REPLY_INTEGER &&
              rep->element[0]->integer >= 0 && rep->element[0]->integer <= (long long)b->n &&
              rep->element[1]->integer >= 0;
    if (!ok && rep && rep->type == REDIS_REPLY_ERROR && r->log) {
        char line[512];
        size_t n = rep->len < sizeof line - 8 ? rep->len : sizeof line - 8;
        memcpy(line, "redis: ", 7);
        memcpy(line + 7, rep->str, n);
        line[7 + n] = '\0';
        r->log(CONFIG_LOG_WARN, line);
    }
    int64_t allowed = ok ? rep->element[0]->integer : 0, wait_us = ok ? rep->element[1]->integer : 0;
    int64_t period_us = k->period_us, limit = k->limit;
    enter(r);
    batch_detach(r, b);
    key_advance(r, k); /* the next batch goes before these answers are made */
    batch_answer(r, b, ok, allowed, wait_us, period_us, limit);
    leave(r);
}

/* The deadline of batches that waited: redis.timeout after their first call. */
static void deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    rl_redis *r = arg;
    enter(r);
    uint64_t now = now_ns();
    rlr_batch *b;
    while (!r->closing && (b = r->dl_head) && b->born_ns + r->timeout_ns <= now) {
        rlr_key *k = b->key;
        bool was_head = k->head == b;
        gw_redis_cancel(b->pending); /* Redis may still take them: as for a client gone after its decision */
        b->pending = NULL;
        batch_detach(r, b);
        if (was_head)
            key_advance(r, k);
        batch_answer(r, b, false, 0, 0, 0, 0);
    }
    if (!r->closing && r->dl_head)
        timer_arm_ns(r->timer, r->dl_head->born_ns + r->timeout_ns - now);
    leave(r);
}

void rl_redis_free(rl_redis *r)
{
    if (!r || r->closing)
        return;
    enter(r);
    r->closing = true;
    if (r->timer)
        evtimer_del(r->timer);
    gw_redis_free(r->redis); /* answers the batches in flight; the ones behind them fail to go */
    r->redis = NULL;
    /* Whatever is left (nothing in flight can be): answered as failed. */
    for (size_t i = 0; r->buckets && i <= r->mask; i++) {
        rlr_key *k;
        while ((k = r->buckets[i])) {
            rlr_batch *b = k->head;
            gw_redis_cancel(b->pending);
            b->pending = NULL;
            batch_detach(r, b);
            key_advance(r, k); /* closing: fails the ones behind it */
            batch_answer(r, b, false, 0, 0, 0, 0);
        }
    }
    leave(r); /* frees r unless a callback up the stack still runs */
}

/* ---- calls -------------------------------------------------------------------------- */

static void batch_append(rlr_batch *b, rl_redis_call *c)
{
    c->batch = b;
    c->next = NULL;
    c->prev = b->last;
    if (b->last)
        b->last->next = c;
    else
        b->first = c;
    b->last = c;
    b->n++;
}

rl_redis_call *rl_redis_take(rl_redis *r, const void *key, size_t key_len, int64_t limit, int64_t window_ms,
                             rl_redis_done_fn done, void *arg)
{
    if (!rl_redis_up(r))
        return NULL;
    unsigned char digest[EVP_MAX_MD_SIZE];
    if (EVP_DigestInit_ex(r->sha1_ctx, r->sha1, NULL) != 1 ||
        EVP_DigestUpdate(r->sha1_ctx, key, key_len) != 1 ||
        EVP_DigestFinal_ex(r->sha1_ctx, digest, NULL) != 1)
        return NULL;
    char name[RLR_KEY_LEN];
    memcpy(name, RLR_KEY_PREFIX, sizeof RLR_KEY_PREFIX - 1);
    hex(digest, SHA_DIGEST_LENGTH, name + sizeof RLR_KEY_PREFIX - 1);
    uint64_t hash;
    memcpy(&hash, digest, sizeof hash);
    uint64_t window_us = (uint64_t)window_ms * 1000ULL;
    uint64_t period_us = limit > 0 ? window_us / (uint64_t)limit : window_us;
    if (!period_us)
        period_us = 1;
    int64_t lim = limit > 0 ? limit : 1;

    rl_redis_call *c = malloc(sizeof *c);
    if (!c)
        return NULL;
    c->done = done;
    c->arg = arg;

    rlr_key *k = key_find(r, hash, name, (int64_t)period_us, lim);
    if (k) { /* a batch in flight: this call waits in the next one */
        rlr_batch *b = k->tail;
        if (b->sent || b->n >= RLR_BATCH_MAX) {
            b = batch_new(r, k);
            if (!b) {
                free(c);
                return NULL;
            }
            k->tail->next = b;
            k->tail = b;
            dl_add(r, b);
        }
        batch_append(b, c);
        return c;
    }

    /* Nothing in flight for this key: the call goes now, alone. */
    k = r->free_keys;
    if (k)
        r->free_keys = k->hnext;
    else if (!(k = malloc(sizeof *k))) {
        free(c);
        return NULL;
    }
    k->hash = hash;
    k->period_us = (int64_t)period_us;
    k->limit = lim;
    memcpy(k->name, name, RLR_KEY_LEN);
    k->period_len = u64_decimal(period_us, k->period);
    k->limit_len = u64_decimal((uint64_t)lim, k->limit_s);
    rlr_batch *b = batch_new(r, k);
    if (b) {
        k->head = k->tail = b;
        batch_append(b, c);
        if (batch_send(b)) {
            key_insert(r, k);
            return c;
        }
        batch_release(r, b);
    }
    k->hnext = r->free_keys;
    r->free_keys = k;
    free(c);
    return NULL;
}

void rl_redis_cancel(rl_redis_call *c)
{
    if (!c)
        return;
    rlr_batch *b = c->batch;
    if (b->sent) {
        /* In Redis's hands: its request may be taken (as for a client gone
         * after its decision); it is freed with its batch's answer. */
        c->done = NULL;
        return;
    }
    if (c->prev)
        c->prev->next = c->next;
    else
        b->first = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        b->last = c->prev;
    b->n--;
    free(c);
    if (b->n == 0 && b->key) { /* a waiting batch left empty (never the head: that one is sent) */
        rl_redis *r = b->r;
        batch_detach(r, b);
        batch_release(r, b);
    }
}

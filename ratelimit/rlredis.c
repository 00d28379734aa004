/*
 * rlredis.c - GCRA in Redis, one atomic script per batch of decisions (see
 * rlredis.h), on the worker's gw_redis client (redis/redis.h), which owns the
 * connections, the deadlines and the reconnects.
 *
 * Runs on the worker thread. A call is one request against a set of keys
 * (its route's policies: the Redis key names with their periods, limits and
 * dry-run flags). Calls for the same set meet in a per-worker hash of the
 * sets that have a batch ready or in flight. A set's batches form a queue:
 * the head is ready or in flight, the ones behind it collect the calls that
 * come meanwhile (at most RLR_BATCH_MAX each), and the next one is made
 * ready when the head's reply comes back. A set with nothing ready or in
 * flight has no entry.
 *
 * Ready batches go together: making a batch ready activates the flush event,
 * which runs once the events already active in this turn of the loop (the
 * other client requests read with this one, the other Redis replies) have
 * run, and sends every batch made ready meanwhile as ONE script call
 * (script_multi; script_one when it is one set of one key), up to
 * RLR_FLIGHT_KEYS_MAX keys per call: a flight. With many clients on many
 * keys that is one call and one round trip per turn instead of one per
 * request, and no request waits longer for it than the turn it came in. The
 * reply holds each set's answer in turn. When Redis answers NOSCRIPT
 * (restarted, SCRIPT FLUSH) the flight is sent again with EVAL, which loads
 * the script for the next ones.
 *
 * The first connect after rl_redis_configure gave a new target (start-up,
 * a reload that changed redis:) is waited for: calls made before it is up
 * queue as batches not sent yet, and a timer looks every
 * RLR_CONNECT_POLL_MS; once up they go, and if it is not up within
 * redis.timeout of the configure they are answered as failed
 * (on_store_error). Else a gateway would decide its first requests after
 * every start by on_store_error (with deny: 429s) for the few milliseconds
 * the connect takes. Past that first connect, a call while Redis is down is
 * refused at once (NULL) as before: no request waits on a Redis that is
 * known to be down.
 *
 * Deadlines: redis.timeout is the deadline of each script call, from its
 * send (gw_redis's per-command deadline), as it is for every other Redis
 * command: a Redis that answers within it decides. A batch that waits behind
 * its set's call in flight is sent when that call is answered or failed, and
 * has 2 x redis.timeout from its first call in all (that call's time and its
 * own): a Redis slower than half of redis.timeout (but within it) still
 * decides every call, and a backlog larger than Redis answers in time (more
 * than RLR_BATCH_MAX calls per round trip on one key) fails at that deadline
 * instead of growing. (Timed from its first call with redis.timeout alone, a
 * waiting batch failed whenever Redis took more than half the timeout, each
 * failure leaving the next older; with no deadline until sent, a backlog
 * grew without bound.) Batches waiting for the first connect have
 * redis.timeout from their call, and those of a flight sent again after
 * NOSCRIPT the first send's deadline (the EVAL gets only what is left of
 * it). All of these are on one deadline list, soonest first, with one timer
 * armed for the soonest; a deadline is fixed when it is set (a reload that
 * shortens redis.timeout applies to later ones). One that passes while its
 * flight is in Redis leaves the flight (the others still get the reply).
 *
 * Per call: one allocation (rl_redis_call); set entries, batches and flights
 * are reused from free lists.
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
#define RLR_BATCH_MAX 256           /* calls in one set's batch; more wait for the next */
#define RLR_DEFAULT_TIMEOUT_MS 1000 /* as gw_redis, when the config has none */
#define RLR_BUCKETS_MIN 64
#define RLR_CONNECT_POLL_MS 1   /* how often calls waiting for the first connect look */
#define RLR_FLIGHT_KEYS_MAX 128 /* keys in one script call (its sets' policies); more go in another */
/* EVALSHA sha numkeys KEYS... nsets (n m (period limit enforce)...)... */
#define RLR_ARGC_MAX (4 + RLR_FLIGHT_KEYS_MAX + 1 + 2 * RLR_FLIGHT_KEYS_MAX + 3 * RLR_FLIGHT_KEYS_MAX)

_Static_assert(CONFIG_ROUTE_POLICIES_MAX <= RL_POLICIES_MAX, "a route's policies must fit in one call");

/* One script call decides the batches of several sets (what one worker had
 * ready in one turn of its loop), one set after the other, atomically.
 * KEYS: every set's keys, set after set. ARGV[1]: the number of sets; then
 * per set: n (the requests asked for), m (its keys), and per key period
 * (us), limit (the bucket holds limit periods: never limit + 1 in a burst,
 * whatever the rounding), "1" when enforced, "0" for a dry-run policy.
 *
 * Per set, per key, k_i = how many of the n it has room for; k = the least
 * k_i of the enforced keys (n when none is): the first k requests go on, the
 * rest are refused (a refused request is not stored, GCRA's rule), so each
 * key is charged min(k, k_i), dry-run ones included. The set's answer is
 * {k, wait_1, k_1, ..., wait_m, k_m} with wait_i = max(TAT_i, now) - now
 * (us), and the reply is the sets' answers one after the other:
 * rl_redis_batch_decision() makes each request's decisions from its set's.
 * A key in two sets of one call is simply taken by the first and then seen
 * by the second, as two calls in a row. Redis's clock, so every gateway
 * instance sees the same time. k_i is computed with exact integer checks
 * around the division (Lua numbers are doubles).
 * redis.replicate_commands() first: before Redis 5 a script may not write
 * after a non-deterministic TIME otherwise. */
static const char script_multi[] =
    "redis.replicate_commands()\n" /* writes after TIME: needed by Redis 3.2 to 4, a no-op from 5 */
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local out = {}\n"
    "local o = 0\n"  /* out's last index */
    "local a = 2\n"  /* ARGV's next index */
    "local kb = 0\n" /* the keys of the sets before this one */
    "for s = 1, tonumber(ARGV[1]) do\n"
    "  local n = tonumber(ARGV[a])\n"
    "  local m = tonumber(ARGV[a + 1])\n"
    "  local p0 = a + 2\n"
    "  local head = o + 1\n"
    "  local k = n\n"
    "  o = head\n"
    "  for i = 1, m do\n"
    "    local pa = p0 + 3 * (i - 1)\n"
    "    local period = tonumber(ARGV[pa])\n"
    "    local tat = tonumber(redis.call('GET', KEYS[kb + i])) or 0\n"
    "    local b = tat > now and tat or now\n"
    "    local r = now + period * tonumber(ARGV[pa + 1]) - b\n"
    "    local ki = 0\n"
    "    if r >= period then\n"
    "      ki = math.floor(r / period)\n"
    "      if ki * period > r then ki = ki - 1 elseif (ki + 1) * period <= r then ki = ki + 1 end\n"
    "      if ki > n then ki = n end\n"
    "    end\n"
    "    out[o + 1] = b - now\n"
    "    out[o + 2] = ki\n"
    "    o = o + 2\n"
    "    if ki < k and ARGV[pa + 2] == '1' then k = ki end\n"
    "  end\n"
    "  out[head] = k\n"
    "  if k > 0 then\n"
    "    for i = 1, m do\n"
    "      local c = out[head + 2 * i]\n"
    "      if c > k then c = k end\n"
    "      if c > 0 then\n"
    "        local nxt = now + out[head + 2 * i - 1] + c * tonumber(ARGV[p0 + 3 * (i - 1)])\n"
    "        redis.call('SET', KEYS[kb + i], string.format('%d', nxt), 'PX', math.floor((nxt - now) / 1000) "
    "+ 1)\n"
    "      end\n"
    "    end\n"
    "  end\n"
    "  a = p0 + 3 * m\n"
    "  kb = kb + m\n"
    "end\n"
    "return out\n";

/* One set of one key, straight-line (the common case when the worker had one
 * call ready: a route with one policy costs Redis what it did before there
 * were batches of sets). KEYS[1]; ARGV: n, period, limit, enforce. k_1 is
 * also k when the key is enforced, and when it is not, k = n and it is
 * charged k_1. The reply as script_multi's for one set. */
static const char script_one[] =
    "redis.replicate_commands()\n"
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local n = tonumber(ARGV[1])\n"
    "local period = tonumber(ARGV[2])\n"
    "local tat = tonumber(redis.call('GET', KEYS[1])) or 0\n"
    "local base = tat > now and tat or now\n"
    "local room = now + period * tonumber(ARGV[3]) - base\n"
    "local k = 0\n"
    "if room >= period then\n"
    "  k = math.floor(room / period)\n"
    "  if k * period > room then k = k - 1 elseif (k + 1) * period <= room then k = k + 1 end\n"
    "  if k > n then k = n end\n"
    "  local nxt = base + k * period\n"
    "  redis.call('SET', KEYS[1], string.format('%d', nxt), 'PX', math.floor((nxt - now) / 1000) + 1)\n"
    "end\n"
    "return {ARGV[4] == '1' and k or n, base - now, k}\n";

typedef struct rlr_set rlr_set;
typedef struct rlr_batch rlr_batch;
typedef struct rlr_flight rlr_flight;

struct rl_redis_call {
    rl_redis_call *next, *prev; /* in its batch, in arrival order */
    rlr_batch *batch;
    rl_redis_done_fn done; /* NULL: cancelled after its batch was sent */
    void *arg;
};

/* A script's answer for one set, copied out of the reply (and of the set,
 * which the callbacks may reuse) for the calls of its batch. */
typedef struct rlr_answer {
    int64_t allowed;
    size_t npol;
    int64_t wait_us[RL_POLICIES_MAX], key_allowed[RL_POLICIES_MAX];
    int64_t period_us[RL_POLICIES_MAX], limit[RL_POLICIES_MAX];
} rlr_answer;

struct rlr_batch {
    rl_redis *r;
    rlr_set *set;                 /* NULL once taken off its set to be answered */
    rlr_batch *next;              /* the set's queue; lists of batches to answer; the free list */
    rlr_batch *dl_prev, *dl_next; /* the deadline list, when on_dl */
    rlr_batch *rd_prev, *rd_next; /* the ready list, when on_ready */
    rlr_flight *flight;           /* sent: the script call it is in (NULL once out of it) */
    uint32_t slot;                /* its place in flight */
    rl_redis_call *first, *last;
    uint32_t n; /* calls in the list (sent: the n asked for) */
    bool sent, on_dl, on_ready;
    bool ok;         /* its answer came (ans) */
    uint64_t due_ns; /* on the deadline list: answered (failed) then at the latest */
    rlr_answer ans;
};

/* One script call: the batches the worker had ready together, one per set,
 * of at most RLR_FLIGHT_KEYS_MAX keys in all. */
struct rlr_flight {
    rl_redis *r;
    rlr_flight *next;                  /* the free list */
    gw_redis_call *pending;            /* the EVALSHA (or EVAL) */
    uint32_t nb, live;                 /* batches sent; those still waiting for this reply */
    rlr_batch *b[RLR_FLIGHT_KEYS_MAX]; /* NULL: answered already (its deadline) */
    uint32_t n[RLR_FLIGHT_KEYS_MAX];   /* what each asked for, to read the reply */
    unsigned char npol[RLR_FLIGHT_KEYS_MAX];
    bool noscript;    /* sent again with EVAL */
    uint64_t sent_ns; /* its first send */
};

/* One key of a set: a policy of the request. */
typedef struct rlr_pol {
    int64_t period_us, limit;
    bool enforce;
    unsigned char period_len, limit_len;
    char name[RLR_KEY_LEN]; /* not NUL-terminated: the commands are binary safe */
    char period[RLR_U64_DIGITS], limit_s[RLR_U64_DIGITS];
} rlr_pol;

/* A set of keys with a batch ready or in flight. */
struct rlr_set {
    rlr_set *hnext; /* hash chain; the free list */
    uint64_t hash;
    rlr_batch *head,
        *tail; /* head ready or in flight (or waiting for the first connect), the others waiting */
    size_t npol;
    rlr_pol pol[RL_POLICIES_MAX];
};

struct rl_redis {
    gw_redis *redis;
    rl_redis_log_fn log;
    char sha_one[RLR_SHA_LEN + 1], sha_multi[RLR_SHA_LEN + 1]; /* of script_one, script_multi */
    /* SHA-1 of the keys with the digest fetched once and one context reused:
     * OpenSSL 3's one-shot SHA1() fetches the algorithm on every call, which
     * cost more than the rest of building the command. */
    EVP_MD *sha1;
    EVP_MD_CTX *sha1_ctx;
    /* sets with a batch ready or in flight */
    rlr_set **buckets;
    size_t mask, nsets;
    rlr_set *free_sets;
    rlr_batch *free_batches;
    rlr_flight *free_flights;
    /* batches to send at the end of this turn of the loop (flush) */
    rlr_batch *rd_head, *rd_tail;
    struct event *flush;
    /* batches not sent at the end of their turn (or sent again), soonest
     * deadline first, and the timer of the soonest */
    rlr_batch *dl_head, *dl_tail;
    struct event *timer;
    uint64_t timeout_ns;
    /* the first connect to a new target: calls wait for it until then (0: not waiting) */
    uint64_t connect_until_ns;
    struct event *connect_timer;
    char *url, *password; /* the target applied last, to tell a new one (NULL: none) */
    int depth;            /* callbacks running: free waits for them */
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

void rl_redis_batch_decision(int64_t allowed, int64_t key_allowed, int64_t wait_us, int64_t period_us,
                             int64_t limit, int64_t i, rl_decision *d)
{
    int64_t window = period_us * limit;
    /* this key's requests taken before the i-th: the allowed ones it had room for */
    int64_t c = i < allowed ? i : allowed;
    if (c > key_allowed)
        c = key_allowed;
    *d = (rl_decision){.limit = limit};
    if (c < key_allowed) {
        /* Room for it: TAT base + (c+1) periods when it goes (and the same
         * numbers, not charged, when another policy refused it). */
        int64_t reset = wait_us + (c + 1) * period_us;
        int64_t room = window - reset; /* >= 0: the script had room */
        d->remaining = room >= 0 ? room / period_us : 0;
        d->reset_ms = (reset + 999) / 1000;
        if (i < allowed)
            d->allowed = true;
        else
            d->other_refused = true;
        return;
    }
    /* No room: refused against the TAT the c taken left; one more period past the window */
    int64_t reset = wait_us + c * period_us;
    int64_t retry = reset + period_us - window;
    d->reset_ms = (reset + 999) / 1000;
    d->retry_after_ms = retry > 0 ? (retry + 999) / 1000 : 0;
}

/* ---- lifetime --------------------------------------------------------------------- */

static void deadline_cb(evutil_socket_t fd, short what, void *arg);
static void connect_cb(evutil_socket_t fd, short what, void *arg);
static void flush_cb(evutil_socket_t fd, short what, void *arg);

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
    r->connect_timer = evtimer_new(base, connect_cb, r);
    r->flush = event_new(base, -1, 0, flush_cb, r);
    if (!r->redis || !r->sha1 || !r->sha1_ctx || !r->buckets || !r->timer || !r->connect_timer || !r->flush)
        goto fail;
    unsigned char digest[SHA_DIGEST_LENGTH];
    SHA1((const unsigned char *)script_one, sizeof script_one - 1, digest);
    hex(digest, sizeof digest, r->sha_one);
    r->sha_one[RLR_SHA_LEN] = '\0';
    SHA1((const unsigned char *)script_multi, sizeof script_multi - 1, digest);
    hex(digest, sizeof digest, r->sha_multi);
    r->sha_multi[RLR_SHA_LEN] = '\0';
    return r;

fail:
    rl_redis_free(r);
    return NULL;
}

static void destroy(rl_redis *r)
{
    /* Everything was answered: only the free lists hold memory (and, would a
     * set be left, its batches and calls). */
    for (size_t i = 0; r->buckets && i <= r->mask; i++) {
        for (rlr_set *k = r->buckets[i], *kn; k; k = kn) {
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
    for (rlr_set *k = r->free_sets, *kn; k; k = kn) {
        kn = k->hnext;
        free(k);
    }
    for (rlr_batch *b = r->free_batches, *bn; b; b = bn) {
        bn = b->next;
        free(b);
    }
    for (rlr_flight *f = r->free_flights, *fn; f; f = fn) {
        fn = f->next;
        free(f);
    }
    if (r->flush)
        event_free(r->flush);
    if (r->timer)
        event_free(r->timer);
    if (r->connect_timer)
        event_free(r->connect_timer);
    free(r->url);
    free(r->password);
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
    r->timeout_ns =
        (uint64_t)(cfg && cfg->timeout_ms > 0 ? cfg->timeout_ms : RLR_DEFAULT_TIMEOUT_MS) * 1000000ULL;
    /* A new target (or the first): gw_redis connects to it afresh. */
    bool enabled = cfg && cfg->enabled && cfg->url;
    const char *password = enabled && cfg->password ? cfg->password : "";
    bool fresh = enabled && (!r->url || strcmp(r->url, cfg->url) != 0 || strcmp(r->password, password) != 0);
    if (fresh || !enabled) {
        free(r->url);
        free(r->password);
        r->url = enabled ? strdup(cfg->url) : NULL;
        r->password = enabled ? strdup(password) : NULL;
        if (!r->url || !r->password) { /* out of memory: a new target next time too */
            free(r->url);
            free(r->password);
            r->url = r->password = NULL;
        }
    }
    enter(r);
    gw_redis_configure(r->redis, cfg); /* may answer calls (a dropped connection) */
    if (!enabled)
        r->connect_until_ns = 0; /* calls that waited fail at the timer's next look */
    if (fresh && !r->closing && !gw_redis_up(r->redis)) {
        r->connect_until_ns = now_ns() + r->timeout_ns;
        timer_arm_ns(r->connect_timer, (uint64_t)RLR_CONNECT_POLL_MS * 1000000ULL);
    }
    leave(r);
}

bool rl_redis_up(const rl_redis *r)
{
    return r && !r->closing && gw_redis_up(r->redis);
}

/* Within the first connect to a new target: calls wait for it. */
static bool connect_pending(const rl_redis *r)
{
    return r->connect_until_ns && now_ns() < r->connect_until_ns;
}

/* ---- sets, batches, flights ------------------------------------------------------- */

static bool set_equal(const rlr_set *a, const rlr_set *b)
{
    if (a->hash != b->hash || a->npol != b->npol)
        return false;
    for (size_t i = 0; i < a->npol; i++) {
        const rlr_pol *x = &a->pol[i], *y = &b->pol[i];
        if (x->period_us != y->period_us || x->limit != y->limit || x->enforce != y->enforce ||
            memcmp(x->name, y->name, RLR_KEY_LEN) != 0)
            return false;
    }
    return true;
}

static rlr_set *set_find(const rl_redis *r, const rlr_set *want)
{
    for (rlr_set *k = r->buckets[want->hash & r->mask]; k; k = k->hnext)
        if (set_equal(k, want))
            return k;
    return NULL;
}

static void set_insert(rl_redis *r, rlr_set *k)
{
    if (r->nsets > r->mask) { /* more sets than buckets: twice the buckets (or longer chains) */
        size_t size = 2 * (r->mask + 1);
        rlr_set **nb = calloc(size, sizeof *nb);
        if (nb) {
            for (size_t i = 0; i <= r->mask; i++) {
                for (rlr_set *e = r->buckets[i], *en; e; e = en) {
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
    rlr_set **slot = &r->buckets[k->hash & r->mask];
    k->hnext = *slot;
    *slot = k;
    r->nsets++;
}

/* Off the table (it has no batch left), onto the free list. */
static void set_remove(rl_redis *r, rlr_set *k)
{
    for (rlr_set **p = &r->buckets[k->hash & r->mask]; *p; p = &(*p)->hnext) {
        if (*p == k) {
            *p = k->hnext;
            r->nsets--;
            break;
        }
    }
    k->hnext = r->free_sets;
    r->free_sets = k;
}

static rlr_batch *batch_new(rl_redis *r, rlr_set *k)
{
    rlr_batch *b = r->free_batches;
    if (b)
        r->free_batches = b->next;
    else if (!(b = malloc(sizeof *b)))
        return NULL;
    b->r = r;
    b->set = k;
    b->next = b->dl_prev = b->dl_next = b->rd_prev = b->rd_next = NULL;
    b->flight = NULL;
    b->slot = 0;
    b->first = b->last = NULL;
    b->n = 0;
    b->sent = b->on_dl = b->on_ready = b->ok = false;
    b->due_ns = 0;
    return b;
}

static void batch_release(rl_redis *r, rlr_batch *b)
{
    b->next = r->free_batches;
    r->free_batches = b;
}

/* b onto the deadline list, due at due_ns: in order (a batch sent again
 * joins with its first send's deadline, maybe not the latest). */
static void dl_add(rl_redis *r, rlr_batch *b, uint64_t due_ns)
{
    b->due_ns = due_ns;
    b->on_dl = true;
    rlr_batch *after = r->dl_tail;
    while (after && after->due_ns > due_ns)
        after = after->dl_prev;
    b->dl_prev = after;
    b->dl_next = after ? after->dl_next : r->dl_head;
    if (b->dl_next)
        b->dl_next->dl_prev = b;
    else
        r->dl_tail = b;
    if (after)
        after->dl_next = b;
    else
        r->dl_head = b;
    if (r->dl_head == b) { /* the soonest now: the timer is for it */
        uint64_t now = now_ns();
        evtimer_del(r->timer);
        timer_arm_ns(r->timer, due_ns > now ? due_ns - now : 0);
    }
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

/* b (its set's head) goes with the next flush, at the end of this turn of
 * the loop, in one script call with the other sets' batches ready then. */
static void ready_add(rl_redis *r, rlr_batch *b)
{
    b->on_ready = true;
    b->rd_next = NULL;
    b->rd_prev = r->rd_tail;
    if (r->rd_tail)
        r->rd_tail->rd_next = b;
    else
        r->rd_head = b;
    r->rd_tail = b;
    /* Active now, so it runs after the events already active in this turn
     * (the other clients' requests read with this one); a no-op when it is
     * already. */
    event_active(r->flush, EV_TIMEOUT, 1);
}

static void ready_remove(rl_redis *r, rlr_batch *b)
{
    if (!b->on_ready)
        return;
    b->on_ready = false;
    if (b->rd_prev)
        b->rd_prev->rd_next = b->rd_next;
    else
        r->rd_head = b->rd_next;
    if (b->rd_next)
        b->rd_next->rd_prev = b->rd_prev;
    else
        r->rd_tail = b->rd_prev;
}

static rlr_flight *flight_new(rl_redis *r)
{
    rlr_flight *f = r->free_flights;
    if (f)
        r->free_flights = f->next;
    else if (!(f = malloc(sizeof *f)))
        return NULL;
    f->r = r;
    f->next = NULL;
    f->pending = NULL;
    f->nb = f->live = 0;
    f->noscript = false;
    f->sent_ns = 0;
    return f;
}

static void flight_release(rl_redis *r, rlr_flight *f)
{
    f->next = r->free_flights;
    r->free_flights = f;
}

/* b leaves its flight (answered without it: its deadline, a free); a flight
 * left with no batch is cancelled (Redis may still run it: as for clients
 * gone after their decisions). */
static void batch_unflight(rl_redis *r, rlr_batch *b)
{
    rlr_flight *f = b->flight;
    if (!f)
        return;
    b->flight = NULL;
    f->b[b->slot] = NULL;
    if (--f->live == 0) {
        gw_redis_cancel(f->pending);
        f->pending = NULL;
        flight_release(r, f);
    }
}

/* Take b off its set's queue (and the deadline and ready lists): it is about
 * to be answered, and its set no longer leads to it. */
static void batch_detach(rl_redis *r, rlr_batch *b)
{
    rlr_set *k = b->set;
    rlr_batch *prev = NULL;
    for (rlr_batch *e = k->head; e && e != b; e = e->next)
        prev = e;
    if (prev)
        prev->next = b->next;
    else
        k->head = b->next;
    if (k->tail == b)
        k->tail = prev;
    b->set = NULL;
    b->next = NULL;
    dl_remove(r, b);
    ready_remove(r, b);
}

/* Answer b's calls, in order, and release b: a (NULL: failed) is the
 * script's answer. b is detached, so the callbacks (which may take, cancel,
 * or free r) see every set as consistent; a call they cancel in b is
 * unlinked (not sent) or left unanswered (sent). */
static void batch_answer(rl_redis *r, rlr_batch *b, const rlr_answer *a)
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
            rl_decision d[RL_POLICIES_MAX];
            for (size_t p = 0; a && p < a->npol; p++)
                rl_redis_batch_decision(a->allowed, a->key_allowed[p], a->wait_us[p], a->period_us[p],
                                        a->limit[p], i, &d[p]);
            done(arg, a != NULL, d);
        }
        i++;
    }
    batch_release(r, b);
}

/* Answer a list of detached batches (linked by next): with their answers
 * when they have one (ok), else as failed. */
static void answer_list(rl_redis *r, rlr_batch *list)
{
    while (list) {
        rlr_batch *b = list;
        list = b->next;
        b->next = NULL;
        batch_answer(r, b, b->ok ? &b->ans : NULL);
    }
}

/* k's head is gone: its next batch goes on the ready list, or waits for the
 * first connect, or, when it cannot go (not connected, past its deadline,
 * closing), is detached onto *failed for the caller to answer; k leaves the
 * table when it has no batch left. Calls nothing back: the caller answers
 * once every set is consistent. */
static void set_advance(rl_redis *r, rlr_set *k, rlr_batch ***failed)
{
    bool up = !r->closing && gw_redis_up(r->redis);
    uint64_t now = 0;
    while (k->head && !k->head->sent && !k->head->on_ready) {
        rlr_batch *b = k->head;
        if (b->on_dl && !now)
            now = now_ns();
        bool alive = !b->on_dl || b->due_ns > now;
        if (alive && up) {
            ready_add(r, b);
            break;
        }
        if (alive && !r->closing && connect_pending(r))
            break; /* connect_cb sends it */
        batch_detach(r, b);
        b->ok = false;
        **failed = b;
        *failed = &b->next;
    }
    if (!k->head)
        set_remove(r, k);
}

static void flight_reply(void *arg, const redisReply *rep);

/* Send f's batches as one script call (script_one for one set of one key). */
static bool flight_send(rlr_flight *f)
{
    static const char *const small[] = {"0", "1", "2", "3", "4", "5", "6", "7", "8"};
    _Static_assert(sizeof small / sizeof small[0] > RL_POLICIES_MAX, "a set's key count is one digit");
    rl_redis *r = f->r;
    char nums[RLR_FLIGHT_KEYS_MAX + 2][RLR_U64_DIGITS]; /* each set's n; numkeys; the set count */
    const char *argv[RLR_ARGC_MAX];
    size_t len[RLR_ARGC_MAX];
    int argc = 0;
    bool one = f->nb == 1 && f->b[0]->set->npol == 1;
    argv[argc] = f->noscript ? "EVAL" : "EVALSHA";
    len[argc++] = f->noscript ? 4 : 7;
    if (f->noscript) {
        argv[argc] = one ? script_one : script_multi;
        len[argc++] = one ? sizeof script_one - 1 : sizeof script_multi - 1;
    } else {
        argv[argc] = one ? r->sha_one : r->sha_multi;
        len[argc++] = RLR_SHA_LEN;
    }
    size_t nkeys = 0;
    for (uint32_t s = 0; s < f->nb; s++)
        nkeys += f->b[s]->set->npol;
    argv[argc] = nums[RLR_FLIGHT_KEYS_MAX];
    len[argc++] = u64_decimal(nkeys, nums[RLR_FLIGHT_KEYS_MAX]);
    for (uint32_t s = 0; s < f->nb; s++) {
        const rlr_set *k = f->b[s]->set;
        for (size_t i = 0; i < k->npol; i++) {
            argv[argc] = k->pol[i].name;
            len[argc++] = RLR_KEY_LEN;
        }
    }
    if (!one) {
        argv[argc] = nums[RLR_FLIGHT_KEYS_MAX + 1];
        len[argc++] = u64_decimal(f->nb, nums[RLR_FLIGHT_KEYS_MAX + 1]);
    }
    for (uint32_t s = 0; s < f->nb; s++) {
        const rlr_set *k = f->b[s]->set;
        argv[argc] = nums[s];
        len[argc++] = u64_decimal(f->n[s], nums[s]);
        if (!one) {
            argv[argc] = small[k->npol];
            len[argc++] = 1;
        }
        for (size_t i = 0; i < k->npol; i++) {
            const rlr_pol *p = &k->pol[i];
            argv[argc] = p->period;
            len[argc++] = p->period_len;
            argv[argc] = p->limit_s;
            len[argc++] = p->limit_len;
            argv[argc] = p->enforce ? "1" : "0";
            len[argc++] = 1;
        }
    }
    f->pending = r->closing ? NULL : gw_redis_command(r->redis, flight_reply, f, argc, argv, len);
    if (f->pending && !f->sent_ns)
        f->sent_ns = now_ns();
    return f->pending != NULL;
}

/* f could not go (or not again): its batches are answered as failed. */
static void flight_fail(rl_redis *r, rlr_flight *f)
{
    rlr_batch *list = NULL, **tail = &list;
    for (uint32_t s = 0; s < f->nb; s++) {
        rlr_batch *b = f->b[s];
        if (!b)
            continue;
        rlr_set *k = b->set;
        b->flight = NULL;
        batch_detach(r, b);
        b->ok = false;
        *tail = b;
        tail = &b->next;
        set_advance(r, k, &tail);
    }
    flight_release(r, f);
    answer_list(r, list);
}

/* One set's answer at rep->element[at..], checked: false when it is not one
 * for n requests against k's keys. */
static bool parse_answer(const redisReply *rep, size_t at, uint32_t n, const rlr_set *k, rlr_answer *a)
{
    for (size_t i = 0; i < 1 + 2 * k->npol; i++) {
        const redisReply *e = rep->element[at + i];
        if (e->type != REDIS_REPLY_INTEGER || e->integer < 0 ||
            (i != 0 && i % 2 == 0 && e->integer > (long long)n))
            return false;
    }
    a->allowed = rep->element[at]->integer;
    a->npol = k->npol;
    if (a->allowed > (long long)n)
        return false;
    for (size_t i = 0; i < k->npol; i++) {
        a->wait_us[i] = rep->element[at + 1 + 2 * i]->integer;
        a->key_allowed[i] = rep->element[at + 2 + 2 * i]->integer;
        a->period_us[i] = k->pol[i].period_us;
        a->limit[i] = k->pol[i].limit;
        if (k->pol[i].enforce && a->key_allowed[i] < a->allowed)
            return false; /* k is the least k_i of the enforced keys */
    }
    return true;
}

static void log_bad_reply(rl_redis *r, const redisReply *rep)
{
    if (!rep || !r->log)
        return;
    char line[512];
    if (rep->type == REDIS_REPLY_ERROR) {
        size_t n = rep->len < sizeof line - 8 ? rep->len : sizeof line - 8;
        memcpy(line, "redis: ", 7);
        memcpy(line + 7, rep->str, n);
        line[7 + n] = '\0';
    } else {
        snprintf(line, sizeof line, "redis: the rate-limit script answered an unexpected reply (type %d)",
                 rep->type);
    }
    r->log(CONFIG_LOG_WARN, line);
}

/* gw_redis_done_fn: the script's answer for f's batches (each its set's
 * head), or NULL (timeout, connection lost). */
static void flight_reply(void *arg, const redisReply *rep)
{
    rlr_flight *f = arg;
    rl_redis *r = f->r;
    f->pending = NULL;
    if (rep && rep->type == REDIS_REPLY_ERROR && !f->noscript && rep->len >= 8 &&
        memcmp(rep->str, "NOSCRIPT", 8) == 0) {
        /* Again with EVAL (the batches still waiting for it), within what is
         * left of the first send's deadline: gw_redis would give the resend
         * a whole redis.timeout of its own. */
        f->noscript = true;
        uint32_t live = 0;
        for (uint32_t s = 0; s < f->nb; s++) {
            rlr_batch *b = f->b[s];
            if (!b)
                continue;
            /* its first send's deadline, also when it waited and had a later one */
            if (b->on_dl && b->due_ns > f->sent_ns + r->timeout_ns)
                dl_remove(r, b);
            if (!b->on_dl)
                dl_add(r, b, f->sent_ns + r->timeout_ns);
            b->slot = live;
            f->b[live] = b;
            f->n[live] = f->n[s];
            f->npol[live] = f->npol[s];
            live++;
        }
        f->nb = live;
        if (f->sent_ns + r->timeout_ns > now_ns() && flight_send(f))
            return; /* these batches come back with EVAL's reply */
    }
    size_t want = 0;
    for (uint32_t s = 0; s < f->nb; s++)
        want += 1 + 2 * (size_t)f->npol[s];
    bool whole = rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == want;
    bool logged = false;
    if (!whole) {
        log_bad_reply(r, rep);
        logged = true;
    }
    /* Every batch off its set first, each set's next batch made ready; the
     * answers last, with every set consistent. */
    rlr_batch *list = NULL, **tail = &list;
    size_t at = 0;
    for (uint32_t s = 0; s < f->nb; s++) {
        rlr_batch *b = f->b[s];
        size_t seg = 1 + 2 * (size_t)f->npol[s];
        if (b) {
            rlr_set *k = b->set;
            b->ok = whole && parse_answer(rep, at, f->n[s], k, &b->ans);
            if (whole && !b->ok && !logged) {
                log_bad_reply(r, rep);
                logged = true;
            }
            b->flight = NULL;
            batch_detach(r, b);
            *tail = b;
            tail = &b->next;
            set_advance(r, k, &tail);
        }
        at += seg;
    }
    flight_release(r, f);
    enter(r);
    answer_list(r, list);
    leave(r);
}

/* The end of a turn of the loop: the batches made ready in it go, as few
 * script calls as RLR_FLIGHT_KEYS_MAX allows (one, mostly). */
static void flush_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    rl_redis *r = arg;
    enter(r);
    while (!r->closing && r->rd_head) {
        rlr_flight *f = flight_new(r);
        if (!f) { /* out of memory: the first ready batch fails, the others try again */
            rlr_batch *b = r->rd_head, *list = NULL, **tail = &list;
            rlr_set *k = b->set;
            batch_detach(r, b);
            b->ok = false;
            *tail = b;
            tail = &b->next;
            set_advance(r, k, &tail);
            answer_list(r, list);
            continue;
        }
        size_t keys = 0;
        rlr_batch *b;
        while ((b = r->rd_head) && keys + b->set->npol <= RLR_FLIGHT_KEYS_MAX) {
            ready_remove(r, b);
            b->sent = true;
            b->flight = f;
            b->slot = f->nb;
            f->b[f->nb] = b;
            f->n[f->nb] = b->n;
            f->npol[f->nb] = (unsigned char)b->set->npol;
            f->nb++;
            keys += b->set->npol;
        }
        f->live = f->nb;
        if (!flight_send(f))
            flight_fail(r, f);
    }
    leave(r);
}

/* The deadline list's timer: batches past their due time (waiting behind a
 * call in flight, for the first connect, or sent again after NOSCRIPT) are
 * answered as failed, taken out of their flight when they were sent. */
static void deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    rl_redis *r = arg;
    enter(r);
    uint64_t now = now_ns();
    rlr_batch *b, *list = NULL, **tail = &list;
    while (!r->closing && (b = r->dl_head) && b->due_ns <= now) {
        rlr_set *k = b->set;
        bool was_head = k->head == b;
        batch_unflight(r, b);
        batch_detach(r, b);
        b->ok = false;
        *tail = b;
        tail = &b->next;
        if (was_head)
            set_advance(r, k, &tail);
    }
    if (!r->closing && r->dl_head) {
        uint64_t due = r->dl_head->due_ns;
        timer_arm_ns(r->timer, due > now ? due - now : 0);
    }
    answer_list(r, list);
    leave(r);
}

/* A set whose first batch has not gone and is not ready (it waits for the
 * first connect), or NULL. */
static rlr_set *set_waiting(const rl_redis *r)
{
    for (size_t i = 0; i <= r->mask; i++)
        for (rlr_set *k = r->buckets[i]; k; k = k->hnext)
            if (k->head && !k->head->sent && !k->head->on_ready)
                return k;
    return NULL;
}

/* The first connect's timer: once up, the batches that waited for it go;
 * once its deadline has passed, they are answered as failed (set_advance
 * cannot send them). Else it looks again. */
static void connect_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    rl_redis *r = arg;
    if (r->closing)
        return;
    if (!gw_redis_up(r->redis) && connect_pending(r)) {
        timer_arm_ns(r->connect_timer, (uint64_t)RLR_CONNECT_POLL_MS * 1000000ULL);
        return;
    }
    r->connect_until_ns = 0;
    enter(r);
    rlr_batch *list = NULL, **tail = &list;
    rlr_set *k;
    while (!r->closing && (k = set_waiting(r)))
        set_advance(r, k, &tail); /* ready, or failed: either way progress */
    answer_list(r, list);
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
    if (r->connect_timer)
        evtimer_del(r->connect_timer);
    if (r->flush)
        event_del(r->flush);
    gw_redis_free(r->redis); /* answers the flights in flight; the batches behind them fail to go */
    r->redis = NULL;
    /* Whatever is left (ready, waiting for the first connect): answered as failed. */
    rlr_batch *list = NULL, **tail = &list;
    for (size_t i = 0; r->buckets && i <= r->mask; i++) {
        rlr_set *k;
        while ((k = r->buckets[i])) {
            rlr_batch *b = k->head;
            batch_unflight(r, b);
            batch_detach(r, b);
            b->ok = false;
            *tail = b;
            tail = &b->next;
            set_advance(r, k, &tail); /* closing: fails the ones behind it */
        }
    }
    answer_list(r, list);
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

/* The set of a call: each policy's Redis key name (SHA-1 of its material),
 * period, limit and flag, and a hash of them all. False when hashing failed. */
static bool set_make(rl_redis *r, const rl_redis_policy *p, size_t n, rlr_set *k)
{
    k->npol = n;
    k->hash = 0;
    for (size_t i = 0; i < n; i++) {
        rlr_pol *q = &k->pol[i];
        unsigned char digest[EVP_MAX_MD_SIZE];
        if (EVP_DigestInit_ex(r->sha1_ctx, r->sha1, NULL) != 1 ||
            EVP_DigestUpdate(r->sha1_ctx, p[i].key, p[i].key_len) != 1 ||
            EVP_DigestFinal_ex(r->sha1_ctx, digest, NULL) != 1)
            return false;
        memcpy(q->name, RLR_KEY_PREFIX, sizeof RLR_KEY_PREFIX - 1);
        hex(digest, SHA_DIGEST_LENGTH, q->name + sizeof RLR_KEY_PREFIX - 1);
        uint64_t h;
        memcpy(&h, digest, sizeof h);
        k->hash = (k->hash ^ h) * 0x9e3779b97f4a7c15ULL + i; /* order matters: so do the answers */
        uint64_t window_us = (uint64_t)p[i].window_ms * 1000ULL;
        uint64_t period_us = p[i].limit > 0 ? window_us / (uint64_t)p[i].limit : window_us;
        q->period_us = (int64_t)(period_us ? period_us : 1);
        q->limit = p[i].limit > 0 ? p[i].limit : 1;
        q->enforce = !p[i].dry_run;
        q->period_len = u64_decimal((uint64_t)q->period_us, q->period);
        q->limit_len = u64_decimal((uint64_t)q->limit, q->limit_s);
    }
    return true;
}

rl_redis_call *rl_redis_take(rl_redis *r, const rl_redis_policy *p, size_t n, rl_redis_done_fn done,
                             void *arg)
{
    if (!r || r->closing || n == 0 || n > RL_POLICIES_MAX)
        return NULL;
    bool up = gw_redis_up(r->redis);
    if (!up && !connect_pending(r))
        return NULL;
    rlr_set want;
    if (!set_make(r, p, n, &want))
        return NULL;

    rl_redis_call *c = malloc(sizeof *c);
    if (!c)
        return NULL;
    c->done = done;
    c->arg = arg;

    rlr_set *k = set_find(r, &want);
    if (k) { /* a batch ready or in flight: this call joins the last one not sent, or a new one */
        rlr_batch *b = k->tail;
        if (b->sent || b->n >= RLR_BATCH_MAX) {
            b = batch_new(r, k);
            if (!b) {
                free(c);
                return NULL;
            }
            k->tail->next = b;
            k->tail = b;
            /* Waiting behind a call in flight: twice redis.timeout from now,
             * that call's time and its own (a backlog beyond what Redis
             * answers in time fails, not grows); for the first connect,
             * redis.timeout. */
            dl_add(r, b, now_ns() + (up ? 2 : 1) * r->timeout_ns);
        }
        batch_append(b, c);
        return c;
    }

    /* Nothing ready or in flight for this set: it goes with this turn's flush. */
    k = r->free_sets;
    if (k)
        r->free_sets = k->hnext;
    else if (!(k = malloc(sizeof *k))) {
        free(c);
        return NULL;
    }
    k->hash = want.hash;
    k->npol = want.npol;
    memcpy(k->pol, want.pol, want.npol * sizeof want.pol[0]);
    rlr_batch *b = batch_new(r, k);
    if (!b) {
        k->hnext = r->free_sets;
        r->free_sets = k;
        free(c);
        return NULL;
    }
    k->head = k->tail = b;
    batch_append(b, c);
    set_insert(r, k);
    if (up)
        ready_add(r, b);
    else /* waits for the first connect (connect_cb), within redis.timeout of this call */
        dl_add(r, b, now_ns() + r->timeout_ns);
    return c;
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
    if (b->n == 0 && b->set) { /* a batch not sent left empty goes nowhere */
        rl_redis *r = b->r;
        rlr_set *k = b->set;
        bool was_head = k->head == b;
        batch_detach(r, b);
        batch_release(r, b);
        if (!k->head)
            set_remove(r, k);
        else if (was_head && !k->head->sent && !k->head->on_ready && !r->closing && gw_redis_up(r->redis))
            ready_add(r, k->head); /* the one behind it (else its deadline answers it) */
    }
}

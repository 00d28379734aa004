/*
 * test_ratelimit_redis.c - the Redis store's batching (ratelimit/rlredis.c).
 *
 * First the arithmetic, pure: a batch of n requests against m policies asked
 * of the script (a C model of it: k allowed, and per key wait = max(TAT, now)
 * - now and k_i, its room) and rl_redis_batch_decision() give every request,
 * for every policy, exactly what a naive reference gives: n requests one
 * after the other at the same instant, each checked against every policy by
 * the one-request script of old (modelled in C), going on only when no
 * enforced policy refuses it and then charged to every policy with room
 * (dry-run ones included); and both leave the same TATs. Over hand, edge and
 * random cases (one policy, and up to RL_POLICIES_MAX with dry-run ones).
 *
 * Then rl_redis against a fake Redis on the same loop (fake_redis.h) whose
 * scripts run the same model (its clock fixed by the test) and which can
 * hold its script replies: while a set's call is in flight the next calls for it wait and go
 * as ONE EVALSHA asking for n; other sets (another client's key beside the
 * same route-wide key) go at once; each call gets its own decisions; a
 * request's policies go in one EVALSHA with all their keys, all or nothing; a
 * batch holds at most 256; a cancelled waiting call is not sent, a cancelled
 * sent one is not answered; NOSCRIPT resends the batch with EVAL, within
 * what is left of the first send's deadline; a waiting batch is sent when
 * the call ahead of it is answered or failed and is answered within
 * redis.timeout of that send and 2 x redis.timeout of its first call (a slow
 * Redis within the timeout still decides, a backlog does not grow); a batch
 * waiting for the first connect leaves its flight at its deadline; rl_redis_free, also from inside a done
 * callback, answers everything left as failed; done is never called from inside rl_redis_take.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <event2/buffer.h>
#include <event2/event.h>

#include "fake_redis.h"
#include "ratelimit/rlredis.h"

/* ---- models of the scripts ------------------------------------------------------------ */

/* The one-request script (the version before batching), in us: returns the
 * new TAT and fills d as the client made it from {allowed, remaining,
 * reset_us, retry_us}. */
static int64_t old_script(int64_t tat, int64_t now, int64_t period, int64_t limit, rl_decision *d)
{
    int64_t window = period * limit;
    int64_t base = tat > now ? tat : now;
    int64_t nxt = base + period;
    *d = (rl_decision){.limit = limit};
    if (nxt - now > window) {
        d->reset_ms = (base - now + 999) / 1000;
        d->retry_after_ms = (nxt - window - now + 999) / 1000;
        return tat;
    }
    d->allowed = true;
    d->remaining = (window - (nxt - now)) / period;
    d->reset_ms = (nxt - now + 999) / 1000;
    return nxt;
}

/* One policy as the tests give it. */
typedef struct model_pol {
    int64_t period, limit;
    bool enforce;
} model_pol;

/* The batch script over m keys: returns k; fills wait[] and room[] (k_i);
 * tat[i] moved by min(k, k_i) periods. */
static int64_t batch_script(int64_t *const *tat, const model_pol *p, int m, int64_t now, int64_t n,
                            int64_t *wait, int64_t *room)
{
    int64_t k = n, base[RL_POLICIES_MAX];
    for (int i = 0; i < m; i++) {
        int64_t window = p[i].period * p[i].limit;
        base[i] = *tat[i] > now ? *tat[i] : now;
        int64_t r = now + window - base[i];
        int64_t ki = r >= p[i].period ? r / p[i].period : 0;
        if (ki > n)
            ki = n;
        room[i] = ki;
        wait[i] = base[i] - now;
        if (p[i].enforce && ki < k)
            k = ki;
    }
    for (int i = 0; i < m; i++) {
        int64_t c = room[i] < k ? room[i] : k;
        if (c > 0)
            *tat[i] = base[i] + c * p[i].period;
    }
    return k;
}

static bool same_decision(const rl_decision *a, const rl_decision *b)
{
    return a->allowed == b->allowed && a->other_refused == b->other_refused && a->no_room == b->no_room &&
           a->limit == b->limit && a->remaining == b->remaining && a->reset_ms == b->reset_ms &&
           a->retry_after_ms == b->retry_after_ms;
}

/* n requests at once against m policies whose TATs are tat0[]: the batch
 * (script model + rl_redis_batch_decision) against the naive sequence. */
static void check_batch_equals_sequence_m(const int64_t *tat0, const model_pol *p, int m, int64_t now,
                                          int64_t n)
{
    int64_t seq[RL_POLICIES_MAX], bat[RL_POLICIES_MAX], *bp[RL_POLICIES_MAX];
    int64_t wait[RL_POLICIES_MAX], room[RL_POLICIES_MAX];
    for (int i = 0; i < m; i++) {
        seq[i] = bat[i] = tat0[i];
        bp[i] = &bat[i];
    }
    int64_t k = batch_script(bp, p, m, now, n, wait, room);
    int64_t went = 0;
    for (int64_t j = 0; j < n; j++) {
        rl_decision want[RL_POLICIES_MAX];
        int64_t next[RL_POLICIES_MAX];
        bool go = true;
        for (int i = 0; i < m; i++) {
            next[i] = old_script(seq[i], now, p[i].period, p[i].limit, &want[i]);
            if (p[i].enforce && !want[i].allowed)
                go = false;
        }
        for (int i = 0; i < m; i++) {
            if (go && want[i].allowed)
                seq[i] = next[i];
            if (!go && want[i].allowed) {
                want[i].allowed = false;
                want[i].other_refused = true;
            }
            rl_decision got;
            memset(&got, 0x5a, sizeof got);
            rl_redis_batch_decision(k, room[i], wait[i], p[i].period, p[i].limit, j, &got);
            if (!same_decision(&want[i], &got))
                fail_msg(
                    "m %d n %lld, request %lld, policy %d (tat %lld now %lld period %lld limit %lld %s): "
                    "want %d/%d/%lld/%lld/%lld, got %d/%d/%lld/%lld/%lld",
                    m, (long long)n, (long long)j, i, (long long)tat0[i], (long long)now,
                    (long long)p[i].period, (long long)p[i].limit, p[i].enforce ? "enforced" : "dry-run",
                    want[i].allowed, want[i].other_refused, (long long)want[i].remaining,
                    (long long)want[i].reset_ms, (long long)want[i].retry_after_ms, got.allowed,
                    got.other_refused, (long long)got.remaining, (long long)got.reset_ms,
                    (long long)got.retry_after_ms);
        }
        went += go;
    }
    assert_int_equal(k, went);
    for (int i = 0; i < m; i++)
        if (bat[i] != seq[i])
            fail_msg("m %d n %lld: policy %d TAT %lld after the batch, %lld after the sequence", m,
                     (long long)n, i, (long long)bat[i], (long long)seq[i]);
}

static void check_batch_equals_sequence(int64_t tat, int64_t now, int64_t period, int64_t limit, int64_t n)
{
    model_pol p = {period, limit, true};
    check_batch_equals_sequence_m(&tat, &p, 1, now, n);
}

#define NOW 1700000000000000LL /* us, as Redis's TIME gives it */

static void test_batch_arithmetic_hand_cases(void **state)
{
    (void)state;
    /* limit 5 per 10 s (period 2 s), empty key, 7 at once: 5 allowed counting
     * down, reset 2..10 s; then 2 refused, retry one period, reset 10 s. */
    model_pol p = {2000000, 5, true};
    int64_t tat = 0, *tp = &tat, wait, room;
    int64_t k = batch_script(&tp, &p, 1, NOW, 7, &wait, &room);
    assert_int_equal(k, 5);
    assert_int_equal(room, 5);
    assert_int_equal(wait, 0);
    assert_int_equal(tat, NOW + 10000000);
    for (int i = 0; i < 7; i++) {
        rl_decision d;
        rl_redis_batch_decision(k, room, wait, 2000000, 5, i, &d);
        assert_int_equal(d.limit, 5);
        assert_false(d.other_refused);
        if (i < 5) {
            assert_true(d.allowed);
            assert_int_equal(d.remaining, 4 - i);
            assert_int_equal(d.reset_ms, 2000 * (i + 1));
            assert_int_equal(d.retry_after_ms, 0);
        } else {
            assert_false(d.allowed);
            assert_int_equal(d.remaining, 0);
            assert_int_equal(d.reset_ms, 10000);
            assert_int_equal(d.retry_after_ms, 2000);
        }
    }
    /* 1.5 s later: one period (2 s) is not over, 3 asked: none, retry 0.5 s. */
    k = batch_script(&tp, &p, 1, NOW + 1500000, 3, &wait, &room);
    assert_int_equal(k, 0);
    assert_int_equal(wait, 8500000);
    rl_decision d;
    rl_redis_batch_decision(k, room, wait, 2000000, 5, 2, &d);
    assert_false(d.allowed);
    assert_int_equal(d.retry_after_ms, 500);
    assert_int_equal(d.reset_ms, 8500);
    /* A TAT far ahead (the limit was lowered): room negative, none allowed. */
    tat = NOW + 100000000;
    k = batch_script(&tp, &p, 1, NOW, 4, &wait, &room);
    assert_int_equal(k, 0);
    assert_int_equal(tat, NOW + 100000000);
    check_batch_equals_sequence(NOW + 100000000, NOW, 2000000, 5, 4);
}

/* Two policies: per client 5, route-wide 12 (same window). Client A asks 20
 * at once: 5 go, the route-wide key is charged 5, not 20; A's refusals are
 * its own policy's, the route-wide one says other_refused. Client B: 5 go
 * (its own limit), then client C: the 2 the route has left go, and the
 * route-wide policy refuses the rest while C's own says other_refused. A
 * dry-run policy of limit 3 beside A's: charged only for what went (3 of
 * A's 5), would-be refusals from the 4th. */
static void test_batch_arithmetic_two_policies(void **state)
{
    (void)state;
    int64_t period = 60000000 / 5, rperiod = 60000000 / 12, dperiod = 60000000 / 3;
    model_pol p[3] = {{period, 5, true}, {rperiod, 12, true}, {dperiod, 3, false}};
    int64_t ta = 0, tr = 0, td = 0, *tats[3] = {&ta, &tr, &td}, wait[3], room[3];
    int64_t k = batch_script(tats, p, 3, NOW, 20, wait, room);
    assert_int_equal(k, 5);
    assert_int_equal(room[0], 5);
    assert_int_equal(room[1], 12);
    assert_int_equal(room[2], 3);
    assert_int_equal(tr, NOW + 5 * rperiod);
    assert_int_equal(td, NOW + 3 * dperiod);
    for (int i = 0; i < 20; i++) {
        rl_decision a, r, dry;
        rl_redis_batch_decision(k, room[0], wait[0], period, 5, i, &a);
        rl_redis_batch_decision(k, room[1], wait[1], rperiod, 12, i, &r);
        rl_redis_batch_decision(k, room[2], wait[2], dperiod, 3, i, &dry);
        assert_int_equal(a.allowed, i < 5);
        assert_false(a.other_refused);
        assert_int_equal(r.allowed, i < 5);
        assert_int_equal(r.other_refused, i >= 5);
        assert_int_equal(dry.allowed, i < 3);
        assert_false(dry.other_refused);
        if (!a.allowed)
            assert_int_equal(a.retry_after_ms, period / 1000);
    }
    /* client B: its own key is fresh */
    int64_t tb = 0;
    model_pol pb[2] = {{period, 5, true}, {rperiod, 12, true}};
    int64_t *tbs[2] = {&tb, &tr};
    k = batch_script(tbs, pb, 2, NOW, 20, wait, room);
    assert_int_equal(k, 5); /* B's own 5: 5 of the 7 the route has left */
    k = batch_script(tbs, pb, 2, NOW, 20, wait, room);
    assert_int_equal(k, 0);
    /* a third client C: the route has 2 left */
    int64_t tc = 0;
    int64_t *tcs[2] = {&tc, &tr};
    k = batch_script(tcs, pb, 2, NOW, 20, wait, room);
    assert_int_equal(k, 2);
    rl_decision c, r;
    rl_redis_batch_decision(k, room[0], wait[0], period, 5, 2, &c);
    rl_redis_batch_decision(k, room[1], wait[1], rperiod, 12, 2, &r);
    assert_false(c.allowed);
    assert_true(c.other_refused);
    assert_int_equal(c.remaining, 2); /* what it would have said had the request gone */
    assert_false(r.allowed);
    assert_false(r.other_refused);
    assert_int_equal(r.remaining, 0);
    assert_true(r.retry_after_ms > 0);
    assert_int_equal(tc, NOW + 2 * period);
    /* and the sequence agrees */
    int64_t t0[3] = {0, 0, 0};
    check_batch_equals_sequence_m(t0, p, 3, NOW, 20);
}

static void test_batch_arithmetic_equals_sequence(void **state)
{
    (void)state;
    static const int64_t periods[] = {1, 3, 999, 1000, 1001, 2000000, 6000000, 60000000};
    static const int64_t limits[] = {1, 2, 5, 10, 50, 1000, 100000000};
    static const int64_t ns[] = {1, 2, 3, 7, 64, 256};
    for (size_t p = 0; p < sizeof periods / sizeof *periods; p++) {
        for (size_t l = 0; l < sizeof limits / sizeof *limits; l++) {
            int64_t period = periods[p], limit = limits[l], window = period * limit;
            if (window > 1000000LL * 86400 * 365)
                continue;
            int64_t tats[] = {0,
                              NOW - 1,
                              NOW,
                              NOW + 1,
                              NOW + period - 1,
                              NOW + period,
                              NOW + window - period - 1,
                              NOW + window - period,
                              NOW + window - period + 1,
                              NOW + window - 1,
                              NOW + window,
                              NOW + window + 1,
                              NOW + 3 * window};
            for (size_t t = 0; t < sizeof tats / sizeof *tats; t++)
                for (size_t n = 0; n < sizeof ns / sizeof *ns; n++)
                    check_batch_equals_sequence(tats[t], NOW, period, limit, ns[n]);
        }
    }
    /* random ones */
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (int i = 0; i < 20000; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        int64_t period = 1 + (int64_t)(x % 5000000);
        int64_t limit = 1 + (int64_t)((x >> 23) % 300);
        int64_t window = period * limit;
        int64_t tat =
            (x >> 40) % 4 == 0 ? 0 : NOW - window + (int64_t)((x >> 7) % (uint64_t)(3 * window + 1));
        int64_t n = 1 + (int64_t)((x >> 50) % 300);
        check_batch_equals_sequence(tat, NOW, period, limit, n);
    }
}

static uint64_t xorshift(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

/* Random requests against 2..RL_POLICIES_MAX policies (a third of them
 * dry-run, sometimes all), with TATs anywhere from long past to past the
 * window, small limits so that every policy binds somewhere. */
static void test_batch_arithmetic_policies_equal_sequence(void **state)
{
    (void)state;
    uint64_t x = 0x2545f4914f6cdd1dULL;
    int cases = 0, some_refused = 0, some_other = 0, mixed_dry = 0;
    for (; cases < 20000; cases++) {
        int m = 2 + (int)(xorshift(&x) % (cases % 10 == 0 ? RL_POLICIES_MAX - 1 : 3));
        model_pol p[RL_POLICIES_MAX];
        int64_t tat[RL_POLICIES_MAX];
        bool enforced = false;
        for (int i = 0; i < m; i++) {
            uint64_t r = xorshift(&x);
            p[i].period = 1 + (int64_t)(r % (r % 3 == 0 ? 1000 : 5000000));
            p[i].limit = 1 + (int64_t)((r >> 20) % (r % 5 == 0 ? 300 : 20));
            p[i].enforce = (r >> 40) % 3 != 0;
            enforced |= p[i].enforce;
            int64_t window = p[i].period * p[i].limit;
            tat[i] = (r >> 44) % 4 == 0 ? 0 : NOW - window + (int64_t)((r >> 9) % (uint64_t)(3 * window + 1));
        }
        mixed_dry += !enforced;
        int64_t n = 1 + (int64_t)(xorshift(&x) % (cases % 3 == 0 ? 300 : 40));
        check_batch_equals_sequence_m(tat, p, m, NOW, n);
        /* how often each branch was met, so the cases are not all alike */
        int64_t t2[RL_POLICIES_MAX], *tp[RL_POLICIES_MAX], wait[RL_POLICIES_MAX], room[RL_POLICIES_MAX];
        for (int i = 0; i < m; i++) {
            t2[i] = tat[i];
            tp[i] = &t2[i];
        }
        int64_t k = batch_script(tp, p, m, NOW, n, wait, room);
        some_refused += k < n;
        for (int i = 0; i < m; i++)
            if (k < n && room[i] > k) {
                some_other++;
                break;
            }
    }
    assert_true(some_refused > 5000);
    assert_true(some_other > 2000);
    assert_true(mixed_dry > 100);
}

/* ---- a fake Redis running the batch model ------------------------------------------ */

#define FAKE_MAX_SCRIPTS 1024
#define FAKE_MAX_KEYS 1024
#define FAKE_MAX_SETS 160 /* sets in one script call: more than the client sends */

/* EVALSHA sha numkeys KEYS... nsets (n m (p l e)...)...: all of it reaches the script function. */
_Static_assert(5 + 6 * FAKE_MAX_SETS <= FAKE_REDIS_MAX_ARGS, "a script call of FAKE_MAX_SETS sets is cut");

/* One script call as the fake saw it: its sets (one for script_one's
 * shape), the first one in full. */
typedef struct script_call {
    bool eval;  /* EVAL, not EVALSHA */
    bool multi; /* script_multi's shape (else script_one's) */
    int conn;
    char key[64]; /* the first set's first key */
    int nkeys;    /* the first set's */
    char keys[RL_POLICIES_MAX][64];
    bool enforce[RL_POLICIES_MAX];
    int64_t n;
    int nsets;                    /* every set's: */
    int64_t set_n[FAKE_MAX_SETS]; /* requests asked for */
    int set_nkeys[FAKE_MAX_SETS];
    char set_key[FAKE_MAX_SETS][64];     /* first key */
    unsigned set_enforce[FAKE_MAX_SETS]; /* bit i: key i enforced */
} script_call;

/* The fake's scripts (fake_redis.h: its script function): the batch model
 * at a clock the test sets, the keys' TATs, and every script call it ran. */
typedef struct model {
    int64_t now_us;
    script_call scripts[FAKE_MAX_SCRIPTS];
    int nscripts;
    char keys[FAKE_MAX_KEYS][64];
    int64_t tats[FAKE_MAX_KEYS];
    int nkeys;
} model;

static int64_t arg_int(const char *a, size_t n)
{
    char buf[32];
    snprintf(buf, sizeof buf, "%.*s", (int)n, a);
    return atoll(buf);
}

static int64_t *model_tat(model *m, const char *key)
{
    for (int i = 0; i < m->nkeys; i++)
        if (strcmp(m->keys[i], key) == 0)
            return &m->tats[i];
    assert_true(m->nkeys < FAKE_MAX_KEYS);
    size_t len = strlen(key);
    assert_true(len < sizeof m->keys[0]);
    memcpy(m->keys[m->nkeys], key, len + 1);
    m->tats[m->nkeys] = 0;
    return &m->tats[m->nkeys++];
}

/* A script call (EVALSHA or EVAL; NOSCRIPT, holds, delays and stalls are the
 * fake's): sha numkeys KEYS... then script_one's ARGV (n period limit
 * enforce, one key) or script_multi's (nsets, per set n m and per key period
 * limit enforce). Runs the batch model on every set in order, records the
 * call, answers k and per key wait and room. */
static void model_script(void *arg, const fake_redis_conn *fc, bool eval, int argc, const char *const *argv,
                         const size_t *lens, struct evbuffer *reply)
{
    model *mo = arg;
    int nkeys = (int)arg_int(argv[2], lens[2]);
    int nargv = argc - 3 - nkeys;
    bool one = nkeys == 1 && nargv == 4;
    bool multi = !one && nkeys >= 1 && nargv >= 1;
    assert_true(one || multi);
    assert_true(mo->nscripts < FAKE_MAX_SCRIPTS);
    script_call *sc = &mo->scripts[mo->nscripts++];
    memset(sc, 0, sizeof *sc);
    sc->eval = eval;
    sc->multi = multi;
    sc->conn = fc->id;
    int a = 3 + nkeys; /* ARGV's next */
    int nsets = multi ? (int)arg_int(argv[a], lens[a]) : 1;
    a += multi;
    assert_true(nsets >= 1 && nsets <= FAKE_MAX_SETS);
    int kb = 0, out = 0; /* keys of the sets before; integers in the reply */
    struct evbuffer *body = evbuffer_new();
    assert_non_null(body);
    for (int s = 0; s < nsets; s++) {
        int64_t asked = arg_int(argv[a], lens[a]);
        int m = multi ? (int)arg_int(argv[a + 1], lens[a + 1]) : 1;
        a += multi ? 2 : 1;
        assert_true(m >= 1 && m <= RL_POLICIES_MAX && kb + m <= nkeys && a + 3 * m <= argc);
        model_pol mp[RL_POLICIES_MAX];
        int64_t *tats[RL_POLICIES_MAX], wait[RL_POLICIES_MAX], room[RL_POLICIES_MAX];
        char keys[RL_POLICIES_MAX][64];
        for (int i = 0; i < m; i++, a += 3) {
            snprintf(keys[i], sizeof keys[i], "%.*s", (int)lens[3 + kb + i], argv[3 + kb + i]);
            mp[i].period = arg_int(argv[a], lens[a]);
            mp[i].limit = arg_int(argv[a + 1], lens[a + 1]);
            assert_true(lens[a + 2] == 1 && (argv[a + 2][0] == '1' || argv[a + 2][0] == '0'));
            mp[i].enforce = argv[a + 2][0] == '1';
            tats[i] = model_tat(mo, keys[i]);
        }
        if (s == 0) {
            sc->nkeys = m;
            sc->n = asked;
            for (int i = 0; i < m; i++) {
                memcpy(sc->keys[i], keys[i], sizeof keys[i]);
                sc->enforce[i] = mp[i].enforce;
            }
            memcpy(sc->key, keys[0], sizeof sc->key);
        }
        sc->set_n[s] = asked;
        sc->set_nkeys[s] = m;
        for (int i = 0; i < m; i++)
            sc->set_enforce[s] |= (unsigned)mp[i].enforce << i;
        memcpy(sc->set_key[s], keys[0], sizeof sc->set_key[s]);
        int64_t k = batch_script(tats, mp, m, mo->now_us, asked, wait, room);
        evbuffer_add_printf(body, ":%lld\r\n", (long long)k);
        for (int i = 0; i < m; i++)
            evbuffer_add_printf(body, ":%lld\r\n:%lld\r\n", (long long)wait[i], (long long)room[i]);
        out += 1 + 2 * m;
        kb += m;
    }
    assert_int_equal(kb, nkeys);
    assert_int_equal(a, argc); /* every argument read */
    sc->nsets = nsets;
    evbuffer_add_printf(reply, "*%d\r\n", out);
    evbuffer_add_buffer(reply, body);
    evbuffer_free(body);
}

/* A fake Redis in base's loop whose scripts run on a fresh model (its clock
 * at NOW); the caller frees the model after fake_redis_stop. */
static fake_redis *model_fake_start(struct event_base *base, model **mp)
{
    model *mo = calloc(1, sizeof *mo);
    assert_non_null(mo);
    mo->now_us = NOW;
    fake_redis *f = fake_redis_start(base);
    f->script = model_script;
    f->script_arg = mo;
    *mp = mo;
    return f;
}

/* ---- the loop, the client ------------------------------------------------------------ */

#define RUN_UNTIL(base, cond, ms) FAKE_REDIS_RUN_UNTIL(base, cond, ms, 1)

static void test_log(config_log_level level, const char *message)
{
    (void)level;
    (void)message;
}

#define MAX_ANSWERS 512

typedef struct answers {
    int n;
    int order[MAX_ANSWERS];
    bool ok[MAX_ANSWERS];
    rl_decision d[MAX_ANSWERS];                    /* the first policy's */
    rl_decision all[MAX_ANSWERS][RL_POLICIES_MAX]; /* every policy's */
    uint64_t at_ms[MAX_ANSWERS];
    bool in_take, called_inside;
    rl_redis *free_on_first; /* rl_redis_free from inside the first done */
    int n_after_free;
} answers;

typedef struct probe {
    answers *a;
    int id;
    int npol; /* policies of its call */
    bool answered;
} probe;

static void record_done(void *arg, bool ok, const rl_decision *d)
{
    probe *p = arg;
    answers *a = p->a;
    assert_false(p->answered); /* once */
    p->answered = true;
    if (a->in_take)
        a->called_inside = true;
    assert_true(a->n < MAX_ANSWERS);
    a->order[a->n] = p->id;
    a->ok[a->n] = ok;
    if (ok) {
        a->d[a->n] = *d;
        for (int i = 0; i < p->npol; i++)
            a->all[a->n][i] = d[i];
    }
    a->at_ms[a->n] = fake_redis_ms_now();
    a->n++;
    if (a->free_on_first) {
        rl_redis *r = a->free_on_first;
        a->free_on_first = NULL;
        rl_redis_free(r);
        a->n_after_free = a->n;
    }
}

/* The index of probe id's answer, or -1. */
static int answer_of(const answers *a, int id)
{
    for (int i = 0; i < a->n; i++)
        if (a->order[i] == id)
            return i;
    return -1;
}

typedef struct env {
    struct event_base *base;
    fake_redis *f;
    model *m; /* f's scripts */
    rl_redis *r;
    char url[128];
    config_redis cfg;
    answers a;
    probe p[MAX_ANSWERS];
} env;

/* A client configured for the fake, not yet waited for (hold_ping: the
 * handshake's PING is not answered until fake_redis_release). */
static env *env_new(int timeout_ms, int conns, bool hold_ping)
{
    env *e = calloc(1, sizeof *e);
    assert_non_null(e);
    e->base = event_base_new();
    assert_non_null(e->base);
    e->f = model_fake_start(e->base, &e->m);
    e->f->hold_pings = hold_ping;
    snprintf(e->url, sizeof e->url, "redis://127.0.0.1:%d", e->f->port);
    e->cfg = (config_redis){.enabled = true,
                            .url = e->url,
                            .password = "",
                            .timeout_ms = timeout_ms,
                            .connections_per_worker = conns};
    e->r = rl_redis_create(e->base, test_log);
    assert_non_null(e->r);
    for (int i = 0; i < MAX_ANSWERS; i++)
        e->p[i] = (probe){&e->a, i, 1, false};
    rl_redis_configure(e->r, &e->cfg);
    return e;
}

static env *env_start(int timeout_ms, int conns)
{
    env *e = env_new(timeout_ms, conns, false);
    RUN_UNTIL(e->base, rl_redis_up(e->r) && fake_redis_open(e->f) == conns, 2000);
    fake_redis_run_for(e->base, 10); /* every connection through its handshake */
    return e;
}

static void env_stop(env *e)
{
    rl_redis_free(e->r);
    fake_redis_stop(e->f);
    free(e->m);
    event_base_free(e->base);
    free(e);
}

/* Probe id takes one request against n policies. */
static rl_redis_call *take_set(env *e, int id, const rl_redis_policy *p, size_t n)
{
    e->p[id].npol = (int)n;
    e->a.in_take = true;
    rl_redis_call *c = rl_redis_take(e->r, p, n, record_done, &e->p[id]);
    e->a.in_take = false;
    return c;
}

/* Probe id takes one request of key for limit per window_ms. */
static rl_redis_call *take(env *e, int id, const char *key, int64_t limit, int64_t window_ms)
{
    rl_redis_policy p = {key, strlen(key), limit, window_ms, false};
    return take_set(e, id, &p, 1);
}

/* ---- tests ------------------------------------------------------------------------------ */

/* limit 3 per 30 s (period 10 s): A goes alone; B..E wait while it is in
 * flight and go as one EVALSHA for 4; another key goes at once. Decisions as
 * five calls in sequence: 3 allowed counting down, then 2 refused. */
static void test_waiting_calls_go_as_one_batch(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    e->f->hold_scripts = true;
    assert_non_null(take(e, 0, "k1", 3, 30000));
    RUN_UNTIL(e->base, e->m->nscripts == 1, 2000);
    assert_int_equal(e->m->scripts[0].n, 1);
    for (int i = 1; i <= 4; i++)
        assert_non_null(take(e, i, "k1", 3, 30000));
    assert_non_null(take(e, 10, "k2", 3, 30000)); /* another key: not behind k1 */
    fake_redis_run_for(e->base, 30);
    assert_int_equal(e->m->nscripts, 2);
    assert_string_not_equal(e->m->scripts[1].key, e->m->scripts[0].key);
    assert_int_equal(e->m->scripts[1].n, 1);
    assert_int_equal(e->a.n, 0);

    e->f->hold_scripts = false;
    fake_redis_release(e->f);
    RUN_UNTIL(e->base, e->a.n == 6, 2000);
    assert_false(e->a.called_inside);
    assert_int_equal(e->m->nscripts, 3);
    assert_false(e->m->scripts[2].eval);
    assert_string_equal(e->m->scripts[2].key, e->m->scripts[0].key);
    assert_int_equal(e->m->scripts[2].n, 4);
    for (int id = 0; id <= 4; id++) {
        int i = answer_of(&e->a, id);
        assert_true(i >= 0);
        assert_true(e->a.ok[i]);
        const rl_decision *d = &e->a.d[i];
        if (id < 3) {
            assert_true(d->allowed);
            assert_int_equal(d->remaining, 2 - id);
            assert_int_equal(d->reset_ms, 10000 * (id + 1));
        } else {
            assert_false(d->allowed);
            assert_int_equal(d->remaining, 0);
            assert_int_equal(d->reset_ms, 30000);
            assert_int_equal(d->retry_after_ms, 10000);
        }
    }
    /* answered in order within the batch */
    assert_true(answer_of(&e->a, 1) < answer_of(&e->a, 2) && answer_of(&e->a, 3) < answer_of(&e->a, 4));
    int i = answer_of(&e->a, 10);
    assert_true(e->a.ok[i] && e->a.d[i].allowed && e->a.d[i].remaining == 2);

    /* Nothing in flight any more: the next call goes alone at once. */
    e->m->now_us += 10000000; /* one period later: one more */
    assert_non_null(take(e, 20, "k1", 3, 30000));
    RUN_UNTIL(e->base, e->a.n == 7, 2000);
    assert_int_equal(e->m->scripts[3].n, 1);
    assert_true(e->a.d[6].allowed);
    assert_int_equal(e->a.d[6].remaining, 0);
    env_stop(e);
}

/* Same key, another limit (a reload changed the policy): not the same batch,
 * another set; made in one turn of the loop, the three sets go in one
 * script call, in order, each asking for one. */
static void test_other_limit_not_batched(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    e->f->hold_scripts = true;
    assert_non_null(take(e, 0, "k", 3, 30000));
    assert_non_null(take(e, 1, "k", 4, 30000));
    assert_non_null(take(e, 2, "k", 3, 60000));
    RUN_UNTIL(e->base, e->m->nscripts == 1, 2000);
    fake_redis_run_for(e->base, 20);
    assert_int_equal(e->m->nscripts, 1);
    assert_true(e->m->scripts[0].multi);
    assert_int_equal(e->m->scripts[0].nsets, 3);
    for (int s = 0; s < 3; s++) {
        assert_int_equal(e->m->scripts[0].set_n[s], 1);
        assert_string_equal(e->m->scripts[0].set_key[s], e->m->scripts[0].key); /* one Redis key */
    }
    e->f->hold_scripts = false;
    fake_redis_release(e->f);
    RUN_UNTIL(e->base, e->a.n == 3, 2000);
    for (int i = 0; i < 3; i++)
        assert_true(e->a.ok[i] && e->a.d[i].allowed);
    env_stop(e);
}

/* Calls for many sets made in one turn of the loop (many clients, many
 * keys) go as ONE script call, the sets in call order; two calls for one set
 * in that turn are one batch asking for 2; a key shared by two sets of the
 * call is taken by the first and seen by the second, as for two calls in a
 * row: route-wide limit 1, client A's request goes, client B's is refused by
 * the route (its own policy says other_refused). Each call gets its own
 * decisions. */
static void test_sets_in_one_turn_go_together(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    char keys[40][16];
    for (int id = 0; id < 40; id++) {
        snprintf(keys[id], sizeof keys[id], "many:%d", id);
        assert_non_null(take(e, id, keys[id], 2, 20000));
    }
    assert_non_null(take(e, 40, keys[7], 2, 20000)); /* many:7 again: its batch asks for 2 */
    RUN_UNTIL(e->base, e->a.n == 41, 2000);
    assert_false(e->a.called_inside);
    assert_int_equal(e->m->nscripts, 1);
    const script_call *sc = &e->m->scripts[0];
    assert_true(sc->multi);
    assert_int_equal(sc->nsets, 40);
    for (int s = 0; s < 40; s++)
        assert_int_equal(sc->set_n[s], s == 7 ? 2 : 1);
    for (int id = 0; id <= 40; id++) {
        int i = answer_of(&e->a, id);
        assert_true(i >= 0 && e->a.ok[i] && e->a.d[i].allowed);
        assert_int_equal(e->a.d[i].remaining, id == 40 ? 0 : 1);
    }
    assert_true(answer_of(&e->a, 7) < answer_of(&e->a, 40));

    rl_redis_policy a[2] = {{"client:A", 8, 5, 50000, false}, {"route1", 6, 1, 10000, false}};
    rl_redis_policy b[2] = {{"client:B", 8, 5, 50000, false}, {"route1", 6, 1, 10000, false}};
    assert_non_null(take_set(e, 50, a, 2));
    assert_non_null(take_set(e, 51, b, 2));
    RUN_UNTIL(e->base, e->a.n == 43, 2000);
    assert_int_equal(e->m->nscripts, 2);
    assert_int_equal(e->m->scripts[1].nsets, 2);
    assert_int_equal(e->m->scripts[1].set_nkeys[0], 2);
    assert_int_equal(e->m->scripts[1].set_nkeys[1], 2);
    const rl_decision(*d)[RL_POLICIES_MAX] = e->a.all;
    int ia = answer_of(&e->a, 50), ib = answer_of(&e->a, 51);
    assert_true(d[ia][0].allowed && d[ia][1].allowed && d[ia][1].remaining == 0);
    assert_false(d[ib][1].allowed);
    assert_false(d[ib][1].other_refused);
    assert_int_equal(d[ib][1].retry_after_ms, 10000);
    assert_false(d[ib][0].allowed);
    assert_true(d[ib][0].other_refused);
    env_stop(e);
}

/* A call carries at most 128 keys: 300 one-key sets in one turn go as calls
 * of 128, 128 and 44 sets (the first two sent before the third); 20 sets
 * of 8 keys as 16 sets and 4; every call answered. */
static void test_flight_key_cap(void **state)
{
    (void)state;
    env *e = env_start(2000, 1);
    char keys[300][16];
    for (int id = 0; id < 300; id++) {
        snprintf(keys[id], sizeof keys[id], "cap:%d", id);
        assert_non_null(take(e, id, keys[id], 5, 50000));
    }
    RUN_UNTIL(e->base, e->a.n == 300, 2000);
    assert_int_equal(e->m->nscripts, 3);
    assert_int_equal(e->m->scripts[0].nsets, 128);
    assert_int_equal(e->m->scripts[1].nsets, 128);
    assert_int_equal(e->m->scripts[2].nsets, 44);
    for (int i = 0; i < 300; i++)
        assert_true(e->a.ok[i] && e->a.d[i].allowed && e->a.d[i].remaining == 4);

    static char names[20][RL_POLICIES_MAX][16];
    rl_redis_policy p[20][RL_POLICIES_MAX];
    for (int s = 0; s < 20; s++) {
        for (int i = 0; i < RL_POLICIES_MAX; i++) {
            snprintf(names[s][i], sizeof names[s][i], "w%d:%d", s, i);
            p[s][i] = (rl_redis_policy){names[s][i], strlen(names[s][i]), 5, 50000, false};
        }
        assert_non_null(take_set(e, 300 + s, p[s], RL_POLICIES_MAX));
    }
    RUN_UNTIL(e->base, e->a.n == 320, 2000);
    assert_int_equal(e->m->nscripts, 5);
    assert_int_equal(e->m->scripts[3].nsets, 16);
    assert_int_equal(e->m->scripts[4].nsets, 4);
    for (int i = 300; i < 320; i++)
        assert_true(e->a.ok[i] && e->a.all[i][RL_POLICIES_MAX - 1].allowed);
    env_stop(e);
}

/* redis.timeout 300 ms, the handshake held: A is taken at t=0 and C at
 * t=150, both waiting for the first connect (deadlines 300 and 450). At
 * t=200 Redis answers the handshake: A and C go in one call (held). At t=300
 * A is answered as failed and leaves the call; when the reply comes (t=380)
 * C gets its decision, and A is not answered again. */
static void test_deadline_leaves_flight(void **state)
{
    (void)state;
    env *e = env_new(300, 1, true);
    e->f->hold_scripts = true;
    uint64_t t0 = fake_redis_ms_now();
    assert_non_null(take(e, 0, "A", 3, 30000));
    while (fake_redis_ms_now() < t0 + 150)
        fake_redis_run_for(e->base, 1);
    assert_false(rl_redis_up(e->r));
    assert_non_null(take(e, 1, "C", 3, 30000));
    while (fake_redis_ms_now() < t0 + 200)
        fake_redis_run_for(e->base, 1);
    e->f->hold_pings = false;
    fake_redis_release(e->f); /* the PONG; script replies stay held */
    RUN_UNTIL(e->base, e->m->nscripts == 1, 2000);
    assert_int_equal(e->m->scripts[0].nsets, 2);
    assert_int_equal(e->a.n, 0);
    RUN_UNTIL(e->base, e->a.n == 1, 2000);
    uint64_t a_at = e->a.at_ms[0] - t0;
    assert_int_equal(e->a.order[0], 0);
    assert_false(e->a.ok[0]);
    assert_true(a_at >= 295 && a_at <= 360);
    while (fake_redis_ms_now() < t0 + 380)
        fake_redis_run_for(e->base, 1);
    assert_int_equal(e->a.n, 1); /* C's reply is held */
    e->f->hold_scripts = false;
    fake_redis_release(e->f);
    RUN_UNTIL(e->base, e->a.n == 2, 2000);
    fake_redis_run_for(e->base, 20);
    assert_int_equal(e->a.n, 2);
    assert_int_equal(e->a.order[1], 1);
    assert_true(e->a.ok[1] && e->a.d[1].allowed && e->a.d[1].remaining == 2);
    env_stop(e);
}

/* A Redis that answers every call 60 ms after it came, within redis.timeout
 * (100 ms) but past half of it: A goes at once, B..E wait behind it and go
 * when its reply comes (t=60), answered at t=120. Every call is decided by
 * Redis: a waiting batch is timed from its own send, not its first call
 * (from its first call, B..E failed at t=110). Three rounds. */
static void test_slow_redis_within_timeout_decides(void **state)
{
    (void)state;
    env *e = env_start(100, 1);
    e->f->script_delay_ms = 60;
    int id = 0;
    for (int round = 0; round < 3; round++) {
        int first = id;
        assert_non_null(take(e, id++, "slow", 1000, 60000));
        RUN_UNTIL(e->base, e->m->nscripts == 2 * round + 1, 2000);
        fake_redis_run_for(e->base, 10);
        for (int i = 0; i < 4; i++)
            assert_non_null(take(e, id++, "slow", 1000, 60000));
        RUN_UNTIL(e->base, e->a.n == id, 2000);
        assert_int_equal(e->m->nscripts, 2 * round + 2);
        assert_int_equal(e->m->scripts[2 * round + 1].n, 4);
        for (int i = first; i < id; i++) {
            int at = answer_of(&e->a, i);
            assert_true(at >= 0 && e->a.ok[at] && e->a.d[at].allowed);
        }
    }
    env_stop(e);
}

/* NOSCRIPT for a call of several sets: it goes again with EVAL, the same
 * sets asking for the same; decisions as usual. */
static void test_noscript_resends_flight(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    e->f->noscript_left = 1;
    assert_non_null(take(e, 0, "ns1", 1, 10000));
    assert_non_null(take(e, 1, "ns2", 1, 10000));
    assert_non_null(take(e, 2, "ns1", 1, 10000));
    RUN_UNTIL(e->base, e->a.n == 3, 2000);
    assert_int_equal(e->m->nscripts, 1); /* the NOSCRIPT answer is not a script run */
    assert_true(e->m->scripts[0].eval && e->m->scripts[0].multi);
    assert_int_equal(e->m->scripts[0].nsets, 2);
    assert_int_equal(e->m->scripts[0].set_n[0], 2);
    assert_int_equal(e->m->scripts[0].set_n[1], 1);
    int i0 = answer_of(&e->a, 0), i1 = answer_of(&e->a, 1), i2 = answer_of(&e->a, 2);
    assert_true(e->a.ok[i0] && e->a.d[i0].allowed);
    assert_true(e->a.ok[i1] && e->a.d[i1].allowed);
    assert_true(e->a.ok[i2] && !e->a.d[i2].allowed);
    env_stop(e);
}

/* 300 waiting calls: batches of 256 and 44, one after the other. Limit 100:
 * exactly 100 allowed, in call order. */
static void test_batch_cap(void **state)
{
    (void)state;
    env *e = env_start(2000, 1);
    e->f->hold_scripts = true;
    assert_non_null(take(e, 0, "cap", 100, 60000));
    RUN_UNTIL(e->base, e->m->nscripts == 1, 2000);
    for (int id = 1; id <= 300; id++)
        assert_non_null(take(e, id, "cap", 100, 60000));
    for (int round = 0; round < 3; round++) {
        fake_redis_release(e->f);
        RUN_UNTIL(e->base, e->m->nscripts == round + 2 || e->a.n == 301, 2000);
    }
    e->f->hold_scripts = false;
    fake_redis_release(e->f);
    RUN_UNTIL(e->base, e->a.n == 301, 2000);
    assert_int_equal(e->m->nscripts, 3);
    assert_int_equal(e->m->scripts[1].n, 256);
    assert_int_equal(e->m->scripts[2].n, 44);
    for (int id = 0; id <= 300; id++) {
        int i = answer_of(&e->a, id);
        assert_true(i >= 0 && e->a.ok[i]);
        assert_int_equal(e->a.d[i].allowed, id < 100);
        assert_int_equal(e->a.d[i].remaining, id < 100 ? 99 - id : 0);
    }
    env_stop(e);
}

/* A cancelled waiting call is not sent (n counts it out); a cancelled call in
 * flight is not answered; a waiting batch cancelled whole goes nowhere. */
static void test_cancel(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    e->f->hold_scripts = true;
    rl_redis_call *c0 = take(e, 0, "c", 10, 10000);
    assert_non_null(c0);
    RUN_UNTIL(e->base, e->m->nscripts == 1, 2000);
    rl_redis_call *c[4];
    for (int id = 1; id <= 3; id++)
        assert_non_null(c[id] = take(e, id, "c", 10, 10000));
    rl_redis_cancel(c[2]);
    rl_redis_cancel(c0); /* sent: its token is taken, it is not answered */
    e->f->hold_scripts = false;
    fake_redis_release(e->f);
    RUN_UNTIL(e->base, e->a.n == 2, 2000);
    fake_redis_run_for(e->base, 20);
    assert_int_equal(e->a.n, 2);
    assert_int_equal(e->m->nscripts, 2);
    assert_int_equal(e->m->scripts[1].n, 2);
    assert_int_equal(answer_of(&e->a, 0), -1);
    assert_int_equal(answer_of(&e->a, 2), -1);
    /* 1 and 3 are the 2nd and 3rd requests of the key */
    assert_int_equal(e->a.d[answer_of(&e->a, 1)].remaining, 8);
    assert_int_equal(e->a.d[answer_of(&e->a, 3)].remaining, 7);

    /* A whole waiting batch cancelled: only the one in flight was sent. */
    e->f->hold_scripts = true;
    assert_non_null(take(e, 4, "c", 10, 10000));
    RUN_UNTIL(e->base, e->m->nscripts == 3, 2000);
    rl_redis_call *w1 = take(e, 5, "c", 10, 10000), *w2 = take(e, 6, "c", 10, 10000);
    rl_redis_cancel(w2);
    rl_redis_cancel(w1);
    e->f->hold_scripts = false;
    fake_redis_release(e->f);
    RUN_UNTIL(e->base, e->a.n == 3, 2000);
    fake_redis_run_for(e->base, 20);
    assert_int_equal(e->m->nscripts, 3);
    assert_int_equal(e->a.n, 3);
    rl_redis_cancel(NULL);
    env_stop(e);
}

/* NOSCRIPT: the batch goes again with EVAL, same n; decisions as usual. */
static void test_noscript_resends_batch_with_eval(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    e->f->hold_scripts = true;
    assert_non_null(take(e, 0, "ns", 2, 10000));
    RUN_UNTIL(e->base, e->m->nscripts == 1, 2000);
    for (int id = 1; id <= 3; id++)
        assert_non_null(take(e, id, "ns", 2, 10000));
    e->f->noscript_left = 1;
    e->f->hold_scripts = false;
    fake_redis_release(e->f);
    RUN_UNTIL(e->base, e->a.n == 4, 2000);
    assert_int_equal(e->m->nscripts, 2); /* the NOSCRIPT answer is not a script run */
    assert_true(e->m->scripts[1].eval);
    assert_int_equal(e->m->scripts[1].n, 3);
    int allowed = 0;
    for (int i = 0; i < 4; i++) {
        assert_true(e->a.ok[i]);
        allowed += e->a.d[i].allowed;
    }
    assert_int_equal(allowed, 2);
    env_stop(e);
}

/* redis.timeout 150 ms, two connections, Redis never answers scripts. A goes
 * at t=0 and fails at ~150 ms (gw_redis's deadline, its connection dropped);
 * B waited from t=70 (its own deadline 2 x 150 ms later, ~370 ms): it goes on
 * the other connection when A fails and is answered (failed) redis.timeout
 * after that send, at ~300 ms, before its own deadline. */
static void test_waiting_batch_timed_from_its_send(void **state)
{
    (void)state;
    env *e = env_start(150, 2);
    e->f->stall_scripts = true;
    uint64_t t0 = fake_redis_ms_now();
    assert_non_null(take(e, 0, "dl", 10, 10000));
    RUN_UNTIL(e->base, e->m->nscripts == 1, 2000);
    while (fake_redis_ms_now() < t0 + 70)
        fake_redis_run_for(e->base, 1);
    uint64_t tb = fake_redis_ms_now();
    assert_non_null(take(e, 1, "dl", 10, 10000));
    assert_non_null(take(e, 2, "dl", 10, 10000));
    RUN_UNTIL(e->base, e->a.n == 1, 2000);
    uint64_t a_at = e->a.at_ms[0] - t0;
    assert_true(a_at >= 145 && a_at <= 200);
    RUN_UNTIL(e->base, e->m->nscripts == 2, 2000); /* B went when A failed */
    assert_int_equal(e->m->scripts[1].n, 2);
    RUN_UNTIL(e->base, e->a.n == 3, 2000);
    int ia = answer_of(&e->a, 0), ib = answer_of(&e->a, 1);
    assert_false(e->a.ok[ia]);
    assert_false(e->a.ok[ib]);
    assert_false(e->a.ok[answer_of(&e->a, 2)]);
    uint64_t b_waited = e->a.at_ms[ib] - tb;
    assert_true(b_waited >= 215);
    assert_true(b_waited <= 2 * 150);
    env_stop(e);
}

/* A backlog Redis cannot answer in time is bounded: every reply 150 ms
 * late, redis.timeout 200 ms, 300 calls on one key while the first is in
 * flight. Batches go one per round trip: 256 at 150 ms (answered at 300),
 * then 44 at 300 ms (their answer would come at 450): those fail at their
 * deadline, 2 x redis.timeout after their call (~400 ms), not later. */
static void test_waiting_backlog_bounded(void **state)
{
    (void)state;
    env *e = env_start(200, 1);
    e->f->script_delay_ms = 150;
    uint64_t t0 = fake_redis_ms_now();
    assert_non_null(take(e, 0, "backlog", 100000, 60000));
    RUN_UNTIL(e->base, e->m->nscripts == 1, 2000);
    for (int id = 1; id <= 300; id++)
        assert_non_null(take(e, id, "backlog", 100000, 60000));
    RUN_UNTIL(e->base, e->a.n == 301, 3000);
    int ok = 0;
    for (int i = 0; i < e->a.n; i++) {
        ok += e->a.ok[i];
        if (!e->a.ok[i]) {
            assert_true(e->a.order[i] > 256);
            assert_true(e->a.at_ms[i] - t0 >= 2 * 200 - 5);
            assert_true(e->a.at_ms[i] - t0 <= 2 * 200 + 60);
        }
    }
    assert_int_equal(ok, 257);        /* the first call and the first batch of 256 */
    fake_redis_run_for(e->base, 150); /* the last delayed reply delivered before the fake stops */
    env_stop(e);
}

/* NOSCRIPT keeps the first send's deadline also for a batch that waited
 * (whose own, 2 x redis.timeout from its call, is later): redis.timeout 150
 * ms; A goes (held), B waits; A's answer comes and B goes at once; Redis
 * answers B's EVALSHA with NOSCRIPT 80 ms later and never answers the EVAL.
 * B is answered (failed) ~150 ms after its send, not ~230 (the EVAL's own). */
static void test_noscript_waiting_batch_keeps_send_deadline(void **state)
{
    (void)state;
    env *e = env_start(150, 1);
    e->f->hold_scripts = true;
    assert_non_null(take(e, 0, "nsw", 10, 10000));
    RUN_UNTIL(e->base, e->m->nscripts == 1, 2000);
    assert_non_null(take(e, 1, "nsw", 10, 10000));
    e->f->noscript_left = 1;
    e->f->stall_eval = true;
    e->f->script_delay_ms = 80;
    e->f->hold_scripts = false;
    uint64_t t0 = fake_redis_ms_now();
    fake_redis_release(e->f); /* A's answer; B's EVALSHA goes when it comes */
    RUN_UNTIL(e->base, e->a.n == 2, 2000);
    assert_true(e->a.ok[answer_of(&e->a, 0)]);
    int ib = answer_of(&e->a, 1);
    assert_false(e->a.ok[ib]);
    uint64_t b_at = e->a.at_ms[ib] - t0;
    assert_true(b_at >= 140);
    assert_true(b_at <= 150 + 40);
    env_stop(e);
}

/* Redis never answers, three connections, redis.timeout 150 ms: call 0 goes,
 * calls 1..257 wait behind it (a batch of 256 and one of 1). Each batch would
 * go on the next connection as the one ahead fails; none waits more than
 * 2 x redis.timeout from its call. */
static void test_waiting_stall_bounded(void **state)
{
    (void)state;
    env *e = env_start(150, 3);
    e->f->stall_scripts = true;
    uint64_t t0 = fake_redis_ms_now();
    assert_non_null(take(e, 0, "st", 1000, 10000));
    RUN_UNTIL(e->base, e->m->nscripts == 1, 2000);
    for (int id = 1; id <= 257; id++)
        assert_non_null(take(e, id, "st", 1000, 10000));
    RUN_UNTIL(e->base, e->a.n == 258, 3000);
    for (int i = 0; i < e->a.n; i++) {
        assert_false(e->a.ok[i]);
        assert_true(e->a.at_ms[i] - t0 <= 2 * 150 + 40);
    }
    env_stop(e);
}

/* A full ready batch cancelled whole while Redis goes away: the batch behind
 * it (call 256) is answered (failed) at its deadline, not left for good. */
static void test_cancel_leaves_no_orphan(void **state)
{
    (void)state;
    env *e = env_start(150, 1);
    rl_redis_call *h[256];
    for (int id = 0; id < 256; id++)
        assert_non_null(h[id] = take(e, id, "orph", 100, 10000));
    assert_non_null(take(e, 256, "orph", 100, 10000));
    config_redis off = e->cfg;
    off.enabled = false;
    rl_redis_configure(e->r, &off);
    for (int id = 0; id < 256; id++)
        rl_redis_cancel(h[id]);
    RUN_UNTIL(e->base, e->a.n == 1, 1000);
    assert_int_equal(e->a.order[0], 256);
    assert_false(e->a.ok[0]);
    env_stop(e);
}

/* rl_redis_free from inside a done callback: the rest (a batch in flight,
 * the one waiting behind it, another key) answered as failed before it
 * returns; a cancelled one not at all. */
static void test_free_inside_done(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    e->f->hold_scripts = true;
    assert_non_null(take(e, 0, "f1", 10, 10000));
    RUN_UNTIL(e->base, e->m->nscripts == 1, 2000);
    assert_non_null(take(e, 1, "f1", 10, 10000));
    rl_redis_call *c2 = take(e, 2, "f1", 10, 10000);
    assert_non_null(take(e, 3, "f2", 10, 10000));
    RUN_UNTIL(e->base, e->m->nscripts == 2, 2000);
    rl_redis_cancel(c2);
    e->a.free_on_first = e->r;
    e->r = NULL;
    fake_redis_release(e->f); /* f1's first reply only: f2's is behind it but held with it */
    RUN_UNTIL(e->base, e->a.n >= 1, 2000);
    assert_int_equal(e->a.n_after_free, 3);
    assert_int_equal(e->a.n, 3);
    assert_int_equal(e->a.order[0], 0);
    assert_true(e->a.ok[0]);
    assert_false(e->a.ok[answer_of(&e->a, 1)]);
    assert_false(e->a.ok[answer_of(&e->a, 3)]);
    assert_int_equal(answer_of(&e->a, 2), -1);
    fake_redis_run_for(e->base, 30);
    assert_int_equal(e->a.n, 3);
    env_stop(e);
}

/* rl_redis_free with calls in flight and waiting: all answered as failed. */
static void test_free_answers_everything(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    e->f->hold_scripts = true;
    for (int id = 0; id < 5; id++) {
        assert_non_null(take(e, id, id < 3 ? "g1" : "g2", 10, 10000));
        RUN_UNTIL(e->base, e->m->nscripts >= (id < 3 ? 1 : 2), 2000);
    }
    rl_redis_free(e->r);
    e->r = NULL;
    assert_int_equal(e->a.n, 5);
    for (int i = 0; i < 5; i++)
        assert_false(e->a.ok[i]);
    env_stop(e);
}

/* A request's policies go in ONE EVALSHA with all their keys, all or
 * nothing: per client 2, route-wide 3 (period 10 s each... 20 s and 30 s
 * windows). Client A x3 one after the other: 2 go, the 3rd is refused by A's
 * own policy and costs the route-wide key nothing; client B x2: the 1st goes
 * (the route's 3rd), the 2nd is refused by the route-wide policy while B's
 * own says other_refused. */
static void test_policies_in_one_call(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    rl_redis_policy a[2] = {{"client:A", 8, 2, 20000, false}, {"route", 5, 3, 30000, false}};
    rl_redis_policy b[2] = {{"client:B", 8, 2, 20000, false}, {"route", 5, 3, 30000, false}};
    for (int id = 0; id < 3; id++) {
        assert_non_null(take_set(e, id, a, 2));
        RUN_UNTIL(e->base, e->a.n == id + 1, 2000);
    }
    for (int id = 3; id < 5; id++) {
        assert_non_null(take_set(e, id, b, 2));
        RUN_UNTIL(e->base, e->a.n == id + 1, 2000);
    }
    assert_int_equal(e->m->nscripts, 5);
    for (int i = 0; i < 5; i++) {
        assert_int_equal(e->m->scripts[i].nkeys, 2);
        assert_int_equal(e->m->scripts[i].n, 1);
        assert_true(e->m->scripts[i].enforce[0] && e->m->scripts[i].enforce[1]);
    }
    assert_string_equal(e->m->scripts[0].keys[1], e->m->scripts[4].keys[1]); /* the same route-wide key */
    assert_string_not_equal(e->m->scripts[0].keys[0], e->m->scripts[4].keys[0]);
    const rl_decision(*d)[RL_POLICIES_MAX] = e->a.all;
    for (int i = 0; i < 5; i++)
        assert_true(e->a.ok[i] && e->a.order[i] == i);
    /* A: 2 allowed (route remaining 2, 1), then refused by its own */
    assert_true(d[0][0].allowed && d[0][1].allowed && d[0][1].remaining == 2);
    assert_true(d[1][0].allowed && d[1][1].allowed && d[1][1].remaining == 1);
    assert_false(d[2][0].allowed);
    assert_false(d[2][0].other_refused);
    assert_int_equal(d[2][0].retry_after_ms, 10000);
    assert_false(d[2][1].allowed);
    assert_true(d[2][1].other_refused);
    /* B: the route's 3rd, then the route refuses */
    assert_true(d[3][0].allowed && d[3][1].allowed && d[3][1].remaining == 0);
    assert_false(d[4][1].allowed);
    assert_false(d[4][1].other_refused);
    assert_int_equal(d[4][1].retry_after_ms, 10000);
    assert_false(d[4][0].allowed);
    assert_true(d[4][0].other_refused);
    assert_int_equal(d[4][0].remaining, 0); /* had it gone: B's 2nd of 2 */
    env_stop(e);
}

/* Calls batch by their whole set: A's requests wait behind A's call in
 * flight and go as one batch asking for n; B's (another client key beside
 * the same route-wide key) is another set and does not wait for A's; a set
 * whose route-wide policy is dry-run (the same key names) is another set too
 * (B's and that one, made in one turn, go in one call). The batch's
 * decisions are those of the calls in sequence. */
static void test_sets_batch_apart(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    e->f->hold_scripts = true;
    rl_redis_policy a[2] = {{"client:A", 8, 3, 30000, false}, {"route", 5, 4, 40000, false}};
    rl_redis_policy b[2] = {{"client:B", 8, 3, 30000, false}, {"route", 5, 4, 40000, false}};
    rl_redis_policy ad[2] = {{"client:A", 8, 3, 30000, false}, {"route", 5, 4, 40000, true}};
    assert_non_null(take_set(e, 0, a, 2));
    RUN_UNTIL(e->base, e->m->nscripts == 1, 2000);
    for (int id = 1; id <= 4; id++)
        assert_non_null(take_set(e, id, a, 2));
    assert_non_null(take_set(e, 10, b, 2));
    assert_non_null(take_set(e, 20, ad, 2));
    RUN_UNTIL(e->base, e->m->nscripts == 2, 2000);
    fake_redis_run_for(e->base, 20);
    assert_int_equal(e->m->nscripts, 2);
    assert_int_equal(e->m->scripts[1].nsets, 2);
    assert_int_equal(e->m->scripts[1].set_enforce[0], 3u);
    assert_int_equal(e->m->scripts[1].set_enforce[1], 1u); /* the dry-run flag is sent */
    assert_string_equal(e->m->scripts[1].set_key[1], e->m->scripts[0].keys[0]);
    e->f->hold_scripts = false;
    fake_redis_release(e->f);
    RUN_UNTIL(e->base, e->a.n == 7, 2000);
    assert_int_equal(e->m->nscripts, 3);
    assert_int_equal(e->m->scripts[2].n, 4);
    assert_string_equal(e->m->scripts[2].keys[0], e->m->scripts[0].keys[0]);
    /* The fake answered in order: A's first (route 1 of 4), B's (route 2),
     * the dry-run set's (A 2 of 3; its route key charged too: 3), then A's
     * batch of 4: A has 1 left, the route 1: request 1 goes, 2..4 refused
     * by both policies (the route has none left either). */
    const rl_decision(*d)[RL_POLICIES_MAX] = e->a.all;
    int i0 = answer_of(&e->a, 0), i10 = answer_of(&e->a, 10), i20 = answer_of(&e->a, 20);
    assert_true(d[i0][0].allowed && d[i0][1].allowed && d[i0][1].remaining == 3);
    assert_true(d[i10][0].allowed && d[i10][1].allowed && d[i10][1].remaining == 2);
    assert_true(d[i20][0].allowed && d[i20][1].allowed && d[i20][1].remaining == 1);
    int i1 = answer_of(&e->a, 1);
    assert_true(d[i1][0].allowed && d[i1][1].allowed);
    for (int id = 2; id <= 4; id++) {
        int i = answer_of(&e->a, id);
        assert_true(e->a.ok[i]);
        assert_false(d[i][0].allowed);
        assert_false(d[i][1].allowed);
        assert_false(d[i][0].other_refused);
        assert_false(d[i][1].other_refused);
    }
    env_stop(e);
}

/* A dry-run policy never refuses and is charged only for requests that go:
 * limit 1 dry-run beside an enforced 3: the first request goes and charges
 * both, the next two go with the dry-run one saying it would have refused,
 * the 4th is refused by the enforced one (the dry-run one also had no room). */
static void test_dry_run_in_a_set(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    rl_redis_policy p[2] = {{"dry", 3, 1, 10000, true}, {"real", 4, 3, 30000, false}};
    for (int id = 0; id < 4; id++) {
        assert_non_null(take_set(e, id, p, 2));
        RUN_UNTIL(e->base, e->a.n == id + 1, 2000);
    }
    const rl_decision(*d)[RL_POLICIES_MAX] = e->a.all;
    assert_true(d[0][0].allowed && d[0][1].allowed);
    for (int i = 1; i < 3; i++) {
        assert_false(d[i][0].allowed);
        assert_false(d[i][0].other_refused);
        assert_true(d[i][1].allowed);
    }
    assert_false(d[3][1].allowed);
    assert_false(d[3][0].allowed);
    e->m->now_us += 10000000; /* one dry-run period, one real period later: one each again */
    assert_non_null(take_set(e, 4, p, 2));
    RUN_UNTIL(e->base, e->a.n == 5, 2000);
    assert_true(d[4][0].allowed && d[4][1].allowed);
    env_stop(e);
}

/* NOSCRIPT answered late: the EVAL sent again gets only what is left of the
 * first send's deadline. redis.timeout 150 ms; the NOSCRIPT comes at ~100 ms
 * and the EVAL is never answered: the call is answered (failed) at ~150 ms,
 * not ~250 ms. */
static void test_noscript_resend_keeps_deadline(void **state)
{
    (void)state;
    env *e = env_start(150, 1);
    e->f->noscript_left = 1;
    e->f->stall_eval = true;
    e->f->hold_scripts = true;
    uint64_t t0 = fake_redis_ms_now();
    assert_non_null(take(e, 0, "nsd", 10, 10000));
    while (fake_redis_ms_now() < t0 + 100)
        fake_redis_run_for(e->base, 1);
    assert_int_equal(e->a.n, 0);
    e->f->hold_scripts = false;
    fake_redis_release(e->f);
    RUN_UNTIL(e->base, e->a.n == 1, 2000);
    assert_false(e->a.ok[0]);
    assert_int_equal(e->m->nscripts, 1);
    assert_true(e->m->scripts[0].eval);
    uint64_t took = e->a.at_ms[0] - t0;
    assert_true(took >= 145);
    assert_true(took <= 200);
    env_stop(e);
}

/* 1..RL_POLICIES_MAX policies per call: none or more is refused at once. */
static void test_policy_count(void **state)
{
    (void)state;
    env *e = env_start(1000, 1);
    rl_redis_policy p[RL_POLICIES_MAX + 1];
    char names[RL_POLICIES_MAX + 1][8];
    for (int i = 0; i <= RL_POLICIES_MAX; i++) {
        snprintf(names[i], sizeof names[i], "p%d", i);
        p[i] = (rl_redis_policy){names[i], strlen(names[i]), 1 + i, 60000, i % 2 == 1};
    }
    assert_null(take_set(e, 0, p, 0));
    assert_null(take_set(e, 0, p, RL_POLICIES_MAX + 1));
    assert_non_null(take_set(e, 1, p, RL_POLICIES_MAX));
    RUN_UNTIL(e->base, e->a.n == 1, 2000);
    assert_int_equal(e->m->scripts[0].nkeys, RL_POLICIES_MAX);
    assert_true(e->a.ok[0]);
    for (int i = 0; i < RL_POLICIES_MAX; i++) {
        assert_true(e->a.all[0][i].allowed);
        assert_int_equal(e->a.all[0][i].limit, 1 + i);
        assert_int_equal(e->a.all[0][i].remaining, i);
    }
    env_stop(e);
}

/* The first connect after a configure is waited for: a call made at once
 * (not up yet) is not refused but goes once the connection is up, and is
 * decided by Redis. A target where nothing listens: the call is answered as
 * failed within redis.timeout of the configure, and after that window calls
 * are refused at once (NULL) while Redis stays down. */
static void test_first_connect_waited_for(void **state)
{
    (void)state;
    static answers a;
    memset(&a, 0, sizeof a);
    struct event_base *base = event_base_new();
    model *m;
    fake_redis *f = model_fake_start(base, &m);
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", f->port);
    config_redis cfg = {
        .enabled = true, .url = url, .password = "", .timeout_ms = 500, .connections_per_worker = 1};
    rl_redis *r = rl_redis_create(base, test_log);
    assert_non_null(r);
    rl_redis_configure(r, &cfg);
    assert_false(rl_redis_up(r));
    probe p[4] = {{&a, 0, 1, false}, {&a, 1, 1, false}, {&a, 2, 1, false}, {&a, 3, 1, false}};
    rl_redis_policy pol = {"first", 5, 2, 60000, false};
    a.in_take = true;
    assert_non_null(rl_redis_take(r, &pol, 1, record_done, &p[0]));
    assert_non_null(rl_redis_take(r, &pol, 1, record_done, &p[1]));
    assert_non_null(rl_redis_take(r, &pol, 1, record_done, &p[2]));
    a.in_take = false;
    RUN_UNTIL(base, a.n == 3, 2000);
    assert_false(a.called_inside);
    assert_int_equal(m->nscripts, 1); /* the three waited together: one batch of 3 */
    assert_int_equal(m->scripts[0].n, 3);
    for (int i = 0; i < 3; i++)
        assert_true(a.ok[i]);
    assert_true(a.d[0].allowed && a.d[1].allowed && !a.d[2].allowed);
    rl_redis_free(r);

    /* Nothing listens: answered as failed by the connect's deadline, then refused at once. */
    int dead = f->port;
    fake_redis_stop(f);
    free(m);
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", dead);
    cfg.timeout_ms = 150;
    r = rl_redis_create(base, test_log);
    assert_non_null(r);
    uint64_t t0 = fake_redis_ms_now();
    rl_redis_configure(r, &cfg);
    assert_non_null(rl_redis_take(r, &pol, 1, record_done, &p[3]));
    RUN_UNTIL(base, a.n == 4, 2000);
    assert_false(a.ok[3]);
    uint64_t took = fake_redis_ms_now() - t0;
    assert_true(took <= 260);
    probe q = {&a, 9, 1, false};
    fake_redis_run_for(base, 20);
    assert_null(rl_redis_take(r, &pol, 1, record_done, &q));
    /* the same target again (a reload that changed nothing): no new wait */
    rl_redis_configure(r, &cfg);
    assert_null(rl_redis_take(r, &pol, 1, record_done, &q));
    rl_redis_free(r);
    event_base_free(base);
}

/* Not connected: NULL at once, nothing answered. */
static void test_not_connected(void **state)
{
    (void)state;
    struct event_base *base = event_base_new();
    rl_redis *r = rl_redis_create(base, test_log);
    assert_non_null(r);
    assert_false(rl_redis_up(r));
    static answers a;
    probe p = {&a, 0, 1, false};
    rl_redis_policy pol = {"x", 1, 1, 1000, false};
    assert_null(rl_redis_take(r, &pol, 1, record_done, &p));
    rl_redis_free(r);
    rl_redis_free(NULL);
    assert_int_equal(a.n, 0);
    event_base_free(base);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batch_arithmetic_hand_cases),
        cmocka_unit_test(test_batch_arithmetic_equals_sequence),
        cmocka_unit_test(test_batch_arithmetic_two_policies),
        cmocka_unit_test(test_batch_arithmetic_policies_equal_sequence),
        cmocka_unit_test(test_waiting_calls_go_as_one_batch),
        cmocka_unit_test(test_other_limit_not_batched),
        cmocka_unit_test(test_sets_in_one_turn_go_together),
        cmocka_unit_test(test_flight_key_cap),
        cmocka_unit_test(test_deadline_leaves_flight),
        cmocka_unit_test(test_noscript_resends_flight),
        cmocka_unit_test(test_batch_cap),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_noscript_resends_batch_with_eval),
        cmocka_unit_test(test_waiting_batch_timed_from_its_send),
        cmocka_unit_test(test_slow_redis_within_timeout_decides),
        cmocka_unit_test(test_waiting_backlog_bounded),
        cmocka_unit_test(test_noscript_waiting_batch_keeps_send_deadline),
        cmocka_unit_test(test_waiting_stall_bounded),
        cmocka_unit_test(test_cancel_leaves_no_orphan),
        cmocka_unit_test(test_free_inside_done),
        cmocka_unit_test(test_free_answers_everything),
        cmocka_unit_test(test_policies_in_one_call),
        cmocka_unit_test(test_sets_batch_apart),
        cmocka_unit_test(test_dry_run_in_a_set),
        cmocka_unit_test(test_noscript_resend_keeps_deadline),
        cmocka_unit_test(test_policy_count),
        cmocka_unit_test(test_first_connect_waited_for),
        cmocka_unit_test(test_not_connected),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * ratelimit.c - GCRA and the lock-free per-process store (see ratelimit.h).
 *
 * Any thread. A slot is two words, a key and a TAT, each updated by
 * compare-and-swap, never both at once; so a slot changes owner in three
 * steps, with the TAT word as the place where takers meet:
 *   1. claim: CAS the TAT from the value that made the slot free (0, a TAT
 *      that has passed, or the victim's) to RL_CLAIM | key. It fails when a
 *      request was counted there meanwhile: a live state is never taken over
 *      by mistake, and nobody counts on a claimed slot.
 *   2. key = the new key (only a claimer writes a slot's key).
 *   3. CAS the TAT from the claim to the new key's first TAT (a fresh key's
 *      state after one request). Another request of the new key that finds
 *      the slot between 2 and 3 may do it for itself instead; the claimer
 *      then takes its request as usual.
 * A request of the old key that meets a claim leaves the slot (it is no
 * longer its); a request of the new key that meets its own key's claim
 * before step 2 waits for it: a few instructions spinning (RL_CLAIM_SPINS),
 * then, since past that the claimer was descheduled between two steps (more
 * taking threads than cores), yielding the CPU so that it runs, for up to
 * RL_CLAIM_WAIT_NS; only past that does the request go undecided, counted
 * as a fallback. (Undecided after the spins alone, eight threads on two
 * loaded cores let up to 30 requests over a limit of 10 about once in 2,000
 * rounds of the unit test under ASan.) A TAT is nanoseconds of
 * CLOCK_MONOTONIC, far below 2^63, so a claim is never mistaken for one.
 *
 * Before the claim step the key was swapped first and the TAT reset after:
 * a request counted between a taker's look and its swap was lost (one extra
 * request for the old key) and its live TAT became the new key's (a new
 * key refused on its first request); and a request of the new key counted
 * between the swap and the reset was wiped by it (one extra request).
 *
 * What is left: ABA on the TAT word, a taker that read TAT T and key K and
 * whose CAS finds T again although the slot changed owner in between; every
 * owner's first TAT is its claimer's now + period, so that needs the same
 * nanosecond twice. A refund (rl_local_take_all) moves a TAT back only from
 * the exact value its take stored: anything in between (another take,
 * which may have started from its own "now" and so absorbed this charge; a
 * takeover; a reclaim) makes it keep the charge, so a refused request can
 * cost a policy one request, never let one more through. Between a take and
 * its refund another request can be refused by the charge about to be given
 * back (never let through).
 */
#include "ratelimit/ratelimit.h"

#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#define RL_CLAIM (1ULL << 63)             /* a TAT word with this bit: a claim (step 1 above) */
#define RL_CLAIM_SPINS 4096               /* waits for a claimer between its steps 1 and 2, spinning */
#define RL_CLAIM_WAIT_NS (2 * 1000000ULL) /* then yielding to it, at most this long */

typedef struct rl_slot {
    _Atomic uint64_t key; /* 0: never used */
    _Atomic uint64_t tat; /* 0: never used; RL_CLAIM | key: being claimed for key */
} rl_slot;

struct rl_local {
    size_t mask;
    rl_slot *slots;
};

typedef enum slot_result {
    SLOT_DONE, /* decided here */
    SLOT_LOST, /* not (or no longer) this key's slot */
    SLOT_BUSY, /* this key's claim stuck between two steps: undecided */
} slot_result;

static uint64_t period_ns(int64_t limit, int64_t window_ms)
{
    uint64_t window = (uint64_t)window_ms * 1000000ULL;
    uint64_t p = limit > 0 ? window / (uint64_t)limit : window;
    return p ? p : 1;
}

uint64_t rl_gcra(uint64_t tat, uint64_t now, int64_t limit, int64_t window_ms, rl_decision *d)
{
    uint64_t period = period_ns(limit, window_ms);
    /* The bucket holds `limit` periods: with the period rounded down that is
     * at most the window, and never lets limit + 1 through in a burst. */
    uint64_t window = period * (uint64_t)(limit > 0 ? limit : 1);
    uint64_t base = tat > now ? tat : now;
    uint64_t next = base + period;
    d->limit = limit;
    d->no_room = false;
    d->other_refused = false;
    d->stored_tat = 0; /* set by the store that keeps it */
    if (next - now > window) {
        /* Refused: one more would be allowed once next - window has come. */
        d->allowed = false;
        d->retry_after_ms = (int64_t)((next - window - now + 999999) / 1000000);
        d->remaining = 0;
        d->reset_ms = (int64_t)((base - now + 999999) / 1000000);
        return tat;
    }
    d->allowed = true;
    d->retry_after_ms = 0;
    /* Room left in the window after this one, in whole periods. */
    d->remaining = (int64_t)((window - (next - now)) / period);
    d->reset_ms = (int64_t)((next - now + 999999) / 1000000);
    return next;
}

rl_local *rl_local_create(size_t slots)
{
    size_t n = 64;
    while (n < slots)
        n <<= 1;
    rl_local *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->slots = calloc(n, sizeof *t->slots);
    if (!t->slots) {
        free(t);
        return NULL;
    }
    t->mask = n - 1;
    return t;
}

void rl_local_free(rl_local *t)
{
    if (!t)
        return;
    free(t->slots);
    free(t);
}

static uint64_t claim_of(uint64_t key)
{
    return RL_CLAIM | key;
}

static uint64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* A claimer that outlasted the spins was descheduled: give it the CPU, until
 * *until (set on the first call). False once that has passed. */
static bool claim_yield(uint64_t *until)
{
    uint64_t now = monotonic_ns();
    if (!*until)
        *until = now + RL_CLAIM_WAIT_NS;
    else if (now >= *until)
        return false;
    sched_yield();
    return true;
}

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

static size_t home_of(const rl_local *t, uint64_t key)
{
    return (size_t)(key ^ (key >> 29)) & t->mask;
}

/* Apply GCRA to a slot that holds key, or is claimed for it, with
 * compare-and-swap. The TAT is read before the key: a key changes only under
 * a claim, so a CAS from the TAT read succeeds only if the slot was key's
 * all along. */
static slot_result take_in(rl_slot *s, uint64_t key, uint64_t now, int64_t limit, int64_t window_ms,
                           rl_decision *d)
{
    int spins = 0;
    uint64_t yield_until = 0;
    uint64_t tat = atomic_load_explicit(&s->tat, memory_order_acquire);
    for (;;) {
        uint64_t k = atomic_load_explicit(&s->key, memory_order_acquire);
        uint64_t state = tat;
        if (tat & RL_CLAIM) {
            if (tat != claim_of(key))
                return SLOT_LOST; /* another key is taking it over */
            if (k != key) {       /* claimed for key, its key not written yet */
                if (++spins <= RL_CLAIM_SPINS)
                    cpu_relax();
                else if (!claim_yield(&yield_until))
                    return SLOT_BUSY;
                tat = atomic_load_explicit(&s->tat, memory_order_acquire);
                continue;
            }
            state = 0; /* claimed for key: finish the claim with this request (step 3) */
        } else if (k != key) {
            return SLOT_LOST;
        }
        uint64_t next = rl_gcra(state, now, limit, window_ms, d);
        d->stored_tat = 0;
        if (!d->allowed)
            return SLOT_DONE; /* refused: nothing to store */
        if (atomic_compare_exchange_weak_explicit(&s->tat, &tat, next, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            d->stored_tat = next;
            return SLOT_DONE;
        }
    }
}

/* Give s, whose TAT was `seen` (not a claim, and free, passed or the
 * victim's), to key, and take the request there. SLOT_LOST when the TAT
 * changed since it was read: someone counted or claimed there first. */
static slot_result claim_and_take(rl_slot *s, uint64_t seen, uint64_t key, uint64_t now, int64_t limit,
                                  int64_t window_ms, rl_decision *d)
{
    if (!atomic_compare_exchange_strong_explicit(&s->tat, &seen, claim_of(key), memory_order_acq_rel,
                                                 memory_order_acquire))
        return SLOT_LOST;
    atomic_store_explicit(&s->key, key, memory_order_release);
    uint64_t claim = claim_of(key);
    uint64_t next = rl_gcra(0, now, limit, window_ms, d); /* a fresh key: always allowed */
    if (atomic_compare_exchange_strong_explicit(&s->tat, &claim, next, memory_order_acq_rel,
                                                memory_order_acquire)) {
        d->stored_tat = next;
        return SLOT_DONE;
    }
    /* Another request of key finished the claim with its own: count this one after it. */
    return take_in(s, key, now, limit, window_ms, d);
}

/* One request for key; the slot where it was decided, or NULL (undecided:
 * allowed, no_room, nothing taken). */
static rl_slot *local_take(rl_local *t, uint64_t key, uint64_t now, int64_t limit, int64_t window_ms,
                           rl_decision *d)
{
    size_t home = home_of(t, key);
    slot_result r = SLOT_LOST;
    /* Twice at most: a pass loses only when another thread changed the
     * neighbourhood meanwhile (then, most likely, this key is in it now). */
    for (int attempt = 0; attempt < 2; attempt++) {
        /* The key's own slot first. */
        for (size_t i = 0; i < RL_PROBE; i++) {
            rl_slot *s = &t->slots[(home + i) & t->mask];
            uint64_t k = atomic_load_explicit(&s->key, memory_order_acquire);
            if (k == key && (r = take_in(s, key, now, limit, window_ms, d)) == SLOT_DONE)
                return s;
            if (r == SLOT_BUSY)
                goto undecided;
        }
        /* A slot never used, or one whose key has stopped counting (its TAT
         * passed: a fresh key would start from the same state). The TAT is
         * read before the key: when it is the first TAT a claimer stored,
         * the key read after it is the claimer's. A slot lost to a race is
         * looked at once more: it may be this key's now. */
        for (size_t i = 0; i < RL_PROBE; i++) {
            rl_slot *s = &t->slots[(home + i) & t->mask];
            r = SLOT_LOST;
            for (int look = 0; look < 2 && r == SLOT_LOST; look++) {
                uint64_t tat = atomic_load_explicit(&s->tat, memory_order_acquire);
                uint64_t k = atomic_load_explicit(&s->key, memory_order_acquire);
                if (k == key || tat == claim_of(key))
                    r = take_in(s, key, now, limit, window_ms, d); /* this key's since pass one looked */
                else if (!(tat & RL_CLAIM) && tat <= now)
                    r = claim_and_take(s, tat, key, now, limit, window_ms, d);
                else
                    break; /* live, or being claimed for another key */
            }
            if (r == SLOT_DONE)
                return s;
            if (r == SLOT_BUSY)
                goto undecided;
        }
        /* Every slot around the key holds a key still counting (the table is
         * under pressure, perhaps from a client minting keys): take over the
         * one that will be done soonest, as nginx's limit_req zone drops its
         * oldest entries, so no one is waved through without a decision. */
        rl_slot *victim = NULL;
        uint64_t victim_tat = 0;
        for (size_t i = 0; i < RL_PROBE; i++) {
            rl_slot *s = &t->slots[(home + i) & t->mask];
            uint64_t tat = atomic_load_explicit(&s->tat, memory_order_acquire);
            if (tat & RL_CLAIM || atomic_load_explicit(&s->key, memory_order_acquire) == key)
                continue; /* being claimed; or this key's since: the next attempt finds it */
            if (!victim || tat < victim_tat) {
                victim = s;
                victim_tat = tat;
            }
        }
        if (victim && (r = claim_and_take(victim, victim_tat, key, now, limit, window_ms, d)) == SLOT_DONE) {
            d->no_room = true; /* decided, but counted: the table is short of room */
            return victim;
        }
        if (r == SLOT_BUSY)
            goto undecided;
    }
undecided:
    d->allowed = true;
    d->no_room = true;
    d->other_refused = false;
    d->limit = limit;
    d->remaining = limit - 1;
    d->reset_ms = 0;
    d->retry_after_ms = 0;
    return NULL;
}

void rl_local_take(rl_local *t, uint64_t key, uint64_t now, int64_t limit, int64_t window_ms, rl_decision *d)
{
    local_take(t, key, now, limit, window_ms, d);
}

/* One period back on s while it holds key and its TAT is still the one the
 * take stored (see rl_local_refund). */
static bool refund_in(rl_slot *s, uint64_t key, uint64_t stored_tat, uint64_t period)
{
    if (!stored_tat || stored_tat & RL_CLAIM || atomic_load_explicit(&s->key, memory_order_acquire) != key)
        return false; /* not stored, or taken over: its state, this request's included, went with it */
    uint64_t expected = stored_tat;
    uint64_t back = stored_tat > period ? stored_tat - period : 0;
    return atomic_compare_exchange_strong_explicit(&s->tat, &expected, back, memory_order_acq_rel,
                                                   memory_order_acquire);
}

bool rl_local_refund(rl_local *t, uint64_t key, uint64_t stored_tat, int64_t limit, int64_t window_ms)
{
    size_t home = home_of(t, key);
    for (size_t i = 0; i < RL_PROBE; i++) {
        rl_slot *s = &t->slots[(home + i) & t->mask];
        if (atomic_load_explicit(&s->key, memory_order_acquire) == key &&
            refund_in(s, key, stored_tat, period_ns(limit, window_ms)))
            return true;
    }
    return false;
}

static void local_peek(rl_local *t, uint64_t key, uint64_t now, int64_t limit, int64_t window_ms,
                       rl_decision *d)
{
    size_t home = home_of(t, key);
    uint64_t tat = 0;
    for (size_t i = 0; i < RL_PROBE; i++) {
        rl_slot *s = &t->slots[(home + i) & t->mask];
        if (atomic_load_explicit(&s->key, memory_order_acquire) == key) {
            uint64_t v = atomic_load_explicit(&s->tat, memory_order_acquire);
            if (!(v & RL_CLAIM))
                tat = v;
            break;
        }
    }
    rl_gcra(tat, now, limit, window_ms, d);
}

/* A policy that had room, for a request another one refused: its numbers
 * are those it would have given had the request gone. */
static void mark_other_refused(rl_decision *d)
{
    d->allowed = false;
    d->other_refused = true;
    d->retry_after_ms = 0;
}

bool rl_local_take_all(rl_local *t, const rl_local_policy *p, size_t n, uint64_t now, rl_decision *d)
{
    if (n > RL_POLICIES_MAX)
        abort(); /* the configuration allows no more */
    if (n == 1 && !p[0].dry_run) {
        /* Most routes: one enforced policy, nothing to order or give back. */
        local_take(t, p[0].key, now, p[0].limit, p[0].window_ms, &d[0]);
        return d[0].allowed;
    }
    size_t order[RL_POLICIES_MAX], enforced = 0;
    rl_slot *taken[RL_POLICIES_MAX] = {0};
    bool refused = false;
    for (size_t i = 0; i < n; i++)
        if (!p[i].dry_run)
            order[enforced++] = i;
    if (enforced > 1) {
        /* Look first, then take the policy with the least room first: a
         * request one of them refuses then mostly costs nothing at all, and
         * a charge given back (below) is rare. Ties in the route's order. */
        int64_t room[RL_POLICIES_MAX];
        for (size_t j = 0; j < enforced; j++) {
            size_t i = order[j];
            local_peek(t, p[i].key, now, p[i].limit, p[i].window_ms, &d[i]);
            room[i] = d[i].allowed ? d[i].remaining : -1;
            refused |= !d[i].allowed;
        }
        for (size_t j = 1; j < enforced; j++) {
            size_t x = order[j], m = j;
            for (; m > 0 && room[order[m - 1]] > room[x]; m--)
                order[m] = order[m - 1];
            order[m] = x;
        }
        if (refused) { /* one is out of room now: nothing to take */
            for (size_t j = 0; j < enforced; j++)
                if (d[order[j]].allowed)
                    mark_other_refused(&d[order[j]]);
        }
    }
    for (size_t j = 0; j < enforced && !refused; j++) {
        size_t i = order[j];
        taken[i] = local_take(t, p[i].key, now, p[i].limit, p[i].window_ms, &d[i]);
        if (d[i].allowed)
            continue;
        /* Refused: what the others took for this request goes back; the
         * ones not taken yet keep what the look said of them. */
        refused = true;
        for (size_t m = 0; m < enforced; m++) {
            size_t o = order[m];
            if (o == i || !d[o].allowed)
                continue;
            if (m < j && taken[o])
                refund_in(taken[o], p[o].key, d[o].stored_tat, period_ns(p[o].limit, p[o].window_ms));
            mark_other_refused(&d[o]);
        }
    }
    /* Dry-run policies: charged only for a request that goes on. */
    for (size_t i = 0; i < n; i++) {
        if (!p[i].dry_run)
            continue;
        if (!refused) {
            local_take(t, p[i].key, now, p[i].limit, p[i].window_ms, &d[i]);
            continue;
        }
        local_peek(t, p[i].key, now, p[i].limit, p[i].window_ms, &d[i]);
        if (d[i].allowed)
            mark_other_refused(&d[i]);
    }
    return !refused;
}

uint64_t rl_hash(uint64_t seed, const void *s, size_t len, uint64_t h)
{
    const unsigned char *p = s;
    h ^= seed;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    /* splitmix64's finaliser: every input bit reaches every output bit */
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebULL;
    h ^= h >> 31;
    return h ? h : 1;
}

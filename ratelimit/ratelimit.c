/*
 * ratelimit.c - GCRA and the lock-free per-process store (see ratelimit.h).
 */
#include "ratelimit/ratelimit.h"

#include <stdatomic.h>
#include <stdlib.h>

typedef struct rl_slot {
    _Atomic uint64_t key; /* 0: free */
    _Atomic uint64_t tat;
} rl_slot;

struct rl_local {
    size_t mask;
    rl_slot *slots;
};

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

/* Apply GCRA to a slot that holds key, with compare-and-swap. False when the
 * slot was taken over by another key meanwhile. */
static bool take_in(rl_slot *s, uint64_t key, uint64_t now, int64_t limit, int64_t window_ms, rl_decision *d)
{
    uint64_t tat = atomic_load_explicit(&s->tat, memory_order_acquire);
    for (;;) {
        if (atomic_load_explicit(&s->key, memory_order_acquire) != key)
            return false;
        uint64_t next = rl_gcra(tat, now, limit, window_ms, d);
        if (next == tat)
            return true; /* refused: nothing to store */
        if (atomic_compare_exchange_weak_explicit(&s->tat, &tat, next, memory_order_acq_rel,
                                                  memory_order_acquire))
            return true;
    }
}

void rl_local_take(rl_local *t, uint64_t key, uint64_t now, int64_t limit, int64_t window_ms, rl_decision *d)
{
    size_t home = (size_t)(key ^ (key >> 29)) & t->mask;
    /* The key's own slot first. */
    for (size_t i = 0; i < RL_PROBE; i++) {
        rl_slot *s = &t->slots[(home + i) & t->mask];
        uint64_t k = atomic_load_explicit(&s->key, memory_order_acquire);
        if (k == key && take_in(s, key, now, limit, window_ms, d))
            return;
    }
    /* A free slot, or one whose key has stopped counting (its TAT passed: a
     * fresh key would start from the same state). */
    for (size_t i = 0; i < RL_PROBE; i++) {
        rl_slot *s = &t->slots[(home + i) & t->mask];
        uint64_t k = atomic_load_explicit(&s->key, memory_order_acquire);
        uint64_t tat = atomic_load_explicit(&s->tat, memory_order_acquire);
        if (k == key) { /* claimed for this key since the first pass looked */
            if (take_in(s, key, now, limit, window_ms, d))
                return;
            continue;
        }
        if (k != 0 && tat > now)
            continue;
        if (!atomic_compare_exchange_strong_explicit(&s->key, &k, key, memory_order_acq_rel,
                                                     memory_order_acquire)) {
            /* Another thread claimed it first, perhaps for this same key: then
             * count here rather than claim a second slot for it. */
            if (k == key && take_in(s, key, now, limit, window_ms, d))
                return;
            continue;
        }
        /* No reset of the TAT: a free slot's is 0 and an expired one's is in
         * the past, and GCRA treats both as a fresh key; a reset could wipe a
         * request another thread has just counted here. */
        if (take_in(s, key, now, limit, window_ms, d))
            return;
    }
    /* Every slot around the key holds a key still counting (the table is
     * under pressure, perhaps from a client minting keys): take over the one
     * that will be done soonest, as nginx's limit_req zone drops its oldest
     * entries, so no one is waved through without a decision. */
    rl_slot *victim = NULL;
    uint64_t victim_tat = UINT64_MAX, victim_key = 0;
    for (size_t i = 0; i < RL_PROBE; i++) {
        rl_slot *s = &t->slots[(home + i) & t->mask];
        uint64_t tat = atomic_load_explicit(&s->tat, memory_order_acquire);
        if (tat < victim_tat) {
            victim = s;
            victim_tat = tat;
            victim_key = atomic_load_explicit(&s->key, memory_order_acquire);
        }
    }
    if (victim && victim_key != key &&
        atomic_compare_exchange_strong_explicit(&victim->key, &victim_key, key, memory_order_acq_rel,
                                                memory_order_acquire)) {
        atomic_store_explicit(&victim->tat, 0, memory_order_release); /* the old key's state is not ours */
        if (take_in(victim, key, now, limit, window_ms, d)) {
            d->no_room = true; /* decided, but counted: the table is short of room */
            return;
        }
    }
    d->allowed = true;
    d->no_room = true;
    d->limit = limit;
    d->remaining = limit - 1;
    d->reset_ms = 0;
    d->retry_after_ms = 0;
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

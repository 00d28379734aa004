/*
 * ratelimit.h - rate limiting by GCRA (the generic cell rate algorithm), and
 * the per-process store of its state.
 *
 * GCRA keeps one number per key: the theoretical arrival time (TAT) of the
 * next request. A policy of `limit` requests per `window` spaces requests
 * by period = window / limit and tolerates a burst of `limit`: a request at
 * `now` is allowed when max(TAT, now) + period - now <= window, and then TAT
 * becomes max(TAT, now) + period. It is a leaky bucket of `limit` that drains
 * at limit per window: a full burst of `limit`, then one request per period.
 * Unlike a fixed window there is no edge where two bursts pass in a moment
 * (10 at 0.99 s and 10 more at 1.01 s); over any span T the count is at most
 * limit + T / period, so a window that starts with a full burst may see up to
 * 2 * limit - 1.
 *
 * The local store (rl_local) is one table for the whole process, shared by
 * all workers without a lock: each slot is a key hash and a TAT, updated by
 * compare-and-swap. A key lives in one of RL_PROBE slots from its home; when
 * they are all held by other keys still counting, the slot whose key is done
 * soonest is taken over (as nginx's limit_req zone drops its oldest entries;
 * counted as a fallback), so the table's memory is bounded whatever the number
 * of keys and no request goes undecided.
 *
 * A route's policies are all or nothing (as nginx's limit_req zones): a
 * request one enforced policy refuses costs none of the others anything.
 * Slots cannot be updated together, so rl_local_take_all() takes them one by
 * one and, when one refuses, gives back (rl_local_refund) what the others
 * took for this request.
 */
#ifndef GATEWAY_RATELIMIT_H
#define GATEWAY_RATELIMIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define RL_PROBE 16       /* slots tried from a key's home */
#define RL_POLICIES_MAX 8 /* policies of one request (config: CONFIG_ROUTE_POLICIES_MAX) */

typedef struct rl_decision {
    bool allowed;
    bool no_room; /* local store full around this key: taken over, or not decided */
    /* Not allowed, but not this policy's doing: it had room and another
     * policy of the request refused it, so it was not charged. Neither
     * allowed nor limited (not counted, its numbers not shown). */
    bool other_refused;
    int64_t limit;
    int64_t remaining;      /* requests still allowed now (after this one, when allowed) */
    int64_t reset_ms;       /* until the full limit is available again */
    int64_t retry_after_ms; /* when refused: until one request is allowed */
    uint64_t stored_tat;    /* local store, allowed: the TAT this take stored (0: none), a refund's proof */
} rl_decision;

/* One GCRA step, pure: the stored TAT (0: none), the time now, the policy.
 * Fills d and returns the TAT to store (unchanged when refused). Times in ns. */
uint64_t rl_gcra(uint64_t tat, uint64_t now, int64_t limit, int64_t window_ms, rl_decision *d);

typedef struct rl_local rl_local;

/* A table of `slots` entries (rounded up to a power of two). NULL when out of memory. */
rl_local *rl_local_create(size_t slots);
void rl_local_free(rl_local *t);

/* Take one request for key (a hash of policy and key parts; never 0) at now
 * (CLOCK_MONOTONIC ns). Any thread. */
void rl_local_take(rl_local *t, uint64_t key, uint64_t now, int64_t limit, int64_t window_ms, rl_decision *d);

/* Give back the request whose take stored stored_tat (its d->stored_tat) for
 * key (same limit and window), as if it had not come: the TAT moves back one
 * period, by compare-and-swap, only while the slot still holds key AND its
 * TAT is still stored_tat. A take in between may have started from "now"
 * rather than from this TAT (the charge had drained into it), and then one
 * period back would erase that take instead; so once anything moved the TAT
 * the charge stays (fewer requests, never more). False when nothing was
 * given back. Any thread. */
bool rl_local_refund(rl_local *t, uint64_t key, uint64_t stored_tat, int64_t limit, int64_t window_ms);

/* One policy of a request. */
typedef struct rl_local_policy {
    uint64_t key; /* as for rl_local_take */
    int64_t limit, window_ms;
    bool dry_run; /* counted, never refuses */
} rl_local_policy;

/* One request against all of its policies (at most RL_POLICIES_MAX), all or
 * nothing: the enforced ones are taken in order; when one refuses, those
 * already taken are refunded and the rest only looked at (refused too when
 * out of room, else other_refused). Dry-run policies are charged only when
 * the request is allowed; they never refuse it but say when they would have
 * (allowed false). Fills d[0..n); returns whether the request may go on. */
bool rl_local_take_all(rl_local *t, const rl_local_policy *p, size_t n, uint64_t now, rl_decision *d);

/* A seeded 64-bit hash of s[0..len), never 0: keys come from clients, so the
 * seed (random per process) keeps them from aiming at each other's slots. */
uint64_t rl_hash(uint64_t seed, const void *s, size_t len, uint64_t h);

#endif

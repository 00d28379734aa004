/*
 * rlredis.h - the rate limiter's Redis store: GCRA as one Lua script, run
 * with EVALSHA (loaded with EVAL when Redis answers NOSCRIPT), so a decision
 * is atomic and exact across every gateway instance sharing the Redis. The
 * script reads Redis's own clock (TIME), so instances need not agree on time.
 *
 * One call decides one request against all of its route's policies, all or
 * nothing, in one script run: a request one enforced policy refuses costs
 * none of the others anything (dry-run policies are charged only for a
 * request that goes on, and never refuse).
 *
 * Batched per set of keys: while a script call for a set (the same keys with
 * the same limits, windows and dry-run flags) is in flight on a worker, that
 * worker's further calls for it wait, and when the reply comes back they go
 * together as one batch taking up to n requests atomically; each call still
 * gets its own decisions, the ones it would have had as one of n calls made
 * one after the other. So a hot key costs one round trip per batch instead
 * of one per request, and the count stays exact across instances (the
 * script is atomic).
 *
 * And batched across sets: the batches a worker has ready in one turn of its
 * event loop (the requests of many clients on many keys, read together) go
 * at the end of that turn as ONE script call, which decides them one set
 * after the other. So many keys cost one round trip and one script run per
 * turn instead of one per request, and no call waits for a later turn.
 *
 * One client per worker, on the worker's event_base, never touched by another
 * thread. It owns one gw_redis (redis/redis.h): redis.connections_per_worker
 * connections, our own deadline (redis.timeout) on the connect and on every
 * command, and reconnects with capped backoff.
 */
#ifndef GATEWAY_RLREDIS_H
#define GATEWAY_RLREDIS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/event.h>

#include "config/config.h"
#include "ratelimit/ratelimit.h"

typedef struct rl_redis rl_redis;
typedef struct rl_redis_call rl_redis_call;

/* Diagnostic lines (connected, lost, errors); any level of config_log_level. */
typedef void (*rl_redis_log_fn)(config_log_level level, const char *message);

rl_redis *rl_redis_create(struct event_base *base, rl_redis_log_fn log);
/* Apply redis: (url, password, timeout, connections_per_worker); reconnects
 * when the address, database or password changed. A config without redis:
 * (enabled false) disconnects. */
void rl_redis_configure(rl_redis *r, const config_redis *cfg);
/* Disconnect; pending calls are answered as errors first (cancelled ones are
 * not). NULL is fine. Safe from inside a done callback. */
void rl_redis_free(rl_redis *r);

/* Connected and usable now? */
bool rl_redis_up(const rl_redis *r);

/* One policy of a call. */
typedef struct rl_redis_policy {
    const void *key; /* key material (any bytes; hashed into the Redis key name), borrowed for the call */
    size_t key_len;
    int64_t limit, window_ms; /* limit <= window in microseconds (config refuses more) */
    bool dry_run;
} rl_redis_policy;

/* ok false: Redis did not decide (error, timeout, connection lost); d is
 * then undefined. Else d[i] is policy i's decision (see rl_decision: a
 * policy with room for a request another refused says other_refused).
 * d is borrowed for the callback. Called once per call, never from inside
 * rl_redis_take. */
typedef void (*rl_redis_done_fn)(void *arg, bool ok, const rl_decision *d);

/* One request against n policies (1..RL_POLICIES_MAX), all or nothing. NULL
 * when not connected or out of memory (or n out of range): the caller
 * decides without Redis at once. Its batch goes at the end of this turn of
 * the loop, and is answered within redis.timeout of that (NOSCRIPT's resend
 * included); or, when its set has a call in flight, it goes once that call
 * is answered or failed and is answered within 2 x redis.timeout of this
 * call (redis.timeout while waiting for the first connect). Answered as
 * failed when its batch could not be sent or its deadline passed. */
rl_redis_call *rl_redis_take(rl_redis *r, const rl_redis_policy *p, size_t n, rl_redis_done_fn done,
                             void *arg);

/* The caller is gone: done will not be called. NULL is fine. A call whose
 * batch is already in flight may still have taken its request, as a request
 * whose client went away after its decision. */
void rl_redis_cancel(rl_redis_call *call);

/* A batch's arithmetic for one policy, pure (exposed for tests). The script
 * was asked for n requests at Redis's `now` and answered `allowed` (k: the
 * first k requests go on, none after) and, for this policy, wait_us =
 * max(TAT, now) - now and key_allowed (k_i: how many of the n it had room
 * for, at most n; k <= k_i when it is enforced), for limit requests per
 * limit * period_us; it charged min(k, k_i). Fills d (limit included) for
 * the i-th request (from 0) as the i-th of n calls in sequence at that
 * instant would have been decided: with c = min(i, k, k_i) requests taken
 * before it, allowed when i < k and c < k_i; refused (for a dry-run policy:
 * would have been) when c == k_i; else other_refused. */
void rl_redis_batch_decision(int64_t allowed, int64_t key_allowed, int64_t wait_us, int64_t period_us,
                             int64_t limit, int64_t i, rl_decision *d);

#endif

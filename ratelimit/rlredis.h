/*
 * rlredis.h - the rate limiter's Redis store: GCRA as one Lua script, run
 * with EVALSHA (loaded with EVAL when Redis answers NOSCRIPT), so a decision
 * is atomic and exact across every gateway instance sharing the Redis. The
 * script reads Redis's own clock (TIME), so instances need not agree on time.
 *
 * Batched per key: while a script call for a key is in flight on a worker,
 * that worker's further calls for the key (same limit and window) wait, and
 * when the reply comes back they go together as one script call taking up to
 * n requests atomically; each call still gets its own decision, the one it
 * would have had as one of n calls made one after the other. So a hot key
 * costs one round trip per batch instead of one per request, and the count
 * stays exact across instances (the script is atomic).
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

/* ok false: Redis did not decide (error, timeout, connection lost); d is
 * then undefined. Called once per call, never from inside rl_redis_take. */
typedef void (*rl_redis_done_fn)(void *arg, bool ok, const rl_decision *d);

/* One request against key (any bytes; hashed into the Redis key name) for
 * limit per window_ms. NULL when not connected or out of memory: the caller
 * decides without Redis at once. Answered within redis.timeout of this call,
 * whether it went at once or waited for the key's call in flight (a resend
 * with EVAL after NOSCRIPT has a deadline of its own, as any command). */
rl_redis_call *rl_redis_take(rl_redis *r, const void *key, size_t key_len, int64_t limit, int64_t window_ms,
                             rl_redis_done_fn done, void *arg);

/* The caller is gone: done will not be called. NULL is fine. A call whose
 * batch is already in flight may still have taken its request from the key,
 * as a request whose client went away after its decision. */
void rl_redis_cancel(rl_redis_call *call);

/* A batch's arithmetic, pure (exposed for tests). The script was asked for n
 * requests at Redis's `now` and answered `allowed` (k: the first k were taken)
 * and wait_us = max(TAT, now) - now, for limit requests per limit * period_us.
 * Fills d (limit included) for the i-th request (from 0) as the i-th of n
 * separate calls in sequence at that instant would have been decided:
 * allowed with TAT base + (i+1) * period when i < k, else refused against
 * the TAT base + k * period the allowed ones left. */
void rl_redis_batch_decision(int64_t allowed, int64_t wait_us, int64_t period_us, int64_t limit, int64_t i,
                             rl_decision *d);

#endif

/*
 * rlredis.h - the rate limiter's Redis store: GCRA as one Lua script, run
 * with EVALSHA (loaded with EVAL when Redis answers NOSCRIPT), so a decision
 * is atomic and exact across every gateway instance sharing the Redis. The
 * script reads Redis's own clock (TIME), so instances need not agree on time.
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
 * decides without Redis at once. */
rl_redis_call *rl_redis_take(rl_redis *r, const void *key, size_t key_len, int64_t limit, int64_t window_ms,
                             rl_redis_done_fn done, void *arg);

/* The caller is gone: done will not be called. NULL is fine. */
void rl_redis_cancel(rl_redis_call *call);

#endif

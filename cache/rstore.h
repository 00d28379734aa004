/*
 * rstore.h - the response cache's Redis side: one per thread, on that
 * thread's event loop, over its own gw_redis client (redis/redis.h).
 *
 * Entries are stored whole (cache/entry.h's serialized form) under their key
 * with SET ... PX keep_ms, so Redis drops them when no longer usable even as
 * stale. Invalidation by pattern is SCAN ... MATCH (COUNT 1000) and UNLINK of
 * each batch, never KEYS; a pattern without glob characters is one UNLINK.
 * Every invalidation is then PUBLISHed on "<key_prefix>invalidate" so that
 * every gateway instance's hot tier hears it (the subscriber is in
 * cache/rstore.c too, see cache_rsub_create). A cluster-wide fill lock is
 * SET "<key>:lock" <token> NX PX, released by a script that deletes it only
 * while it holds the same token.
 *
 * Every operation answers through its callback exactly once unless
 * cancelled, never from inside the call that started it; NULL from a start
 * means Redis is not usable now and the caller goes on without it.
 */
#ifndef GATEWAY_CACHE_RSTORE_H
#define GATEWAY_CACHE_RSTORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/event.h>

#include "cache/entry.h"
#include "config/config.h"
#include "redis/redis.h"

typedef struct cache_rstore cache_rstore;
typedef struct cache_rstore_op cache_rstore_op;

cache_rstore *cache_rstore_create(struct event_base *base, gw_redis_log_fn log);
/* The redis: section and the cache's key_prefix. */
void cache_rstore_configure(cache_rstore *s, const config_t *cfg);
void cache_rstore_free(cache_rstore *s);
bool cache_rstore_up(const cache_rstore *s);

typedef enum { CACHE_R_FOUND, CACHE_R_NOT_FOUND, CACHE_R_ERROR } cache_r_status;

/* e: with CACHE_R_FOUND, a new entry the callee now owns (unref it). A value
 * that is not an entry counts as not found. */
typedef void (*cache_rstore_get_fn)(void *arg, cache_r_status status, cache_entry *e);
cache_rstore_op *cache_rstore_get(cache_rstore *s, const char *key, size_t key_len, cache_rstore_get_fn fn,
                                  void *arg);

/* Store e under key for e->keep_ms (fire and forget: a failure only counts
 * in *errors, which the caller's metrics read). false when not sent. */
bool cache_rstore_put(cache_rstore *s, const char *key, size_t key_len, const cache_entry *e);

/* ok false: Redis failed part way (deleted counts what went before). */
typedef void (*cache_rstore_count_fn)(void *arg, bool ok, size_t deleted);
/* Delete the keys matching the glob pattern, then publish it. */
cache_rstore_op *cache_rstore_invalidate(cache_rstore *s, const char *pattern, size_t pattern_len,
                                         cache_rstore_count_fn fn, void *arg);

/* acquired: this caller holds "<key>:lock" for ttl_ms (or Redis failed: ok
 * false). */
typedef void (*cache_rstore_lock_fn)(void *arg, bool ok, bool acquired);
cache_rstore_op *cache_rstore_lock(cache_rstore *s, const char *key, size_t key_len, const char *token,
                                   int64_t ttl_ms, cache_rstore_lock_fn fn, void *arg);
/* For a request waiting on another instance's fetch: the entry and whether
 * "<key>:lock" is still held, in one round trip (MGET). locked false and
 * CACHE_R_NOT_FOUND: the holder let go without storing (its answer could not
 * be stored, or it failed): go on alone. */
typedef void (*cache_rstore_poll_fn)(void *arg, cache_r_status status, cache_entry *e, bool locked);
cache_rstore_op *cache_rstore_poll(cache_rstore *s, const char *key, size_t key_len, cache_rstore_poll_fn fn,
                                   void *arg);

/* Release a lock taken with cache_rstore_lock with the same token (fire and
 * forget): deleted only while it still holds that token (a compare-and-delete
 * script), so a holder slower than its lock's ttl never releases the lock
 * another instance took after it. */
void cache_rstore_unlock(cache_rstore *s, const char *key, size_t key_len, const char *token);

/* INFO memory's used_memory (bytes), or ok false. */
typedef void (*cache_rstore_info_fn)(void *arg, bool ok, int64_t used_memory);
cache_rstore_op *cache_rstore_info(cache_rstore *s, cache_rstore_info_fn fn, void *arg);

/* The caller is gone: its callback will not be called. NULL is fine. */
void cache_rstore_cancel(cache_rstore_op *op);

/* Commands that failed (timeouts, errors) since the start, for
 * gateway_cache_store_errors_total; only this thread writes it. */
uint64_t cache_rstore_errors(const cache_rstore *s);

/* ---- invalidations from other instances ---------------------------------------- */

/* pattern: a published invalidation (ours too); NULL: the subscription was
 * (re)made, so messages may have been missed while it was down. */
typedef void (*cache_rstore_heard_fn)(void *arg, const char *pattern, size_t len);
typedef struct cache_rsub cache_rsub;
cache_rsub *cache_rsub_create(struct event_base *base, gw_redis_log_fn log, cache_rstore_heard_fn fn,
                              void *arg);
void cache_rsub_configure(cache_rsub *sub, const config_t *cfg);
void cache_rsub_free(cache_rsub *sub);

#endif

/*
 * memstore.h - the in-process store: entries by key, least recently used
 * first out when over max_bytes, each dropped once past its keep time. It is
 * the store when no redis: is configured and the hot tier in front of Redis
 * otherwise.
 *
 * One store per process, shared by every worker and the main thread:
 * CACHE_MEM_SHARDS shards by key hash, each a hash table plus an LRU list
 * under its own mutex, held only for the table and list operations (no I/O,
 * no allocation of entries, no freeing of entries under a lock). The bytes
 * held are one atomic count for the whole store, so max_bytes is a process
 * limit.
 *
 * Invalidation epochs: every delete by pattern (and every clear) takes the
 * next epoch and is remembered in a short ring. A miss notes the epoch when
 * it went to the backend; cache_mem_invalidated_since() then says whether an
 * invalidation that could match its key happened meanwhile, so an answer
 * fetched before a write is not stored after that write's invalidation.
 */
#ifndef GATEWAY_CACHE_MEMSTORE_H
#define GATEWAY_CACHE_MEMSTORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cache/entry.h"

#define CACHE_MEM_SHARDS 16
/* Invalidations remembered for cache_mem_invalidated_since: a fetch that takes
 * longer than this many invalidations (of any key) is not stored. */
#define CACHE_MEM_RING 1024

typedef struct cache_mem cache_mem;

/* max_bytes 0: nothing is ever stored. NULL when out of memory. */
cache_mem *cache_mem_new(size_t max_bytes);
void cache_mem_free(cache_mem *m);
/* A reload changed memory_max_bytes: evicts down to the new limit. */
void cache_mem_set_limit(cache_mem *m, size_t max_bytes);

/* The entry for key with a new reference (caller unrefs), or NULL. An entry
 * past stored_ms + keep_ms at now_ms is dropped and not returned. */
cache_entry *cache_mem_get(cache_mem *m, const char *key, size_t key_len, int64_t now_ms);

/* Store e under key (the store takes its own reference; an older entry under
 * the key is replaced). An entry larger than max_bytes is not stored. Evicts
 * least recently used entries until the whole store fits. */
void cache_mem_put(cache_mem *m, const char *key, size_t key_len, cache_entry *e);

/* cache_mem_put, unless an invalidation matching key came after epoch
 * (checked under the shard's lock, so none slips between the check and the
 * insert); false when not stored for that reason (or any other). */
bool cache_mem_put_since(cache_mem *m, const char *key, size_t key_len, cache_entry *e, uint64_t epoch);

/* Delete key; true when it was there. */
bool cache_mem_delete(cache_mem *m, const char *key, size_t key_len);

/* Delete every key matching the glob pattern (cache_glob_match); how many. */
size_t cache_mem_delete_matching(cache_mem *m, const char *pattern, size_t pattern_len);

/* The current invalidation epoch (to pass to cache_mem_invalidated_since). */
uint64_t cache_mem_epoch(const cache_mem *m);

/* Did a delete by pattern matching key, or one the ring no longer remembers,
 * happen after epoch? */
bool cache_mem_invalidated_since(cache_mem *m, uint64_t epoch, const char *key, size_t key_len);

/* Invalidations the shared store (Redis) has not done yet: while pattern is
 * pending, an entry found there whose key matches and that was stored at or
 * before since_ms is not to be served (cache_mem_pending_blocks), so a write's
 * invalidation that Redis missed cannot bring the old answer back before it is
 * done again. One entry per pattern, with the latest since_ms added;
 * cache_mem_pending_done(pattern, started_ms) says a deletion of pattern that
 * began at started_ms succeeded: the entry goes unless a write added it after
 * that deletion began. Lock-free when nothing is pending. */
bool cache_mem_pending_add(cache_mem *m, const char *pattern, size_t len, int64_t since_ms);
void cache_mem_pending_done(cache_mem *m, const char *pattern, size_t len, int64_t started_ms);
bool cache_mem_pending_blocks(cache_mem *m, const char *key, size_t key_len, int64_t stored_ms);

/* Entries and bytes held now. */
size_t cache_mem_count(const cache_mem *m);
size_t cache_mem_bytes(const cache_mem *m);

/* What e held under a key of key_len bytes is charged against max_bytes:
 * cache_entry_size() plus the node and its copy of the key. */
size_t cache_mem_charge(const cache_entry *e, size_t key_len);

/* The shard (0..CACHE_MEM_SHARDS-1) that holds key. Least recently used is
 * per shard: a put evicts from its own shard first. For tests. */
size_t cache_mem_shard_of(const char *key, size_t key_len);

#endif

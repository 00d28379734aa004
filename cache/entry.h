/*
 * entry.h - one cached answer: status, the end-to-end header fields worth
 * keeping, the identity body and each compressed variant produced, the time
 * it was stored and how long it is fresh and kept. The same bytes are the
 * value in Redis and the block held by the in-process store.
 *
 * An entry is one allocation, reference-counted with atomics (the in-process
 * store is shared by the workers; a body handed to evhttp by reference holds
 * a reference until evhttp lets go of it). Immutable once made.
 *
 * Serialized form (little-endian): "GWC1", u16 status, u16 flags,
 * i64 stored_ms, i64 fresh_ms, i64 keep_ms, u32 fields_len, u32 body length
 * for each of CACHE_VARIANTS, then the fields and the bodies in that order.
 * Anything else (wrong magic, lengths that do not add up) does not parse.
 */
#ifndef GATEWAY_CACHE_ENTRY_H
#define GATEWAY_CACHE_ENTRY_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum cache_variant {
    CACHE_IDENTITY = 0,
    CACHE_GZIP = 1,
    CACHE_BR = 2,
    CACHE_VARIANTS = 3
} cache_variant;

/* flags */
#define CACHE_ENTRY_VARY_AE 1u /* the answer qualified for compression: add Vary: Accept-Encoding */

typedef struct cache_entry {
    atomic_uint refs;
    int status;
    unsigned flags;
    int64_t stored_ms;  /* wall clock (ms since the epoch) when stored */
    int64_t fresh_ms;   /* fresh while now < stored_ms + fresh_ms */
    int64_t keep_ms;    /* usable as stale while now < stored_ms + keep_ms (>= fresh_ms) */
    const char *fields; /* "Name: value\r\n" lines, identity form; points into blob */
    size_t fields_len;
    const char *body[CACHE_VARIANTS]; /* NULL: variant not produced; the identity body is never NULL */
    size_t body_len[CACHE_VARIANTS];
    const char *blob; /* the serialized form (what Redis holds) */
    size_t blob_len;
} cache_entry;

/* Make an entry (refs 1) from its parts: fields as "Name: value\r\n" lines;
 * body[v] with body_len[v] bytes, NULL for a variant not produced
 * (body[CACHE_IDENTITY] may be NULL only when its length is 0; a compressed
 * variant of 0 bytes counts as not produced). NULL when out of memory or when
 * the parts would not parse back: status outside 100..599, unknown flags,
 * fresh_ms < 0, keep_ms < fresh_ms, a length over UINT32_MAX, or fields not
 * "token: value\r\n" lines (no CR, LF or NUL in a value). */
cache_entry *cache_entry_make(int status, unsigned flags, int64_t stored_ms, int64_t fresh_ms,
                              int64_t keep_ms, const char *fields, size_t fields_len,
                              const void *const body[CACHE_VARIANTS], const size_t body_len[CACHE_VARIANTS]);

/* An entry (refs 1) from its serialized form (copied), or NULL when the bytes
 * are not one (the checks of cache_entry_make, magic, lengths adding up to
 * len exactly) or out of memory. */
cache_entry *cache_entry_parse(const void *blob, size_t len);

void cache_entry_ref(cache_entry *e);
/* Drop a reference; the last one frees. NULL is fine. */
void cache_entry_unref(cache_entry *e);

/* Memory an entry is charged for in the in-process store. */
size_t cache_entry_size(const cache_entry *e);

#endif

/*
 * metrics_internal.h - the structures shared by the files of metrics/ and nothing
 * else may include.
 *
 * Ownership, in one place: the registry owns its families, collectors and shards;
 * a shard owns its series and its lookup index. Three kinds of field live here and
 * each says which it is:
 *   - start-up:  written before any shard records (families, collectors), read-only
 *                afterwards, so any thread may read them without synchronisation;
 *   - published: written once by one thread, then made visible with a release store
 *                of the pointer that leads to it; readers reach it by an acquire load
 *                and never see it change afterwards (series labels, list links);
 *   - owner:     touched only by the shard's owner thread (the lookup index), or, for
 *                the recorded values, written only by it with relaxed atomics and read
 *                by anyone with relaxed atomic loads.
 */
#ifndef GATEWAY_METRICS_INTERNAL_H
#define GATEWAY_METRICS_INTERNAL_H

#include "metrics/metrics.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Series and shards are allocated on their own cache lines so that two worker
 * threads recording into neighbouring allocations never share a line. */
#define METRICS_CACHE_LINE_BYTES 64

/* Room for the text of one double: sign, 17 significant digits, point, exponent. */
#define METRICS_NUMBER_BYTES 32

struct metrics_family {
    char *name;                            /* start-up, owned */
    char *help;                            /* start-up, owned, never NULL */
    metrics_type type;                     /* start-up */
    metrics_merge merge;                   /* start-up; gauges only */
    size_t label_count;                    /* start-up */
    char *label_names[METRICS_MAX_LABELS]; /* start-up, owned */
    double *buckets;                       /* start-up, owned; histograms only */
    size_t bucket_count;                   /* finite upper bounds; +Inf is implicit */
};

struct metrics_series {
    metrics_family_t *family;                     /* published, borrowed from the registry */
    metrics_series_t *next;                       /* published: the shard's list, newest first */
    metrics_series_t *index_next;                 /* owner: hash chain of the shard's index */
    uint64_t hash;                                /* owner */
    const char *label_values[METRICS_MAX_LABELS]; /* published; point into this allocation */
    /* Counter: the count. Gauge: the bits of a double. Histogram: the bits of the sum. */
    _Atomic uint64_t value;
    /* Histogram only: bucket_count + 1 non-cumulative counts, the last one for +Inf.
     * The observation count is their total, so _count always equals the +Inf bucket. */
    _Atomic uint64_t bucket_counts[];
};

struct metrics_shard {
    metrics_shard_t *next;              /* published: the registry's list */
    _Atomic(metrics_series_t *) series; /* head of the published series list */
    metrics_series_t **index;           /* owner: hash index of the series */
    size_t index_size;                  /* owner: slots, a power of two */
    size_t series_count;                /* owner */
};

typedef struct {
    metrics_collector_fn fn;
    void *arg;
} metrics_collector;

struct metrics_registry {
    double *buckets; /* start-up, owned: the default buckets */
    size_t bucket_count;
    metrics_family_t **families; /* start-up, owned, kept sorted by name */
    size_t family_count;
    metrics_collector *collectors; /* start-up, owned, in registration order */
    size_t collector_count;
    pthread_mutex_t shard_lock;        /* serialises shard creations only */
    _Atomic(metrics_shard_t *) shards; /* head of the published shard list */
};

/* Doubles travel through _Atomic uint64_t as their bit pattern. */
static inline uint64_t metrics_double_to_bits(double v)
{
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    return bits;
}

static inline double metrics_bits_to_double(uint64_t bits)
{
    double v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* Write v as Prometheus wants a sample value or an le label: the shortest text
 * that reads back as the same double ("1", "0.005", "1e+21"), or +Inf, -Inf, NaN.
 * buf must hold METRICS_NUMBER_BYTES. Returns buf. Assumes the "C" numeric locale. */
char *metrics_format_double(char *buf, double v);

#endif

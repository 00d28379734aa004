/*
 * registry.c - families, shards, series lookup and the recording operations.
 *
 * Threads: the registry, its families and collectors are built on the main thread
 * at start-up. Shards are created by any thread (under the registry's one mutex,
 * which the recording path never touches). Everything else here runs on a shard's
 * owner thread: metrics_series() and the metrics_*_add/set/observe calls.
 *
 * The one idea: a series has exactly one writer, its shard's owner, so recording is
 * a relaxed atomic load and a relaxed atomic store of the same word, never a locked
 * read-modify-write. The scraper sees each word either before or after a store.
 * New series and shards are pushed at the head of singly linked lists with a release
 * store, after every field has been written, and are never unlinked or freed before
 * the registry, so a reader that acquire-loads a head can walk the list at leisure.
 */
#include "metrics/metrics_internal.h"

#include <math.h>
#include <stdlib.h>

/* Slots in a new shard's series index; doubled whenever series outnumber slots. */
#define METRICS_INDEX_INITIAL_SLOTS 64

/* 64-bit FNV-1a. */
#define METRICS_HASH_OFFSET 14695981039346656037ULL
#define METRICS_HASH_PRIME 1099511628211ULL

static const char *const HISTOGRAM_SUFFIXES[] = {"_bucket", "_sum", "_count"};
#define HISTOGRAM_SUFFIX_COUNT (sizeof HISTOGRAM_SUFFIXES / sizeof HISTOGRAM_SUFFIXES[0])

static char *copy_string(const char *s)
{
    size_t len = strlen(s) + 1;
    char *copy = malloc(len);
    if (copy)
        memcpy(copy, s, len);
    return copy;
}

/* malloc on a cache line of its own, zeroed. Caller frees with free(). */
static void *alloc_cache_aligned(size_t size)
{
    size_t rounded =
        (size + METRICS_CACHE_LINE_BYTES - 1) / METRICS_CACHE_LINE_BYTES * METRICS_CACHE_LINE_BYTES;
    void *p = aligned_alloc(METRICS_CACHE_LINE_BYTES, rounded);
    if (p)
        memset(p, 0, rounded);
    return p;
}

/* Validate and copy histogram upper bounds: finite and strictly increasing, with a
 * trailing +Inf tolerated and dropped (it is always implicit). *out is NULL when no
 * finite bound remains. Returns 0, or -1 on bad bounds or allocation failure. */
static int copy_buckets(const double *in, size_t count, double **out, size_t *out_count)
{
    *out = NULL;
    *out_count = 0;
    if (count > 0 && !in)
        return -1;
    if (count > 0 && isinf(in[count - 1]) && in[count - 1] > 0)
        count--;
    for (size_t i = 0; i < count; i++) {
        if (!isfinite(in[i]) || (i > 0 && !(in[i] > in[i - 1])))
            return -1;
    }
    if (count == 0)
        return 0;
    *out = malloc(count * sizeof **out);
    if (!*out)
        return -1;
    memcpy(*out, in, count * sizeof **out);
    *out_count = count;
    return 0;
}

metrics_registry_t *metrics_registry_create(const double *buckets, size_t bucket_count)
{
    metrics_registry_t *reg = calloc(1, sizeof *reg);
    if (!reg)
        return NULL;
    if (copy_buckets(buckets, bucket_count, &reg->buckets, &reg->bucket_count) != 0)
        goto fail_registry;
    if (pthread_mutex_init(&reg->shard_lock, NULL) != 0)
        goto fail_buckets;
    atomic_init(&reg->shards, NULL);
    return reg;

fail_buckets:
    free(reg->buckets);
fail_registry:
    free(reg);
    return NULL;
}

static void family_free(metrics_family_t *family)
{
    if (!family)
        return;
    free(family->name);
    free(family->help);
    for (size_t i = 0; i < family->label_count; i++)
        free(family->label_names[i]);
    free(family->buckets);
    free(family);
}

static void shard_free(metrics_shard_t *shard)
{
    metrics_series_t *s = atomic_load_explicit(&shard->series, memory_order_acquire);
    while (s) {
        metrics_series_t *next = s->next;
        free(s);
        s = next;
    }
    free(shard->index);
    free(shard);
}

void metrics_registry_free(metrics_registry_t *reg)
{
    if (!reg)
        return;
    metrics_shard_t *shard = atomic_load_explicit(&reg->shards, memory_order_acquire);
    while (shard) {
        metrics_shard_t *next = shard->next;
        shard_free(shard);
        shard = next;
    }
    for (size_t i = 0; i < reg->family_count; i++)
        family_free(reg->families[i]);
    free(reg->families);
    free(reg->collectors);
    free(reg->buckets);
    pthread_mutex_destroy(&reg->shard_lock);
    free(reg);
}

/* [a-zA-Z_:][a-zA-Z0-9_:]* for metric names (colon allowed), without it for labels. */
static bool valid_name(const char *name, bool allow_colon)
{
    if (!name || !*name)
        return false;
    for (const char *p = name; *p; p++) {
        char c = *p;
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (allow_colon && c == ':') ||
                  (p != name && c >= '0' && c <= '9');
        if (!ok)
            return false;
    }
    return true;
}

/* Is full exactly base followed by suffix? */
static bool is_base_plus_suffix(const char *full, const char *base, const char *suffix)
{
    size_t base_len = strlen(base);
    return strncmp(full, base, base_len) == 0 && strcmp(full + base_len, suffix) == 0;
}

/* Would families a and b put lines with the same metric name in the exposition? A
 * histogram named h also owns h_bucket, h_sum and h_count. */
static bool names_clash(const char *a, bool a_histogram, const char *b, bool b_histogram)
{
    if (strcmp(a, b) == 0)
        return true;
    for (size_t i = 0; i < HISTOGRAM_SUFFIX_COUNT; i++) {
        if (a_histogram && is_base_plus_suffix(b, a, HISTOGRAM_SUFFIXES[i]))
            return true;
        if (b_histogram && is_base_plus_suffix(a, b, HISTOGRAM_SUFFIXES[i]))
            return true;
    }
    return false;
}

static bool valid_labels(metrics_type type, size_t label_count, const char *const *label_names)
{
    if (label_count > METRICS_MAX_LABELS || (label_count > 0 && !label_names))
        return false;
    for (size_t i = 0; i < label_count; i++) {
        const char *label = label_names[i];
        /* "__" is reserved for Prometheus; "le" is the histogram's own bucket label. */
        if (!valid_name(label, false) || strncmp(label, "__", 2) == 0)
            return false;
        if (type == METRICS_HISTOGRAM && strcmp(label, "le") == 0)
            return false;
        for (size_t j = 0; j < i; j++) {
            if (strcmp(label, label_names[j]) == 0)
                return false;
        }
    }
    return true;
}

metrics_family_t *metrics_family_register(metrics_registry_t *reg, const char *name, const char *help,
                                          metrics_type type, metrics_merge merge, size_t label_count,
                                          const char *const *label_names, const double *buckets,
                                          size_t bucket_count)
{
    if (!reg || !valid_name(name, true) || !valid_labels(type, label_count, label_names))
        return NULL;
    if (type != METRICS_COUNTER && type != METRICS_GAUGE && type != METRICS_HISTOGRAM)
        return NULL;
    if (merge != METRICS_MERGE_SUM && merge != METRICS_MERGE_MAX && merge != METRICS_MERGE_MIN)
        return NULL;
    for (size_t i = 0; i < reg->family_count; i++) {
        const metrics_family_t *other = reg->families[i];
        if (names_clash(name, type == METRICS_HISTOGRAM, other->name, other->type == METRICS_HISTOGRAM))
            return NULL;
    }

    metrics_family_t **families = realloc(reg->families, (reg->family_count + 1) * sizeof *families);
    if (!families)
        return NULL;
    reg->families = families;

    metrics_family_t *family = calloc(1, sizeof *family);
    if (!family)
        return NULL;
    family->type = type;
    family->merge = type == METRICS_GAUGE ? merge : METRICS_MERGE_SUM;
    family->name = copy_string(name);
    family->help = copy_string(help ? help : "");
    if (!family->name || !family->help)
        goto fail;
    for (size_t i = 0; i < label_count; i++) {
        family->label_names[i] = copy_string(label_names[i]);
        if (!family->label_names[i])
            goto fail;
        family->label_count = i + 1;
    }
    if (type == METRICS_HISTOGRAM) {
        int rc = buckets
                     ? copy_buckets(buckets, bucket_count, &family->buckets, &family->bucket_count)
                     : copy_buckets(reg->buckets, reg->bucket_count, &family->buckets, &family->bucket_count);
        if (rc != 0)
            goto fail;
    }

    /* Keep the array sorted by name so that rendering needs no sort of families. */
    size_t at = reg->family_count;
    while (at > 0 && strcmp(reg->families[at - 1]->name, name) > 0) {
        reg->families[at] = reg->families[at - 1];
        at--;
    }
    reg->families[at] = family;
    reg->family_count++;
    return family;

fail:
    family_free(family);
    return NULL;
}

void metrics_collector_register(metrics_registry_t *reg, metrics_collector_fn fn, void *arg)
{
    if (!reg || !fn)
        return;
    metrics_collector *collectors = realloc(reg->collectors, (reg->collector_count + 1) * sizeof *collectors);
    if (!collectors)
        return; /* start-up only; the collector's lines are missing, nothing else breaks */
    reg->collectors = collectors;
    reg->collectors[reg->collector_count++] = (metrics_collector){fn, arg};
}

metrics_shard_t *metrics_shard_create(metrics_registry_t *reg)
{
    if (!reg)
        return NULL;
    metrics_shard_t *shard = alloc_cache_aligned(sizeof *shard);
    if (!shard)
        return NULL;
    atomic_init(&shard->series, NULL);
    shard->index_size = METRICS_INDEX_INITIAL_SLOTS;
    shard->index = calloc(shard->index_size, sizeof *shard->index);
    if (!shard->index)
        goto fail;

    /* The mutex orders creators among themselves; the release store publishes the
     * complete shard to scrapers, which never take the mutex. */
    pthread_mutex_lock(&reg->shard_lock);
    shard->next = atomic_load_explicit(&reg->shards, memory_order_relaxed);
    atomic_store_explicit(&reg->shards, shard, memory_order_release);
    pthread_mutex_unlock(&reg->shard_lock);
    return shard;

fail:
    free(shard);
    return NULL;
}

static const char *label_value_at(const char *const *label_values, size_t i)
{
    if (!label_values || !label_values[i])
        return ""; /* a missing value is the empty value, as in Prometheus */
    return label_values[i];
}

static uint64_t series_hash(const metrics_family_t *family, const char *const *label_values)
{
    uint64_t h = METRICS_HASH_OFFSET;
    uintptr_t id = (uintptr_t)family;
    for (size_t i = 0; i < sizeof id; i++) {
        h = (h ^ (uint8_t)(id >> (8 * i))) * METRICS_HASH_PRIME;
    }
    for (size_t i = 0; i < family->label_count; i++) {
        for (const char *p = label_value_at(label_values, i); *p; p++)
            h = (h ^ (uint8_t)*p) * METRICS_HASH_PRIME;
        h = (h ^ 0xffu) * METRICS_HASH_PRIME; /* 0xff never occurs in UTF-8: separates values */
    }
    return h;
}

static bool series_matches(const metrics_series_t *s, const metrics_family_t *family, uint64_t hash,
                           const char *const *label_values)
{
    if (s->hash != hash || s->family != family)
        return false;
    for (size_t i = 0; i < family->label_count; i++) {
        if (strcmp(s->label_values[i], label_value_at(label_values, i)) != 0)
            return false;
    }
    return true;
}

/* Double the owner's index. On allocation failure the old index stays: lookups get
 * slower, never wrong. */
static void index_grow(metrics_shard_t *shard)
{
    size_t size = shard->index_size * 2;
    metrics_series_t **index = calloc(size, sizeof *index);
    if (!index)
        return;
    for (size_t i = 0; i < shard->index_size; i++) {
        metrics_series_t *s = shard->index[i];
        while (s) {
            metrics_series_t *next = s->index_next;
            size_t slot = s->hash & (size - 1);
            s->index_next = index[slot];
            index[slot] = s;
            s = next;
        }
    }
    free(shard->index);
    shard->index = index;
    shard->index_size = size;
}

static metrics_series_t *series_create(metrics_shard_t *shard, metrics_family_t *family, uint64_t hash,
                                       const char *const *label_values)
{
    size_t bucket_slots = family->type == METRICS_HISTOGRAM ? family->bucket_count + 1 : 0;
    size_t header = sizeof(metrics_series_t) + bucket_slots * sizeof(_Atomic uint64_t);
    size_t size = header;
    for (size_t i = 0; i < family->label_count; i++)
        size += strlen(label_value_at(label_values, i)) + 1;

    metrics_series_t *s = alloc_cache_aligned(size);
    if (!s)
        return NULL;
    s->family = family;
    s->hash = hash;
    char *text = (char *)s + header;
    for (size_t i = 0; i < family->label_count; i++) {
        const char *value = label_value_at(label_values, i);
        size_t len = strlen(value) + 1;
        memcpy(text, value, len);
        s->label_values[i] = text;
        text += len;
    }
    atomic_init(&s->value, family->type == METRICS_COUNTER ? 0 : metrics_double_to_bits(0.0));
    for (size_t i = 0; i < bucket_slots; i++)
        atomic_init(&s->bucket_counts[i], 0);

    if (shard->series_count >= shard->index_size)
        index_grow(shard);
    size_t slot = hash & (shard->index_size - 1);
    s->index_next = shard->index[slot];
    shard->index[slot] = s;
    shard->series_count++;

    /* Publish: every field above is written before the release store of the head. */
    s->next = atomic_load_explicit(&shard->series, memory_order_relaxed);
    atomic_store_explicit(&shard->series, s, memory_order_release);
    return s;
}

metrics_series_t *metrics_series(metrics_shard_t *shard, metrics_family_t *family,
                                 const char *const *label_values)
{
    if (!shard || !family)
        return NULL;
    uint64_t hash = series_hash(family, label_values);
    for (metrics_series_t *s = shard->index[hash & (shard->index_size - 1)]; s; s = s->index_next) {
        if (series_matches(s, family, hash, label_values))
            return s;
    }
    return series_create(shard, family, hash, label_values);
}

/* The recording operations. Single writer: a relaxed load and a relaxed store of
 * the same word are enough, and cost what plain memory accesses cost. */

void metrics_counter_add(metrics_series_t *s, uint64_t n)
{
    uint64_t v = atomic_load_explicit(&s->value, memory_order_relaxed);
    atomic_store_explicit(&s->value, v + n, memory_order_relaxed);
}

void metrics_gauge_set(metrics_series_t *s, double v)
{
    atomic_store_explicit(&s->value, metrics_double_to_bits(v), memory_order_relaxed);
}

void metrics_gauge_add(metrics_series_t *s, double delta)
{
    double v = metrics_bits_to_double(atomic_load_explicit(&s->value, memory_order_relaxed));
    atomic_store_explicit(&s->value, metrics_double_to_bits(v + delta), memory_order_relaxed);
}

void metrics_histogram_observe(metrics_series_t *s, double v)
{
    /* A NaN would turn _sum into NaN for the life of the process; it is dropped. */
    if (isnan(v))
        return;
    const metrics_family_t *family = s->family;
    /* The first bucket whose upper bound is >= v: le is inclusive. Past the last
     * finite bound, the +Inf bucket at index bucket_count. */
    size_t lo = 0, hi = family->bucket_count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v <= family->buckets[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    uint64_t n = atomic_load_explicit(&s->bucket_counts[lo], memory_order_relaxed);
    atomic_store_explicit(&s->bucket_counts[lo], n + 1, memory_order_relaxed);
    double sum = metrics_bits_to_double(atomic_load_explicit(&s->value, memory_order_relaxed));
    atomic_store_explicit(&s->value, metrics_double_to_bits(sum + v), memory_order_relaxed);
}

/*
 * test_cache_memstore.c - the in-process store of cache/memstore.h: get/put,
 * replace, least-recently-used eviction within and across shards, the byte
 * limit (and a lowered one), expiry, delete and delete by pattern, the
 * invalidation epochs and their ring, and four threads hammering a small
 * store (with the limit changing under them), after which the byte count
 * must equal the charges of what is held.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "cache/memstore.h"

/* An entry whose one header names its key and whose body is `size` bytes of
 * a pattern derived from the key, so a reader can tell it got the right one. */
static cache_entry *entry_for(const char *key, size_t size, int64_t stored_ms, int64_t keep_ms)
{
    char fields[128];
    int fl = snprintf(fields, sizeof fields, "X-Key: %s\r\n", key);
    char *body = malloc(size ? size : 1);
    if (!body)
        return NULL;
    for (size_t i = 0; i < size; i++)
        body[i] = (char)(key[strlen(key) - 1] + i);
    const void *b[CACHE_VARIANTS] = {body, NULL, NULL};
    const size_t l[CACHE_VARIANTS] = {size, 0, 0};
    cache_entry *e = cache_entry_make(200, 0, stored_ms, 0, keep_ms, fields, (size_t)fl, b, l);
    free(body);
    return e;
}

/* Does e carry key's header and body? */
static bool entry_is_for(const cache_entry *e, const char *key)
{
    char fields[128];
    int fl = snprintf(fields, sizeof fields, "X-Key: %s\r\n", key);
    if (e->fields_len != (size_t)fl || memcmp(e->fields, fields, (size_t)fl) != 0)
        return false;
    for (size_t i = 0; i < e->body_len[CACHE_IDENTITY]; i++) {
        if (e->body[CACHE_IDENTITY][i] != (char)(key[strlen(key) - 1] + i))
            return false;
    }
    return true;
}

#define FOREVER INT64_MAX

static void put(cache_mem *m, const char *key, size_t size)
{
    cache_entry *e = entry_for(key, size, 0, FOREVER);
    assert_non_null(e);
    cache_mem_put(m, key, strlen(key), e);
    cache_entry_unref(e);
}

static bool has(cache_mem *m, const char *key)
{
    cache_entry *e = cache_mem_get(m, key, strlen(key), 0);
    if (!e)
        return false;
    assert_true(entry_is_for(e, key));
    cache_entry_unref(e);
    return true;
}

static size_t charge_of(const char *key, size_t size)
{
    cache_entry *e = entry_for(key, size, 0, FOREVER);
    size_t c = cache_mem_charge(e, strlen(key));
    cache_entry_unref(e);
    return c;
}

/* n distinct keys "<prefix><i>" that live in shard `shard`. */
static void keys_in_shard(size_t shard, const char *prefix, char keys[][32], int n)
{
    int found = 0;
    for (int i = 0; found < n; i++) {
        char k[32];
        snprintf(k, sizeof k, "%s%05d", prefix, i); /* one length: one charge */
        if (cache_mem_shard_of(k, strlen(k)) == shard)
            snprintf(keys[found++], 32, "%s", k);
    }
}

/* ---- basics ------------------------------------------------------------------------------ */

static void test_put_get(void **state)
{
    (void)state;
    cache_mem *m = cache_mem_new(1 << 20);
    assert_non_null(m);
    assert_int_equal(cache_mem_count(m), 0);
    assert_int_equal(cache_mem_bytes(m), 0);
    assert_null(cache_mem_get(m, "a", 1, 0));

    cache_entry *e = entry_for("cache:GET:/a", 100, 0, FOREVER);
    cache_mem_put(m, "cache:GET:/a", 12, e);
    assert_int_equal(atomic_load(&e->refs), 2); /* ours and the store's */
    assert_int_equal(cache_mem_count(m), 1);
    assert_int_equal(cache_mem_bytes(m), cache_mem_charge(e, 12));
    assert_true(cache_mem_charge(e, 12) >= cache_entry_size(e) + 12);

    cache_entry *g = cache_mem_get(m, "cache:GET:/a", 12, 0);
    assert_ptr_equal(g, e);
    assert_int_equal(atomic_load(&e->refs), 3);
    cache_entry_unref(g);
    /* Keys are bytes: a prefix, or the same bytes with a NUL, are other keys. */
    assert_null(cache_mem_get(m, "cache:GET:/", 11, 0));
    assert_null(cache_mem_get(m, "cache:GET:/a\0", 13, 0));

    /* The caller's reference outlives the store's. */
    g = cache_mem_get(m, "cache:GET:/a", 12, 0);
    cache_entry_unref(e);
    assert_true(cache_mem_delete(m, "cache:GET:/a", 12));
    assert_int_equal(atomic_load(&g->refs), 1);
    assert_true(entry_is_for(g, "cache:GET:/a"));
    cache_entry_unref(g);
    assert_int_equal(cache_mem_count(m), 0);
    assert_int_equal(cache_mem_bytes(m), 0);
    cache_mem_free(m);
    cache_mem_free(NULL);
}

static void test_replace(void **state)
{
    (void)state;
    cache_mem *m = cache_mem_new(1 << 20);
    cache_entry *e1 = entry_for("k1", 10, 0, FOREVER), *e2 = entry_for("k1", 500, 0, FOREVER);
    cache_mem_put(m, "k", 1, e1);
    cache_mem_put(m, "k", 1, e2);
    assert_int_equal(cache_mem_count(m), 1);
    assert_int_equal(cache_mem_bytes(m), cache_mem_charge(e2, 1));
    assert_int_equal(atomic_load(&e1->refs), 1); /* the store let go of it */
    cache_entry *g = cache_mem_get(m, "k", 1, 0);
    assert_ptr_equal(g, e2);
    cache_entry_unref(g);
    /* The same entry again changes nothing. */
    cache_mem_put(m, "k", 1, e2);
    assert_int_equal(cache_mem_count(m), 1);
    assert_int_equal(atomic_load(&e2->refs), 2);
    assert_int_equal(cache_mem_bytes(m), cache_mem_charge(e2, 1));
    cache_entry_unref(e1);
    cache_entry_unref(e2);
    cache_mem_free(m);
}

/* ---- eviction ---------------------------------------------------------------------------- */

static void test_lru_order(void **state)
{
    (void)state;
    char k[5][32];
    keys_in_shard(3, "lru", k, 5);
    size_t c = charge_of(k[0], 100);
    for (int i = 1; i < 5; i++)
        assert_int_equal(charge_of(k[i], 100), c); /* same-length keys */
    cache_mem *m = cache_mem_new(3 * c);
    put(m, k[0], 100);
    put(m, k[1], 100);
    put(m, k[2], 100);
    assert_int_equal(cache_mem_count(m), 3);
    /* k0 used: k1 is now the least recently used, and goes. */
    assert_true(has(m, k[0]));
    put(m, k[3], 100);
    assert_int_equal(cache_mem_count(m), 3);
    assert_false(has(m, k[1]));
    assert_true(has(m, k[2]));
    assert_true(has(m, k[0]));
    assert_true(has(m, k[3]));
    /* Order now (oldest first): k2, k0, k3. Replacing k2 makes it newest. */
    put(m, k[2], 100);
    put(m, k[4], 100);
    assert_false(has(m, k[0]));
    assert_true(has(m, k[2]));
    assert_true(has(m, k[3]));
    assert_true(has(m, k[4]));
    assert_int_equal(cache_mem_bytes(m), 3 * c);
    cache_mem_free(m);
}

static void test_evicts_own_shard_then_others(void **state)
{
    (void)state;
    char a[2][32], b[3][32];
    keys_in_shard(5, "sa", a, 2);
    keys_in_shard(6, "sb", b, 3);
    size_t c = charge_of(a[0], 64);
    cache_mem *m = cache_mem_new(3 * c);
    /* Oldest first: a0 (shard 5), b0, b1 (shard 6). */
    put(m, a[0], 64);
    put(m, b[0], 64);
    put(m, b[1], 64);
    /* A put into shard 6 evicts shard 6's oldest, not the older a0. */
    put(m, b[2], 64);
    assert_true(has(m, a[0]));
    assert_false(has(m, b[0]));
    assert_true(has(m, b[1]));
    assert_true(has(m, b[2]));
    /* A put into shard 5 with only a0 there: a0 goes first, then still over,
     * the next shards are walked: shard 6's oldest goes. */
    cache_mem_set_limit(m, 2 * c);
    assert_int_equal(cache_mem_count(m), 2);
    assert_true(cache_mem_bytes(m) <= 2 * c);
    assert_false(has(m, a[0]));
    put(m, a[1], 64);
    assert_int_equal(cache_mem_count(m), 2);
    assert_true(has(m, a[1]));
    assert_false(has(m, b[1]));
    assert_true(has(m, b[2]));
    assert_int_equal(cache_mem_bytes(m), 2 * c);
    cache_mem_free(m);
}

static void test_byte_limit(void **state)
{
    (void)state;
    size_t max = 64 * 1024;
    cache_mem *m = cache_mem_new(max);
    char key[32];
    for (int i = 0; i < 500; i++) {
        snprintf(key, sizeof key, "k%d", i);
        put(m, key, (size_t)(i * 37 % 2000));
        assert_true(cache_mem_bytes(m) <= max);
    }
    /* The byte count is exactly the charges of what is held. */
    size_t sum = 0, count = 0;
    for (int i = 0; i < 500; i++) {
        snprintf(key, sizeof key, "k%d", i);
        cache_entry *e = cache_mem_get(m, key, strlen(key), 0);
        if (e) {
            assert_true(entry_is_for(e, key));
            sum += cache_mem_charge(e, strlen(key));
            count++;
            cache_entry_unref(e);
        }
    }
    assert_int_equal(sum, cache_mem_bytes(m));
    assert_int_equal(count, cache_mem_count(m));
    assert_true(count > 30);
    /* The most recent ones are there. */
    assert_true(has(m, "k499"));
    assert_true(has(m, "k498"));

    /* A lower limit evicts down to it; 0 empties the store. */
    cache_mem_set_limit(m, max / 4);
    assert_true(cache_mem_bytes(m) <= max / 4);
    assert_true(cache_mem_count(m) > 0);
    cache_mem_set_limit(m, 0);
    assert_int_equal(cache_mem_bytes(m), 0);
    assert_int_equal(cache_mem_count(m), 0);
    put(m, "x", 1);
    assert_int_equal(cache_mem_count(m), 0);
    cache_mem_free(m);
}

static void test_too_large(void **state)
{
    (void)state;
    size_t c = charge_of("big", 1000);
    cache_mem *m = cache_mem_new(c);
    put(m, "big", 1000); /* exactly the limit: kept */
    assert_int_equal(cache_mem_count(m), 1);
    assert_int_equal(cache_mem_bytes(m), c);
    put(m, "big", 1100); /* over it: not kept, and the older answer goes too */
    assert_int_equal(cache_mem_count(m), 0);
    assert_int_equal(cache_mem_bytes(m), 0);
    assert_false(has(m, "big"));
    cache_mem_free(m);

    m = cache_mem_new(0);
    put(m, "a", 0);
    assert_int_equal(cache_mem_count(m), 0);
    assert_int_equal(cache_mem_bytes(m), 0);
    cache_mem_free(m);
}

static void test_many_keys_grow(void **state)
{
    (void)state;
    cache_mem *m = cache_mem_new(SIZE_MAX);
    char key[32];
    for (int i = 0; i < 20000; i++) {
        snprintf(key, sizeof key, "grow:%d", i);
        put(m, key, 0);
    }
    assert_int_equal(cache_mem_count(m), 20000);
    for (int i = 0; i < 20000; i += 7) {
        snprintf(key, sizeof key, "grow:%d", i);
        assert_true(has(m, key));
    }
    assert_int_equal(cache_mem_delete_matching(m, "grow:1*", 7), 1 + 10 + 100 + 1000 + 10000);
    assert_int_equal(cache_mem_count(m), 20000 - 11111);
    cache_mem_free(m);
}

/* ---- expiry ------------------------------------------------------------------------------ */

static void test_expiry(void **state)
{
    (void)state;
    cache_mem *m = cache_mem_new(1 << 20);
    cache_entry *e = entry_for("k", 10, 1000, 100); /* kept until 1100 */
    cache_mem_put(m, "k", 1, e);
    cache_entry *g = cache_mem_get(m, "k", 1, 1099);
    assert_ptr_equal(g, e);
    cache_entry_unref(g);
    assert_null(cache_mem_get(m, "k", 1, 1100));
    assert_int_equal(cache_mem_count(m), 0);
    assert_int_equal(cache_mem_bytes(m), 0);
    assert_int_equal(atomic_load(&e->refs), 1);
    cache_entry_unref(e);

    /* stored + keep past INT64_MAX: never expires. */
    e = entry_for("k", 10, INT64_MAX - 5, 100);
    cache_mem_put(m, "k", 1, e);
    g = cache_mem_get(m, "k", 1, INT64_MAX);
    assert_ptr_equal(g, e);
    cache_entry_unref(g);
    cache_entry_unref(e);
    /* keep 0: gone at once. */
    e = entry_for("z", 10, 50, 0);
    cache_mem_put(m, "z", 1, e);
    assert_null(cache_mem_get(m, "z", 1, 50));
    cache_entry_unref(e);
    assert_int_equal(cache_mem_count(m), 1);
    cache_mem_free(m);
}

/* ---- deletes ----------------------------------------------------------------------------- */

static void test_delete(void **state)
{
    (void)state;
    cache_mem *m = cache_mem_new(1 << 20);
    put(m, "a", 5);
    put(m, "b", 5);
    assert_true(cache_mem_delete(m, "a", 1));
    assert_false(cache_mem_delete(m, "a", 1));
    assert_false(cache_mem_delete(m, "zz", 2));
    assert_false(has(m, "a"));
    assert_true(has(m, "b"));
    assert_int_equal(cache_mem_count(m), 1);
    assert_int_equal(cache_mem_bytes(m), charge_of("b", 5));
    cache_mem_free(m);
}

static void test_delete_matching(void **state)
{
    (void)state;
    cache_mem *m = cache_mem_new(1 << 20);
    const char *keys[] = {"cache:GET:/api/blueprints",
                          "cache:GET:/api/blueprints?a=1",
                          "cache:GET:/api/blueprints/7",
                          "cache:GET:/api/projects",
                          "cache:GET:/a*b",
                          "cache:GET:/aXb",
                          "project:1",
                          "project:12"};
    for (size_t i = 0; i < 8; i++)
        put(m, keys[i], 10);
    const char *p = "cache:GET:/api/blueprints*";
    assert_int_equal(cache_mem_delete_matching(m, p, strlen(p)), 3);
    assert_int_equal(cache_mem_count(m), 5);
    assert_int_equal(cache_mem_delete_matching(m, p, strlen(p)), 0);
    /* A literal pattern names one key, its escapes taken out. */
    assert_int_equal(cache_mem_delete_matching(m, "cache:GET:/a\\*b", 15), 1);
    assert_false(has(m, "cache:GET:/a*b"));
    assert_true(has(m, "cache:GET:/aXb"));
    assert_int_equal(cache_mem_delete_matching(m, "project:1", 9), 1);
    assert_true(has(m, "project:12"));
    assert_int_equal(cache_mem_delete_matching(m, "project:?", 9), 0);
    assert_int_equal(cache_mem_delete_matching(m, "project:[0-9][0-9]", 18), 1);
    assert_int_equal(cache_mem_count(m), 2);
    size_t bytes = charge_of("cache:GET:/api/projects", 10) + charge_of("cache:GET:/aXb", 10);
    assert_int_equal(cache_mem_bytes(m), bytes);
    /* Everything ("clear"). */
    assert_int_equal(cache_mem_delete_matching(m, "*", 1), 2);
    assert_int_equal(cache_mem_count(m), 0);
    assert_int_equal(cache_mem_bytes(m), 0);
    cache_mem_free(m);
}

/* ---- epochs ------------------------------------------------------------------------------ */

static bool inv(cache_mem *m, uint64_t epoch, const char *key)
{
    return cache_mem_invalidated_since(m, epoch, key, strlen(key));
}

static void test_epochs(void **state)
{
    (void)state;
    cache_mem *m = cache_mem_new(1 << 20);
    uint64_t e0 = cache_mem_epoch(m);
    assert_false(inv(m, e0, "cache:GET:/api/blueprints"));

    /* A delete by pattern moves the epoch even when it deleted nothing. */
    assert_int_equal(cache_mem_delete_matching(m, "cache:GET:/api/blueprints*", 26), 0);
    uint64_t e1 = cache_mem_epoch(m);
    assert_int_equal(e1, e0 + 1);
    assert_true(inv(m, e0, "cache:GET:/api/blueprints?x=1"));
    assert_false(inv(m, e0, "cache:GET:/api/projects"));
    assert_false(inv(m, e1, "cache:GET:/api/blueprints?x=1"));

    /* A single delete counts, for that key literally. */
    assert_false(cache_mem_delete(m, "k*", 2));
    uint64_t e2 = cache_mem_epoch(m);
    assert_int_equal(e2, e1 + 1);
    assert_true(inv(m, e1, "k*"));
    assert_false(inv(m, e1, "k1"));
    assert_true(inv(m, e0, "cache:GET:/api/blueprints"));
    assert_true(inv(m, e0, "k*"));
    assert_false(inv(m, e0, "k1"));

    /* The ring remembers CACHE_MEM_RING: an epoch older than that answers true for any key. */
    for (int i = 0; i < CACHE_MEM_RING; i++)
        cache_mem_delete_matching(m, "nothing:*", 9);
    uint64_t elast = cache_mem_epoch(m);
    assert_int_equal(elast, e2 + CACHE_MEM_RING);
    assert_false(inv(m, e2, "k1")); /* exactly the CACHE_MEM_RING after e2 are known */
    assert_true(inv(m, e1, "k1"));  /* e2 itself is forgotten */
    assert_true(inv(m, e0, "zzz"));
    assert_false(inv(m, elast - 1, "zzz"));
    assert_true(inv(m, elast - 1, "nothing:at:all"));
    /* An epoch this store never gave. */
    assert_true(inv(m, elast + 5, "zzz"));
    cache_mem_free(m);
}

/* ---- threads ----------------------------------------------------------------------------- */

#define STRESS_THREADS 4
#define STRESS_OPS 100000
#define STRESS_KEYS 64
#define STRESS_MAX_BYTES (24 * 1024)

typedef struct stress_arg {
    cache_mem *m;
    uint64_t seed;
    pthread_barrier_t *start;
    size_t hits, puts, deleted, invalidated, wrong;
} stress_arg;

static uint64_t next_rand(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

static void *stress_worker(void *arg)
{
    stress_arg *a = arg;
    static const char *patterns[] = {"k1*", "k?", "k[2-3]*", "k*7", "nomatch*"};
    uint64_t x = a->seed;
    char key[16];
    pthread_barrier_wait(a->start);
    for (int i = 0; i < STRESS_OPS; i++) {
        uint64_t r = next_rand(&x);
        snprintf(key, sizeof key, "k%d", (int)(r % STRESS_KEYS));
        unsigned op = (unsigned)(r >> 32) % 100;
        if (op < 48) {
            uint64_t epoch = cache_mem_epoch(a->m);
            /* Some reads from a clock late enough to expire entries. */
            int64_t now = (r >> 20) % 4 == 0 ? (int64_t)((r >> 24) % 3000) : 0;
            cache_entry *e = cache_mem_get(a->m, key, strlen(key), now);
            if (e) {
                a->hits++;
                a->wrong += !entry_is_for(e, key);
                cache_entry_unref(e);
            }
            a->invalidated += cache_mem_invalidated_since(a->m, epoch, key, strlen(key));
        } else if (op < 94) {
            cache_entry *e =
                entry_for(key, (r >> 40) % 1500, (int64_t)((r >> 8) % 1000), (int64_t)(1 + (r >> 12) % 2000));
            if (!e)
                abort();
            cache_mem_put(a->m, key, strlen(key), e);
            cache_entry_unref(e);
            a->puts++;
        } else if (op < 97) {
            a->deleted += cache_mem_delete(a->m, key, strlen(key));
        } else if (op == 97 && (r >> 50) % 16 == 0) {
            /* Now and then a reload halves the limit or restores it. */
            cache_mem_set_limit(a->m, (r >> 20) % 2 ? STRESS_MAX_BYTES : STRESS_MAX_BYTES / 2);
        } else {
            const char *p = patterns[(r >> 16) % 5];
            a->deleted += cache_mem_delete_matching(a->m, p, strlen(p));
        }
    }
    return NULL;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* put_since refuses an answer fetched before a matching invalidation and
 * takes one when the invalidation matched other keys only. */
static void test_put_since(void **state)
{
    (void)state;
    cache_mem *m = cache_mem_new(1 << 20);
    assert_non_null(m);
    uint64_t before = cache_mem_epoch(m);
    assert_int_equal(cache_mem_delete_matching(m, "cache:GET:/a*", 13), 0);
    cache_entry *a = entry_for("cache:GET:/a?x=1", 10, 1000, 60000);
    cache_entry *b = entry_for("cache:GET:/b", 10, 1000, 60000);
    assert_false(cache_mem_put_since(m, "cache:GET:/a?x=1", 16, a, before));
    assert_null(cache_mem_get(m, "cache:GET:/a?x=1", 16, 2000));
    assert_true(cache_mem_put_since(m, "cache:GET:/b", 12, b, before));
    cache_entry *got = cache_mem_get(m, "cache:GET:/b", 12, 2000);
    assert_ptr_equal(got, b);
    cache_entry_unref(got);
    /* Noted after the invalidation: stored. */
    assert_true(cache_mem_put_since(m, "cache:GET:/a?x=1", 16, a, cache_mem_epoch(m)));
    got = cache_mem_get(m, "cache:GET:/a?x=1", 16, 2000);
    assert_ptr_equal(got, a);
    cache_entry_unref(got);
    assert_int_equal(cache_mem_count(m), 2);
    cache_entry_unref(a);
    cache_entry_unref(b);
    cache_mem_free(m);
}

/* One pending entry per pattern, with its latest write; a deletion that
 * began before that write does not clear it. */
static void test_pending(void **state)
{
    (void)state;
    cache_mem *m = cache_mem_new(1 << 20);
    assert_non_null(m);
    assert_false(cache_mem_pending_blocks(m, "cache:GET:/a", 12, 100));
    assert_true(cache_mem_pending_add(m, "cache:GET:/a*", 13, 1000));
    assert_true(cache_mem_pending_blocks(m, "cache:GET:/a?x", 14, 1000));  /* stored at the write */
    assert_false(cache_mem_pending_blocks(m, "cache:GET:/a?x", 14, 1001)); /* stored after it */
    assert_false(cache_mem_pending_blocks(m, "cache:GET:/b", 12, 10));     /* another key */
    /* The same pattern again, from a later write: one entry, the later time. */
    assert_true(cache_mem_pending_add(m, "cache:GET:/a*", 13, 2000));
    assert_true(cache_mem_pending_blocks(m, "cache:GET:/a", 12, 1500));
    /* A deletion that began before the later write leaves it pending... */
    cache_mem_pending_done(m, "cache:GET:/a*", 13, 1500);
    assert_true(cache_mem_pending_blocks(m, "cache:GET:/a", 12, 1500));
    /* ... one that began after it clears it. */
    cache_mem_pending_done(m, "cache:GET:/a*", 13, 2000);
    assert_false(cache_mem_pending_blocks(m, "cache:GET:/a", 12, 1500));
    cache_mem_pending_done(m, "cache:GET:/a*", 13, 3000); /* nothing left: no effect */
    cache_mem_free(m);
}

static void test_threads_stress(void **state)
{
    (void)state;
    cache_mem *m = cache_mem_new(STRESS_MAX_BYTES);
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, STRESS_THREADS);
    pthread_t th[STRESS_THREADS];
    stress_arg args[STRESS_THREADS];
    double t0 = now_s();
    for (int i = 0; i < STRESS_THREADS; i++) {
        args[i] = (stress_arg){.m = m, .seed = 0x9E3779B97F4A7C15ULL * (uint64_t)(i + 1), .start = &start};
        assert_int_equal(pthread_create(&th[i], NULL, stress_worker, &args[i]), 0);
    }
    for (int i = 0; i < STRESS_THREADS; i++)
        pthread_join(th[i], NULL);
    double took = now_s() - t0;
    pthread_barrier_destroy(&start);

    size_t hits = 0, puts = 0, deleted = 0, invalidated = 0;
    for (int i = 0; i < STRESS_THREADS; i++) {
        assert_int_equal(args[i].wrong, 0);
        hits += args[i].hits;
        puts += args[i].puts;
        deleted += args[i].deleted;
        invalidated += args[i].invalidated;
    }
    /* Quiet now: the count and bytes are exactly what is held. A clock of
     * INT64_MIN expires nothing, so looking does not change it. */
    size_t bytes = cache_mem_bytes(m), count = cache_mem_count(m), sum = 0, held = 0;
    char key[16];
    for (int k = 0; k < STRESS_KEYS; k++) {
        snprintf(key, sizeof key, "k%d", k);
        cache_entry *e = cache_mem_get(m, key, strlen(key), INT64_MIN);
        if (e) {
            assert_true(entry_is_for(e, key));
            sum += cache_mem_charge(e, strlen(key));
            held++;
            assert_true(atomic_load(&e->refs) == 2);
            cache_entry_unref(e);
        }
    }
    print_message(
        "memstore stress: %d threads x %d ops in %.3f s (%.0f ops/s); %zu puts, %zu hits, %zu deleted, "
        "%zu reads saw an invalidation; end: %zu entries, %zu bytes of %d\n",
        STRESS_THREADS, STRESS_OPS, took, STRESS_THREADS * STRESS_OPS / took, puts, hits, deleted,
        invalidated, count, bytes, STRESS_MAX_BYTES);
    assert_int_equal(sum, bytes);
    assert_int_equal(held, count);
    assert_true(bytes <= STRESS_MAX_BYTES); /* whichever limit was set last */
    assert_true(hits > 1000 && deleted > 100);
    cache_mem_free(m); /* frees every entry held: ASan's leak check sees the rest */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_put_get),        cmocka_unit_test(test_replace),
        cmocka_unit_test(test_lru_order),      cmocka_unit_test(test_evicts_own_shard_then_others),
        cmocka_unit_test(test_byte_limit),     cmocka_unit_test(test_too_large),
        cmocka_unit_test(test_many_keys_grow), cmocka_unit_test(test_expiry),
        cmocka_unit_test(test_delete),         cmocka_unit_test(test_delete_matching),
        cmocka_unit_test(test_epochs),         cmocka_unit_test(test_put_since),
        cmocka_unit_test(test_pending),        cmocka_unit_test(test_threads_stress),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

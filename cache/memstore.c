/*
 * memstore.c - the in-process store (see memstore.h).
 *
 * Shared by every thread. CACHE_MEM_SHARDS shards, picked by the top bits of
 * a 64-bit key hash; each is a chained hash table that doubles as it fills,
 * plus a doubly linked LRU list (most recently used at the head), under its
 * own mutex. A node is the key copied after a small header and a reference to
 * the entry.
 *
 * The one rule: a shard lock covers pointer moves and nothing else. Nodes are
 * allocated before it is taken, bucket arrays are grown after it is dropped
 * and swapped in under it again, and whatever leaves the store (replaced,
 * evicted, expired, deleted) is collected on a local list and only unreffed
 * and freed once the lock is released. No thread ever holds two shard locks:
 * eviction walks the other shards one after another.
 *
 * Bytes held are one atomic, so max_bytes is a process limit; it changes only
 * under the lock of the shard that gains or loses the node, so with the store
 * quiet it equals the sum of the nodes' charges exactly.
 *
 * Invalidations (delete, delete by pattern) take the next epoch and leave
 * (epoch, pattern) in a ring of CACHE_MEM_RING under a small mutex of its own,
 * taken before any shard is touched: a miss that checks after the epoch moved
 * does not store, one that stored before is deleted by the walk.
 */
#include "cache/memstore.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "cache/key.h"

#define CACHE_MEM_BUCKETS_INITIAL 64 /* per shard; doubled when the shard holds more nodes */
#define CACHE_MEM_SHARD_BITS 4       /* log2(CACHE_MEM_SHARDS) */

_Static_assert(CACHE_MEM_SHARDS == 1 << CACHE_MEM_SHARD_BITS, "CACHE_MEM_SHARD_BITS");

typedef struct mem_node {
    struct mem_node *chain;       /* next in the bucket; next victim once out of the store */
    struct mem_node *prev, *next; /* LRU: prev towards the head (most recent) */
    uint64_t hash;
    cache_entry *e;
    size_t charge;
    size_t key_len;
    char key[]; /* NUL-terminated copy */
} mem_node;

typedef struct mem_shard {
    pthread_mutex_t lock;
    mem_node **buckets;
    size_t mask; /* buckets - 1 */
    size_t count;
    mem_node *head, *tail;
    char pad[64]; /* keeps neighbouring shards' locks off one cache line */
} mem_shard;

typedef struct mem_invalidation {
    uint64_t epoch; /* 0: slot unused */
    char *pattern;
    size_t len;
    bool literal; /* pattern is one key, not a glob */
} mem_invalidation;

typedef struct mem_pending {
    char *pattern;
    size_t len;
    int64_t since_ms;
} mem_pending;

struct cache_mem {
    mem_shard shards[CACHE_MEM_SHARDS];
    atomic_size_t bytes;
    atomic_size_t count;
    atomic_size_t max_bytes;
    _Atomic uint64_t epoch;
    pthread_mutex_t ring_lock;
    mem_invalidation ring[CACHE_MEM_RING]; /* epoch e in slot e % CACHE_MEM_RING */
    /* Invalidations Redis has not done yet (see cache_mem_pending_add). */
    pthread_mutex_t pending_lock;
    atomic_size_t pending_count;
    mem_pending *pending;
    size_t pending_cap;
};

/* FNV-1a, then a 64-bit finaliser so the top bits (the shard) are as mixed
 * as the low ones (the bucket). */
static uint64_t mem_hash(const char *key, size_t len)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)key[i];
        h *= 0x100000001b3ULL;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static size_t shard_index(uint64_t hash)
{
    return (size_t)(hash >> (64 - CACHE_MEM_SHARD_BITS));
}

size_t cache_mem_shard_of(const char *key, size_t key_len)
{
    return shard_index(mem_hash(key, key_len));
}

size_t cache_mem_charge(const cache_entry *e, size_t key_len)
{
    return cache_entry_size(e) + sizeof(mem_node) + key_len + 1;
}

/* ---- one shard, its lock held ------------------------------------------------------------ */

static mem_node **shard_slot(mem_shard *s, uint64_t hash, const char *key, size_t key_len)
{
    mem_node **slot = &s->buckets[hash & s->mask];
    for (; *slot; slot = &(*slot)->chain) {
        mem_node *n = *slot;
        if (n->hash == hash && n->key_len == key_len && memcmp(n->key, key, key_len) == 0)
            break;
    }
    return slot;
}

static void lru_unlink(mem_shard *s, mem_node *n)
{
    if (n->prev)
        n->prev->next = n->next;
    else
        s->head = n->next;
    if (n->next)
        n->next->prev = n->prev;
    else
        s->tail = n->prev;
    n->prev = n->next = NULL;
}

static void lru_push_head(mem_shard *s, mem_node *n)
{
    n->prev = NULL;
    n->next = s->head;
    if (s->head)
        s->head->prev = n;
    else
        s->tail = n;
    s->head = n;
}

/* Take the node out of the table and the list and onto *victims. */
static void shard_remove(cache_mem *m, mem_shard *s, mem_node **slot, mem_node **victims)
{
    mem_node *n = *slot;
    *slot = n->chain;
    lru_unlink(s, n);
    s->count--;
    atomic_fetch_sub_explicit(&m->count, 1, memory_order_relaxed);
    atomic_fetch_sub_explicit(&m->bytes, n->charge, memory_order_relaxed);
    n->chain = *victims;
    *victims = n;
}

/* Evict from the tail of s, never keep (just stored), while the store is
 * over its limit. */
static void shard_evict(cache_mem *m, mem_shard *s, const mem_node *keep, mem_node **victims)
{
    while (atomic_load_explicit(&m->bytes, memory_order_relaxed) >
           atomic_load_explicit(&m->max_bytes, memory_order_relaxed)) {
        mem_node *n = s->tail;
        if (n && n == keep)
            n = n->prev;
        if (!n)
            return;
        shard_remove(m, s, shard_slot(s, n->hash, n->key, n->key_len), victims);
    }
}

/* ---- outside the locks ------------------------------------------------------------------- */

static void free_victims(mem_node *v)
{
    while (v) {
        mem_node *next = v->chain;
        cache_entry_unref(v->e);
        free(v);
        v = next;
    }
}

static bool over_limit(cache_mem *m)
{
    return atomic_load_explicit(&m->bytes, memory_order_relaxed) >
           atomic_load_explicit(&m->max_bytes, memory_order_relaxed);
}

/* Evict from each shard in turn, starting after `first`, until under the limit. */
static void evict_others(cache_mem *m, size_t first)
{
    for (size_t i = 1; i <= CACHE_MEM_SHARDS && over_limit(m); i++) {
        mem_shard *s = &m->shards[(first + i) % CACHE_MEM_SHARDS];
        mem_node *victims = NULL;
        pthread_mutex_lock(&s->lock);
        shard_evict(m, s, NULL, &victims);
        pthread_mutex_unlock(&s->lock);
        free_victims(victims);
    }
}

/* The shard holds more nodes than buckets: double them. The array is
 * allocated with no lock held; another thread may have grown it meanwhile. */
static void shard_grow(mem_shard *s, size_t seen_buckets)
{
    size_t nb = seen_buckets * 2;
    if (nb < seen_buckets || nb > SIZE_MAX / sizeof(mem_node *))
        return;
    mem_node **fresh = calloc(nb, sizeof *fresh);
    if (!fresh)
        return; /* longer chains, nothing worse */
    pthread_mutex_lock(&s->lock);
    if (s->mask + 1 != seen_buckets) {
        pthread_mutex_unlock(&s->lock);
        free(fresh);
        return;
    }
    for (size_t b = 0; b <= s->mask; b++) {
        for (mem_node *n = s->buckets[b], *next; n; n = next) {
            next = n->chain;
            n->chain = fresh[n->hash & (nb - 1)];
            fresh[n->hash & (nb - 1)] = n;
        }
    }
    mem_node **old = s->buckets;
    s->buckets = fresh;
    s->mask = nb - 1;
    pthread_mutex_unlock(&s->lock);
    free(old);
}

cache_mem *cache_mem_new(size_t max_bytes)
{
    cache_mem *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    size_t made = 0;
    for (; made < CACHE_MEM_SHARDS; made++) {
        mem_shard *s = &m->shards[made];
        s->buckets = calloc(CACHE_MEM_BUCKETS_INITIAL, sizeof *s->buckets);
        if (!s->buckets || pthread_mutex_init(&s->lock, NULL) != 0) {
            free(s->buckets);
            goto fail;
        }
        s->mask = CACHE_MEM_BUCKETS_INITIAL - 1;
    }
    if (pthread_mutex_init(&m->ring_lock, NULL) != 0)
        goto fail;
    if (pthread_mutex_init(&m->pending_lock, NULL) != 0) {
        pthread_mutex_destroy(&m->ring_lock);
        goto fail;
    }
    atomic_init(&m->pending_count, 0);
    atomic_init(&m->bytes, 0);
    atomic_init(&m->count, 0);
    atomic_init(&m->max_bytes, max_bytes);
    atomic_init(&m->epoch, 0);
    return m;

fail:
    while (made--) {
        pthread_mutex_destroy(&m->shards[made].lock);
        free(m->shards[made].buckets);
    }
    free(m);
    return NULL;
}

void cache_mem_free(cache_mem *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < CACHE_MEM_SHARDS; i++) {
        mem_shard *s = &m->shards[i];
        mem_node *n = s->head;
        while (n) {
            mem_node *next = n->next;
            cache_entry_unref(n->e);
            free(n);
            n = next;
        }
        free(s->buckets);
        s->buckets = NULL;
        pthread_mutex_destroy(&s->lock);
    }
    for (size_t i = 0; i < CACHE_MEM_RING; i++)
        free(m->ring[i].pattern);
    pthread_mutex_destroy(&m->ring_lock);
    for (size_t i = 0; i < atomic_load(&m->pending_count); i++)
        free(m->pending[i].pattern);
    free(m->pending);
    pthread_mutex_destroy(&m->pending_lock);
    free(m);
}

bool cache_mem_pending_add(cache_mem *m, const char *pattern, size_t len, int64_t since_ms)
{
    pthread_mutex_lock(&m->pending_lock);
    size_t n = atomic_load_explicit(&m->pending_count, memory_order_relaxed);
    for (size_t i = 0; i < n; i++) {
        if (m->pending[i].len == len && memcmp(m->pending[i].pattern, pattern, len) == 0) {
            if (since_ms > m->pending[i].since_ms) /* one entry per pattern, its latest write */
                m->pending[i].since_ms = since_ms;
            pthread_mutex_unlock(&m->pending_lock);
            return true;
        }
    }
    char *copy = NULL;
    if (n == m->pending_cap) {
        size_t cap = m->pending_cap ? 2 * m->pending_cap : 16;
        mem_pending *p = realloc(m->pending, cap * sizeof *p);
        if (!p) {
            pthread_mutex_unlock(&m->pending_lock);
            return false;
        }
        m->pending = p;
        m->pending_cap = cap;
    }
    copy = malloc(len + 1);
    if (!copy) {
        pthread_mutex_unlock(&m->pending_lock);
        return false;
    }
    memcpy(copy, pattern, len);
    copy[len] = '\0';
    m->pending[n] = (mem_pending){copy, len, since_ms};
    atomic_store_explicit(&m->pending_count, n + 1, memory_order_release);
    pthread_mutex_unlock(&m->pending_lock);
    return true;
}

void cache_mem_pending_done(cache_mem *m, const char *pattern, size_t len, int64_t started_ms)
{
    char *gone = NULL;
    pthread_mutex_lock(&m->pending_lock);
    size_t n = atomic_load_explicit(&m->pending_count, memory_order_relaxed);
    for (size_t i = 0; i < n; i++) {
        if (m->pending[i].len == len && memcmp(m->pending[i].pattern, pattern, len) == 0) {
            if (m->pending[i].since_ms <= started_ms) { /* no write of it came after the deletion began */
                gone = m->pending[i].pattern;
                m->pending[i] = m->pending[n - 1];
                atomic_store_explicit(&m->pending_count, n - 1, memory_order_release);
            }
            break;
        }
    }
    pthread_mutex_unlock(&m->pending_lock);
    free(gone);
}

bool cache_mem_pending_blocks(cache_mem *m, const char *key, size_t key_len, int64_t stored_ms)
{
    if (atomic_load_explicit(&m->pending_count, memory_order_acquire) == 0)
        return false;
    bool blocked = false;
    pthread_mutex_lock(&m->pending_lock);
    size_t n = atomic_load_explicit(&m->pending_count, memory_order_relaxed);
    for (size_t i = 0; i < n && !blocked; i++)
        blocked = stored_ms <= m->pending[i].since_ms &&
                  cache_glob_match(m->pending[i].pattern, m->pending[i].len, key, key_len);
    pthread_mutex_unlock(&m->pending_lock);
    return blocked;
}

void cache_mem_set_limit(cache_mem *m, size_t max_bytes)
{
    atomic_store_explicit(&m->max_bytes, max_bytes, memory_order_relaxed);
    evict_others(m, CACHE_MEM_SHARDS - 1);
}

cache_entry *cache_mem_get(cache_mem *m, const char *key, size_t key_len, int64_t now_ms)
{
    uint64_t h = mem_hash(key, key_len);
    mem_shard *s = &m->shards[shard_index(h)];
    cache_entry *e = NULL;
    mem_node *victims = NULL;
    pthread_mutex_lock(&s->lock);
    mem_node **slot = shard_slot(s, h, key, key_len);
    mem_node *n = *slot;
    if (n) {
        int64_t until;
        bool forever = __builtin_add_overflow(n->e->stored_ms, n->e->keep_ms, &until);
        if (!forever && now_ms >= until) {
            shard_remove(m, s, slot, &victims);
        } else {
            lru_unlink(s, n);
            lru_push_head(s, n);
            e = n->e;
            cache_entry_ref(e);
        }
    }
    pthread_mutex_unlock(&s->lock);
    free_victims(victims);
    return e;
}

/* Take key out of its shard; true when it was there. */
static bool mem_remove_key(cache_mem *m, const char *key, size_t key_len)
{
    uint64_t h = mem_hash(key, key_len);
    mem_shard *s = &m->shards[shard_index(h)];
    mem_node *victims = NULL;
    pthread_mutex_lock(&s->lock);
    mem_node **slot = shard_slot(s, h, key, key_len);
    bool found = *slot != NULL;
    if (found)
        shard_remove(m, s, slot, &victims);
    pthread_mutex_unlock(&s->lock);
    free_victims(victims);
    return found;
}

static bool put(cache_mem *m, const char *key, size_t key_len, cache_entry *e, bool check, uint64_t epoch)
{
    size_t charge = cache_mem_charge(e, key_len);
    if (charge > atomic_load_explicit(&m->max_bytes, memory_order_relaxed)) {
        /* Too large to keep: the older answer must not outlive the new one either. */
        mem_remove_key(m, key, key_len);
        return false;
    }
    mem_node *n = malloc(sizeof *n + key_len + 1);
    if (!n)
        return false;
    memcpy(n->key, key, key_len);
    n->key[key_len] = '\0';
    n->key_len = key_len;
    n->hash = mem_hash(key, key_len);
    n->charge = charge;
    n->e = e;
    cache_entry_ref(e);

    size_t si = shard_index(n->hash);
    mem_shard *s = &m->shards[si];
    mem_node *victims = NULL;
    pthread_mutex_lock(&s->lock);
    /* Checked under the shard's lock: an invalidation that takes its epoch
     * after this check scans this shard after the insert, so it deletes it
     * (the ring's lock is only ever taken inside a shard's, never around). */
    if (check && cache_mem_invalidated_since(m, epoch, key, key_len)) {
        pthread_mutex_unlock(&s->lock);
        cache_entry_unref(e);
        free(n);
        return false;
    }
    mem_node **slot = shard_slot(s, n->hash, key, key_len);
    if (*slot)
        shard_remove(m, s, slot, &victims);
    n->chain = *slot;
    *slot = n;
    lru_push_head(s, n);
    s->count++;
    atomic_fetch_add_explicit(&m->count, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&m->bytes, charge, memory_order_relaxed);
    shard_evict(m, s, n, &victims);
    size_t buckets = s->mask + 1, count = s->count;
    pthread_mutex_unlock(&s->lock);
    free_victims(victims);
    evict_others(m, si);
    if (count > buckets)
        shard_grow(s, buckets);
    return true;
}

void cache_mem_put(cache_mem *m, const char *key, size_t key_len, cache_entry *e)
{
    put(m, key, key_len, e, false, 0);
}

bool cache_mem_put_since(cache_mem *m, const char *key, size_t key_len, cache_entry *e, uint64_t epoch)
{
    return put(m, key, key_len, e, true, epoch);
}

/* Take the next epoch for an invalidation of pattern (a glob, or one key when
 * literal). Before any shard is touched: see the file's comment. */
static void record_invalidation(cache_mem *m, const char *pattern, size_t len, bool literal)
{
    char *copy = malloc(len + 1);
    if (copy) {
        memcpy(copy, pattern, len);
        copy[len] = '\0';
    }
    pthread_mutex_lock(&m->ring_lock);
    uint64_t epoch = atomic_load_explicit(&m->epoch, memory_order_relaxed) + 1;
    mem_invalidation *slot = &m->ring[epoch % CACHE_MEM_RING];
    char *old = slot->pattern;
    slot->epoch = epoch;
    slot->pattern = copy;
    slot->len = len; /* out of memory for the copy: a NULL pattern matches every key */
    slot->literal = literal;
    atomic_store_explicit(&m->epoch, epoch, memory_order_release);
    pthread_mutex_unlock(&m->ring_lock);
    free(old);
}

bool cache_mem_delete(cache_mem *m, const char *key, size_t key_len)
{
    record_invalidation(m, key, key_len, true);
    return mem_remove_key(m, key, key_len);
}

/* The one key a literal pattern names: its escapes taken out. */
static size_t unescape_literal(const char *pattern, size_t len, char *out)
{
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (pattern[i] == '\\' && i + 1 < len)
            i++;
        out[n++] = pattern[i];
    }
    return n;
}

size_t cache_mem_delete_matching(cache_mem *m, const char *pattern, size_t pattern_len)
{
    record_invalidation(m, pattern, pattern_len, false);
    if (cache_glob_is_literal(pattern, pattern_len)) {
        char stack[256] = ""; /* (GCC cannot see that a 0-byte key is never read) */
        char *key = pattern_len <= sizeof stack ? stack : malloc(pattern_len);
        if (key) {
            size_t key_len = unescape_literal(pattern, pattern_len, key);
            bool found = mem_remove_key(m, key, key_len);
            if (key != stack)
                free(key);
            return found;
        }
    }
    size_t deleted = 0;
    for (size_t i = 0; i < CACHE_MEM_SHARDS; i++) {
        mem_shard *s = &m->shards[i];
        mem_node *victims = NULL;
        pthread_mutex_lock(&s->lock);
        for (mem_node *n = s->head, *next; n; n = next) {
            next = n->next;
            if (cache_glob_match(pattern, pattern_len, n->key, n->key_len)) {
                shard_remove(m, s, shard_slot(s, n->hash, n->key, n->key_len), &victims);
                deleted++;
            }
        }
        pthread_mutex_unlock(&s->lock);
        free_victims(victims);
    }
    return deleted;
}

uint64_t cache_mem_epoch(const cache_mem *m)
{
    return atomic_load_explicit(&m->epoch, memory_order_acquire);
}

bool cache_mem_invalidated_since(cache_mem *m, uint64_t epoch, const char *key, size_t key_len)
{
    if (atomic_load_explicit(&m->epoch, memory_order_acquire) == epoch)
        return false;
    bool hit = false;
    pthread_mutex_lock(&m->ring_lock);
    uint64_t now = atomic_load_explicit(&m->epoch, memory_order_relaxed);
    if (epoch > now || now - epoch > CACHE_MEM_RING) {
        hit = true; /* forgotten (or an epoch this store never gave) */
    } else {
        for (uint64_t e = epoch + 1; e <= now && !hit; e++) {
            const mem_invalidation *inv = &m->ring[e % CACHE_MEM_RING];
            if (!inv->pattern)
                hit = true;
            else if (inv->literal)
                hit = inv->len == key_len && memcmp(inv->pattern, key, key_len) == 0;
            else
                hit = cache_glob_match(inv->pattern, inv->len, key, key_len);
        }
    }
    pthread_mutex_unlock(&m->ring_lock);
    return hit;
}

size_t cache_mem_count(const cache_mem *m)
{
    return atomic_load_explicit(&m->count, memory_order_relaxed);
}

size_t cache_mem_bytes(const cache_mem *m)
{
    return atomic_load_explicit(&m->bytes, memory_order_relaxed);
}

/*
 * entry.c - cached answers and their serialized form (see entry.h).
 *
 * One malloc per entry: the struct, then the serialized blob; fields and
 * bodies point into the blob, so the bytes Redis holds and the bytes a hit
 * sends are the same bytes, and an entry is freed with one free(). Any
 * thread: entries are immutable once made, only the reference count moves.
 *
 * make and parse apply the same checks, so whatever make builds parses back,
 * and whatever parse accepts (from Redis, so from anyone who can write to it)
 * is an answer the gateway could have stored itself.
 */
#include "cache/entry.h"

#include <stdlib.h>
#include <string.h>

#define CACHE_ENTRY_MAGIC "GWC1"
#define CACHE_ENTRY_HEADER_BYTES (4 + 2 + 2 + 8 + 8 + 8 + 4 + 4 * CACHE_VARIANTS)
#define CACHE_ENTRY_KNOWN_FLAGS CACHE_ENTRY_VARY_AE
/* What the allocator keeps beside each block, charged so a store of many
 * small entries does not hold far more than its limit. */
#define CACHE_ENTRY_MALLOC_OVERHEAD 16

static void put_u16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put_i64(unsigned char *p, int64_t v)
{
    uint64_t u = (uint64_t)v;
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(u >> (8 * i));
}

static uint16_t get_u16(const unsigned char *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t get_u32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static int64_t get_i64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return (int64_t)v;
}

static bool is_tchar(unsigned char c)
{
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))
        return true;
    return c && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* "Name: value\r\n" lines and nothing else: a name that is an RFC 9110
 * token, a value without CR, LF or NUL. What a hit writes as headers. */
static bool fields_valid(const char *fields, size_t len)
{
    const unsigned char *p = (const unsigned char *)fields, *end = p + len;
    while (p < end) {
        const unsigned char *name = p;
        while (p < end && is_tchar(*p))
            p++;
        if (p == name || p == end || *p != ':')
            return false;
        p++;
        while (p < end && *p != '\r' && *p != '\n' && *p != '\0')
            p++;
        if (end - p < 2 || p[0] != '\r' || p[1] != '\n')
            return false;
        p += 2;
    }
    return true;
}

static bool parts_valid(int status, unsigned flags, int64_t fresh_ms, int64_t keep_ms)
{
    return status >= 100 && status <= 599 && (flags & ~(unsigned)CACHE_ENTRY_KNOWN_FLAGS) == 0 &&
           fresh_ms >= 0 && keep_ms >= fresh_ms;
}

/* Point the entry's fields and bodies into its blob (already filled). */
static void entry_wire(cache_entry *e, size_t fields_len, const size_t len[CACHE_VARIANTS])
{
    const char *p = e->blob + CACHE_ENTRY_HEADER_BYTES;
    e->fields = p;
    e->fields_len = fields_len;
    p += fields_len;
    for (int v = 0; v < CACHE_VARIANTS; v++) {
        /* A compressed variant of no bytes was not produced; identity always is. */
        e->body[v] = v == CACHE_IDENTITY || len[v] ? p : NULL;
        e->body_len[v] = len[v];
        p += len[v];
    }
}

static cache_entry *entry_alloc(size_t blob_len)
{
    cache_entry *e = malloc(sizeof *e + blob_len);
    if (!e)
        return NULL;
    atomic_init(&e->refs, 1);
    e->blob = (const char *)(e + 1);
    e->blob_len = blob_len;
    return e;
}

cache_entry *cache_entry_make(int status, unsigned flags, int64_t stored_ms, int64_t fresh_ms,
                              int64_t keep_ms, const char *fields, size_t fields_len,
                              const void *const body[CACHE_VARIANTS], const size_t body_len[CACHE_VARIANTS])
{
    if (!parts_valid(status, flags, fresh_ms, keep_ms) || fields_len > UINT32_MAX ||
        (fields_len && !fields) || !fields_valid(fields, fields_len))
        return NULL;
    size_t len[CACHE_VARIANTS];
    size_t total = CACHE_ENTRY_HEADER_BYTES + fields_len;
    for (int v = 0; v < CACHE_VARIANTS; v++) {
        len[v] = body[v] ? body_len[v] : 0;
        if (v == CACHE_IDENTITY && !body[v] && body_len[v])
            return NULL;
        if (len[v] > UINT32_MAX || total + len[v] < total)
            return NULL;
        total += len[v];
    }
    if (total > SIZE_MAX - sizeof(cache_entry))
        return NULL;
    cache_entry *e = entry_alloc(total);
    if (!e)
        return NULL;
    e->status = status;
    e->flags = flags;
    e->stored_ms = stored_ms;
    e->fresh_ms = fresh_ms;
    e->keep_ms = keep_ms;

    unsigned char *b = (unsigned char *)(e + 1);
    memcpy(b, CACHE_ENTRY_MAGIC, 4);
    put_u16(b + 4, (uint16_t)status);
    put_u16(b + 6, (uint16_t)flags);
    put_i64(b + 8, stored_ms);
    put_i64(b + 16, fresh_ms);
    put_i64(b + 24, keep_ms);
    put_u32(b + 32, (uint32_t)fields_len);
    for (int v = 0; v < CACHE_VARIANTS; v++)
        put_u32(b + 36 + 4 * v, (uint32_t)len[v]);
    unsigned char *p = b + CACHE_ENTRY_HEADER_BYTES;
    if (fields_len)
        memcpy(p, fields, fields_len);
    p += fields_len;
    for (int v = 0; v < CACHE_VARIANTS; v++) {
        if (len[v])
            memcpy(p, body[v], len[v]);
        p += len[v];
    }
    entry_wire(e, fields_len, len);
    return e;
}

cache_entry *cache_entry_parse(const void *blob, size_t len)
{
    const unsigned char *b = blob;
    if (!b || len < CACHE_ENTRY_HEADER_BYTES || memcmp(b, CACHE_ENTRY_MAGIC, 4) != 0)
        return NULL;
    int status = get_u16(b + 4);
    unsigned flags = get_u16(b + 6);
    int64_t stored_ms = get_i64(b + 8), fresh_ms = get_i64(b + 16), keep_ms = get_i64(b + 24);
    if (!parts_valid(status, flags, fresh_ms, keep_ms))
        return NULL;
    /* Four u32 lengths sum to under 2^34: no overflow in 64 bits. */
    uint64_t fields_len = get_u32(b + 32), total = CACHE_ENTRY_HEADER_BYTES + fields_len;
    size_t body_len[CACHE_VARIANTS];
    for (int v = 0; v < CACHE_VARIANTS; v++) {
        body_len[v] = get_u32(b + 36 + 4 * v);
        total += body_len[v];
    }
    if (total != len)
        return NULL;
    if (!fields_valid((const char *)b + CACHE_ENTRY_HEADER_BYTES, (size_t)fields_len))
        return NULL;
    cache_entry *e = entry_alloc(len);
    if (!e)
        return NULL;
    memcpy(e + 1, b, len);
    e->status = status;
    e->flags = flags;
    e->stored_ms = stored_ms;
    e->fresh_ms = fresh_ms;
    e->keep_ms = keep_ms;
    entry_wire(e, (size_t)fields_len, body_len);
    return e;
}

void cache_entry_ref(cache_entry *e)
{
    atomic_fetch_add_explicit(&e->refs, 1, memory_order_relaxed);
}

void cache_entry_unref(cache_entry *e)
{
    if (!e)
        return;
    unsigned before = atomic_fetch_sub_explicit(&e->refs, 1, memory_order_acq_rel);
    if (before == 0)
        abort(); /* a reference dropped twice */
    if (before == 1)
        free(e);
}

size_t cache_entry_size(const cache_entry *e)
{
    /* The block rounded up to the allocator's 16-byte granule, plus its header. */
    size_t block = sizeof *e + e->blob_len;
    return ((block + 15) & ~(size_t)15) + CACHE_ENTRY_MALLOC_OVERHEAD;
}

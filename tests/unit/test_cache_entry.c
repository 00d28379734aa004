/*
 * test_cache_entry.c - cached entries of cache/entry.h: the serialized form
 * byte by byte, make/parse round trips, every way a blob can be corrupt
 * (each truncation, each length off by one, bad magic, status, times,
 * flags, fields), random corruption, and the atomic reference count.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cache/entry.h"

#define HEADER_BYTES 48

static const char FIELDS[] = "Content-Type: application/json\r\nETag: \"abc\"\r\n";

static cache_entry *make_sample(void)
{
    const void *body[CACHE_VARIANTS] = {"{\"a\":1}", "GZ", "BROT"};
    const size_t len[CACHE_VARIANTS] = {7, 2, 4};
    return cache_entry_make(200, CACHE_ENTRY_VARY_AE, 1700000000123LL, 300000, 310000, FIELDS, strlen(FIELDS),
                            body, len);
}

static void put_le(unsigned char *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* ---- the serialized form ----------------------------------------------------------------- */

static void test_blob_layout(void **state)
{
    (void)state;
    const void *body[CACHE_VARIANTS] = {"hi", NULL, NULL};
    const size_t len[CACHE_VARIANTS] = {2, 0, 0};
    cache_entry *e =
        cache_entry_make(404, 0, -2, 0x0102030405060708LL, 0x0102030405060709LL, "A: b\r\n", 6, body, len);
    assert_non_null(e);
    unsigned char want[HEADER_BYTES + 8];
    memcpy(want, "GWC1", 4);
    put_le(want + 4, 404, 2);
    put_le(want + 6, 0, 2);
    put_le(want + 8, (uint64_t)-2, 8);
    put_le(want + 16, 0x0102030405060708ULL, 8);
    put_le(want + 24, 0x0102030405060709ULL, 8);
    put_le(want + 32, 6, 4);
    put_le(want + 36, 2, 4);
    put_le(want + 40, 0, 4);
    put_le(want + 44, 0, 4);
    memcpy(want + 48, "A: b\r\nhi", 8);
    assert_int_equal(e->blob_len, sizeof want);
    assert_memory_equal(e->blob, want, sizeof want);
    assert_int_equal(atomic_load(&e->refs), 1);
    /* It parses back from exactly those bytes. */
    cache_entry *p = cache_entry_parse(want, sizeof want);
    assert_non_null(p);
    assert_int_equal(p->status, 404);
    assert_int_equal(p->stored_ms, -2);
    assert_int_equal(p->keep_ms, 0x0102030405060709LL);
    cache_entry_unref(p);
    cache_entry_unref(e);
}

static void assert_same_entry(const cache_entry *a, const cache_entry *b)
{
    assert_int_equal(a->status, b->status);
    assert_int_equal(a->flags, b->flags);
    assert_int_equal(a->stored_ms, b->stored_ms);
    assert_int_equal(a->fresh_ms, b->fresh_ms);
    assert_int_equal(a->keep_ms, b->keep_ms);
    assert_int_equal(a->fields_len, b->fields_len);
    assert_memory_equal(a->fields, b->fields, a->fields_len);
    for (int v = 0; v < CACHE_VARIANTS; v++) {
        assert_int_equal(a->body_len[v], b->body_len[v]);
        assert_int_equal(a->body[v] == NULL, b->body[v] == NULL);
        if (a->body[v] && a->body_len[v])
            assert_memory_equal(a->body[v], b->body[v], a->body_len[v]);
    }
    assert_int_equal(a->blob_len, b->blob_len);
    assert_memory_equal(a->blob, b->blob, a->blob_len);
}

/* Every pointer of e lies inside its own blob, which follows the struct. */
static void assert_points_into_blob(const cache_entry *e)
{
    const char *lo = e->blob, *hi = e->blob + e->blob_len;
    assert_ptr_equal(e->blob, (const char *)(e + 1));
    assert_true(e->fields >= lo && e->fields + e->fields_len <= hi);
    for (int v = 0; v < CACHE_VARIANTS; v++) {
        if (e->body[v])
            assert_true(e->body[v] >= lo && e->body[v] + e->body_len[v] <= hi);
    }
}

static void test_round_trip(void **state)
{
    (void)state;
    cache_entry *e = make_sample();
    assert_non_null(e);
    assert_int_equal(e->status, 200);
    assert_int_equal(e->flags, CACHE_ENTRY_VARY_AE);
    assert_int_equal(e->fields_len, strlen(FIELDS));
    assert_memory_equal(e->fields, FIELDS, strlen(FIELDS));
    assert_memory_equal(e->body[CACHE_IDENTITY], "{\"a\":1}", 7);
    assert_memory_equal(e->body[CACHE_GZIP], "GZ", 2);
    assert_memory_equal(e->body[CACHE_BR], "BROT", 4);
    assert_int_equal(e->blob_len, HEADER_BYTES + strlen(FIELDS) + 13);
    assert_points_into_blob(e);

    cache_entry *p = cache_entry_parse(e->blob, e->blob_len);
    assert_non_null(p);
    assert_ptr_not_equal(p->blob, e->blob); /* copied */
    assert_same_entry(e, p);
    assert_points_into_blob(p);
    assert_int_equal(cache_entry_size(p), cache_entry_size(e));
    cache_entry_unref(p);
    cache_entry_unref(e);
}

static void test_variants_not_produced(void **state)
{
    (void)state;
    /* Identity NULL of length 0; gzip absent; br "produced" with 0 bytes. */
    const void *body[CACHE_VARIANTS] = {NULL, NULL, "x"};
    const size_t len[CACHE_VARIANTS] = {0, 99, 0};
    cache_entry *e = cache_entry_make(204, 0, 0, 0, 0, NULL, 0, body, len);
    assert_non_null(e);
    assert_non_null(e->body[CACHE_IDENTITY]);
    assert_int_equal(e->body_len[CACHE_IDENTITY], 0);
    assert_null(e->body[CACHE_GZIP]);
    assert_int_equal(e->body_len[CACHE_GZIP], 0);
    assert_null(e->body[CACHE_BR]);
    assert_int_equal(e->fields_len, 0);
    assert_int_equal(e->blob_len, HEADER_BYTES);
    cache_entry *p = cache_entry_parse(e->blob, e->blob_len);
    assert_non_null(p);
    assert_same_entry(e, p);
    cache_entry_unref(p);
    cache_entry_unref(e);

    /* A body larger than a few bytes, identity only. */
    size_t big = 1 << 20;
    char *data = malloc(big);
    assert_non_null(data);
    for (size_t i = 0; i < big; i++)
        data[i] = (char)(i * 31 + 7);
    const void *b2[CACHE_VARIANTS] = {data, NULL, NULL};
    const size_t l2[CACHE_VARIANTS] = {big, 0, 0};
    e = cache_entry_make(200, 0, 5, 10, 20, "X: y\r\n", 6, b2, l2);
    assert_non_null(e);
    assert_true(cache_entry_size(e) >= sizeof *e + e->blob_len);
    p = cache_entry_parse(e->blob, e->blob_len);
    assert_non_null(p);
    assert_same_entry(e, p);
    cache_entry_unref(p);
    cache_entry_unref(e);
    free(data);
}

static void test_make_rejects(void **state)
{
    (void)state;
    const void *body[CACHE_VARIANTS] = {"b", NULL, NULL};
    const size_t len[CACHE_VARIANTS] = {1, 0, 0};
    const void *nobody[CACHE_VARIANTS] = {NULL, NULL, NULL};
    const size_t somelen[CACHE_VARIANTS] = {3, 0, 0};
#define MAKE(status, flags, fresh, keep, f)                                                                  \
    cache_entry_make(status, flags, 0, fresh, keep, f, strlen(f), body, len)
    assert_null(MAKE(99, 0, 0, 0, ""));
    assert_null(MAKE(600, 0, 0, 0, ""));
    assert_null(MAKE(-200, 0, 0, 0, ""));
    assert_null(MAKE(200, 2, 0, 0, ""));
    assert_null(MAKE(200, 0x10000 | 1, 0, 0, ""));
    assert_null(MAKE(200, 0, -1, 0, ""));
    assert_null(MAKE(200, 0, 10, 9, ""));
    assert_null(MAKE(200, 0, 0, -1, ""));
    assert_null(MAKE(200, 0, 0, 0, "no colon\r\n"));
    assert_null(MAKE(200, 0, 0, 0, ": empty name\r\n"));
    assert_null(MAKE(200, 0, 0, 0, "Sp ace: v\r\n"));
    assert_null(MAKE(200, 0, 0, 0, "A: v\n"));
    assert_null(MAKE(200, 0, 0, 0, "A: v"));
    assert_null(MAKE(200, 0, 0, 0, "A: v\r"));
    assert_null(MAKE(200, 0, 0, 0, "A: v\rw\r\n"));
    assert_null(MAKE(200, 0, 0, 0, "A: v\nw\r\n"));
    assert_null(MAKE(200, 0, 0, 0, "A: v\r\n\r\n"));
    assert_null(cache_entry_make(200, 0, 0, 0, 0, "A: \0\r\n", 6, body, len));
    assert_null(cache_entry_make(200, 0, 0, 0, 0, NULL, 4, body, len));
    assert_null(cache_entry_make(200, 0, 0, 0, 0, "", 0, nobody, somelen));
    /* Just inside the limits. */
    cache_entry *ok[] = {MAKE(100, 0, 0, 0, ""), MAKE(599, 1, 7, 7, "A:\r\n"),
                         MAKE(200, 0, 0, 0, "X-Weird_!#$%&'*+-.^`|~: \t\x80\xff v\r\nB: \r\n")};
    for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) {
        assert_non_null(ok[i]);
        cache_entry *p = cache_entry_parse(ok[i]->blob, ok[i]->blob_len);
        assert_non_null(p);
        cache_entry_unref(p);
        cache_entry_unref(ok[i]);
    }
#undef MAKE
}

/* ---- corrupt blobs ----------------------------------------------------------------------- */

/* A copy of e's blob with n bytes, extra zero bytes past the original. */
static unsigned char *blob_copy(const cache_entry *e, size_t n)
{
    unsigned char *b = calloc(1, n ? n : 1);
    assert_non_null(b);
    memcpy(b, e->blob, n < e->blob_len ? n : e->blob_len);
    return b;
}

static void assert_parse_fails(const unsigned char *b, size_t n)
{
    cache_entry *p = cache_entry_parse(b, n);
    if (p) {
        cache_entry_unref(p);
        fail_msg("a corrupt blob of %zu bytes parsed", n);
    }
}

static void test_parse_truncations(void **state)
{
    (void)state;
    cache_entry *e = make_sample();
    assert_non_null(e);
    /* Every strict prefix: exactly-sized heap copies, so ASan sees any overread. */
    for (size_t n = 0; n < e->blob_len; n++) {
        unsigned char *b = blob_copy(e, n);
        assert_parse_fails(b, n);
        free(b);
    }
    /* One byte more, or many. */
    unsigned char *b = blob_copy(e, e->blob_len + 1);
    assert_parse_fails(b, e->blob_len + 1);
    free(b);
    b = blob_copy(e, e->blob_len + 4096);
    assert_parse_fails(b, e->blob_len + 4096);
    free(b);
    assert_null(cache_entry_parse(NULL, 0));
    assert_null(cache_entry_parse(NULL, 100));
    cache_entry_unref(e);
}

static void test_parse_bad_header(void **state)
{
    (void)state;
    cache_entry *e = make_sample();
    size_t n = e->blob_len;
    unsigned char *b = blob_copy(e, n);
    cache_entry *p = cache_entry_parse(b, n);
    assert_non_null(p); /* the unmodified copy parses */
    cache_entry_unref(p);

    /* Magic: every byte. */
    for (int i = 0; i < 4; i++) {
        b[i] ^= 0x20;
        assert_parse_fails(b, n);
        b[i] ^= 0x20;
    }
    /* Status outside 100..599. */
    static const uint16_t statuses[] = {0, 99, 600, 65535};
    for (size_t i = 0; i < sizeof statuses / sizeof *statuses; i++) {
        put_le(b + 4, statuses[i], 2);
        assert_parse_fails(b, n);
    }
    put_le(b + 4, 200, 2);
    /* Unknown flags. */
    put_le(b + 6, 2, 2);
    assert_parse_fails(b, n);
    put_le(b + 6, 0x8001, 2);
    assert_parse_fails(b, n);
    put_le(b + 6, 1, 2);
    /* fresh < 0, keep < fresh. */
    put_le(b + 16, (uint64_t)-1, 8);
    put_le(b + 24, 0, 8);
    assert_parse_fails(b, n);
    put_le(b + 16, 100, 8);
    put_le(b + 24, 99, 8);
    assert_parse_fails(b, n);
    put_le(b + 24, (uint64_t)INT64_MIN, 8);
    assert_parse_fails(b, n);
    put_le(b + 24, 100, 8);
    p = cache_entry_parse(b, n);
    assert_non_null(p); /* keep == fresh is fine */
    cache_entry_unref(p);
    free(b);
    cache_entry_unref(e);
}

static void test_parse_bad_lengths(void **state)
{
    (void)state;
    cache_entry *e = make_sample();
    size_t n = e->blob_len;
    unsigned char *b = blob_copy(e, n);
    /* Each of the four lengths one more, one less, huge: the total no longer
     * adds up (or, moving bytes between two lengths, the fields break). */
    for (int f = 0; f < 4; f++) {
        unsigned char *at = b + 32 + 4 * f;
        uint32_t orig = (uint32_t)(at[0] | at[1] << 8 | at[2] << 16 | (uint32_t)at[3] << 24);
        uint32_t bad[] = {orig + 1, orig - 1, 0xffffffffu, 0x80000000u, orig + (uint32_t)n};
        for (size_t k = 0; k < sizeof bad / sizeof *bad; k++) {
            if (bad[k] == orig)
                continue;
            put_le(at, bad[k], 4);
            assert_parse_fails(b, n);
        }
        put_le(at, orig, 4);
    }
    /* All of them at 0xffffffff: 64-bit sums, no wrap to a valid length. */
    for (int f = 0; f < 4; f++)
        put_le(b + 32 + 4 * f, 0xffffffffu, 4);
    assert_parse_fails(b, n);
    free(b);

    /* Lengths that add up but cut the fields mid-line. */
    b = blob_copy(e, n);
    uint32_t fl = (uint32_t)strlen(FIELDS);
    put_le(b + 32, fl - 1, 4);
    put_le(b + 36, 8, 4);
    assert_parse_fails(b, n);
    put_le(b + 32, fl + 1, 4);
    put_le(b + 36, 6, 4);
    assert_parse_fails(b, n);
    free(b);

    /* A CR, LF or NUL inside a field value. */
    static const char bad_bytes[] = {'\r', '\n', '\0'};
    for (size_t k = 0; k < sizeof bad_bytes; k++) {
        b = blob_copy(e, n);
        b[HEADER_BYTES + 16] = (unsigned char)bad_bytes[k]; /* inside "application/json" */
        assert_parse_fails(b, n);
        free(b);
    }
    cache_entry_unref(e);
}

/* Random bit flips and byte writes: parse either refuses or yields an entry
 * that satisfies every documented invariant; never crashes. */
static void test_parse_random_corruption(void **state)
{
    (void)state;
    cache_entry *e = make_sample();
    size_t n = e->blob_len;
    uint64_t x = 88172645463325252ULL;
    int parsed = 0;
    for (int iter = 0; iter < 20000; iter++) {
        unsigned char *b = blob_copy(e, n);
        int flips = 1 + iter % 4;
        for (int f = 0; f < flips; f++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            size_t at = (x >> 8) % n;
            if (x & 1)
                b[at] ^= (unsigned char)(1u << ((x >> 1) % 8));
            else
                b[at] = (unsigned char)(x >> 40);
        }
        cache_entry *p = cache_entry_parse(b, n);
        if (p) {
            parsed++;
            assert_true(p->status >= 100 && p->status <= 599);
            assert_true(p->fresh_ms >= 0 && p->keep_ms >= p->fresh_ms);
            assert_int_equal(p->flags & ~1u, 0);
            size_t sum = HEADER_BYTES + p->fields_len;
            for (int v = 0; v < CACHE_VARIANTS; v++)
                sum += p->body_len[v];
            assert_int_equal(sum, n);
            assert_memory_equal(p->blob, b, n);
            assert_points_into_blob(p);
            cache_entry_unref(p);
        }
        free(b);
    }
    /* Flips in the bodies or the times leave a valid entry. */
    assert_true(parsed > 0);
    cache_entry_unref(e);
}

/* ---- references -------------------------------------------------------------------------- */

static void test_refcount(void **state)
{
    (void)state;
    cache_entry *e = make_sample();
    cache_entry_ref(e);
    cache_entry_ref(e);
    assert_int_equal(atomic_load(&e->refs), 3);
    cache_entry_unref(e);
    cache_entry_unref(e);
    assert_int_equal(atomic_load(&e->refs), 1);
    assert_memory_equal(e->body[CACHE_IDENTITY], "{\"a\":1}", 7);
    cache_entry_unref(e); /* freed: ASan reports a leak otherwise */
    cache_entry_unref(NULL);
}

#define REF_THREADS 4
#define REF_ROUNDS 200000

static void *ref_worker(void *arg)
{
    cache_entry *e = arg;
    for (int i = 0; i < REF_ROUNDS; i++) {
        cache_entry_ref(e);
        if (e->body[CACHE_IDENTITY][0] != '{')
            abort();
        cache_entry_unref(e);
    }
    cache_entry_unref(e); /* the reference the thread was given */
    return NULL;
}

static void test_refcount_threads(void **state)
{
    (void)state;
    cache_entry *e = make_sample();
    pthread_t th[REF_THREADS];
    for (int i = 0; i < REF_THREADS; i++)
        cache_entry_ref(e);
    for (int i = 0; i < REF_THREADS; i++)
        assert_int_equal(pthread_create(&th[i], NULL, ref_worker, e), 0);
    for (int i = 0; i < REF_THREADS; i++)
        pthread_join(th[i], NULL);
    assert_int_equal(atomic_load(&e->refs), 1);
    cache_entry_unref(e);
}

static void test_size(void **state)
{
    (void)state;
    const void *body[CACHE_VARIANTS] = {"", NULL, NULL};
    size_t len[CACHE_VARIANTS] = {0, 0, 0};
    cache_entry *small = cache_entry_make(200, 0, 0, 0, 0, NULL, 0, body, len);
    char data[1000] = {0};
    body[0] = data;
    len[0] = sizeof data;
    cache_entry *big = cache_entry_make(200, 0, 0, 0, 0, NULL, 0, body, len);
    assert_true(cache_entry_size(small) >= sizeof(cache_entry) + HEADER_BYTES);
    assert_true(cache_entry_size(big) >= sizeof(cache_entry) + HEADER_BYTES + sizeof data);
    assert_true(cache_entry_size(big) - cache_entry_size(small) + 16 > sizeof data); /* rounding */
    /* An estimate, not a multiple of it. */
    assert_true(cache_entry_size(big) < sizeof(cache_entry) + HEADER_BYTES + sizeof data + 64);
    cache_entry_unref(small);
    cache_entry_unref(big);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_blob_layout),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_variants_not_produced),
        cmocka_unit_test(test_make_rejects),
        cmocka_unit_test(test_parse_truncations),
        cmocka_unit_test(test_parse_bad_header),
        cmocka_unit_test(test_parse_bad_lengths),
        cmocka_unit_test(test_parse_random_corruption),
        cmocka_unit_test(test_refcount),
        cmocka_unit_test(test_refcount_threads),
        cmocka_unit_test(test_size),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

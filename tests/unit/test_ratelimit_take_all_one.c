/*
 * test_ratelimit_take_all_one.c - rl_local_take_all with one policy (most
 * routes, which it decides without the all-or-nothing machinery) gives
 * exactly what rl_local_take gives: the same decisions, field by field, on
 * two tables fed the same requests, through bursts, refusals, keys coming
 * back after their TAT passed and takeovers in a table too small for its
 * keys. A dry-run policy alone is charged the same and never refuses.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "ratelimit/ratelimit.h"

#define MS 1000000ULL
#define SEC (1000 * MS)
#define T0 (1000 * SEC) /* an arbitrary monotonic "now"; 0 would mean "no TAT" */
#define REQUESTS 200000
#define KEYS 300 /* more than the table's 64 slots: takeovers */

static uint64_t next_random(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

static void assert_same_decision(const rl_decision *a, const rl_decision *b, size_t req)
{
    if (a->allowed != b->allowed || a->no_room != b->no_room || a->other_refused != b->other_refused ||
        a->limit != b->limit || a->remaining != b->remaining || a->reset_ms != b->reset_ms ||
        a->retry_after_ms != b->retry_after_ms || a->stored_tat != b->stored_tat)
        fail_msg("request %zu: take_all allowed %d no_room %d remaining %lld reset %lld retry %lld tat %llu; "
                 "take allowed %d no_room %d remaining %lld reset %lld retry %lld tat %llu",
                 req, a->allowed, a->no_room, (long long)a->remaining, (long long)a->reset_ms,
                 (long long)a->retry_after_ms, (unsigned long long)a->stored_tat, b->allowed, b->no_room,
                 (long long)b->remaining, (long long)b->reset_ms, (long long)b->retry_after_ms,
                 (unsigned long long)b->stored_tat);
}

/* The same random requests (key, time, limit) against two tables. */
static void same_as_take(bool dry_run)
{
    rl_local *all = rl_local_create(64), *one = rl_local_create(64);
    assert_non_null(all);
    assert_non_null(one);
    uint64_t x = dry_run ? 0x9e3779b97f4a7c15ULL : 0x243f6a8885a308d3ULL, now = T0;
    size_t allowed = 0, refused = 0, no_room = 0;
    for (size_t i = 0; i < REQUESTS; i++) {
        uint64_t r = next_random(&x);
        uint64_t key = 1 + (r & 1 ? (r >> 8) % 4 : r % KEYS); /* half on a few hot keys: refusals */
        int64_t limit = key % 2 ? 5 : 3;                      /* a key keeps its limit */
        now += (r >> 32) % (2 * MS);                          /* 1 ms on average: more keys live than slots */
        rl_local_policy p = {key, limit, 1000, dry_run};
        rl_decision da, db;
        bool go = rl_local_take_all(all, &p, 1, now, &da);
        rl_local_take(one, key, now, limit, 1000, &db);
        assert_same_decision(&da, &db, i);
        assert_int_equal(go, dry_run ? true : db.allowed);
        allowed += db.allowed;
        refused += !db.allowed;
        no_room += db.no_room;
    }
    /* The sequence went through every case it is meant to cover. */
    assert_true(allowed > REQUESTS / 10);
    assert_true(refused > REQUESTS / 10);
    assert_true(no_room > 0);
    rl_local_free(all);
    rl_local_free(one);
}

static void test_take_all_one_enforced_same_as_take(void **state)
{
    (void)state;
    same_as_take(false);
}

static void test_take_all_one_dry_run_same_as_take(void **state)
{
    (void)state;
    same_as_take(true);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_take_all_one_enforced_same_as_take),
        cmocka_unit_test(test_take_all_one_dry_run_same_as_take),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * test_config_values.c - unit tests of config/values.c and the loader's word helpers:
 * ${VAR} expansion, durations, sizes, integers, booleans, numbers, their formatting
 * back to text, and the edit distance behind "did you mean".
 *
 * Single-threaded cmocka program. The one idea: each parser is checked on exact
 * values at every unit and on the edges where it must refuse (junk, overflow,
 * fractions of the base unit), so a change of behaviour fails a test.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "config/config_internal.h"

/* ---- ${VAR} ---- */

static void expect_expansion(const char *text, const char *want)
{
    char *out = NULL, detail[64];

    assert_int_equal(config_env_expand(text, &out, detail, sizeof detail), CONFIG_ENV_OK);
    assert_non_null(out);
    assert_string_equal(out, want);
    free(out);
}

static void expect_expansion_error(const char *text, config_env_status want, const char *want_detail)
{
    char *out = (char *)"untouched", detail[64];

    assert_int_equal(config_env_expand(text, &out, detail, sizeof detail), want);
    assert_null(out);
    assert_string_equal(detail, want_detail);
}

static void test_env_set_and_default(void **state)
{
    (void)state;
    setenv("GW_T_HOST", "db.internal", 1);
    unsetenv("GW_T_UNSET");
    expect_expansion("${GW_T_HOST}", "db.internal");
    expect_expansion("${GW_T_HOST:-127.0.0.1}", "db.internal");
    expect_expansion("${GW_T_UNSET:-127.0.0.1}", "127.0.0.1");
    expect_expansion("no variables at all", "no variables at all");
    expect_expansion("", "");
}

static void test_env_empty_values(void **state)
{
    (void)state;
    setenv("GW_T_EMPTY", "", 1);
    unsetenv("GW_T_UNSET");
    /* ${X} set to "" is "", but ${X:-d} takes the default for "" as the shell does. */
    expect_expansion("[${GW_T_EMPTY}]", "[]");
    expect_expansion("${GW_T_EMPTY:-fallback}", "fallback");
    expect_expansion("${GW_T_UNSET:-}", "");
    expect_expansion("a${GW_T_UNSET:-}b", "ab");
}

static void test_env_several_in_one_scalar(void **state)
{
    (void)state;
    setenv("GW_T_HOST", "cache", 1);
    setenv("GW_T_PORT", "6380", 1);
    unsetenv("GW_T_UNSET");
    expect_expansion("redis://${GW_T_HOST}:${GW_T_PORT}/${GW_T_UNSET:-0}", "redis://cache:6380/0");
    /* A value is inserted as it is: it is not expanded again. */
    setenv("GW_T_NESTED", "${GW_T_HOST}", 1);
    expect_expansion("${GW_T_NESTED}", "${GW_T_HOST}");
}

static void test_env_dollars_that_are_not_variables(void **state)
{
    (void)state;
    expect_expansion("where p.id = $1 and $2", "where p.id = $1 and $2");
    expect_expansion("$$", "$$");
    expect_expansion("cost: 5$", "cost: 5$");
    expect_expansion("$${GW_T_HOST}", "${GW_T_HOST}");
    expect_expansion("a}b", "a}b");
}

static void test_env_errors(void **state)
{
    (void)state;
    unsetenv("GW_T_UNSET");
    expect_expansion_error("${GW_T_UNSET}", CONFIG_ENV_UNSET, "GW_T_UNSET");
    expect_expansion_error("x ${GW_T_UNSET} y", CONFIG_ENV_UNSET, "GW_T_UNSET");
    expect_expansion_error("${GW_T_HOST", CONFIG_ENV_UNTERMINATED, "${GW_T_HOST");
    expect_expansion_error("ok ${GW_T_HOST:-x", CONFIG_ENV_UNTERMINATED, "${GW_T_HOST:-x");
    expect_expansion_error("${1ABC}", CONFIG_ENV_BAD_NAME, "${1ABC}");
    expect_expansion_error("${}", CONFIG_ENV_BAD_NAME, "${}");
    expect_expansion_error("${A B}", CONFIG_ENV_BAD_NAME, "${A B}");
    expect_expansion_error("${A:default}", CONFIG_ENV_BAD_NAME, "${A:default}");
}

/* A name longer than any buffer, in both forms: an error, never an overflow. */
static void test_env_overlong_names(void **state)
{
    (void)state;
    static char text[6000];
    char *out = NULL, detail[64];
    const char *const tails[] = {":-127.0.0.1:1}", "}"};
    for (size_t t = 0; t < 2; t++) {
        size_t n = 0;
        n += (size_t)snprintf(text, sizeof text, "${");
        memset(text + n, 'A', 5000);
        n += 5000;
        snprintf(text + n, sizeof text - n, "%s", tails[t]);
        assert_int_equal(config_env_expand(text, &out, detail, sizeof detail), CONFIG_ENV_BAD_NAME);
        assert_null(out);
    }
}

/* ---- Durations ---- */

static void expect_duration(const char *text, int64_t want)
{
    int64_t ms = -12345;

    assert_int_equal(config_parse_duration(text, &ms), CONFIG_PARSE_OK);
    assert_int_equal(ms, want);
}

static void expect_duration_status(const char *text, config_parse_status want)
{
    int64_t ms = -12345;

    assert_int_equal(config_parse_duration(text, &ms), want);
    assert_int_equal(ms, -12345);
}

static void test_duration_units(void **state)
{
    (void)state;
    expect_duration("250ms", 250);
    expect_duration("5s", 5000);
    expect_duration("10m", 600000);
    expect_duration("1h", 3600000);
    expect_duration("3600s", 3600000);
    expect_duration("0", 0);
    expect_duration("0s", 0);
    expect_duration("0.0", 0);
}

static void test_duration_decimals(void **state)
{
    (void)state;
    expect_duration("1.5s", 1500);
    expect_duration("0.25s", 250);
    expect_duration("1.5m", 90000);
    expect_duration("0.5h", 1800000);
    expect_duration("2.000s", 2000);
    expect_duration("1.0010000000000s", 1001);
    expect_duration_status("0.5ms", CONFIG_PARSE_FRACTION);
    expect_duration_status("1.0005s", CONFIG_PARSE_FRACTION);
    expect_duration_status("1.0000000001s", CONFIG_PARSE_FRACTION);
}

static void test_duration_junk(void **state)
{
    (void)state;
    expect_duration_status("fast", CONFIG_PARSE_SYNTAX);
    expect_duration_status("5", CONFIG_PARSE_SYNTAX); /* a bare number is only allowed for 0 */
    expect_duration_status("1.5", CONFIG_PARSE_SYNTAX);
    expect_duration_status("", CONFIG_PARSE_SYNTAX);
    expect_duration_status("s", CONFIG_PARSE_SYNTAX);
    expect_duration_status("-1s", CONFIG_PARSE_SYNTAX);
    expect_duration_status("5 s", CONFIG_PARSE_SYNTAX);
    expect_duration_status(" 5s", CONFIG_PARSE_SYNTAX);
    expect_duration_status("5S", CONFIG_PARSE_SYNTAX);
    expect_duration_status("5sec", CONFIG_PARSE_SYNTAX);
    expect_duration_status("1d", CONFIG_PARSE_SYNTAX);
    expect_duration_status("1h30m", CONFIG_PARSE_SYNTAX);
    expect_duration_status(".5s", CONFIG_PARSE_SYNTAX);
    expect_duration_status("5.s", CONFIG_PARSE_SYNTAX);
}

static void test_duration_overflow(void **state)
{
    (void)state;
    /* INT64_MAX ms is 2562047788015.2 hours. */
    expect_duration("2562047788015h", INT64_C(2562047788015) * 3600000);
    expect_duration_status("2562047788016h", CONFIG_PARSE_RANGE);
    expect_duration_status("9223372036854775808ms", CONFIG_PARSE_RANGE);
    expect_duration_status("99999999999999999999999s", CONFIG_PARSE_RANGE);
    expect_duration("9223372036854775807ms", INT64_MAX);
}

/* ---- Sizes ---- */

static void expect_size(const char *text, int64_t want)
{
    int64_t bytes = -12345;

    assert_int_equal(config_parse_size(text, &bytes), CONFIG_PARSE_OK);
    assert_int_equal(bytes, want);
}

static void expect_size_status(const char *text, config_parse_status want)
{
    int64_t bytes = -12345;

    assert_int_equal(config_parse_size(text, &bytes), want);
    assert_int_equal(bytes, -12345);
}

static void test_size_units(void **state)
{
    (void)state;
    expect_size("0", 0);
    expect_size("512", 512);
    expect_size("512B", 512);
    expect_size("16KiB", 16384);
    expect_size("10MiB", 10485760);
    expect_size("1GiB", INT64_C(1073741824));
    expect_size("1TiB", INT64_C(1099511627776));
    expect_size("1KB", 1000);
    expect_size("10MB", 10000000);
    expect_size("2GB", INT64_C(2000000000));
    expect_size("1TB", INT64_C(1000000000000));
}

static void test_size_decimals(void **state)
{
    (void)state;
    expect_size("1.5KiB", 1536);
    expect_size("0.5MiB", 524288);
    expect_size("2.5KB", 2500);
    expect_size("1.0", 1);
    expect_size_status("0.1KiB", CONFIG_PARSE_FRACTION);
    expect_size_status("1.5", CONFIG_PARSE_FRACTION);
    expect_size_status("1.5B", CONFIG_PARSE_FRACTION);
}

static void test_size_junk_and_overflow(void **state)
{
    (void)state;
    expect_size_status("big", CONFIG_PARSE_SYNTAX);
    expect_size_status("16kib", CONFIG_PARSE_SYNTAX);
    expect_size_status("16K", CONFIG_PARSE_SYNTAX);
    expect_size_status("16k", CONFIG_PARSE_SYNTAX);
    expect_size_status("16 KiB", CONFIG_PARSE_SYNTAX);
    expect_size_status("-1", CONFIG_PARSE_SYNTAX);
    expect_size_status("", CONFIG_PARSE_SYNTAX);
    expect_size_status("KiB", CONFIG_PARSE_SYNTAX);
    expect_size("9223372036854775807", INT64_MAX);
    expect_size_status("9223372036854775808", CONFIG_PARSE_RANGE);
    expect_size("8388607TiB", INT64_C(8388607) * INT64_C(1099511627776));
    expect_size_status("8388608TiB", CONFIG_PARSE_RANGE);
}

/* ---- Integers, booleans, numbers ---- */

static void test_int(void **state)
{
    int64_t v = 7;

    (void)state;
    assert_int_equal(config_parse_int("0", &v), CONFIG_PARSE_OK);
    assert_int_equal(v, 0);
    assert_int_equal(config_parse_int("-5", &v), CONFIG_PARSE_OK);
    assert_int_equal(v, -5);
    assert_int_equal(config_parse_int("1000000", &v), CONFIG_PARSE_OK);
    assert_int_equal(v, 1000000);
    assert_int_equal(config_parse_int("9223372036854775807", &v), CONFIG_PARSE_OK);
    assert_true(v == INT64_MAX);
    assert_int_equal(config_parse_int("-9223372036854775808", &v), CONFIG_PARSE_OK);
    assert_true(v == INT64_MIN);
    v = 7;
    assert_int_equal(config_parse_int("9223372036854775808", &v), CONFIG_PARSE_RANGE);
    assert_int_equal(config_parse_int("-9223372036854775809", &v), CONFIG_PARSE_RANGE);
    assert_int_equal(config_parse_int("lots", &v), CONFIG_PARSE_SYNTAX);
    assert_int_equal(config_parse_int("", &v), CONFIG_PARSE_SYNTAX);
    assert_int_equal(config_parse_int("-", &v), CONFIG_PARSE_SYNTAX);
    assert_int_equal(config_parse_int("+1", &v), CONFIG_PARSE_SYNTAX);
    assert_int_equal(config_parse_int("1e3", &v), CONFIG_PARSE_SYNTAX);
    assert_int_equal(config_parse_int("0x10", &v), CONFIG_PARSE_SYNTAX);
    assert_int_equal(config_parse_int("1_000", &v), CONFIG_PARSE_SYNTAX);
    assert_int_equal(config_parse_int("1.0", &v), CONFIG_PARSE_SYNTAX);
    assert_int_equal(config_parse_int(" 1", &v), CONFIG_PARSE_SYNTAX);
    assert_int_equal(v, 7);
}

static void test_bool(void **state)
{
    static const char *const truths[] = {"true", "True", "TRUE", "yes", "on"};
    static const char *const falsehoods[] = {"false", "False", "FALSE", "no", "off"};
    static const char *const junk[] = {"maybe", "", "1", "0", "tRUE", "y"};
    bool v;

    (void)state;
    for (size_t i = 0; i < sizeof truths / sizeof truths[0]; i++) {
        v = false;
        assert_int_equal(config_parse_bool(truths[i], &v), CONFIG_PARSE_OK);
        assert_true(v);
    }
    for (size_t i = 0; i < sizeof falsehoods / sizeof falsehoods[0]; i++) {
        v = true;
        assert_int_equal(config_parse_bool(falsehoods[i], &v), CONFIG_PARSE_OK);
        assert_false(v);
    }
    for (size_t i = 0; i < sizeof junk / sizeof junk[0]; i++)
        assert_int_equal(config_parse_bool(junk[i], &v), CONFIG_PARSE_SYNTAX);
}

static void test_number(void **state)
{
    double v = 0;

    (void)state;
    assert_int_equal(config_parse_number("0.25", &v), CONFIG_PARSE_OK);
    assert_true(v == 0.25);
    assert_int_equal(config_parse_number("10", &v), CONFIG_PARSE_OK);
    assert_true(v == 10.0);
    assert_int_equal(config_parse_number("1e-3", &v), CONFIG_PARSE_OK);
    assert_true(v == 0.001);
    assert_int_equal(config_parse_number("-2.5", &v), CONFIG_PARSE_OK);
    assert_true(v == -2.5);
    assert_int_equal(config_parse_number("inf", &v), CONFIG_PARSE_SYNTAX);
    assert_int_equal(config_parse_number(".inf", &v), CONFIG_PARSE_SYNTAX);
    assert_int_equal(config_parse_number("nan", &v), CONFIG_PARSE_SYNTAX);
    assert_int_equal(config_parse_number("0x1p3", &v), CONFIG_PARSE_SYNTAX);
    assert_int_equal(config_parse_number("", &v), CONFIG_PARSE_SYNTAX);
    assert_int_equal(config_parse_number("1.2.3", &v), CONFIG_PARSE_SYNTAX);
    assert_int_equal(config_parse_number(" 1", &v), CONFIG_PARSE_SYNTAX);
    assert_int_equal(config_parse_number("1e999", &v), CONFIG_PARSE_RANGE);
}

/* ---- Formatting back ---- */

static void test_format(void **state)
{
    char buf[32];

    (void)state;
    config_format_duration(0, buf, sizeof buf);
    assert_string_equal(buf, "0s");
    config_format_duration(250, buf, sizeof buf);
    assert_string_equal(buf, "250ms");
    config_format_duration(1500, buf, sizeof buf);
    assert_string_equal(buf, "1500ms");
    config_format_duration(30000, buf, sizeof buf);
    assert_string_equal(buf, "30s");
    config_format_duration(600000, buf, sizeof buf);
    assert_string_equal(buf, "10m");
    config_format_duration(7200000, buf, sizeof buf);
    assert_string_equal(buf, "2h");
    config_format_size(0, buf, sizeof buf);
    assert_string_equal(buf, "0");
    config_format_size(1000, buf, sizeof buf);
    assert_string_equal(buf, "1000");
    config_format_size(16384, buf, sizeof buf);
    assert_string_equal(buf, "16KiB");
    config_format_size(10485760, buf, sizeof buf);
    assert_string_equal(buf, "10MiB");
    config_format_size(INT64_C(3221225472), buf, sizeof buf);
    assert_string_equal(buf, "3GiB");
    config_format_size(INT64_C(1099511627776), buf, sizeof buf);
    assert_string_equal(buf, "1TiB");
}

static void test_format_round_trips(void **state)
{
    static const int64_t durations[] = {0, 1, 999, 1000, 61000, 3600000, 5400000, INT64_C(86400000)};
    static const int64_t sizes[] = {0, 1, 1023, 1024, 1536, 1048576, INT64_C(5368709120)};
    char buf[32];
    int64_t back;

    (void)state;
    for (size_t i = 0; i < sizeof durations / sizeof durations[0]; i++) {
        config_format_duration(durations[i], buf, sizeof buf);
        assert_int_equal(config_parse_duration(buf, &back), CONFIG_PARSE_OK);
        assert_int_equal(back, durations[i]);
    }
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        config_format_size(sizes[i], buf, sizeof buf);
        assert_int_equal(config_parse_size(buf, &back), CONFIG_PARSE_OK);
        assert_int_equal(back, sizes[i]);
    }
}

/* ---- Words ---- */

static void test_edit_distance(void **state)
{
    (void)state;
    assert_int_equal(config_edit_distance("listen", "listen"), 0);
    assert_int_equal(config_edit_distance("lisen", "listen"), 1);
    assert_int_equal(config_edit_distance("tiemout", "timeout"), 1); /* a swap is one edit */
    assert_int_equal(config_edit_distance("LISTEN", "listen"), 0);
    assert_int_equal(config_edit_distance("", "abc"), 3);
    assert_int_equal(config_edit_distance("kitten", "sitting"), 3);
}

static void test_suggest(void **state)
{
    static const char *const keys[] = {"listen", "workers", "max_connections", "read_timeout", "tls"};

    (void)state;
    assert_string_equal(config_suggest("lisen", keys, 5), "listen");
    assert_string_equal(config_suggest("worker", keys, 5), "workers");
    assert_string_equal(config_suggest("max_conections", keys, 5), "max_connections");
    assert_string_equal(config_suggest("TLS", keys, 5), "tls");
    assert_null(config_suggest("zzz", keys, 5));
    assert_null(config_suggest("port", keys, 5));
    assert_null(config_suggest("x", keys, 5));
}

static void test_quote(void **state)
{
    char buf[256];

    (void)state;
    config_quote("lots", buf, sizeof buf);
    assert_string_equal(buf, "\"lots\"");
    config_quote("a\"b\\c\nd\x01", buf, sizeof buf);
    assert_string_equal(buf, "\"a\\\"b\\\\c\\nd\\x01\"");
    config_quote("0123456789012345678901234567890123456789012345678901234567890123456789", buf, sizeof buf);
    assert_string_equal(buf, "\"012345678901234567890123456789012345678901234567890123456789...\"");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_env_set_and_default),
        cmocka_unit_test(test_env_empty_values),
        cmocka_unit_test(test_env_several_in_one_scalar),
        cmocka_unit_test(test_env_dollars_that_are_not_variables),
        cmocka_unit_test(test_env_errors),
        cmocka_unit_test(test_env_overlong_names),
        cmocka_unit_test(test_duration_units),
        cmocka_unit_test(test_duration_decimals),
        cmocka_unit_test(test_duration_junk),
        cmocka_unit_test(test_duration_overflow),
        cmocka_unit_test(test_size_units),
        cmocka_unit_test(test_size_decimals),
        cmocka_unit_test(test_size_junk_and_overflow),
        cmocka_unit_test(test_int),
        cmocka_unit_test(test_bool),
        cmocka_unit_test(test_number),
        cmocka_unit_test(test_format),
        cmocka_unit_test(test_format_round_trips),
        cmocka_unit_test(test_edit_distance),
        cmocka_unit_test(test_suggest),
        cmocka_unit_test(test_quote),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

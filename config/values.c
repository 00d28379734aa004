/*
 * values.c - the scalar parsers of the configuration: integers, durations, sizes,
 * booleans, numbers, and ${VAR} expansion.
 *
 * Pure functions of their input (and of the environment, for expansion), run on the
 * thread that calls config_load. The one idea: every key's default is text that goes
 * through these same functions, so a default and a user value are judged alike.
 * Scaled values (durations, sizes) are computed in integers with overflow checks and
 * must come to a whole number of the base unit: "1.5s" is 1500 ms, "0.5ms" is refused.
 */
#include "config/config_internal.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Digits after a decimal point we accept; more cannot make a whole millisecond or byte. */
#define CONFIG_FRACTION_DIGITS_MAX 9

typedef struct config_unit {
    const char *suffix;
    int64_t scale;
} config_unit;

static const config_unit duration_units[] = {
    {"ms", 1}, {"s", CONFIG_MS_PER_SECOND}, {"m", CONFIG_MS_PER_MINUTE}, {"h", CONFIG_MS_PER_HOUR}, {NULL, 0},
};

static const config_unit size_units[] = {
    {"B", 1},
    {"KiB", CONFIG_KIB},
    {"MiB", CONFIG_MIB},
    {"GiB", CONFIG_GIB},
    {"TiB", CONFIG_TIB},
    {"KB", INT64_C(1000)},
    {"MB", INT64_C(1000000)},
    {"GB", INT64_C(1000000000)},
    {"TB", INT64_C(1000000000000)},
    {NULL, 0},
};

void config_bprintf(char *buf, size_t len, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf, len, fmt, ap);
    va_end(ap);
}

config_parse_status config_parse_int(const char *text, int64_t *out)
{
    const char *p = text;
    bool negative = false;
    int64_t value = 0;

    if (*p == '-') {
        negative = true;
        p++;
    }
    if (!isdigit((unsigned char)*p))
        return CONFIG_PARSE_SYNTAX;
    for (; isdigit((unsigned char)*p); p++) {
        int digit = *p - '0';
        /* Accumulate negatively so INT64_MIN fits. */
        if (value < (INT64_MIN + digit) / 10)
            return CONFIG_PARSE_RANGE;
        value = value * 10 - digit;
    }
    if (*p != '\0')
        return CONFIG_PARSE_SYNTAX;
    if (!negative) {
        if (value == INT64_MIN)
            return CONFIG_PARSE_RANGE;
        value = -value;
    }
    *out = value;
    return CONFIG_PARSE_OK;
}

/*
 * Parse "DIGITS[.DIGITS]SUFFIX" where SUFFIX is one of UNITS, or absent when
 * BARE_SCALE is non-zero (then the number is in BARE_SCALE units). BARE_ZERO_ONLY
 * allows a bare number only when it is zero (durations).
 */
static config_parse_status parse_scaled(const char *text, const config_unit *units, int64_t bare_scale,
                                        bool bare_zero_only, int64_t *out)
{
    const char *p = text;
    int64_t whole = 0, fraction = 0, fraction_div = 1, scale = 0, value, part;
    int fraction_digits = 0;
    bool all_zero = true;

    if (!isdigit((unsigned char)*p))
        return CONFIG_PARSE_SYNTAX;
    for (; isdigit((unsigned char)*p); p++) {
        if (*p != '0')
            all_zero = false;
        if (whole > (INT64_MAX - (*p - '0')) / 10)
            return CONFIG_PARSE_RANGE;
        whole = whole * 10 + (*p - '0');
    }
    if (*p == '.') {
        p++;
        if (!isdigit((unsigned char)*p))
            return CONFIG_PARSE_SYNTAX;
        for (; isdigit((unsigned char)*p); p++) {
            if (*p != '0')
                all_zero = false;
            if (fraction_digits == CONFIG_FRACTION_DIGITS_MAX) {
                /* Past nine digits only zeros can still be exact. */
                if (*p != '0')
                    return CONFIG_PARSE_FRACTION;
                continue;
            }
            fraction = fraction * 10 + (*p - '0');
            fraction_div *= 10;
            fraction_digits++;
        }
    }
    if (*p == '\0') {
        if (bare_scale == 0 || (bare_zero_only && !all_zero))
            return CONFIG_PARSE_SYNTAX;
        scale = bare_scale;
    } else {
        for (const config_unit *u = units; u->suffix; u++) {
            if (strcmp(p, u->suffix) == 0) {
                scale = u->scale;
                break;
            }
        }
        if (scale == 0)
            return CONFIG_PARSE_SYNTAX;
    }
    if (__builtin_mul_overflow(whole, scale, &value))
        return CONFIG_PARSE_RANGE;
    /* fraction < 10^9 and scale <= 2^40, so the product fits in int64. */
    if (__builtin_mul_overflow(fraction, scale, &part))
        return CONFIG_PARSE_RANGE;
    if (part % fraction_div != 0)
        return CONFIG_PARSE_FRACTION;
    if (__builtin_add_overflow(value, part / fraction_div, &value))
        return CONFIG_PARSE_RANGE;
    *out = value;
    return CONFIG_PARSE_OK;
}

config_parse_status config_parse_duration(const char *text, int64_t *out_ms)
{
    return parse_scaled(text, duration_units, 1, true, out_ms);
}

config_parse_status config_parse_size(const char *text, int64_t *out_bytes)
{
    return parse_scaled(text, size_units, 1, false, out_bytes);
}

config_parse_status config_parse_bool(const char *text, bool *out)
{
    static const char *const truths[] = {"true", "True", "TRUE", "yes", "Yes", "YES", "on", "On", "ON"};
    static const char *const falsehoods[] = {"false", "False", "FALSE", "no", "No",
                                             "NO",    "off",   "Off",   "OFF"};

    for (size_t i = 0; i < sizeof truths / sizeof truths[0]; i++) {
        if (strcmp(text, truths[i]) == 0) {
            *out = true;
            return CONFIG_PARSE_OK;
        }
        if (strcmp(text, falsehoods[i]) == 0) {
            *out = false;
            return CONFIG_PARSE_OK;
        }
    }
    return CONFIG_PARSE_SYNTAX;
}

config_parse_status config_parse_number(const char *text, double *out)
{
    char *end;
    double value;

    /* strtod also takes hex, inf, nan and leading spaces: allow plain decimals only. */
    if (*text == '\0' || strspn(text, "0123456789.eE+-") != strlen(text))
        return CONFIG_PARSE_SYNTAX;
    errno = 0;
    value = strtod(text, &end);
    if (end == text || *end != '\0')
        return CONFIG_PARSE_SYNTAX;
    if (errno == ERANGE || !isfinite(value))
        return CONFIG_PARSE_RANGE;
    *out = value;
    return CONFIG_PARSE_OK;
}

void config_format_duration(int64_t ms, char *buf, size_t len)
{
    if (ms == 0)
        config_bprintf(buf, len, "0s");
    else if (ms % CONFIG_MS_PER_HOUR == 0)
        config_bprintf(buf, len, "%" PRId64 "h", ms / CONFIG_MS_PER_HOUR);
    else if (ms % CONFIG_MS_PER_MINUTE == 0)
        config_bprintf(buf, len, "%" PRId64 "m", ms / CONFIG_MS_PER_MINUTE);
    else if (ms % CONFIG_MS_PER_SECOND == 0)
        config_bprintf(buf, len, "%" PRId64 "s", ms / CONFIG_MS_PER_SECOND);
    else
        config_bprintf(buf, len, "%" PRId64 "ms", ms);
}

void config_format_size(int64_t bytes, char *buf, size_t len)
{
    if (bytes != 0 && bytes % CONFIG_TIB == 0)
        config_bprintf(buf, len, "%" PRId64 "TiB", bytes / CONFIG_TIB);
    else if (bytes != 0 && bytes % CONFIG_GIB == 0)
        config_bprintf(buf, len, "%" PRId64 "GiB", bytes / CONFIG_GIB);
    else if (bytes != 0 && bytes % CONFIG_MIB == 0)
        config_bprintf(buf, len, "%" PRId64 "MiB", bytes / CONFIG_MIB);
    else if (bytes != 0 && bytes % CONFIG_KIB == 0)
        config_bprintf(buf, len, "%" PRId64 "KiB", bytes / CONFIG_KIB);
    else
        config_bprintf(buf, len, "%" PRId64, bytes);
}

/* A growing output string for expansion. */
typedef struct expand_buf {
    char *data;
    size_t len, cap;
} expand_buf;

static bool expand_append(expand_buf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        char *grown;
        while (cap < b->len + n + 1)
            cap *= 2;
        grown = realloc(b->data, cap);
        if (!grown)
            return false;
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
    return true;
}

static void set_detail(char *detail, size_t detail_len, const char *s, size_t n)
{
    if (detail_len == 0)
        return;
    if (n >= detail_len)
        n = detail_len - 1;
    memcpy(detail, s, n);
    detail[n] = '\0';
}

config_env_status config_env_expand(const char *text, char **out, char *detail, size_t detail_len)
{
    expand_buf b = {NULL, 0, 0};
    const char *p = text;
    config_env_status status = CONFIG_ENV_NOMEM;

    *out = NULL;
    set_detail(detail, detail_len, "", 0);
    if (!expand_append(&b, "", 0))
        goto fail;
    while (*p) {
        const char *name, *def = NULL, *end, *value;
        size_t name_len, def_len = 0;
        char name_buf[256];

        if (p[0] == '$' && p[1] == '$' && p[2] == '{') {
            if (!expand_append(&b, "${", 2))
                goto fail;
            p += 3;
            continue;
        }
        if (p[0] != '$' || p[1] != '{') {
            size_t run = strcspn(p + 1, "$") + 1;
            if (!expand_append(&b, p, run))
                goto fail;
            p += run;
            continue;
        }
        end = strchr(p, '}');
        if (!end) {
            set_detail(detail, detail_len, p, strlen(p));
            status = CONFIG_ENV_UNTERMINATED;
            goto fail;
        }
        name = p + 2;
        name_len = 0;
        if (isalpha((unsigned char)name[0]) || name[0] == '_') {
            while (isalnum((unsigned char)name[name_len]) || name[name_len] == '_')
                name_len++;
        }
        if (name_len >= sizeof name_buf) {
            /* Checked before either form uses name_buf: no name is this long. */
            set_detail(detail, detail_len, p, (size_t)(end - p) + 1);
            status = CONFIG_ENV_BAD_NAME;
            goto fail;
        }
        if (name_len > 0 && name[name_len] == ':' && name[name_len + 1] == '-') {
            def = name + name_len + 2;
            def_len = (size_t)(end - def);
        } else if (name_len == 0 || name + name_len != end) {
            set_detail(detail, detail_len, p, (size_t)(end - p) + 1);
            status = CONFIG_ENV_BAD_NAME;
            goto fail;
        }
        memcpy(name_buf, name, name_len);
        name_buf[name_len] = '\0';
        value = getenv(name_buf);
        if (def && (!value || !*value)) {
            if (!expand_append(&b, def, def_len))
                goto fail;
        } else if (value) {
            if (!expand_append(&b, value, strlen(value)))
                goto fail;
        } else {
            set_detail(detail, detail_len, name_buf, name_len);
            status = CONFIG_ENV_UNSET;
            goto fail;
        }
        p = end + 1;
    }
    *out = b.data;
    return CONFIG_ENV_OK;

fail:
    free(b.data);
    return status;
}

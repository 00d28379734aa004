/*
 * config.c - what can be done with a loaded config_t: free it, compare it with the
 * next one on reload, show it as JSON for /admin/config, name its method bits.
 *
 * config_free and config_unreloadable_changes run on the main thread (reload);
 * config_show_json and config_method_name only read and may run on any thread. The
 * one idea: each is a walk over the key table, so a new key is freed, compared and
 * shown without touching this file. Values are rendered back in the file's own units
 * ("30s", "16KiB") so what /admin/config shows can be pasted into the file.
 */
#include "config/config_internal.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CONFIG_SHOW_PATH_MAX 512
#define CONFIG_REDACTED "********"

/* ---- A growing string ---- */

typedef struct config_str {
    char *data;
    size_t len, cap;
    bool failed;
} config_str;

static void str_add(config_str *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void str_add(config_str *s, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (s->failed)
        return;
    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
        s->failed = true;
        return;
    }
    if (s->len + (size_t)n + 1 > s->cap) {
        size_t cap = s->cap ? s->cap : 256;
        char *grown;
        while (cap < s->len + (size_t)n + 1)
            cap *= 2;
        grown = realloc(s->data, cap);
        if (!grown) {
            s->failed = true;
            return;
        }
        s->data = grown;
        s->cap = cap;
    }
    va_start(ap, fmt);
    vsnprintf(s->data + s->len, s->cap - s->len, fmt, ap);
    va_end(ap);
    s->len += (size_t)n;
}

/* The string built, or NULL when empty or out of memory; the caller frees it. */
static char *str_take(config_str *s)
{
    if (s->failed || s->len == 0) {
        free(s->data);
        return NULL;
    }
    return s->data;
}

/* ---- Walking ---- */

static const void *field_at(const void *obj, size_t offset)
{
    return (const char *)obj + offset;
}

static void item_path(char *out, const char *parent, const char *name)
{
    if (*parent)
        config_bprintf(out, CONFIG_SHOW_PATH_MAX, "%s.%s", parent, name);
    else
        config_bprintf(out, CONFIG_SHOW_PATH_MAX, "%s", name);
}

static const char *name_of(const config_name *names, int value)
{
    for (const config_name *n = names; n->name; n++)
        if (n->value == value)
            return n->name;
    return "?";
}

/* A double the shortest way that reads back the same. */
static void add_number(config_str *s, double v)
{
    char buf[64];

    config_bprintf(buf, sizeof buf, "%.15g", v);
    if (strtod(buf, NULL) != v)
        config_bprintf(buf, sizeof buf, "%.17g", v);
    str_add(s, "%s", buf);
}

/* Hide the user:password part of a URL ("redis://:secret@host" keeps only "redis://" and "@host"). */
static void add_redacted_url(config_str *s, const char *url)
{
    const char *scheme = strstr(url, "://");
    const char *at = scheme ? strchr(scheme + 3, '@') : NULL;

    if (!at) {
        str_add(s, "%s", url);
        return;
    }
    str_add(s, "%.*s%s%s", (int)(scheme + 3 - url), url, CONFIG_REDACTED, at);
}

/* Render KEY's value in OBJ as the file would write it. REDACT hides secrets. */
static void add_value(config_str *s, const config_key *key, const void *obj, bool redact)
{
    const void *field = field_at(obj, key->offset);
    char buf[64];

    switch (key->type) {
    case CONFIG_TYPE_STRING:
    case CONFIG_TYPE_JOINED: {
        const char *v = *(char *const *)field;
        if (!v)
            str_add(s, "(none)");
        else if (redact && (key->flags & CONFIG_F_SECRET) && *v)
            str_add(s, CONFIG_REDACTED);
        else if (redact && (key->flags & CONFIG_F_URL))
            add_redacted_url(s, v);
        else
            str_add(s, "%s", v);
        break;
    }
    case CONFIG_TYPE_INT:
        str_add(s, "%" PRId64,
                key->size == sizeof(int64_t) ? *(const int64_t *)field : (int64_t) * (const int *)field);
        break;
    case CONFIG_TYPE_DURATION:
        config_format_duration(*(const int64_t *)field, buf, sizeof buf);
        str_add(s, "%s", buf);
        break;
    case CONFIG_TYPE_SIZE:
        config_format_size(*(const int64_t *)field, buf, sizeof buf);
        str_add(s, "%s", buf);
        break;
    case CONFIG_TYPE_BOOL:
        str_add(s, "%s", *(const bool *)field ? "true" : "false");
        break;
    case CONFIG_TYPE_ENUM:
        str_add(s, "%s", name_of(key->names, *(const int *)field));
        break;
    case CONFIG_TYPE_FLAGS: {
        unsigned bits = *(const unsigned *)field;
        bool first = true;
        if (bits == (unsigned)CONFIG_METHOD_ALL) {
            str_add(s, "ALL");
            break;
        }
        for (const config_name *n = key->names; n->name; n++) {
            if ((unsigned)n->value == (unsigned)CONFIG_METHOD_ALL || !(bits & (unsigned)n->value))
                continue;
            str_add(s, "%s%s", first ? "" : ", ", n->name);
            first = false;
        }
        break;
    }
    case CONFIG_TYPE_STRING_LIST: {
        char *const *v = *(char **const *)field;
        size_t n = *(const size_t *)field_at(obj, key->count_offset);
        for (size_t i = 0; i < n; i++)
            str_add(s, "%s%s", i ? ", " : "", v[i]);
        break;
    }
    case CONFIG_TYPE_NUMBER_LIST: {
        const double *v = *(double *const *)field;
        size_t n = *(const size_t *)field_at(obj, key->count_offset);
        for (size_t i = 0; i < n; i++) {
            if (i)
                str_add(s, ", ");
            add_number(s, v[i]);
        }
        break;
    }
    case CONFIG_TYPE_KV_MAP: {
        const config_kv *v = *(config_kv *const *)field;
        size_t n = *(const size_t *)field_at(obj, key->count_offset);
        for (size_t i = 0; i < n; i++)
            str_add(s, "%s%s=%s", i ? ", " : "", v[i].key, v[i].value);
        break;
    }
    case CONFIG_TYPE_SECTION:
    case CONFIG_TYPE_MAP:
    case CONFIG_TYPE_LIST:
        break;
    }
}

/* KEY's value in OBJ as text; the caller frees; NULL when out of memory. */
static char *value_text(const config_key *key, const void *obj, bool redact)
{
    config_str s = {0};

    add_value(&s, key, obj, redact);
    if (!s.failed && s.len == 0) {
        free(s.data);
        return strdup("");
    }
    return str_take(&s);
}

typedef void (*config_leaf_fn)(const config_key *key, const void *obj, const void *other, const char *path,
                               void *arg);

/* Whether a section with CONFIG_F_PRESENT was left out of the file (route sql:, redis:...). */
static bool section_absent(const config_key *key, const void *obj)
{
    return (key->flags & CONFIG_F_PRESENT) &&
           !*(const bool *)field_at(field_at(obj, key->offset), key->present_offset);
}

/*
 * Call FN for every leaf key under KEYS, in table order, with the object holding it
 * in OBJ and, when OTHER is given, in OTHER too (items of maps matched by name, of
 * lists by index; items only one side has are skipped).
 */
static void walk(const config_key *keys, const void *obj, const void *other, const char *path,
                 config_leaf_fn fn, void *arg, bool skip_absent)
{
    for (const config_key *k = keys; k->name; k++) {
        char child[CONFIG_SHOW_PATH_MAX];

        item_path(child, path, k->name);
        if (k->type == CONFIG_TYPE_SECTION) {
            if (skip_absent && section_absent(k, obj))
                continue;
            walk(k->sub, field_at(obj, k->offset), other ? field_at(other, k->offset) : NULL, child, fn, arg,
                 skip_absent);
        } else if (k->type == CONFIG_TYPE_MAP || k->type == CONFIG_TYPE_LIST) {
            const char *items = *(char *const *)field_at(obj, k->offset);
            size_t n = *(const size_t *)field_at(obj, k->count_offset);
            const char *other_items = other ? *(char *const *)field_at(other, k->offset) : NULL;
            size_t other_n = other ? *(const size_t *)field_at(other, k->count_offset) : 0;

            for (size_t i = 0; i < n; i++) {
                const char *item = items + i * k->item_size, *match = NULL;
                char item_child[CONFIG_SHOW_PATH_MAX];

                if (k->type == CONFIG_TYPE_MAP) {
                    const char *name = *(char *const *)field_at(item, k->name_offset);
                    item_path(item_child, child, name);
                    for (size_t j = 0; j < other_n && !match; j++) {
                        const char *candidate = other_items + j * k->item_size;
                        if (strcmp(*(char *const *)field_at(candidate, k->name_offset), name) == 0)
                            match = candidate;
                    }
                } else {
                    config_bprintf(item_child, sizeof item_child, "%s[%zu]", child, i);
                    if (i < other_n)
                        match = other_items + i * k->item_size;
                }
                if (other && !match)
                    continue;
                walk(k->sub, item, match, item_child, fn, arg, skip_absent);
            }
        } else {
            fn(k, obj, other, child, arg);
        }
    }
}

/* ---- Free ---- */

static void free_keys(const config_key *keys, void *obj)
{
    for (const config_key *k = keys; k->name; k++) {
        void *field = (char *)obj + k->offset;

        switch (k->type) {
        case CONFIG_TYPE_STRING:
        case CONFIG_TYPE_JOINED:
            free(*(char **)field);
            *(char **)field = NULL;
            break;
        case CONFIG_TYPE_STRING_LIST: {
            char **v = *(char ***)field;
            size_t *n = (size_t *)((char *)obj + k->count_offset);
            for (size_t i = 0; v && i < *n; i++)
                free(v[i]);
            free(v);
            *(char ***)field = NULL;
            *n = 0;
            break;
        }
        case CONFIG_TYPE_NUMBER_LIST:
            free(*(double **)field);
            *(double **)field = NULL;
            *(size_t *)((char *)obj + k->count_offset) = 0;
            break;
        case CONFIG_TYPE_KV_MAP: {
            config_kv *v = *(config_kv **)field;
            size_t *n = (size_t *)((char *)obj + k->count_offset);
            for (size_t i = 0; v && i < *n; i++) {
                free(v[i].key);
                free(v[i].value);
            }
            free(v);
            *(config_kv **)field = NULL;
            *n = 0;
            break;
        }
        case CONFIG_TYPE_SECTION:
            free_keys(k->sub, field);
            break;
        case CONFIG_TYPE_MAP:
        case CONFIG_TYPE_LIST: {
            char *items = *(char **)field;
            size_t *n = (size_t *)((char *)obj + k->count_offset);
            for (size_t i = 0; items && i < *n; i++) {
                char *item = items + i * k->item_size;
                free_keys(k->sub, item);
                if (k->type == CONFIG_TYPE_MAP) {
                    free(*(char **)(item + k->name_offset));
                    *(char **)(item + k->name_offset) = NULL;
                }
            }
            free(items);
            *(char **)field = NULL;
            *n = 0;
            break;
        }
        default:
            break;
        }
    }
}

void config_free(config_t *cfg)
{
    if (!cfg)
        return;
    free_keys(config_root_keys, cfg);
    free(cfg->file);
    free(cfg);
}

/* ---- Reload ---- */

static void diff_leaf(const config_key *key, const void *obj, const void *other, const char *path, void *arg)
{
    config_str *out = arg;
    char *was, *now;

    if (!(key->flags & CONFIG_F_RESTART))
        return;
    was = value_text(key, obj, false);
    now = value_text(key, other, false);
    if (!was || !now)
        out->failed = true;
    else if (strcmp(was, now) != 0)
        str_add(out, "%s: %s -> %s (needs a restart)\n", path, was, now);
    free(was);
    free(now);
}

char *config_unreloadable_changes(const config_t *old_cfg, const config_t *new_cfg)
{
    config_str out = {0};

    if (!old_cfg || !new_cfg)
        return NULL;
    walk(config_root_keys, old_cfg, new_cfg, "", diff_leaf, &out, false);
    return str_take(&out);
}

/* ---- /admin/config ---- */

static void add_json_string(config_str *s, const char *v)
{
    str_add(s, "\"");
    for (const unsigned char *p = (const unsigned char *)v; *p; p++) {
        if (*p == '"' || *p == '\\')
            str_add(s, "\\%c", *p);
        else if (*p < 0x20 || *p == 0x7f)
            str_add(s, "\\u%04x", *p);
        else
            str_add(s, "%c", *p);
    }
    str_add(s, "\"");
}

static void show_leaf(const config_key *key, const void *obj, const void *other, const char *path, void *arg)
{
    config_str *out = arg;
    char *value = value_text(key, obj, true);
    const char *def = key->def ? key->def : key->def_doc;

    (void)other;
    if (!value) {
        out->failed = true;
        return;
    }
    str_add(out, "%s{\"key\":", out->len > 1 ? "," : "");
    add_json_string(out, path);
    str_add(out, ",\"value\":");
    if ((key->type == CONFIG_TYPE_STRING || key->type == CONFIG_TYPE_JOINED) &&
        !*(char *const *)field_at(obj, key->offset))
        str_add(out, "null");
    else
        add_json_string(out, value);
    str_add(out, ",\"default\":");
    if (def)
        add_json_string(out, def);
    else
        str_add(out, "null");
    str_add(out, ",\"changeable\":\"%s\"}", key->flags & CONFIG_F_RESTART ? "no" : "yes");
    free(value);
}

char *config_show_json(const config_t *cfg)
{
    config_str out = {0};

    str_add(&out, "[");
    if (cfg)
        walk(config_root_keys, cfg, NULL, "", show_leaf, &out, true);
    str_add(&out, "]");
    return str_take(&out);
}

const char *config_method_name(unsigned method_bit)
{
    for (const config_name *n = config_method_names; n->name; n++)
        if ((unsigned)n->value == method_bit)
            return n->name;
    return NULL;
}

/*
 * load.c - config_load: read the file with libyaml's document API and walk the node
 * tree against the key table, filling a config_t and collecting every error.
 *
 * Runs on the thread that calls config_load (the main thread, at start-up and on
 * reload); nothing here is shared. The one idea: the walk is driven by the table, not
 * by the file. Each mapping is first scanned for keys the table does not know and for
 * duplicates; then every row of the table is looked up in it and either parsed or, when
 * absent, given its default, which is text parsed by the same code. ${VAR} expansion
 * happens per scalar after YAML parsing, so every node keeps its exact line and column
 * and an environment value can never add YAML structure. Errors are kept with their
 * position and sorted, so the report reads top to bottom whatever order rules ran in.
 */
#include "config/config_internal.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define CONFIG_FILE_MAX_BYTES (16 * 1024 * 1024)
#define CONFIG_ERRORS_MAX 1000
#define CONFIG_PATH_MAX 512
#define CONFIG_MESSAGE_MAX 2048
#define CONFIG_MAPPING_PAIRS_MAX 10000
#define CONFIG_SUGGEST_CANDIDATES_MAX 64
#define CONFIG_SUGGEST_LEN_MAX 64
#define CONFIG_QUOTE_CHARS_MAX 60
#define CONFIG_KEY_LIST_MAX 200
#define CONFIG_READ_CHUNK 65536

_Static_assert(sizeof(config_log_level) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(config_store) == sizeof(int), "enums are stored as int");

struct config_error {
    int line, col;
    size_t seq;
    char *text;
};

static void load_value(config_loader *ld, const config_key *key, void *obj, yaml_node_t *node,
                       const char *path);
static void load_section(config_loader *ld, const config_key *keys, void *obj, yaml_node_t *map,
                         yaml_node_t *anchor, const char *path, bool present);

/* ---- Errors ---- */

static void note_oom(config_loader *ld)
{
    ld->out_of_memory = true;
}

void config_error_at(config_loader *ld, const yaml_node_t *node, const char *path, const char *fmt, ...)
{
    char message[CONFIG_MESSAGE_MAX];
    struct config_error *e;
    va_list ap;
    int line = 1, col = 1, n;
    const char *suffix = "";

    if (ld->default_node) {
        /* A built-in default failed its own rules: a bug, but say where it applied. */
        node = ld->default_node;
        suffix = " (in the built-in default)";
    }
    if (node) {
        line = (int)node->start_mark.line + 1;
        col = (int)node->start_mark.column + 1;
    }
    if (ld->error_count == CONFIG_ERRORS_MAX) {
        ld->errors_dropped++;
        return;
    }
    if (ld->error_count == ld->error_cap) {
        size_t cap = ld->error_cap ? ld->error_cap * 2 : 16;
        struct config_error *grown = realloc(ld->errors, cap * sizeof *grown);
        if (!grown) {
            note_oom(ld);
            return;
        }
        ld->errors = grown;
        ld->error_cap = cap;
    }
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    e = &ld->errors[ld->error_count];
    n = snprintf(NULL, 0, "%s:%d:%d: %s: %s%s", ld->file, line, col, path, message, suffix);
    e->text = malloc((size_t)n + 1);
    if (!e->text) {
        note_oom(ld);
        return;
    }
    config_bprintf(e->text, (size_t)n + 1, "%s:%d:%d: %s: %s%s", ld->file, line, col, path, message, suffix);
    e->line = line;
    e->col = col;
    e->seq = ld->error_count;
    ld->error_count++;
}

static int error_order(const void *a, const void *b)
{
    const struct config_error *x = a, *y = b;

    if (x->line != y->line)
        return x->line < y->line ? -1 : 1;
    if (x->col != y->col)
        return x->col < y->col ? -1 : 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* All errors, sorted by position, one per line. Caller frees; NULL when out of memory. */
static char *errors_join(config_loader *ld)
{
    char tail[CONFIG_MESSAGE_MAX] = "";
    size_t total = 1, at = 0;
    char *out;

    qsort(ld->errors, ld->error_count, sizeof ld->errors[0], error_order);
    if (ld->errors_dropped)
        config_bprintf(tail, sizeof tail, "%s:1:1: (more): expected at most %d errors, found %zu more\n",
                       ld->file, CONFIG_ERRORS_MAX, ld->errors_dropped);
    if (ld->out_of_memory)
        config_bprintf(tail + strlen(tail), sizeof tail - strlen(tail),
                       "%s:1:1: (internal): expected memory to load the file, found none\n", ld->file);
    for (size_t i = 0; i < ld->error_count; i++)
        total += strlen(ld->errors[i].text) + 1;
    total += strlen(tail);
    out = malloc(total);
    if (!out)
        return NULL;
    for (size_t i = 0; i < ld->error_count; i++) {
        size_t n = strlen(ld->errors[i].text);
        memcpy(out + at, ld->errors[i].text, n);
        at += n;
        out[at++] = '\n';
    }
    memcpy(out + at, tail, strlen(tail) + 1);
    return out;
}

static void errors_free(config_loader *ld)
{
    for (size_t i = 0; i < ld->error_count; i++)
        free(ld->errors[i].text);
    free(ld->errors);
    ld->errors = NULL;
    ld->error_count = ld->error_cap = 0;
}

/* ---- Words ---- */

void config_quote(const char *value, char *buf, size_t len)
{
    size_t at = 0, chars = 0;

    if (len < 8) {
        if (len)
            buf[0] = '\0';
        return;
    }
    buf[at++] = '"';
    for (const unsigned char *p = (const unsigned char *)value; *p; p++, chars++) {
        char piece[8];
        size_t n;

        if (chars == CONFIG_QUOTE_CHARS_MAX) {
            if (at + 4 < len) {
                memcpy(buf + at, "...", 3);
                at += 3;
            }
            break;
        }
        if (*p == '"' || *p == '\\')
            n = (size_t)snprintf(piece, sizeof piece, "\\%c", *p);
        else if (*p == '\n')
            n = (size_t)snprintf(piece, sizeof piece, "\\n");
        else if (*p == '\t')
            n = (size_t)snprintf(piece, sizeof piece, "\\t");
        else if (*p < 0x20 || *p == 0x7f)
            n = (size_t)snprintf(piece, sizeof piece, "\\x%02x", *p);
        else
            n = (size_t)snprintf(piece, sizeof piece, "%c", *p);
        if (at + n + 2 > len)
            break;
        memcpy(buf + at, piece, n);
        at += n;
    }
    buf[at++] = '"';
    buf[at] = '\0';
}

size_t config_edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    size_t rows[3][CONFIG_SUGGEST_LEN_MAX + 1];
    size_t *two_back = rows[0], *prev = rows[1], *cur = rows[2];

    if (la > CONFIG_SUGGEST_LEN_MAX || lb > CONFIG_SUGGEST_LEN_MAX)
        return SIZE_MAX;
    for (size_t j = 0; j <= lb; j++)
        prev[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t *spare = two_back;
        cur[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            char ca = (char)tolower((unsigned char)a[i - 1]), cb = (char)tolower((unsigned char)b[j - 1]);
            size_t cost = ca == cb ? 0 : 1;
            size_t best = prev[j] + 1;
            if (cur[j - 1] + 1 < best)
                best = cur[j - 1] + 1;
            if (prev[j - 1] + cost < best)
                best = prev[j - 1] + cost;
            if (i > 1 && j > 1 && ca == tolower((unsigned char)b[j - 2]) &&
                tolower((unsigned char)a[i - 2]) == cb && two_back[j - 2] + 1 < best)
                best = two_back[j - 2] + 1;
            cur[j] = best;
        }
        two_back = prev;
        prev = cur;
        cur = spare;
    }
    return prev[lb];
}

const char *config_suggest(const char *word, const char *const *candidates, size_t n)
{
    const char *best = NULL;
    size_t best_distance = SIZE_MAX, word_len = strlen(word);

    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(candidates[i]);
        size_t limit = len <= 3 ? 1 : len <= 6 ? 2 : 3;
        size_t d = config_edit_distance(word, candidates[i]);
        if (d <= limit && d < word_len && d < best_distance) {
            best = candidates[i];
            best_distance = d;
        }
    }
    return best;
}

/* ---- Nodes ---- */

static yaml_node_t *node_get(config_loader *ld, int id)
{
    return yaml_document_get_node(ld->doc, id);
}

static bool node_is_null(const yaml_node_t *node)
{
    const char *v;

    if (node->type != YAML_SCALAR_NODE || node->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
        return false;
    v = (const char *)node->data.scalar.value;
    return !*v || strcmp(v, "~") == 0 || strcmp(v, "null") == 0 || strcmp(v, "Null") == 0 ||
           strcmp(v, "NULL") == 0;
}

static const char *scalar_of(const yaml_node_t *node)
{
    return (const char *)node->data.scalar.value;
}

static yaml_node_pair_t *find_pair(config_loader *ld, yaml_node_t *map, const char *key)
{
    if (!map || map->type != YAML_MAPPING_NODE)
        return NULL;
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; p++) {
        yaml_node_t *k = node_get(ld, p->key);
        if (k && k->type == YAML_SCALAR_NODE && strcmp(scalar_of(k), key) == 0)
            return p;
    }
    return NULL;
}

yaml_node_t *config_node_value(config_loader *ld, yaml_node_t *map, const char *key)
{
    yaml_node_pair_t *p = find_pair(ld, map, key);
    return p ? node_get(ld, p->value) : NULL;
}

yaml_node_t *config_node_key(config_loader *ld, yaml_node_t *map, const char *key)
{
    yaml_node_pair_t *p = find_pair(ld, map, key);
    return p ? node_get(ld, p->key) : NULL;
}

yaml_node_t *config_node_item(config_loader *ld, yaml_node_t *seq, size_t i)
{
    if (!seq || seq->type != YAML_SEQUENCE_NODE)
        return NULL;
    if (i >= (size_t)(seq->data.sequence.items.top - seq->data.sequence.items.start))
        return NULL;
    return node_get(ld, seq->data.sequence.items.start[i]);
}

yaml_node_t *config_node_first(yaml_node_t *a, yaml_node_t *b)
{
    if (!a || !b)
        return a ? a : b;
    if (a->start_mark.line != b->start_mark.line)
        return a->start_mark.line < b->start_mark.line ? a : b;
    return a->start_mark.column <= b->start_mark.column ? a : b;
}

/* What a node is, for "found ...": a quoted scalar, "nothing", "a mapping", "a list". */
static void describe_found(const yaml_node_t *node, char *buf, size_t len)
{
    if (node->type == YAML_MAPPING_NODE)
        config_bprintf(buf, len, "a mapping");
    else if (node->type == YAML_SEQUENCE_NODE)
        config_bprintf(buf, len, "a list");
    else if (node_is_null(node))
        config_bprintf(buf, len, "nothing");
    else
        config_quote(scalar_of(node), buf, len);
}

static void path_join(char *out, const char *parent, const char *name)
{
    if (*parent)
        config_bprintf(out, CONFIG_PATH_MAX, "%s.%s", parent, name);
    else
        config_bprintf(out, CONFIG_PATH_MAX, "%s", name);
}

static void path_index(char *out, const char *parent, size_t i)
{
    config_bprintf(out, CONFIG_PATH_MAX, "%s[%zu]", parent, i);
}

/* ---- Describing keys ---- */

static void key_names(const config_key *keys, char *buf, size_t len)
{
    size_t at = 0;

    buf[0] = '\0';
    for (const config_key *k = keys; k->name; k++) {
        int n = snprintf(buf + at, len - at, "%s%s", at ? ", " : "", k->name);
        if (n < 0 || (size_t)n >= len - at) {
            config_bprintf(buf + at, len - at, ", ...");
            return;
        }
        at += (size_t)n;
    }
}

static void name_list(const config_name *names, char *buf, size_t len)
{
    size_t at = 0;

    buf[0] = '\0';
    for (const config_name *n = names; n->name && at < len; n++) {
        bool last = !n[1].name;
        int w = snprintf(buf + at, len - at, "%s%s%s", at ? (last ? " or " : ", ") : "", n->name, "");
        if (w < 0)
            return;
        at += (size_t)w;
    }
}

static void range_text(const config_key *key, int64_t v, char *buf, size_t len)
{
    if (key->type == CONFIG_TYPE_DURATION)
        config_format_duration(v, buf, len);
    else if (key->type == CONFIG_TYPE_SIZE)
        config_format_size(v, buf, len);
    else
        config_bprintf(buf, len, "%" PRId64, v);
}

/* "an integer 1..1000000", "a duration > 0", "a size 1KiB..1MiB": what fits the range.
 * TOO_BIG says which bound a duration missed, so the message names that one. */
static void describe_range(const config_key *key, bool too_big, char *buf, size_t len)
{
    const char *what = key->type == CONFIG_TYPE_DURATION ? "a duration"
                       : key->type == CONFIG_TYPE_SIZE   ? "a size"
                                                         : "an integer";
    char lo[32], hi[32];

    range_text(key, key->min, lo, sizeof lo);
    range_text(key, key->max, hi, sizeof hi);
    if (key->type == CONFIG_TYPE_DURATION && key->max == CONFIG_DURATION_MAX_MS) {
        if (too_big)
            config_bprintf(buf, len, "%s of at most %s", what, hi);
        else if (key->min == 1)
            config_bprintf(buf, len, "%s > 0", what);
        else
            config_bprintf(buf, len, "%s of at least %s", what, lo);
    } else {
        config_bprintf(buf, len, "%s %s..%s", what, lo, hi);
    }
}

static void describe_expected(const config_key *key, char *buf, size_t len)
{
    char list[CONFIG_KEY_LIST_MAX];

    switch (key->type) {
    case CONFIG_TYPE_STRING:
        config_bprintf(buf, len, "%s", key->flags & CONFIG_F_EMPTY_OK ? "a string" : "a non-empty string");
        break;
    case CONFIG_TYPE_INT:
        describe_range(key, false, buf, len);
        break;
    case CONFIG_TYPE_DURATION:
        config_bprintf(buf, len, "a duration like 250ms, 5s, 10m");
        break;
    case CONFIG_TYPE_SIZE:
        config_bprintf(buf, len, "a size like 512, 16KiB, 10MiB");
        break;
    case CONFIG_TYPE_BOOL:
        config_bprintf(buf, len, "true or false");
        break;
    case CONFIG_TYPE_ENUM:
        name_list(key->names, list, sizeof list);
        config_bprintf(buf, len, "one of %s", list);
        break;
    case CONFIG_TYPE_FLAGS:
        name_list(key->names, list, sizeof list);
        config_bprintf(buf, len, "a list of %s", list);
        break;
    case CONFIG_TYPE_STRING_LIST:
        config_bprintf(buf, len, "%s",
                       key->flags & CONFIG_F_SCALAR_OK ? "a string or a list of strings"
                                                       : "a list of strings");
        break;
    case CONFIG_TYPE_NUMBER_LIST:
        config_bprintf(buf, len, "a list of numbers");
        break;
    case CONFIG_TYPE_JOINED:
        config_bprintf(buf, len, "a string or a list of strings");
        break;
    case CONFIG_TYPE_KV_MAP:
        config_bprintf(buf, len, "a mapping of strings");
        break;
    case CONFIG_TYPE_SECTION:
        key_names(key->sub, list, sizeof list);
        config_bprintf(buf, len, "a mapping with keys %s", list);
        break;
    case CONFIG_TYPE_MAP:
        config_bprintf(buf, len, "a mapping of %s names to their settings", key->noun);
        break;
    case CONFIG_TYPE_LIST:
        config_bprintf(buf, len, "a list of %ss", key->noun);
        break;
    }
}

/* ---- Storing ---- */

static void *field_of(void *obj, size_t offset)
{
    return (char *)obj + offset;
}

static void store_int(void *field, size_t size, int64_t value)
{
    if (size == sizeof(int64_t))
        *(int64_t *)field = value;
    else if (size == sizeof(int))
        *(int *)field = (int)value;
    else
        abort(); /* a table row with an INT field of another width: a bug */
}

static bool lookup_name(const config_key *key, const char *text, int *value)
{
    for (const config_name *n = key->names; n->name; n++) {
        bool same =
            key->flags & CONFIG_F_NOCASE ? strcasecmp(n->name, text) == 0 : strcmp(n->name, text) == 0;
        if (same) {
            *value = n->value;
            return true;
        }
    }
    return false;
}

static const char *suggest_name(const config_key *key, const char *text)
{
    const char *candidates[CONFIG_SUGGEST_CANDIDATES_MAX];
    size_t n = 0;

    for (const config_name *c = key->names; c->name && n < CONFIG_SUGGEST_CANDIDATES_MAX; c++)
        candidates[n++] = c->name;
    return config_suggest(text, candidates, n);
}

/* "expected EXPECTED, found "TEXT" (from "RAW") (DETAIL); did you mean "SUGGESTION"?" */
static void bad_value(config_loader *ld, yaml_node_t *node, const char *path, const char *expected,
                      const char *text, const char *raw, const char *detail, const char *suggestion)
{
    char found[CONFIG_QUOTE_CHARS_MAX * 4 + 8], from[CONFIG_QUOTE_CHARS_MAX * 4 + 16] = "";
    char why[300] = "", hint[CONFIG_SUGGEST_LEN_MAX + 32] = "";

    config_quote(text, found, sizeof found);
    if (raw && strcmp(raw, text) != 0) {
        char quoted[CONFIG_QUOTE_CHARS_MAX * 4 + 8];
        config_quote(raw, quoted, sizeof quoted);
        config_bprintf(from, sizeof from, " (from %s)", quoted);
    }
    if (detail && *detail)
        config_bprintf(why, sizeof why, " (%s)", detail);
    if (suggestion)
        config_bprintf(hint, sizeof hint, "; did you mean \"%s\"?", suggestion);
    config_error_at(ld, node, path, "expected %s, found %s%s%s%s", expected, found, from, why, hint);
}

static void wrong_type(config_loader *ld, const config_key *key, yaml_node_t *node, const char *path)
{
    char expected[CONFIG_MESSAGE_MAX / 2], found[CONFIG_QUOTE_CHARS_MAX * 4 + 8];

    describe_expected(key, expected, sizeof expected);
    describe_found(node, found, sizeof found);
    config_error_at(ld, node, path, "expected %s, found %s", expected, found);
}

/* The expanded text of scalar NODE (caller frees), or NULL after reporting why not. */
static char *scalar_text(config_loader *ld, yaml_node_t *node, const char *path)
{
    const char *raw = scalar_of(node);
    char detail[CONFIG_QUOTE_CHARS_MAX * 2], quoted[CONFIG_QUOTE_CHARS_MAX * 4 + 8];
    char *out = NULL;

    if (strlen(raw) != node->data.scalar.length) {
        config_error_at(ld, node, path, "expected text, found a string with a NUL character");
        return NULL;
    }
    switch (config_env_expand(raw, &out, detail, sizeof detail)) {
    case CONFIG_ENV_OK:
        return out;
    case CONFIG_ENV_UNSET:
        config_error_at(
            ld, node, path,
            "expected environment variable %s to be set (or a default: ${%s:-value}), found it unset", detail,
            detail);
        return NULL;
    case CONFIG_ENV_UNTERMINATED:
        config_quote(detail, quoted, sizeof quoted);
        config_error_at(ld, node, path, "expected ${NAME} or ${NAME:-default} closed by '}', found %s",
                        quoted);
        return NULL;
    case CONFIG_ENV_BAD_NAME:
        config_quote(detail, quoted, sizeof quoted);
        config_error_at(ld, node, path,
                        "expected ${NAME} or ${NAME:-default} with NAME of letters, digits and '_' "
                        "(write $${ for a literal ${), found %s",
                        quoted);
        return NULL;
    case CONFIG_ENV_NOMEM:
        break;
    }
    note_oom(ld);
    return NULL;
}

/* A range or syntax failure of a scaled or integer value, worded for the key. */
static void bad_number(config_loader *ld, const config_key *key, yaml_node_t *node, const char *path,
                       const char *text, const char *raw, config_parse_status status, bool too_big)
{
    char expected[256];
    const char *detail = NULL;

    if (key->type == CONFIG_TYPE_DURATION && status == CONFIG_PARSE_SYNTAX && *text &&
        strspn(text, "0123456789.") == strlen(text))
        detail = "a number needs a unit: ms, s, m or h";
    if (status == CONFIG_PARSE_FRACTION)
        config_bprintf(expected, sizeof expected, "%s",
                       key->type == CONFIG_TYPE_DURATION ? "a whole number of milliseconds"
                                                         : "a whole number of bytes");
    else if (status == CONFIG_PARSE_SYNTAX && key->type != CONFIG_TYPE_INT)
        describe_expected(key, expected, sizeof expected);
    else
        describe_range(key, too_big, expected, sizeof expected);
    bad_value(ld, node, path, expected, text, raw, detail, NULL);
}

/*
 * Parse TEXT as KEY's scalar type and store it in OBJ. NODE and PATH place errors;
 * RAW is the text as written, before expansion (NULL for defaults). Returns false
 * after reporting. Strings are copied; OBJ owns them.
 */
static bool set_scalar(config_loader *ld, const config_key *key, void *obj, const char *text,
                       yaml_node_t *node, const char *path, const char *raw)
{
    void *field = field_of(obj, key->offset);
    config_parse_status status = CONFIG_PARSE_OK;
    config_why why;
    int64_t number = 0;

    switch (key->type) {
    case CONFIG_TYPE_STRING:
    case CONFIG_TYPE_JOINED: {
        char *copy;
        if (!*text && !(key->flags & CONFIG_F_EMPTY_OK)) {
            bad_value(ld, node, path, "a non-empty string", text, raw, NULL, NULL);
            return false;
        }
        memset(&why, 0, sizeof why);
        if (*text && key->valid && !key->valid(text, &why)) {
            bad_value(ld, node, path, why.expected, text, raw, why.detail, NULL);
            return false;
        }
        copy = strdup(text);
        if (!copy) {
            note_oom(ld);
            return false;
        }
        free(*(char **)field);
        *(char **)field = copy;
        return true;
    }
    case CONFIG_TYPE_INT:
        status = config_parse_int(text, &number);
        break;
    case CONFIG_TYPE_DURATION:
        status = config_parse_duration(text, &number);
        break;
    case CONFIG_TYPE_SIZE:
        status = config_parse_size(text, &number);
        break;
    case CONFIG_TYPE_BOOL: {
        bool flag;
        if (config_parse_bool(text, &flag) != CONFIG_PARSE_OK) {
            bad_value(ld, node, path, "true or false", text, raw, NULL, NULL);
            return false;
        }
        *(bool *)field = flag;
        return true;
    }
    case CONFIG_TYPE_ENUM: {
        int value;
        char expected[CONFIG_KEY_LIST_MAX];
        if (!lookup_name(key, text, &value)) {
            describe_expected(key, expected, sizeof expected);
            bad_value(ld, node, path, expected, text, raw, NULL, suggest_name(key, text));
            return false;
        }
        *(int *)field = value;
        return true;
    }
    default:
        abort(); /* list types never reach set_scalar: a bug */
    }
    if (status == CONFIG_PARSE_OK && number < key->min) {
        bad_number(ld, key, node, path, text, raw, CONFIG_PARSE_RANGE, false);
        return false;
    }
    if (status == CONFIG_PARSE_OK && number > key->max)
        status = CONFIG_PARSE_RANGE;
    if (status != CONFIG_PARSE_OK) {
        bad_number(ld, key, node, path, text, raw, status, true);
        return false;
    }
    store_int(field, key->type == CONFIG_TYPE_INT ? key->size : sizeof(int64_t), number);
    return true;
}

/* ---- Defaults ---- */

/* Parse a list default ("[br, gzip]", or a single value) as YAML, like a user's value. */
static void apply_yaml_default(config_loader *ld, const config_key *key, void *obj, const char *text,
                               const char *path)
{
    yaml_parser_t parser;
    yaml_document_t doc;
    yaml_node_t *root;
    yaml_document_t *saved = ld->doc;

    if (!yaml_parser_initialize(&parser)) {
        note_oom(ld);
        return;
    }
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, strlen(text));
    if (!yaml_parser_load(&parser, &doc)) {
        config_error_at(ld, NULL, path, "expected a default in YAML, found %s", parser.problem);
        goto fail_parser;
    }
    root = yaml_document_get_root_node(&doc);
    ld->doc = &doc;
    if (root)
        load_value(ld, key, obj, root, path);
    ld->doc = saved;
    yaml_document_delete(&doc);
fail_parser:
    yaml_parser_delete(&parser);
}

/* Give KEY its default in OBJ (nothing when it has none). ANCHOR places a default's errors. */
static void apply_default(config_loader *ld, const config_key *key, void *obj, yaml_node_t *anchor,
                          const char *path)
{
    yaml_node_t *saved = ld->default_node;
    const char *text;

    if (key->flags & CONFIG_F_INHERIT) {
        store_int(field_of(obj, key->offset), key->size, -1);
        return;
    }
    text = key->def_fn ? key->def_fn(ld) : key->def;
    if (!text)
        return;
    ld->default_node = anchor;
    switch (key->type) {
    case CONFIG_TYPE_STRING:
    case CONFIG_TYPE_INT:
    case CONFIG_TYPE_DURATION:
    case CONFIG_TYPE_SIZE:
    case CONFIG_TYPE_BOOL:
    case CONFIG_TYPE_ENUM:
    case CONFIG_TYPE_JOINED:
        set_scalar(ld, key, obj, text, anchor, path, NULL);
        break;
    default:
        apply_yaml_default(ld, key, obj, text, path);
        break;
    }
    ld->default_node = saved;
}

/* ---- Mappings ---- */

static size_t pair_count(yaml_node_t *map)
{
    return (size_t)(map->data.mapping.pairs.top - map->data.mapping.pairs.start);
}

static size_t item_count(yaml_node_t *seq)
{
    return (size_t)(seq->data.sequence.items.top - seq->data.sequence.items.start);
}

static void unknown_key(config_loader *ld, const config_key *keys, yaml_node_t *k, const char *path,
                        const char *section)
{
    const char *candidates[CONFIG_SUGGEST_CANDIDATES_MAX];
    char names[CONFIG_KEY_LIST_MAX], where[CONFIG_PATH_MAX + 16], child[CONFIG_PATH_MAX];
    size_t n = 0;

    for (const config_key *c = keys; c->name && n < CONFIG_SUGGEST_CANDIDATES_MAX; c++)
        candidates[n++] = c->name;
    key_names(keys, names, sizeof names);
    if (*section)
        config_bprintf(where, sizeof where, "a key of %s", section);
    else
        config_bprintf(where, sizeof where, "a top-level key");
    path_join(child, path, scalar_of(k));
    {
        char expected[CONFIG_KEY_LIST_MAX + CONFIG_PATH_MAX + 32];
        config_bprintf(expected, sizeof expected, "%s (%s)", where, names);
        bad_value(ld, k, child, expected, scalar_of(k), NULL, NULL,
                  config_suggest(scalar_of(k), candidates, n));
    }
}

/* A key of a mapping being scanned for duplicates: its text and where it stands. */
typedef struct scan_entry {
    const char *key;
    size_t index;
} scan_entry;

static int scan_entry_order(const void *a, const void *b)
{
    const scan_entry *x = a, *y = b;
    int c = strcmp(x->key, y->key);

    if (c)
        return c;
    return x->index < y->index ? -1 : x->index > y->index;
}

/*
 * Report what is wrong with the keys of MAP itself: keys that are not scalars,
 * duplicates (naming the line of the first), and, when KEYS is given, keys the
 * table does not have. Duplicates are found by sorting, so a mapping of thousands
 * of upstreams costs n log n. When FIRST is given, *FIRST gets an array (caller
 * frees) saying for each pair whether it is the first of its key. Returns false
 * when MAP has too many keys to walk or memory ran out.
 */
static bool scan_mapping(config_loader *ld, yaml_node_t *map, const char *path, const config_key *keys,
                         bool **first)
{
    yaml_node_pair_t *pairs = map->data.mapping.pairs.start;
    size_t n = pair_count(map), scalars = 0;
    scan_entry *entries = NULL;
    bool *is_first = NULL;

    if (first)
        *first = NULL;
    if (n > CONFIG_MAPPING_PAIRS_MAX) {
        config_error_at(ld, map, *path ? path : "(top level)", "expected at most %d keys, found %zu",
                        CONFIG_MAPPING_PAIRS_MAX, n);
        return false;
    }
    entries = calloc(n ? n : 1, sizeof *entries);
    is_first = calloc(n ? n : 1, sizeof *is_first);
    if (!entries || !is_first) {
        note_oom(ld);
        goto fail;
    }
    for (size_t i = 0; i < n; i++) {
        yaml_node_t *k = node_get(ld, pairs[i].key);
        char found[32];

        if (!k)
            continue;
        if (k->type != YAML_SCALAR_NODE) {
            describe_found(k, found, sizeof found);
            config_error_at(ld, k, *path ? path : "(top level)", "expected a key name, found %s", found);
            continue;
        }
        entries[scalars].key = scalar_of(k);
        entries[scalars].index = i;
        scalars++;
    }
    qsort(entries, scalars, sizeof *entries, scan_entry_order);
    for (size_t i = 0, group = 0; i < scalars; i++) {
        size_t at = entries[i].index;
        yaml_node_t *k = node_get(ld, pairs[at].key);
        char child[CONFIG_PATH_MAX], quoted[CONFIG_QUOTE_CHARS_MAX * 4 + 8];

        /* Sorted by key then position: a group's first entry is the key's first occurrence. */
        if (i > 0 && strcmp(entries[group].key, entries[i].key) == 0) {
            path_join(child, path, entries[i].key);
            config_quote(entries[i].key, quoted, sizeof quoted);
            config_error_at(ld, k, child, "expected each key once, found %s again (first at line %zu)",
                            quoted, node_get(ld, pairs[entries[group].index].key)->start_mark.line + 1);
            continue;
        }
        group = i;
        is_first[at] = true;
        if (!keys)
            continue;
        bool known = false;
        for (const config_key *c = keys; c->name && !known; c++)
            known = strcmp(c->name, entries[i].key) == 0;
        if (!known)
            unknown_key(ld, keys, k, path, path);
    }
    free(entries);
    if (first)
        *first = is_first;
    else
        free(is_first);
    return true;

fail:
    free(entries);
    free(is_first);
    return false;
}

static void missing_key(config_loader *ld, const config_key *key, yaml_node_t *anchor, const char *path)
{
    char expected[CONFIG_MESSAGE_MAX / 2];

    describe_expected(key, expected, sizeof expected);
    config_error_at(ld, anchor, path, "expected %s (required), found no such key", expected);
}

/*
 * Fill OBJ from mapping MAP (NULL: empty or absent) by the rows of KEYS. PRESENT
 * says whether the section is in the file: an absent one only takes defaults and
 * reports no missing keys. ANCHOR is where missing-key errors point.
 */
static void load_section(config_loader *ld, const config_key *keys, void *obj, yaml_node_t *map,
                         yaml_node_t *anchor, const char *path, bool present)
{
    if (map && !scan_mapping(ld, map, path, keys, NULL))
        map = NULL;
    for (const config_key *k = keys; k->name; k++) {
        char child[CONFIG_PATH_MAX];
        yaml_node_t *value = map ? config_node_value(ld, map, k->name) : NULL;

        path_join(child, path, k->name);
        if (value) {
            load_value(ld, k, obj, value, child);
            continue;
        }
        if ((k->flags & CONFIG_F_REQUIRED) && present)
            missing_key(ld, k, anchor, child);
        if (k->type == CONFIG_TYPE_SECTION)
            load_section(ld, k->sub, field_of(obj, k->offset), NULL, anchor, child, false);
        else if (!((k->flags & CONFIG_F_REQUIRED) && present))
            apply_default(ld, k, obj, anchor, child);
    }
}

static void load_section_value(config_loader *ld, const config_key *key, void *obj, yaml_node_t *node,
                               const char *path)
{
    void *section = field_of(obj, key->offset);

    if (node->type != YAML_MAPPING_NODE && !node_is_null(node)) {
        wrong_type(ld, key, node, path);
        load_section(ld, key->sub, section, NULL, node, path, false);
        return;
    }
    if (key->flags & CONFIG_F_PRESENT)
        *(bool *)field_of(section, key->present_offset) = true;
    load_section(ld, key->sub, section, node->type == YAML_MAPPING_NODE ? node : NULL, node, path, true);
    if (key->check)
        key->check(ld, section, node, path);
}

/* A map of named items: postgres.databases, ratelimit.policies, upstreams. */
static void load_map(config_loader *ld, const config_key *key, void *obj, yaml_node_t *node, const char *path)
{
    void **array = field_of(obj, key->offset);
    size_t *count = field_of(obj, key->count_offset);
    yaml_node_pair_t *pairs;
    bool *first = NULL;
    char *items;
    size_t n;

    if (node_is_null(node))
        return;
    if (node->type != YAML_MAPPING_NODE) {
        wrong_type(ld, key, node, path);
        return;
    }
    if (!scan_mapping(ld, node, path, NULL, &first))
        return;
    n = pair_count(node);
    pairs = node->data.mapping.pairs.start;
    items = calloc(n ? n : 1, key->item_size);
    if (!items) {
        note_oom(ld);
        goto done;
    }
    *array = items;
    *count = 0;
    for (size_t i = 0; i < n; i++) {
        yaml_node_t *k = node_get(ld, pairs[i].key), *v = node_get(ld, pairs[i].value);
        char child[CONFIG_PATH_MAX], expected[CONFIG_MESSAGE_MAX / 2], found[CONFIG_QUOTE_CHARS_MAX * 4 + 8];
        config_why why;
        char *item, *name;

        if (!first[i] || !v)
            continue;
        path_join(child, path, scalar_of(k));
        memset(&why, 0, sizeof why);
        if (key->valid && !key->valid(scalar_of(k), &why))
            bad_value(ld, k, child, why.expected, scalar_of(k), NULL, why.detail, NULL);
        if (v->type != YAML_MAPPING_NODE && !node_is_null(v)) {
            describe_found(v, found, sizeof found);
            key_names(key->sub, expected, sizeof expected);
            config_error_at(ld, v, child, "expected a mapping with keys %s, found %s", expected, found);
            continue;
        }
        item = items + *count * key->item_size;
        name = strdup(scalar_of(k));
        if (!name) {
            note_oom(ld);
            goto done;
        }
        *(char **)field_of(item, key->name_offset) = name;
        (*count)++;
        load_section(ld, key->sub, item, v->type == YAML_MAPPING_NODE ? v : NULL, v, child, true);
        if (key->check)
            key->check(ld, item, v, child);
    }
done:
    free(first);
}

/* A list of items: routes. */
static void load_items(config_loader *ld, const config_key *key, void *obj, yaml_node_t *node,
                       const char *path)
{
    void **array = field_of(obj, key->offset);
    size_t *count = field_of(obj, key->count_offset);
    char *items;
    size_t n;

    if (node_is_null(node))
        return;
    if (node->type != YAML_SEQUENCE_NODE) {
        wrong_type(ld, key, node, path);
        return;
    }
    n = item_count(node);
    items = calloc(n ? n : 1, key->item_size);
    if (!items) {
        note_oom(ld);
        return;
    }
    *array = items;
    *count = 0;
    for (size_t i = 0; i < n; i++) {
        yaml_node_t *v = config_node_item(ld, node, i);
        char child[CONFIG_PATH_MAX], expected[CONFIG_MESSAGE_MAX / 2], found[CONFIG_QUOTE_CHARS_MAX * 4 + 8];
        char *item;

        path_index(child, path, i);
        if (!v)
            continue;
        if (v->type != YAML_MAPPING_NODE) {
            describe_found(v, found, sizeof found);
            key_names(key->sub, expected, sizeof expected);
            config_error_at(ld, v, child, "expected a %s (a mapping with keys %s), found %s", key->noun,
                            expected, found);
            continue;
        }
        item = items + *count * key->item_size;
        (*count)++;
        if (key->flags & CONFIG_F_LINE)
            *(int *)field_of(item, key->line_offset) = (int)v->start_mark.line + 1;
        load_section(ld, key->sub, item, v, v, child, true);
        if (key->check)
            key->check(ld, item, v, child);
    }
}

/* ---- Lists of scalars ---- */

static void describe_element(const config_key *key, char *buf, size_t len)
{
    char list[CONFIG_KEY_LIST_MAX];

    switch (key->type) {
    case CONFIG_TYPE_NUMBER_LIST:
        config_bprintf(buf, len, "a finite number");
        break;
    case CONFIG_TYPE_FLAGS:
        name_list(key->names, list, sizeof list);
        config_bprintf(buf, len, "one of %s", list);
        break;
    default:
        config_bprintf(buf, len, "%s", key->flags & CONFIG_F_EMPTY_OK ? "a string" : "a non-empty string");
        break;
    }
}

/*
 * One element of a STRING_LIST, NUMBER_LIST or FLAGS value: parse TEXT and add it
 * to the arrays being built. Returns false after reporting.
 */
static bool add_element(config_loader *ld, const config_key *key, const char *text, const char *raw,
                        yaml_node_t *node, const char *path, char **strings, double *numbers, size_t *stored,
                        unsigned *flags)
{
    char expected[CONFIG_KEY_LIST_MAX];
    config_why why;

    switch (key->type) {
    case CONFIG_TYPE_NUMBER_LIST:
        if (config_parse_number(text, &numbers[*stored]) != CONFIG_PARSE_OK) {
            bad_value(ld, node, path, "a finite number", text, raw, NULL, NULL);
            return false;
        }
        (*stored)++;
        return true;
    case CONFIG_TYPE_FLAGS: {
        int value;
        if (!lookup_name(key, text, &value)) {
            describe_element(key, expected, sizeof expected);
            bad_value(ld, node, path, expected, text, raw, NULL, suggest_name(key, text));
            return false;
        }
        *flags |= (unsigned)value;
        return true;
    }
    default:
        break;
    }
    if (!*text && !(key->flags & CONFIG_F_EMPTY_OK)) {
        bad_value(ld, node, path, "a non-empty string", text, raw, NULL, NULL);
        return false;
    }
    memset(&why, 0, sizeof why);
    if (*text && key->valid && !key->valid(text, &why)) {
        bad_value(ld, node, path, why.expected, text, raw, why.detail, NULL);
        return false;
    }
    if (key->flags & CONFIG_F_UNIQUE) {
        for (size_t i = 0; i < *stored; i++) {
            if (strcmp(strings[i], text) == 0) {
                char found[CONFIG_QUOTE_CHARS_MAX * 4 + 8];
                config_quote(text, found, sizeof found);
                config_error_at(ld, node, path, "expected each value once, found %s again", found);
                return false;
            }
        }
    }
    strings[*stored] = strdup(text);
    if (!strings[*stored]) {
        note_oom(ld);
        return false;
    }
    (*stored)++;
    return true;
}

/* STRING_LIST, NUMBER_LIST, FLAGS and the list form of JOINED. */
static void load_scalar_list(config_loader *ld, const config_key *key, void *obj, yaml_node_t *node,
                             const char *path)
{
    bool single = node->type == YAML_SCALAR_NODE && !node_is_null(node);
    size_t n, stored = 0, errors_before = ld->error_count;
    char **strings = NULL;
    double *numbers = NULL;
    unsigned flags = 0;

    if ((single && !(key->flags & CONFIG_F_SCALAR_OK)) || node->type == YAML_MAPPING_NODE) {
        wrong_type(ld, key, node, path);
        apply_default(ld, key, obj, node, path);
        return;
    }
    n = single ? 1 : node->type == YAML_SEQUENCE_NODE ? item_count(node) : 0;
    if (n < (size_t)key->min) {
        const char *noun = key->noun ? key->noun : "element";
        if (n == 0)
            config_error_at(ld, node, path, "expected at least %" PRId64 " %s%s, found an empty list",
                            key->min, noun, key->min > 1 ? "s" : "");
        else
            config_error_at(ld, node, path, "expected at least %" PRId64 " %ss, found %zu", key->min, noun,
                            n);
    }
    if (key->type == CONFIG_TYPE_NUMBER_LIST)
        numbers = calloc(n ? n : 1, sizeof *numbers);
    else
        strings = calloc(n ? n : 1, sizeof *strings);
    if (!numbers && !strings) {
        note_oom(ld);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        yaml_node_t *e = single ? node : config_node_item(ld, node, i);
        char child[CONFIG_PATH_MAX], expected[CONFIG_KEY_LIST_MAX], found[CONFIG_QUOTE_CHARS_MAX * 4 + 8];
        char *text;

        if (single)
            config_bprintf(child, sizeof child, "%s", path);
        else
            path_index(child, path, i);
        if (!e)
            continue;
        if (e->type != YAML_SCALAR_NODE || node_is_null(e)) {
            describe_element(key, expected, sizeof expected);
            describe_found(e, found, sizeof found);
            config_error_at(ld, e, child, "expected %s, found %s", expected, found);
            continue;
        }
        text = scalar_text(ld, e, child);
        if (!text)
            continue;
        add_element(ld, key, text, scalar_of(e), e, child, strings, numbers, &stored, &flags);
        free(text);
    }
    if (key->type == CONFIG_TYPE_FLAGS) {
        free(strings);
        *(unsigned *)field_of(obj, key->offset) = flags;
    } else if (key->type == CONFIG_TYPE_NUMBER_LIST) {
        *(double **)field_of(obj, key->offset) = numbers;
        *(size_t *)field_of(obj, key->count_offset) = stored;
    } else {
        *(char ***)field_of(obj, key->offset) = strings;
        *(size_t *)field_of(obj, key->count_offset) = stored;
    }
    if (key->check && ld->error_count == errors_before)
        key->check(ld, obj, node, path);
}

/* JOINED: a string, or a list of strings stored joined with '+' (ratelimit keys). */
static void load_joined(config_loader *ld, const config_key *key, void *obj, yaml_node_t *node,
                        const char *path)
{
    size_t n, len = 0, errors_before = ld->error_count;
    char *joined = NULL, **parts = NULL;
    config_why why;

    if (node->type != YAML_SEQUENCE_NODE) {
        char *text = scalar_text(ld, node, path);
        if (text) {
            if (!set_scalar(ld, key, obj, text, node, path, scalar_of(node)))
                apply_default(ld, key, obj, node, path);
            free(text);
        }
        return;
    }
    n = item_count(node);
    if (n == 0) {
        config_error_at(ld, node, path, "expected at least one %s, found an empty list", "string");
        return;
    }
    parts = calloc(n, sizeof *parts);
    if (!parts) {
        note_oom(ld);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        yaml_node_t *e = config_node_item(ld, node, i);
        char child[CONFIG_PATH_MAX], found[CONFIG_QUOTE_CHARS_MAX * 4 + 8];

        path_index(child, path, i);
        if (!e)
            continue;
        if (e->type != YAML_SCALAR_NODE || node_is_null(e)) {
            describe_found(e, found, sizeof found);
            config_error_at(ld, e, child, "expected a non-empty string, found %s", found);
            continue;
        }
        parts[i] = scalar_text(ld, e, child);
        if (!parts[i])
            continue;
        memset(&why, 0, sizeof why);
        if (!*parts[i] || (key->valid && !key->valid(parts[i], &why))) {
            bad_value(ld, e, child, *parts[i] ? why.expected : "a non-empty string", parts[i], scalar_of(e),
                      why.detail, NULL);
            continue;
        }
        len += strlen(parts[i]) + 1;
    }
    if (ld->error_count != errors_before)
        goto done;
    joined = malloc(len);
    if (!joined) {
        note_oom(ld);
        goto done;
    }
    joined[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        if (i)
            strcat(joined, "+");
        strcat(joined, parts[i]);
    }
    free(*(char **)field_of(obj, key->offset));
    *(char **)field_of(obj, key->offset) = joined;
done:
    for (size_t i = 0; i < n; i++)
        free(parts[i]);
    free(parts);
}

/* KV_MAP: a mapping of strings in file order (unless:, defaults:). */
static void load_kv(config_loader *ld, const config_key *key, void *obj, yaml_node_t *node, const char *path)
{
    config_kv **array = field_of(obj, key->offset);
    size_t *count = field_of(obj, key->count_offset), n, errors_before = ld->error_count;
    yaml_node_pair_t *pairs;
    bool *first = NULL;

    if (node_is_null(node))
        return;
    if (node->type != YAML_MAPPING_NODE) {
        wrong_type(ld, key, node, path);
        return;
    }
    if (!scan_mapping(ld, node, path, NULL, &first))
        return;
    n = pair_count(node);
    pairs = node->data.mapping.pairs.start;
    *array = calloc(n ? n : 1, sizeof **array);
    if (!*array) {
        note_oom(ld);
        goto done;
    }
    *count = 0;
    for (size_t i = 0; i < n; i++) {
        yaml_node_t *k = node_get(ld, pairs[i].key), *v = node_get(ld, pairs[i].value);
        char child[CONFIG_PATH_MAX], found[CONFIG_QUOTE_CHARS_MAX * 4 + 8];
        config_kv *kv;
        char *text;
        config_why why;

        if (!v || !first[i])
            continue;
        path_join(child, path, scalar_of(k));
        memset(&why, 0, sizeof why);
        if (key->valid && !key->valid(scalar_of(k), &why)) {
            bad_value(ld, k, child, why.expected, scalar_of(k), NULL, why.detail, NULL);
            continue;
        }
        if (v->type != YAML_SCALAR_NODE) {
            describe_found(v, found, sizeof found);
            config_error_at(ld, v, child, "expected a string, found %s", found);
            continue;
        }
        text = node_is_null(v) ? strdup("") : scalar_text(ld, v, child);
        if (!text)
            continue;
        kv = &(*array)[*count];
        kv->key = strdup(scalar_of(k));
        kv->value = text;
        (*count)++;
        if (!kv->key)
            note_oom(ld);
    }
    if (key->check && ld->error_count == errors_before)
        key->check(ld, obj, node, path);
done:
    free(first);
}

/* Load NODE, the value written for KEY, into OBJ (the struct that holds KEY). */
static void load_value(config_loader *ld, const config_key *key, void *obj, yaml_node_t *node,
                       const char *path)
{
    size_t errors_before = ld->error_count;
    char *text;

    switch (key->type) {
    case CONFIG_TYPE_SECTION:
        load_section_value(ld, key, obj, node, path);
        return;
    case CONFIG_TYPE_MAP:
        load_map(ld, key, obj, node, path);
        return;
    case CONFIG_TYPE_LIST:
        load_items(ld, key, obj, node, path);
        return;
    case CONFIG_TYPE_KV_MAP:
        load_kv(ld, key, obj, node, path);
        return;
    case CONFIG_TYPE_STRING_LIST:
    case CONFIG_TYPE_NUMBER_LIST:
    case CONFIG_TYPE_FLAGS:
        load_scalar_list(ld, key, obj, node, path);
        return;
    case CONFIG_TYPE_JOINED:
        if (node->type == YAML_MAPPING_NODE || node_is_null(node)) {
            wrong_type(ld, key, node, path);
            return;
        }
        load_joined(ld, key, obj, node, path);
        break;
    default:
        if (node->type != YAML_SCALAR_NODE) {
            wrong_type(ld, key, node, path);
            apply_default(ld, key, obj, node, path);
            return;
        }
        if (node_is_null(node)) {
            if (key->type == CONFIG_TYPE_STRING && (key->flags & CONFIG_F_EMPTY_OK)) {
                set_scalar(ld, key, obj, "", node, path, NULL);
            } else {
                wrong_type(ld, key, node, path);
                apply_default(ld, key, obj, node, path);
            }
            return;
        }
        text = scalar_text(ld, node, path);
        if (!text || !set_scalar(ld, key, obj, text, node, path, scalar_of(node)))
            apply_default(ld, key, obj, node, path);
        free(text);
        break;
    }
    if (key->check && ld->error_count == errors_before)
        key->check(ld, obj, node, path);
}

/* ---- The file ---- */

/* Read FILE whole. Returns a NUL-terminated buffer (caller frees) or NULL with errno set. */
static char *read_file(const char *file, size_t *len)
{
    FILE *f = fopen(file, "rb");
    char *buf = NULL, *grown;
    size_t cap = 0, n;
    int saved;

    *len = 0;
    if (!f)
        return NULL;
    for (;;) {
        if (*len + CONFIG_READ_CHUNK + 1 > cap) {
            cap = cap ? cap * 2 : CONFIG_READ_CHUNK * 2;
            if (cap > CONFIG_FILE_MAX_BYTES + CONFIG_READ_CHUNK * 2) {
                errno = EFBIG;
                goto fail;
            }
            grown = realloc(buf, cap);
            if (!grown) {
                errno = ENOMEM;
                goto fail;
            }
            buf = grown;
        }
        n = fread(buf + *len, 1, CONFIG_READ_CHUNK, f);
        *len += n;
        if (n < CONFIG_READ_CHUNK) {
            if (ferror(f))
                goto fail;
            break;
        }
        if (*len > CONFIG_FILE_MAX_BYTES) {
            errno = EFBIG;
            goto fail;
        }
    }
    buf[*len] = '\0';
    fclose(f);
    return buf;

fail:
    saved = errno ? errno : EIO;
    free(buf);
    fclose(f);
    errno = saved;
    return NULL;
}

static void syntax_error(config_loader *ld, yaml_parser_t *parser, const char *buf, size_t len)
{
    yaml_node_t where;
    char context[160] = "";

    memset(&where, 0, sizeof where);
    if (parser->error == YAML_MEMORY_ERROR) {
        note_oom(ld);
        return;
    }
    if (parser->error == YAML_READER_ERROR) {
        /* The reader gives an offset, not a mark: count lines up to it. */
        size_t line = 0, col = 0;
        for (size_t i = 0; i < parser->problem_offset && i < len; i++) {
            if (buf[i] == '\n') {
                line++;
                col = 0;
            } else if (((unsigned char)buf[i] & 0xc0) != 0x80) {
                col++;
            }
        }
        where.start_mark.line = line;
        where.start_mark.column = col;
    } else {
        where.start_mark = parser->problem_mark;
        if (parser->context)
            config_bprintf(context, sizeof context, " (%s at line %zu column %zu)", parser->context,
                           parser->context_mark.line + 1, parser->context_mark.column + 1);
    }
    config_error_at(ld, &where, "(syntax)", "expected valid YAML, found a syntax error: %s%s",
                    parser->problem ? parser->problem : "unknown", context);
}

config_t *config_load(const char *file, char **errors)
{
    config_loader ld;
    yaml_parser_t parser;
    yaml_document_t extra;
    bool parser_ready = false, doc_ready = false;
    config_t *cfg = NULL;
    yaml_node_t *root, *extra_root;
    char *buf = NULL, found[CONFIG_QUOTE_CHARS_MAX * 4 + 8];
    size_t len = 0;

    memset(&ld, 0, sizeof ld);
    ld.file = file;
    ld.doc = &ld.file_doc;
    if (errors)
        *errors = NULL;
    cfg = calloc(1, sizeof *cfg);
    if (!cfg || !(cfg->file = strdup(file))) {
        note_oom(&ld);
        goto done;
    }
    ld.cfg = cfg;

    buf = read_file(file, &len);
    if (!buf) {
        config_error_at(&ld, NULL, "(file)", "expected a readable file, found it unreadable (%s)",
                        strerror(errno));
        goto done;
    }
    if (!yaml_parser_initialize(&parser)) {
        note_oom(&ld);
        goto done;
    }
    parser_ready = true;
    yaml_parser_set_input_string(&parser, (const unsigned char *)buf, len);
    if (!yaml_parser_load(&parser, &ld.file_doc)) {
        syntax_error(&ld, &parser, buf, len);
        goto done;
    }
    doc_ready = true;
    root = yaml_document_get_root_node(&ld.file_doc);
    if (!root) {
        config_error_at(&ld, NULL, "(top level)",
                        "expected a mapping of sections (server, upstreams, routes, ...), "
                        "found an empty file");
        goto done;
    }
    if (!yaml_parser_load(&parser, &extra)) {
        syntax_error(&ld, &parser, buf, len);
    } else {
        extra_root = yaml_document_get_root_node(&extra);
        if (extra_root)
            config_error_at(&ld, extra_root, "(top level)", "expected one YAML document, found a second");
        yaml_document_delete(&extra);
    }
    if (root->type != YAML_MAPPING_NODE) {
        describe_found(root, found, sizeof found);
        config_error_at(&ld, root, "(top level)",
                        "expected a mapping of sections (server, upstreams, routes, ...), found %s", found);
        goto done;
    }
    ld.has_redis = config_node_value(&ld, root, "redis") != NULL;
    load_section(&ld, config_root_keys, cfg, root, root, "", true);

done:
    if (doc_ready)
        yaml_document_delete(&ld.file_doc);
    if (parser_ready)
        yaml_parser_delete(&parser);
    free(buf);
    if (ld.error_count || ld.out_of_memory) {
        if (errors)
            *errors = errors_join(&ld);
        config_free(cfg);
        cfg = NULL;
    }
    errors_free(&ld);
    return cfg;
}

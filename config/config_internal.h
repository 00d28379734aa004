/*
 * config_internal.h - private to config/: the shape of the key table, the scalar
 * parsers, and the loader's error and node helpers that the validation rules use.
 *
 * Only files in config/ and the config unit tests include this. The one idea: a key
 * is a row of data (name, type, default as text, where it is stored, reloadable,
 * help); the loader, config_free, config_unreloadable_changes, config_show_json and
 * config_print_reference are walks over the same rows, so a key is added in one place.
 * Everything here runs on the thread that calls config_load (the main thread).
 */
#ifndef GATEWAY_CONFIG_INTERNAL_H
#define GATEWAY_CONFIG_INTERNAL_H

#include "config/config.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <yaml.h>

/* snprintf for messages, where cutting a long text short is the intended outcome. */
void config_bprintf(char *buf, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* ---- Scalar parsers (values.c). Pure functions; they never print. ---- */

typedef enum {
    CONFIG_PARSE_OK,
    CONFIG_PARSE_SYNTAX,   /* not a value of this kind at all */
    CONFIG_PARSE_RANGE,    /* well formed but does not fit in int64 */
    CONFIG_PARSE_FRACTION, /* a decimal that is not a whole number of the base unit */
} config_parse_status;

#define CONFIG_MS_PER_SECOND INT64_C(1000)
#define CONFIG_MS_PER_MINUTE INT64_C(60000)
#define CONFIG_MS_PER_HOUR INT64_C(3600000)
#define CONFIG_KIB INT64_C(1024)
#define CONFIG_MIB (INT64_C(1024) * 1024)
#define CONFIG_GIB (INT64_C(1024) * 1024 * 1024)
#define CONFIG_TIB (INT64_C(1024) * 1024 * 1024 * 1024)
/* Longest duration any key accepts: ten years, so now + duration never overflows. */
#define CONFIG_DURATION_MAX_MS (INT64_C(87600) * CONFIG_MS_PER_HOUR)

/* Decimal integer, optional leading '-'. No '+', no hex, no '_', no spaces. */
config_parse_status config_parse_int(const char *text, int64_t *out);
/* "250ms", "5s", "1.5s", "10m", "1h"; a bare number only when it is 0. Milliseconds. */
config_parse_status config_parse_duration(const char *text, int64_t *out_ms);
/* "512", "512B", "16KiB", "10MiB", "1GiB", "1TiB" (powers of 1024), "16KB", "10MB",
 * "1GB", "1TB" (powers of 1000); decimals allowed when they come to whole bytes. */
config_parse_status config_parse_size(const char *text, int64_t *out_bytes);
/* true/false, yes/no, on/off, in lower case, Capitalised or UPPER case. */
config_parse_status config_parse_bool(const char *text, bool *out);
/* A finite decimal number ("0.25", "10", "1e-3"); no hex, inf or nan. */
config_parse_status config_parse_number(const char *text, double *out);

/* Render a value back in the file's units, the largest unit that divides it exactly:
 * 30000 -> "30s", 250 -> "250ms", 0 -> "0s"; 16384 -> "16KiB", 1000 -> "1000". */
void config_format_duration(int64_t ms, char *buf, size_t len);
void config_format_size(int64_t bytes, char *buf, size_t len);

typedef enum {
    CONFIG_ENV_OK,
    CONFIG_ENV_UNSET,        /* ${NAME} without a default and NAME is not set */
    CONFIG_ENV_UNTERMINATED, /* "${" without its "}" */
    CONFIG_ENV_BAD_NAME,     /* "${" not followed by NAME} or NAME:-default} */
    CONFIG_ENV_NOMEM,
} config_env_status;

/*
 * Expand ${NAME} and ${NAME:-default} in TEXT from the environment. "$${" is a
 * literal "${". ${NAME:-default} uses the default when NAME is unset or empty (as
 * the shell does); ${NAME} set to "" expands to "". On CONFIG_ENV_OK *out is a new
 * string (caller frees); otherwise *out is NULL and DETAIL holds the variable name
 * (UNSET) or the offending text (the others).
 */
config_env_status config_env_expand(const char *text, char **out, char *detail, size_t detail_len);

/* ---- The key table (table.c). ---- */

typedef enum {
    CONFIG_TYPE_STRING,
    CONFIG_TYPE_INT,         /* int or int64_t (see size), range min..max */
    CONFIG_TYPE_DURATION,    /* int64_t milliseconds, range min..max */
    CONFIG_TYPE_SIZE,        /* int64_t bytes, range min..max */
    CONFIG_TYPE_BOOL,        /* bool */
    CONFIG_TYPE_ENUM,        /* an enum (int sized), names in .names */
    CONFIG_TYPE_FLAGS,       /* unsigned: a list of names from .names, OR-ed */
    CONFIG_TYPE_STRING_LIST, /* char ** + size_t count at .count_offset */
    CONFIG_TYPE_NUMBER_LIST, /* double * + size_t count at .count_offset */
    CONFIG_TYPE_JOINED,      /* char *: a string, or a list of strings joined with '+' */
    CONFIG_TYPE_KV_MAP,      /* config_kv * + size_t count: a mapping of strings */
    CONFIG_TYPE_SECTION,     /* a nested table over the struct at .offset */
    CONFIG_TYPE_MAP,         /* named items: item array + count; the name at .name_offset */
    CONFIG_TYPE_LIST,        /* a list of items: item array + count */
} config_type;

#define CONFIG_F_REQUIRED 0x001  /* an error when absent (and the enclosing section is there) */
#define CONFIG_F_RESTART 0x002   /* a change needs a restart (not reloadable) */
#define CONFIG_F_EMPTY_OK 0x004  /* a string may be "" (and a bare `key:` means "") */
#define CONFIG_F_SCALAR_OK 0x008 /* a list may be written as a single value */
#define CONFIG_F_SECRET 0x010    /* redacted by config_show_json */
#define CONFIG_F_INHERIT 0x020   /* when absent store -1: "use the section-wide value" */
#define CONFIG_F_NOCASE 0x040    /* enum and flag names match in any case */
#define CONFIG_F_UNIQUE 0x080    /* list elements may not repeat */
#define CONFIG_F_PRESENT 0x100   /* SECTION: set the bool at .present_offset when it is in the file */
#define CONFIG_F_LINE 0x200      /* LIST: store the item's 1-based line in the int at .line_offset */
#define CONFIG_F_URL 0x400       /* a URL whose user:password part config_show_json redacts */

typedef struct config_name {
    const char *name;
    int value;
} config_name;

typedef struct config_loader config_loader;

/* A value check's verdict: what was expected, and optionally why it failed. */
typedef struct config_why {
    char expected[256];
    char detail[256];
} config_why;

/* Validate one string value (after ${VAR} expansion). Returns false and fills WHY. */
typedef bool (*config_valid_fn)(const char *value, config_why *why);
/* Check a filled object against its node: a section's struct, a map or list item,
 * or (for other types) the struct holding the key. Reports through config_error_at. */
typedef void (*config_check_fn)(config_loader *ld, void *obj, yaml_node_t *node, const char *path);
/* A default computed from what is already loaded; returns text for the key's parser. */
typedef const char *(*config_default_fn)(config_loader *ld);

typedef struct config_key {
    const char *name;
    config_type type;
    unsigned flags;
    size_t offset;       /* into the enclosing struct; SECTION: where its struct starts */
    size_t size;         /* storage size for INT */
    size_t count_offset; /* lists and maps: the size_t count, in the enclosing struct */
    const char *def;     /* default as text, parsed like user input; NULL: none */
    config_default_fn def_fn;
    const char *def_doc; /* what the reference prints when the default is computed */
    int64_t min, max;    /* INT, DURATION, SIZE: range; lists: min is the fewest elements */
    const config_name *names;
    const struct config_key *sub; /* SECTION, MAP, LIST: the nested table */
    size_t item_size;             /* MAP, LIST */
    size_t name_offset;           /* MAP: the item's char *name */
    size_t present_offset;        /* SECTION with CONFIG_F_PRESENT: a bool in the section struct */
    size_t line_offset;           /* LIST with CONFIG_F_LINE: an int in the item */
    config_valid_fn valid;        /* per string value; MAP: per item name; KV_MAP: per key */
    config_check_fn check;
    const char *noun; /* MAP, LIST: what one item is ("upstream", "route") */
    const char *help;
} config_key;

/* The top-level table; ends with a row whose name is NULL. */
extern const config_key config_root_keys[];

/* Method names, for FLAGS and config_method_name. */
extern const config_name config_method_names[];

/* ---- Loader services for the rules (load.c). ---- */

struct config_loader {
    const char *file;
    yaml_document_t *doc; /* the document node ids resolve in (the file, or a default's) */
    yaml_document_t file_doc;
    config_t *cfg;
    bool has_redis;            /* the file has a redis: section */
    yaml_node_t *default_node; /* while parsing a default: where its errors point */
    struct config_error *errors;
    size_t error_count;
    size_t error_cap;
    size_t errors_dropped;
    bool out_of_memory;
    char default_text[64]; /* a computed default's text */
};

/* Add "FILE:LINE:COL: PATH: MESSAGE" at NODE (NULL: line 1, column 1). */
void config_error_at(config_loader *ld, const yaml_node_t *node, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* The value of KEY in mapping MAP (the first one), or NULL; MAP may be NULL or not a mapping. */
yaml_node_t *config_node_value(config_loader *ld, yaml_node_t *map, const char *key);
/* The key node of KEY in MAP, or NULL. */
yaml_node_t *config_node_key(config_loader *ld, yaml_node_t *map, const char *key);
/* Element I of sequence SEQ, or NULL (also when SEQ is a scalar written for a list). */
yaml_node_t *config_node_item(config_loader *ld, yaml_node_t *seq, size_t i);
/* The first of two nodes in the file (either may be NULL). */
yaml_node_t *config_node_first(yaml_node_t *a, yaml_node_t *b);

/* Quote VALUE for a message: "value" with escapes, cut with "..." past a limit. */
void config_quote(const char *value, char *buf, size_t len);

/*
 * The closest of CANDIDATES (N of them) to WORD by edit distance when it is close
 * enough to be a likely typo, else NULL. Case differences count as nothing.
 */
const char *config_suggest(const char *word, const char *const *candidates, size_t n);

/* Edit distance (insert, delete, substitute, swap adjacent), case-insensitive. */
size_t config_edit_distance(const char *a, const char *b);

/* ---- Rules (rules.c), referenced from the table. ---- */

bool config_valid_address(const char *value, config_why *why);
bool config_valid_readable_file(const char *value, config_why *why);
bool config_valid_http_path(const char *value, config_why *why);
bool config_valid_redis_url(const char *value, config_why *why);
bool config_valid_port(const char *value, config_why *why);
bool config_valid_label(const char *value, config_why *why);
bool config_valid_algorithm(const char *value, config_why *why);
bool config_valid_media_type(const char *value, config_why *why);
bool config_valid_policy_key(const char *value, config_why *why);
bool config_valid_cidr(const char *value, config_why *why);
bool config_valid_route_path(const char *value, config_why *why);
bool config_valid_route_prefix(const char *value, config_why *why);
bool config_valid_param_source(const char *value, config_why *why);
bool config_valid_unless_condition(const char *value, config_why *why);
bool config_valid_sql_default(const char *value, config_why *why);

void config_check_buckets(config_loader *ld, void *obj, yaml_node_t *node, const char *path);
void config_check_admin(config_loader *ld, void *obj, yaml_node_t *node, const char *path);
void config_check_postgres(config_loader *ld, void *obj, yaml_node_t *node, const char *path);
void config_check_cache(config_loader *ld, void *obj, yaml_node_t *node, const char *path);
void config_check_ratelimit(config_loader *ld, void *obj, yaml_node_t *node, const char *path);
void config_check_match(config_loader *ld, void *obj, yaml_node_t *node, const char *path);
void config_check_route(config_loader *ld, void *obj, yaml_node_t *node, const char *path);

const char *config_default_store_cache(config_loader *ld);
const char *config_default_store_ratelimit(config_loader *ld);
const char *config_default_route_ttl(config_loader *ld);

/* The :param names of a route path, in order; returns how many (at most MAX). */
size_t config_path_params(const char *path, const char **names, size_t *lens, size_t max);

#endif

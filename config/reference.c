/*
 * reference.c - config_print_reference: the key table as Markdown, for the README's
 * configuration reference and `gateway --help-config`-style output.
 *
 * Runs on whatever thread calls it; it only reads the table. The one idea: the docs
 * are generated from the same rows the loader obeys, so they cannot drift. Every key
 * gets one row under its full dotted path; items of maps appear as `<name>` and items
 * of lists as `[]` (`upstreams.<name>.timeout`, `routes[].match.path`).
 */
#include "config/config_internal.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#define CONFIG_REFERENCE_PATH_MAX 256
#define CONFIG_REFERENCE_CELL_MAX 512

/* Write TEXT into a table cell: '|' would end the cell and, outside `code`, '<' could
 * start an HTML tag, so both are escaped. */
static void put_cell(FILE *out, const char *text)
{
    bool code = false;

    for (const char *p = text; *p; p++) {
        if (*p == '`')
            code = !code;
        if (*p == '|')
            fputs("\\|", out);
        else if (*p == '\n')
            fputc(' ', out);
        else if (*p == '<' && !code)
            fputs("&lt;", out);
        else
            fputc(*p, out);
    }
}

static void names_text(const config_name *names, char *buf, size_t len)
{
    size_t at = 0;

    buf[0] = '\0';
    for (const config_name *n = names; n->name && at < len; n++) {
        int w = snprintf(buf + at, len - at, "%s%s", at ? (n[1].name ? ", " : " or ") : "", n->name);
        if (w < 0)
            return;
        at += (size_t)w;
    }
}

static void type_text(const config_key *key, char *buf, size_t len)
{
    char lo[32], hi[32], names[CONFIG_REFERENCE_CELL_MAX / 2];

    switch (key->type) {
    case CONFIG_TYPE_STRING:
        config_bprintf(buf, len, "string");
        break;
    case CONFIG_TYPE_INT:
        config_bprintf(buf, len, "integer %" PRId64 "..%" PRId64, key->min, key->max);
        break;
    case CONFIG_TYPE_DURATION:
        if (key->min == 1)
            config_bprintf(buf, len, "duration > 0");
        else
            config_bprintf(buf, len, "duration (0 allowed)");
        break;
    case CONFIG_TYPE_SIZE:
        config_format_size(key->min, lo, sizeof lo);
        config_format_size(key->max, hi, sizeof hi);
        config_bprintf(buf, len, "size %s..%s", lo, hi);
        break;
    case CONFIG_TYPE_BOOL:
        config_bprintf(buf, len, "bool");
        break;
    case CONFIG_TYPE_ENUM:
        names_text(key->names, names, sizeof names);
        config_bprintf(buf, len, "%s", names);
        break;
    case CONFIG_TYPE_FLAGS:
        names_text(key->names, names, sizeof names);
        config_bprintf(buf, len, "list of %s", names);
        break;
    case CONFIG_TYPE_STRING_LIST:
        config_bprintf(buf, len, "%s",
                       key->flags & CONFIG_F_SCALAR_OK ? "string or list of strings" : "list of strings");
        break;
    case CONFIG_TYPE_NUMBER_LIST:
        config_bprintf(buf, len, "list of numbers");
        break;
    case CONFIG_TYPE_JOINED:
        config_bprintf(buf, len, "string or list of strings");
        break;
    case CONFIG_TYPE_KV_MAP:
        config_bprintf(buf, len, "map of strings");
        break;
    case CONFIG_TYPE_SECTION:
        config_bprintf(buf, len, "section");
        break;
    case CONFIG_TYPE_MAP:
        config_bprintf(buf, len, "map of %s by name", key->noun);
        break;
    case CONFIG_TYPE_LIST:
        config_bprintf(buf, len, "list of %ss", key->noun);
        break;
    }
}

/* Whether any key under KEYS needs a restart, and whether any does not. */
static void reloadability(const config_key *keys, bool *some_restart, bool *some_reload)
{
    for (const config_key *k = keys; k->name; k++) {
        if (k->sub)
            reloadability(k->sub, some_restart, some_reload);
        else if (k->flags & CONFIG_F_RESTART)
            *some_restart = true;
        else
            *some_reload = true;
    }
}

static void print_keys(FILE *out, const config_key *keys, const char *prefix)
{
    for (const config_key *k = keys; k->name; k++) {
        char path[CONFIG_REFERENCE_PATH_MAX], type[CONFIG_REFERENCE_CELL_MAX], def[CONFIG_REFERENCE_CELL_MAX];
        const char *reload = k->flags & CONFIG_F_RESTART ? "no" : "yes";

        config_bprintf(path, sizeof path, "%s%s", prefix, k->name);
        type_text(k, type, sizeof type);
        if (k->flags & CONFIG_F_REQUIRED)
            config_bprintf(def, sizeof def, "required");
        else if (k->def && !k->def_fn)
            config_bprintf(def, sizeof def, "`%s`", *k->def ? k->def : "\"\"");
        else if (k->def_doc)
            config_bprintf(def, sizeof def, "%s", k->def_doc);
        else if (k->sub)
            config_bprintf(def, sizeof def, "%s", k->type == CONFIG_TYPE_SECTION ? "" : "none");
        else
            config_bprintf(def, sizeof def, "none");
        if (k->sub) {
            bool some_restart = false, some_reload = false;
            reloadability(k->sub, &some_restart, &some_reload);
            reload = some_restart ? (some_reload ? "partly" : "no") : "yes";
        }
        fprintf(out, "| `%s` | ", path);
        put_cell(out, type);
        fputs(" | ", out);
        put_cell(out, def);
        fprintf(out, " | %s | ", reload);
        put_cell(out, k->help ? k->help : "");
        fputs(" |\n", out);

        if (k->type == CONFIG_TYPE_SECTION)
            config_bprintf(path, sizeof path, "%s%s.", prefix, k->name);
        else if (k->type == CONFIG_TYPE_MAP)
            config_bprintf(path, sizeof path, "%s%s.<name>.", prefix, k->name);
        else if (k->type == CONFIG_TYPE_LIST)
            config_bprintf(path, sizeof path, "%s%s[].", prefix, k->name);
        if (k->sub)
            print_keys(out, k->sub, path);
    }
}

void config_print_reference(FILE *out)
{
    fputs("Durations are a number and a unit: `250ms`, `5s`, `1.5s`, `10m`, `1h` (a bare number only for "
          "`0`).\n"
          "Sizes are bytes: `512`, or with a unit: `B`, `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024) or `KB`, "
          "`MB`,\n"
          "`GB`, `TB` (powers of 1000); decimals are fine when they come to whole bytes (`1.5KiB`).\n"
          "Any value may use `${VAR}` or `${VAR:-default}` (the default also when VAR is empty); `$${` is a\n"
          "literal `${`. A `${VAR}` that is unset and has no default is an error.\n"
          "Keys marked reloadable change on SIGHUP or `POST /admin/reload`; the others need a restart.\n\n",
          out);
    fputs("| Key | Type | Default | Reloadable | Description |\n", out);
    fputs("|---|---|---|---|---|\n", out);
    print_keys(out, config_root_keys, "");
}

/*
 * render.c - the Prometheus text exposition (format 0.0.4) and metrics_value().
 *
 * Threads: runs on whichever thread serves /metrics (or a test), concurrently with
 * the owner threads recording into their shards. It takes no lock.
 *
 * The one idea: a scrape first takes a snapshot of series pointers by walking the
 * published shard and series lists with acquire loads, sorts the snapshot by family
 * name then label values so that equal label sets from different shards sit side by
 * side, and then merges each run of equal series into one line while reading the
 * values with relaxed atomic loads. A value may move while we read; each word is
 * read whole, and a histogram's _count is the total of the bucket counts we read, so
 * a scrape is always self-consistent even when it is a few observations behind.
 */
#include "metrics/metrics_internal.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* First allocation of the exposition text; it doubles as needed. */
#define RENDER_INITIAL_BYTES 4096
/* First allocation of the series snapshot, in pointers. */
#define SNAPSHOT_INITIAL_SERIES 256

char *metrics_format_double(char *buf, double v)
{
    if (isnan(v)) {
        memcpy(buf, "NaN", sizeof "NaN");
        return buf;
    }
    if (isinf(v)) {
        memcpy(buf, v > 0 ? "+Inf" : "-Inf", sizeof "+Inf");
        return buf;
    }
    /* 15 significant digits print every value that has a shorter exact form the
     * same way (%g drops trailing zeros); 17 always round-trip. Take the first
     * precision that reads back as the same double. */
    for (int precision = 15; precision <= 17; precision++) {
        snprintf(buf, METRICS_NUMBER_BYTES, "%.*g", precision, v);
        if (strtod(buf, NULL) == v)
            break;
    }
    return buf;
}

/* The growing text buffer. After an allocation failure it keeps `failed` and
 * ignores further appends; the caller sees NULL at the end. */
typedef struct {
    char *data;
    size_t len;
    size_t cap;
    bool failed;
} render_buf;

/* Has the metrics_append_fn signature, so collectors write through it too. */
static void buf_append(void *out, const char *text, size_t len)
{
    render_buf *b = out;
    if (b->failed)
        return;
    if (len >= b->cap - b->len) {
        size_t cap = b->cap;
        while (len >= cap - b->len)
            cap *= 2;
        char *data = realloc(b->data, cap);
        if (!data) {
            b->failed = true;
            return;
        }
        b->data = data;
        b->cap = cap;
    }
    memcpy(b->data + b->len, text, len);
    b->len += len;
    b->data[b->len] = '\0';
}

static void buf_puts(render_buf *b, const char *s)
{
    buf_append(b, s, strlen(s));
}

/* Append s with backslash and newline escaped, and the double quote too when
 * escape_quote (label values; HELP text leaves quotes alone). */
static void buf_put_escaped(render_buf *b, const char *s, bool escape_quote)
{
    const char *run = s;
    for (const char *p = s;; p++) {
        const char *escape = NULL;
        if (*p == '\\')
            escape = "\\\\";
        else if (*p == '\n')
            escape = "\\n";
        else if (*p == '"' && escape_quote)
            escape = "\\\"";
        else if (*p != '\0')
            continue;
        buf_append(b, run, (size_t)(p - run));
        if (!escape)
            return;
        buf_puts(b, escape);
        run = p + 1;
    }
}

static void buf_put_double(render_buf *b, double v)
{
    char number[METRICS_NUMBER_BYTES];
    buf_puts(b, metrics_format_double(number, v));
}

static void buf_put_u64(render_buf *b, uint64_t v)
{
    char number[METRICS_NUMBER_BYTES];
    snprintf(number, sizeof number, "%" PRIu64, v);
    buf_puts(b, number);
}

/* Collect every published series of every shard. *out is malloc'd, caller frees.
 * Returns 0, or -1 on allocation failure. */
static int snapshot_series(metrics_registry_t *reg, metrics_series_t ***out, size_t *count)
{
    size_t cap = SNAPSHOT_INITIAL_SERIES, n = 0;
    metrics_series_t **all = malloc(cap * sizeof *all);
    if (!all)
        return -1;
    for (metrics_shard_t *shard = atomic_load_explicit(&reg->shards, memory_order_acquire); shard;
         shard = shard->next) {
        for (metrics_series_t *s = atomic_load_explicit(&shard->series, memory_order_acquire); s;
             s = s->next) {
            if (n == cap) {
                metrics_series_t **grown = realloc(all, cap * 2 * sizeof *all);
                if (!grown)
                    goto fail;
                all = grown;
                cap *= 2;
            }
            all[n++] = s;
        }
    }
    *out = all;
    *count = n;
    return 0;

fail:
    free(all);
    return -1;
}

static int compare_labels(const metrics_series_t *a, const metrics_series_t *b)
{
    for (size_t i = 0; i < a->family->label_count; i++) {
        int c = strcmp(a->label_values[i], b->label_values[i]);
        if (c != 0)
            return c;
    }
    return 0;
}

/* Family name first (names are unique, so equal names mean the same family), then
 * label values in the family's label order. */
static int compare_series(const void *pa, const void *pb)
{
    const metrics_series_t *a = *(metrics_series_t *const *)pa;
    const metrics_series_t *b = *(metrics_series_t *const *)pb;
    if (a->family != b->family)
        return strcmp(a->family->name, b->family->name);
    return compare_labels(a, b);
}

/* The merge of one label set across shards. */
typedef struct {
    uint64_t count;    /* counter value; histogram observation count */
    double value;      /* gauge value; histogram sum */
    uint64_t *buckets; /* histogram: bucket_count + 1 non-cumulative counts, caller's space */
} merged_value;

static void merge_start(const metrics_family_t *family, merged_value *m)
{
    m->count = 0;
    m->value = 0.0;
    if (family->type == METRICS_HISTOGRAM && m->buckets)
        memset(m->buckets, 0, (family->bucket_count + 1) * sizeof *m->buckets);
}

/* Fold series s into m; `first` says whether s is the first of its label set. */
static void merge_add(const metrics_family_t *family, merged_value *m, const metrics_series_t *s, bool first)
{
    uint64_t word = atomic_load_explicit(&s->value, memory_order_relaxed);
    switch (family->type) {
    case METRICS_COUNTER:
        m->count += word;
        break;
    case METRICS_GAUGE: {
        double v = metrics_bits_to_double(word);
        if (first)
            m->value = v;
        else if (family->merge == METRICS_MERGE_MAX)
            m->value = fmax(m->value, v);
        else if (family->merge == METRICS_MERGE_MIN)
            m->value = fmin(m->value, v);
        else
            m->value += v;
        break;
    }
    case METRICS_HISTOGRAM:
        m->value += metrics_bits_to_double(word);
        for (size_t i = 0; i <= family->bucket_count; i++) {
            uint64_t n = atomic_load_explicit(&s->bucket_counts[i], memory_order_relaxed);
            if (m->buckets)
                m->buckets[i] += n;
            m->count += n;
        }
        break;
    }
}

/* {name="value",...} with an optional trailing le; nothing at all when empty. */
static void put_labels(render_buf *b, const metrics_series_t *s, const char *le)
{
    const metrics_family_t *family = s->family;
    if (family->label_count == 0 && !le)
        return;
    buf_puts(b, "{");
    for (size_t i = 0; i < family->label_count; i++) {
        if (i > 0)
            buf_puts(b, ",");
        buf_puts(b, family->label_names[i]);
        buf_puts(b, "=\"");
        buf_put_escaped(b, s->label_values[i], true);
        buf_puts(b, "\"");
    }
    if (le) {
        buf_puts(b, family->label_count > 0 ? ",le=\"" : "le=\"");
        buf_puts(b, le);
        buf_puts(b, "\"");
    }
    buf_puts(b, "}");
}

static void put_family_header(render_buf *b, const metrics_family_t *family)
{
    static const char *const type_names[] = {
        [METRICS_COUNTER] = "counter", [METRICS_GAUGE] = "gauge", [METRICS_HISTOGRAM] = "histogram"};
    if (family->help[0] != '\0') {
        buf_puts(b, "# HELP ");
        buf_puts(b, family->name);
        buf_puts(b, " ");
        buf_put_escaped(b, family->help, false);
        buf_puts(b, "\n");
    }
    buf_puts(b, "# TYPE ");
    buf_puts(b, family->name);
    buf_puts(b, " ");
    buf_puts(b, type_names[family->type]);
    buf_puts(b, "\n");
}

/* One label set: a line for counters and gauges, the bucket/sum/count block for
 * histograms. s supplies the labels. */
static void put_series(render_buf *b, const metrics_series_t *s, const merged_value *m)
{
    const metrics_family_t *family = s->family;
    if (family->type != METRICS_HISTOGRAM) {
        buf_puts(b, family->name);
        put_labels(b, s, NULL);
        buf_puts(b, " ");
        if (family->type == METRICS_COUNTER)
            buf_put_u64(b, m->count);
        else
            buf_put_double(b, m->value);
        buf_puts(b, "\n");
        return;
    }
    uint64_t cumulative = 0;
    char le[METRICS_NUMBER_BYTES];
    for (size_t i = 0; i <= family->bucket_count; i++) {
        cumulative += m->buckets[i];
        if (i < family->bucket_count)
            metrics_format_double(le, family->buckets[i]);
        else
            memcpy(le, "+Inf", sizeof "+Inf");
        buf_puts(b, family->name);
        buf_puts(b, "_bucket");
        put_labels(b, s, le);
        buf_puts(b, " ");
        buf_put_u64(b, cumulative);
        buf_puts(b, "\n");
    }
    buf_puts(b, family->name);
    buf_puts(b, "_sum");
    put_labels(b, s, NULL);
    buf_puts(b, " ");
    buf_put_double(b, m->value);
    buf_puts(b, "\n");
    buf_puts(b, family->name);
    buf_puts(b, "_count");
    put_labels(b, s, NULL);
    buf_puts(b, " ");
    buf_put_u64(b, cumulative);
    buf_puts(b, "\n");
}

/* Render the families (sorted by name) from a sorted snapshot. */
static void put_families(render_buf *b, const metrics_registry_t *reg, metrics_series_t **series, size_t n,
                         uint64_t *scratch)
{
    size_t next = 0;
    for (size_t f = 0; f < reg->family_count; f++) {
        const metrics_family_t *family = reg->families[f];
        put_family_header(b, family);
        while (next < n && series[next]->family == family) {
            merged_value m = {.buckets = scratch};
            merge_start(family, &m);
            size_t end = next;
            do {
                merge_add(family, &m, series[end], end == next);
                end++;
            } while (end < n && series[end]->family == family &&
                     compare_labels(series[next], series[end]) == 0);
            put_series(b, series[next], &m);
            next = end;
        }
    }
}

char *metrics_render(metrics_registry_t *reg, size_t *len)
{
    render_buf b = {.cap = RENDER_INITIAL_BYTES};
    metrics_series_t **series = NULL;
    uint64_t *scratch = NULL;
    size_t n = 0;

    if (len)
        *len = 0;
    if (!reg)
        return NULL;
    b.data = malloc(b.cap);
    if (!b.data)
        return NULL;
    b.data[0] = '\0';

    size_t max_buckets = 0;
    for (size_t f = 0; f < reg->family_count; f++) {
        if (reg->families[f]->bucket_count > max_buckets)
            max_buckets = reg->families[f]->bucket_count;
    }
    scratch = malloc((max_buckets + 1) * sizeof *scratch);
    if (!scratch)
        goto fail;
    if (snapshot_series(reg, &series, &n) != 0)
        goto fail;
    qsort(series, n, sizeof *series, compare_series);

    put_families(&b, reg, series, n, scratch);
    for (size_t i = 0; i < reg->collector_count; i++)
        reg->collectors[i].fn(reg->collectors[i].arg, buf_append, &b);
    if (b.failed)
        goto fail;

    free(series);
    free(scratch);
    if (len)
        *len = b.len;
    return b.data;

fail:
    free(series);
    free(scratch);
    free(b.data);
    return NULL;
}

double metrics_value(metrics_registry_t *reg, metrics_family_t *family, const char *const *label_values)
{
    if (!reg || !family)
        return 0.0;
    merged_value m = {.buckets = NULL};
    merge_start(family, &m);
    bool first = true;
    for (metrics_shard_t *shard = atomic_load_explicit(&reg->shards, memory_order_acquire); shard;
         shard = shard->next) {
        for (metrics_series_t *s = atomic_load_explicit(&shard->series, memory_order_acquire); s;
             s = s->next) {
            if (s->family != family)
                continue;
            bool equal = true;
            for (size_t i = 0; i < family->label_count && equal; i++) {
                const char *want = label_values && label_values[i] ? label_values[i] : "";
                equal = strcmp(s->label_values[i], want) == 0;
            }
            if (!equal)
                continue;
            merge_add(family, &m, s, first);
            first = false;
        }
    }
    if (family->type == METRICS_GAUGE)
        return m.value;
    return (double)m.count;
}

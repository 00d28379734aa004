/*
 * metrics.h - the one public header of the metrics module.
 *
 * Counters, gauges and histograms kept in per-thread shards and merged only when
 * /metrics is scraped. The idea: each worker thread owns one shard and is its only
 * writer, so recording is a plain load + store on a relaxed atomic (no lock, no
 * read-modify-write); the scraper, on whatever thread serves /metrics, reads every
 * shard with relaxed atomic loads and sums series with equal labels.
 *
 * Families are registered at start-up, before any shard records (not thread-safe).
 * Series appear lazily: metrics_series() finds or creates one in the calling
 * thread's own shard, publishing new series with a release store so a concurrent
 * scrape sees either nothing or a complete series. Series are never freed while
 * the registry lives, so a pointer returned by metrics_series() may be cached by
 * its owner thread for as long as it likes.
 */
#ifndef GATEWAY_METRICS_H
#define GATEWAY_METRICS_H

#include <stddef.h>
#include <stdint.h>

typedef struct metrics_registry metrics_registry_t;
typedef struct metrics_family metrics_family_t;
typedef struct metrics_shard metrics_shard_t;
typedef struct metrics_series metrics_series_t;

typedef enum { METRICS_COUNTER, METRICS_GAUGE, METRICS_HISTOGRAM } metrics_type;

/* How a gauge's per-shard values merge at scrape time. Counters and histograms
 * always sum. */
typedef enum { METRICS_MERGE_SUM, METRICS_MERGE_MAX, METRICS_MERGE_MIN } metrics_merge;

#define METRICS_MAX_LABELS 4

/* Called at scrape time, on the scraping thread, to append extra exposition text
 * (already in Prometheus text format, # HELP / # TYPE lines included) to `out`
 * through `append(out, text, len)`. Used for process_* metrics and for values
 * read from elsewhere. */
typedef void (*metrics_append_fn)(void *out, const char *text, size_t len);
typedef void (*metrics_collector_fn)(void *arg, metrics_append_fn append, void *out);

/* Create a registry. The default histogram buckets are copied (upper bounds,
 * strictly increasing; +Inf is implicit). Returns NULL on allocation failure. */
metrics_registry_t *metrics_registry_create(const double *buckets, size_t bucket_count);

/* Free the registry, its families and all shards. No thread may record after. */
void metrics_registry_free(metrics_registry_t *reg);

/* Register a family. name and help are copied. label_names: label_count names
 * (copied), label_count <= METRICS_MAX_LABELS. Histograms use the registry's
 * buckets when buckets is NULL. Start-up only. Returns NULL on bad arguments. */
metrics_family_t *metrics_family_register(metrics_registry_t *reg, const char *name, const char *help,
                                          metrics_type type, metrics_merge merge, size_t label_count,
                                          const char *const *label_names, const double *buckets,
                                          size_t bucket_count);

/* Register a collector, called on every scrape after the families. Start-up only. */
void metrics_collector_register(metrics_registry_t *reg, metrics_collector_fn fn, void *arg);

/* Create a shard owned by the calling thread (or handed to one thread). Any
 * number of shards may exist; they are freed with the registry. Thread-safe
 * against concurrent scrapes and other shard creations. */
metrics_shard_t *metrics_shard_create(metrics_registry_t *reg);

/* Find or create the series of `family` with these label values (label_count of
 * the family, copied on creation) in `shard`. Only the shard's owner thread may
 * call it. Returns NULL only when out of memory. */
metrics_series_t *metrics_series(metrics_shard_t *shard, metrics_family_t *family,
                                 const char *const *label_values);

/* Recording: only the owner thread of the series' shard may call these. */
void metrics_counter_add(metrics_series_t *s, uint64_t n);
void metrics_gauge_set(metrics_series_t *s, double v);
void metrics_gauge_add(metrics_series_t *s, double delta);
void metrics_histogram_observe(metrics_series_t *s, double v);

/* Render every family (sorted by name; series sorted by labels, equal label sets
 * summed across shards) then every collector, in Prometheus text format 0.0.4,
 * into a malloc'd NUL-terminated string. Caller frees. *len gets the length.
 * Callable from any thread, concurrently with recording. */
char *metrics_render(metrics_registry_t *reg, size_t *len);

/* Read back the merged value of one series (counters, gauges) or the merged count
 * of a histogram; for tests and /ready-style checks. Any thread. */
double metrics_value(metrics_registry_t *reg, metrics_family_t *family, const char *const *label_values);

/* Append process_* metrics (resident memory, cpu seconds, open and max fds, start
 * time) read from /proc/self, in exposition format. Usable as a collector. */
void metrics_process_collector(void *arg, metrics_append_fn append, void *out);

#endif

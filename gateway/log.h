/*
 * log.h - diagnostic log (stderr) and access log (stdout) of the gateway.
 *
 * Diagnostic lines are rare and written with one write(2) each, from any thread.
 * Access lines are one per request, so each worker collects them in its own
 * buffer (gw_access_log_t) and writes it out at most every
 * GW_ACCESS_FLUSH_INTERVAL_MS or when it passes GW_ACCESS_FLUSH_BYTES: one
 * syscall for many requests, never a lock.
 */
#ifndef GATEWAY_LOG_H
#define GATEWAY_LOG_H

#include <stdarg.h>
#include <stddef.h>

#include "config/config.h"

#define GW_ACCESS_FLUSH_INTERVAL_MS 100
#define GW_ACCESS_FLUSH_BYTES (32 * 1024)

/* Process-wide settings; set by the main thread at start and on reload (a plain
 * int store read racily by workers is acceptable for a log threshold, so they
 * are atomics). */
void gw_log_configure(config_log_level level, config_log_format format);

/* One diagnostic line: level, message, and optional request id ("" or NULL
 * for none). Thread-safe. */
void gw_log(config_log_level level, const char *request_id, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define gw_error(...) gw_log(CONFIG_LOG_ERROR, NULL, __VA_ARGS__)
#define gw_warn(...) gw_log(CONFIG_LOG_WARN, NULL, __VA_ARGS__)
#define gw_info(...) gw_log(CONFIG_LOG_INFO, NULL, __VA_ARGS__)
#define gw_debug(...) gw_log(CONFIG_LOG_DEBUG, NULL, __VA_ARGS__)

/* What the access log says of one request. Strings are borrowed for the call. */
typedef struct gw_access_entry {
    const char *request_id;
    const char *route;
    const char *method;
    const char *path;
    const char *client;
    const char *upstream; /* NULL when none */
    int status;
    size_t bytes;
    double duration_ms;
} gw_access_entry;

struct event_base;
typedef struct gw_access_log gw_access_log_t;

/* A per-worker access log writing to fd. Owned by the worker thread. */
gw_access_log_t *gw_access_log_create(struct event_base *base, int fd);
void gw_access_log_write(gw_access_log_t *log, const gw_access_entry *e);
void gw_access_log_flush(gw_access_log_t *log);
/* Flushes, then frees. NULL is fine. */
void gw_access_log_free(gw_access_log_t *log);

/* Append s to out as the inside of a JSON string (no quotes). */
struct evbuffer;
void gw_json_escape(struct evbuffer *out, const char *s);

#endif

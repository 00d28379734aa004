/*
 * log.c - diagnostic and access logging.
 *
 * Threads: gw_log() may be called from any thread; it formats into a stack
 * buffer and writes the whole line with one write(2), so lines never interleave.
 * An access log belongs to one worker thread and batches lines in an evbuffer
 * that a timer drains to the file descriptor.
 */
#include "gateway/log.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>

#define GW_LOG_LINE_MAX 4096

static _Atomic int log_level = CONFIG_LOG_INFO;
static _Atomic int log_format = CONFIG_LOG_JSON;

static const char *const level_names[] = {"error", "warn", "info", "debug"};

void gw_log_configure(config_log_level level, config_log_format format)
{
    atomic_store(&log_level, (int)level);
    atomic_store(&log_format, (int)format);
}

/* ISO 8601 UTC with milliseconds into buf (at least 32 bytes). */
static void format_time(char *buf, size_t size)
{
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t n = strftime(buf, size, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf + n, size - n, ".%03ldZ", ts.tv_nsec / 1000000);
}

/* Escape into a fixed buffer; returns bytes written (truncates safely). */
static size_t escape_into(char *out, size_t size, const char *s)
{
    size_t n = 0;
    for (; s && *s && n + 7 < size; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            out[n++] = '\\';
            out[n++] = (char)c;
        } else if (c == '\n') {
            out[n++] = '\\';
            out[n++] = 'n';
        } else if (c < 0x20) {
            n += (size_t)snprintf(out + n, size - n, "\\u%04x", c);
        } else {
            out[n++] = (char)c;
        }
    }
    out[n] = '\0';
    return n;
}

static void write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t w = write(fd, buf, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return; /* nowhere to report a failing log */
        }
        buf += w;
        len -= (size_t)w;
    }
}

void gw_log(config_log_level level, const char *request_id, const char *fmt, ...)
{
    if ((int)level > atomic_load_explicit(&log_level, memory_order_relaxed))
        return;
    char msg[GW_LOG_LINE_MAX / 2];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);

    char ts[40];
    format_time(ts, sizeof ts);
    char line[GW_LOG_LINE_MAX];
    int n;
    if (atomic_load_explicit(&log_format, memory_order_relaxed) == CONFIG_LOG_JSON) {
        char esc[GW_LOG_LINE_MAX / 2 + 64];
        escape_into(esc, sizeof esc, msg);
        if (request_id && *request_id)
            n = snprintf(line, sizeof line,
                         "{\"ts\":\"%s\",\"level\":\"%s\",\"request_id\":\"%s\",\"msg\":\"%s\"}\n", ts,
                         level_names[level], request_id, esc);
        else
            n = snprintf(line, sizeof line, "{\"ts\":\"%s\",\"level\":\"%s\",\"msg\":\"%s\"}\n", ts,
                         level_names[level], esc);
    } else {
        n = snprintf(line, sizeof line, "%s %s%s%s %s\n", ts, level_names[level],
                     request_id && *request_id ? " request_id=" : "", request_id ? request_id : "", msg);
    }
    if (n < 0)
        return;
    if ((size_t)n >= sizeof line) {
        n = sizeof line - 1;
        line[n - 1] = '\n';
    }
    write_all(STDERR_FILENO, line, (size_t)n);
}

void gw_json_escape(struct evbuffer *out, const char *s)
{
    const char *run = s;
    for (; s && *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c != '"' && c != '\\' && c >= 0x20)
            continue;
        evbuffer_add(out, run, (size_t)(s - run));
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            evbuffer_add(out, esc, 2);
        } else if (c == '\n') {
            evbuffer_add(out, "\\n", 2);
        } else {
            evbuffer_add_printf(out, "\\u%04x", c);
        }
        run = s + 1;
    }
    if (s && s > run)
        evbuffer_add(out, run, (size_t)(s - run));
}

struct gw_access_log {
    int fd;
    time_t stamp_sec;    /* the second stamp_text spells */
    char stamp_text[24]; /* "YYYY-mm-ddTHH:MM:SS": formatted once per second, not per line */
    struct evbuffer *buf;
    struct event *timer;
    int timer_pending;
};

static void access_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_access_log_t *log = arg;
    log->timer_pending = 0;
    gw_access_log_flush(log);
}

gw_access_log_t *gw_access_log_create(struct event_base *base, int fd)
{
    gw_access_log_t *log = calloc(1, sizeof *log);
    if (!log)
        return NULL;
    log->fd = fd;
    log->buf = evbuffer_new();
    log->timer = evtimer_new(base, access_timer_cb, log);
    if (!log->buf || !log->timer)
        goto fail;
    return log;
fail:
    gw_access_log_free(log);
    return NULL;
}

void gw_access_log_write(gw_access_log_t *log, const gw_access_entry *e)
{
    char ts[40];
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    if (now.tv_sec != log->stamp_sec || !log->stamp_text[0]) {
        struct tm tm;
        gmtime_r(&now.tv_sec, &tm);
        strftime(log->stamp_text, sizeof log->stamp_text, "%Y-%m-%dT%H:%M:%S", &tm);
        log->stamp_sec = now.tv_sec;
    }
    snprintf(ts, sizeof ts, "%s.%03ldZ", log->stamp_text, now.tv_nsec / 1000000);
    struct evbuffer *b = log->buf;
    if (atomic_load_explicit(&log_format, memory_order_relaxed) == CONFIG_LOG_JSON) {
        evbuffer_add_printf(b, "{\"ts\":\"%s\",\"type\":\"access\",\"request_id\":\"", ts);
        gw_json_escape(b, e->request_id);
        evbuffer_add_printf(b, "\",\"route\":\"");
        gw_json_escape(b, e->route);
        evbuffer_add_printf(b, "\",\"method\":\"%s\",\"path\":\"", e->method);
        gw_json_escape(b, e->path);
        evbuffer_add_printf(b, "\",\"status\":%d,\"bytes\":%zu,\"duration_ms\":%.3f,\"client\":\"%s\"",
                            e->status, e->bytes, e->duration_ms, e->client);
        if (e->upstream) {
            evbuffer_add_printf(b, ",\"upstream\":\"");
            gw_json_escape(b, e->upstream);
            evbuffer_add(b, "\"", 1);
        }
        evbuffer_add(b, "}\n", 2);
    } else {
        /* Text: space-separated; the path is the only field a client controls,
         * so it goes through the same escaper to keep one line per request. */
        evbuffer_add_printf(b, "%s %s %s %s \"", ts, e->client, e->request_id, e->method);
        gw_json_escape(b, e->path);
        evbuffer_add_printf(b, "\" %d %zu %.3fms route=%s upstream=%s\n", e->status, e->bytes, e->duration_ms,
                            e->route, e->upstream ? e->upstream : "-");
    }
    if (evbuffer_get_length(b) >= GW_ACCESS_FLUSH_BYTES) {
        gw_access_log_flush(log);
    } else if (!log->timer_pending) {
        struct timeval tv = {0, GW_ACCESS_FLUSH_INTERVAL_MS * 1000};
        evtimer_add(log->timer, &tv);
        log->timer_pending = 1;
    }
}

void gw_access_log_flush(gw_access_log_t *log)
{
    size_t len = evbuffer_get_length(log->buf);
    if (len == 0)
        return;
    const char *data = (const char *)evbuffer_pullup(log->buf, -1);
    write_all(log->fd, data, len);
    evbuffer_drain(log->buf, len);
}

void gw_access_log_free(gw_access_log_t *log)
{
    if (!log)
        return;
    if (log->buf) {
        gw_access_log_flush(log);
        evbuffer_free(log->buf);
    }
    if (log->timer)
        event_free(log->timer);
    free(log);
}

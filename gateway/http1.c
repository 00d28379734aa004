/*
 * http1.c - incremental HTTP/1.x response parsing (see http1.h).
 *
 * Runs on whichever worker owns the connection; no state outside the struct.
 * Lines are read with evbuffer_search_eol so a partial line is left in the
 * buffer until the rest arrives; body bytes are moved, not copied, from the
 * input buffer to r->body.
 */
#include "gateway/http1.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>

#include <event2/buffer.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>

#include "gateway/httputil.h"

enum {
    ST_STATUS,
    ST_HEADERS,
    ST_BODY_LENGTH,
    ST_CHUNK_SIZE,
    ST_CHUNK_DATA,
    ST_CHUNK_CRLF,
    ST_TRAILERS,
    ST_BODY_CLOSE,
    ST_DONE
};

int http1_response_init(http1_response *r, size_t max_header_bytes, size_t max_body_bytes)
{
    memset(r, 0, sizeof *r);
    r->max_header_bytes = max_header_bytes;
    r->max_body_bytes = max_body_bytes;
    r->headers = calloc(1, sizeof *r->headers);
    r->body = evbuffer_new();
    if (!r->headers || !r->body) {
        http1_response_free(r);
        return -1;
    }
    TAILQ_INIT(r->headers);
    return 0;
}

void http1_response_reset(http1_response *r, bool head_request)
{
    evhttp_clear_headers(r->headers);
    evbuffer_drain(r->body, evbuffer_get_length(r->body));
    r->head_request = head_request;
    r->status = 0;
    r->minor_version = 0;
    r->reason[0] = '\0';
    r->keep_alive = false;
    r->error = NULL;
    r->got_bytes = false;
    r->state = ST_STATUS;
    r->header_bytes = 0;
    r->remaining = 0;
    r->chunked = false;
    r->close_delimited = false;
    r->conn_close = false;
}

void http1_response_free(http1_response *r)
{
    if (r->headers) {
        evhttp_clear_headers(r->headers);
        free(r->headers);
        r->headers = NULL;
    }
    if (r->body) {
        evbuffer_free(r->body);
        r->body = NULL;
    }
}

static http1_result fail(http1_response *r, const char *why)
{
    r->error = why;
    return HTTP1_ERROR;
}

/* Take one CRLF- or LF-terminated line into buf (NUL-terminated, without the
 * terminator). 1: got one; 0: incomplete; -1: longer than size-1. */
static int take_line(struct evbuffer *in, char *buf, size_t size, size_t *consumed)
{
    size_t eol_len = 0;
    struct evbuffer_ptr p = evbuffer_search_eol(in, NULL, &eol_len, EVBUFFER_EOL_CRLF);
    if (p.pos < 0)
        return evbuffer_get_length(in) >= size ? -1 : 0;
    if ((size_t)p.pos >= size)
        return -1;
    evbuffer_remove(in, buf, (size_t)p.pos);
    buf[p.pos] = '\0';
    evbuffer_drain(in, eol_len);
    *consumed = (size_t)p.pos + eol_len;
    return 1;
}

static http1_result parse_status(http1_response *r, const char *line)
{
    /* HTTP/1.x SP 3DIGIT [SP reason] */
    if (strncmp(line, "HTTP/1.", 7) != 0 || (line[7] != '0' && line[7] != '1') || line[8] != ' ')
        return fail(r, "malformed status line");
    r->minor_version = line[7] - '0';
    const char *c = line + 9;
    if (!isdigit((unsigned char)c[0]) || !isdigit((unsigned char)c[1]) || !isdigit((unsigned char)c[2]) ||
        (c[3] != '\0' && c[3] != ' '))
        return fail(r, "malformed status code");
    r->status = (c[0] - '0') * 100 + (c[1] - '0') * 10 + (c[2] - '0');
    if (r->status < 100)
        return fail(r, "malformed status code");
    const char *reason = c[3] == ' ' ? c + 4 : "";
    size_t n = strlen(reason);
    if (n >= sizeof r->reason)
        n = sizeof r->reason - 1;
    memcpy(r->reason, reason, n);
    r->reason[n] = '\0';
    return HTTP1_NEED_MORE;
}

static http1_result parse_header(http1_response *r, char *line)
{
    if (line[0] == ' ' || line[0] == '\t')
        return fail(r, "obsolete header line folding");
    char *colon = strchr(line, ':');
    if (!colon || colon == line)
        return fail(r, "malformed header line");
    for (char *p = line; p < colon; p++)
        if (*p == ' ' || *p == '\t')
            return fail(r, "space in header name");
    *colon = '\0';
    char *value = colon + 1;
    while (*value == ' ' || *value == '\t')
        value++;
    char *end = value + strlen(value);
    while (end > value && (end[-1] == ' ' || end[-1] == '\t'))
        *--end = '\0';
    if (evhttp_add_header(r->headers, line, value) != 0)
        return fail(r, "invalid header value");
    return HTTP1_NEED_MORE;
}

/* Decide how the body is framed once the headers are in. */
static http1_result frame_body(http1_response *r)
{
    const char *connection = evhttp_find_header(r->headers, "Connection");
    r->conn_close = connection && gw_header_list_has_token(connection, "close");
    bool keep_alive_token = connection && gw_header_list_has_token(connection, "keep-alive");
    r->keep_alive = r->minor_version == 1 ? !r->conn_close : keep_alive_token && !r->conn_close;

    if (r->head_request || r->status == 204 || r->status == 304) {
        r->state = ST_DONE;
        return HTTP1_DONE;
    }
    const char *te = evhttp_find_header(r->headers, "Transfer-Encoding");
    const char *cl = NULL;
    const struct evkeyval *h;
    TAILQ_FOREACH(h, r->headers, next)
    {
        if (strcasecmp(h->key, "Content-Length") != 0)
            continue;
        if (cl && strcmp(cl, h->value) != 0)
            return fail(r, "conflicting Content-Length");
        cl = h->value;
    }
    if (te) {
        /* chunked must be the last coding; anything else is read to close. */
        const char *last = strrchr(te, ',');
        last = last ? last + 1 : te;
        while (*last == ' ' || *last == '\t')
            last++;
        if (strncasecmp(last, "chunked", 7) == 0 && (last[7] == '\0' || last[7] == ' ' || last[7] == '\t')) {
            r->chunked = true;
            if (cl)
                r->keep_alive = false; /* both framings: never trust the connection again */
            r->state = ST_CHUNK_SIZE;
            return HTTP1_NEED_MORE;
        }
        r->close_delimited = true;
        r->keep_alive = false;
        r->state = ST_BODY_CLOSE;
        return HTTP1_NEED_MORE;
    }
    if (cl) {
        char *endp;
        if (!isdigit((unsigned char)cl[0]))
            return fail(r, "malformed Content-Length");
        unsigned long long n = strtoull(cl, &endp, 10);
        if (*endp != '\0' || n > r->max_body_bytes)
            return fail(r, *endp ? "malformed Content-Length" : "response body too large");
        r->remaining = n;
        r->state = n ? ST_BODY_LENGTH : ST_DONE;
        return n ? HTTP1_NEED_MORE : HTTP1_DONE;
    }
    r->close_delimited = true;
    r->keep_alive = false;
    r->state = ST_BODY_CLOSE;
    return HTTP1_NEED_MORE;
}

static http1_result move_body(http1_response *r, struct evbuffer *in, uint64_t want, uint64_t *moved)
{
    size_t avail = evbuffer_get_length(in);
    size_t n = avail < want ? avail : (size_t)want;
    if (evbuffer_get_length(r->body) + n > r->max_body_bytes)
        return fail(r, "response body too large");
    if (n)
        evbuffer_remove_buffer(in, r->body, n);
    *moved = n;
    return HTTP1_NEED_MORE;
}

http1_result http1_parse(http1_response *r, struct evbuffer *in, bool eof)
{
    char line[HTTP1_MAX_LINE];
    size_t used;
    if (evbuffer_get_length(in) > 0)
        r->got_bytes = true;
    for (;;) {
        int got;
        uint64_t moved;
        switch (r->state) {
        case ST_STATUS:
        case ST_HEADERS:
        case ST_TRAILERS:
            got = take_line(in, line, sizeof line, &used);
            if (got < 0)
                return fail(r, "header line too long");
            if (got == 0) {
                if (r->header_bytes + evbuffer_get_length(in) > r->max_header_bytes)
                    return fail(r, "response header too large");
                return eof ? fail(r, "connection closed in the response header") : HTTP1_NEED_MORE;
            }
            r->header_bytes += used;
            if (r->header_bytes > r->max_header_bytes)
                return fail(r, "response header too large");
            if (r->state == ST_STATUS) {
                if (parse_status(r, line) != HTTP1_NEED_MORE)
                    return HTTP1_ERROR;
                r->state = ST_HEADERS;
            } else if (r->state == ST_TRAILERS) {
                if (line[0] == '\0') {
                    r->state = ST_DONE;
                    return HTTP1_DONE;
                }
            } else if (line[0] != '\0') {
                if (parse_header(r, line) != HTTP1_NEED_MORE)
                    return HTTP1_ERROR;
            } else if (r->status >= 100 && r->status < 200) {
                /* Interim answer (100 Continue, 103 Early Hints): wait for the real one. */
                evhttp_clear_headers(r->headers);
                r->header_bytes = 0;
                r->state = ST_STATUS;
            } else {
                http1_result fr = frame_body(r);
                if (fr != HTTP1_NEED_MORE)
                    return fr;
            }
            break;
        case ST_BODY_LENGTH:
            if (move_body(r, in, r->remaining, &moved) != HTTP1_NEED_MORE)
                return HTTP1_ERROR;
            r->remaining -= moved;
            if (r->remaining == 0) {
                r->state = ST_DONE;
                return HTTP1_DONE;
            }
            return eof ? fail(r, "connection closed in the response body") : HTTP1_NEED_MORE;
        case ST_CHUNK_SIZE: {
            got = take_line(in, line, sizeof line, &used);
            if (got < 0)
                return fail(r, "chunk size line too long");
            if (got == 0)
                return eof ? fail(r, "connection closed in a chunk") : HTTP1_NEED_MORE;
            char *endp;
            if (!isxdigit((unsigned char)line[0]))
                return fail(r, "malformed chunk size");
            unsigned long long n = strtoull(line, &endp, 16);
            if (*endp != '\0' && *endp != ';' && *endp != ' ' && *endp != '\t')
                return fail(r, "malformed chunk size");
            if (n > r->max_body_bytes)
                return fail(r, "response body too large");
            r->remaining = n;
            r->state = n ? ST_CHUNK_DATA : ST_TRAILERS;
            break;
        }
        case ST_CHUNK_DATA:
            if (move_body(r, in, r->remaining, &moved) != HTTP1_NEED_MORE)
                return HTTP1_ERROR;
            r->remaining -= moved;
            if (r->remaining > 0)
                return eof ? fail(r, "connection closed in a chunk") : HTTP1_NEED_MORE;
            r->state = ST_CHUNK_CRLF;
            break;
        case ST_CHUNK_CRLF:
            got = take_line(in, line, sizeof line, &used);
            if (got == 0)
                return eof ? fail(r, "connection closed in a chunk") : HTTP1_NEED_MORE;
            if (got < 0 || line[0] != '\0')
                return fail(r, "chunk not followed by CRLF");
            r->state = ST_CHUNK_SIZE;
            break;
        case ST_BODY_CLOSE:
            if (move_body(r, in, UINT64_MAX, &moved) != HTTP1_NEED_MORE)
                return HTTP1_ERROR;
            if (eof) {
                r->state = ST_DONE;
                return HTTP1_DONE;
            }
            return HTTP1_NEED_MORE;
        default:
            return HTTP1_DONE;
        }
    }
}

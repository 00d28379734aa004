/*
 * http1.c - incremental HTTP/1.x response and request parsing (see http1.h).
 *
 * Runs on whichever worker owns the connection; no state outside the struct.
 * Until the header block's blank line has arrived nothing is consumed; then the
 * block is copied out once and split in place. Body bytes are moved, not
 * copied, from the input buffer to r->body.
 */
#include "gateway/http1.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>

#include "gateway/httputil.h"

enum {
    ST_HEAD,
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
    r->body = evbuffer_new();
    if (!r->body)
        return -1;
    http1_response_reset(r, false);
    return 0;
}

void http1_response_reset(http1_response *r, bool head_request)
{
    if (r->body)
        evbuffer_drain(r->body, evbuffer_get_length(r->body));
    r->head_request = head_request;
    r->status = 0;
    r->minor_version = 0;
    r->reason = "";
    r->method = r->target = "";
    r->method_len = r->target_len = 0;
    r->host_count = 0;
    r->expect_continue = false;
    r->error_status = 0;
    r->body_taken = 0;
    r->field_count = 0;
    r->connection_field = r->length_field = r->coding_field = -1;
    r->length_conflict = false;
    r->coding_count = 0;
    r->keep_alive = false;
    r->error = NULL;
    r->got_bytes = false;
    r->head_done = false;
    r->content_length = -1;
    r->state = ST_HEAD;
    r->remaining = 0;
    r->trailer_bytes = 0;
}

int http1_request_init(http1_request *r, size_t max_header_bytes, size_t max_body_bytes)
{
    if (http1_response_init(r, max_header_bytes, max_body_bytes) != 0)
        return -1;
    r->is_request = true;
    return 0;
}

void http1_request_reset(http1_request *r)
{
    http1_response_reset(r, false);
}

void http1_request_free(http1_request *r)
{
    http1_response_free(r);
}

void http1_response_free(http1_response *r)
{
    if (r->body)
        evbuffer_free(r->body);
    r->body = NULL;
    free(r->head);
    r->head = NULL;
    r->head_cap = 0;
    free(r->fields);
    r->fields = NULL;
    r->fields_cap = 0;
}

/* An error; a request's is answered with status (a response's is not answered). */
static http1_result fail_status(http1_message *r, int status, const char *why)
{
    r->error = why;
    r->error_status = r->is_request ? status : 0;
    return HTTP1_ERROR;
}

static http1_result fail(http1_message *r, const char *why)
{
    return fail_status(r, 400, why);
}

const http1_field *http1_find(const http1_message *r, const char *name)
{
    size_t n = strlen(name);
    for (size_t i = 0; i < r->field_count; i++)
        if (r->fields[i].name_len == n && strncasecmp(r->fields[i].name, name, n) == 0)
            return &r->fields[i];
    return NULL;
}

/* Where the header block ends (just past its blank line), or 0 when it has not
 * arrived yet. Lines end in CRLF or a bare LF, so the block ends at the first
 * LF followed by LF or by CR LF. One pass over the chains in place (nothing is
 * copied), jumping from LF to LF, looking at no more than the first `limit`
 * bytes; the state carries across a chain boundary. */
static size_t find_head_end(struct evbuffer *in, size_t limit)
{
    struct evbuffer_iovec vec[8];
    size_t avail = evbuffer_get_length(in);
    if (avail > limit)
        avail = limit;
    int n = evbuffer_peek(in, (ev_ssize_t)avail, NULL, vec, 8);
    if (n > 8) {
        /* In more pieces than that (an upstream that trickles): make them one. */
        vec[0].iov_base = evbuffer_pullup(in, (ev_ssize_t)avail);
        vec[0].iov_len = avail;
        n = vec[0].iov_base ? 1 : 0;
    }
    size_t off = 0;
    int after_lf = 0; /* 0: no; 1: just after an LF; 2: after LF CR */
    for (int i = 0; i < n && off < avail; i++) {
        const char *base = vec[i].iov_base;
        size_t len = vec[i].iov_len < avail - off ? vec[i].iov_len : avail - off;
        const char *p = base, *end = base + len;
        while (p < end) {
            if (after_lf) {
                if (*p == '\n')
                    return off + (size_t)(p - base) + 1;
                if (after_lf == 1 && *p == '\r') {
                    after_lf = 2;
                    p++;
                    continue;
                }
                after_lf = 0;
            }
            const char *lf = memchr(p, '\n', (size_t)(end - p));
            if (!lf)
                break;
            p = lf + 1;
            after_lf = 1;
        }
        off += len;
    }
    return 0;
}

/* Cut the next line out of [*p, end): returns it NUL-terminated (CR dropped),
 * its length in *len. */
static char *next_line(char **p, char *end, size_t *len)
{
    char *line = *p;
    char *nl = memchr(line, '\n', (size_t)(end - line));
    if (!nl)
        return NULL;
    *p = nl + 1;
    if (nl > line && nl[-1] == '\r')
        nl--;
    *nl = '\0';
    *len = (size_t)(nl - line);
    return line;
}

static http1_result parse_status(http1_response *r, char *line, size_t len)
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
    r->reason = "";
    if (c[3] == ' ') {
        r->reason = c + 4;
        for (const char *s = c + 4, *end = line + len; s < end; s++)
            if (*s == '\r' || (unsigned char)*s < 0x09)
                return fail(r, "control character in the reason phrase");
    }
    return HTTP1_NEED_MORE;
}

/* RFC 9110 tchar: what a method and a request's header names are made of. */
static const unsigned char tchar[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1, ['+'] = 1, ['-'] = 1,
    ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1, ['~'] = 1,  ['0'] = 1, ['1'] = 1, ['2'] = 1,
    ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1, ['8'] = 1,  ['9'] = 1, ['A'] = 1, ['B'] = 1,
    ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1, ['H'] = 1,  ['I'] = 1, ['J'] = 1, ['K'] = 1,
    ['L'] = 1, ['M'] = 1, ['N'] = 1, ['O'] = 1, ['P'] = 1, ['Q'] = 1,  ['R'] = 1, ['S'] = 1, ['T'] = 1,
    ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1, ['Y'] = 1, ['Z'] = 1,  ['a'] = 1, ['b'] = 1, ['c'] = 1,
    ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1, ['i'] = 1,  ['j'] = 1, ['k'] = 1, ['l'] = 1,
    ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1, ['q'] = 1, ['r'] = 1,  ['s'] = 1, ['t'] = 1, ['u'] = 1,
    ['v'] = 1, ['w'] = 1, ['x'] = 1, ['y'] = 1, ['z'] = 1,
};

/* method SP request-target SP HTTP-version, single spaces. The target may
 * hold any byte but space, controls and DEL (obs-text passes, as it does in
 * the worker's path checks); "HTTP/" with another digit pair is 505. */
static http1_result parse_request_line(http1_message *r, char *line, size_t len)
{
    char *p = line, *end = line + len;
    while (tchar[(unsigned char)*p])
        p++;
    if (p == line || *p != ' ')
        return fail(r, "malformed request line");
    r->method = line;
    r->method_len = (size_t)(p - line);
    *p++ = '\0';
    char *target = p;
    while ((unsigned char)*p > 0x20 && *p != 0x7f)
        p++;
    if (p == target || *p != ' ')
        return fail(r,
                    *p == ' ' || p == end ? "malformed request line" : "control byte in the request target");
    r->target = target;
    r->target_len = (size_t)(p - target);
    *p++ = '\0';
    size_t vlen = (size_t)(end - p);
    if (vlen == 8 && memcmp(p, "HTTP/1.", 7) == 0 && (p[7] == '0' || p[7] == '1')) {
        r->minor_version = p[7] - '0';
        return HTTP1_NEED_MORE;
    }
    if (vlen == 8 && memcmp(p, "HTTP/", 5) == 0 && isdigit((unsigned char)p[5]) && p[6] == '.' &&
        isdigit((unsigned char)p[7]))
        return fail_status(r, 505, "HTTP version not supported");
    return fail(r, "malformed HTTP version");
}

/* May c continue a field name? Not a control, space, DEL or the colon that
 * ends it (8-bit bytes pass, as they always did). */
static bool name_byte(unsigned char c)
{
    return c > 0x20 && c != ':' && c != 0x7f;
}

/* The framing fields are noted as they are parsed, so that frame_body does
 * not look for them again: the first Connection, the last Transfer-Encoding,
 * the first Content-Length (a later one must say the same). */
static void note_field(http1_message *r, const http1_field *f, size_t index)
{
    switch (f->name_len) {
    case 4:
        if (r->is_request && strncasecmp(f->name, "Host", 4) == 0)
            r->host_count++;
        break;
    case 6:
        if (r->is_request && strncasecmp(f->name, "Expect", 6) == 0) {
            if (strcasecmp(f->value, "100-continue") == 0)
                r->expect_continue = true;
            else
                r->expect_other = true;
        }
        break;
    case 10:
        if (r->connection_field < 0 && strncasecmp(f->name, "Connection", 10) == 0)
            r->connection_field = (int)index;
        break;
    case 14:
        if (strncasecmp(f->name, "Content-Length", 14) == 0) {
            if (r->length_field < 0)
                r->length_field = (int)index;
            else if (strcmp(r->fields[r->length_field].value, f->value) != 0)
                r->length_conflict = true;
        }
        break;
    case 17:
        if (strncasecmp(f->name, "Transfer-Encoding", 17) == 0) {
            r->coding_field = (int)index;
            r->coding_count++;
        }
        break;
    default:
        break;
    }
}

static http1_result parse_field(http1_message *r, char *line, size_t len)
{
    if (line[0] == ' ' || line[0] == '\t')
        return fail(r, "obsolete header line folding");
    char *colon = line;
    if (r->is_request) {
        /* A request's names are tokens: anything else before the colon is
         * smuggling material for the upstream's parser. */
        while (tchar[(unsigned char)*colon])
            colon++;
    } else {
        while (name_byte((unsigned char)*colon))
            colon++;
    }
    if (*colon != ':' || colon == line)
        return fail(r, *colon == ':' || colon == line + len ? "malformed header line"
                                                            : "invalid character in a header name");
    char *value = colon + 1, *end = line + len;
    while (*value == ' ' || *value == '\t')
        value++;
    while (end > value && (end[-1] == ' ' || end[-1] == '\t'))
        end--;
    if (memchr(value, '\r', (size_t)(end - value)))
        return fail(r, "CR in a header value");
    if (r->field_count == HTTP1_MAX_FIELDS)
        return fail_status(r, 431, "too many header fields");
    if (r->field_count == r->fields_cap) {
        size_t cap = r->fields_cap ? r->fields_cap * 2 : 16;
        if (cap > HTTP1_MAX_FIELDS)
            cap = HTTP1_MAX_FIELDS;
        http1_field *grown = realloc(r->fields, cap * sizeof *grown);
        if (!grown)
            return fail_status(r, 503, "out of memory");
        r->fields = grown;
        r->fields_cap = cap;
    }
    *colon = '\0';
    *end = '\0';
    http1_field *f = &r->fields[r->field_count];
    f->name = line;
    f->name_len = (size_t)(colon - line);
    f->value = value;
    f->value_len = (size_t)(end - value);
    note_field(r, f, r->field_count++);
    return HTTP1_NEED_MORE;
}

/* Does the Connection value list close and/or keep-alive? One pass. */
static void connection_tokens(const char *p, bool *close, bool *keep)
{
    const char *elem;
    size_t n;
    *close = *keep = false;
    while (gw_list_next(&p, &elem, &n)) {
        if (n == 5 && strncasecmp(elem, "close", 5) == 0)
            *close = true;
        else if (n == 10 && strncasecmp(elem, "keep-alive", 10) == 0)
            *keep = true;
    }
}

/* Digits only, at most INT64_MAX (no sign, space or "0x", which strtoull
 * would take). -1 when malformed. */
static int64_t parse_length(const char *cl)
{
    uint64_t n = 0;
    const char *d = cl;
    for (; *d >= '0' && *d <= '9'; d++) {
        uint64_t digit = (uint64_t)(*d - '0');
        if (n > ((uint64_t)INT64_MAX - digit) / 10)
            return -1;
        n = n * 10 + digit;
    }
    return d == cl || *d != '\0' ? -1 : (int64_t)n;
}

/* Is chunked the last coding of the Transfer-Encoding value? */
static bool chunked_last(const char *te)
{
    const char *last = strrchr(te, ',');
    last = last ? last + 1 : te;
    while (*last == ' ' || *last == '\t')
        last++;
    return strcasecmp(last, "chunked") == 0;
}

/* A request's body framing (RFC 9112 6.1-6.3): chunked, Content-Length, or
 * none; never to the connection's close. */
static http1_result frame_request_body(http1_message *r)
{
    bool close = false, keep_token = false;
    if (r->connection_field >= 0)
        connection_tokens(r->fields[r->connection_field].value, &close, &keep_token);
    r->keep_alive = r->minor_version == 1 ? !close : keep_token && !close;
    if (r->minor_version == 0) /* an HTTP/1.0 client expects nothing (RFC 9110 10.1.1) */
        r->expect_continue = r->expect_other = false;
    if (r->expect_other)
        return fail_status(r, 417, "unsupported expectation");
    if (r->length_conflict)
        return fail(r, "conflicting Content-Length");
    const char *te = r->coding_field >= 0 ? r->fields[r->coding_field].value : NULL;
    const char *cl = r->length_field >= 0 ? r->fields[r->length_field].value : NULL;
    if (te) {
        if (cl)
            return fail(r, "both Transfer-Encoding and Content-Length");
        if (r->minor_version == 0)
            return fail(r, "Transfer-Encoding in an HTTP/1.0 request");
        if (!chunked_last(te))
            return fail(r, "request body coding is not chunked");
        if (r->coding_count > 1 || strcasecmp(te, "chunked") != 0)
            return fail_status(r, 501, "transfer coding not implemented");
        r->head_done = true;
        r->state = ST_CHUNK_SIZE;
        return HTTP1_NEED_MORE;
    }
    int64_t n = cl ? parse_length(cl) : 0;
    if (n < 0)
        return fail(r, "malformed Content-Length");
    if ((uint64_t)n > r->max_body_bytes)
        return fail_status(r, 413, "request body too large");
    r->head_done = true;
    r->content_length = cl ? n : -1;
    r->remaining = (uint64_t)n;
    r->state = n ? ST_BODY_LENGTH : ST_DONE;
    return n ? HTTP1_NEED_MORE : HTTP1_DONE;
}

/* Decide how the body is framed once the fields are in. */
static http1_result frame_body(http1_message *r)
{
    if (r->is_request)
        return frame_request_body(r);
    bool close = false, keep_token = false;
    if (r->connection_field >= 0)
        connection_tokens(r->fields[r->connection_field].value, &close, &keep_token);
    r->keep_alive = r->minor_version == 1 ? !close : keep_token && !close;
    r->head_done = true;

    if (r->head_request || r->status == 204 || r->status == 304) {
        r->state = ST_DONE;
        return HTTP1_DONE;
    }
    if (r->length_conflict)
        return fail(r, "conflicting Content-Length");
    const char *te = r->coding_field >= 0 ? r->fields[r->coding_field].value : NULL;
    const char *cl = r->length_field >= 0 ? r->fields[r->length_field].value : NULL;
    if (te) {
        /* chunked must be the last coding; anything else is read to close. */
        if (chunked_last(te)) {
            if (cl)
                r->keep_alive = false; /* both framings: never trust the connection again */
            r->state = ST_CHUNK_SIZE;
            return HTTP1_NEED_MORE;
        }
        r->keep_alive = false;
        r->state = ST_BODY_CLOSE;
        return HTTP1_NEED_MORE;
    }
    if (cl) {
        int64_t n = parse_length(cl);
        if (n < 0)
            return fail(r, "malformed Content-Length");
        r->content_length = n;
        r->remaining = (uint64_t)n;
        r->state = n ? ST_BODY_LENGTH : ST_DONE;
        return n ? HTTP1_NEED_MORE : HTTP1_DONE;
    }
    r->keep_alive = false;
    r->state = ST_BODY_CLOSE;
    return HTTP1_NEED_MORE;
}

/* A complete header block is at the front of in: take it. */
static http1_result parse_head(http1_message *r, struct evbuffer *in, size_t len)
{
    if (len + 1 > r->head_cap) {
        size_t cap = r->head_cap ? r->head_cap : 1024;
        while (cap < len + 1)
            cap *= 2;
        char *p = realloc(r->head, cap);
        if (!p)
            return fail(r, "out of memory");
        r->head = p;
        r->head_cap = cap;
    }
    evbuffer_remove(in, r->head, len);
    r->head[len] = '\0';
    if (memchr(r->head, '\0', len))
        return fail(r, r->is_request ? "NUL in the request header" : "NUL in the response header");
    char *p = r->head, *end = r->head + len;
    size_t line_len;
    char *line = next_line(&p, end, &line_len);
    if (!line || (r->is_request ? parse_request_line(r, line, line_len) : parse_status(r, line, line_len)) !=
                     HTTP1_NEED_MORE)
        return HTTP1_ERROR;
    r->field_count = 0;
    r->connection_field = r->length_field = r->coding_field = -1;
    r->length_conflict = false;
    r->coding_count = 0;
    r->host_count = 0;
    r->expect_continue = r->expect_other = false;
    while ((line = next_line(&p, end, &line_len)) != NULL && line[0] != '\0')
        if (parse_field(r, line, line_len) != HTTP1_NEED_MORE)
            return HTTP1_ERROR;
    if (!r->is_request && r->status < 200) {
        /* Interim answer (100 Continue, 103 Early Hints): wait for the real one. */
        r->field_count = 0;
        return HTTP1_NEED_MORE;
    }
    return frame_body(r);
}

/* Take one line (CRLF or LF) of at most size-1 bytes. 1, 0 (incomplete), -1 (too
 * long), -2 (a NUL in it: the line would read shorter than it is). */
static int take_line(struct evbuffer *in, char *buf, size_t size)
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
    return memchr(buf, '\0', (size_t)p.pos) ? -2 : 1;
}

static http1_result move_body(http1_message *r, struct evbuffer *in, uint64_t want, uint64_t *moved)
{
    size_t avail = evbuffer_get_length(in);
    size_t n = avail < want ? avail : (size_t)want;
    if (r->is_request) {
        if (r->body_taken + n > r->max_body_bytes)
            return fail_status(r, 413, "request body too large");
        r->body_taken += n;
    } else if (evbuffer_get_length(r->body) + n > r->max_body_bytes) {
        return fail(r, "response body too large");
    }
    if (n)
        evbuffer_remove_buffer(in, r->body, n);
    *moved = n;
    return HTTP1_NEED_MORE;
}

/* A server skips empty lines before a request line (RFC 9112 2.2). */
static void skip_empty_lines(struct evbuffer *in)
{
    for (;;) {
        unsigned char two[2];
        ev_ssize_t n = evbuffer_copyout(in, two, 2);
        if (n >= 1 && two[0] == '\n')
            evbuffer_drain(in, 1);
        else if (n == 2 && two[0] == '\r' && two[1] == '\n')
            evbuffer_drain(in, 2);
        else
            return;
    }
}

http1_result http1_parse(http1_message *r, struct evbuffer *in, bool eof)
{
    char line[HTTP1_MAX_LINE];
    if (r->is_request && r->state == ST_HEAD)
        skip_empty_lines(in);
    if (evbuffer_get_length(in) > 0)
        r->got_bytes = true;
    for (;;) {
        int got;
        uint64_t moved;
        switch (r->state) {
        case ST_HEAD: {
            size_t len = find_head_end(in, r->max_header_bytes + 4);
            if (len == 0) {
                if (evbuffer_get_length(in) > r->max_header_bytes)
                    return fail_status(
                        r, 431, r->is_request ? "request header too large" : "response header too large");
                return eof ? fail(r, r->is_request ? "connection closed in the request header"
                                                   : "connection closed in the response header")
                           : HTTP1_NEED_MORE;
            }
            if (len > r->max_header_bytes)
                return fail_status(r, 431,
                                   r->is_request ? "request header too large" : "response header too large");
            http1_result hr = parse_head(r, in, len);
            if (hr != HTTP1_NEED_MORE)
                return hr;
            break;
        }
        case ST_BODY_LENGTH:
            if (move_body(r, in, r->remaining, &moved) != HTTP1_NEED_MORE)
                return HTTP1_ERROR;
            r->remaining -= moved;
            if (r->remaining == 0) {
                r->state = ST_DONE;
                return HTTP1_DONE;
            }
            return eof ? fail(r, r->is_request ? "connection closed in the request body"
                                               : "connection closed in the response body")
                       : HTTP1_NEED_MORE;
        case ST_CHUNK_SIZE: {
            got = take_line(in, line, sizeof line);
            if (got == -2)
                return fail(r, "NUL in a chunk line");
            if (got < 0)
                return fail(r, "chunk size line too long");
            if (got == 0)
                return eof ? fail(r, "connection closed in a chunk") : HTTP1_NEED_MORE;
            /* Hex digits only (strtoull would also take "0x", signs and
             * spaces), at most 15 of them, then the end or an extension. */
            unsigned long long n = 0;
            size_t digits = 0;
            const char *endp = line;
            for (; isxdigit((unsigned char)*endp) && digits < 16; endp++, digits++)
                n = n * 16 + (unsigned long long)(isdigit((unsigned char)*endp) ? *endp - '0'
                                                                                : (*endp | 0x20) - 'a' + 10);
            if (digits == 0 || digits > 15 ||
                (*endp != '\0' && *endp != ';' && *endp != ' ' && *endp != '\t'))
                return fail(r, "malformed chunk size");
            if (r->is_request && r->body_taken + n > r->max_body_bytes)
                return fail_status(r, 413, "request body too large");
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
            got = take_line(in, line, sizeof line);
            if (got == 0)
                return eof ? fail(r, "connection closed in a chunk") : HTTP1_NEED_MORE;
            if (got == -2)
                return fail(r, "NUL in a chunk line");
            if (got < 0 || line[0] != '\0')
                return fail(r, "chunk not followed by CRLF");
            r->state = ST_CHUNK_SIZE;
            break;
        case ST_TRAILERS:
            /* Trailer fields are read and dropped (they would need a chunked
             * answer to pass on). */
            got = take_line(in, line, sizeof line);
            if (got == -2)
                return fail(r, "NUL in a trailer line");
            if (got < 0)
                return fail(r, "trailer line too long");
            if (got == 0)
                return eof ? fail(r, "connection closed in the trailers") : HTTP1_NEED_MORE;
            if (line[0] == '\0') {
                r->state = ST_DONE;
                return HTTP1_DONE;
            }
            r->trailer_bytes += strlen(line) + 2;
            if (r->trailer_bytes > r->max_header_bytes)
                return fail_status(r, 431, "trailers too large");
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

/* ---- writing an answer's head -------------------------------------------------- */

const char *http1_reason(int status)
{
    switch (status) {
    case 100:
        return "Continue";
    case 101:
        return "Switching Protocols";
    case 103:
        return "Early Hints";
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 202:
        return "Accepted";
    case 203:
        return "Non-Authoritative Information";
    case 204:
        return "No Content";
    case 205:
        return "Reset Content";
    case 206:
        return "Partial Content";
    case 300:
        return "Multiple Choices";
    case 301:
        return "Moved Permanently";
    case 302:
        return "Found";
    case 303:
        return "See Other";
    case 304:
        return "Not Modified";
    case 307:
        return "Temporary Redirect";
    case 308:
        return "Permanent Redirect";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 406:
        return "Not Acceptable";
    case 408:
        return "Request Timeout";
    case 409:
        return "Conflict";
    case 410:
        return "Gone";
    case 411:
        return "Length Required";
    case 412:
        return "Precondition Failed";
    case 413:
        return "Content Too Large";
    case 414:
        return "URI Too Long";
    case 415:
        return "Unsupported Media Type";
    case 416:
        return "Range Not Satisfiable";
    case 417:
        return "Expectation Failed";
    case 422:
        return "Unprocessable Content";
    case 425:
        return "Too Early";
    case 426:
        return "Upgrade Required";
    case 428:
        return "Precondition Required";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 500:
        return "Internal Server Error";
    case 501:
        return "Not Implemented";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    case 505:
        return "HTTP Version Not Supported";
    default:
        return "Unknown";
    }
}

const char *http1_date(time_t now)
{
    static _Thread_local char text[32];
    static _Thread_local time_t at = (time_t)-1;
    if (now != at) {
        static const char days[7][4] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
        static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
        struct tm tm;
        if (!gmtime_r(&now, &tm))
            return "Thu, 01 Jan 1970 00:00:00 GMT";
        /* Fixed layout: "Ddd, DD Mmm YYYY HH:MM:SS GMT". */
        char *p = text;
        memcpy(p, days[tm.tm_wday], 3);
        p[3] = ',';
        p[4] = ' ';
        p[5] = (char)('0' + tm.tm_mday / 10);
        p[6] = (char)('0' + tm.tm_mday % 10);
        p[7] = ' ';
        memcpy(p + 8, months[tm.tm_mon], 3);
        p[11] = ' ';
        int year = tm.tm_year + 1900;
        if (year < 0 || year > 9999)
            return "Thu, 01 Jan 1970 00:00:00 GMT";
        p[12] = (char)('0' + year / 1000);
        p[13] = (char)('0' + year / 100 % 10);
        p[14] = (char)('0' + year / 10 % 10);
        p[15] = (char)('0' + year % 10);
        p[16] = ' ';
        p[17] = (char)('0' + tm.tm_hour / 10);
        p[18] = (char)('0' + tm.tm_hour % 10);
        p[19] = ':';
        p[20] = (char)('0' + tm.tm_min / 10);
        p[21] = (char)('0' + tm.tm_min % 10);
        p[22] = ':';
        p[23] = (char)('0' + tm.tm_sec / 10);
        p[24] = (char)('0' + tm.tm_sec % 10);
        memcpy(p + 25, " GMT", 5);
        at = now;
    }
    return text;
}

/* Decimal digits of v into out (at least 20 bytes); their count. */
static size_t put_decimal(char *out, uint64_t v)
{
    char digits[20];
    size_t n = 0;
    do
        digits[n++] = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    for (size_t i = 0; i < n; i++)
        out[i] = digits[n - 1 - i];
    return n;
}

#define PUT(w, s, n)                                                                                         \
    do {                                                                                                     \
        memcpy((w), (s), (n));                                                                               \
        (w) += (n);                                                                                          \
    } while (0)

int http1_write_head(struct evbuffer *out, int minor, int status, const char *reason,
                     const struct evkeyvalq *headers, const http1_head_framing *framing)
{
    if (!reason)
        reason = http1_reason(status);
    size_t reason_len = strlen(reason);
    size_t date_len = framing && framing->date ? strlen(framing->date) : 0;
    /* "HTTP/1.1 200 " reason CRLF, the entries, the framing lines, CRLF. */
    size_t total = 13 + reason_len + 2 + 2;
    const struct evkeyval *h;
    TAILQ_FOREACH(h, headers, next)
    {
        total += strlen(h->key) + 2 + strlen(h->value) + 2;
    }
    if (framing) {
        if (framing->content_length >= 0)
            total += 16 + 20 + 2; /* "Content-Length: " digits CRLF */
        if (framing->chunked)
            total += 28; /* "Transfer-Encoding: chunked" CRLF */
        if (framing->close)
            total += 19; /* "Connection: close" CRLF */
        if (framing->date)
            total += 6 + date_len + 2;
    }
    struct evbuffer_iovec vec;
    if (evbuffer_reserve_space(out, (ev_ssize_t)total, &vec, 1) != 1 || vec.iov_len < total)
        return -1;
    char *w = vec.iov_base;
    PUT(w, "HTTP/1.", 7);
    *w++ = minor ? '1' : '0';
    *w++ = ' ';
    *w++ = (char)('0' + status / 100 % 10);
    *w++ = (char)('0' + status / 10 % 10);
    *w++ = (char)('0' + status % 10);
    *w++ = ' ';
    PUT(w, reason, reason_len);
    PUT(w, "\r\n", 2);
    TAILQ_FOREACH(h, headers, next)
    {
        size_t k = strlen(h->key), v = strlen(h->value);
        PUT(w, h->key, k);
        PUT(w, ": ", 2);
        PUT(w, h->value, v);
        PUT(w, "\r\n", 2);
    }
    if (framing) {
        if (framing->date) {
            PUT(w, "Date: ", 6);
            PUT(w, framing->date, date_len);
            PUT(w, "\r\n", 2);
        }
        if (framing->content_length >= 0) {
            PUT(w, "Content-Length: ", 16);
            w += put_decimal(w, (uint64_t)framing->content_length);
            PUT(w, "\r\n", 2);
        }
        if (framing->chunked)
            PUT(w, "Transfer-Encoding: chunked\r\n", 28);
        if (framing->close)
            PUT(w, "Connection: close\r\n", 19);
    }
    PUT(w, "\r\n", 2);
    vec.iov_len = (size_t)(w - (char *)vec.iov_base);
    return evbuffer_commit_space(out, &vec, 1) == 0 ? 0 : -1;
}

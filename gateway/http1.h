/*
 * http1.h - an incremental HTTP/1.x response parser for the upstream client.
 *
 * Pure logic over an evbuffer: feed it whatever bytes have arrived, as often as
 * they arrive; it consumes what it can and says whether the response is
 * complete, needs more, or is malformed. The header block is parsed in one
 * piece once its blank line has arrived: it is copied into the parser's own
 * buffer and indexed in place (name and value pointers, no allocation per
 * header). Framing rules that matter to a proxy (RFC 9112): 1xx interim answers
 * skipped, no body for HEAD, 204 and 304, Transfer-Encoding: chunked (which wins
 * over Content-Length, and then the connection is not reused), Content-Length
 * (several different values are an error), otherwise a body delimited by the
 * connection's close. Header values with CR, LF or NUL are errors, so a value
 * can be written back out verbatim.
 */
#ifndef GATEWAY_HTTP1_H
#define GATEWAY_HTTP1_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct evbuffer;

#define HTTP1_MAX_LINE 8192  /* longest chunk-size or trailer line */
#define HTTP1_MAX_FIELDS 128 /* header fields in one response */

typedef enum { HTTP1_NEED_MORE = 0, HTTP1_DONE = 1, HTTP1_ERROR = -1 } http1_result;

/* One header field; both strings point into the parser's header buffer and are
 * NUL-terminated. Valid until the next reset. */
typedef struct http1_field {
    const char *name;
    size_t name_len;
    const char *value;
    size_t value_len;
} http1_field;

typedef struct http1_response {
    /* Limits, set by init. max_body_bytes bounds what waits in `body` at once,
     * not the body's length: a caller that streams takes the body out as it
     * comes, and a Content-Length or chunk size over it is no error. */
    size_t max_header_bytes;
    size_t max_body_bytes;
    bool head_request; /* the request was HEAD: no body whatever the headers say */

    /* Results, valid once http1_parse() returned HTTP1_DONE. */
    int status;
    int minor_version;  /* 0 or 1 */
    const char *reason; /* points into the header buffer; "" when none */
    http1_field fields[HTTP1_MAX_FIELDS];
    size_t field_count;
    struct evbuffer *body;  /* owned; the caller may move its contents out */
    bool keep_alive;        /* the connection may carry another request */
    const char *error;      /* with HTTP1_ERROR: what was wrong (static text) */
    bool got_bytes;         /* any byte of a response arrived */
    bool head_done;         /* the final header block is parsed: status and fields are valid */
    int64_t content_length; /* the body's length when framed by Content-Length; -1 otherwise */

    /* Parser state. */
    int connection_field; /* index of the first Connection field, or -1 */
    int length_field;     /* of the first Content-Length, or -1 */
    int coding_field;     /* of the last Transfer-Encoding, or -1 */
    bool length_conflict; /* a later Content-Length differs from the first */
    char *head;           /* the header block, NUL-separated after parsing */
    size_t head_cap;
    int state;
    uint64_t remaining; /* bytes of Content-Length or of the current chunk */
    size_t trailer_bytes;
} http1_response;

/* Set limits and allocate. 0, or -1 when out of memory. */
int http1_response_init(http1_response *r, size_t max_header_bytes, size_t max_body_bytes);
/* Forget the last response but keep limits and storage. */
void http1_response_reset(http1_response *r, bool head_request);
void http1_response_free(http1_response *r);

/* Consume bytes from in. eof: the peer closed the connection (ends a
 * close-delimited body; anywhere else it is an error). */
http1_result http1_parse(http1_response *r, struct evbuffer *in, bool eof);

/* The first field called name (case-insensitive), or NULL. */
const http1_field *http1_find(const http1_response *r, const char *name);

#endif

/*
 * http1.h - an incremental HTTP/1.x response parser for the upstream client.
 *
 * Pure logic over an evbuffer: feed it whatever bytes have arrived, as often as
 * they arrive; it consumes what it can and says whether the response is
 * complete, needs more, or is malformed. It knows the framing rules that matter
 * to a proxy (RFC 9112): 1xx interim answers skipped, no body for HEAD, 204 and
 * 304, Transfer-Encoding: chunked (which wins over Content-Length, and then the
 * connection is not reused), Content-Length (several different values are an
 * error), otherwise a body delimited by the connection's close.
 */
#ifndef GATEWAY_HTTP1_H
#define GATEWAY_HTTP1_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct evbuffer;
struct evkeyvalq;

#define HTTP1_MAX_LINE 8192 /* longest status, header or chunk-size line */

typedef enum { HTTP1_NEED_MORE = 0, HTTP1_DONE = 1, HTTP1_ERROR = -1 } http1_result;

typedef struct http1_response {
    /* Limits, set by the caller before the first byte. */
    size_t max_header_bytes;
    size_t max_body_bytes;
    bool head_request; /* the request was HEAD: no body whatever the headers say */

    /* Results, valid once http1_parse() returned HTTP1_DONE. */
    int status;
    int minor_version; /* 0 or 1 */
    char reason[64];
    struct evkeyvalq *headers; /* owned; cleared by http1_response_reset */
    struct evbuffer *body;     /* owned; the caller may move its contents out */
    bool keep_alive;           /* the connection may carry another request */
    const char *error;         /* with HTTP1_ERROR: what was wrong (static text) */
    bool got_bytes;            /* any byte of a response arrived */

    /* Parser state. */
    int state;
    size_t header_bytes;
    uint64_t remaining; /* bytes of Content-Length or of the current chunk */
    bool chunked;
    bool close_delimited;
    bool conn_close;
} http1_response;

/* Allocate the headers and body containers. 0, or -1 when out of memory. */
int http1_response_init(http1_response *r, size_t max_header_bytes, size_t max_body_bytes);
/* Forget the last response (headers, body, state) but keep limits and storage. */
void http1_response_reset(http1_response *r, bool head_request);
void http1_response_free(http1_response *r);

/* Consume bytes from in. eof: the peer closed the connection (ends a
 * close-delimited body; anywhere else it is an error). */
http1_result http1_parse(http1_response *r, struct evbuffer *in, bool eof);

#endif

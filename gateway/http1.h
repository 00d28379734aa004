/*
 * http1.h - an incremental HTTP/1.x message parser: upstream responses for the
 * upstream client, client requests for the server side.
 *
 * Pure logic over an evbuffer: feed it whatever bytes have arrived, as often as
 * they arrive; it consumes what it can and says whether the message is
 * complete, needs more, or is malformed. It consumes exactly one message, so
 * what follows (a pipelined request) stays in the buffer for the next one. The
 * header block is parsed in one piece once its blank line has arrived: it is
 * copied into the parser's own buffer and indexed in place (name and value
 * pointers, no allocation per header). Header values with CR, LF or NUL are
 * errors, so a value can be written back out verbatim.
 *
 * Responses (RFC 9112 framing as it matters to a proxy): 1xx interim answers
 * skipped, no body for HEAD, 204 and 304, Transfer-Encoding: chunked (which
 * wins over Content-Length, and then the connection is not reused),
 * Content-Length (several different values are an error), otherwise a body
 * delimited by the connection's close.
 *
 * Requests are held to what a server in front of other parsers must insist on
 * (RFC 9112 sections 3, 5 and 6), each error with the status that answers it
 * (error_status): a method that is a token, a request-target without space or
 * control bytes, HTTP/1.0 or HTTP/1.1 (another version is 505), header names
 * that are tokens, no line folding. The body is chunked (Transfer-Encoding
 * exactly "chunked", in one field) or Content-Length framed or absent; another
 * coding before chunked is 501 (it would be lost: the body goes on with a
 * Content-Length), chunked not last, Transfer-Encoding in an HTTP/1.0 request,
 * or beside a Content-Length is 400: a request framed two ways is how requests
 * are smuggled past a proxy. A header block over its limit
 * is 431, a body over its limit 413 (a Content-Length over it at once, before
 * any body byte is read). Empty lines before the request line are skipped.
 */
#ifndef GATEWAY_HTTP1_H
#define GATEWAY_HTTP1_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

struct evbuffer;

#define HTTP1_MAX_LINE 8192  /* longest chunk-size or trailer line */
#define HTTP1_MAX_FIELDS 128 /* header fields in one message */

typedef enum { HTTP1_NEED_MORE = 0, HTTP1_DONE = 1, HTTP1_ERROR = -1 } http1_result;

/* One header field; both strings point into the parser's header buffer and are
 * NUL-terminated. Valid until the next reset. */
typedef struct http1_field {
    const char *name;
    size_t name_len;
    const char *value;
    size_t value_len;
} http1_field;

typedef struct http1_message {
    /* Limits, set by init. For a response max_body_bytes bounds what waits in
     * `body` at once, not the body's length: a caller that streams takes the
     * body out as it comes, and a Content-Length or chunk size over it is no
     * error. For a request it bounds the whole body (413). */
    size_t max_header_bytes;
    size_t max_body_bytes;
    bool is_request;   /* set by the init called: parses requests, not responses */
    bool head_request; /* response: the request was HEAD, no body whatever the headers say */

    /* Results, valid once http1_parse() returned HTTP1_DONE (or, for the
     * head's, once head_done is set). */
    int status;         /* response */
    const char *reason; /* response: points into the header buffer; "" when none */
    const char *method; /* request: the method token, NUL-terminated in the header buffer */
    size_t method_len;
    const char *target; /* request: the request-target as sent, NUL-terminated */
    size_t target_len;
    int host_count;       /* request: Host fields */
    bool expect_continue; /* request: Expect: 100-continue (the client waits before its body) */
    bool expect_other;    /* request: another expectation (417) */
    int error_status;     /* request, with HTTP1_ERROR: 400, 413, 417, 431, 501, 505 (503: out of memory) */
    int minor_version;    /* 0 or 1 */
    http1_field *fields;  /* grown as needed, up to HTTP1_MAX_FIELDS */
    size_t field_count;
    size_t fields_cap;
    struct evbuffer *body;  /* owned; the caller may move its contents out */
    bool keep_alive;        /* the connection may carry another request */
    const char *error;      /* with HTTP1_ERROR: what was wrong (static text) */
    bool got_bytes;         /* any byte of the message arrived (for a request: past empty lines) */
    bool head_done;         /* the final header block is parsed: status and fields are valid */
    int64_t content_length; /* the body's length when framed by Content-Length; -1 otherwise */

    /* Parser state. */
    int connection_field; /* index of the first Connection field, or -1 */
    int length_field;     /* of the first Content-Length, or -1 */
    int coding_field;     /* of the last Transfer-Encoding, or -1 */
    bool length_conflict; /* a later Content-Length differs from the first */
    int coding_count;     /* Transfer-Encoding fields */
    char *head;           /* the header block, NUL-separated after parsing */
    size_t head_cap;
    int state;
    uint64_t remaining;  /* bytes of Content-Length or of the current chunk */
    uint64_t body_taken; /* request: body bytes taken so far (against max_body_bytes) */
    size_t trailer_bytes;
} http1_message;

typedef http1_message http1_response;
typedef http1_message http1_request;

/* Set limits and allocate. 0, or -1 when out of memory. */
int http1_response_init(http1_response *r, size_t max_header_bytes, size_t max_body_bytes);
/* Forget the last response but keep limits and storage. */
void http1_response_reset(http1_response *r, bool head_request);
void http1_response_free(http1_response *r);

/* The same for requests. */
int http1_request_init(http1_request *r, size_t max_header_bytes, size_t max_body_bytes);
void http1_request_reset(http1_request *r);
void http1_request_free(http1_request *r);

/* Consume bytes from in. eof: the peer closed the connection (ends a
 * close-delimited response body; anywhere else it is an error: got_bytes
 * tells a request cut short from a client that simply went away). */
http1_result http1_parse(http1_message *r, struct evbuffer *in, bool eof);

/* The first field called name (case-insensitive), or NULL. */
const http1_field *http1_find(const http1_message *r, const char *name);

/* ---- writing an answer's head (the server side) ---- */

struct evkeyvalq;

/* What the server adds to an answer's head besides its header entries. */
typedef struct http1_head_framing {
    int64_t content_length; /* >= 0: "Content-Length: N"; -1: none */
    bool chunked;           /* "Transfer-Encoding: chunked" */
    bool close;             /* "Connection: close" */
    const char *date;       /* "Date: <date>" when not NULL (the entries carry none) */
} http1_head_framing;

/* Append to out, in one reservation and without printf: the status line
 * "HTTP/1.<minor> <status> <reason>" (reason NULL: the standard phrase), every
 * entry of headers as "key: value", the framing lines, and the blank line.
 * The caller vouches that keys are tokens and values free of CR, LF and NUL
 * (an entry may hold several lines joined by CRLF on purpose: see
 * ARCHITECTURE, "one header entry"). status must be 100..999. 0, or -1 when
 * out of memory (out unchanged). */
int http1_write_head(struct evbuffer *out, int minor, int status, const char *reason,
                     const struct evkeyvalq *headers, const http1_head_framing *framing);

/* The standard reason phrase of status, "Unknown" for one without. */
const char *http1_reason(int status);

/* now as an IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT"), formatted once a
 * second per thread; the string is the thread's own, valid until its next
 * call with another second. */
const char *http1_date(time_t now);

#endif

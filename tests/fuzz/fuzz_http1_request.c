/*
 * fuzz_http1_request.c - libFuzzer target for the request side of the HTTP/1.x
 * parser (gateway/http1.c). The input is a byte stream from a client: its first
 * byte picks how the stream is cut into reads, the rest is the stream. It is
 * parsed as a connection would parse it, request after request (pipelining)
 * until an error or the end, twice: cut into reads, and in one piece. Both
 * must agree on every request (result, method, target, fields, body, status of
 * an error), and every request must hold what the server relies on:
 *   - an error has a reason and one of the statuses 400, 413, 417, 431, 501,
 *     505 (503 when out of memory);
 *   - a method and header names are RFC 9110 tokens, the target has no space,
 *     control or DEL byte, values no CR, LF or NUL, lengths match the strings;
 *   - the version is 1.0 or 1.1; the body is within the limit, and exactly
 *     Content-Length long when it says one;
 *   - nothing is consumed twice or lost: what the requests took plus what is
 *     left is the input.
 *
 * Built by scripts/fuzz.sh with clang -fsanitize=fuzzer; replayed over its
 * seed corpus by every build (see fuzz.h).
 */
#define FUZZ_NAME "fuzz_http1_request"
#include "tests/fuzz/fuzz.h"

#include <string.h>

#include <event2/buffer.h>

#include "gateway/http1.h"

#define MAX_HEADER 2048
#define MAX_BODY 4096
#define MAX_REQUESTS 16

/* What one parse said, kept to compare the two ways of feeding. */
typedef struct outcome {
    http1_result result;
    int error_status;
    char line[MAX_HEADER + 64]; /* method, target, version, fields, flattened */
    size_t line_len;
    uint8_t body[MAX_BODY];
    size_t body_len;
    size_t consumed; /* bytes of the stream this request took */
} outcome;

static bool is_tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static void check_token(const char *s, size_t len)
{
    FUZZ_CHECK(len > 0 && strlen(s) == len);
    for (size_t i = 0; i < len; i++)
        FUZZ_CHECK(is_tchar((unsigned char)s[i]));
}

static void append(outcome *o, const char *s, size_t n)
{
    FUZZ_CHECK(o->line_len + n + 1 <= sizeof o->line);
    memcpy(o->line + o->line_len, s, n);
    o->line_len += n;
    o->line[o->line_len++] = '\n';
}

/* The invariants of one finished parse, and its outcome. */
static void record(http1_request *r, http1_result res, outcome *o)
{
    memset(o, 0, offsetof(outcome, body));
    o->body_len = 0;
    o->result = res;
    FUZZ_CHECK(res == HTTP1_NEED_MORE || res == HTTP1_DONE || res == HTTP1_ERROR);
    if (res == HTTP1_ERROR) {
        FUZZ_CHECK(r->error != NULL);
        int s = r->error_status;
        FUZZ_CHECK(s == 400 || s == 413 || s == 417 || s == 431 || s == 501 || s == 505 || s == 503);
        o->error_status = s;
        return;
    }
    if (res != HTTP1_DONE)
        return;
    FUZZ_CHECK(r->head_done);
    check_token(r->method, r->method_len);
    FUZZ_CHECK(r->target_len > 0 && strlen(r->target) == r->target_len);
    for (size_t i = 0; i < r->target_len; i++)
        FUZZ_CHECK((unsigned char)r->target[i] > 0x20 && r->target[i] != 0x7f);
    FUZZ_CHECK(r->minor_version == 0 || r->minor_version == 1);
    FUZZ_CHECK(r->field_count <= HTTP1_MAX_FIELDS);
    append(o, r->method, r->method_len);
    append(o, r->target, r->target_len);
    append(o, r->minor_version ? "1" : "0", 1);
    append(o, r->keep_alive ? "k" : "c", 1);
    for (size_t i = 0; i < r->field_count; i++) {
        const http1_field *f = &r->fields[i];
        check_token(f->name, f->name_len);
        FUZZ_CHECK(strlen(f->value) == f->value_len);
        for (size_t j = 0; j < f->value_len; j++)
            FUZZ_CHECK(f->value[j] != '\r' && f->value[j] != '\n');
        append(o, f->name, f->name_len);
        append(o, f->value, f->value_len);
    }
    size_t body = evbuffer_get_length(r->body);
    FUZZ_CHECK(body <= MAX_BODY);
    if (r->content_length >= 0)
        FUZZ_CHECK((size_t)r->content_length == body);
    o->body_len = body;
    evbuffer_remove(r->body, o->body, body);
}

/* Parse the stream request by request, handing it over in reads of the sizes
 * `cuts` gives (cycled; none: all at once). Fills out[], returns how many. */
static size_t run(const uint8_t *data, size_t size, const uint8_t *cuts, size_t ncuts, outcome *out)
{
    http1_request r;
    struct evbuffer *in = evbuffer_new();
    FUZZ_CHECK(in != NULL && http1_request_init(&r, MAX_HEADER, MAX_BODY) == 0);
    size_t fed = 0, taken = 0, count = 0, cut = 0;
    while (count < MAX_REQUESTS) {
        http1_result res;
        for (;;) {
            bool eof = fed == size;
            size_t before = evbuffer_get_length(in);
            res = http1_parse(&r, in, eof);
            taken += before - evbuffer_get_length(in);
            if (res != HTTP1_NEED_MORE || eof)
                break;
            size_t n = ncuts ? (size_t)cuts[cut++ % ncuts] % 64 + 1 : size - fed;
            if (n > size - fed)
                n = size - fed;
            evbuffer_add(in, data + fed, n);
            fed += n;
        }
        record(&r, res, &out[count]);
        out[count].consumed = taken;
        count++;
        /* Nothing lost, nothing taken twice. */
        FUZZ_CHECK(taken + evbuffer_get_length(in) == fed);
        if (res != HTTP1_DONE)
            break;
        http1_request_reset(&r);
    }
    http1_request_free(&r);
    evbuffer_free(in);
    return count;
}

static outcome first[MAX_REQUESTS], second[MAX_REQUESTS];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t ncuts = data[0] % 8 + 1;
    if (ncuts > size - 1)
        ncuts = size - 1;
    const uint8_t *cuts = data + 1;
    const uint8_t *stream = data + 1;
    size_t n = size - 1;
    size_t a = run(stream, n, cuts, ncuts, first);
    size_t b = run(stream, n, NULL, 0, second);
    /* Fed in reads or in one piece, the stream reads the same, request by
     * request (an end of stream reached in the middle may differ only in the
     * last one's NEED_MORE vs ERROR, which cannot happen: eof ends both). */
    FUZZ_CHECK(a == b);
    for (size_t i = 0; i < a; i++) {
        FUZZ_CHECK(first[i].result == second[i].result);
        FUZZ_CHECK(first[i].error_status == second[i].error_status);
        FUZZ_CHECK(first[i].line_len == second[i].line_len);
        FUZZ_CHECK(memcmp(first[i].line, second[i].line, first[i].line_len) == 0);
        FUZZ_CHECK(first[i].body_len == second[i].body_len);
        FUZZ_CHECK(memcmp(first[i].body, second[i].body, first[i].body_len) == 0);
        if (first[i].result == HTTP1_DONE)
            FUZZ_CHECK(first[i].consumed == second[i].consumed);
    }
    return 0;
}

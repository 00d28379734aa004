/*
 * fuzz_http1_response.c - libFuzzer target for the response side of the
 * HTTP/1.x parser (gateway/http1.h), as the upstream client uses it.
 *
 * Input: a flags byte (bits 0-3: how many cuts, 0 to 15, so a header block
 * can come in more pieces than the parser peeks at in place, 8; bit 4: small
 * limits), then one byte per cut (the length of that read, 0 to 255), then
 * the bytes the upstream sent. The stream is parsed twice, cut into those reads and in
 * one piece, each read ending with http1_parse(eof false) and the end of the
 * stream with eof true; then again on the same parsers, reset for a HEAD
 * request. Every read is its own allocation of exactly its length, added by
 * reference, so a read past what arrived is an ASan report. What must hold:
 *   - the result is one of the three, and eof always ends the parse;
 *   - HTTP1_DONE: status 100..999, minor version 0 or 1, at most
 *     HTTP1_MAX_FIELDS fields, each name and value as long as its strlen,
 *     names without blanks, CR, LF or colon, values and the reason without
 *     CR or LF; the body exactly Content-Length long when that framed it,
 *     empty for HEAD, 204 and 304;
 *   - HTTP1_ERROR: a reason is given;
 *   - the body is never longer than the input, nor than what was consumed;
 *   - the cuts change nothing: both parses agree on the result, the error,
 *     and for HTTP1_DONE on the head, the fields, the body and what is left.
 *
 * Built by scripts/fuzz.sh (GATEWAY_FUZZ, clang -fsanitize=fuzzer); every
 * build also replays the seed corpus, tests/fuzz/corpus/http1_response/
 * (see fuzz.h).
 */
#define FUZZ_NAME "fuzz_http1_response"
#include "tests/fuzz/fuzz.h"

#include <string.h>

#include <event2/buffer.h>

#include "gateway/http1.h"

#define CUT_MASK 15 /* bits of the flags byte that count the cuts */
#define SMALL_LIMITS 16
#define LIMIT_HEADER 2048 /* ordinary limits */
#define LIMIT_BODY 8192
#define SMALL_LIMIT_HEADER 128 /* small ones, so the limits are met */
#define SMALL_LIMIT_BODY 16

/* How one parse of the stream ended. */
typedef struct outcome {
    http1_result result;
    size_t left; /* bytes of the stream not consumed (in the buffer or never fed) */
} outcome;

static void free_read(const void *data, size_t len, void *arg)
{
    free((void *)data);
}

/* Add stream[0..len) to in as a read of its own: an exact allocation. */
static bool add_read(struct evbuffer *in, const uint8_t *stream, size_t len)
{
    if (len == 0)
        return true;
    uint8_t *copy = malloc(len);
    if (!copy)
        return false;
    memcpy(copy, stream, len);
    if (evbuffer_add_reference(in, copy, len, free_read, NULL) != 0) {
        free(copy);
        return false;
    }
    return true;
}

/* Parse stream[0..len) cut into reads of cuts[0..ncuts) bytes and the rest. */
static bool parse_stream(http1_response *r, const uint8_t *stream, size_t len, const uint8_t *cuts,
                         size_t ncuts, outcome *out)
{
    struct evbuffer *in = evbuffer_new();
    size_t fed = 0;
    http1_result res = HTTP1_NEED_MORE;
    if (!in)
        return false;
    for (size_t i = 0; i <= ncuts && res == HTTP1_NEED_MORE; i++) {
        size_t n = i < ncuts ? cuts[i] : len - fed;
        if (n > len - fed)
            n = len - fed;
        if (!add_read(in, stream + fed, n)) {
            evbuffer_free(in);
            return false;
        }
        fed += n;
        res = http1_parse(r, in, false);
        FUZZ_CHECK(res == HTTP1_NEED_MORE || res == HTTP1_DONE || res == HTTP1_ERROR);
    }
    if (res == HTTP1_NEED_MORE) {
        FUZZ_CHECK(fed == len);
        res = http1_parse(r, in, true);
        FUZZ_CHECK(res == HTTP1_DONE || res == HTTP1_ERROR); /* eof ends it, one way or the other */
    }
    out->result = res;
    out->left = evbuffer_get_length(in) + (len - fed);
    FUZZ_CHECK(out->left <= len);
    evbuffer_free(in);
    in = NULL;
    return true;
}

static void check_outcome(const http1_response *r, const outcome *o, size_t len)
{
    size_t body_len = evbuffer_get_length(r->body);
    FUZZ_CHECK(body_len <= len);
    FUZZ_CHECK(body_len <= len - o->left);
    if (o->result == HTTP1_ERROR) {
        FUZZ_CHECK(r->error != NULL && r->error[0] != '\0');
        return;
    }
    FUZZ_CHECK(r->head_done);
    FUZZ_CHECK(r->status >= 100 && r->status <= 999);
    FUZZ_CHECK(r->minor_version == 0 || r->minor_version == 1);
    FUZZ_CHECK(r->reason != NULL && strpbrk(r->reason, "\r\n") == NULL);
    FUZZ_CHECK(r->field_count <= HTTP1_MAX_FIELDS);
    for (size_t i = 0; i < r->field_count; i++) {
        const http1_field *f = &r->fields[i];
        FUZZ_CHECK(f->name != NULL && f->value != NULL);
        FUZZ_CHECK(f->name_len > 0 && strlen(f->name) == f->name_len);
        FUZZ_CHECK(strlen(f->value) == f->value_len);
        FUZZ_CHECK(strpbrk(f->name, " \t\r\n:") == NULL);
        FUZZ_CHECK(strpbrk(f->value, "\r\n") == NULL);
    }
    if (r->head_request || r->status == 204 || r->status == 304)
        FUZZ_CHECK(body_len == 0);
    if (r->content_length >= 0)
        FUZZ_CHECK(body_len == (uint64_t)r->content_length);
}

/* The two parses of one stream must agree. */
static void compare(http1_response *a, const outcome *oa, http1_response *b, const outcome *ob)
{
    FUZZ_CHECK(oa->result == ob->result);
    if (oa->result == HTTP1_ERROR) {
        FUZZ_CHECK(strcmp(a->error, b->error) == 0);
        return;
    }
    FUZZ_CHECK(oa->left == ob->left);
    FUZZ_CHECK(a->status == b->status && a->minor_version == b->minor_version);
    FUZZ_CHECK(strcmp(a->reason, b->reason) == 0);
    FUZZ_CHECK(a->keep_alive == b->keep_alive);
    FUZZ_CHECK(a->content_length == b->content_length);
    FUZZ_CHECK(a->field_count == b->field_count);
    for (size_t i = 0; i < a->field_count; i++) {
        FUZZ_CHECK(strcmp(a->fields[i].name, b->fields[i].name) == 0);
        FUZZ_CHECK(strcmp(a->fields[i].value, b->fields[i].value) == 0);
    }
    size_t body_len = evbuffer_get_length(a->body);
    FUZZ_CHECK(body_len == evbuffer_get_length(b->body));
    if (body_len > 0)
        FUZZ_CHECK(memcmp(evbuffer_pullup(a->body, -1), evbuffer_pullup(b->body, -1), body_len) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    size_t ncuts = data[0] & CUT_MASK;
    bool small = (data[0] & SMALL_LIMITS) != 0;
    if (size < 1 + ncuts)
        return 0;
    const uint8_t *cuts = data + 1;
    const uint8_t *stream = data + 1 + ncuts;
    size_t len = size - 1 - ncuts;
    size_t max_header = small ? SMALL_LIMIT_HEADER : LIMIT_HEADER;
    size_t max_body = small ? SMALL_LIMIT_BODY : LIMIT_BODY;

    http1_response cut, whole;
    bool cut_ok = http1_response_init(&cut, max_header, max_body) == 0;
    bool whole_ok = http1_response_init(&whole, max_header, max_body) == 0;
    if (!cut_ok || !whole_ok)
        goto done;
    for (int head = 0; head <= 1; head++) {
        outcome oc, ow;
        /* The second round reuses the parsers as a keep-alive connection would. */
        http1_response_reset(&cut, head == 1);
        http1_response_reset(&whole, head == 1);
        if (!parse_stream(&cut, stream, len, cuts, ncuts, &oc) ||
            !parse_stream(&whole, stream, len, NULL, 0, &ow))
            goto done;
        check_outcome(&cut, &oc, len);
        check_outcome(&whole, &ow, len);
        compare(&cut, &oc, &whole, &ow);
    }
done:
    if (cut_ok)
        http1_response_free(&cut);
    if (whole_ok)
        http1_response_free(&whole);
    return 0;
}

/*
 * test_http1.c - the HTTP/1.x parser (gateway/http1.c). Upstream responses:
 * framing by Content-Length, chunked and close; interim answers; bodiless
 * statuses; limits; and input arriving one byte at a time. Client requests:
 * the request line, strict names and framing (each error with the status that
 * answers it), body limits, keep-alive, Expect, pipelining.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>
#include <event2/buffer.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/queue.h>
#include <time.h>

#include "gateway/http1.h"

typedef struct fixture {
    http1_response r;
    struct evbuffer *in;
} fixture;

static int setup(void **state)
{
    static fixture f;
    assert_int_equal(http1_response_init(&f.r, 4096, 1 << 20), 0);
    f.in = evbuffer_new();
    http1_response_reset(&f.r, false);
    *state = &f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    http1_response_free(&f->r);
    evbuffer_free(f->in);
    return 0;
}

static http1_result feed(fixture *f, const char *text, bool eof)
{
    evbuffer_add(f->in, text, strlen(text));
    return http1_parse(&f->r, f->in, eof);
}

static void assert_body(fixture *f, const char *expected)
{
    size_t len = evbuffer_get_length(f->r.body);
    assert_int_equal(len, strlen(expected));
    if (len)
        assert_memory_equal(evbuffer_pullup(f->r.body, -1), expected, len);
}

static void test_content_length(void **state)
{
    fixture *f = *state;
    assert_int_equal(feed(f, "HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-A:  b \r\n\r\nhel", false),
                     HTTP1_NEED_MORE);
    assert_int_equal(feed(f, "lo", false), HTTP1_DONE);
    assert_int_equal(f->r.status, 201);
    assert_string_equal(f->r.reason, "Created");
    assert_non_null(http1_find(&f->r, "x-a"));
    assert_string_equal(http1_find(&f->r, "x-a")->value, "b");
    assert_int_equal(http1_find(&f->r, "X-A")->value_len, 1);
    assert_true(f->r.keep_alive);
    assert_body(f, "hello");
    assert_int_equal(evbuffer_get_length(f->in), 0);
}

static void test_byte_at_a_time(void **state)
{
    fixture *f = *state;
    const char *msg = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      "4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nX-Trailer: t\r\n\r\n";
    http1_result res = HTTP1_NEED_MORE;
    for (size_t i = 0; msg[i]; i++) {
        char one[2] = {msg[i], 0};
        assert_int_equal(res, HTTP1_NEED_MORE);
        res = feed(f, one, false);
    }
    assert_int_equal(res, HTTP1_DONE);
    assert_body(f, "Wikipedia");
    assert_true(f->r.keep_alive);
}

static void test_interim_answers_skipped(void **state)
{
    fixture *f = *state;
    assert_int_equal(feed(f,
                          "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                          "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                          false),
                     HTTP1_DONE);
    assert_int_equal(f->r.status, 200);
    assert_null(http1_find(&f->r, "Link"));
    assert_int_equal(f->r.field_count, 1);
    assert_body(f, "ok");
}

static void test_no_body_statuses_and_head(void **state)
{
    fixture *f = *state;
    assert_int_equal(feed(f, "HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n", false), HTTP1_DONE);
    assert_body(f, "");
    http1_response_reset(&f->r, true);
    assert_int_equal(feed(f, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", false), HTTP1_DONE);
    assert_body(f, "");
    assert_true(f->r.keep_alive);
}

static void test_close_delimited(void **state)
{
    fixture *f = *state;
    assert_int_equal(feed(f, "HTTP/1.0 200 OK\r\n\r\nsome", false), HTTP1_NEED_MORE);
    assert_int_equal(feed(f, " data", true), HTTP1_DONE);
    assert_body(f, "some data");
    assert_false(f->r.keep_alive);
}

static void test_keep_alive_rules(void **state)
{
    fixture *f = *state;
    assert_int_equal(feed(f, "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", false),
                     HTTP1_DONE);
    assert_false(f->r.keep_alive);
    http1_response_reset(&f->r, false);
    assert_int_equal(feed(f, "HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n", false),
                     HTTP1_DONE);
    assert_true(f->r.keep_alive);
    http1_response_reset(&f->r, false);
    assert_int_equal(feed(f, "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false), HTTP1_DONE);
    assert_false(f->r.keep_alive);
}

static void test_chunked_wins_over_length(void **state)
{
    fixture *f = *state;
    assert_int_equal(feed(f,
                          "HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: "
                          "chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                          false),
                     HTTP1_DONE);
    assert_body(f, "abc");
    assert_false(f->r.keep_alive); /* both framings: never reuse */
}

static void test_errors(void **state)
{
    fixture *f = *state;
    static const char *const bad[] = {
        "HTTP/2 200 OK\r\n\r\n",
        "HTTP/1.1 2000 OK\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        "HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
        "HTTP/1.1 200 OK\r\nBad Name: a\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",
        "HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        http1_response_reset(&f->r, false);
        evbuffer_drain(f->in, evbuffer_get_length(f->in));
        assert_int_equal(feed(f, bad[i], false), HTTP1_ERROR);
        assert_non_null(f->r.error);
    }
}

static void test_mixed_line_endings(void **state)
{
    fixture *f = *state;
    /* The blank line is "\n\r\n": the body's own "\r\n\r\n" must not end the head. */
    static const char msg[] = "HTTP/1.1 200 OK\nContent-Length: 10\n\r\nab\r\n\r\ncdef";
    evbuffer_add(f->in, msg, sizeof msg - 1);
    assert_int_equal(http1_parse(&f->r, f->in, false), HTTP1_DONE);
    assert_body(f, "ab\r\n\r\ncdef");
}

/* Each piece its own chain (evbuffer_add_buffer moves chains), so the blank
 * line can fall across chain boundaries; fed in `pieces` pieces. */
static void feed_in_chains(fixture *f, const char *msg, size_t pieces)
{
    size_t len = strlen(msg), at = 0;
    for (size_t i = 0; i < pieces; i++) {
        size_t n = (len - at) / (pieces - i);
        struct evbuffer *one = evbuffer_new();
        assert_non_null(one);
        evbuffer_add(one, msg + at, n);
        evbuffer_add_buffer(f->in, one);
        evbuffer_free(one);
        at += n;
    }
}

static void test_head_across_chains(void **state)
{
    fixture *f = *state;
    /* The blank line split LF | CR | LF over three chains. */
    static const char *parts[] = {"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", "\r", "\nok"};
    for (size_t i = 0; i < 3; i++) {
        struct evbuffer *one = evbuffer_new();
        assert_non_null(one);
        evbuffer_add(one, parts[i], strlen(parts[i]));
        evbuffer_add_buffer(f->in, one);
        evbuffer_free(one);
    }
    assert_int_equal(evbuffer_peek(f->in, -1, NULL, NULL, 0), 3);
    assert_int_equal(http1_parse(&f->r, f->in, false), HTTP1_DONE);
    assert_body(f, "ok");
    /* More chains than the scan looks at in place (it makes them one). */
    http1_response_reset(&f->r, false);
    feed_in_chains(f, "HTTP/1.1 200 OK\r\nX-A: 1\r\nX-B: 2\r\nContent-Length: 5\r\n\r\nhello", 40);
    assert_true(evbuffer_peek(f->in, -1, NULL, NULL, 0) > 8);
    assert_int_equal(http1_parse(&f->r, f->in, false), HTTP1_DONE);
    assert_string_equal(http1_find(&f->r, "X-B")->value, "2");
    assert_body(f, "hello");
    /* An LF, then a CR not followed by LF, is no blank line: not done yet. */
    http1_response_reset(&f->r, false);
    feed_in_chains(f, "HTTP/1.1 200 OK\n\rX-A: 1\n", 3);
    assert_int_equal(http1_parse(&f->r, f->in, false), HTTP1_NEED_MORE);
}

static void test_chunk_size_strict(void **state)
{
    fixture *f = *state;
    static const char *const bad[] = {"0x5\r\nhello\r\n0\r\n\r\n", "+5\r\nhello\r\n0\r\n\r\n",
                                      "1000000000000000\r\n"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        http1_response_reset(&f->r, false);
        evbuffer_drain(f->in, evbuffer_get_length(f->in));
        assert_int_equal(feed(f, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false),
                         HTTP1_NEED_MORE);
        assert_int_equal(feed(f, bad[i], false), HTTP1_ERROR);
    }
    http1_response_reset(&f->r, false);
    evbuffer_drain(f->in, evbuffer_get_length(f->in));
    assert_int_equal(
        feed(f, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n", false),
        HTTP1_DONE);
    assert_body(f, "0123456789");
}

static void test_nul_in_header(void **state)
{
    fixture *f = *state;
    static const char msg[] = "HTTP/1.1 200 OK\r\nX: a\0b\r\nContent-Length: 0\r\n\r\n";
    evbuffer_add(f->in, msg, sizeof msg - 1);
    assert_int_equal(http1_parse(&f->r, f->in, false), HTTP1_ERROR);
}

static void test_eof_too_early(void **state)
{
    fixture *f = *state;
    assert_int_equal(feed(f, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", true), HTTP1_ERROR);
    http1_response_reset(&f->r, false);
    evbuffer_drain(f->in, evbuffer_get_length(f->in));
    assert_int_equal(feed(f, "HTTP/1.1 200 O", true), HTTP1_ERROR);
    http1_response_reset(&f->r, false);
    evbuffer_drain(f->in, evbuffer_get_length(f->in));
    assert_false(f->r.got_bytes);
    assert_int_equal(http1_parse(&f->r, f->in, true), HTTP1_ERROR);
    assert_false(f->r.got_bytes);
}

static void test_header_limit(void **state)
{
    fixture *f = *state;
    char big[6000];
    memset(big, 'a', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    assert_int_equal(feed(f, "HTTP/1.1 200 OK\r\nX-Big: ", false), HTTP1_NEED_MORE);
    assert_int_equal(feed(f, big, false), HTTP1_ERROR);
}

/* A streaming caller takes the body out as it comes: a Content-Length or a
 * chunk over max_body_bytes (1 MiB here) is then no error, and the head is
 * known (head_done, content_length) before the body is complete. */
static void test_streamed_body_over_the_limit(void **state)
{
    fixture *f = *state;
    static char piece[65536];
    memset(piece, 'x', sizeof piece);
    size_t total = 5u << 20, seen = 0;
    assert_int_equal(feed(f, "HTTP/1.1 200 OK\r\nContent-Length: 5242880\r\n\r\n", false), HTTP1_NEED_MORE);
    assert_true(f->r.head_done);
    assert_true(f->r.content_length == (int64_t)total);
    http1_result r = HTTP1_NEED_MORE;
    while (seen < total) {
        evbuffer_add(f->in, piece, sizeof piece);
        r = http1_parse(&f->r, f->in, false);
        seen += evbuffer_get_length(f->r.body);
        evbuffer_drain(f->r.body, evbuffer_get_length(f->r.body));
        assert_int_equal(r, seen < total ? HTTP1_NEED_MORE : HTTP1_DONE);
    }
    assert_int_equal(seen, total);

    /* chunked, one chunk of 3 MiB */
    http1_response_reset(&f->r, false);
    assert_int_equal(feed(f, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n300000\r\n", false),
                     HTTP1_NEED_MORE);
    assert_true(f->r.head_done);
    assert_true(f->r.content_length == -1);
    seen = 0;
    while (seen < (3u << 20)) {
        evbuffer_add(f->in, piece, sizeof piece);
        assert_int_equal(http1_parse(&f->r, f->in, false), HTTP1_NEED_MORE);
        seen += evbuffer_get_length(f->r.body);
        evbuffer_drain(f->r.body, evbuffer_get_length(f->r.body));
    }
    assert_int_equal(feed(f, "\r\n0\r\n\r\n", false), HTTP1_DONE);

    /* what waits undrained is what the limit bounds */
    http1_response_reset(&f->r, false);
    assert_int_equal(feed(f, "HTTP/1.1 200 OK\r\nContent-Length: 5242880\r\n\r\n", false), HTTP1_NEED_MORE);
    r = HTTP1_NEED_MORE;
    for (int i = 0; i < 40 && r == HTTP1_NEED_MORE; i++) {
        evbuffer_add(f->in, piece, sizeof piece);
        r = http1_parse(&f->r, f->in, false);
    }
    assert_int_equal(r, HTTP1_ERROR);
    assert_string_equal(f->r.error, "response body too large");
}

/* head_done only once the final head is in; content_length only for
 * Content-Length framing. */
static void test_head_done_and_length(void **state)
{
    fixture *f = *state;
    assert_int_equal(feed(f, "HTTP/1.1 100 Continue\r\n\r\n", false), HTTP1_NEED_MORE);
    assert_false(f->r.head_done);
    assert_int_equal(feed(f, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nab", false), HTTP1_NEED_MORE);
    assert_true(f->r.head_done);
    assert_true(f->r.content_length == -1);
    assert_int_equal(http1_parse(&f->r, f->in, true), HTTP1_DONE);
    http1_response_reset(&f->r, false);
    assert_false(f->r.head_done);
    assert_true(f->r.content_length == -1);
    assert_int_equal(feed(f, "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n", false),
                     HTTP1_ERROR);
}

/* The framing fields are noted while the head is parsed (not looked up
 * afterwards): the first Connection, the last Transfer-Encoding, the first
 * Content-Length and any later one that differs; and lines are taken by their
 * length. */
static void test_framing_fields_noted(void **state)
{
    fixture *f = *state;
    static const struct {
        const char *text;
        http1_result want;
        int64_t length;
        bool keep_alive;
    } cases[] = {
        /* No reason phrase at all, and an empty one. */
        {"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", HTTP1_DONE, 0, true},
        {"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n", HTTP1_DONE, 0, true},
        /* Several tokens; the second Connection line is not the one read. */
        {"HTTP/1.1 200 OK\r\nConnection: keep-alive , Close\r\nContent-Length: 0\r\n\r\n", HTTP1_DONE, 0,
         false},
        {"HTTP/1.1 200 OK\r\nConnection: x-a\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", HTTP1_DONE,
         0, true},
        {"HTTP/1.0 200 OK\r\nconnection: foo,keep-alive\r\nContent-Length: 0\r\n\r\n", HTTP1_DONE, 0, true},
        /* The same Content-Length twice is one; case does not matter. */
        {"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nCONTENT-LENGTH: 3\r\n\r\nabc", HTTP1_DONE, 3, true},
        {"HTTP/1.1 200 OK\r\nContent-Length: 9223372036854775807\r\n\r\n", HTTP1_NEED_MORE, INT64_MAX, true},
        {"HTTP/1.1 200 OK\r\nContent-Length: 9223372036854775808\r\n\r\n", HTTP1_ERROR, -1, false},
        {"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\nabc", HTTP1_ERROR, -1, false},
        {"HTTP/1.1 200 OK\r\nContent-Length: 3 \r\n\r\nabc", HTTP1_DONE, 3,
         true}, /* trailing space trimmed */
        {"HTTP/1.1 200 OK\r\nContent-Length: 3x\r\n\r\nabc", HTTP1_ERROR, -1, false},
        /* Differing lengths are refused even after an equal pair, but not on a 304. */
        {"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
         HTTP1_ERROR, -1, false},
        {"HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", HTTP1_DONE, -1, true},
        /* The last Transfer-Encoding line decides. */
        {"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
         HTTP1_DONE, -1, true},
        {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n", HTTP1_NEED_MORE,
         -1, false},
        /* Field names: no colon, a bad byte before the colon, an empty name. */
        {"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n", HTTP1_ERROR, -1, false},
        {"HTTP/1.1 200 OK\r\nBad\x01Name: a\r\n\r\n", HTTP1_ERROR, -1, false},
        {"HTTP/1.1 200 OK\r\nBad\x01NoColon\r\n\r\n", HTTP1_ERROR, -1, false},
        {"HTTP/1.1 200 OK\r\n: a\r\n\r\n", HTTP1_ERROR, -1, false},
        {"HTTP/1.1 200 OK\x01\r\n\r\n", HTTP1_ERROR, -1, false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        http1_response_reset(&f->r, false);
        evbuffer_drain(f->in, evbuffer_get_length(f->in));
        http1_result got = feed(f, cases[i].text, false);
        if (got != cases[i].want)
            fail_msg("case %zu: got %d, want %d", i, (int)got, (int)cases[i].want);
        if (got != HTTP1_ERROR) {
            assert_int_equal(f->r.content_length, cases[i].length);
            if (f->r.keep_alive != cases[i].keep_alive)
                fail_msg("case %zu: keep_alive %d", i, (int)f->r.keep_alive);
        }
    }
    /* A status line without a reason reads as "". */
    http1_response_reset(&f->r, false);
    evbuffer_drain(f->in, evbuffer_get_length(f->in));
    assert_int_equal(feed(f, "HTTP/1.1 204\r\n\r\n", false), HTTP1_DONE);
    assert_string_equal(f->r.reason, "");
    assert_int_equal(f->r.status, 204);
}

/* ---- requests ------------------------------------------------------------------ */

#define REQ_MAX_HEADER 1024
#define REQ_MAX_BODY 64

static int setup_request(void **state)
{
    static fixture f;
    assert_int_equal(http1_request_init(&f.r, REQ_MAX_HEADER, REQ_MAX_BODY), 0);
    assert_true(f.r.is_request);
    f.in = evbuffer_new();
    *state = &f;
    return 0;
}

static void http1_free_and_init(fixture *f, size_t max_header)
{
    http1_request_free(&f->r);
    assert_int_equal(http1_request_init(&f->r, max_header, REQ_MAX_BODY), 0);
    evbuffer_drain(f->in, evbuffer_get_length(f->in));
}

static void request_again(fixture *f)
{
    http1_request_reset(&f->r);
    evbuffer_drain(f->in, evbuffer_get_length(f->in));
}

static void test_request_get_and_pipelined(void **state)
{
    fixture *f = *state;
    assert_int_equal(feed(f,
                          "\r\n\r\nGET /a/b?c=d HTTP/1.1\r\nHost: example.test\r\nX-Two:  x y \r\n\r\n"
                          "POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc",
                          false),
                     HTTP1_DONE);
    assert_string_equal(f->r.method, "GET");
    assert_int_equal(f->r.method_len, 3);
    assert_string_equal(f->r.target, "/a/b?c=d");
    assert_int_equal(f->r.target_len, 8);
    assert_int_equal(f->r.minor_version, 1);
    assert_int_equal(f->r.field_count, 2);
    assert_string_equal(f->r.fields[1].name, "X-Two");
    assert_string_equal(f->r.fields[1].value, "x y");
    assert_int_equal(f->r.host_count, 1);
    assert_true(f->r.keep_alive);
    assert_true(f->r.head_done);
    assert_int_equal(f->r.content_length, -1);
    assert_body(f, "");
    /* The next request is still in the buffer, untouched. */
    assert_int_equal(evbuffer_get_length(f->in),
                     strlen("POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"));
    http1_request_reset(&f->r);
    assert_int_equal(http1_parse(&f->r, f->in, false), HTTP1_DONE);
    assert_string_equal(f->r.method, "POST");
    assert_string_equal(f->r.target, "/p");
    assert_int_equal(f->r.content_length, 3);
    assert_body(f, "abc");
    assert_int_equal(evbuffer_get_length(f->in), 0);
}

static void test_request_byte_at_a_time(void **state)
{
    fixture *f = *state;
    const char *text = "\r\nPUT /x HTTP/1.1\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n"
                       "3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: t\r\n\r\n";
    size_t n = strlen(text);
    for (size_t i = 0; i < n; i++) {
        evbuffer_add(f->in, text + i, 1);
        http1_result r = http1_parse(&f->r, f->in, false);
        if (i + 1 < n)
            assert_int_equal(r, HTTP1_NEED_MORE);
        else
            assert_int_equal(r, HTTP1_DONE);
    }
    assert_string_equal(f->r.method, "PUT");
    assert_body(f, "abcde");
    assert_int_equal(f->r.content_length, -1);
    assert_true(f->r.keep_alive);
}

/* Each malformed request, and the status that answers it. */
static void test_request_errors(void **state)
{
    fixture *f = *state;
    static const struct {
        const char *text;
        int status;
    } cases[] = {
        {"GET  / HTTP/1.1\r\n\r\n", 400},
        {"GET / HTTP/1.1 \r\n\r\n", 400},
        {"GET /a b HTTP/1.1\r\n\r\n", 400},
        {"GET /\x01 HTTP/1.1\r\n\r\n", 400},
        {"GET /\x7f HTTP/1.1\r\n\r\n", 400},
        {"GET /a\rb HTTP/1.1\r\n\r\n", 400},
        {"G(T / HTTP/1.1\r\n\r\n", 400},
        {" GET / HTTP/1.1\r\n\r\n", 400},
        {"GET /\r\n\r\n", 400},
        {"GET / HTTX/1.1\r\n\r\n", 400},
        {"GET / http/1.1\r\n\r\n", 400},
        {"GET / HTTP/1.10\r\n\r\n", 400},
        {"GET / HTTP/2.0\r\n\r\n", 505},
        {"GET / HTTP/1.2\r\n\r\n", 505},
        {"GET / HTTP/0.9\r\n\r\n", 505},
        {"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nX@: y\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\n: y\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n", 400},
        {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400},
        {"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
        {"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400},
        {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400},
        {"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501},
        {"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", 501},
        {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501},
        {"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
        {"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400},
        {"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400},
        {"POST / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n", 400},
        {"POST / HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n", 400},
        {"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", 400},
        {"POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n", 413},
        {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n41\r\n", 413},
        {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400},
        {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n", 400},
        {"GET / HTTP/1.1\r\nExpect: something\r\n\r\n", 417},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        request_again(f);
        http1_result r = feed(f, cases[i].text, false);
        if (r != HTTP1_ERROR || f->r.error_status != cases[i].status || !f->r.error)
            fail_msg("case %zu (%s): result %d, status %d", i, cases[i].text, (int)r, f->r.error_status);
    }
    /* A NUL anywhere in the head. */
    request_again(f);
    evbuffer_add(f->in, "GET / HTTP/1.1\r\nA: b\0c\r\n\r\n", 27);
    assert_int_equal(http1_parse(&f->r, f->in, false), HTTP1_ERROR);
    assert_int_equal(f->r.error_status, 400);
}

static void test_request_limits(void **state)
{
    fixture *f = *state;
    /* A header block over the limit: 431, complete or not. */
    char big[REQ_MAX_HEADER + 64];
    memset(big, 'a', sizeof big);
    big[sizeof big - 1] = '\0';
    assert_int_equal(feed(f, "GET / HTTP/1.1\r\nX: ", false), HTTP1_NEED_MORE);
    assert_int_equal(feed(f, big, false), HTTP1_ERROR);
    assert_int_equal(f->r.error_status, 431);
    request_again(f);
    evbuffer_add_printf(f->in, "GET /%s HTTP/1.1\r\n\r\n", big);
    assert_int_equal(http1_parse(&f->r, f->in, false), HTTP1_ERROR);
    assert_int_equal(f->r.error_status, 431);
    /* Too many fields: 431. */
    request_again(f);
    http1_free_and_init(f, 1 << 16);
    evbuffer_add_printf(f->in, "GET / HTTP/1.1\r\n");
    for (int i = 0; i <= HTTP1_MAX_FIELDS; i++)
        evbuffer_add_printf(f->in, "X-%d: v\r\n", i);
    evbuffer_add_printf(f->in, "\r\n");
    assert_int_equal(http1_parse(&f->r, f->in, false), HTTP1_ERROR);
    assert_int_equal(f->r.error_status, 431);
    http1_free_and_init(f, REQ_MAX_HEADER);
    /* A body of exactly the limit passes, by length and chunked. */
    char body[REQ_MAX_BODY + 1];
    memset(body, 'b', REQ_MAX_BODY);
    body[REQ_MAX_BODY] = '\0';
    request_again(f);
    evbuffer_add_printf(f->in, "POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s", REQ_MAX_BODY, body);
    assert_int_equal(http1_parse(&f->r, f->in, false), HTTP1_DONE);
    assert_body(f, body);
    request_again(f);
    evbuffer_add_printf(
        f->in, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n%.32s\r\n20\r\n%.32s\r\n0\r\n\r\n",
        body, body);
    assert_int_equal(http1_parse(&f->r, f->in, false), HTTP1_DONE);
    assert_body(f, body);
    /* One byte more over several chunks: 413, though no chunk is over the limit. */
    request_again(f);
    evbuffer_add_printf(f->in, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n%.32s\r\n21\r\n",
                        body);
    assert_int_equal(http1_parse(&f->r, f->in, false), HTTP1_ERROR);
    assert_int_equal(f->r.error_status, 413);
    /* A Content-Length over the limit is refused before any body byte. */
    request_again(f);
    assert_int_equal(feed(f, "POST / HTTP/1.1\r\nContent-Length: 1000\r\n\r\n", false), HTTP1_ERROR);
    assert_int_equal(f->r.error_status, 413);
}

static void test_request_keep_alive_and_expect(void **state)
{
    fixture *f = *state;
    static const struct {
        const char *text;
        bool keep_alive;
        bool expect_continue;
    } cases[] = {
        {"GET / HTTP/1.1\r\n\r\n", true, false},
        {"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false, false},
        {"GET / HTTP/1.1\r\nConnection: Upgrade, CLOSE\r\n\r\n", false, false},
        {"GET / HTTP/1.0\r\n\r\n", false, false},
        {"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true, false},
        {"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n", false, false},
        {"GET / HTTP/1.1\r\nExpect: 100-Continue\r\n\r\n", true, true},
        {"GET / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n", false, false},
        {"GET / HTTP/1.0\r\nExpect: other\r\n\r\n", false, false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        request_again(f);
        http1_result r = feed(f, cases[i].text, false);
        if (r != HTTP1_DONE || f->r.keep_alive != cases[i].keep_alive ||
            f->r.expect_continue != cases[i].expect_continue)
            fail_msg("case %zu (%s): result %d keep_alive %d expect %d", i, cases[i].text, (int)r,
                     (int)f->r.keep_alive, (int)f->r.expect_continue);
    }
    /* The head is known before the body arrives: a client that expects 100
     * is told to go on only then. */
    request_again(f);
    assert_int_equal(feed(f, "PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n", false),
                     HTTP1_NEED_MORE);
    assert_true(f->r.head_done);
    assert_true(f->r.expect_continue);
    assert_int_equal(f->r.content_length, 2);
    assert_int_equal(feed(f, "ok", false), HTTP1_DONE);
    assert_body(f, "ok");
    /* Two Host fields are counted, for the server to refuse. */
    request_again(f);
    assert_int_equal(feed(f, "GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", false), HTTP1_DONE);
    assert_int_equal(f->r.host_count, 2);
}

static void test_request_eof(void **state)
{
    fixture *f = *state;
    /* A client gone between requests sent nothing of one. */
    assert_int_equal(http1_parse(&f->r, f->in, true), HTTP1_ERROR);
    assert_false(f->r.got_bytes);
    request_again(f);
    assert_int_equal(feed(f, "\r\n", true), HTTP1_ERROR);
    assert_false(f->r.got_bytes);
    /* Cut short in the head or the body. */
    request_again(f);
    assert_int_equal(feed(f, "GET / HT", true), HTTP1_ERROR);
    assert_true(f->r.got_bytes);
    request_again(f);
    assert_int_equal(feed(f, "POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab", true), HTTP1_ERROR);
    assert_string_equal(f->r.error, "connection closed in the request body");
}

/* A NUL in a chunk-size line, after a chunk's data or in a trailer is an error
 * (read as a C string the line would end early), on both sides. */
static void test_nul_in_chunk_lines(void **state)
{
    fixture *f = *state;
#define NUL_CASE(text)                                                                                       \
    {                                                                                                        \
        text, sizeof text - 1                                                                                \
    }
    static const struct {
        const char *text;
        size_t len;
    } cases[] = {
        NUL_CASE("3\0zz\r\nabc\r\n0\r\n\r\n"),
        NUL_CASE("3\r\nabc\0junk\r\n0\r\n\r\n"),
        NUL_CASE("3\r\nabc\r\n0\r\n\0X: y\r\n\r\n"),
    };
#undef NUL_CASE
    for (int request = 0; request < 2; request++) {
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            http1_free_and_init(f, 1024);
            if (!request) {
                http1_response_free(&f->r);
                assert_int_equal(http1_response_init(&f->r, 1024, 1 << 16), 0);
                evbuffer_add_printf(f->in, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
            } else {
                evbuffer_add_printf(f->in, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
            }
            evbuffer_add(f->in, cases[i].text, cases[i].len);
            http1_result r = http1_parse(&f->r, f->in, false);
            if (r != HTTP1_ERROR)
                fail_msg("%s case %zu: result %d", request ? "request" : "response", i, (int)r);
            if (request)
                assert_int_equal(f->r.error_status, 400);
        }
    }
}

/* ---- writing an answer's head ------------------------------------------------ */

static void assert_head(struct evbuffer *out, const char *expected)
{
    size_t len = evbuffer_get_length(out);
    char *got = malloc(len + 1);
    assert_non_null(got);
    evbuffer_remove(out, got, len);
    got[len] = '\0';
    assert_string_equal(got, expected);
    free(got);
}

static void test_write_head(void **state)
{
    (void)state;
    struct evbuffer *out = evbuffer_new();
    struct evkeyvalq h;
    TAILQ_INIT(&h);
    /* No entries, no framing, the standard phrase. */
    assert_int_equal(http1_write_head(out, 1, 204, NULL, &h, NULL), 0);
    assert_head(out, "HTTP/1.1 204 No Content\r\n\r\n");
    /* Entries in their order (one holding two lines), every framing line. */
    evhttp_add_header(&h, "Content-Type", "application/json");
    /* evhttp_add_header refuses a value with CRLF; the joined entry is made by hand, as the worker does. */
    struct evkeyval *joined = calloc(1, sizeof *joined);
    assert_non_null(joined);
    joined->key = strdup("X-Joined");
    joined->value = strdup("a\r\nX-Second: b");
    TAILQ_INSERT_TAIL(&h, joined, next);
    http1_head_framing fr = {.content_length = 12345678901LL,
                             .chunked = false,
                             .close = true,
                             .date = "Fri, 27 Nov 2026 18:00:00 GMT"};
    assert_int_equal(http1_write_head(out, 0, 502, "Upstream Gone", &h, &fr), 0);
    assert_head(
        out,
        "HTTP/1.0 502 Upstream Gone\r\nContent-Type: application/json\r\nX-Joined: a\r\nX-Second: b\r\n"
        "Date: Fri, 27 Nov 2026 18:00:00 GMT\r\nContent-Length: 12345678901\r\nConnection: close\r\n\r\n");
    fr = (http1_head_framing){.content_length = 0};
    assert_int_equal(http1_write_head(out, 1, 200, "", &h, &fr), 0);
    assert_head(out, "HTTP/1.1 200 \r\nContent-Type: application/json\r\nX-Joined: a\r\nX-Second: b\r\n"
                     "Content-Length: 0\r\n\r\n");
    fr = (http1_head_framing){.content_length = -1, .chunked = true};
    assert_int_equal(http1_write_head(out, 1, 299, NULL, &h, &fr), 0);
    assert_head(out,
                "HTTP/1.1 299 Unknown\r\nContent-Type: application/json\r\nX-Joined: a\r\nX-Second: b\r\n"
                "Transfer-Encoding: chunked\r\n\r\n");
    /* A head larger than any one chain, after bytes already waiting. */
    evhttp_clear_headers(&h);
    char big[9000];
    memset(big, 'v', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    evhttp_add_header(&h, "Big", big);
    evbuffer_add(out, "before", 6);
    assert_int_equal(http1_write_head(out, 1, 200, NULL, &h, NULL), 0);
    assert_int_equal(evbuffer_get_length(out), 6 + strlen("HTTP/1.1 200 OK\r\nBig: \r\n\r\n") + strlen(big));
    char prefix[24];
    evbuffer_remove(out, prefix, 23);
    assert_memory_equal(prefix, "beforeHTTP/1.1 200 OK\r\n", 23);
    evhttp_clear_headers(&h);
    evbuffer_free(out);
    /* Every standard phrase the gateway answers with itself. */
    assert_string_equal(http1_reason(413), "Content Too Large");
    assert_string_equal(http1_reason(429), "Too Many Requests");
    assert_string_equal(http1_reason(504), "Gateway Timeout");
}

static void test_date(void **state)
{
    (void)state;
    /* Against strftime's C-locale rendering, across days, months and leap years. */
    static const time_t samples[] = {0,          784111777,    951782400,     1709164800,
                                     1795802400, 4102444799LL, 253402300799LL};
    for (size_t i = 0; i < sizeof samples / sizeof samples[0]; i++) {
        struct tm tm;
        char want[64];
        gmtime_r(&samples[i], &tm);
        strftime(want, sizeof want, "%a, %d %b %Y %H:%M:%S GMT", &tm);
        assert_string_equal(http1_date(samples[i]), want);
    }
    assert_string_equal(http1_date(784111777), "Sun, 06 Nov 1994 08:49:37 GMT");
    /* The cached second: the same pointer, the same text. */
    const char *a = http1_date(1795802400);
    assert_ptr_equal(http1_date(1795802400), a);
    assert_string_equal(a, "Fri, 27 Nov 2026 18:00:00 GMT");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_content_length, setup, teardown),
        cmocka_unit_test_setup_teardown(test_byte_at_a_time, setup, teardown),
        cmocka_unit_test_setup_teardown(test_interim_answers_skipped, setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_body_statuses_and_head, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_delimited, setup, teardown),
        cmocka_unit_test_setup_teardown(test_keep_alive_rules, setup, teardown),
        cmocka_unit_test_setup_teardown(test_chunked_wins_over_length, setup, teardown),
        cmocka_unit_test_setup_teardown(test_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_eof_too_early, setup, teardown),
        cmocka_unit_test_setup_teardown(test_nul_in_header, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mixed_line_endings, setup, teardown),
        cmocka_unit_test_setup_teardown(test_head_across_chains, setup, teardown),
        cmocka_unit_test_setup_teardown(test_chunk_size_strict, setup, teardown),
        cmocka_unit_test_setup_teardown(test_header_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_streamed_body_over_the_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_head_done_and_length, setup, teardown),
        cmocka_unit_test_setup_teardown(test_framing_fields_noted, setup, teardown),
        cmocka_unit_test_setup_teardown(test_request_get_and_pipelined, setup_request, teardown),
        cmocka_unit_test_setup_teardown(test_request_byte_at_a_time, setup_request, teardown),
        cmocka_unit_test_setup_teardown(test_request_errors, setup_request, teardown),
        cmocka_unit_test_setup_teardown(test_request_limits, setup_request, teardown),
        cmocka_unit_test_setup_teardown(test_request_keep_alive_and_expect, setup_request, teardown),
        cmocka_unit_test_setup_teardown(test_request_eof, setup_request, teardown),
        cmocka_unit_test_setup_teardown(test_nul_in_chunk_lines, setup_request, teardown),
        cmocka_unit_test(test_write_head),
        cmocka_unit_test(test_date),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

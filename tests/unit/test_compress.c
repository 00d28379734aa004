/*
 * test_compress.c - gzip and brotli from gateway/compress.c: whole bodies
 * (gw_compress) and streamed ones (gw_encoder): every output decodes to
 * exactly its input; a FLUSH makes everything so far decodable at once;
 * several encoders of one compressor run interleaved and are reused after
 * gw_encoder_end; a level changed by a reload takes effect; an ended gzip
 * encoder's zlib stream is kept (at most 4, never after a failure) and the
 * next gzip answer takes it; brotli quality and gzip level change the output.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <event2/buffer.h>

#include <brotli/decode.h>
#include <zlib.h>

#include "gateway/compress.h"

static config_compression cfg_of(int gzip_level, int quality)
{
    config_compression c = {0};
    c.enabled = true;
    c.gzip_level = gzip_level;
    c.brotli_quality = quality;
    c.min_bytes = 0;
    c.max_bytes = 1 << 30;
    return c;
}

/* A JSON-like body of n bytes (compressible, not trivially). */
static unsigned char *json_like(size_t n, unsigned seed)
{
    unsigned char *b = malloc(n + 64);
    size_t used = 0;
    srand(seed);
    while (used < n)
        used += (size_t)snprintf((char *)b + used, 64, "{\"id\":%d,\"name\":\"item%d\",\"ok\":%s},",
                                 rand() % 100000, rand() % 1000, rand() % 2 ? "true" : "false");
    return b;
}

/* An incremental decoder, to check what a client could decode so far. */
typedef struct decoder {
    gw_encoding enc;
    z_stream z;
    BrotliDecoderState *br;
    unsigned char *out;
    size_t len, cap;
    bool finished;
} decoder;

static void dec_init(decoder *d, gw_encoding enc)
{
    memset(d, 0, sizeof *d);
    d->enc = enc;
    d->cap = 1 << 20;
    d->out = malloc(d->cap);
    if (enc == GW_ENC_GZIP)
        assert_int_equal(inflateInit2(&d->z, 31), Z_OK);
    else
        d->br = BrotliDecoderCreateInstance(NULL, NULL, NULL);
}

static void dec_room(decoder *d)
{
    if (d->cap - d->len < 65536) {
        d->cap *= 2;
        d->out = realloc(d->out, d->cap);
    }
}

/* Feed all of buf (drained). */
static void dec_feed(decoder *d, struct evbuffer *buf)
{
    size_t n = evbuffer_get_length(buf);
    const unsigned char *in = n ? evbuffer_pullup(buf, -1) : (const unsigned char *)"";
    if (d->enc == GW_ENC_GZIP) {
        d->z.next_in = (Bytef *)in;
        d->z.avail_in = (uInt)n;
        for (;;) {
            dec_room(d);
            d->z.next_out = d->out + d->len;
            d->z.avail_out = (uInt)(d->cap - d->len);
            int rc = inflate(&d->z, Z_SYNC_FLUSH);
            d->len = d->cap - d->z.avail_out;
            if (rc == Z_STREAM_END) {
                d->finished = true;
                break;
            }
            assert_true(rc == Z_OK || rc == Z_BUF_ERROR);
            if (d->z.avail_in == 0 && d->z.avail_out > 0)
                break;
        }
    } else {
        size_t avail_in = n;
        const uint8_t *next_in = in;
        for (;;) {
            dec_room(d);
            size_t avail_out = d->cap - d->len;
            uint8_t *next_out = d->out + d->len;
            BrotliDecoderResult rc =
                BrotliDecoderDecompressStream(d->br, &avail_in, &next_in, &avail_out, &next_out, NULL);
            d->len = d->cap - avail_out;
            assert_int_not_equal(rc, BROTLI_DECODER_RESULT_ERROR);
            if (rc == BROTLI_DECODER_RESULT_SUCCESS) {
                d->finished = true;
                break;
            }
            if (rc == BROTLI_DECODER_RESULT_NEEDS_MORE_INPUT)
                break;
        }
    }
    evbuffer_drain(buf, n);
}

static void dec_free(decoder *d)
{
    if (d->enc == GW_ENC_GZIP)
        inflateEnd(&d->z);
    else
        BrotliDecoderDestroyInstance(d->br);
    free(d->out);
}

static void test_whole_body_round_trip(void **state)
{
    config_compression cfg = cfg_of(6, 5);
    gw_compressor *c = gw_compressor_create();
    static const size_t sizes[] = {0, 1, 1000, 70000, 1 << 20};
    gw_encoding encs[] = {GW_ENC_GZIP, GW_ENC_BR};
    for (size_t e = 0; e < 2; e++) {
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
            unsigned char *body = json_like(sizes[i], (unsigned)i);
            struct evbuffer *in = evbuffer_new(), *out = evbuffer_new();
            /* in many chains, as a body read from a socket is */
            for (size_t off = 0; off < sizes[i]; off += 5000)
                evbuffer_add(in, body + off, sizes[i] - off < 5000 ? sizes[i] - off : 5000);
            assert_int_equal(gw_compress(c, &cfg, encs[e], in, out), 0);
            assert_int_equal(evbuffer_get_length(in), sizes[i]); /* left as it was */
            decoder d;
            dec_init(&d, encs[e]);
            dec_feed(&d, out);
            assert_true(d.finished);
            assert_int_equal(d.len, sizes[i]);
            if (sizes[i])
                assert_memory_equal(d.out, body, sizes[i]);
            if (sizes[i] >= 70000)
                assert_true(d.len > 0);
            dec_free(&d);
            evbuffer_free(in);
            evbuffer_free(out);
            free(body);
        }
    }
    gw_compressor_free(c);
}

/* Stream a body in pieces; after each FLUSH the client can decode all that
 * went in; FINISH ends a stream that decodes to the whole body. */
static void stream_one(gw_compressor *c, const config_compression *cfg, gw_encoding enc, size_t size,
                       size_t piece, int flush_every)
{
    unsigned char *body = json_like(size, 7);
    gw_encoder *e = gw_encoder_start(c, cfg, enc, 0);
    assert_non_null(e);
    struct evbuffer *in = evbuffer_new(), *out = evbuffer_new();
    decoder d;
    dec_init(&d, enc);
    size_t off = 0;
    int n = 0;
    while (off < size) {
        size_t k = size - off < piece ? size - off : piece;
        evbuffer_add(in, body + off, k);
        off += k;
        bool flush = ++n % flush_every == 0;
        assert_int_equal(gw_encoder_write(e, in, out, flush ? GW_ENCODER_FLUSH : GW_ENCODER_PROCESS), 0);
        assert_int_equal(evbuffer_get_length(in), 0); /* drained */
        dec_feed(&d, out);
        if (flush) {
            assert_int_equal(d.len, off);
            assert_memory_equal(d.out, body, off);
            assert_false(d.finished);
        }
    }
    assert_int_equal(gw_encoder_write(e, in, out, GW_ENCODER_FINISH), 0);
    dec_feed(&d, out);
    assert_true(d.finished);
    assert_int_equal(d.len, size);
    if (size)
        assert_memory_equal(d.out, body, size);
    gw_encoder_end(e);
    dec_free(&d);
    evbuffer_free(in);
    evbuffer_free(out);
    free(body);
}

static void test_streamed_flush_and_finish(void **state)
{
    config_compression cfg = cfg_of(6, 5);
    gw_compressor *c = gw_compressor_create();
    gw_encoding encs[] = {GW_ENC_GZIP, GW_ENC_BR};
    for (size_t i = 0; i < 2; i++) {
        stream_one(c, &cfg, encs[i], 0, 1, 1);             /* empty: a valid, empty stream */
        stream_one(c, &cfg, encs[i], 10, 3, 1);            /* tiny pieces, flushed each */
        stream_one(c, &cfg, encs[i], 300000, 16384, 1);    /* every piece flushed (an event stream) */
        stream_one(c, &cfg, encs[i], 3 << 20, 262144, 4);  /* bulk: flushed now and then */
        stream_one(c, &cfg, encs[i], 200000, 70000, 1000); /* never flushed before the end */
    }
    gw_compressor_free(c);
}

/* Several streams of one worker at once, interleaved, each its own state;
 * then the ended ones are reused. */
static void test_concurrent_encoders_and_reuse(void **state)
{
    config_compression cfg = cfg_of(6, 5);
    gw_compressor *c = gw_compressor_create();
    for (int round = 0; round < 3; round++) {
        enum { N = 6 };
        gw_encoder *e[N];
        decoder d[N];
        struct evbuffer *in = evbuffer_new(), *out = evbuffer_new();
        unsigned char *body[N];
        size_t size = 150000;
        for (int i = 0; i < N; i++) {
            gw_encoding enc = i % 3 == 2 ? GW_ENC_BR : GW_ENC_GZIP;
            e[i] = gw_encoder_start(c, &cfg, enc, 0);
            assert_non_null(e[i]);
            dec_init(&d[i], enc);
            body[i] = json_like(size, (unsigned)(100 + i));
        }
        for (size_t off = 0; off < size; off += 10000) {
            for (int i = 0; i < N; i++) {
                evbuffer_add(in, body[i] + off, size - off < 10000 ? size - off : 10000);
                assert_int_equal(gw_encoder_write(e[i], in, out, GW_ENCODER_PROCESS), 0);
                dec_feed(&d[i], out);
            }
        }
        for (int i = 0; i < N; i++) {
            assert_int_equal(gw_encoder_write(e[i], in, out, GW_ENCODER_FINISH), 0);
            dec_feed(&d[i], out);
            assert_true(d[i].finished);
            assert_int_equal(d[i].len, size);
            assert_memory_equal(d[i].out, body[i], size);
            gw_encoder_end(e[i]);
            dec_free(&d[i]);
            free(body[i]);
        }
        evbuffer_free(in);
        evbuffer_free(out);
    }
    gw_encoder_end(NULL);
    gw_compressor_free(c);
}

/* A reload changes the level: a reused stream follows it. */
static void test_level_change(void **state)
{
    gw_compressor *c = gw_compressor_create();
    size_t size = 500000;
    unsigned char *body = json_like(size, 3);
    size_t got[2];
    int levels[2] = {1, 9};
    for (int k = 0; k < 2; k++) {
        config_compression cfg = cfg_of(levels[k], 5);
        gw_encoder *e = gw_encoder_start(c, &cfg, GW_ENC_GZIP, 0);
        struct evbuffer *in = evbuffer_new(), *out = evbuffer_new();
        evbuffer_add(in, body, size);
        assert_int_equal(gw_encoder_write(e, in, out, GW_ENCODER_FINISH), 0);
        got[k] = evbuffer_get_length(out);
        gw_encoder_end(e);
        struct evbuffer *in2 = evbuffer_new(), *out2 = evbuffer_new();
        evbuffer_add(in2, body, size);
        assert_int_equal(gw_compress(c, &cfg, GW_ENC_GZIP, in2, out2), 0);
        assert_int_equal(evbuffer_get_length(out2),
                         got[k]); /* whole or streamed in one piece: the same bytes */
        evbuffer_free(in);
        evbuffer_free(out);
        evbuffer_free(in2);
        evbuffer_free(out2);
    }
    assert_true(got[1] < got[0]);
    free(body);
    gw_compressor_free(c);
}

/* Brotli encoders come and go; the blocks they free are kept for the next
 * ones, whatever the sizes in between, and the output always decodes. */
static void test_brotli_blocks_reused(void **state)
{
    config_compression cfg = cfg_of(6, 5);
    gw_compressor *c = gw_compressor_create();
    assert_int_equal(gw_compressor_kept_bytes(c), 0);
    static const size_t sizes[] = {1000, 1 << 20, 1000, 300000, 0, 1 << 20, 5000, 1};
    for (size_t round = 0; round < 3; round++) {
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
            unsigned char *body = json_like(sizes[i], (unsigned)(round * 31 + i));
            struct evbuffer *in = evbuffer_new(), *out = evbuffer_new();
            evbuffer_add(in, body, sizes[i]);
            assert_int_equal(gw_compress(c, &cfg, GW_ENC_BR, in, out), 0);
            decoder d;
            dec_init(&d, GW_ENC_BR);
            dec_feed(&d, out);
            assert_true(d.finished);
            assert_int_equal(d.len, sizes[i]);
            if (sizes[i])
                assert_memory_equal(d.out, body, sizes[i]);
            dec_free(&d);
            /* a streamed answer in between, drawing on the same blocks */
            stream_one(c, &cfg, GW_ENC_BR, sizes[i] / 2, 4096, 3);
            assert_true(gw_compressor_kept_bytes(c) > 0);
            assert_true(gw_compressor_kept_bytes(c) <= 8u << 20);
            evbuffer_free(in);
            evbuffer_free(out);
            free(body);
        }
    }
    gw_compressor_free(c);
}

/* All of body through a new encoder of c in one FINISH; the output (the
 * caller frees it) must decode to body. */
static struct evbuffer *encode_whole_stream(gw_compressor *c, const config_compression *cfg, gw_encoding enc,
                                            const unsigned char *body, size_t size, gw_encoder **used)
{
    gw_encoder *e = gw_encoder_start(c, cfg, enc, 0);
    assert_non_null(e);
    if (used)
        *used = e;
    struct evbuffer *in = evbuffer_new(), *out = evbuffer_new();
    evbuffer_add(in, body, size);
    assert_int_equal(gw_encoder_write(e, in, out, GW_ENCODER_FINISH), 0);
    gw_encoder_end(e);
    evbuffer_free(in);
    struct evbuffer *copy = evbuffer_new();
    evbuffer_add_buffer_reference(copy, out);
    decoder d;
    dec_init(&d, enc);
    dec_feed(&d, copy);
    assert_true(d.finished);
    assert_int_equal(d.len, size);
    assert_memory_equal(d.out, body, size);
    dec_free(&d);
    evbuffer_free(copy);
    return out;
}

static bool same_bytes(struct evbuffer *a, struct evbuffer *b)
{
    size_t n = evbuffer_get_length(a);
    return n == evbuffer_get_length(b) && memcmp(evbuffer_pullup(a, -1), evbuffer_pullup(b, -1), n) == 0;
}

/* An ended gzip encoder's zlib stream is kept, and the next gzip answer takes
 * it (the count drops back to 0 when it starts) and, reset, writes the very
 * bytes a new stream would. Brotli encoders and gw_compress leave the count
 * alone. */
static void test_gzip_stream_kept_and_reused(void **state)
{
    config_compression cfg = cfg_of(6, 5);
    gw_compressor *c = gw_compressor_create();
    size_t size = 100000;
    unsigned char *body = json_like(size, 11);
    assert_int_equal(gw_compressor_idle_gzip(c), 0);

    gw_encoder *first, *second;
    struct evbuffer *a = encode_whole_stream(c, &cfg, GW_ENC_GZIP, body, size, &first);
    assert_int_equal(gw_compressor_idle_gzip(c), 1); /* kept at its end */

    gw_encoder *e = gw_encoder_start(c, &cfg, GW_ENC_GZIP, 0);
    assert_non_null(e);
    assert_ptr_equal(e, first);                      /* the kept one, */
    assert_int_equal(gw_compressor_idle_gzip(c), 0); /* taken off the idle list */
    gw_encoder_end(e);
    assert_int_equal(gw_compressor_idle_gzip(c), 1);

    /* Reused for a whole answer: reset, the same bytes as a first use. */
    struct evbuffer *b = encode_whole_stream(c, &cfg, GW_ENC_GZIP, body, size, &second);
    assert_ptr_equal(second, first);
    assert_true(same_bytes(a, b));
    assert_int_equal(gw_compressor_idle_gzip(c), 1);

    /* Brotli does not take it nor add to it; neither does gw_compress (its
     * own encoder). */
    evbuffer_free(encode_whole_stream(c, &cfg, GW_ENC_BR, body, size, NULL));
    assert_int_equal(gw_compressor_idle_gzip(c), 1);
    struct evbuffer *in = evbuffer_new(), *out = evbuffer_new();
    evbuffer_add(in, body, size);
    assert_int_equal(gw_compress(c, &cfg, GW_ENC_GZIP, in, out), 0);
    assert_true(same_bytes(a, out)); /* whole or streamed in one piece: the same bytes */
    assert_int_equal(gw_compressor_idle_gzip(c), 1);

    evbuffer_free(in);
    evbuffer_free(out);
    evbuffer_free(a);
    evbuffer_free(b);
    free(body);
    gw_compressor_free(c);
}

/* An encoder whose write failed (here: the output cannot take more, a frozen
 * evbuffer) stays failed and its stream is not kept for the next answer,
 * which gets a new one that works. */
static void test_failed_gzip_encoder_not_kept(void **state)
{
    config_compression cfg = cfg_of(6, 5);
    gw_compressor *c = gw_compressor_create();
    size_t size = 50000;
    unsigned char *body = json_like(size, 12);
    gw_encoder *kept;
    struct evbuffer *good = encode_whole_stream(c, &cfg, GW_ENC_GZIP, body, size, &kept);
    assert_int_equal(gw_compressor_idle_gzip(c), 1);

    gw_encoder *e = gw_encoder_start(c, &cfg, GW_ENC_GZIP, 0);
    assert_ptr_equal(e, kept);
    assert_int_equal(gw_compressor_idle_gzip(c), 0);
    struct evbuffer *in = evbuffer_new(), *out = evbuffer_new();
    evbuffer_add(in, body, size);
    evbuffer_freeze(out, 0); /* no space can be reserved at its end */
    assert_int_equal(gw_encoder_write(e, in, out, GW_ENCODER_PROCESS), -1);
    evbuffer_unfreeze(out, 0);
    evbuffer_drain(in, evbuffer_get_length(in));
    evbuffer_add(in, body, size);
    assert_int_equal(gw_encoder_write(e, in, out, GW_ENCODER_FINISH), -1); /* failed for good */
    gw_encoder_end(e);
    assert_int_equal(gw_compressor_idle_gzip(c), 0); /* not kept */

    /* The next answer gets a new stream (nothing was kept) and is whole. */
    struct evbuffer *again = encode_whole_stream(c, &cfg, GW_ENC_GZIP, body, size, NULL);
    assert_true(same_bytes(good, again));
    assert_int_equal(gw_compressor_idle_gzip(c), 1);

    evbuffer_free(in);
    evbuffer_free(out);
    evbuffer_free(good);
    evbuffer_free(again);
    free(body);
    gw_compressor_free(c);
}

/* Six gzip answers at once: when they end, four streams are kept, the rest
 * freed; the next four answers take those, the fifth gets a new one. */
static void test_at_most_four_gzip_streams_kept(void **state)
{
    config_compression cfg = cfg_of(6, 5);
    gw_compressor *c = gw_compressor_create();
    enum { N = 6 };
    size_t size = 20000;
    unsigned char *body = json_like(size, 13);
    gw_encoder *e[N];
    for (int i = 0; i < N; i++) {
        e[i] = gw_encoder_start(c, &cfg, GW_ENC_GZIP, 0);
        assert_non_null(e[i]);
    }
    struct evbuffer *in = evbuffer_new(), *out = evbuffer_new();
    for (int i = 0; i < N; i++) {
        evbuffer_add(in, body, size);
        assert_int_equal(gw_encoder_write(e[i], in, out, GW_ENCODER_FINISH), 0);
        decoder d;
        dec_init(&d, GW_ENC_GZIP);
        dec_feed(&d, out);
        assert_true(d.finished);
        assert_int_equal(d.len, size);
        dec_free(&d);
    }
    for (int i = 0; i < N; i++) {
        gw_encoder_end(e[i]);
        assert_int_equal(gw_compressor_idle_gzip(c), i + 1 < 4 ? i + 1 : 4);
    }
    gw_encoder *again[5];
    for (int i = 0; i < 5; i++) {
        again[i] = gw_encoder_start(c, &cfg, GW_ENC_GZIP, 0);
        assert_non_null(again[i]);
        assert_int_equal(gw_compressor_idle_gzip(c), i < 4 ? 3 - i : 0);
    }
    for (int i = 0; i < 5; i++)
        gw_encoder_end(again[i]); /* unfinished: still kept, reset at the next start */
    assert_int_equal(gw_compressor_idle_gzip(c), 4);
    evbuffer_free(encode_whole_stream(c, &cfg, GW_ENC_GZIP, body, size, NULL));
    assert_int_equal(gw_compressor_idle_gzip(c), 4);
    evbuffer_free(in);
    evbuffer_free(out);
    free(body);
    gw_compressor_free(c);
}

/* The size of body compressed whole or streamed (16 KiB pieces); the output
 * must decode to body. */
static size_t compressed_size(gw_compressor *c, const config_compression *cfg, gw_encoding enc,
                              const unsigned char *body, size_t size, bool streamed)
{
    struct evbuffer *in = evbuffer_new(), *out = evbuffer_new();
    if (streamed) {
        gw_encoder *e = gw_encoder_start(c, cfg, enc, 0);
        assert_non_null(e);
        for (size_t off = 0; off < size; off += 16384) {
            evbuffer_add(in, body + off, size - off < 16384 ? size - off : 16384);
            assert_int_equal(gw_encoder_write(e, in, out, GW_ENCODER_PROCESS), 0);
        }
        assert_int_equal(gw_encoder_write(e, in, out, GW_ENCODER_FINISH), 0);
        gw_encoder_end(e);
    } else {
        evbuffer_add(in, body, size);
        assert_int_equal(gw_compress(c, cfg, enc, in, out), 0);
    }
    size_t n = evbuffer_get_length(out);
    decoder d;
    dec_init(&d, enc);
    dec_feed(&d, out);
    assert_true(d.finished);
    assert_int_equal(d.len, size);
    assert_memory_equal(d.out, body, size);
    dec_free(&d);
    evbuffer_free(in);
    evbuffer_free(out);
    return n;
}

/* compression.brotli_quality and gzip_level reach the encoders: a 256 KiB
 * JSON-like body gets strictly smaller from brotli quality 0 to 5 to 11 and
 * from gzip level 1 to 9, whole (gw_compress) and streamed (gw_encoder, in
 * 16 KiB pieces), and always decodes to itself. */
static void test_quality_and_level_take_effect(void **state)
{
    gw_compressor *c = gw_compressor_create();
    size_t size = 256 * 1024;
    unsigned char *body = json_like(size, 1);
    for (int streamed = 0; streamed < 2; streamed++) {
        static const int qualities[] = {0, 5, 11};
        size_t br[3];
        for (int i = 0; i < 3; i++) {
            config_compression cfg = cfg_of(6, qualities[i]);
            br[i] = compressed_size(c, &cfg, GW_ENC_BR, body, size, streamed);
        }
        print_message("brotli %s: q0 %zu, q5 %zu, q11 %zu bytes\n", streamed ? "streamed" : "whole", br[0],
                      br[1], br[2]);
        assert_true(br[0] > br[1]);
        assert_true(br[1] > br[2]);
        config_compression g1 = cfg_of(1, 5), g9 = cfg_of(9, 5);
        size_t gz1 = compressed_size(c, &g1, GW_ENC_GZIP, body, size, streamed);
        size_t gz9 = compressed_size(c, &g9, GW_ENC_GZIP, body, size, streamed);
        print_message("gzip %s: level 1 %zu, level 9 %zu bytes\n", streamed ? "streamed" : "whole", gz1, gz9);
        assert_true(gz1 > gz9);
    }
    free(body);
    gw_compressor_free(c);
}

static void test_identity_is_no_encoder(void **state)
{
    config_compression cfg = cfg_of(6, 5);
    gw_compressor *c = gw_compressor_create();
    assert_null(gw_encoder_start(c, &cfg, GW_ENC_IDENTITY, 0));
    struct evbuffer *in = evbuffer_new(), *out = evbuffer_new();
    assert_int_equal(gw_compress(c, &cfg, GW_ENC_IDENTITY, in, out), -1);
    evbuffer_free(in);
    evbuffer_free(out);
    gw_compressor_free(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_whole_body_round_trip),
        cmocka_unit_test(test_streamed_flush_and_finish),
        cmocka_unit_test(test_concurrent_encoders_and_reuse),
        cmocka_unit_test(test_level_change),
        cmocka_unit_test(test_brotli_blocks_reused),
        cmocka_unit_test(test_identity_is_no_encoder),
        cmocka_unit_test(test_gzip_stream_kept_and_reused),
        cmocka_unit_test(test_failed_gzip_encoder_not_kept),
        cmocka_unit_test(test_at_most_four_gzip_streams_kept),
        cmocka_unit_test(test_quality_and_level_take_effect),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

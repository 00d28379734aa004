/*
 * compress.c - gzip (zlib, windowBits 31) and brotli for answers, whole or
 * streamed. Runs on the worker that owns the gw_compressor.
 *
 * Both ways go through one encoder type: a whole body is one write with
 * FINISH over its chunks as they lie in the evbuffer (nothing copied); a
 * streamed body is one write per piece that arrived. The zlib streams of ended
 * encoders are kept (at most GW_COMPRESS_IDLE_GZIP) and reset for the next.
 */
#include "gateway/compress.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <sys/queue.h>

#include <event2/keyvalq_struct.h>

#include <brotli/encode.h>
#include <zlib.h>

#define OUT_CHUNK (16 * 1024)     /* output space reserved per step */
#define GW_COMPRESS_IDLE_GZIP 4   /* reset zlib streams a worker keeps for its next answers */
#define PEEK_VECS 16              /* input extents taken per step (more: another round) */
#define GW_BROTLI_STREAM_LGWIN 19 /* a streamed answer's window: 512 KiB */
#define BR_KEEP_BLOCKS 16         /* freed brotli blocks a worker keeps for its next encoders */
#define BR_KEEP_BYTES (8u << 20)
#define BR_HEADER 16 /* before each brotli block: its size (keeps the block 16-aligned) */

struct gw_encoder {
    gw_compressor *owner;
    gw_encoding enc;
    int level;
    bool z_ready;
    bool failed;
    z_stream z;
    BrotliEncoderState *br;
    struct gw_encoder *next; /* in owner->idle */
};

struct gw_compressor {
    gw_encoder *idle; /* gzip encoders with a live zlib stream, for reuse */
    unsigned idle_count;
    gw_encoder whole; /* gw_compress's own, reused answer after answer */
    /* Brotli has no reset: each answer gets a new encoder, but the blocks the
     * last ones freed (hash tables, ring buffer) are kept here and handed to
     * the next, so a worker's brotli memory is reused rather than allocated
     * per answer. At most BR_KEEP_BLOCKS blocks and BR_KEEP_BYTES. */
    void *br_kept[BR_KEEP_BLOCKS];
    unsigned br_kept_count;
    size_t br_kept_bytes;
};

static size_t br_block_size(void *block)
{
    size_t size;
    memcpy(&size, (char *)block - BR_HEADER, sizeof size);
    return size;
}

/* brotli_alloc_func: the smallest kept block that fits and is at most twice
 * the size asked (so a small encoder does not pin a large block), else a new one. */
static void *br_alloc(void *opaque, size_t size)
{
    gw_compressor *c = opaque;
    unsigned best = BR_KEEP_BLOCKS;
    for (unsigned i = 0; i < c->br_kept_count; i++) {
        size_t have = br_block_size(c->br_kept[i]);
        if (have >= size && have / 2 <= size &&
            (best == BR_KEEP_BLOCKS || have < br_block_size(c->br_kept[best])))
            best = i;
    }
    if (best < BR_KEEP_BLOCKS) {
        void *block = c->br_kept[best];
        c->br_kept_bytes -= br_block_size(block);
        c->br_kept[best] = c->br_kept[--c->br_kept_count];
        return block;
    }
    if (size > SIZE_MAX - BR_HEADER)
        return NULL;
    char *raw = malloc(size + BR_HEADER);
    if (!raw)
        return NULL;
    memcpy(raw, &size, sizeof size);
    return raw + BR_HEADER;
}

/* brotli_free_func: keep the block for the next encoder while there is room. */
static void br_free(void *opaque, void *block)
{
    gw_compressor *c = opaque;
    if (!block)
        return;
    size_t size = br_block_size(block);
    if (c->br_kept_count < BR_KEEP_BLOCKS && size <= BR_KEEP_BYTES - c->br_kept_bytes) {
        c->br_kept[c->br_kept_count++] = block;
        c->br_kept_bytes += size;
        return;
    }
    free((char *)block - BR_HEADER);
}

size_t gw_compressor_kept_bytes(const gw_compressor *c)
{
    return c->br_kept_bytes;
}

unsigned gw_compressor_idle_gzip(const gw_compressor *c)
{
    return c->idle_count;
}

gw_compressor *gw_compressor_create(void)
{
    gw_compressor *c = calloc(1, sizeof(gw_compressor));
    if (c)
        c->whole.owner = c;
    return c;
}

static void encoder_release(gw_encoder *e)
{
    if (e->z_ready)
        deflateEnd(&e->z);
    e->z_ready = false;
    if (e->br)
        BrotliEncoderDestroyInstance(e->br);
    e->br = NULL;
}

void gw_compressor_free(gw_compressor *c)
{
    if (!c)
        return;
    while (c->idle) {
        gw_encoder *e = c->idle;
        c->idle = e->next;
        encoder_release(e);
        free(e);
    }
    encoder_release(&c->whole);
    for (unsigned i = 0; i < c->br_kept_count; i++)
        free((char *)c->br_kept[i] - BR_HEADER);
    free(c);
}

/* Make e ready for a new answer: a zlib stream for level (reset when it has
 * one at that level, remade when a reload changed the level), or a new
 * brotli encoder. */
static int encoder_prepare(gw_encoder *e, const config_compression *cfg, gw_encoding enc, size_t size_hint)
{
    e->failed = false;
    e->enc = enc;
    if (e->br) {
        BrotliEncoderDestroyInstance(e->br);
        e->br = NULL;
    }
    if (enc == GW_ENC_GZIP) {
        int level = cfg->gzip_level;
        if (e->z_ready && e->level == level)
            return deflateReset(&e->z) == Z_OK ? 0 : -1;
        if (e->z_ready)
            deflateEnd(&e->z);
        memset(&e->z, 0, sizeof e->z);
        e->z_ready = deflateInit2(&e->z, level, Z_DEFLATED, 31, 8, Z_DEFAULT_STRATEGY) == Z_OK;
        e->level = level;
        return e->z_ready ? 0 : -1;
    }
    if (enc != GW_ENC_BR)
        return -1;
    e->br = BrotliEncoderCreateInstance(br_alloc, br_free, e->owner);
    if (!e->br)
        return -1;
    BrotliEncoderSetParameter(e->br, BROTLI_PARAM_QUALITY, (uint32_t)cfg->brotli_quality);
    if (size_hint)
        BrotliEncoderSetParameter(e->br, BROTLI_PARAM_SIZE_HINT,
                                  (uint32_t)(size_hint < (1u << 30) ? size_hint : (1u << 30)));
    return 0;
}

/* Compress n input extents into out, then do op (with n == 0 too). */
static int encode_vec(gw_encoder *e, const struct evbuffer_iovec *vec, int n, struct evbuffer *out,
                      gw_encoder_op op)
{
    for (int i = 0; i <= n; i++) {
        bool last = i == n;
        if (last && op == GW_ENCODER_PROCESS)
            break;
        const uint8_t *next_in = last ? NULL : vec[i].iov_base;
        size_t avail_in = last ? 0 : vec[i].iov_len;
        for (;;) {
            struct evbuffer_iovec space;
            if (evbuffer_reserve_space(out, OUT_CHUNK, &space, 1) < 1)
                return -1;
            bool done;
            if (e->enc == GW_ENC_GZIP) {
                int flush = !last ? Z_NO_FLUSH : op == GW_ENCODER_FINISH ? Z_FINISH : Z_SYNC_FLUSH;
                e->z.next_in = (Bytef *)next_in;
                e->z.avail_in = (uInt)avail_in;
                e->z.next_out = space.iov_base;
                e->z.avail_out = (uInt)space.iov_len;
                int zr = deflate(&e->z, flush);
                space.iov_len -= e->z.avail_out;
                evbuffer_commit_space(out, &space, 1);
                if (zr == Z_STREAM_ERROR)
                    return -1;
                next_in = e->z.next_in;
                avail_in = e->z.avail_in;
                /* Done when all input is in and zlib had room left over (so
                 * it has nothing more to say for this flush). */
                done = flush == Z_FINISH ? zr == Z_STREAM_END : avail_in == 0 && e->z.avail_out > 0;
            } else {
                BrotliEncoderOperation bop = !last                     ? BROTLI_OPERATION_PROCESS
                                             : op == GW_ENCODER_FINISH ? BROTLI_OPERATION_FINISH
                                                                       : BROTLI_OPERATION_FLUSH;
                size_t avail_out = space.iov_len;
                uint8_t *next_out = space.iov_base;
                if (!BrotliEncoderCompressStream(e->br, bop, &avail_in, &next_in, &avail_out, &next_out,
                                                 NULL)) {
                    evbuffer_commit_space(out, &space, 0);
                    return -1;
                }
                space.iov_len -= avail_out;
                evbuffer_commit_space(out, &space, 1);
                done = bop == BROTLI_OPERATION_FINISH ? BrotliEncoderIsFinished(e->br)
                                                      : avail_in == 0 && !BrotliEncoderHasMoreOutput(e->br);
            }
            if (done)
                break;
        }
    }
    return 0;
}

/* Compress `in` (read in place, left as it is) into out, then do op. */
static int encode_buffer(gw_encoder *e, struct evbuffer *in, struct evbuffer *out, gw_encoder_op op)
{
    struct evbuffer_ptr pos;
    evbuffer_ptr_set(in, &pos, 0, EVBUFFER_PTR_SET);
    size_t left = evbuffer_get_length(in);
    struct evbuffer_iovec vec[PEEK_VECS];
    while (left > 0) {
        int n = evbuffer_peek(in, (ev_ssize_t)left, &pos, vec, PEEK_VECS);
        if (n <= 0)
            return -1;
        if (n > PEEK_VECS)
            n = PEEK_VECS;
        size_t took = 0;
        for (int i = 0; i < n; i++)
            took += vec[i].iov_len;
        if (took > left) { /* the last extent runs past what was asked */
            vec[n - 1].iov_len -= took - left;
            took = left;
        }
        if (encode_vec(e, vec, n, out, GW_ENCODER_PROCESS) != 0)
            return -1;
        left -= took;
        if (left && evbuffer_ptr_set(in, &pos, took, EVBUFFER_PTR_ADD) != 0)
            return -1;
    }
    return op == GW_ENCODER_PROCESS ? 0 : encode_vec(e, NULL, 0, out, op);
}

gw_encoder *gw_encoder_start(gw_compressor *c, const config_compression *cfg, gw_encoding enc,
                             size_t size_hint)
{
    gw_encoder *e = NULL;
    if (enc == GW_ENC_GZIP && c->idle) {
        e = c->idle;
        c->idle = e->next;
        c->idle_count--;
    } else {
        e = calloc(1, sizeof *e);
        if (!e)
            return NULL;
    }
    e->owner = c;
    e->next = NULL;
    if (encoder_prepare(e, cfg, enc, size_hint) != 0) {
        encoder_release(e);
        free(e);
        return NULL;
    }
    /* A stream may wait on a slow client for long, and clients choose how many
     * there are: a 512 KiB window (ngx_brotli's default) keeps one at about
     * 2 MiB, where brotli's default of 4 MiB took about 48 MiB (with its input
     * blocks and output storage), for output 0.6 % smaller. */
    if (enc == GW_ENC_BR)
        BrotliEncoderSetParameter(e->br, BROTLI_PARAM_LGWIN, GW_BROTLI_STREAM_LGWIN);
    return e;
}

int gw_encoder_write(gw_encoder *e, struct evbuffer *in, struct evbuffer *out, gw_encoder_op op)
{
    if (e->failed || encode_buffer(e, in, out, op) != 0) {
        e->failed = true;
        return -1;
    }
    evbuffer_drain(in, evbuffer_get_length(in));
    return 0;
}

void gw_encoder_end(gw_encoder *e)
{
    if (!e)
        return;
    gw_compressor *c = e->owner;
    if (e->br) {
        BrotliEncoderDestroyInstance(e->br);
        e->br = NULL;
    }
    if (e->z_ready && !e->failed && c->idle_count < GW_COMPRESS_IDLE_GZIP) {
        e->next = c->idle;
        c->idle = e;
        c->idle_count++;
        return;
    }
    encoder_release(e);
    free(e);
}

int gw_compress(gw_compressor *c, const config_compression *cfg, gw_encoding enc, struct evbuffer *in,
                struct evbuffer *out)
{
    gw_encoder *e = &c->whole;
    int rc = encoder_prepare(e, cfg, enc, evbuffer_get_length(in));
    if (rc == 0)
        rc = encode_buffer(e, in, out, GW_ENCODER_FINISH);
    if (e->br) { /* no reset in brotli 1.0.9: made per answer */
        BrotliEncoderDestroyInstance(e->br);
        e->br = NULL;
    }
    return rc;
}

bool gw_compress_type_ok(const config_compression *cfg, const char *ct, size_t len)
{
    if (!ct)
        return false;
    /* The media type without parameters and surrounding spaces. */
    while (len && (*ct == ' ' || *ct == '\t')) {
        ct++;
        len--;
    }
    size_t mlen = 0;
    while (mlen < len && ct[mlen] != ';' && ct[mlen] != ' ' && ct[mlen] != '\t')
        mlen++;
    const char *slash = memchr(ct, '/', mlen);
    if (!slash)
        return false;
    size_t tlen = (size_t)(slash - ct);
    for (size_t i = 0; i < cfg->type_count; i++) {
        const char *t = cfg->types[i];
        size_t n = strlen(t);
        if (n >= 2 && t[n - 2] == '/' && t[n - 1] == '*') {
            if (n - 2 == tlen && strncasecmp(t, ct, tlen) == 0)
                return true;
        } else if (n == mlen && strncasecmp(t, ct, mlen) == 0) {
            return true;
        }
    }
    return false;
}
struct evbuffer *gw_compress_own(gw_compressor *c, const config_compression *cfg, const char *accept_encoding,
                                 bool head, int status, const char *content_type, struct evbuffer *body,
                                 struct evkeyvalq *headers, struct evbuffer **packed)
{
    *packed = NULL;
    if (!cfg->enabled || head || status < 200 || status == 204 || status == 206 || status == 304 ||
        evbuffer_get_length(body) < (size_t)cfg->min_bytes ||
        evbuffer_get_length(body) > (size_t)cfg->max_bytes ||
        !gw_compress_type_ok(cfg, content_type, strlen(content_type)))
        return body;
    evhttp_add_header(headers, "Vary", "Accept-Encoding");
    gw_encoding prefs[2];
    size_t n = gw_compress_prefs(cfg, prefs);
    gw_encoding enc = gw_encoding_choose(accept_encoding, prefs, n, NULL);
    if (enc == GW_ENC_IDENTITY)
        return body;
    struct evbuffer *out = evbuffer_new();
    if (!out || gw_compress(c, cfg, enc, body, out) != 0 ||
        evbuffer_get_length(out) >= evbuffer_get_length(body)) {
        if (out)
            evbuffer_free(out);
        return body;
    }
    evhttp_add_header(headers, "Content-Encoding", gw_encoding_name(enc));
    *packed = out;
    return out;
}

const char *gw_accept_encoding_of(const struct evkeyvalq *headers, char *buf, size_t size)
{
    const char *first = NULL;
    int count = 0;
    const struct evkeyval *h;
    TAILQ_FOREACH(h, headers, next)
    {
        if (strcasecmp(h->key, "Accept-Encoding") == 0 && count++ == 0)
            first = h->value;
    }
    if (count <= 1)
        return first;
    size_t used = 0;
    TAILQ_FOREACH(h, headers, next)
    {
        if (strcasecmp(h->key, "Accept-Encoding") != 0)
            continue;
        size_t n = strlen(h->value);
        if (used + n + 3 > size)
            return ""; /* too long to read whole: a refusal could be in what is left out, so identity */
        if (used) {
            memcpy(buf + used, ", ", 2);
            used += 2;
        }
        memcpy(buf + used, h->value, n);
        used += n;
        buf[used] = '\0';
    }
    return buf;
}

size_t gw_compress_prefs(const config_compression *cfg, gw_encoding *prefs)
{
    size_t n = 0;
    for (size_t i = 0; i < cfg->algorithm_count && n < 2; i++) {
        if (strcmp(cfg->algorithms[i], "br") == 0)
            prefs[n++] = GW_ENC_BR;
        else if (strcmp(cfg->algorithms[i], "gzip") == 0)
            prefs[n++] = GW_ENC_GZIP;
    }
    return n;
}

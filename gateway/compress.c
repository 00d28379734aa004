/*
 * compress.c - gzip (zlib, windowBits 31) and brotli for answers.
 */
#include "gateway/compress.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <sys/queue.h>

#include <event2/keyvalq_struct.h>

#include <brotli/encode.h>
#include <zlib.h>

#define OUT_CHUNK (16 * 1024) /* output space reserved per step */

struct gw_compressor {
    z_stream z;
    bool z_ready;
    int z_level;
};

gw_compressor *gw_compressor_create(void)
{
    return calloc(1, sizeof(gw_compressor));
}

void gw_compressor_free(gw_compressor *c)
{
    if (!c)
        return;
    if (c->z_ready)
        deflateEnd(&c->z);
    free(c);
}

/* A zlib stream for level: made once, reset per answer, remade when a reload
 * changed the level. */
static int gzip_ready(gw_compressor *c, int level)
{
    if (c->z_ready && c->z_level == level)
        return deflateReset(&c->z) == Z_OK ? 0 : -1;
    if (c->z_ready)
        deflateEnd(&c->z);
    memset(&c->z, 0, sizeof c->z);
    c->z_ready = deflateInit2(&c->z, level, Z_DEFLATED, 31, 8, Z_DEFAULT_STRATEGY) == Z_OK;
    c->z_level = level;
    return c->z_ready ? 0 : -1;
}

static int gzip_body(gw_compressor *c, int level, struct evbuffer *in, struct evbuffer *out)
{
    if (gzip_ready(c, level) != 0)
        return -1;
    int n = evbuffer_peek(in, -1, NULL, NULL, 0);
    struct evbuffer_iovec *vec = n > 0 ? calloc((size_t)n, sizeof *vec) : NULL;
    if (n > 0 && !vec)
        return -1;
    if (n > 0)
        evbuffer_peek(in, -1, NULL, vec, n);
    int rc = 0;
    for (int i = 0; i <= n && rc == 0; i++) {
        bool last = i == n;
        c->z.next_in = last ? NULL : (Bytef *)vec[i].iov_base;
        c->z.avail_in = last ? 0 : (uInt)vec[i].iov_len;
        int flush = last ? Z_FINISH : Z_NO_FLUSH;
        for (;;) {
            struct evbuffer_iovec space;
            if (evbuffer_reserve_space(out, OUT_CHUNK, &space, 1) < 1) {
                rc = -1;
                break;
            }
            c->z.next_out = space.iov_base;
            c->z.avail_out = (uInt)space.iov_len;
            int zr = deflate(&c->z, flush);
            space.iov_len -= c->z.avail_out;
            evbuffer_commit_space(out, &space, 1);
            if (zr == Z_STREAM_ERROR) {
                rc = -1;
                break;
            }
            if (last ? zr == Z_STREAM_END : (c->z.avail_in == 0 && c->z.avail_out > 0))
                break;
        }
    }
    free(vec);
    return rc;
}

static int brotli_body(int quality, struct evbuffer *in, struct evbuffer *out)
{
    BrotliEncoderState *s = BrotliEncoderCreateInstance(NULL, NULL, NULL);
    if (!s)
        return -1;
    BrotliEncoderSetParameter(s, BROTLI_PARAM_QUALITY, (uint32_t)quality);
    BrotliEncoderSetParameter(s, BROTLI_PARAM_SIZE_HINT, (uint32_t)evbuffer_get_length(in));
    int n = evbuffer_peek(in, -1, NULL, NULL, 0);
    struct evbuffer_iovec *vec = n > 0 ? calloc((size_t)n, sizeof *vec) : NULL;
    int rc = n > 0 && !vec ? -1 : 0;
    if (n > 0 && vec)
        evbuffer_peek(in, -1, NULL, vec, n);
    for (int i = 0; i <= n && rc == 0; i++) {
        bool last = i == n;
        size_t avail_in = last ? 0 : vec[i].iov_len;
        const uint8_t *next_in = last ? NULL : vec[i].iov_base;
        BrotliEncoderOperation op = last ? BROTLI_OPERATION_FINISH : BROTLI_OPERATION_PROCESS;
        for (;;) {
            struct evbuffer_iovec space;
            if (evbuffer_reserve_space(out, OUT_CHUNK, &space, 1) < 1) {
                rc = -1;
                break;
            }
            size_t avail_out = space.iov_len;
            uint8_t *next_out = space.iov_base;
            if (!BrotliEncoderCompressStream(s, op, &avail_in, &next_in, &avail_out, &next_out, NULL)) {
                rc = -1;
                break;
            }
            space.iov_len -= avail_out;
            evbuffer_commit_space(out, &space, 1);
            if (last ? BrotliEncoderIsFinished(s) : (avail_in == 0 && !BrotliEncoderHasMoreOutput(s)))
                break;
        }
    }
    free(vec);
    BrotliEncoderDestroyInstance(s);
    return rc;
}

int gw_compress(gw_compressor *c, const config_compression *cfg, gw_encoding enc, struct evbuffer *in,
                struct evbuffer *out)
{
    switch (enc) {
    case GW_ENC_GZIP:
        return gzip_body(c, cfg->gzip_level, in, out);
    case GW_ENC_BR:
        return brotli_body(cfg->brotli_quality, in, out);
    default:
        return -1;
    }
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

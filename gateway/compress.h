/*
 * compress.h - gzip and brotli for answers, and the rules for when to use them.
 *
 * One gw_compressor per worker (its thread only). It keeps the zlib streams of
 * finished answers and resets one for the next answer (deflateReset), so a
 * worker does not allocate zlib's 256 KiB of state per answer; several
 * answers streaming at once each hold their own. Brotli 1.0.9 has no reset,
 * so its encoder is made per answer, with an allocator of the compressor's
 * that keeps the blocks finished encoders freed (at most 16 blocks, 8 MiB)
 * and hands them to the next: the encoder is new, its memory is the worker's
 * (measured: creating and destroying cost under a microsecond; the
 * allocations of its first use 1 to 2 µs of the 22 µs a 1 KiB answer takes at
 * quality 5, which the kept blocks save).
 * Bodies are read chunk by chunk from their evbuffer and written into reserved
 * space of the output, so a large body is never copied into one flat buffer
 * first.
 *
 * Two ways to use it: gw_compress() for a body that is all here (buffered
 * answers, cache entries: at most compression.max_bytes, since it runs on the
 * worker's loop in one go), and a gw_encoder for an answer that streams, fed
 * each piece as it arrives (bounded work per event, no size limit).
 *
 * When an answer qualifies (gw_compress_eligible): the request is not HEAD;
 * the status is 200-299 but not 204 or 206, or 3xx/4xx/5xx with a body, but
 * never 304; no Content-Encoding (other than identity) and no Content-Range
 * on it; no Cache-Control: no-transform; its Content-Type is one of
 * compression.types (type/subtype or type/ *, parameters ignored, case
 * insensitive); its body has at least compression.min_bytes. Then the answer
 * varies by Accept-Encoding (Vary is added) whatever this client accepts, and
 * is compressed when the client accepts br or gzip (gw_encoding_choose) and
 * the result is smaller.
 */
#ifndef GATEWAY_COMPRESS_H
#define GATEWAY_COMPRESS_H

#include <stdbool.h>
#include <stddef.h>

#include <event2/buffer.h>
#include <event2/http.h>

#include "config/config.h"
#include "gateway/encoding.h"

typedef struct gw_compressor gw_compressor;

gw_compressor *gw_compressor_create(void);
/* Bytes of brotli blocks kept for the next encoders (at most 8 MiB); for tests. */
size_t gw_compressor_kept_bytes(const gw_compressor *c);
/* zlib streams of ended gzip encoders kept, reset, for the next ones (at most
 * 4; an encoder that failed is not kept); for tests. */
unsigned gw_compressor_idle_gzip(const gw_compressor *c);
void gw_compressor_free(gw_compressor *c);

/* Compress all of `in` (left as it was) into `out` with `enc` (GW_ENC_GZIP at
 * gzip_level, GW_ENC_BR at brotli_quality from cfg). 0, or -1 on failure (out
 * then holds garbage: the caller discards it). */
int gw_compress(gw_compressor *c, const config_compression *cfg, gw_encoding enc, struct evbuffer *in,
                struct evbuffer *out);

typedef struct gw_encoder gw_encoder;

typedef enum {
    GW_ENCODER_PROCESS, /* compress; output may lag behind the input */
    GW_ENCODER_FLUSH,   /* and make all input so far decodable now (Z_SYNC_FLUSH, BROTLI_OPERATION_FLUSH) */
    GW_ENCODER_FINISH,  /* and end the stream: the last call */
} gw_encoder_op;

/* An encoder for one streamed answer: GW_ENC_GZIP at cfg->gzip_level or
 * GW_ENC_BR at cfg->brotli_quality. size_hint: the body's length when known,
 * else 0. NULL when out of memory or enc is neither. Owned by the caller
 * until gw_encoder_end; used on c's thread only, and c outlives it. */
gw_encoder *gw_encoder_start(gw_compressor *c, const config_compression *cfg, gw_encoding enc,
                             size_t size_hint);

/* Compress all that `in` holds (it is drained) into `out`, then do op. 0, or
 * -1 on failure (the encoder is then only good for gw_encoder_end). */
int gw_encoder_write(gw_encoder *e, struct evbuffer *in, struct evbuffer *out, gw_encoder_op op);

/* Done with e (finished or not): its zlib stream goes back to the compressor
 * for the next answer. NULL is fine. */
void gw_encoder_end(gw_encoder *e);

/* Does content_type (a Content-Type value, may be NULL) match cfg->types? */
bool gw_compress_type_ok(const config_compression *cfg, const char *content_type, size_t len);

/* An answer the gateway writes itself (a SQL route's JSON): the same rules
 * with what the gateway knows of it. Adds Vary and Content-Encoding to
 * headers when due and returns the body to send: `body` itself, or a new
 * buffer also stored in *packed for the caller to free. */
struct evbuffer *gw_compress_own(gw_compressor *c, const config_compression *cfg, const char *accept_encoding,
                                 bool head, int status, const char *content_type, struct evbuffer *body,
                                 struct evkeyvalq *headers, struct evbuffer **packed);

/* The request's Accept-Encoding: one field line as it is, several joined by
 * ", " into buf (RFC 9110 5.3); NULL when there is none; "" (identity only)
 * when they do not fit in size: a refusal could be in the part left out. */
const char *gw_accept_encoding_of(const struct evkeyvalq *headers, char *buf, size_t size);

/* The server's preference order from cfg->algorithms into prefs (at least 2
 * entries); returns how many. */
size_t gw_compress_prefs(const config_compression *cfg, gw_encoding *prefs);

#endif

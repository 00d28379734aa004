/*
 * upstream.h - a worker's connections to its upstreams, and one proxied call.
 *
 * Each worker owns one upstream_pool per runtime: for every configured
 * upstream, its targets with their passive-health state and a stack of idle
 * keep-alive connections (HTTP/1.1 carries one request at a time per
 * connection, so the pool is how requests run in parallel). upstream_call_start()
 * picks a target (round robin or least connections, skipping ejected ones),
 * sends the request, enforces the connect deadline and the call deadline with
 * its own timer, and on a connect failure or timeout of an idempotent request
 * retries once on another target. Nothing here blocks and nothing is shared
 * between threads.
 *
 * An answer is buffered whole and handed over once (done) while its body fits
 * in the call's buffer_max. A larger one (by its Content-Length, or by what has
 * arrived), or a text/event-stream, streams instead: head() hands over the head
 * and what arrived so far, then body() each further piece as it arrives, at
 * most UPSTREAM_READ_BUDGET bytes per event, until the end or a failure. The
 * caller may pause reading while its client is slow. From the head on the
 * call's deadline is an idle one: the upstream's `timeout` between two reads.
 */
#ifndef GATEWAY_UPSTREAM_H
#define GATEWAY_UPSTREAM_H

#include <stdbool.h>
#include <stdint.h>

#include <event2/http.h>

struct evbuffer;
struct evkeyvalq;

#include "gateway/http1.h"
#include "gateway/runtime.h"
#include "gateway/server.h"

#define UPSTREAM_MAX_RESPONSE_HEADER_BYTES (64L * 1024)
/* Bytes asked of the kernel per read. */
#define UPSTREAM_READ_CHUNK (16 * 1024)
/* Most bytes read from one connection per event: then the loop polls again
 * (a fast upstream cannot hold the worker, and a streamed piece, compressed
 * or not, is bounded work). */
#define UPSTREAM_READ_BUDGET (256 * 1024)

typedef struct upstream_pool upstream_pool_t;
typedef struct upstream_call upstream_call_t;

/* Fill one attempt's outgoing request: append header lines ("Name: value\r\n",
 * Host included) to `headers` and the body to `body`. `target` is the
 * "host:port" being called, for a Host header when the client sent none.
 * Called once per attempt (a retry builds the request again). */
typedef void (*upstream_fill_fn)(void *arg, struct evbuffer *headers, struct evbuffer *body,
                                 const char *target);

/* An upstream's answer, borrowed for the duration of the done callback. */
typedef struct upstream_response {
    int status;
    const char *reason;
    const http1_field *fields; /* as received, hop-by-hop ones included */
    size_t field_count;
    struct evbuffer *body;  /* the caller may move the contents out */
    int64_t content_length; /* the upstream's Content-Length framing, or -1 (chunked, close-delimited) */
} upstream_response;

/* The call ended. On success resp is the upstream's answer and status is 0. On
 * failure resp is NULL and status is 502 or 504. `target` names the last
 * target tried (borrowed from the runtime), or NULL. The call is already freed
 * when this runs. Not called for an answer that streamed (see body). */
typedef void (*upstream_done_fn)(void *arg, const upstream_response *resp, int status, const char *target);

/* The answer streams: its head has arrived, and its body is over buffer_max
 * (by Content-Length or by what arrived) or it is a text/event-stream.
 * resp->body holds what arrived so far (the caller takes it out); the fields
 * stay valid until the call ends. From now on no retry is possible and the
 * call's deadline is the upstream's `timeout` between reads. Return false to
 * abandon the call (its connection is closed, nothing more is called; the
 * caller forgets its handle). */
typedef bool (*upstream_head_fn)(void *arg, const upstream_response *resp, const char *target);

typedef enum {
    UPSTREAM_BODY_MORE,    /* more of the body is in `body` */
    UPSTREAM_BODY_END,     /* the body is complete (its last bytes may be in `body`) */
    UPSTREAM_BODY_FAILED,  /* the connection failed or the framing broke: the body is cut short */
    UPSTREAM_BODY_TIMEOUT, /* nothing came within the upstream's timeout: cut short */
} upstream_body_event;

/* A streamed answer goes on. `body` (the caller takes out what it wants; what
 * is left is dropped) is borrowed for the callback. With MORE, `drained` says
 * the upstream has nothing more to read just now (a moment to flush a
 * compressor), and returning false abandons the call as head's false does.
 * With END, FAILED or TIMEOUT the call is already freed and the return value
 * is ignored. */
typedef bool (*upstream_body_fn)(void *arg, struct evbuffer *body, upstream_body_event ev, bool drained);

/* What a call reports to. fill and done are required; head and body go
 * together: without them an answer over buffer_max fails with 502. */
typedef struct upstream_handlers {
    upstream_fill_fn fill;
    upstream_done_fn done;
    upstream_head_fn head;
    upstream_body_fn body;
} upstream_handlers;

upstream_pool_t *upstream_pool_create(struct event_base *base, gw_runtime *rt, metrics_shard_t *shard,
                                      const gw_metrics *m);
/* Free the pool: every idle connection and timer. No call may be in flight. */
void upstream_pool_free(upstream_pool_t *pool);

/* Start a call to upstream `index` (into rt->cfg->upstreams). deadline_ns is
 * the request's absolute CLOCK_MONOTONIC deadline; each attempt also stops at
 * the upstream's `timeout` (until the answer streams). buffer_max: the most
 * body buffered before the answer streams. `uri` and `h` are borrowed: they
 * must stay valid until the call ends (done or the last body callback runs,
 * or it is cancelled). Returns NULL only when out of memory (nothing was sent,
 * nothing is called). */
upstream_call_t *upstream_call_start(upstream_pool_t *pool, size_t index, enum evhttp_cmd_type cmd,
                                     const char *uri, bool idempotent, uint64_t deadline_ns,
                                     size_t buffer_max, const upstream_handlers *h, void *arg);

/* Stop reading a streamed answer (paused true: the client is slow) or go on.
 * While paused nothing is read and the idle deadline does not run; it starts
 * afresh when reading goes on. Never calls back from here. */
void upstream_call_pause(upstream_call_t *call, bool paused);

/* Abandon a call: no callback will run; its connection is closed (never
 * reused mid-exchange). Not from inside one of the call's own callbacks
 * (return false there instead). */
void upstream_call_cancel(upstream_call_t *call);

/* Monotonic clock in nanoseconds. */
uint64_t gw_now_ns(void);

#endif

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

/* Largest upstream answer we buffer; larger answers fail with 502. */
#define UPSTREAM_MAX_RESPONSE_BYTES (64L * 1024 * 1024)
#define UPSTREAM_MAX_RESPONSE_HEADER_BYTES (64L * 1024)
/* Bytes asked of the kernel per read. */
#define UPSTREAM_READ_CHUNK (16 * 1024)

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
    struct evbuffer *body; /* the caller may move the contents out */
} upstream_response;

/* The call ended. On success resp is the upstream's answer and status is 0. On
 * failure resp is NULL and status is 502 or 504. `target` names the last
 * target tried (borrowed from the runtime), or NULL. The call is already freed
 * when this runs. */
typedef void (*upstream_done_fn)(void *arg, const upstream_response *resp, int status, const char *target);

upstream_pool_t *upstream_pool_create(struct event_base *base, gw_runtime *rt, metrics_shard_t *shard,
                                      const gw_metrics *m);
/* Free the pool: every idle connection and timer. No call may be in flight. */
void upstream_pool_free(upstream_pool_t *pool);

/* Start a call to upstream `index` (into rt->cfg->upstreams). deadline_ns is
 * the request's absolute CLOCK_MONOTONIC deadline; each attempt also stops at
 * the upstream's `timeout`. `uri` is borrowed: it must stay valid until the
 * call ends (its done callback runs, or it is cancelled). Returns NULL only when out of
 * memory (nothing was sent, done is not called). */
upstream_call_t *upstream_call_start(upstream_pool_t *pool, size_t index, enum evhttp_cmd_type cmd,
                                     const char *uri, bool idempotent, uint64_t deadline_ns,
                                     upstream_fill_fn fill, upstream_done_fn done, void *arg);

/* Abandon a call: its callback will not run; its connection is reset. */
void upstream_call_cancel(upstream_call_t *call);

/* Monotonic clock in nanoseconds. */
uint64_t gw_now_ns(void);

#endif

/*
 * worker.h - one worker thread: its event loop, its HTTP server and the
 * request pipeline that runs on it.
 *
 * A worker owns an event_base, an evhttp listening on its own SO_REUSEPORT
 * sockets, a metrics shard, an access log and, per runtime, its upstream pools
 * (a "generation"). Nothing it owns is touched by another thread. The main
 * thread reaches it only through gw_worker_post_*(): each sets an atomic and
 * writes the worker's eventfd; the worker reads them on its own loop.
 */
#ifndef GATEWAY_WORKER_H
#define GATEWAY_WORKER_H

#include <stdbool.h>
#include <stddef.h>

#include <event2/http.h>

#include "gateway/server.h"

/* Mailbox bits. */
#define GW_WORKER_MSG_ACCEPT 0x1 /* re-read srv->accept_paused and follow it */
#define GW_WORKER_MSG_DRAIN 0x2  /* stop accepting, finish in-flight, exit the loop */

/* Limits evhttp enforces by itself (answering with its own HTML page and
 * closing): set past ours so requests just over the configured limits get the
 * gateway's JSON 431 / 413, while endless headers or bodies are still cut off. */
#define GW_HEADER_HARD_LIMIT_FACTOR 2
#define GW_BODY_HARD_LIMIT_SLACK_BYTES (1024L * 1024)
#define GW_DRAIN_POLL_MS 20
#define GW_LISTEN_BACKLOG 4096
#define GW_CLIENT_READ_CHUNK (16 * 1024) /* bytes asked of the kernel per client read */
#define GW_RATELIMIT_SLOTS (64 * 1024)   /* keys the local rate-limit store holds (about 1 MiB) */

/* Create a worker (main thread, before any thread starts). listen_fds are
 * bound, listening, nonblocking sockets, owned by the worker from now on. rt
 * gets one more reference, held by the worker. Returns NULL on failure. */
gw_worker *gw_worker_create(gw_server *srv, int id, gw_runtime *rt, const int *listen_fds,
                            size_t listen_count);

/* Start the thread. 0 or -1. */
int gw_worker_start(gw_worker *w);

/* Main thread: hand the worker a new runtime (a reference is taken). */
void gw_worker_post_runtime(gw_worker *w, gw_runtime *rt);
/* Main thread (or another worker): send mailbox bits. */
void gw_worker_post(gw_worker *w, unsigned bits);

/* Join the thread (after a DRAIN) and free the worker. */
void gw_worker_join_free(gw_worker *w);

/* Built-in endpoints (metrics path, /live, /ready) for a request on any
 * listener: answers and returns true when path is one of them. Runs on the
 * thread of the evhttp that received the request. */
bool gw_builtin_serve(gw_server *srv, const config_t *cfg, struct evhttp_request *req, const char *path);

/* Answer req with the gateway's JSON error body; returns the body's length. */
size_t gw_send_json_error(struct evhttp_request *req, int status, const char *text, const char *request_id);

#endif

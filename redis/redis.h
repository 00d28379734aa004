/*
 * redis.h - an asynchronous Redis client for one event loop, shared by the
 * rate limiter's store (ratelimit/rlredis.h) and the response cache
 * (cache/rstore.h). hiredis async with its libevent adapter.
 *
 * One gw_redis belongs to one thread and its event_base; nothing in it is
 * touched by another thread. It holds redis.connections_per_worker
 * connections (commands go round-robin over the connected ones), made again
 * with capped backoff (GW_REDIS_BACKOFF_MIN_MS doubling to
 * GW_REDIS_BACKOFF_MAX_MS) after a failure. A connection is up only once Redis
 * has answered its handshake (AUTH and SELECT when needed, then PING) within
 * the connect deadline; connecting TCP is not enough (a paused Redis still
 * accepts). hiredis 0.14 has no timeouts, so the connect and every command
 * have our own deadline, redis.timeout: a command past it is answered as
 * failed and its connection is dropped (a Redis that stalls is not trusted
 * with the next commands); the commands queued behind it on that connection
 * are answered as failed too, and the connection backs off as after a failed
 * connect (reset only once a command is answered again), so while Redis
 * stalls most commands are refused at once (gw_redis_command NULL) instead
 * of waiting out redis.timeout. Every connection has TCP keepalive.
 *
 * A client made with gw_redis_create_subscriber() instead holds one
 * connection in pub/sub mode (SUBSCRIBE channel after AUTH/SELECT, again
 * after each reconnect) and only delivers messages. It checks that
 * connection every few seconds (a SUBSCRIBE again, answered within
 * redis.timeout but at least 1 s): a connection that went silent is dropped
 * and made again, and on_subscribed says so.
 */
#ifndef GATEWAY_REDIS_H
#define GATEWAY_REDIS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/event.h>
#include <hiredis/hiredis.h>

#include "config/config.h"

#define GW_REDIS_BACKOFF_MIN_MS 50
#define GW_REDIS_BACKOFF_MAX_MS 1000

typedef struct gw_redis gw_redis;
typedef struct gw_redis_call gw_redis_call;

/* Diagnostic lines (connected, lost, errors) at any config_log_level. */
typedef void (*gw_redis_log_fn)(config_log_level level, const char *message);

/* A client on base; nothing connects before gw_redis_configure. */
gw_redis *gw_redis_create(struct event_base *base, gw_redis_log_fn log);

/* Apply redis: (url redis://[user][:password@]host[:port][/db], password,
 * timeout, connections_per_worker). Reconnects when the address, database or
 * password changed; a config without redis: (enabled false) disconnects.
 * Pending commands of dropped connections are answered as failed. */
void gw_redis_configure(gw_redis *r, const config_redis *cfg);

/* Disconnect; pending commands are answered as failed first (cancelled ones
 * are not answered). NULL is fine. */
void gw_redis_free(gw_redis *r);

/* At least one connection is up and usable now. */
bool gw_redis_up(const gw_redis *r);

/* The command's answer. reply NULL: no answer (timeout, connection lost, not
 * sent); an error reply (REDIS_REPLY_ERROR) is passed as it is. reply is
 * hiredis's and valid only during the call. Called exactly once per command
 * that was not cancelled, never from inside gw_redis_command. */
typedef void (*gw_redis_done_fn)(void *arg, const redisReply *reply);

/* Send one command (argv/argvlen as redisAsyncCommandArgv: binary safe).
 * NULL when no connection is up or out of memory: done will not be called and
 * the caller decides without Redis at once. */
gw_redis_call *gw_redis_command(gw_redis *r, gw_redis_done_fn done, void *arg, int argc, const char **argv,
                                const size_t *argvlen);

/* The caller is gone: done will not be called for call. NULL is fine. */
void gw_redis_cancel(gw_redis_call *call);

/* ---- pub/sub ------------------------------------------------------------------- */

/* A message on the subscribed channel (payload binary, len bytes). */
typedef void (*gw_redis_message_fn)(void *arg, const char *payload, size_t len);
/* The subscription is (again) in place after a connect: messages published
 * while it was down were missed. */
typedef void (*gw_redis_subscribed_fn)(void *arg);

/* A client whose one connection subscribes to channel (copied) and delivers
 * its messages; configured with gw_redis_configure like any other (the
 * connection count is ignored); gw_redis_command is not used on it. */
gw_redis *gw_redis_create_subscriber(struct event_base *base, gw_redis_log_fn log, const char *channel,
                                     gw_redis_message_fn on_message, gw_redis_subscribed_fn on_subscribed,
                                     void *arg);

#endif

/*
 * fake_redis.h - a fake Redis server for the unit tests of the Redis clients
 * (test_redis_client.c: redis/redis.c; test_ratelimit_redis.c:
 * ratelimit/rlredis.c).
 *
 * It listens on a free 127.0.0.1 port and runs on the test's own event_base,
 * in the test's thread: the test turns the loop (fake_redis_run_for,
 * FAKE_REDIS_RUN_UNTIL) and the client under test and the fake take their
 * turns in it, so there is no thread to join and no sleep to guess. It reads
 * RESP commands (arrays of bulk strings, what hiredis sends) and answers:
 *
 *   PING               +PONG (held while hold_pings)
 *   ECHO arg           arg as a bulk string: binary safe, any length
 *   AUTH ...           auth_reply (default +OK)
 *   SUBSCRIBE channel  the subscribe confirmation; from then on the
 *                      connection gets fake_redis_publish's messages
 *   EVALSHA/EVAL ...   what the test's script function writes (see "Script
 *                      calls"); without a script function, +OK
 *   STALL              (the fake's own) the connection answers nothing more,
 *                      as a Redis under CLIENT PAUSE or DEBUG SLEEP
 *   CLOSE              (the fake's own) the fake closes the connection
 *   ERR                (the fake's own) -ERR asked for
 *   anything else      +OK (SELECT, ...)
 *
 * Every command is logged as "<conn id>: ARG ARG ..." (the arguments as
 * text, the line cut at FAKE_REDIS_LOG_LINE bytes, the first
 * FAKE_REDIS_MAX_LOG commands kept) for fake_redis_saw/_count/_index.
 * Connections are numbered from 0 in accept order and never reuse a number.
 *
 * Answers go out in their commands' order on each connection, except a
 * delayed script answer (script_delay_ms), which others may overtake. Once
 * one answer of a connection is held, the ones after it wait behind it until
 * fake_redis_release.
 *
 * A stalled connection still reads, counts and logs its commands. Failures
 * inside the fake (more than FAKE_REDIS_MAX_CONNS connections, no memory)
 * fail the running cmocka test, as the script function's own asserts do.
 */
#ifndef GATEWAY_TESTS_FAKE_REDIS_H
#define GATEWAY_TESTS_FAKE_REDIS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct bufferevent;
struct evbuffer;
struct event_base;
struct evconnlistener;

#define FAKE_REDIS_MAX_CONNS 64  /* connections accepted over a fake's life */
#define FAKE_REDIS_MAX_ARGS 1024 /* arguments of one command a handler sees */
#define FAKE_REDIS_MAX_LOG 512   /* commands logged */
#define FAKE_REDIS_LOG_LINE 128  /* bytes of one logged command, with its NUL */

typedef struct fake_redis fake_redis;

/* One accepted connection. The test may read every field and set stalled. */
typedef struct fake_redis_conn {
    fake_redis *f;
    struct bufferevent *bev;
    int id;                /* accept order, from 0 */
    int commands;          /* commands read, answered or not */
    bool stalled;          /* answers nothing more (STALL, stall_new, or the test) */
    bool subscribed;       /* saw SUBSCRIBE */
    int peer_port;         /* the client's end of the connection */
    struct evbuffer *held; /* answers waiting for fake_redis_release */
} fake_redis_conn;

/*
 * Script calls, when the fake has a script function: EVALSHA or EVAL with
 * fewer than 3 arguments gets -ERR; a longer one's fate is decided in this
 * order:
 *   1. EVALSHA while noscript_left > 0: -NOSCRIPT (noscript_left counts
 *      down); the function is not called.
 *   2. Otherwise the function runs (so a model it keeps moves on even when
 *      the answer is then dropped) and appends the whole RESP answer to
 *      reply; argv and lens are the command's (argv[0] "EVALSHA" or "EVAL",
 *      argv[1] the sha or script, argv[2] numkeys, ...), borrowed until it
 *      returns.
 *   3. The answer is dropped when stall_scripts, or when stall_eval and the
 *      call is an EVAL.
 * A script answer (NOSCRIPT included) is held while hold_scripts, else sent
 * script_delay_ms after its command came, else at once.
 */
typedef void (*fake_redis_script_fn)(void *arg, const fake_redis_conn *fc, bool eval, int argc,
                                     const char *const *argv, const size_t *lens, struct evbuffer *reply);

struct fake_redis {
    /* Read-only for the test. */
    struct event_base *base;
    struct evconnlistener *listener; /* the test may disable/enable it */
    int port;
    int accepted;                                 /* connections so far */
    fake_redis_conn *conns[FAKE_REDIS_MAX_CONNS]; /* by id; NULL once closed */
    char log[FAKE_REDIS_MAX_LOG][FAKE_REDIS_LOG_LINE];
    int nlog;

    /* Knobs: the test sets them at any time; all off after fake_redis_start. */
    const char *auth_reply;      /* RESP answer to AUTH (borrowed); NULL: +OK */
    bool stall_new;              /* new connections are stalled: TCP accepted, nothing answered */
    bool hold_pings;             /* PING answers wait for fake_redis_release */
    bool hold_scripts;           /* script answers wait for fake_redis_release */
    bool stall_scripts;          /* script answers are dropped */
    bool stall_eval;             /* EVAL answers are dropped */
    int noscript_left;           /* answer this many EVALSHA with NOSCRIPT */
    int script_delay_ms;         /* send each script answer this long after its command came */
    fake_redis_script_fn script; /* NULL: EVALSHA/EVAL answered +OK */
    void *script_arg;

    struct fake_redis_delayed *delayed; /* script answers waiting out script_delay_ms */
};

/* A fake listening on 127.0.0.1, on a free port, in base's loop. Free it with
 * fake_redis_stop before base. */
fake_redis *fake_redis_start(struct event_base *base);

/* Closes every connection and the listener, drops answers not sent, frees f. */
void fake_redis_stop(fake_redis *f);

/* Closes fc from the server side (Redis restarts); fc is freed. */
void fake_redis_conn_close(fake_redis_conn *fc);

/* Sends every connection's held answers. The hold_* knobs are left as they
 * are: what comes after is held again while they are set. */
void fake_redis_release(fake_redis *f);

/* Sends a pub/sub message to every subscribed connection, whatever channel
 * it subscribed to; payload is binary and copied. */
void fake_redis_publish(fake_redis *f, const char *channel, const void *payload, size_t len);

/* Connections open now. */
int fake_redis_open(const fake_redis *f);

/* Whether, how often and first where (-1: never) the log holds line, e.g.
 * "0: AUTH user pw". */
bool fake_redis_saw(const fake_redis *f, const char *line);
int fake_redis_count(const fake_redis *f, const char *line);
int fake_redis_index(const fake_redis *f, const char *line);

/* The client's socket of fc when the client is in this process (its local
 * port is fc's peer port, its peer the fake): for checking socket options.
 * -1 if none. */
int fake_redis_client_fd(const fake_redis *f, const fake_redis_conn *fc);

/* ---- driving the loop ---------------------------------------------------------------- */

/* CLOCK_MONOTONIC in ms. */
uint64_t fake_redis_ms_now(void);

/* Runs base's loop for ms milliseconds. */
void fake_redis_run_for(struct event_base *base, int ms);

/* Runs base's loop in steps of poll_ms until cond holds, for at most ms
 * milliseconds; fails the test if cond does not hold by then. */
#define FAKE_REDIS_RUN_UNTIL(base, cond, ms, poll_ms)                                                        \
    do {                                                                                                     \
        uint64_t end_ = fake_redis_ms_now() + (ms);                                                          \
        while (!(cond) && fake_redis_ms_now() < end_)                                                        \
            fake_redis_run_for((base), (poll_ms));                                                           \
        assert_true(cond);                                                                                   \
    } while (0)

#endif

/*
 * test_redis_client.c - redis/redis.c against a fake Redis on the same event
 * loop (fake_redis.h): a listener that parses RESP commands and answers as
 * told (PONG, echo, never, close, an error to AUTH, SUBSCRIBE confirmations
 * and pushed messages). Checked: the handshake (AUTH user password, SELECT) comes before
 * the client is up; commands are binary safe and round-robin over the
 * connections; a stalled command is answered as failed at its deadline with
 * the ones queued behind it, the connection is dropped and made again; a
 * cancelled call is never answered; gw_redis_free from inside a done callback
 * answers the rest before it returns; done is never called from inside
 * gw_redis_command; subscriber mode delivers binary messages and subscribes
 * again after a reconnect.
 *
 * Stalls and liveness: a connection is up only once its handshake's PING is
 * answered (not at TCP connect); a Redis that accepts TCP but answers nothing
 * makes the client back off (a handful of connects a second, one warning,
 * commands refused at once instead of each waiting out the timeout); a Redis
 * that answers PING but stalls commands keeps the backoff growing until a
 * command is answered; every connection has TCP keepalive; the subscriber
 * checks its connection every few seconds and makes it again when the check
 * goes unanswered.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <cmocka.h>
#include <event2/event.h>
#include <event2/listener.h>

#include "fake_redis.h"
#include "redis/redis.h"

/* ---- the loop ------------------------------------------------------------------------ */

#define RUN_UNTIL(base, cond, ms) FAKE_REDIS_RUN_UNTIL(base, cond, ms, 2)

static int log_lines;
static int warn_lines; /* CONFIG_LOG_WARN and worse */
static char last_log[512];
static char last_warn[512];
static int answering_again; /* "answering again" lines (the backoff reset after a stall) */

static void test_log(config_log_level level, const char *message)
{
    log_lines++;
    snprintf(last_log, sizeof last_log, "%s", message);
    if (level <= CONFIG_LOG_WARN) {
        warn_lines++;
        snprintf(last_warn, sizeof last_warn, "%s", message);
    }
    if (strstr(message, "answering again"))
        answering_again++;
}

typedef struct env {
    struct event_base *base;
    fake_redis *f;
    gw_redis *r;
    char url[128];
    config_redis cfg;
} env;

static void env_start(env *e, const char *userinfo, const char *db, int timeout_ms, int conns)
{
    memset(e, 0, sizeof *e);
    e->base = event_base_new();
    assert_non_null(e->base);
    e->f = fake_redis_start(e->base);
    snprintf(e->url, sizeof e->url, "redis://%s127.0.0.1:%d%s", userinfo, e->f->port, db);
    e->cfg = (config_redis){.enabled = true,
                            .url = e->url,
                            .password = "",
                            .timeout_ms = timeout_ms,
                            .connections_per_worker = conns};
}

static void env_stop(env *e)
{
    gw_redis_free(e->r);
    fake_redis_stop(e->f);
    event_base_free(e->base);
}

/* ---- a done callback that records --------------------------------------------------- */

#define MAX_ANSWERS 64

typedef struct answers {
    int n;
    int order[MAX_ANSWERS]; /* which call, in answer order */
    int type[MAX_ANSWERS];  /* reply type, -1 for NULL */
    char str[MAX_ANSWERS][32];
    size_t len[MAX_ANSWERS];
    bool in_command; /* set around gw_redis_command */
    bool called_inside;
    gw_redis *free_on_first; /* gw_redis_free from inside the first done */
    int n_after_free;        /* answers when that gw_redis_free returned */
    gw_redis *watch;         /* gw_redis_up(watch) is recorded in up[] */
    bool up[MAX_ANSWERS];
} answers;

typedef struct probe {
    answers *a;
    int id;
} probe;

static void record_done(void *arg, const redisReply *reply)
{
    probe *p = arg;
    answers *a = p->a;
    if (a->in_command)
        a->called_inside = true;
    assert_true(a->n < MAX_ANSWERS);
    a->order[a->n] = p->id;
    a->type[a->n] = reply ? reply->type : -1;
    a->up[a->n] = a->watch && gw_redis_up(a->watch);
    if (reply && reply->str) {
        a->len[a->n] = reply->len;
        memcpy(a->str[a->n], reply->str, reply->len < 32 ? reply->len : 32);
    }
    a->n++;
    if (a->free_on_first) {
        gw_redis *r = a->free_on_first;
        a->free_on_first = NULL;
        gw_redis_free(r);
        a->n_after_free = a->n;
    }
}

static gw_redis_call *cmd(gw_redis *r, answers *a, probe *p, const char *c0, const char *c1, size_t l1)
{
    const char *argv[2] = {c0, c1};
    size_t lens[2] = {strlen(c0), l1};
    a->in_command = true;
    gw_redis_call *call = gw_redis_command(r, record_done, p, c1 ? 2 : 1, argv, lens);
    a->in_command = false;
    return call;
}

/* ---- tests ------------------------------------------------------------------------------ */

static void test_not_configured_no_command(void **state)
{
    struct event_base *base = event_base_new();
    gw_redis *r = gw_redis_create(base, test_log);
    answers a = {0};
    probe p = {&a, 0};
    assert_false(gw_redis_up(r));
    assert_null(cmd(r, &a, &p, "PING", NULL, 0));
    assert_int_equal(a.n, 0);
    gw_redis_free(r);
    gw_redis_free(NULL);
    gw_redis_cancel(NULL);
    event_base_free(base);
}

static void test_handshake_and_binary_round_trip(void **state)
{
    env e;
    env_start(&e, "alice:s3cret@", "/3", 500, 1);
    e.r = gw_redis_create(e.base, test_log);
    gw_redis_configure(e.r, &e.cfg);
    assert_false(gw_redis_up(e.r)); /* nothing before the loop runs */
    RUN_UNTIL(e.base, gw_redis_up(e.r), 2000);
    assert_true(fake_redis_saw(e.f, "0: AUTH alice s3cret"));
    assert_true(fake_redis_saw(e.f, "0: SELECT 3"));

    answers a = {0};
    probe p1 = {&a, 1}, p2 = {&a, 2};
    assert_non_null(cmd(e.r, &a, &p1, "PING", NULL, 0));
    static const char bin[] = {'a', 0, 'b', '\r', '\n', 'c'};
    assert_non_null(cmd(e.r, &a, &p2, "ECHO", bin, sizeof bin));
    assert_int_equal(a.n, 0);
    RUN_UNTIL(e.base, a.n == 2, 2000);
    assert_false(a.called_inside);
    assert_int_equal(a.order[0], 1);
    assert_int_equal(a.type[0], REDIS_REPLY_STATUS);
    assert_string_equal(a.str[0], "PONG");
    assert_int_equal(a.order[1], 2);
    assert_int_equal(a.type[1], REDIS_REPLY_STRING);
    assert_int_equal(a.len[1], sizeof bin);
    assert_memory_equal(a.str[1], bin, sizeof bin);

    /* argvlen NULL (C strings), and a command too big for the stack buffer. */
    probe p3 = {&a, 3}, p4 = {&a, 4};
    const char *plain[] = {"ECHO", "plain"};
    a.in_command = true;
    assert_non_null(gw_redis_command(e.r, record_done, &p3, 2, plain, NULL));
    a.in_command = false;
    static char big[5000];
    memset(big, 'x', sizeof big);
    big[sizeof big - 1] = 'y';
    assert_non_null(cmd(e.r, &a, &p4, "ECHO", big, sizeof big));
    RUN_UNTIL(e.base, a.n == 4, 2000);
    assert_int_equal(a.len[2], 5);
    assert_memory_equal(a.str[2], "plain", 5);
    assert_int_equal(a.type[3], REDIS_REPLY_STRING);
    assert_int_equal(a.len[3], sizeof big);
    env_stop(&e);
}

static void test_password_key_wins_and_auth_error_keeps_it_down(void **state)
{
    env e;
    env_start(&e, ":fromurl@", "", 500, 1);
    e.cfg.password = "fromkey";
    e.f->auth_reply = "-WRONGPASS invalid username-password pair\r\n";
    e.r = gw_redis_create(e.base, test_log);
    gw_redis_configure(e.r, &e.cfg);
    RUN_UNTIL(e.base, e.f->accepted >= 2, 2000); /* refused, then tried again */
    assert_true(fake_redis_saw(e.f, "0: AUTH fromkey"));
    assert_false(gw_redis_up(e.r));
    assert_non_null(strstr(last_log, "WRONGPASS"));
    /* Backoff: 50, 100, 200, 400 ms... so about 5 tries in 1 s, not hundreds. */
    fake_redis_run_for(e.base, 1000);
    assert_true(e.f->accepted <= 7);
    env_stop(&e);
}

static void test_round_robin_over_connections(void **state)
{
    env e;
    env_start(&e, "", "", 500, 3);
    e.r = gw_redis_create(e.base, test_log);
    gw_redis_configure(e.r, &e.cfg);
    RUN_UNTIL(e.base, fake_redis_open(e.f) == 3, 2000);
    fake_redis_run_for(e.base, 20);
    answers a = {0};
    probe p[9];
    for (int i = 0; i < 9; i++) {
        p[i] = (probe){&a, i};
        assert_non_null(cmd(e.r, &a, &p[i], "PING", NULL, 0));
    }
    RUN_UNTIL(e.base, a.n == 9, 2000);
    for (int i = 0; i < 3; i++)
        assert_int_equal(e.f->conns[i]->commands, 1 + 3); /* the handshake's PING, then ours */
    env_stop(&e);
}

static void test_stall_answers_queue_and_reconnects(void **state)
{
    env e;
    env_start(&e, "", "", 60, 1);
    e.r = gw_redis_create(e.base, test_log);
    gw_redis_configure(e.r, &e.cfg);
    RUN_UNTIL(e.base, gw_redis_up(e.r), 2000);
    answers a = {0};
    probe p0 = {&a, 0}, p1 = {&a, 1}, p2 = {&a, 2}, p3 = {&a, 3};
    assert_non_null(cmd(e.r, &a, &p0, "PING", NULL, 0));
    RUN_UNTIL(e.base, a.n == 1, 2000);
    uint64_t t0 = fake_redis_ms_now();
    assert_non_null(cmd(e.r, &a, &p1, "STALL", NULL, 0));
    assert_non_null(cmd(e.r, &a, &p2, "PING", NULL, 0));
    gw_redis_call *c3 = cmd(e.r, &a, &p3, "PING", NULL, 0);
    assert_non_null(c3);
    gw_redis_cancel(c3);
    RUN_UNTIL(e.base, a.n == 3, 2000);
    uint64_t took = fake_redis_ms_now() - t0;
    assert_true(took >= 55 && took < 500);
    assert_int_equal(a.order[1], 1);
    assert_int_equal(a.type[1], -1);
    assert_int_equal(a.order[2], 2);
    assert_int_equal(a.type[2], -1);
    assert_false(gw_redis_up(e.r));
    RUN_UNTIL(e.base, e.f->accepted == 2 && gw_redis_up(e.r), 2000); /* made again */
    fake_redis_run_for(e.base, 100);
    assert_int_equal(a.n, 3); /* the cancelled one never */
    env_stop(&e);
}

static void test_lost_connection_answers_pending(void **state)
{
    env e;
    env_start(&e, "", "", 1000, 1);
    e.r = gw_redis_create(e.base, test_log);
    gw_redis_configure(e.r, &e.cfg);
    RUN_UNTIL(e.base, gw_redis_up(e.r), 2000);
    answers a = {.watch = e.r};
    probe p0 = {&a, 0}, p1 = {&a, 1};
    assert_non_null(cmd(e.r, &a, &p0, "CLOSE", NULL, 0));
    assert_non_null(cmd(e.r, &a, &p1, "PING", NULL, 0));
    RUN_UNTIL(e.base, a.n == 2, 500); /* well before the 1 s deadline */
    assert_int_equal(a.type[0], -1);
    assert_int_equal(a.type[1], -1);
    assert_false(a.up[0]); /* known down before the first failed answer */
    assert_non_null(strstr(last_log, "connection lost"));
    RUN_UNTIL(e.base, gw_redis_up(e.r), 2000);
    env_stop(&e);
}

static void test_free_inside_done(void **state)
{
    env e;
    env_start(&e, "", "", 1000, 2);
    e.r = gw_redis_create(e.base, test_log);
    gw_redis_configure(e.r, &e.cfg);
    RUN_UNTIL(e.base, fake_redis_open(e.f) == 2, 2000);
    fake_redis_run_for(e.base, 20);
    assert_true(gw_redis_up(e.r));
    answers a = {0};
    probe p[4];
    for (int i = 0; i < 4; i++) {
        p[i] = (probe){&a, i};
        assert_non_null(cmd(e.r, &a, &p[i], i == 0 ? "PING" : "STALL", NULL, 0));
    }
    a.free_on_first = e.r;
    e.r = NULL;
    RUN_UNTIL(e.base, a.n >= 1, 2000);
    assert_int_equal(a.n_after_free, 4); /* all answered by the time free returned */
    assert_int_equal(a.n, 4);
    assert_int_equal(a.order[0], 0);
    for (int i = 1; i < 4; i++)
        assert_int_equal(a.type[i], -1);
    fake_redis_run_for(e.base, 50);
    assert_int_equal(fake_redis_open(e.f), 0);
    env_stop(&e);
}

static void test_free_with_pending_and_cancelled(void **state)
{
    env e;
    env_start(&e, "", "", 1000, 1);
    e.r = gw_redis_create(e.base, test_log);
    gw_redis_configure(e.r, &e.cfg);
    RUN_UNTIL(e.base, gw_redis_up(e.r), 2000);
    answers a = {0};
    probe p0 = {&a, 0}, p1 = {&a, 1};
    gw_redis_call *c0 = cmd(e.r, &a, &p0, "PING", NULL, 0);
    assert_non_null(cmd(e.r, &a, &p1, "PING", NULL, 0));
    gw_redis_cancel(c0);
    int lines = log_lines;
    gw_redis_free(e.r);
    e.r = NULL;
    assert_int_equal(a.n, 1);
    assert_int_equal(a.order[0], 1);
    assert_int_equal(a.type[0], -1);
    assert_int_equal(log_lines, lines); /* a shutdown is not a lost connection */
    env_stop(&e);
}

static void test_reconfigure_moves_and_disable_disconnects(void **state)
{
    env e;
    env_start(&e, "", "", 500, 1);
    fake_redis *g = fake_redis_start(e.base);
    e.r = gw_redis_create(e.base, test_log);
    gw_redis_configure(e.r, &e.cfg);
    RUN_UNTIL(e.base, gw_redis_up(e.r), 2000);
    gw_redis_configure(e.r, &e.cfg); /* same: nothing moves */
    assert_true(gw_redis_up(e.r));
    char url[128];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d/0", g->port);
    config_redis moved = e.cfg;
    moved.url = url;
    gw_redis_configure(e.r, &moved);
    assert_false(gw_redis_up(e.r));
    RUN_UNTIL(e.base, gw_redis_up(e.r) && fake_redis_open(g) == 1 && fake_redis_open(e.f) == 0, 2000);
    config_redis off = {0};
    gw_redis_configure(e.r, &off);
    assert_false(gw_redis_up(e.r));
    RUN_UNTIL(e.base, fake_redis_open(g) == 0, 2000);
    fake_redis_run_for(e.base, 200);
    assert_int_equal(g->accepted, 1); /* no reconnect when disabled */
    fake_redis_stop(g);
    env_stop(&e);
}

static void test_connect_deadline(void **state)
{
    /* A listener that never accepts: the kernel completes the TCP handshake
     * (backlog) but nothing answers AUTH; the connect deadline drops it. */
    env e;
    env_start(&e, ":pw@", "", 80, 1);
    evconnlistener_disable(e.f->listener);
    e.r = gw_redis_create(e.base, test_log);
    gw_redis_configure(e.r, &e.cfg);
    fake_redis_run_for(e.base, 400);
    assert_false(gw_redis_up(e.r));
    evconnlistener_enable(e.f->listener);
    RUN_UNTIL(e.base, gw_redis_up(e.r), 3000);
    env_stop(&e);
}

/* ---- stalls ----------------------------------------------------------------------------- */

static void test_up_only_after_ping_reply(void **state)
{
    /* TCP up and AUTH/SELECT answered, PING held: not up, commands refused. */
    env e;
    env_start(&e, "bob:pw@", "/1", 500, 1);
    e.f->hold_pings = true;
    e.r = gw_redis_create(e.base, test_log);
    gw_redis_configure(e.r, &e.cfg);
    RUN_UNTIL(e.base, fake_redis_saw(e.f, "0: PING"), 2000);
    fake_redis_run_for(e.base, 100);
    assert_false(gw_redis_up(e.r));
    answers a = {0};
    probe p = {&a, 0};
    assert_null(cmd(e.r, &a, &p, "PING", NULL, 0));
    int auth = fake_redis_index(e.f, "0: AUTH bob pw"), sel = fake_redis_index(e.f, "0: SELECT 1");
    int ping = fake_redis_index(e.f, "0: PING");
    assert_true(auth >= 0 && auth < sel && sel < ping); /* PING ends the handshake */

    /* Every connection has TCP keepalive (hiredis's 15 s). */
    int fd = fake_redis_client_fd(e.f, e.f->conns[0]);
    assert_true(fd >= 0);
    int on = 0, idle = 0;
    socklen_t len = sizeof on;
    assert_int_equal(getsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, &len), 0);
    assert_int_equal(on, 1);
    len = sizeof idle;
    assert_int_equal(getsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, &len), 0);
    assert_int_equal(idle, REDIS_KEEPALIVE_INTERVAL);

    e.f->hold_pings = false; /* PONG within the connect deadline: up */
    fake_redis_release(e.f);
    RUN_UNTIL(e.base, gw_redis_up(e.r), 2000);
    assert_int_equal(e.f->accepted, 1);
    assert_non_null(cmd(e.r, &a, &p, "PING", NULL, 0));
    RUN_UNTIL(e.base, a.n == 1, 2000);
    assert_int_equal(a.type[0], REDIS_REPLY_STATUS);
    env_stop(&e);
}

static void test_ping_past_connect_deadline_is_a_failed_connect(void **state)
{
    env e;
    env_start(&e, "", "", 60, 1);
    e.f->hold_pings = true;
    e.r = gw_redis_create(e.base, test_log);
    gw_redis_configure(e.r, &e.cfg);
    RUN_UNTIL(e.base, e.f->accepted >= 2, 2000); /* dropped at the deadline, made again */
    assert_false(gw_redis_up(e.r));
    RUN_UNTIL(e.base, fake_redis_open(e.f) <= 1, 2000);
    e.f->hold_pings = false;
    fake_redis_release(e.f);
    RUN_UNTIL(e.base, gw_redis_up(e.r), 3000);
    env_stop(&e);
}

static void test_stalled_redis_backs_off(void **state)
{
    /* Redis stalls (CLIENT PAUSE, DEBUG SLEEP): TCP still connects, nothing
     * is answered. A command every 5 ms for 1 s: the first ones wait out the
     * 50 ms timeout, then the connection is remade with a growing backoff and
     * is never up, so every later command is refused at once. */
    env e;
    env_start(&e, "", "", 50, 1);
    e.r = gw_redis_create(e.base, test_log);
    gw_redis_configure(e.r, &e.cfg);
    RUN_UNTIL(e.base, gw_redis_up(e.r), 2000);
    e.f->stall_new = true;
    e.f->conns[0]->stalled = true;
    int accepted0 = e.f->accepted, warns0 = warn_lines;

    answers a = {0};
    static probe p[MAX_ANSWERS];
    int sent = 0, refused = 0, sent_after_failure = 0;
    uint64_t end = fake_redis_ms_now() + 1000;
    while (fake_redis_ms_now() < end) {
        if (sent < MAX_ANSWERS) {
            p[sent] = (probe){&a, sent};
            if (cmd(e.r, &a, &p[sent], "PING", NULL, 0)) {
                sent_after_failure += a.n > 0;
                sent++;
            } else {
                refused++;
            }
        }
        fake_redis_run_for(e.base, 5);
    }
    int connects = e.f->accepted - accepted0;
    /* 50 + 100 + 200 + 400 ms of backoff, 50 ms of connect deadline each. */
    assert_true(connects >= 2 && connects <= 6);
    assert_int_equal(sent_after_failure, 0);
    assert_true(sent >= 1 && sent <= 20);
    assert_true(refused >= 5 * sent);
    assert_int_equal(a.n, sent);
    for (int i = 0; i < a.n; i++)
        assert_int_equal(a.type[i], -1);
    assert_int_equal(warn_lines - warns0, 1); /* one warning for the stall, not one per retry */
    assert_non_null(strstr(last_warn, "no answer within 50 ms"));

    /* Redis is back: connected within the capped backoff, answering. */
    e.f->stall_new = false;
    RUN_UNTIL(e.base, gw_redis_up(e.r), 3000);
    probe q = {&a, 99};
    assert_non_null(cmd(e.r, &a, &q, "PING", NULL, 0));
    RUN_UNTIL(e.base, a.n == sent + 1, 2000);
    assert_int_equal(a.type[a.n - 1], REDIS_REPLY_STATUS);
    env_stop(&e);
}

/* Run until fake f accepts its n-th connection; the time it took in ms. */
static uint64_t ms_until_accepted(env *e, int n)
{
    uint64_t t0 = fake_redis_ms_now();
    RUN_UNTIL(e->base, e->f->accepted >= n && gw_redis_up(e->r), 3000);
    return fake_redis_ms_now() - t0;
}

static void test_commands_stalled_ping_answered_keeps_backing_off(void **state)
{
    /* PING is answered but commands stall (CLIENT PAUSE WRITE): the handshake
     * alone does not reset the backoff, a command's answer does. */
    env e;
    env_start(&e, "", "", 50, 1);
    e.r = gw_redis_create(e.base, test_log);
    gw_redis_configure(e.r, &e.cfg);
    RUN_UNTIL(e.base, gw_redis_up(e.r), 2000);
    int warns0 = warn_lines, again0 = answering_again;
    answers a = {0};
    probe p[8];
    for (int i = 0; i < 8; i++)
        p[i] = (probe){&a, i};

    assert_non_null(cmd(e.r, &a, &p[0], "STALL", NULL, 0));
    RUN_UNTIL(e.base, a.n == 1, 2000);
    assert_false(gw_redis_up(e.r));
    ms_until_accepted(&e, 2); /* 50 ms */
    assert_non_null(cmd(e.r, &a, &p[1], "STALL", NULL, 0));
    RUN_UNTIL(e.base, a.n == 2, 2000);
    assert_true(ms_until_accepted(&e, 3) >= 95); /* 100 ms: kept growing */
    assert_non_null(cmd(e.r, &a, &p[2], "STALL", NULL, 0));
    RUN_UNTIL(e.base, a.n == 3, 2000);
    assert_true(ms_until_accepted(&e, 4) >= 195); /* 200 ms */
    assert_int_equal(warn_lines - warns0, 1);     /* one warning for the whole stall */

    /* A command answered at once on the new connection does not count yet
     * (reads answered, writes stalled: CLIENT PAUSE WRITE)... */
    assert_int_equal(answering_again, again0);
    assert_non_null(cmd(e.r, &a, &p[3], "PING", NULL, 0));
    RUN_UNTIL(e.base, a.n == 4, 2000);
    assert_int_equal(a.type[3], REDIS_REPLY_STATUS);
    assert_int_equal(answering_again, again0);
    /* ... one answered after a whole timeout (50 ms) without a stall does:
     * healthy again, and the next stall warns again. */
    uint64_t t = fake_redis_ms_now();
    RUN_UNTIL(e.base, fake_redis_ms_now() - t >= 70, 1000);
    assert_non_null(cmd(e.r, &a, &p[4], "PING", NULL, 0));
    RUN_UNTIL(e.base, a.n == 5, 2000);
    assert_int_equal(answering_again, again0 + 1);
    assert_non_null(cmd(e.r, &a, &p[5], "STALL", NULL, 0));
    RUN_UNTIL(e.base, a.n == 6, 2000);
    assert_int_equal(warn_lines - warns0, 2);
    ms_until_accepted(&e, 5);
    env_stop(&e);
}

/* ---- subscriber ------------------------------------------------------------------------ */

typedef struct sub_state {
    int subscribed;
    int messages;
    char last[32];
    size_t last_len;
    gw_redis *free_me;
} sub_state;

static void on_message(void *arg, const char *payload, size_t len)
{
    sub_state *s = arg;
    s->messages++;
    s->last_len = len;
    memcpy(s->last, payload, len < sizeof s->last ? len : sizeof s->last);
    if (s->free_me) {
        gw_redis *r = s->free_me;
        s->free_me = NULL;
        gw_redis_free(r);
    }
}

static void on_subscribed(void *arg)
{
    sub_state *s = arg;
    s->subscribed++;
}

static void test_subscriber(void **state)
{
    env e;
    env_start(&e, ":pw@", "/2", 500, 4);
    sub_state s = {0};
    e.r = gw_redis_create_subscriber(e.base, test_log, "gw:inv", on_message, on_subscribed, &s);
    gw_redis_configure(e.r, &e.cfg);
    RUN_UNTIL(e.base, s.subscribed == 1, 2000);
    assert_true(gw_redis_up(e.r));
    assert_int_equal(e.f->accepted, 1); /* one connection whatever the count */
    assert_true(fake_redis_saw(e.f, "0: AUTH pw"));
    assert_true(fake_redis_saw(e.f, "0: SELECT 2"));
    assert_true(fake_redis_saw(e.f, "0: SUBSCRIBE gw:inv"));
    answers a = {0};
    probe p = {&a, 0};
    assert_null(cmd(e.r, &a, &p, "PING", NULL, 0));

    static const char bin[] = {'k', 0, '1'};
    fake_redis_publish(e.f, "gw:inv", bin, sizeof bin);
    RUN_UNTIL(e.base, s.messages == 1, 2000);
    assert_int_equal(s.last_len, sizeof bin);
    assert_memory_equal(s.last, bin, sizeof bin);

    fake_redis_conn_close(e.f->conns[0]); /* Redis restarts */
    RUN_UNTIL(e.base, s.subscribed == 2, 2000);
    fake_redis_publish(e.f, "gw:inv", "x", 1);
    RUN_UNTIL(e.base, s.messages == 2, 2000);

    s.free_me = e.r; /* freed from inside on_message */
    e.r = NULL;
    fake_redis_publish(e.f, "gw:inv", "y", 1);
    fake_redis_publish(e.f, "gw:inv", "z", 1); /* in the same read: must not reach us */
    RUN_UNTIL(e.base, s.messages == 3, 2000);
    fake_redis_run_for(e.base, 50);
    assert_int_equal(s.messages, 3);
    env_stop(&e);
}

static void test_subscriber_checks_its_connection(void **state)
{
    /* redis.timeout 100 ms: the check's deadline is 1 s (its minimum). */
    env e;
    env_start(&e, ":pw@", "/2", 100, 1);
    sub_state s = {0};
    e.r = gw_redis_create_subscriber(e.base, test_log, "gw:inv", on_message, on_subscribed, &s);
    gw_redis_configure(e.r, &e.cfg);
    RUN_UNTIL(e.base, s.subscribed == 1, 2000);
    assert_true(fake_redis_index(e.f, "0: AUTH pw") < fake_redis_index(e.f, "0: SELECT 2"));
    assert_true(fake_redis_index(e.f, "0: SELECT 2") < fake_redis_index(e.f, "0: SUBSCRIBE gw:inv"));
    assert_false(fake_redis_saw(e.f, "0: PING")); /* the subscriber's handshake ends with SUBSCRIBE */

    /* Checked every few seconds; the answer is neither a message nor a new
     * subscription. */
    uint64_t t0 = fake_redis_ms_now();
    RUN_UNTIL(e.base, fake_redis_count(e.f, "0: SUBSCRIBE gw:inv") == 2, 4000);
    assert_true(fake_redis_ms_now() - t0 >= 1500);
    fake_redis_run_for(e.base, 50);
    assert_int_equal(s.subscribed, 1);
    assert_int_equal(s.messages, 0);
    assert_true(gw_redis_up(e.r));
    fake_redis_publish(e.f, "gw:inv", "a", 1);
    RUN_UNTIL(e.base, s.messages == 1, 2000);

    /* The connection goes silent (no RST): the next check is not answered,
     * the connection is made again and subscribes again. */
    int warns0 = warn_lines;
    e.f->conns[0]->stalled = true;
    t0 = fake_redis_ms_now();
    RUN_UNTIL(e.base, s.subscribed == 2, 6000);
    uint64_t took = fake_redis_ms_now() - t0;
    assert_true(took >= 1000 && took < 4500);
    assert_int_equal(fake_redis_count(e.f, "0: SUBSCRIBE gw:inv"), 3); /* the unanswered check */
    assert_int_equal(e.f->accepted, 2);
    assert_true(fake_redis_saw(e.f, "1: AUTH pw"));
    assert_true(fake_redis_saw(e.f, "1: SUBSCRIBE gw:inv"));
    assert_int_equal(warn_lines - warns0, 1);
    assert_non_null(strstr(last_warn, "no answer within 1000 ms"));
    assert_true(gw_redis_up(e.r));
    fake_redis_publish(e.f, "gw:inv", "b", 1);
    RUN_UNTIL(e.base, s.messages == 2, 2000);
    assert_memory_equal(s.last, "b", 1);
    env_stop(&e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_not_configured_no_command),
        cmocka_unit_test(test_handshake_and_binary_round_trip),
        cmocka_unit_test(test_password_key_wins_and_auth_error_keeps_it_down),
        cmocka_unit_test(test_round_robin_over_connections),
        cmocka_unit_test(test_stall_answers_queue_and_reconnects),
        cmocka_unit_test(test_lost_connection_answers_pending),
        cmocka_unit_test(test_free_inside_done),
        cmocka_unit_test(test_free_with_pending_and_cancelled),
        cmocka_unit_test(test_reconfigure_moves_and_disable_disconnects),
        cmocka_unit_test(test_connect_deadline),
        cmocka_unit_test(test_up_only_after_ping_reply),
        cmocka_unit_test(test_ping_past_connect_deadline_is_a_failed_connect),
        cmocka_unit_test(test_stalled_redis_backs_off),
        cmocka_unit_test(test_commands_stalled_ping_answered_keeps_backing_off),
        cmocka_unit_test(test_subscriber),
        cmocka_unit_test(test_subscriber_checks_its_connection),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * redis.c - the asynchronous Redis client of redis.h: hiredis async with its
 * libevent adapter, on the event_base of the thread that made the client.
 *
 * Two lifetimes. A slot (one of redis.connections_per_worker) lives as long as
 * the client and owns the reconnect backoff. A conn lives as long as one
 * hiredis context. hiredis runs the callbacks of a context it frees after we
 * have let go of it (inside a reply callback REDIS_IN_CALLBACK defers the
 * free), so dropping a conn first detaches it (off its slot, its calls
 * answered, its timer freed) and the conn's memory goes only when hiredis is
 * done with the context: in the disconnect callback when it was connected,
 * else right after redisAsyncFree.
 *
 * The one idea for deadlines: replies on a connection come in the order of the
 * commands, so a conn keeps its calls in a FIFO and one timer serves them all.
 * The timer is armed at or before the oldest call's deadline and, when it
 * fires early (that call was answered meanwhile), re-armed at the new oldest
 * one's; a call past its deadline means Redis stalls, and the conn is dropped.
 * A call therefore costs one malloc and no libevent work of ours; its RESP
 * text is built by us on the stack (hiredis's own formatting allocates).
 *
 * Up means answered. TCP connecting proves nothing (a paused or sleeping
 * Redis still completes it from the kernel's backlog), so the handshake
 * always ends with a command whose reply must come within the connect
 * deadline: AUTH and SELECT when needed, then PING (the subscriber: SUBSCRIBE,
 * its confirmation). The backoff is reset only by such a real reply. A
 * connection dropped for a command deadline backs off as a failed connect
 * does, and its slot stays "timed out" until a command (not only the
 * handshake) is answered again: a Redis that answers PING but stalls the
 * commands (CLIENT PAUSE WRITE) is retried at a growing interval, not once
 * per redis.timeout. While a slot waits, commands are refused at once.
 *
 * Liveness. Every socket has TCP keepalive. The subscriber, which sends
 * nothing of its own once subscribed, checks its connection every
 * GW_REDIS_CHECK_INTERVAL_MS by subscribing again to its channel (a no-op for
 * Redis, answered with a "subscribe" confirmation) within the check deadline
 * (redis.timeout, at least GW_REDIS_CHECK_MIN_TIMEOUT_MS); no answer: the
 * connection is dropped and made again, which subscribes again and calls
 * on_subscribed. Not PING: hiredis 0.14 parks a subscribed context's PING
 * callback for a non-array reply and looks the ["pong", ""] array up as a
 * pattern subscription, so the pong reaches no callback (and each PING would
 * leave a callback behind until the context is freed).
 *
 * Code that may run a user callback runs between enter() and leave(): a
 * gw_redis_free from inside a callback drops everything at once but leaves
 * the memory to the outermost leave().
 */
#include "redis/redis.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <hiredis/adapters/libevent.h>
#include <hiredis/async.h>

#define GW_REDIS_DEFAULT_PORT 6379
#define GW_REDIS_DEFAULT_TIMEOUT_MS 1000 /* when the config has none */
#define GW_REDIS_MAX_CONNECTIONS 64      /* as redis.connections_per_worker's bound */
#define GW_REDIS_COMMAND_STACK_BYTES 512 /* commands up to this size are formatted on the stack */
#define GW_REDIS_CHECK_INTERVAL_MS 2000  /* the subscriber's liveness check */
#define GW_REDIS_CHECK_MIN_TIMEOUT_MS 1000

typedef struct slot slot;
typedef struct conn conn;

struct gw_redis_call {
    gw_redis_call *next;   /* the conn's FIFO */
    gw_redis_done_fn done; /* NULL once answered or cancelled */
    void *arg;
    uint64_t deadline_ns; /* CLOCK_MONOTONIC */
};

struct conn {
    gw_redis *r; /* NULL once detached */
    slot *slot;
    redisAsyncContext *ac;
    struct event *timer;        /* the connect deadline, then the calls' */
    gw_redis_call *head, *tail; /* sent, reply not yet in (answered or not) */
    int handshake;              /* AUTH/SELECT/PING replies still due (subscriber: AUTH/SELECT) */
    bool ready;                 /* commands may go out (subscriber: subscribed) */
    uint64_t ready_ns;          /* when it became ready */
    bool checking;              /* subscriber: a liveness check is out */
};

struct slot {
    gw_redis *r;
    conn *conn;
    struct event *retry;
    int backoff_ms;
    int index;
    /* The last conn was dropped for a deadline and no command was answered
     * since: a handshake alone does not reset the backoff. */
    bool timed_out;
};

/* Where to connect and as whom; compared whole on configure. */
typedef struct target {
    char host[256];
    int port;
    int db;
    char user[256];
    char password[512];
} target;

struct gw_redis {
    struct event_base *base;
    gw_redis_log_fn log;
    bool configured; /* target is valid and connections are wanted */
    target target;
    uint64_t timeout_ns;
    slot *slots; /* allocated at the first enabling configure */
    int nslots;
    int rr;    /* next slot to try */
    int ready; /* conns ready */
    int depth; /* enter() nesting */
    bool closing;
    /* subscriber */
    bool subscriber;
    char *channel;
    size_t channel_len;
    gw_redis_message_fn on_message;
    gw_redis_subscribed_fn on_subscribed;
    void *arg;
};

static void connect_slot(slot *s);

static void logf_(const gw_redis *r, config_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void logf_(const gw_redis *r, config_log_level level, const char *fmt, ...)
{
    if (!r->log)
        return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    r->log(level, line);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void timer_arm_ns(struct event *ev, uint64_t ns)
{
    uint64_t us = (ns + 999) / 1000; /* never early: an early fire re-arms */
    struct timeval tv = {(time_t)(us / 1000000), (suseconds_t)(us % 1000000)};
    evtimer_add(ev, &tv);
}

/* ---- lifetime of the client ------------------------------------------------------ */

static void destroy(gw_redis *r)
{
    for (int i = 0; i < r->nslots; i++)
        if (r->slots[i].retry)
            event_free(r->slots[i].retry);
    free(r->slots);
    free(r->channel);
    free(r);
}

static void enter(gw_redis *r)
{
    r->depth++;
}

/* r must not be touched after leave(): it may be gone. */
static void leave(gw_redis *r)
{
    if (--r->depth == 0 && r->closing)
        destroy(r);
}

static void answer(gw_redis_call *call, const redisReply *reply)
{
    gw_redis_done_fn done = call->done;
    if (!done)
        return;
    call->done = NULL;
    done(call->arg, reply);
}

/* ---- connections ------------------------------------------------------------------ */

static void schedule_retry(slot *s)
{
    gw_redis *r = s->r;
    if (!r->configured || r->closing || evtimer_pending(s->retry, NULL))
        return;
    s->backoff_ms = s->backoff_ms ? s->backoff_ms * 2 : GW_REDIS_BACKOFF_MIN_MS;
    if (s->backoff_ms > GW_REDIS_BACKOFF_MAX_MS)
        s->backoff_ms = GW_REDIS_BACKOFF_MAX_MS;
    timer_arm_ns(s->retry, (uint64_t)s->backoff_ms * 1000000ULL);
}

static void retry_cb(evutil_socket_t fd, short what, void *arg)
{
    connect_slot(arg);
}

/* Redis answered a command on s's connection: it is healthy again. */
static void slot_answered(slot *s)
{
    gw_redis *r = s->r;
    if (s->timed_out)
        logf_(r, CONFIG_LOG_INFO, "redis %s:%d: answering again (connection %d of %d)", r->target.host,
              r->target.port, s->index + 1, r->nslots);
    s->backoff_ms = 0;
    s->timed_out = false;
}

/* The handshake's last reply came within the connect deadline. */
static void conn_ready(conn *c)
{
    gw_redis *r = c->r;
    slot *s = c->slot;
    c->ready = true;
    c->ready_ns = now_ns();
    r->ready++;
    evtimer_del(c->timer);
    if (s->timed_out) {
        /* Redis answered the handshake but stalled a command before: the
         * backoff keeps growing until a command is answered. */
        logf_(r, CONFIG_LOG_DEBUG, "redis %s:%d: connection %d of %d up again", r->target.host,
              r->target.port, s->index + 1, r->nslots);
        return;
    }
    slot_answered(s);
    if (r->ready == 1)
        logf_(r, CONFIG_LOG_INFO, "redis %s:%d: connected", r->target.host, r->target.port);
    else
        logf_(r, CONFIG_LOG_DEBUG, "redis %s:%d: connection %d of %d up", r->target.host, r->target.port,
              s->index + 1, r->nslots);
}

/* Take c off its slot (a reconnect is scheduled) and answer its calls as
 * failed, oldest first. The hiredis context is left alone. Runs user
 * callbacks: the caller has entered c->r. */
static void conn_detach(conn *c)
{
    gw_redis *r = c->r;
    if (!r)
        return;
    slot *s = c->slot;
    c->r = NULL;
    c->slot = NULL;
    s->conn = NULL;
    if (c->ready) {
        c->ready = false;
        r->ready--;
    }
    event_free(c->timer);
    c->timer = NULL;
    schedule_retry(s);
    /* Only hiredis's callbacks for c->ac unlink calls, and nothing below
     * reaches c->ac any more: the list holds still while done runs. */
    for (gw_redis_call *call = c->head; call; call = call->next)
        answer(call, NULL);
}

/* Drop c on purpose (reconfigure, deadline, handshake error, free). */
static void conn_drop(conn *c)
{
    if (!c->r)
        return;
    conn_detach(c);
    redisAsyncContext *ac = c->ac;
    if (ac->c.flags & REDIS_CONNECTED) {
        /* Now, not after pending replies (redisAsyncDisconnect would wait for
         * them). on_disconnect frees c: at once, or after the callback we are
         * in when hiredis defers the free (REDIS_IN_CALLBACK). */
        redisAsyncFree(ac);
        return;
    }
    /* Never connected: no reply callback can be running for it, no
     * on_disconnect will come, and the callbacks run now find no conn. */
    ac->data = NULL;
    redisAsyncFree(ac);
    free(c);
}

/* The connection went away under us (hiredis frees it). */
static void conn_lost(conn *c)
{
    gw_redis *r = c->r;
    if (!r)
        return;
    if (c->ready && !r->closing)
        logf_(r, CONFIG_LOG_WARN, "redis %s:%d: connection lost", r->target.host, r->target.port);
    conn_detach(c);
}

/* Redis did not answer c in time (a command, or the subscriber's check): it
 * is not trusted with the commands behind either, they are answered as
 * failed, and the slot backs off as after a failed connect. One warning per
 * stall: the retries that time out again log at debug. The caller has
 * entered c->r. */
static void conn_timed_out(conn *c, uint64_t timeout_ns)
{
    gw_redis *r = c->r;
    slot *s = c->slot;
    logf_(r, s->timed_out ? CONFIG_LOG_DEBUG : CONFIG_LOG_WARN,
          "redis %s:%d: no answer within %llu ms; reconnecting", r->target.host, r->target.port,
          (unsigned long long)(timeout_ns / 1000000));
    s->timed_out = true;
    conn_drop(c);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    conn *c = ac->data;
    if (!c || !c->r)
        return;
    gw_redis *r = c->r;
    if (status != REDIS_OK) {
        logf_(r, CONFIG_LOG_DEBUG, "redis %s:%d: connect failed: %s", r->target.host, r->target.port,
              ac->errstr);
        conn_detach(c); /* no calls yet: no user callback runs */
        /* hiredis frees the context after this callback and runs the
         * handshake callbacks with NULL: they must find no conn. */
        ((redisAsyncContext *)ac)->data = NULL;
        free(c);
    }
    /* Connected is not up: the handshake's replies decide (see the top). */
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    conn *c = ac->data;
    if (!c)
        return;
    gw_redis *r = c->r;
    if (r) {
        enter(r);
        conn_lost(c);
        leave(r);
    }
    free(c);
}

static void on_handshake(redisAsyncContext *ac, void *reply, void *privdata)
{
    conn *c = ac->data;
    const redisReply *rep = reply;
    if (!c || !c->r || !rep)
        return; /* NULL: the context is being freed */
    gw_redis *r = c->r;
    if (rep->type == REDIS_REPLY_ERROR) {
        logf_(r, CONFIG_LOG_WARN, "redis %s:%d: %.*s", r->target.host, r->target.port, (int)rep->len,
              rep->str);
        enter(r);
        conn_drop(c);
        leave(r);
        return;
    }
    if (--c->handshake == 0 && !r->subscriber)
        conn_ready(c);
}

static bool reply_is(const redisReply *rep, const char *word)
{
    size_t n = strlen(word);
    return rep->type == REDIS_REPLY_STRING && rep->len == n && memcmp(rep->str, word, n) == 0;
}

static uint64_t check_timeout_ns(const gw_redis *r)
{
    uint64_t min = (uint64_t)GW_REDIS_CHECK_MIN_TIMEOUT_MS * 1000000ULL;
    return r->timeout_ns > min ? r->timeout_ns : min;
}

/* Subscriber mode: the SUBSCRIBE confirmation, then each message, and the
 * confirmations of the liveness checks (SUBSCRIBE again, see the top). Only
 * "message" arrays reach on_message. */
static void on_subscription(redisAsyncContext *ac, void *reply, void *privdata)
{
    conn *c = ac->data;
    const redisReply *rep = reply;
    if (!c || !c->r || !rep || rep->type != REDIS_REPLY_ARRAY || rep->elements < 3)
        return;
    gw_redis *r = c->r;
    if (reply_is(rep->element[0], "message") && rep->element[2]->type == REDIS_REPLY_STRING) {
        if (r->on_message) {
            enter(r);
            r->on_message(r->arg, rep->element[2]->str, rep->element[2]->len);
            leave(r);
        }
    } else if (reply_is(rep->element[0], "subscribe")) {
        if (c->ready) { /* a check answered */
            c->checking = false;
            slot_answered(c->slot);
            timer_arm_ns(c->timer, (uint64_t)GW_REDIS_CHECK_INTERVAL_MS * 1000000ULL);
            return;
        }
        conn_ready(c);
        timer_arm_ns(c->timer, (uint64_t)GW_REDIS_CHECK_INTERVAL_MS * 1000000ULL);
        if (r->on_subscribed) {
            enter(r);
            r->on_subscribed(r->arg);
            leave(r);
        }
    }
}

static int send_subscribe(conn *c)
{
    gw_redis *r = c->r;
    const char *argv[] = {"SUBSCRIBE", r->channel};
    size_t len[] = {9, r->channel_len};
    return redisAsyncCommandArgv(c->ac, on_subscription, NULL, 2, argv, len);
}

/* The subscriber's timer once subscribed: send a check, or its deadline
 * passed. The caller has entered c->r. */
static void subscriber_check(conn *c)
{
    gw_redis *r = c->r;
    if (c->checking) {
        conn_timed_out(c, check_timeout_ns(r));
        return;
    }
    if (send_subscribe(c) != REDIS_OK) { /* out of memory */
        conn_drop(c);
        return;
    }
    c->checking = true;
    timer_arm_ns(c->timer, check_timeout_ns(r));
}

/* The connect deadline, then the oldest call's (armed lazily, see the top). */
static void conn_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    conn *c = arg; /* attached: detaching frees this timer */
    gw_redis *r = c->r;
    enter(r);
    if (!c->ready) {
        /* A failed connect: the slot's backoff grows. */
        logf_(r, CONFIG_LOG_DEBUG, "redis %s:%d: connect timed out", r->target.host, r->target.port);
        conn_drop(c);
    } else if (r->subscriber) {
        subscriber_check(c);
    } else if (c->head) {
        uint64_t now = now_ns();
        if (c->head->deadline_ns > now)
            timer_arm_ns(c->timer, c->head->deadline_ns - now);
        else
            conn_timed_out(c, r->timeout_ns);
    }
    leave(r);
}

static void connect_slot(slot *s)
{
    gw_redis *r = s->r;
    if (!r->configured || r->closing || s->conn)
        return;
    const target *t = &r->target;
    redisAsyncContext *ac = NULL;
    conn *c = calloc(1, sizeof *c);
    if (!c)
        goto fail;
    c->timer = evtimer_new(r->base, conn_deadline_cb, c);
    if (!c->timer)
        goto fail;
    ac = redisAsyncConnect(t->host, t->port);
    if (!ac)
        goto fail;
    if (ac->err) {
        logf_(r, CONFIG_LOG_DEBUG, "redis %s:%d: connect failed: %s", t->host, t->port, ac->errstr);
        goto fail;
    }
    /* A peer gone without a word (no RST) is noticed by the kernel even on an
     * idle connection: hiredis's interval (15 s idle, then 3 probes 5 s
     * apart). The subscriber checks its connection itself as well. */
    if (redisEnableKeepAlive(&ac->c) != REDIS_OK) {
        logf_(r, CONFIG_LOG_DEBUG, "redis %s:%d: keepalive: %s", t->host, t->port, ac->c.errstr);
        goto fail;
    }
    if (redisLibeventAttach(ac, r->base) != REDIS_OK)
        goto fail;
    ac->data = c;
    c->ac = ac;
    c->r = r;
    c->slot = s;
    s->conn = c;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);

    /* Pipelined behind the connect; each reply is checked in on_handshake,
     * and the last one (PING's, the subscriber's SUBSCRIBE confirmation)
     * makes the connection up. */
    int sent = REDIS_OK;
    if (t->password[0]) {
        /* AUTH [user] password: with a user, Redis 6 ACLs. */
        const char *argv[] = {"AUTH", t->user, t->password};
        size_t len[] = {4, strlen(t->user), strlen(t->password)};
        if (t->user[0])
            sent |= redisAsyncCommandArgv(ac, on_handshake, NULL, 3, argv, len);
        else
            sent |= redisAsyncCommandArgv(ac, on_handshake, NULL, 2, (const char *[]){"AUTH", t->password},
                                          (const size_t[]){4, len[2]});
        c->handshake++;
    }
    if (t->db) {
        char db[16];
        int n = snprintf(db, sizeof db, "%d", t->db);
        const char *argv[] = {"SELECT", db};
        size_t len[] = {6, (size_t)n};
        sent |= redisAsyncCommandArgv(ac, on_handshake, NULL, 2, argv, len);
        c->handshake++;
    }
    if (r->subscriber) {
        sent |= send_subscribe(c);
    } else {
        sent |=
            redisAsyncCommandArgv(ac, on_handshake, NULL, 1, (const char *[]){"PING"}, (const size_t[]){4});
        c->handshake++;
    }
    if (sent != REDIS_OK) { /* out of memory */
        conn_drop(c);       /* schedules the retry */
        return;
    }
    timer_arm_ns(c->timer, r->timeout_ns);
    return;

fail:
    if (ac)
        redisAsyncFree(ac);
    if (c) {
        if (c->timer)
            event_free(c->timer);
        free(c);
    }
    schedule_retry(s);
}

/* ---- configuration ---------------------------------------------------------------- */

/* redis://[user][:password@]host[:port][/db]; host may be [IPv6]. A non-empty
 * password (the redis.password key) wins over the URL's. */
static int parse_url(target *t, const char *url, const char *password)
{
    static const char scheme[] = "redis://";
    if (strncmp(url, scheme, sizeof scheme - 1) != 0)
        return -1;
    const char *p = url + sizeof scheme - 1;
    const char *at = strrchr(p, '@');
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        const char *user_end = colon ? colon : at;
        size_t ulen = (size_t)(user_end - p);
        if (ulen >= sizeof t->user)
            return -1;
        memcpy(t->user, p, ulen);
        if (colon) {
            size_t n = (size_t)(at - colon - 1);
            if (n >= sizeof t->password)
                return -1;
            memcpy(t->password, colon + 1, n);
        }
        p = at + 1;
    }
    if (password && *password) {
        size_t n = strlen(password);
        if (n >= sizeof t->password)
            return -1;
        memset(t->password, 0, sizeof t->password);
        memcpy(t->password, password, n);
    }
    size_t hlen;
    if (*p == '[') {
        const char *close = strchr(p, ']');
        if (!close)
            return -1;
        p++;
        hlen = (size_t)(close - p);
        if (hlen == 0 || hlen >= sizeof t->host)
            return -1;
        memcpy(t->host, p, hlen);
        p = close + 1;
    } else {
        hlen = strcspn(p, ":/");
        if (hlen == 0 || hlen >= sizeof t->host)
            return -1;
        memcpy(t->host, p, hlen);
        p += hlen;
    }
    t->port = GW_REDIS_DEFAULT_PORT;
    if (*p == ':') {
        t->port = atoi(p + 1);
        p += 1 + strspn(p + 1, "0123456789");
    }
    t->db = *p == '/' ? atoi(p + 1) : 0;
    return t->port > 0 && t->port < 65536 && t->db >= 0 ? 0 : -1;
}

static int slots_make(gw_redis *r, int n)
{
    if (n < 1)
        n = 1;
    if (n > GW_REDIS_MAX_CONNECTIONS)
        n = GW_REDIS_MAX_CONNECTIONS;
    r->slots = calloc((size_t)n, sizeof *r->slots);
    if (!r->slots)
        return -1;
    for (int i = 0; i < n; i++) {
        slot *s = &r->slots[i];
        s->r = r;
        s->index = i;
        s->retry = evtimer_new(r->base, retry_cb, s);
        if (!s->retry) {
            for (int j = 0; j < i; j++)
                event_free(r->slots[j].retry);
            free(r->slots);
            r->slots = NULL;
            return -1;
        }
    }
    r->nslots = n;
    return 0;
}

static gw_redis *client_new(struct event_base *base, gw_redis_log_fn log)
{
    gw_redis *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->base = base;
    r->log = log;
    r->timeout_ns = (uint64_t)GW_REDIS_DEFAULT_TIMEOUT_MS * 1000000ULL;
    return r;
}

gw_redis *gw_redis_create(struct event_base *base, gw_redis_log_fn log)
{
    return client_new(base, log);
}

gw_redis *gw_redis_create_subscriber(struct event_base *base, gw_redis_log_fn log, const char *channel,
                                     gw_redis_message_fn on_message, gw_redis_subscribed_fn on_subscribed,
                                     void *arg)
{
    gw_redis *r = client_new(base, log);
    if (!r)
        return NULL;
    r->subscriber = true;
    r->channel = strdup(channel ? channel : "");
    if (!r->channel) {
        free(r);
        return NULL;
    }
    r->channel_len = strlen(r->channel);
    r->on_message = on_message;
    r->on_subscribed = on_subscribed;
    r->arg = arg;
    return r;
}

void gw_redis_configure(gw_redis *r, const config_redis *cfg)
{
    if (!r || r->closing)
        return;
    enter(r);
    target t;
    memset(&t, 0, sizeof t);
    bool ok = cfg && cfg->enabled && cfg->url && parse_url(&t, cfg->url, cfg->password) == 0;
    if (cfg && cfg->enabled && !ok)
        logf_(r, CONFIG_LOG_ERROR, "redis: unusable redis.url (redis://[user][:password@]host[:port][/db])");
    if (cfg && cfg->timeout_ms > 0)
        r->timeout_ns = (uint64_t)cfg->timeout_ms * 1000000ULL;
    /* The connection count is set once: redis.connections_per_worker needs
     * a restart. */
    if (ok && !r->slots && slots_make(r, r->subscriber ? 1 : cfg->connections_per_worker) != 0) {
        logf_(r, CONFIG_LOG_ERROR, "redis: out of memory");
        ok = false;
    }
    if (!ok || !r->configured || memcmp(&t, &r->target, sizeof t) != 0) {
        r->configured = false; /* no reconnects while dropping */
        for (int i = 0; i < r->nslots && !r->closing; i++) {
            slot *s = &r->slots[i];
            evtimer_del(s->retry);
            s->backoff_ms = 0;
            s->timed_out = false;
            if (s->conn)
                conn_drop(s->conn); /* may run done callbacks */
        }
        if (ok && !r->closing) {
            memcpy(&r->target, &t, sizeof t);
            r->configured = true;
            for (int i = 0; i < r->nslots && r->configured; i++)
                connect_slot(&r->slots[i]);
        }
    }
    memset(&t, 0, sizeof t); /* the password */
    leave(r);
}

void gw_redis_free(gw_redis *r)
{
    if (!r || r->closing)
        return;
    enter(r);
    r->closing = true; /* a shutdown, not a lost connection; no reconnects */
    r->configured = false;
    for (int i = 0; i < r->nslots; i++) {
        slot *s = &r->slots[i];
        evtimer_del(s->retry);
        if (s->conn)
            conn_drop(s->conn); /* answers its calls */
    }
    memset(&r->target, 0, sizeof r->target);
    leave(r); /* frees r unless a callback up the stack still runs */
}

bool gw_redis_up(const gw_redis *r)
{
    return r && r->ready > 0 && !r->closing;
}

/* ---- commands ---------------------------------------------------------------------- */

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    conn *c = ac->data;
    gw_redis_call *call = privdata;
    gw_redis *r = c->r; /* NULL when detached: every call was answered then */
    if (r) {
        enter(r);
        if (!reply)
            conn_lost(c); /* hiredis is freeing the context: answers all, this one first */
        else if (c->slot->timed_out && now_ns() - c->ready_ns >= r->timeout_ns)
            /* Redis answers commands again, and has for a whole timeout: a
             * Redis that answers reads but stalls writes (CLIENT PAUSE WRITE)
             * times a command out within that window and keeps backing off. */
            slot_answered(c->slot);
    }
    if (c->head != call)
        abort(); /* replies come in order: broken invariant */
    c->head = call->next;
    if (!c->head)
        c->tail = NULL;
    answer(call, reply);
    free(call);
    if (r)
        leave(r);
}

static size_t decimal_len(size_t n)
{
    size_t len = 1;
    while (n >= 10) {
        n /= 10;
        len++;
    }
    return len;
}

static char *put_decimal(char *w, size_t n, size_t len)
{
    for (size_t i = len; i > 0; i--) {
        w[i - 1] = (char)('0' + n % 10);
        n /= 10;
    }
    return w + len;
}

static size_t arg_len(const char **argv, const size_t *argvlen, int i)
{
    return argvlen ? argvlen[i] : strlen(argv[i]);
}

/* The RESP form of argv, as redisAsyncCommandArgv would build it but without
 * its sds allocations: into buf when it fits, else into a malloc'd block
 * (the caller frees it when it is not buf). NULL when out of memory. */
static char *format_command(char *buf, size_t size, int argc, const char **argv, const size_t *argvlen,
                            size_t *out_len)
{
    size_t total = 1 + decimal_len((size_t)argc) + 2;
    for (int i = 0; i < argc; i++) {
        size_t n = arg_len(argv, argvlen, i);
        total += 1 + decimal_len(n) + 2 + n + 2;
    }
    char *out = total <= size ? buf : malloc(total);
    if (!out)
        return NULL;
    char *w = out;
    *w++ = '*';
    w = put_decimal(w, (size_t)argc, decimal_len((size_t)argc));
    *w++ = '\r';
    *w++ = '\n';
    for (int i = 0; i < argc; i++) {
        size_t n = arg_len(argv, argvlen, i);
        *w++ = '$';
        w = put_decimal(w, n, decimal_len(n));
        *w++ = '\r';
        *w++ = '\n';
        memcpy(w, argv[i], n);
        w += n;
        *w++ = '\r';
        *w++ = '\n';
    }
    *out_len = total;
    return out;
}

gw_redis_call *gw_redis_command(gw_redis *r, gw_redis_done_fn done, void *arg, int argc, const char **argv,
                                const size_t *argvlen)
{
    if (!r || r->ready == 0 || r->closing || r->subscriber || argc < 1)
        return NULL;
    char buf[GW_REDIS_COMMAND_STACK_BYTES];
    size_t len;
    char *text = format_command(buf, sizeof buf, argc, argv, argvlen, &len);
    if (!text)
        return NULL;
    gw_redis_call *call = malloc(sizeof *call);
    if (!call)
        goto fail;
    call->next = NULL;
    call->done = done;
    call->arg = arg;
    for (int i = 0; i < r->nslots; i++) {
        conn *c = r->slots[r->rr].conn;
        if (++r->rr == r->nslots)
            r->rr = 0;
        if (!c || !c->ready || redisAsyncFormattedCommand(c->ac, on_reply, call, text, len) != REDIS_OK)
            continue;
        call->deadline_ns = now_ns() + r->timeout_ns;
        if (c->tail)
            c->tail->next = call;
        else
            c->head = call;
        c->tail = call;
        if (!evtimer_pending(c->timer, NULL))
            timer_arm_ns(c->timer, r->timeout_ns);
        if (text != buf)
            free(text);
        return call;
    }
fail:
    free(call);
    if (text != buf)
        free(text);
    return NULL;
}

void gw_redis_cancel(gw_redis_call *call)
{
    if (call)
        call->done = NULL; /* freed when its reply (or the drop) comes */
}

/*
 * pool.c - one worker's half of the PostgreSQL pool: its server connections,
 * driven by asynchronous libpq on the worker's event_base, and its queue of
 * calls waiting for one.
 *
 * A connection's life: LOGIN (PQconnectStartParams, then PQconnectPoll each
 * time the socket is ready the way libpq asked, re-reading PQsocket() after
 * every poll) -> IDLE (on the idle stack, newest on top) -> ACTIVE (calls in
 * flight) -> IDLE again, or closed. A persistent read event watches every
 * connection from login to close, so a server that goes away is noticed on
 * idle connections too.
 *
 * Connections run in libpq's pipeline mode. A call is sent as one segment:
 * server_check_query when the connection idled past server_check_delay, a
 * Parse (PQsendPrepare) the first time this connection sees the statement,
 * the Bind/Execute (PQsendQueryPrepared), then a Sync, so every call is its
 * own implicit transaction and an error aborts only its own segment. Results
 * are read with PQconsumeInput / PQisBusy / PQgetResult: each command's
 * results end with NULL, each segment with PGRES_PIPELINE_SYNC. When every
 * connection is busy and no more may be opened, a waiting call is sent on the
 * connection with the fewest calls in flight, up to pipeline_depth: the
 * server then finds the next statement already in its socket when it
 * finishes one, instead of sleeping until the gateway's next round trip.
 *
 * Deadlines: one timer per connection for the oldest call in flight
 * (query_timeout + POOL_QUERY_GRACE_MS, or the call's own deadline) or for
 * the login (server_connect_timeout); one timer per database for the oldest
 * waiting call (query_wait_timeout, and reserve_pool_timeout when a reserve
 * is configured); and a maintenance tick every POOL_TICK_MS.
 *
 * A failed connect marks the database down: calls waiting with no connection
 * left to serve them get 503 at once, and new calls get 503 at once until the
 * backoff (POOL_BACKOFF_MIN_MS doubling to POOL_BACKOFF_MAX_MS) lets the next
 * attempt start; the first call after that waits for the attempt.
 */
#include "pool/pool.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pool/pool_internal.h"

typedef struct pool_db pool_db;
typedef struct pool_conn pool_conn;

typedef enum { CONN_LOGIN, CONN_IDLE, CONN_ACTIVE, CONN_BOUND } conn_state;
typedef enum { STEP_CHECK, STEP_PREPARE, STEP_EXECUTE } conn_step;

#define CONN_PARAMS_MAX 16
#define STMT_STATS_CAP 256 /* statements timed per database and worker */

/* How long a statement usually runs on the server, per worker: pipelining
 * only queues calls behind statements known to be fast. */
typedef struct stmt_stat {
    uint64_t hash; /* 0: free slot */
    uint32_t ewma_us;
    uint32_t samples;
} stmt_stat;

struct pool_call {
    pool_call *prev, *next; /* the wait queue, a connection's calls in flight, or the finished list */
    pool_t *p;
    pool_db *db;
    const char *query;
    uint64_t qhash;
    char stmt[24]; /* "gw_" + 16 hex digits */
    int nparams;
    char **values;
    const void *session;
    uint64_t deadline_ns; /* the caller's */
    pool_done_fn done;
    void *arg;
    uint64_t queued_ns, sent_ns, due_ns;
    pool_conn *conn;
    stmt_stat *stat;        /* NULL when the table is full */
    bool fast;              /* sent as a statement known to be fast (see least_busy) */
    unsigned char steps[3]; /* conn_step, in the order sent */
    int nsteps, cur;
    PGresult *res;     /* the execute's result, or the first error of the segment */
    bool check_failed; /* server_check_query failed: nothing of the call ran */
    bool prepare_failed;
    bool waiting;
    bool cancelled;
    bool admitted; /* counted in pool_shared.clients */
    bool retried;  /* re-run once after a stale prepared statement */
    int status;    /* finished list: the answer */
    const char *error;
};

struct pool_conn {
    pool_conn *prev, *next; /* the database's connections */
    pool_conn *idle_next;   /* the idle stack */
    pool_db *db;
    PGconn *pg;
    int fd;
    struct event *io;    /* login: one-shot, as libpq asks; afterwards persistent read */
    struct event *wr;    /* one-shot write while libpq has output queued */
    struct event *timer; /* login deadline, then the oldest call's */
    conn_state state;
    unsigned version; /* the database's settings version it was opened with */
    uint64_t opened_ns, idle_ns;
    uint64_t *prepared; /* statements prepared (or being prepared) here */
    size_t prepared_count, prepared_cap;
    pool_call *q_head, *q_tail; /* calls in flight, oldest first */
    int depth;
    int n_slow; /* calls in flight not known to be fast */
    uint64_t last_done_ns;
    bool cancel_sent;    /* our deadline passed: a cancel request went to the server */
    uint64_t grace_ns;   /* with cancel_sent: dropped at this time if still busy */
    int testing;         /* server_check_query results still to come */
    bool closing;        /* takes no more calls; closed when the last ends */
    const void *session; /* CONN_BOUND: its owner */
    bool checked_idle;   /* counted in sv_used */
    bool fresh;          /* logged in and not used yet: no check needed */
};

struct pool_db {
    pool_db *next;
    pool_t *p;
    char *name;
    pool_shared_db *sh;
    pool_worker_stats *st;
    bool configured;
    unsigned version;
    /* connection settings, as libpq keywords and values */
    const char *keys[CONN_PARAMS_MAX + 1];
    char *vals[CONN_PARAMS_MAX + 1];
    int pool_share, min_share, reserve_share, max_db, pipeline_depth;
    bool session_mode;
    int64_t wait_ms, reserve_ms, idle_ms, lifetime_ms, check_delay_ms, connect_ms, query_ms;
    char *check_query;

    pool_conn *conns;
    pool_conn *idle;
    int n_open, n_login, n_idle, n_active, n_bound, n_tested, n_used;
    int n_calls; /* calls in flight on this database's connections */
    pool_call *wait_head, *wait_tail;
    int n_waiting;
    struct event *wait_timer;

    bool down; /* no usable connection and the last connect failed */
    uint64_t next_connect_ns;
    int backoff_ms;
    bool cap_blocked; /* the last open was refused by the shared max_db_connections */
    bool refused;     /* the last connect failed while connections were open elsewhere */
    bool starving;    /* counted in the shared `wanted`: calls wait on the shared cap */
    stmt_stat stats[STMT_STATS_CAP];

    metrics_series_t *wait_hist;
    metrics_series_t *max_gauge;
};

struct pool {
    struct event_base *base;
    pool_shared *sh;
    int worker;
    metrics_shard_t *shard;
    pool_metric_families fam;
    pool_db *dbs;
    struct event *tick;
    struct event *finish_ev;
    pool_call *finished, *finished_tail;
};

static void dispatch(pool_db *db);
static void conn_close(pool_conn *c, int status, const char *why);
static void conn_settle(pool_conn *c);

/* ---- small things ---------------------------------------------------------------- */

static uint64_t hash_text(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return h;
}

static void store(atomic_long *a, long v)
{
    atomic_store_explicit(a, v, memory_order_relaxed);
}

static void bump(atomic_ullong *a, uint64_t by)
{
    atomic_store_explicit(a, atomic_load_explicit(a, memory_order_relaxed) + by, memory_order_relaxed);
}

static uint64_t ms_ns(int64_t ms)
{
    return ms > 0 ? (uint64_t)ms * 1000000ULL : 0;
}

/* The statement's timing slot (inserted when new); NULL when the table is full. */
static stmt_stat *stat_find(pool_db *db, uint64_t hash)
{
    if (!hash)
        hash = 1;
    size_t i = (size_t)(hash % STMT_STATS_CAP);
    for (size_t n = 0; n < STMT_STATS_CAP; n++, i = (i + 1) % STMT_STATS_CAP) {
        if (db->stats[i].hash == hash)
            return &db->stats[i];
        if (!db->stats[i].hash) {
            db->stats[i].hash = hash;
            return &db->stats[i];
        }
    }
    return NULL;
}

static void stat_update(stmt_stat *st, uint64_t us)
{
    if (!st)
        return;
    uint32_t v = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
    st->ewma_us = st->samples ? (uint32_t)(((uint64_t)st->ewma_us * 3 + v) / 4) : v;
    if (st->samples < UINT32_MAX)
        st->samples++;
}

static bool others_starving(const pool_db *db)
{
    return atomic_load_explicit(&db->sh->wanted, memory_order_relaxed) - (db->starving ? 1 : 0) > 0;
}

static void count_error(pool_db *db, const char *kind)
{
    const char *labels[2] = {db->name, kind};
    metrics_series_t *s = metrics_series(db->p->shard, db->p->fam.errors, labels);
    if (s)
        metrics_counter_add(s, 1);
}

/* Publish this worker's state figures for the database. */
static void publish(pool_db *db)
{
    pool_worker_stats *st = db->st;
    store(&st->cl_active, db->n_calls + db->n_bound);
    store(&st->cl_waiting, db->n_waiting);
    store(&st->sv_active, db->n_active + db->n_bound);
    store(&st->sv_idle, db->n_idle - db->n_used);
    store(&st->sv_used, db->n_used);
    store(&st->sv_tested, db->n_tested);
    store(&st->sv_login, db->n_login);
    atomic_store_explicit(&st->wait_head_ns, db->wait_head ? db->wait_head->queued_ns : 0,
                          memory_order_relaxed);
}

static void set_state(pool_db *db, pool_db_state s)
{
    int old = atomic_exchange_explicit(&db->sh->state, (int)s, memory_order_relaxed);
    if (old == (int)s)
        return;
    if (s == POOL_DB_UP && old == POOL_DB_DOWN)
        pool_logf(db->p->sh, CONFIG_LOG_INFO, "postgres %s: reachable again", db->name);
}

static void timer_at(struct event *ev, uint64_t at_ns)
{
    uint64_t now = pool_now_ns();
    int64_t ms = at_ns > now ? (int64_t)((at_ns - now + 999999) / 1000000) : 0;
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
    evtimer_add(ev, &tv);
}

/* libpq's messages run over several lines: the first is the one to log. */
static int first_line(const char *msg)
{
    return (int)strcspn(msg, "\n");
}

/* Notices (a FATAL before the server closes, say) would go to stderr. */
static void ignore_notice(void *arg, const char *message) {}

/* ---- finishing calls ------------------------------------------------------------- */

static void call_free(pool_call *call)
{
    for (int i = 0; i < call->nparams; i++)
        free(call->values[i]);
    free(call->values);
    if (call->res)
        PQclear(call->res);
    free(call);
}

static void unadmit(pool_call *call)
{
    if (call->admitted) {
        atomic_fetch_sub_explicit(&call->p->sh->clients, 1, memory_order_relaxed);
        call->admitted = false;
    }
}

/* Answer a call now (never from inside pool_exec) and free it. */
static void call_finish(pool_call *call, int status, const PGresult *res, const char *error)
{
    unadmit(call);
    if (!call->cancelled) {
        pool_result r = {.status = status, .res = res, .error = error};
        call->done(call->arg, &r);
    }
    call_free(call);
}

static void finish_cb(evutil_socket_t fd, short what, void *arg)
{
    pool_t *p = arg;
    while (p->finished) {
        pool_call *call = p->finished;
        p->finished = call->next;
        if (!p->finished)
            p->finished_tail = NULL;
        call_finish(call, call->status, NULL, call->error);
    }
}

/* Answer a call from the next loop iteration. */
static void call_finish_later(pool_call *call, int status, const char *error)
{
    pool_t *p = call->p;
    call->status = status;
    call->error = error;
    call->next = NULL;
    if (p->finished_tail)
        p->finished_tail->next = call;
    else
        p->finished = call;
    p->finished_tail = call;
    event_active(p->finish_ev, EV_TIMEOUT, 0);
}

/* ---- the wait queue ----------------------------------------------------------------- */

static void queue_remove(pool_db *db, pool_call *call)
{
    if (!call->waiting)
        return;
    if (call->prev)
        call->prev->next = call->next;
    else
        db->wait_head = call->next;
    if (call->next)
        call->next->prev = call->prev;
    else
        db->wait_tail = call->prev;
    call->prev = call->next = NULL;
    call->waiting = false;
    db->n_waiting--;
}

static void queue_push(pool_db *db, pool_call *call, bool front)
{
    call->waiting = true;
    call->conn = NULL;
    db->n_waiting++;
    if (front) {
        call->prev = NULL;
        call->next = db->wait_head;
        if (db->wait_head)
            db->wait_head->prev = call;
        else
            db->wait_tail = call;
        db->wait_head = call;
    } else {
        call->next = NULL;
        call->prev = db->wait_tail;
        if (db->wait_tail)
            db->wait_tail->next = call;
        else
            db->wait_head = call;
        db->wait_tail = call;
    }
}

/* Arm the wait timer for the oldest call: its query_wait_timeout, or its
 * reserve_pool_timeout when that comes first and a reserve exists. */
static void arm_wait_timer(pool_db *db)
{
    if (!db->wait_head) {
        evtimer_del(db->wait_timer);
        return;
    }
    uint64_t now = pool_now_ns();
    uint64_t at = db->wait_head->queued_ns + ms_ns(db->wait_ms);
    if (db->wait_head->deadline_ns && db->wait_head->deadline_ns < at)
        at = db->wait_head->deadline_ns; /* the request's own deadline comes first */
    uint64_t reserve_at = db->wait_head->queued_ns + ms_ns(db->reserve_ms);
    if (db->reserve_share > 0 && db->n_open < db->pool_share + db->reserve_share && reserve_at > now &&
        reserve_at < at)
        at = reserve_at;
    timer_at(db->wait_timer, at);
}

/* Every waiting call gets status now (the database is unreachable). */
static void fail_waiters(pool_db *db, int status, const char *why)
{
    while (db->wait_head) {
        pool_call *call = db->wait_head;
        queue_remove(db, call);
        call_finish_later(call, status, why);
    }
    evtimer_del(db->wait_timer);
}

static void wait_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    pool_db *db = arg;
    uint64_t now = pool_now_ns();
    uint64_t limit = ms_ns(db->wait_ms);
    for (pool_call *call = db->wait_head, *next; call; call = next) {
        next = call->next;
        if (now - call->queued_ns >= limit) {
            queue_remove(db, call);
            count_error(db, "wait_timeout");
            call_finish_later(call, 503, "no server connection within query_wait_timeout");
        } else if (call->deadline_ns && now >= call->deadline_ns) {
            queue_remove(db, call);
            count_error(db, "query_timeout");
            call_finish_later(call, 504, "request deadline passed waiting for a server connection");
        } else if (now - call->queued_ns < limit / 2) {
            break; /* FIFO: the rest are younger still */
        }
    }
    dispatch(db); /* a reserve connection may be due */
}

/* ---- connections ---------------------------------------------------------------------- */

static bool conn_prepared(const pool_conn *c, uint64_t h)
{
    for (size_t i = 0; i < c->prepared_count; i++)
        if (c->prepared[i] == h)
            return true;
    return false;
}

static bool conn_remember(pool_conn *c, uint64_t h)
{
    if (c->prepared_count == c->prepared_cap) {
        size_t cap = c->prepared_cap ? c->prepared_cap * 2 : 8;
        uint64_t *np = realloc(c->prepared, cap * sizeof *np);
        if (!np)
            return false;
        c->prepared = np;
        c->prepared_cap = cap;
    }
    c->prepared[c->prepared_count++] = h;
    return true;
}

static void conn_forget(pool_conn *c, uint64_t h)
{
    for (size_t i = 0; i < c->prepared_count; i++) {
        if (c->prepared[i] == h) {
            c->prepared[i] = c->prepared[--c->prepared_count];
            return;
        }
    }
}

static void idle_push(pool_db *db, pool_conn *c)
{
    c->state = CONN_IDLE;
    c->idle_ns = pool_now_ns();
    c->idle_next = db->idle;
    db->idle = c;
    db->n_idle++;
}

static void idle_remove(pool_db *db, pool_conn *c)
{
    pool_conn **pp = &db->idle;
    while (*pp && *pp != c)
        pp = &(*pp)->idle_next;
    if (*pp) {
        *pp = c->idle_next;
        c->idle_next = NULL;
        db->n_idle--;
        if (c->checked_idle) {
            db->n_used--;
            c->checked_idle = false;
        }
    }
}

/* Leave the state the connection is in (counts). */
static void leave_state(pool_conn *c)
{
    pool_db *db = c->db;
    switch (c->state) {
    case CONN_LOGIN:
        db->n_login--;
        break;
    case CONN_IDLE:
        idle_remove(db, c);
        break;
    case CONN_ACTIVE:
        db->n_active--;
        break;
    case CONN_BOUND:
        db->n_bound--;
        break;
    }
}

/* Arm the statement deadline for the oldest call in flight. */
/* Arm the connection's timer for the earliest deadline among its calls
 * still to be answered, and the cancel grace when one runs. */
static void arm_call_timer(pool_conn *c)
{
    uint64_t at = c->cancel_sent ? c->grace_ns : 0;
    for (pool_call *call = c->q_head; call; call = call->next)
        if (!call->cancelled && (!at || call->due_ns < at))
            at = call->due_ns;
    if (at)
        timer_at(c->timer, at);
    else
        evtimer_del(c->timer);
}

static pool_call *conn_pop(pool_conn *c)
{
    pool_call *call = c->q_head;
    if (!call)
        return NULL;
    c->q_head = call->next;
    if (!c->q_head)
        c->q_tail = NULL;
    call->next = NULL;
    call->conn = NULL;
    c->depth--;
    c->n_slow -= !call->fast;
    c->db->n_calls--;
    return call;
}

/* Free a connection. Its calls in flight get status: the oldest `status`,
 * the others 503 (sent, so perhaps run: not to be run again). */
static void conn_close(pool_conn *c, int status, const char *why)
{
    pool_db *db = c->db;
    leave_state(c);
    if (c->prev)
        c->prev->next = c->next;
    else
        db->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    db->n_open--;
    db->n_tested -= c->testing;
    atomic_fetch_sub_explicit(&db->sh->server_conns, 1, memory_order_relaxed);
    bool first = true;
    pool_call *call;
    while ((call = conn_pop(c))) {
        call_finish_later(call, first ? status : 503, first ? why : "database connection lost");
        first = false;
    }
    event_free(c->io);
    event_free(c->wr);
    event_free(c->timer);
    PQfinish(c->pg);
    free(c->prepared);
    free(c);
    publish(db);
}

/* The connection failed while statements ran, or went away while idle. */
static void conn_broken(pool_conn *c, const char *what)
{
    pool_db *db = c->db;
    const char *msg = c->pg ? PQerrorMessage(c->pg) : "";
    pool_logf(db->p->sh, CONFIG_LOG_WARN, "postgres %s: connection lost (%s): %.*s", db->name, what,
              first_line(msg), msg);
    count_error(db, "broken");
    conn_close(c, 503, "database connection lost");
    dispatch(db);
}

/* Push queued output; wait for the socket when it is full. -1 when the
 * connection broke (and is freed). */
static int conn_flush(pool_conn *c)
{
    int rc = PQflush(c->pg);
    if (rc < 0) {
        conn_broken(c, "send");
        return -1;
    }
    if (rc > 0)
        event_add(c->wr, NULL);
    return 0;
}

static void wr_cb(evutil_socket_t fd, short what, void *arg)
{
    conn_flush(arg);
}

/* Queue a call's segment on a connection (not yet flushed). False when libpq
 * refused it: the connection is broken. */
static bool conn_send(pool_conn *c, pool_call *call)
{
    pool_db *db = c->db;
    uint64_t now = pool_now_ns();
    call->nsteps = call->cur = 0;
    if (c->depth == 0 && !c->fresh && db->check_query && *db->check_query && c->idle_ns &&
        now - c->idle_ns >= ms_ns(db->check_delay_ms)) {
        if (!PQsendQueryParams(c->pg, db->check_query, 0, NULL, NULL, NULL, NULL, 0))
            return false;
        call->steps[call->nsteps++] = STEP_CHECK;
        c->testing++;
        db->n_tested++;
    }
    if (!conn_prepared(c, call->qhash)) {
        if (!PQsendPrepare(c->pg, call->stmt, call->query, call->nparams, NULL))
            return false;
        conn_remember(c, call->qhash); /* later calls in this pipeline rely on it */
        call->steps[call->nsteps++] = STEP_PREPARE;
    }
    if (!PQsendQueryPrepared(c->pg, call->stmt, call->nparams, (const char *const *)call->values, NULL, NULL,
                             0) ||
        !PQpipelineSync(c->pg))
        return false;
    call->steps[call->nsteps++] = STEP_EXECUTE;
    c->idle_ns = 0;
    c->fresh = false;
    call->sent_ns = now;
    call->due_ns = db->query_ms > 0 ? now + ms_ns(db->query_ms + POOL_QUERY_GRACE_MS) : 0;
    if (call->deadline_ns && (!call->due_ns || call->deadline_ns < call->due_ns))
        call->due_ns = call->deadline_ns;
    if (!call->due_ns)
        call->due_ns = now + ms_ns(3600 * 1000); /* every wait has a deadline */
    call->fast = call->stat && call->stat->samples > 0 && call->stat->ewma_us < POOL_PIPELINE_FAST_US;
    c->n_slow += !call->fast;
    call->conn = c;
    call->next = NULL;
    if (c->q_tail)
        c->q_tail->next = call;
    else
        c->q_head = call;
    c->q_tail = call;
    c->depth++;
    db->n_calls++;
    arm_call_timer(c);
    return true;
}

/* Give a call to an open connection (idle, bound or active with room). */
static void conn_assign(pool_conn *c, pool_call *call)
{
    pool_db *db = c->db;
    uint64_t waited = pool_now_ns() - call->queued_ns;
    bump(&db->st->wait_time_us, waited / 1000);
    if (db->wait_hist)
        metrics_histogram_observe(db->wait_hist, (double)waited / 1e9);
    if (c->state != CONN_ACTIVE) {
        leave_state(c);
        c->state = CONN_ACTIVE;
        db->n_active++;
    }
    if (!conn_send(c, call)) {
        /* Not sent: the call can wait for another connection. */
        queue_push(db, call, true);
        conn_broken(c, "send");
        return;
    }
    conn_flush(c);
}

/* The call's segment ended (PGRES_PIPELINE_SYNC): answer it, or send it
 * round again when nothing of it ran. */
static void call_done(pool_conn *c, pool_call *call, pool_call **answered)
{
    pool_db *db = c->db;
    PGresult *res = call->res;
    call->res = NULL;
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    bool ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    if (call->prepare_failed)
        conn_forget(c, call->qhash);
    /* 0A000 "cached plan must not change result type" (the schema changed
     * under a prepared statement), 26000 (its Parse was aborted earlier in
     * this pipeline): nothing ran. */
    bool stale_stmt = !ok && state && (strcmp(state, "0A000") == 0 || strcmp(state, "26000") == 0);
    if (!call->cancelled && (call->check_failed || (stale_stmt && !call->retried))) {
        /* The check failed (the segment was aborted before the statement), or
         * "cached plan must not change result type": the schema changed under
         * a prepared statement. Nothing ran: once more, on another connection;
         * this one takes no more calls. */
        if (res)
            PQclear(res);
        call->retried = call->retried || !call->check_failed;
        call->check_failed = false;
        call->prepare_failed = false;
        c->closing = true;
        queue_push(db, call, true);
        return;
    }
    pool_worker_stats *stats = db->st;
    uint64_t us = (pool_now_ns() - call->sent_ns) / 1000;
    bump(&stats->query_count, 1);
    bump(&stats->xact_count, 1);
    bump(&stats->query_time_us, us);
    bump(&stats->xact_time_us, us);
    if (res && st == PGRES_TUPLES_OK) {
        uint64_t bytes = 0;
        int rows = PQntuples(res), cols = PQnfields(res);
        for (int r = 0; r < rows; r++)
            for (int k = 0; k < cols; k++)
                bytes += (uint64_t)PQgetlength(res, r, k);
        bump(&stats->sent, bytes);
    }
    int status = ok ? 200 : res ? pool_sqlstate_status(state) : 503;
    if (status == 504 && !call->cancelled) /* a call we answered early was counted then */
        count_error(db, "query_timeout");
    if (db->session_mode && call->session && !call->cancelled && c->depth == 0 && !c->closing) {
        /* session mode: the connection stays with its client until
         * pool_session_end(). */
        leave_state(c);
        c->state = CONN_BOUND;
        c->session = call->session;
        db->n_bound++;
    }
    /* Answered by the caller once it is done with the connection: the
     * caller's callback may do anything, this connection's end included. */
    call->status = status;
    call->error = ok ? NULL : res ? "statement failed" : "statement not run";
    call->res = res;
    call->next = *answered;
    *answered = call;
}

/* Answer the calls call_done() set aside (in the order they ended). */
static void answer_all(pool_call *answered)
{
    pool_call *list = NULL;
    while (answered) { /* reverse: oldest first */
        pool_call *next = answered->next;
        answered->next = list;
        list = answered;
        answered = next;
    }
    while (list) {
        pool_call *call = list;
        list = call->next;
        call->next = NULL;
        PGresult *res = call->res;
        call->res = NULL;
        call_finish(call, call->status, res, call->error);
        if (res)
            PQclear(res);
    }
}

/* A result for the oldest call in flight. */
static void take_result(pool_conn *c, pool_call *call, PGresult *r)
{
    ExecStatusType st = PQresultStatus(r);
    bool ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
    conn_step step = call->cur < call->nsteps ? (conn_step)call->steps[call->cur] : STEP_EXECUTE;
    if (step == STEP_CHECK && !ok)
        call->check_failed = true;
    if (step == STEP_PREPARE && !ok)
        call->prepare_failed = true;
    /* Keep the first error of the segment, else the statement's result. */
    bool keep =
        !call->res && st != PGRES_PIPELINE_ABORTED && step != STEP_CHECK && (step == STEP_EXECUTE || !ok);
    if (keep)
        call->res = r;
    else
        PQclear(r);
}

/* Read what the server sent and finish the calls whose segments ended. */
static void conn_read(pool_conn *c)
{
    pool_db *db = c->db;
    if (!PQconsumeInput(c->pg)) {
        conn_broken(c, "read");
        return;
    }
    if (c->depth == 0) {
        /* Nothing is expected: a notice is fine, an error (the server shutting
         * down) or EOF means the connection is gone. */
        PGnotify *n;
        while ((n = PQnotifies(c->pg)))
            PQfreemem(n);
        if (PQstatus(c->pg) == CONNECTION_BAD) {
            conn_close(c, 503, "database connection lost");
            dispatch(db);
        }
        return;
    }
    pool_call *answered = NULL;
    while (c->depth > 0 && !PQisBusy(c->pg)) {
        PGresult *r = PQgetResult(c->pg);
        pool_call *call = c->q_head;
        if (!r) { /* the end of one command's results */
            if (call->cur < call->nsteps && call->steps[call->cur] == STEP_CHECK) {
                c->testing--;
                db->n_tested--;
            }
            if (++call->cur > call->nsteps) { /* libpq and we disagree: give up on it */
                conn_broken(c, "protocol");
                answer_all(answered);
                return;
            }
            continue;
        }
        if (PQresultStatus(r) == PGRES_PIPELINE_SYNC) {
            PQclear(r);
            uint64_t now = pool_now_ns(),
                     from = call->sent_ns > c->last_done_ns ? call->sent_ns : c->last_done_ns;
            if (!call->check_failed)
                stat_update(call->stat, (now - from) / 1000);
            c->last_done_ns = now;
            conn_pop(c);
            arm_call_timer(c);
            call_done(c, call, &answered);
            continue;
        }
        take_result(c, call, r);
    }
    if (PQstatus(c->pg) == CONNECTION_BAD)
        conn_broken(c, "read");
    else if (answered || db->wait_head)
        conn_settle(c);
    answer_all(answered);
}

static void io_cb(evutil_socket_t fd, short what, void *arg)
{
    conn_read(arg);
}

/* After calls ended: a connection with none left goes idle (or closes, or
 * takes the next waiting call); one with room takes waiting calls too. */
static void conn_settle(pool_conn *c)
{
    pool_db *db = c->db;
    if (c->state == CONN_BOUND) {
        publish(db);
        return;
    }
    uint64_t now = pool_now_ns();
    bool stale = c->closing || c->version != db->version || !db->configured ||
                 (db->lifetime_ms > 0 && now - c->opened_ns >= ms_ns(db->lifetime_ms)) ||
                 db->n_open > db->pool_share + db->reserve_share;
    if (stale) {
        c->closing = true;
        if (c->depth == 0) {
            conn_close(c, 503, NULL);
            dispatch(db);
            return;
        }
    }
    if (c->depth == 0 && c->state == CONN_ACTIVE) {
        if (!db->wait_head && others_starving(db)) {
            /* Another worker's calls wait on the shared cap: free the slot. */
            conn_close(c, 503, NULL);
            dispatch(db);
            return;
        }
        leave_state(c);
        idle_push(db, c);
    }
    dispatch(db);
}

/* A connect failed or timed out. The database counts as down only when no
 * usable connection is left (a refused extra connection, say at the server's
 * max_connections, is not an outage); either way growth backs off. */
static void connect_failed(pool_conn *c, const char *reason)
{
    pool_db *db = c->db;
    char why[256]; /* reason may be libpq's, freed with the connection */
    snprintf(why, sizeof why, "%s", reason);
    count_error(db, "connect");
    db->backoff_ms = db->backoff_ms ? db->backoff_ms * 2 : POOL_BACKOFF_MIN_MS;
    if (db->backoff_ms > POOL_BACKOFF_MAX_MS)
        db->backoff_ms = POOL_BACKOFF_MAX_MS;
    db->next_connect_ns = pool_now_ns() + ms_ns(db->backoff_ms);
    conn_close(c, 503, "database unavailable");
    /* Connections of other workers (or ours) still open: not an outage. */
    if (db->n_open - db->n_login > 0 ||
        atomic_load_explicit(&db->sh->server_conns, memory_order_relaxed) > 0) {
        pool_logf(db->p->sh, CONFIG_LOG_DEBUG, "postgres %s: cannot open another connection: %.*s", db->name,
                  first_line(why), why);
        /* The server turns us away (its max_connections, a role's limit)
         * while connections are open: if ours all belong to other workers,
         * they are asked to give idle ones back, as for the shared cap. */
        db->refused = true;
        dispatch(db);
        return;
    }
    if (!db->down)
        pool_logf(db->p->sh, CONFIG_LOG_WARN, "postgres %s: cannot connect: %.*s", db->name, first_line(why),
                  why);
    db->down = true;
    set_state(db, POOL_DB_DOWN);
    /* Calls that no connection will serve are told at once. */
    if (db->n_login == 0)
        fail_waiters(db, 503, "database unavailable");
    publish(db);
}

/* Runs on a thread of its own: PQcancel connects to the server and waits. */
static void *cancel_main(void *arg)
{
    char err[256];
    PQcancel(arg, err, sizeof err);
    PQfreeCancel(arg);
    return NULL;
}

/* Ask the server to cancel what the connection runs, without blocking the loop. */
static void send_cancel(pool_conn *c)
{
    PGcancel *pc = PQgetCancel(c->pg);
    pthread_attr_t attr;
    pthread_t t;
    if (!pc)
        return;
    if (pthread_attr_init(&attr) != 0) {
        PQfreeCancel(pc);
        return;
    }
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &attr, cancel_main, pc) != 0)
        PQfreeCancel(pc);
    pthread_attr_destroy(&attr);
}

/* Answer a call 504 now, although its statement was sent: the call stays
 * on its connection (cancelled) until the server's answer comes. */
static void answer_timed_out(pool_call *call)
{
    pool_result r = {.status = 504, .res = NULL, .error = "query timed out"};
    call->cancelled = true;
    unadmit(call);
    call->done(call->arg, &r);
}

static void conn_timeout(pool_conn *c)
{
    pool_db *db = c->db;
    if (c->state == CONN_LOGIN) {
        char why[96];
        snprintf(why, sizeof why, "connect timed out after %lld ms", (long long)db->connect_ms);
        connect_failed(c, why);
        return;
    }
    uint64_t now = pool_now_ns();
    if (c->cancel_sent && now >= c->grace_ns) {
        /* The server did not give it back in time: drop it. */
        conn_close(c, 504, "query timed out");
        dispatch(db);
        return;
    }
    /* Calls past their deadline (ours, before the server's statement_timeout)
     * are answered now. When the oldest is one of them, the server is asked
     * to cancel it, and the connection keeps its slot under
     * max_db_connections, taking no more calls, until the server has let go
     * of it (or POOL_CANCEL_GRACE_MS passed). */
    pool_call *due[64];
    size_t n = 0;
    for (pool_call *call = c->q_head; call && n < 64; call = call->next) {
        if (call->cancelled || call->due_ns > now)
            continue;
        if (call == c->q_head && !c->cancel_sent) {
            c->cancel_sent = true;
            c->closing = true;
            c->grace_ns = now + ms_ns(POOL_CANCEL_GRACE_MS);
            send_cancel(c);
        }
        count_error(db, "query_timeout");
        call->cancelled = true; /* answered below, after the connection is in order */
        due[n++] = call;
    }
    arm_call_timer(c);
    for (size_t i = 0; i < n; i++) {
        due[i]->cancelled = false;
        answer_timed_out(due[i]);
    }
}

static void timer_cb(evutil_socket_t fd, short what, void *arg)
{
    conn_timeout(arg);
}

static void login_step(pool_conn *c, PostgresPollingStatusType st);

static void login_cb(evutil_socket_t fd, short what, void *arg)
{
    pool_conn *c = arg;
    login_step(c, PQconnectPoll(c->pg));
}

static void login_failed(pool_conn *c)
{
    connect_failed(c, PQerrorMessage(c->pg));
}

static void login_ok(pool_conn *c)
{
    pool_db *db = c->db;
    if (PQsetnonblocking(c->pg, 1) != 0 || PQenterPipelineMode(c->pg) != 1) {
        login_failed(c);
        return;
    }
    event_del(c->io);
    event_assign(c->io, db->p->base, c->fd, EV_READ | EV_PERSIST, io_cb, c);
    event_add(c->io, NULL);
    event_assign(c->wr, db->p->base, c->fd, EV_WRITE, wr_cb, c);
    evtimer_del(c->timer);
    db->down = false;
    db->refused = false;
    db->backoff_ms = 0;
    db->next_connect_ns = 0;
    set_state(db, POOL_DB_UP);
    leave_state(c);
    idle_push(db, c); /* idle since now, for server_idle_timeout */
    c->fresh = true;  /* just logged in: its first call needs no check */
    dispatch(db);
}

static void login_step(pool_conn *c, PostgresPollingStatusType st)
{
    pool_db *db = c->db;
    if (st == PGRES_POLLING_FAILED) {
        login_failed(c);
        return;
    }
    int fd = PQsocket(c->pg);
    if (fd < 0) {
        login_failed(c);
        return;
    }
    c->fd = fd;
    if (st == PGRES_POLLING_OK) {
        login_ok(c);
        return;
    }
    event_del(c->io);
    event_assign(c->io, db->p->base, fd, st == PGRES_POLLING_READING ? EV_READ : EV_WRITE, login_cb, c);
    event_add(c->io, NULL);
}

/* Take a slot of the shared max_db_connections cap. */
static bool take_slot(pool_db *db)
{
    int cur = atomic_load_explicit(&db->sh->server_conns, memory_order_relaxed);
    do {
        if (cur >= db->max_db)
            return false;
    } while (!atomic_compare_exchange_weak_explicit(&db->sh->server_conns, &cur, cur + 1,
                                                    memory_order_relaxed, memory_order_relaxed));
    return true;
}

/* May a connection be opened now? reserve: the oldest call waited past
 * reserve_pool_timeout. Takes a slot of the shared cap when so. */
static bool open_allowed(pool_db *db)
{
    if (!db->configured)
        return false;
    if (pool_now_ns() < db->next_connect_ns)
        return false; /* backing off after a failed connect */
    int limit = db->pool_share;
    if (db->reserve_share > 0 && db->wait_head &&
        pool_now_ns() - db->wait_head->queued_ns >= ms_ns(db->reserve_ms))
        limit += db->reserve_share;
    if (db->n_open >= limit)
        return false;
    if (!take_slot(db)) {
        db->cap_blocked = true;
        return false;
    }
    return true;
}

/* Start a connection (a slot of the shared cap is already taken). */
static void conn_open(pool_db *db)
{
    pool_conn *c = calloc(1, sizeof *c);
    if (c) {
        c->pg = PQconnectStartParams(db->keys, (const char *const *)db->vals, 0);
        c->io = event_new(db->p->base, -1, 0, login_cb, c);
        c->wr = event_new(db->p->base, -1, 0, wr_cb, c);
        c->timer = evtimer_new(db->p->base, timer_cb, c);
    }
    if (!c || !c->pg || !c->io || !c->wr || !c->timer) {
        if (c) {
            PQfinish(c->pg);
            if (c->io)
                event_free(c->io);
            if (c->wr)
                event_free(c->wr);
            if (c->timer)
                event_free(c->timer);
            free(c);
        }
        atomic_fetch_sub_explicit(&db->sh->server_conns, 1, memory_order_relaxed);
        return;
    }
    PQsetNoticeProcessor(c->pg, ignore_notice, NULL);
    c->db = db;
    c->fd = -1;
    c->version = db->version;
    c->opened_ns = pool_now_ns();
    c->state = CONN_LOGIN;
    c->next = db->conns;
    if (db->conns)
        db->conns->prev = c;
    db->conns = c;
    db->n_open++;
    db->n_login++;
    timer_at(c->timer, c->opened_ns + ms_ns(db->connect_ms));
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        login_failed(c);
        return;
    }
    /* Right after PQconnectStart, behave as if PQconnectPoll had said
     * PGRES_POLLING_WRITING. */
    login_step(c, PGRES_POLLING_WRITING);
    publish(db);
}

/* The active connection with the fewest calls in flight and room for one
 * more, or NULL. Only connections whose oldest call is younger than
 * POOL_PIPELINE_MAX_AGE_MS qualify: a call queued behind a slow statement
 * would wait for it unbounded by query_wait_timeout, so behind one that has
 * already taken long it waits in the queue instead. */
static pool_conn *least_busy(pool_db *db)
{
    pool_conn *best = NULL;
    uint64_t now = pool_now_ns();
    for (pool_conn *c = db->conns; c; c = c->next)
        if (c->state == CONN_ACTIVE && !c->closing && c->depth < db->pipeline_depth && c->n_slow == 0 &&
            (!best || c->depth < best->depth) && c->q_head &&
            now - c->q_head->sent_ns < ms_ns(POOL_PIPELINE_MAX_AGE_MS))
            best = c;
    return best;
}

/* Hand waiting calls to busy connections with room (pipelining), to idle
 * ones, or to new ones when allowed; the rest wait. */
static void dispatch(pool_db *db)
{
    db->cap_blocked = false;
    while (db->wait_head) {
        /* A busy connection with room first: the server then runs the next
         * statement without waiting for a wake-up, and fewer server processes
         * share the machine's cores. Then an idle connection, then a new one. */
        pool_conn *c = db->session_mode || db->pipeline_depth < 2 ? NULL : least_busy(db);
        if (!c)
            c = db->idle;
        if (!c) {
            if (db->n_waiting > db->n_login && open_allowed(db)) {
                int before = db->n_open;
                conn_open(db);
                if (db->n_open <= before)
                    break; /* failed at once */
                continue;
            }
            break;
        }
        pool_call *call = db->wait_head;
        queue_remove(db, call);
        if (call->deadline_ns && pool_now_ns() >= call->deadline_ns) {
            /* Never send a call whose request has already given up. */
            count_error(db, "query_timeout");
            call_finish_later(call, 504, "request deadline passed waiting for a server connection");
            continue;
        }
        conn_assign(c, call);
    }
    /* Calls left waiting because the other workers hold every slot of the
     * shared cap: ask them to give idle connections back. */
    bool starving = db->wait_head && !db->idle && (db->cap_blocked || (db->refused && db->n_open == 0));
    if (starving != db->starving) {
        db->starving = starving;
        atomic_fetch_add_explicit(&db->sh->wanted, starving ? 1 : -1, memory_order_relaxed);
    }
    arm_wait_timer(db);
    publish(db);
}

/* ---- maintenance ------------------------------------------------------------------------ */

static void maintain(pool_db *db)
{
    uint64_t now = pool_now_ns();
    /* Idle connections: stale settings, lifetime, idle timeout (above the
     * minimum). Oldest idle are at the bottom of the stack. */
    int keep = db->configured ? db->min_share : 0;
    pool_conn *c = db->conns;
    while (c) {
        pool_conn *next = c->next;
        if (c->state == CONN_IDLE) {
            bool stale = c->version != db->version || !db->configured;
            bool old = db->lifetime_ms > 0 && now - c->opened_ns >= (uint64_t)db->lifetime_ms * 1000000ULL;
            bool idle_long = db->idle_ms > 0 && now - c->idle_ns >= (uint64_t)db->idle_ms * 1000000ULL &&
                             db->n_open > keep;
            /* Over the share or the shared cap (a reload lowered them), or
             * another worker waits on the cap. */
            bool over = db->n_open > db->pool_share + db->reserve_share ||
                        atomic_load_explicit(&db->sh->server_conns, memory_order_relaxed) > db->max_db ||
                        others_starving(db);
            if (stale || old || idle_long || over) {
                conn_close(c, 503, NULL);
            } else if (!c->checked_idle && !c->fresh && db->check_delay_ms >= 0 &&
                       now - c->idle_ns >= (uint64_t)db->check_delay_ms * 1000000ULL) {
                c->checked_idle = true;
                db->n_used++;
            }
        }
        c = next;
    }
    while (db->configured && db->n_open < keep && now >= db->next_connect_ns && !others_starving(db)) {
        if (!take_slot(db))
            break;
        int before = db->n_open;
        conn_open(db);
        if (db->n_open <= before)
            break; /* failed at once */
    }
    dispatch(db);
}

static void tick_cb(evutil_socket_t fd, short what, void *arg)
{
    pool_t *p = arg;
    for (pool_db *db = p->dbs; db; db = db->next)
        maintain(db);
}

/* ---- configuration ------------------------------------------------------------------------ */

static void free_settings(pool_db *db)
{
    for (int i = 0; db->vals[i]; i++) {
        free(db->vals[i]);
        db->vals[i] = NULL;
    }
    free(db->check_query);
    db->check_query = NULL;
}

/* Fill keys/vals from the configuration; true when they differ from before. */
static bool set_settings(pool_db *db, const config_t *cfg, const config_database *d)
{
    char options[64];
    snprintf(options, sizeof options, "-c statement_timeout=%lld", (long long)cfg->postgres.query_timeout_ms);
    const char *pairs[][2] = {
        {"host", d->host},
        {"port", d->port},
        {"dbname", d->dbname},
        {"user", d->user},
        {"password", d->password && *d->password ? d->password : NULL},
        {"application_name", "gateway"},
        {"client_encoding", "UTF8"},
        {"options", options},
        {"gssencmode", "disable"},
        {"keepalives", "1"},
        {"keepalives_idle", "30"},
        {"keepalives_interval", "10"},
        {"keepalives_count", "3"},
    };
    const char *keys[CONN_PARAMS_MAX + 1] = {0};
    char *vals[CONN_PARAMS_MAX + 1] = {0};
    int n = 0;
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++) {
        if (!pairs[i][1])
            continue;
        keys[n] = pairs[i][0];
        vals[n] = strdup(pairs[i][1]);
        n++;
    }
    bool changed = false;
    for (int i = 0; i <= CONN_PARAMS_MAX; i++) {
        if ((keys[i] == NULL) != (db->keys[i] == NULL) || (keys[i] && strcmp(keys[i], db->keys[i]) != 0) ||
            (vals[i] && db->vals[i] && strcmp(vals[i], db->vals[i]) != 0) || (!vals[i] != !db->vals[i]))
            changed = true;
    }
    free_settings(db);
    memcpy(db->keys, keys, sizeof keys);
    memcpy(db->vals, vals, sizeof vals);
    return changed;
}

static pool_db *find_db(pool_t *p, const char *name)
{
    for (pool_db *db = p->dbs; db; db = db->next)
        if (strcmp(db->name, name) == 0)
            return db;
    return NULL;
}

static pool_db *db_create(pool_t *p, const char *name)
{
    pool_shared_db *sd = pool_shared_find(p->sh, name);
    if (!sd)
        return NULL;
    pool_db *db = calloc(1, sizeof *db);
    if (!db)
        return NULL;
    db->name = strdup(name);
    db->wait_timer = evtimer_new(p->base, wait_timer_cb, db);
    if (!db->name || !db->wait_timer) {
        free(db->name);
        if (db->wait_timer)
            event_free(db->wait_timer);
        free(db);
        return NULL;
    }
    db->p = p;
    db->sh = sd;
    db->st = &sd->workers[p->worker];
    const char *labels[1] = {name};
    db->wait_hist = metrics_series(p->shard, p->fam.wait_seconds, labels);
    db->max_gauge = metrics_series(p->shard, p->fam.max_connections, labels);
    db->next = p->dbs;
    p->dbs = db;
    return db;
}

void pool_configure(pool_t *p, const config_t *cfg)
{
    const config_postgres *pg = &cfg->postgres;
    for (pool_db *db = p->dbs; db; db = db->next)
        db->configured = false;
    int workers = p->sh->worker_count;
    for (size_t i = 0; i < pg->database_count; i++) {
        const config_database *d = &pg->databases[i];
        pool_db *db = find_db(p, d->name);
        if (!db)
            db = db_create(p, d->name);
        if (!db) {
            pool_logf(p->sh, CONFIG_LOG_ERROR, "postgres %s: out of memory configuring the pool", d->name);
            continue;
        }
        db->configured = true;
        if (set_settings(db, cfg, d))
            db->version++;
        int64_t size = d->pool_size > 0 ? d->pool_size : pg->default_pool_size;
        int64_t max_db = d->max_db_connections > 0 ? d->max_db_connections : pg->max_db_connections;
        db->pool_share = pool_share(size, workers, p->worker, 1);
        db->min_share = pool_share(pg->min_pool_size, workers, p->worker, 0);
        if (p->worker == 0 && db->min_share < 1)
            db->min_share = 1; /* one connection tells /ready the database is reachable */
        if (db->min_share > db->pool_share)
            db->min_share = db->pool_share;
        db->reserve_share = pool_share(pg->reserve_pool_size, workers, p->worker, 0);
        db->pipeline_depth = (int)pg->pipeline_depth;
        db->max_db = (int)max_db;
        db->session_mode = pg->pool_mode == CONFIG_POOL_SESSION;
        db->wait_ms = pg->query_wait_timeout_ms;
        db->reserve_ms = pg->reserve_pool_timeout_ms;
        db->idle_ms = pg->server_idle_timeout_ms;
        db->lifetime_ms = pg->server_lifetime_ms;
        db->check_delay_ms = pg->server_check_delay_ms;
        db->connect_ms = pg->server_connect_timeout_ms;
        db->query_ms = pg->query_timeout_ms;
        free(db->check_query);
        db->check_query = pg->server_check_query ? strdup(pg->server_check_query) : NULL;
        if (db->max_gauge)
            metrics_gauge_set(db->max_gauge, (double)max_db);
    }
    for (pool_db *db = p->dbs; db; db = db->next)
        maintain(db);
}

/* ---- life cycle ---------------------------------------------------------------------------- */

pool_t *pool_create(struct event_base *base, pool_shared *sh, int worker_id, metrics_shard_t *shard,
                    const pool_metric_families *fam)
{
    pool_t *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->base = base;
    p->sh = sh;
    p->worker = worker_id;
    p->shard = shard;
    p->fam = *fam;
    p->tick = event_new(base, -1, EV_PERSIST, tick_cb, p);
    p->finish_ev = event_new(base, -1, 0, finish_cb, p);
    if (!p->tick || !p->finish_ev) {
        pool_free(p);
        return NULL;
    }
    struct timeval tv = {0, POOL_TICK_MS * 1000};
    event_add(p->tick, &tv);
    return p;
}

void pool_free(pool_t *p)
{
    if (!p)
        return;
    for (pool_db *db = p->dbs; db; db = db->next)
        fail_waiters(db, 503, "shutting down");
    while (p->dbs) {
        pool_db *db = p->dbs;
        p->dbs = db->next;
        while (db->conns)
            conn_close(db->conns, 503, "shutting down");
        if (db->starving)
            atomic_fetch_sub_explicit(&db->sh->wanted, 1, memory_order_relaxed);
        publish(db);
        event_free(db->wait_timer);
        free_settings(db);
        free(db->name);
        free(db);
    }
    if (p->finish_ev)
        finish_cb(-1, 0, p);
    if (p->tick)
        event_free(p->tick);
    if (p->finish_ev)
        event_free(p->finish_ev);
    free(p);
}

/* ---- calls ---------------------------------------------------------------------------------- */

pool_call *pool_exec(pool_t *p, const pool_request *req, pool_done_fn done, void *arg)
{
    pool_call *call = calloc(1, sizeof *call);
    if (!call)
        return NULL;
    call->p = p;
    call->query = req->query;
    call->qhash = hash_text(req->query);
    snprintf(call->stmt, sizeof call->stmt, "gw_%016llx", (unsigned long long)call->qhash);
    call->session = req->session;
    call->deadline_ns = req->deadline_ns;
    call->done = done;
    call->arg = arg;
    call->queued_ns = pool_now_ns();
    if (req->nparams > 0) {
        call->values = calloc((size_t)req->nparams, sizeof *call->values);
        if (!call->values) {
            free(call);
            return NULL;
        }
        call->nparams = req->nparams;
        for (int i = 0; i < req->nparams; i++) {
            if (!req->values[i])
                continue;
            call->values[i] = strdup(req->values[i]);
            if (!call->values[i]) {
                call_free(call);
                return NULL;
            }
        }
    }
    pool_db *db = find_db(p, req->database);
    call->db = db;
    if (db)
        call->stat = stat_find(db, call->qhash);
    if (!db || !db->configured) {
        call_finish_later(call, 500, "unknown database");
        return call;
    }
    uint64_t bytes = 0;
    for (int i = 0; i < call->nparams; i++)
        bytes += call->values[i] ? strlen(call->values[i]) : 0;
    bump(&db->st->received, bytes);

    /* session mode: the owner's bound connection first. */
    if (db->session_mode && call->session) {
        for (pool_conn *c = db->conns; c; c = c->next) {
            if (c->state == CONN_BOUND && c->session == call->session) {
                conn_assign(c, call);
                publish(db);
                return call;
            }
        }
    }
    long admitted = atomic_fetch_add_explicit(&p->sh->clients, 1, memory_order_relaxed);
    call->admitted = true;
    if (admitted >= atomic_load_explicit(&p->sh->max_client_conn, memory_order_relaxed)) {
        count_error(db, "full");
        call_finish_later(call, 503, "too many SQL requests (max_client_conn)");
        return call;
    }
    if (db->down && !db->idle && db->n_login == 0 && pool_now_ns() < db->next_connect_ns) {
        count_error(db, "unavailable");
        call_finish_later(call, 503, "database unavailable");
        return call;
    }
    queue_push(db, call, false);
    dispatch(db);
    return call;
}

void pool_cancel(pool_call *call)
{
    if (!call)
        return;
    call->cancelled = true;
    if (call->waiting) {
        pool_db *db = call->db;
        queue_remove(db, call);
        arm_wait_timer(db);
        publish(db);
        unadmit(call);
        call_free(call);
    }
    /* Running: finished (and freed) when its statement ends. On the finished
     * list: freed there. */
}

void pool_session_end(pool_t *p, const void *session)
{
    for (pool_db *db = p->dbs; db; db = db->next) {
        if (!db->session_mode && !db->n_bound)
            continue;
        for (pool_call *call = db->wait_head; call; call = call->next)
            if (call->session == session)
                call->session = NULL;
        for (pool_conn *c = db->conns; c; c = c->next) {
            /* A call of the session still running: its connection is not to
             * stay bound when it ends. */
            for (pool_call *call = c->q_head; call; call = call->next)
                if (call->session == session)
                    call->session = NULL;
            if (c->state == CONN_BOUND && c->session == session) {
                leave_state(c);
                c->state = CONN_ACTIVE;
                c->session = NULL;
                db->n_active++;
                conn_settle(c);
                break;
            }
        }
    }
}

int pool_sqlstate_status(const char *s)
{
    /* Class 22 codes a bad input value raises when it is converted to the
     * parameter's type; other data exceptions (22012 division by zero, say)
     * are the query's own. */
    static const char *const bad_value[] = {"22001", "22003", "22007", "22008", "22009", "22021",
                                            "22023", "22P02", "22P03", "22P05", "2201B"};
    if (!s || strlen(s) != 5)
        return 500;
    for (size_t i = 0; i < sizeof bad_value / sizeof bad_value[0]; i++)
        if (strcmp(s, bad_value[i]) == 0)
            return 400;
    if (strcmp(s, "23503") == 0 || strcmp(s, "23505") == 0)
        return 409;
    if (strncmp(s, "23", 2) == 0)
        return 400;
    if (strcmp(s, "57014") == 0)
        return 504;
    if (strncmp(s, "08", 2) == 0 || strncmp(s, "53", 2) == 0 || strncmp(s, "40", 2) == 0 ||
        strcmp(s, "57P01") == 0 || strcmp(s, "57P02") == 0 || strcmp(s, "57P03") == 0)
        return 503;
    return 500;
}

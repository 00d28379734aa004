"""The PostgreSQL pool at its edges: pipelining, growth, the max_db_connections
cap and what happens around it, checked from both sides (what clients got, and
what PostgreSQL saw in pg_stat_activity, sampled from a thread).

1. Head-of-line: with pipelining on (pipeline_depth 16), a fast statement is not
   queued behind a slow one on the same server connection.
2. Many slow calls at once grow the pool to its size instead of piling up on a
   few pipelined connections.
3. A connection the server refuses (the role's CONNECTION LIMIT) while the pool
   grows is not "the database is down": no 503, /ready stays 200.
4. More workers than max_db_connections: every worker can still serve (slots
   held idle by other workers are not a dead end).
5. A reload that lowers default_pool_size / max_db_connections brings the
   server connections down to the new cap under load, and calls keep working.
6. The gateway's own deadline (server.request_timeout) answers 504, cancels the
   statements on the server and never lets the cap be exceeded meanwhile.
7. A failing server_check_query does not fail the route: another connection
   is used (or the call retried).
8. client_encoding: the gateway speaks UTF-8 with a LATIN1 database (text
   results and text parameters).
9. SQLSTATE mapping: 22012 (division by zero) is the query's fault -> 500;
   22P02 (bad parameter text) -> 400.

One PostgreSQL cluster for the file, a gateway per test. See the fixture
`postgres` below for why the file starts its own cluster class.
"""

import copy
import http.client
import json
import os
import subprocess
import threading
import time

import pytest

import pg as pgmod
from harness import fresh, gateway_config, wait_until
from pg import (Sampler, APP_USER, PG_BIN, PSQL, Postgres, load_schema, postgres_section, sample_connections,
                sql_literal, sql_route, wait_no_connections)

FAST = "/api/projects/%d"
SLOW = "/api/slow?s=%s"

ROUTES = [
    sql_route("project", "/api/projects/:id", "select id, name from projects where id = $1", params=["path.id"]),
    sql_route("slow", "/api/slow", "select 1 as ok from pg_sleep($1::float8)", params=["query.s"]),
    sql_route("div", "/api/div", "select 100 / $1::int as q", params=["query.d"]),
]

LATIN_DB = "latin"          # the gateway's name for it (postgres.databases)
LATIN_DBNAME = "app_latin1"  # its name on the server


# --- the cluster -------------------------------------------------------------------------------

class _NoEncodingPostgres(Postgres):
    """pg.Postgres, but the postmaster runs without PGCLIENTENCODING.

    pg.py runs every server program (pg_ctl, so the postmaster) with
    PGCLIENTENCODING=UTF8 in the environment. The backend reads that variable
    at start (InitializeGUCOptionsFromEnvironment) and makes it the default
    client_encoding of every session whose client does not send one - which
    would make a gateway that never sets client_encoding look right on a LATIN1
    database (test 8). So this file's postmaster is started through
    `env -u PGCLIENTENCODING`; test 8 checks that premise before relying on it.
    Nothing else in this file depends on it (database app is UTF8 anyway)."""

    def _pg_ctl(self, *args, timeout=pgmod.START_TIMEOUT, check=True):
        return self._run(["env", "-u", "PGCLIENTENCODING", os.path.join(PG_BIN, "pg_ctl"), "-D", str(self.data)]
                         + list(args), timeout + 10, "pg_ctl %s" % " ".join(args), check=check)


@pytest.fixture(scope="module")
def postgres(request):
    """pg.postgres, with _NoEncodingPostgres: one cluster for the file, role and
    database app, the projects table; always stopped and removed afterwards."""
    pgmod._ensure_reporter(request.config)
    pg = _NoEncodingPostgres(name=request.module.__name__.rsplit(".", 1)[-1])
    request.addfinalizer(pg.close)
    pg.setup()
    load_schema(pg)
    return pg


# --- helpers (small ones copied from test_pool.py) ---------------------------------------------

def start_gateway(stack, pg, workers=2, server=None, routes=ROUTES, postgres=None, start=True, **pool):
    srv = {"workers": workers, "request_timeout": "30s", "read_timeout": "30s"}
    srv.update(server or {})
    cfg = gateway_config({}, routes=list(routes), server=srv,
                         postgres=postgres if postgres is not None else postgres_section(pg, **pool))
    return stack.gateway(cfg, start=start)


def call(gw, path, timeout=15, conn=None):
    """GET path: (status, headers, body, seconds). A socket error or timeout is
    status None with the error as body. Uses `conn` (keep-alive) when given."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=timeout)
    t0 = time.monotonic()
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, resp.msg, body, time.monotonic() - t0
    except Exception as e:  # noqa: BLE001 - recorded; the test decides
        return None, None, repr(e).encode(), time.monotonic() - t0
    finally:
        if own:
            conn.close()


def json_or_none(body):
    try:
        return json.loads(body.decode("utf-8"))
    except ValueError:
        return None


def ready_status(gw):
    return fresh("GET", gw.url("/ready"), timeout=3).status_code


def pool_gauges(gw, database="main"):
    m = gw.metrics()
    return {s: m.get("gateway_pool_server_connections", database=database, state=s)
            for s in ("active", "idle", "used", "login")}


def brief(results, n=5):
    """(status, seconds, body) of the first n results, for failure messages."""
    return [(r[0], None if r[3] is None else round(r[3], 3), r[2][:120]) for r in results[:n]]


def concurrent_calls(gw, paths, timeout=15):
    """GET every path from a thread of its own, all released together by a
    barrier: (results in order, wall seconds from the first start to the last end)."""
    results = [None] * len(paths)
    spans = [None] * len(paths)
    barrier = threading.Barrier(len(paths))

    def one(i):
        try:
            barrier.wait(15)
        except threading.BrokenBarrierError:
            pass
        t0 = time.monotonic()
        results[i] = call(gw, paths[i], timeout=timeout)
        spans[i] = (t0, time.monotonic())
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 20)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    wall = max(s[1] for s in spans) - min(s[0] for s in spans)
    return results, wall


def sleeping_backends(pg):
    """app backends running pg_sleep right now: (pid, state, query)."""
    return [a for a in pg.activity() if a[1] == "active" and "pg_sleep" in (a[2] or "")]


def clean_start(pg):
    """Start a test from no app connection at all: statements a previous test's
    gateway left running on the server are ended (they would count against the
    caps and connection limits checked here)."""
    pg.ensure_running()
    pg.psql("select pg_terminate_backend(pid) from pg_stat_activity where usename = %s and pid <> pg_backend_pid()"
            % sql_literal(APP_USER), db="postgres")
    wait_no_connections(pg, timeout=5)
    return pg


def not_ok(results):
    return [r for r in results if r[0] != 200]


def check(problems):
    """Fail with every problem found (a test checks several independent
    properties; one failing must not hide the others)."""
    assert not problems, "%d problem(s):\n- %s" % (len(problems), "\n- ".join(problems))


# --- 1. head-of-line ---------------------------------------------------------------------------

def test_fast_call_not_queued_behind_slow(stack, postgres):
    pg = clean_start(postgres)
    gw = start_gateway(stack, pg, workers=1, default_pool_size=4, pipeline_depth=16, query_wait_timeout="500ms")
    # Warm the route statistics: the slow route once, the fast one a few times.
    status, _, body, _ = call(gw, SLOW % "0.2")
    assert status == 200, "warm-up /api/slow?s=0.2: %s %r" % (status, body[:300])
    for i in range(1, 6):
        status, _, body, _ = call(gw, FAST % i)
        assert status == 200, "warm-up %s: %s %r" % (FAST % i, status, body[:300])

    slow = {}
    t = threading.Thread(target=lambda: slow.update(result=call(gw, SLOW % "2", timeout=10)), daemon=True)
    t.start()
    try:
        wait_until(lambda: sleeping_backends(pg), 3.0, "pg_sleep(2) of /api/slow?s=2 running in pg_stat_activity")
        fast = []
        for i in range(5):
            status, _, body, took = call(gw, FAST % (i + 1), timeout=5)
            fast.append((status, round(took, 3)))
            assert status == 200 and took < 0.3, (
                "fast call %d of 5 (%s) while /api/slow?s=2 ran: status %s after %.3fs (want 200 in < 0.3 s; "
                "query_wait_timeout 500ms): queued behind the slow statement on its server connection? "
                "calls so far %r; body %r" % (i + 1, FAST % (i + 1), status, took, fast, body[:200]))
    finally:
        t.join(10)
    assert slow.get("result") and slow["result"][0] == 200, \
        "/api/slow?s=2 itself failed: %r" % (brief([slow["result"]]) if slow.get("result") else None,)


# --- 2. growth ---------------------------------------------------------------------------------

def test_many_slow_calls_grow_the_pool(stack, postgres):
    pg = clean_start(postgres)
    gw = start_gateway(stack, pg, workers=1, default_pool_size=20, max_db_connections=20)
    status, _, body, _ = call(gw, SLOW % "0.3")  # warm-up: the route's statistics know it is slow
    assert status == 200, "warm-up /api/slow?s=0.3: %s %r" % (status, body[:300])
    with Sampler(pg) as sampler:
        results, wall = concurrent_calls(gw, [SLOW % "0.3"] * 60)
    problems = []
    bad = not_ok(results)
    if bad:
        problems.append("%d of 60 concurrent /api/slow?s=0.3 calls not 200: %r" % (len(bad), brief(bad)))
    if wall >= 3.0:
        problems.append(
            "60 concurrent pg_sleep(0.3) calls took %.2fs with default_pool_size 20 (want < 3 s, ~1 s when the "
            "pool grows to 20; peak app connections %d): calls piled up pipelined on a few connections?"
            % (wall, sampler.peak()))
    if sampler.peak() < 15:
        problems.append("60 concurrent pg_sleep(0.3) calls, default_pool_size 20: app connections in "
                        "pg_stat_activity peaked at %d (want >= 15); samples %r"
                        % (sampler.peak(), sampler.counts()[:60]))
    if sampler.peak() > 20:
        problems.append("max_db_connections 20, yet %d app connections" % sampler.peak())
    check(problems)


# --- 3. a refused connection while growing -----------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_failed_growth_does_not_fail_database(stack, postgres, workers):
    """With two workers, one may hold every connection the role may open: the
    other's calls must still be served (its idle connections handed back)."""
    pg = clean_start(postgres)
    pg.psql("alter role %s connection limit 3" % APP_USER, db="postgres")
    try:
        gw = start_gateway(stack, pg, workers=workers, default_pool_size=10, pipeline_depth=1,
                           query_wait_timeout="5s")
        wait_until(lambda: ready_status(gw) == 200, 5.0, "/ready once the first connection is up")
        lock = threading.Lock()
        results, probes = [], []
        done = threading.Event()

        def client(n):
            for i in range(10):
                r = call(gw, SLOW % "0.1", timeout=15)
                with lock:
                    results.append((n, i) + r)

        def prober():
            t0 = time.monotonic()
            while not done.is_set():
                try:
                    s = ready_status(gw)
                except Exception as e:  # noqa: BLE001 - recorded as a failed probe
                    s = repr(e)
                probes.append((round(time.monotonic() - t0, 2), s))
                done.wait(0.1)
        p = threading.Thread(target=prober, daemon=True)
        p.start()
        clients = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(8)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(30)
        done.set()
        p.join(10)
        assert not any(t.is_alive() for t in clients), "a client thread hung"
    finally:
        pg.psql("alter role %s connection limit -1" % APP_USER, db="postgres")
    problems = []
    if len(results) != 80:
        problems.append("only %d of 80 calls came back" % len(results))
    bad = [r for r in results if r[2] != 200]
    by_status = {}
    for r in bad:
        by_status[r[2]] = by_status.get(r[2], 0) + 1
    if bad:
        problems.append(
            "role app has CONNECTION LIMIT 3, pool wants 10: %d of 80 calls not 200 (by status %r); the refused "
            "connection must not fail calls that the open connections can serve within query_wait_timeout 5s. "
            "first (client, call, status, s, body): %r"
            % (len(bad), by_status, [(r[0], r[1], r[2], round(r[5], 2), r[4][:120]) for r in bad[:5]]))
    not_ready = [pr for pr in probes if pr[1] != 200]
    if len(probes) < 5:
        problems.append("too few /ready probes during the run: %r" % probes)
    elif not_ready:
        problems.append(
            "/ready not 200 on %d of %d probes (every 100 ms) while connections beyond the role's limit were "
            "refused (the database is reachable and serving): (s, status) %r"
            % (len(not_ready), len(probes), not_ready[:10]))
    check(problems)


# --- 4. more workers than the cap ----------------------------------------------------------------

def test_more_workers_than_cap(stack, postgres):
    pg = clean_start(postgres)
    gw = start_gateway(stack, pg, workers=4, default_pool_size=2, max_db_connections=2, query_wait_timeout="2s")
    done = []
    with Sampler(pg) as sampler:
        for i in range(40):
            # A new HTTP connection each time: SO_REUSEPORT spreads them over the 4 workers.
            status, headers, body, took = call(gw, FAST % (i % 100 + 1), timeout=10)
            done.append((status, round(took, 3)))
            if status != 200:
                break  # one failure is enough (and each costs query_wait_timeout)
    problems = []
    if not all(s == 200 for s, _ in done):
        problems.append(
            "workers 4, max_db_connections 2: sequential request %d of 40 (each on a new connection) answered %s "
            "after %.2fs: %r. A worker found the cap taken by other workers' idle connections and waited out "
            "query_wait_timeout 2s? (status, s) so far %r; gateway_pool_server_connections now %r"
            % (len(done), done[-1][0], done[-1][1], body[:200], done, pool_gauges(gw)))
    if sampler.peak() > 2:
        problems.append("max_db_connections 2, yet pg_stat_activity saw %d app connections at (s, count) %r"
                        % (sampler.peak(), sampler.over(2)[:10]))
    check(problems)


# --- 5. reload lowers the cap ---------------------------------------------------------------------

def test_reload_lowers_cap(stack, postgres):
    pg = clean_start(postgres)
    section = dict(default_pool_size=20, max_db_connections=20, min_pool_size=0, query_wait_timeout="10s")
    gw = start_gateway(stack, pg, workers=2, **section)
    assert call(gw, SLOW % "0.3")[0] == 200
    stop = threading.Event()
    lock = threading.Lock()
    results = []

    def client():
        while not stop.is_set():
            r = call(gw, SLOW % "0.3", timeout=20)
            with lock:
                results.append((time.monotonic(),) + r)
    threads = [threading.Thread(target=client, daemon=True) for _ in range(40)]
    with Sampler(pg) as sampler:
        for t in threads:
            t.start()
        try:
            try:
                wait_until(lambda: pg.count_connections() >= 15, 5.0,
                           "precondition: 40 looping pg_sleep(0.3) clients opening >= 15 of the 20 connections")
            except AssertionError as e:
                raise AssertionError("%s; peak so far %d (see test_many_slow_calls_grow_the_pool)"
                                     % (e, sampler.peak()))
            before = pg.count_connections()
            new = copy.deepcopy(gw.config)
            new["postgres"] = postgres_section(pg, **dict(section, default_pool_size=4, max_db_connections=4))
            gw.write_config(new)
            gw.reload("success")
            t_reload = time.monotonic()
            try:
                wait_until(lambda: pg.count_connections() <= 4, 3.0,
                           "at most 4 app connections after a reload to max_db_connections 4 (had %d)" % before)
            except AssertionError as e:
                raise AssertionError("%s; now %r" % (e, pg.activity()))
            t_capped = time.monotonic()
            stop.wait(1.0)  # the load goes on: the cap must hold, not just be touched once
        finally:
            stop.set()
            for t in threads:
                t.join(30)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    late = [(round(t - t_reload, 2), c) for t, c in sampler.samples if c is not None and t > t_capped + 0.1 and c > 4]
    assert not late, "back above the new cap of 4 after reaching it: (s after reload, count) %r" % late[:10]
    bad = [r for r in results if r[1] != 200]
    assert not bad, "%d of %d slow calls around the reload not 200 (query_wait_timeout 10s): %r" % (
        len(bad), len(results), [(round(r[0] - t_reload, 2), r[1], r[3][:120]) for r in bad[:5]])
    for i in range(1, 4):
        status, _, body, _ = call(gw, FAST % i)
        assert status == 200, "fast call after the reload: %s %r" % (status, body[:300])
    assert gw.metrics().get("gateway_pool_max_connections", database="main") == 4, \
        "gateway_pool_max_connections after the reload"


# --- 6. the gateway's own deadline ---------------------------------------------------------------

def test_gateway_deadline_keeps_cap(stack, postgres):
    pg = clean_start(postgres)
    gw = start_gateway(stack, pg, workers=1, server={"request_timeout": "1s"}, query_timeout="10s",
                       default_pool_size=2, max_db_connections=2, query_wait_timeout="500ms")
    problems = []
    try:
        with Sampler(pg) as sampler:
            slow, _ = concurrent_calls(gw, [SLOW % "6"] * 2, timeout=10)
            t_504 = time.monotonic()
            if not all(r[0] == 504 and r[3] < 1.6 for r in slow):
                problems.append("two concurrent /api/slow?s=6 with server.request_timeout 1s (query_timeout 10s): "
                                "want both 504 within ~1.5 s, got %r" % brief(slow))
            fast, sleeping_gone_at, still = [], None, None
            while time.monotonic() - t_504 < 3.0:
                r = call(gw, FAST % 1, timeout=5)
                fast.append((round(time.monotonic() - t_504, 2),) + r)
                if sleeping_gone_at is None:
                    still = sleeping_backends(pg)
                    if not still:
                        sleeping_gone_at = time.monotonic() - t_504
                time.sleep(0.05)
        if sampler.peak() > 2:
            problems.append(
                "max_db_connections 2, yet pg_stat_activity saw %d app connections around the gateway's deadline "
                "at (s since start, count) %r: the timed-out statements' backends were still there while new "
                "connections opened" % (sampler.peak(), sampler.over(2)[:10]))
        odd = [f for f in fast if f[1] not in (200, 503)]
        if odd:
            problems.append("fast calls after the 504s answered neither 200 nor 503: (s, status, body) %r"
                            % [(f[0], f[1], f[3][:120]) for f in odd[:5]])
        no_ra = [f[0] for f in fast if f[1] == 503 and not (f[2].get("Retry-After") or "").strip().isdigit()]
        if no_ra:
            problems.append("503 without Retry-After at %r s after the 504s" % no_ra[:5])
        first_ok = next((f[0] for f in fast if f[1] == 200), None)
        if first_ok is None:
            problems.append(
                "no fast call answered 200 within 3 s of the 504s (%d calls, (s, status): %r): the timed-out "
                "statements were not cancelled, so their connections still hold the cap"
                % (len(fast), [(f[0], f[1]) for f in fast[:10]]))
        else:
            late_503 = [(f[0], f[1]) for f in fast if f[1] == 503 and f[0] > first_ok]
            if late_503:
                problems.append("503 after the cap was free again (first 200 at %.2fs after the 504s): %r"
                                % (first_ok, late_503[:10]))
        if sleeping_gone_at is None:
            problems.append("3 s after the 504s app backends still run pg_sleep(6): %r - the gateway did not "
                            "cancel the statements on the server" % (still,))
        check(problems)
    finally:
        # Whatever happened, no pg_sleep(6) may outlive this test (it would count in the next one).
        pg.psql("select pg_cancel_backend(pid) from pg_stat_activity where usename = %s and state = 'active' "
                "and query like '%%pg_sleep%%' and pid <> pg_backend_pid()" % sql_literal(APP_USER), db="postgres")


# --- 7. a failing server check -----------------------------------------------------------------

def server_log_count(pg, text):
    return pg.log().count(text)


def test_failed_server_check_keeps_route(stack, postgres):
    pg = clean_start(postgres)
    pg.psql("drop table if exists flag; create table flag (v int); insert into flag values (0);", user=APP_USER)
    try:
        gw = start_gateway(stack, pg, workers=1, default_pool_size=2, pipeline_depth=1,
                           server_check_query="select 1/(select 1 - v from flag)", server_check_delay="0s")
        status, _, body, _ = call(gw, FAST % 1)
        assert status == 200, "before the check fails: %s %r" % (status, body[:300])
        failures_before = server_log_count(pg, "division by zero")
        pg.psql("update flag set v = 1")
        for i in range(3):
            status, _, body, took = call(gw, FAST % (i + 2), timeout=10)
            assert status == 200, (
                "call %d of 3 while server_check_query fails (division by zero): %s after %.2fs %r; a failed "
                "check must mean another connection (or a retry), not a failed call" % (i + 1, status, took,
                                                                                     body[:300]))
        assert server_log_count(pg, "division by zero") > failures_before, (
            "premise: server_check_query never failed (no 'division by zero' in the server log) - the check "
            "did not run before reusing an idle connection with server_check_delay 0s")
        pg.psql("update flag set v = 0")
        for i in range(3):
            status, _, body, took = call(gw, FAST % (i + 5), timeout=10)
            assert status == 200, "call %d of 3 after the check passes again: %s after %.2fs %r" % (
                i + 1, status, took, body[:300])
    finally:
        pg.psql("drop table if exists flag", user=APP_USER)


# --- 8. client_encoding --------------------------------------------------------------------------

def session_encoding_without_client_setting(pg, dbname):
    """client_encoding of a session whose client sends none (psql with no
    PGCLIENTENCODING and no terminal): what the server gives by default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    res = subprocess.run([PSQL, "-X", "-At", "-h", pg.socket_dir, "-p", str(pg.port), "-U", pg.superuser, "-d",
                          dbname, "-c", "show client_encoding"], capture_output=True, text=True, timeout=30,
                         env=env, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, "psql show client_encoding failed: %s" % res.stderr
    return res.stdout.strip()


def test_client_encoding_latin1_database(stack, postgres):
    pg = clean_start(postgres)
    pg.psql("drop database if exists %s" % LATIN_DBNAME, db="postgres")
    pg.psql("create database %s owner %s encoding 'LATIN1' lc_collate 'C' lc_ctype 'C' template template0"
            % (LATIN_DBNAME, APP_USER), db="postgres")
    # pg.psql speaks UTF8: the server converts 'café' to LATIN1 for storage.
    pg.psql("create table t (s text); insert into t values ('caf\u00e9');", db=LATIN_DBNAME, user=APP_USER)
    assert pg.scalar("select octet_length(s) from t", db=LATIN_DBNAME) == "4", "'café' not stored as LATIN1"
    enc = session_encoding_without_client_setting(pg, LATIN_DBNAME)
    assert enc == "LATIN1", (
        "premise: a session that sends no client_encoding gets %r, not LATIN1, on the LATIN1 database: the "
        "postmaster's environment (PGCLIENTENCODING) would hide a gateway that never sets client_encoding" % enc)

    routes = ROUTES + [
        sql_route("latin-s", "/latin/s", "select s from t", result="object", database=LATIN_DB),
        sql_route("latin-len", "/latin/len", "select length($1::text) as n", params=["query.v"],
                  database=LATIN_DB),
    ]
    section = postgres_section(pg)
    section["databases"][LATIN_DB] = pg.database_config(dbname=LATIN_DBNAME)
    gw = start_gateway(stack, pg, workers=1, routes=routes, postgres=section, start=False)
    # Nor may the gateway inherit one from the test's environment.
    gw.env.pop("PGCLIENTENCODING", None)
    gw.start()

    problems = []
    status, headers, body, _ = call(gw, "/latin/s")
    if status != 200 or "caf\u00e9".encode("utf-8") not in body or json_or_none(body) != {"s": "caf\u00e9"}:
        problems.append(
            "GET /latin/s (select s from t, 'café' on the LATIN1 database): %s %r; want 200 {\"s\":\"café\"} "
            "with é as UTF-8 (c3 a9): the server connection must use client_encoding UTF8" % (status, body[:200]))
    status, _, body, _ = call(gw, "/latin/len?v=%C3%A9t%C3%A9")
    if status != 200 or json_or_none(body) != {"n": 3}:
        problems.append(
            "GET /latin/len?v=%%C3%%A9t%%C3%%A9 (length('été') on the LATIN1 database): %s %r; want 200 "
            "{\"n\":3} - n 5 means the UTF-8 parameter bytes were taken as LATIN1 characters" % (status, body[:200]))
    check(problems)


# --- 9. SQLSTATE mapping -------------------------------------------------------------------------

def error_problem(status, body, want_status, want_sqlstate, what):
    """None when the answer is want_status with a JSON body carrying
    want_sqlstate (and the status), else what is wrong."""
    doc = json_or_none(body)
    if status != want_status or not isinstance(doc, dict) or doc.get("sqlstate") != want_sqlstate \
            or doc.get("status") != want_status:
        return "%s: expected %d with \"sqlstate\": \"%s\", got %s: %r" % (
            what, want_status, want_sqlstate, status, body[:300])
    if "100 /" in body.decode("utf-8", "replace"):
        return "%s: the query text leaked into the error: %r" % (what, body[:300])
    return None


def test_sqlstate_mapping(stack, postgres):
    pg = clean_start(postgres)
    gw = start_gateway(stack, pg, workers=1)
    status, _, body, _ = call(gw, "/api/div?d=4")
    assert status == 200 and json_or_none(body) == {"q": 25}, "100 / 4: %s %r" % (status, body[:300])
    problems = []
    status, _, body, _ = call(gw, "/api/div?d=0")
    problems.append(error_problem(status, body, 500, "22012", "select 100 / $1::int with d=0 (division by zero: "
                                  "the query's fault, not the parameter's)"))
    status, _, body, _ = call(gw, "/api/div?d=abc")
    problems.append(error_problem(status, body, 400, "22P02", "select 100 / $1::int with d=abc (invalid integer "
                                  "text: the parameter's fault)"))
    check([p for p in problems if p])

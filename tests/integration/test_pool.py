"""The PostgreSQL pool under load and under failure, checked from both sides:
what clients got (status, Retry-After, timing) and what PostgreSQL saw
(pg_stat_activity, sampled every ~50 ms from a thread while the load runs).

- 1000 concurrent clients (wrk -c1000) on a SQL route with default_pool_size 25
  and max_db_connections 100: no error, never more than 100 server connections.
- max_db_connections is a hard cap over all workers together.
- PostgreSQL stopped during load (fast and immediate shutdown): SQL routes answer
  503 with Retry-After within query_wait_timeout, nothing hangs, proxy routes are
  unaffected, /ready says 503; started again: SQL answers 200 within 1 s and
  /ready 200. After the gateway stops, no `app` connection is left.
- query_timeout -> 504 (and the statement really ends on the server),
  query_wait_timeout -> 503, max_client_conn -> 503, each with Retry-After where
  the contract says so.
- /metrics: the pool's gauges, histogram and counters present and consistent with
  pg_stat_activity; min_pool_size connections opened at start.
- pool_mode session keeps a client's backend for its HTTP connection;
  transaction mode shares one backend between clients.

One PostgreSQL cluster for the file (tests that stop it start it again); a
gateway per test.
"""

import http.client
import socket
import json
import os
import re
import resource
import shutil
import subprocess
import threading
import time

import pytest

from harness import fresh, gateway_config, route, upstream_config, wait_until
from pg import Sampler, postgres, postgres_section, sample_connections, sql_route, wait_no_connections  # noqa: F401

WRK = shutil.which("wrk") or "/usr/bin/wrk"

ROUTES = [
    sql_route("project", "/api/projects/:id", "select id, name from projects where id = $1", params=["path.id"]),
    # A query that holds its connection for a little while: makes the pool grow.
    sql_route("work", "/api/work/:id", "select p.id, p.name from projects p, pg_sleep(0.002) where p.id = $1",
              params=["path.id"]),
    sql_route("slow", "/api/slow", "select 1 as ok from pg_sleep($1::float8)", params=["query.s"]),
    sql_route("sleep5", "/api/sleep5", "select 1 as ok from pg_sleep(5)"),
    sql_route("pid", "/api/pid", "select pg_backend_pid() as pid"),
    route("proxy", "up", prefix="/up/"),
]

POOL_STATES = ("active", "idle", "used", "login")


# --- helpers -------------------------------------------------------------------------------

def raise_nofile(want=16384):
    """Make sure this process (and so the gateway and wrk it starts) may open
    `want` files: 1000 clients need 1000+ descriptors on both sides."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < 2500:
        pytest.skip("RLIMIT_NOFILE hard limit %s is too low for 1000 clients" % soft)


def start_gateway(stack, pg, workers=2, server=None, **pool):
    up = stack.upstream()
    srv = {"workers": workers, "request_timeout": "30s", "read_timeout": "30s"}
    srv.update(server or {})
    cfg = gateway_config({"up": upstream_config([up])}, routes=ROUTES, server=srv,
                         postgres=postgres_section(pg, **pool))
    return stack.gateway(cfg), up


def call(gw, path, timeout=15, conn=None):
    """GET path: (status, headers, body, seconds). Uses `conn` (keep-alive) when given."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=timeout)
    t0 = time.monotonic()
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, resp.msg, body, time.monotonic() - t0
    finally:
        if own:
            conn.close()


def assert_retry_after(status, headers, body, took=None):
    assert status == 503, "expected 503, got %d%s: %r" % (
        status, "" if took is None else " after %.2fs" % took, body[:300])
    ra = headers.get("Retry-After")
    assert ra is not None and ra.strip().isdigit(), "503 without a Retry-After in seconds: %r" % ra


def ready_status(gw):
    return fresh("GET", gw.url("/ready"), timeout=3).status_code


def parse_wrk(out):
    res = {"requests": None, "non2xx": 0, "socket_errors": {}, "rps": None}
    m = re.search(r"(\d+) requests in", out)
    if m:
        res["requests"] = int(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        res["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res["rps"] = float(m.group(1))
    return res


def run_wrk(url, connections, duration, threads=2):
    if not os.access(WRK, os.X_OK):
        pytest.skip("wrk is not installed")
    argv = [WRK, "-t%d" % threads, "-c%d" % connections, "-d%ds" % duration, "--timeout", "10s", url]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired:
        raise AssertionError("wrk did not finish within %ds" % (duration + 60))
    assert res.returncode == 0, "wrk failed (%d): %s" % (res.returncode, res.stderr)
    parsed = parse_wrk(res.stdout)
    assert parsed["requests"] is not None, "could not parse wrk output:\n%s" % res.stdout
    parsed["output"] = res.stdout
    return parsed


def pool_gauges(gw, database="main"):
    m = gw.metrics()
    return m, {s: m.get("gateway_pool_server_connections", database=database, state=s) for s in POOL_STATES}


class Load:
    """Keep-alive HTTP clients on threads, each looping GET on `paths` until
    stopped, recording (start, end, status, Retry-After, error) per request.
    A socket error or timeout is recorded as status None with the error."""

    def __init__(self, gw, paths, clients=16, pause=0.01, timeout=8.0):
        self.gw, self.paths, self.pause, self.timeout = gw, paths, pause, timeout
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.records = []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i):
        conn = None
        n = 0
        while not self.stop_event.is_set():
            path = self.paths[(i + n) % len(self.paths)]
            n += 1
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.gw.port, timeout=self.timeout)
            t0 = time.monotonic()
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                rec = (t0, time.monotonic(), resp.status, resp.getheader("Retry-After"), None, path)
                if resp.will_close:
                    conn.close()
                    conn = None
            except Exception as e:  # noqa: BLE001 - recorded; the test decides
                rec = (t0, time.monotonic(), None, None, repr(e), path)
                conn.close()
                conn = None
            with self.lock:
                self.records.append(rec)
            self.stop_event.wait(self.pause)
        if conn is not None:
            conn.close()

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(self.timeout + 5)
        assert not any(t.is_alive() for t in self.threads), "a load client hung"

    def between(self, t_from, t_to=float("inf")):
        """Requests that started at or after t_from and ended before t_to."""
        with self.lock:
            return [r for r in self.records if r[0] >= t_from and r[1] <= t_to]


# --- 1000 clients ------------------------------------------------------------------------------

def test_1000_clients_default_pool(stack, postgres):
    raise_nofile()
    pg = postgres.ensure_running()
    gw, _ = start_gateway(stack, pg, workers=2, default_pool_size=25, max_db_connections=100,
                          max_client_conn=1000, query_wait_timeout="10s")
    status, _, body, _ = call(gw, "/api/work/42")
    assert status == 200, body[:300]
    with Sampler(pg) as sampler:
        res = run_wrk(gw.url("/api/work/42"), connections=1000, duration=6)
    counts = sampler.counts()
    assert len(counts) >= 20, "too few pg_stat_activity samples: %r" % sampler.samples[:10]
    assert res["non2xx"] == 0, "non-2xx answers under 1000 clients:\n%s" % res["output"]
    assert not any(res["socket_errors"].values()), "socket errors under 1000 clients:\n%s" % res["output"]
    assert res["requests"] >= 2000, "suspiciously few requests:\n%s" % res["output"]
    assert sampler.peak() <= 100, "more than max_db_connections=100 server connections: peak %d" % sampler.peak()
    assert sampler.peak() >= 2, "the pool never used more than %d connection(s) under load" % sampler.peak()
    assert gw.running()
    m, gauges = pool_gauges(gw)
    assert all(v is not None for v in gauges.values()), gauges
    assert sum(gauges.values()) <= 100, gauges
    gw.stop()
    wait_no_connections(pg)


def test_max_db_connections_hard_cap_all_workers(stack, postgres):
    """The pool wants more (4 workers x pool and reserve shares) than
    max_db_connections allows: the cap holds over all workers together."""
    raise_nofile()
    pg = postgres.ensure_running()
    cap = 6
    gw, _ = start_gateway(stack, pg, workers=4, default_pool_size=cap, max_db_connections=cap,
                          reserve_pool_size=8, reserve_pool_timeout="10ms", query_wait_timeout="10s")
    peak_metric = [0]

    def metric_sampler(stop):
        while not stop.is_set():
            try:
                _, g = pool_gauges(gw)
                peak_metric[0] = max(peak_metric[0], sum(v or 0 for v in g.values()))
            except Exception:  # noqa: BLE001 - sampling only
                pass
            stop.wait(0.1)
    stop = threading.Event()
    t = threading.Thread(target=metric_sampler, args=(stop,), daemon=True)
    t.start()
    try:
        with Sampler(pg) as sampler:
            res = run_wrk(gw.url("/api/slow?s=0.02"), connections=200, duration=4)
    finally:
        stop.set()
        t.join(10)
    assert res["non2xx"] == 0 and not any(res["socket_errors"].values()), res["output"]
    assert sampler.peak() <= cap, "pg_stat_activity saw %d connections, max_db_connections is %d" % (
        sampler.peak(), cap)
    assert peak_metric[0] <= cap, "gateway_pool_server_connections summed to %d > %d" % (peak_metric[0], cap)
    assert sampler.peak() >= cap - 1, "200 waiting clients, yet only %d of %d connections opened" % (
        sampler.peak(), cap)
    assert gw.metrics().get("gateway_pool_max_connections", database="main") == cap
    gw.stop()
    wait_no_connections(pg)


# --- PostgreSQL going away and coming back -------------------------------------------------------

@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_database_outage_during_load(stack, postgres, mode):
    pg = postgres.ensure_running()
    wait_s = 1.0
    gw, up = start_gateway(stack, pg, workers=2, default_pool_size=6, query_wait_timeout="1s",
                           server_connect_timeout="1s")
    load = Load(gw, ["/api/projects/%d" % i for i in (1, 2, 3, 50)], clients=16).start()
    try:
        stop_event = threading.Event()
        stop_event.wait(1.0)
        before = load.between(0)
        assert before and all(r[2] == 200 for r in before), "errors before the outage: %r" % [
            r for r in before if r[2] != 200][:5]
        assert ready_status(gw) == 200

        pg.stop(mode=mode)
        t_down = time.monotonic()
        # While it is down: SQL 503 quickly, proxy unaffected, /ready 503.
        wait_until(lambda: ready_status(gw) == 503, 3.0, "/ready answering 503 while PostgreSQL is down")
        for i in range(5):
            r = fresh("GET", gw.url("/up/echo/outage-%d" % i), timeout=5)
            assert r.status_code == 200, "a proxy route failed while PostgreSQL was down: %d" % r.status_code
            assert r.json()["path"] == "/up/echo/outage-%d" % i
        assert fresh("GET", gw.url("/live"), timeout=3).status_code == 200
        status, headers, body, took = call(gw, "/api/projects/7")
        assert_retry_after(status, headers, body, took)
        assert took <= wait_s + 1.0, "503 took %.2fs, query_wait_timeout is %.1fs" % (took, wait_s)
        stop_event.wait(max(0.0, t_down + 2.0 - time.monotonic()))
        t_restart = time.monotonic()

        pg.start()
        t_up = time.monotonic()
        wait_until(lambda: call(gw, "/api/projects/1", timeout=3)[0] == 200, 1.0,
                   "a SQL route answering 200 after PostgreSQL accepts connections again")
        wait_until(lambda: ready_status(gw) == 200, 2.0, "/ready answering 200 once PostgreSQL is back")
        stop_event.wait(max(0.0, t_up + 1.8 - time.monotonic()))
    finally:
        load.stop()

    records = load.between(0)
    errors = [r for r in records if r[2] is None]
    assert not errors, "requests failed at the socket level (hang or reset): %r" % errors[:5]
    odd = [r for r in records if r[2] not in (200, 503)]
    assert not odd, "statuses other than 200/503: %r" % odd[:5]
    no_ra = [r for r in records if r[2] == 503 and not (r[3] or "").strip().isdigit()]
    assert not no_ra, "503 without Retry-After: %r" % no_ra[:5]
    slow = [r for r in records if r[1] - r[0] > wait_s + 1.0]
    assert not slow, "requests took longer than query_wait_timeout + 1 s: %r" % [
        (round(r[1] - r[0], 2), r[2]) for r in slow[:5]]
    down = load.between(t_down, t_restart)
    assert len(down) >= 10, "too few requests while PostgreSQL was down: %d" % len(down)
    assert all(r[2] == 503 for r in down), "answers other than 503 while PostgreSQL was down: %r" % [
        r for r in down if r[2] != 503][:5]
    after = load.between(t_up + 1.0)
    assert after, "no requests after recovery"
    assert all(r[2] == 200 for r in after), "not 200 more than 1 s after PostgreSQL came back: %r" % [
        (round(r[0] - t_up, 2), r[2]) for r in after if r[2] != 200][:5]
    assert gw.running()
    gw.stop()
    wait_no_connections(pg)


def test_ready_follows_database(stack, postgres):
    pg = postgres.ensure_running()
    gw, _ = start_gateway(stack, pg, workers=2, query_wait_timeout="500ms", server_connect_timeout="1s")
    assert call(gw, "/api/projects/1")[0] == 200
    wait_until(lambda: ready_status(gw) == 200, 3.0, "/ready 200 with PostgreSQL up")
    pg.stop()
    status, headers, body, took = call(gw, "/api/projects/1")
    assert_retry_after(status, headers, body, took)
    assert took <= 1.5, "503 took %.2fs with query_wait_timeout 500ms" % took
    wait_until(lambda: ready_status(gw) == 503, 3.0, "/ready 503 with PostgreSQL down")
    assert fresh("GET", gw.url("/live"), timeout=3).status_code == 200, "/live must not follow the database"
    assert fresh("GET", gw.url("/up/echo/x"), timeout=5).status_code == 200
    pg.start()
    t_up = time.monotonic()
    wait_until(lambda: call(gw, "/api/projects/1", timeout=3)[0] == 200, 1.0,
               "SQL 200 within 1 s of PostgreSQL accepting connections")
    wait_until(lambda: ready_status(gw) == 200, 2.0, "/ready 200 once PostgreSQL is back")
    assert time.monotonic() - t_up < 3.0
    gw.stop()
    wait_no_connections(pg)


def test_gateway_starts_with_database_down(stack, postgres):
    """No database at start-up is not fatal: SQL routes 503, the rest works,
    and everything recovers when PostgreSQL comes."""
    pg = postgres.ensure_running()
    pg.stop()
    gw, _ = start_gateway(stack, pg, workers=1, query_wait_timeout="300ms", server_connect_timeout="1s",
                          min_pool_size=1)
    assert fresh("GET", gw.url("/up/echo/y"), timeout=5).status_code == 200
    status, headers, body, took = call(gw, "/api/projects/1")
    assert_retry_after(status, headers, body)
    wait_until(lambda: ready_status(gw) == 503, 3.0, "/ready 503 while the database is unreachable")
    pg.start()
    wait_until(lambda: call(gw, "/api/projects/1", timeout=3)[0] == 200, 1.0, "SQL 200 once PostgreSQL is up")
    wait_until(lambda: ready_status(gw) == 200, 2.0, "/ready 200 once PostgreSQL is up")
    gw.stop()
    wait_no_connections(pg)


# --- timeouts and limits ----------------------------------------------------------------------------

def test_query_timeout_504(stack, postgres):
    pg = postgres.ensure_running()
    gw, _ = start_gateway(stack, pg, workers=1, query_timeout="500ms", default_pool_size=2)
    status, headers, body, took = call(gw, "/api/sleep5")
    assert status == 504, "expected 504 past query_timeout, got %d: %r" % (status, body[:300])
    assert headers.get("Content-Type", "").startswith("application/json"), body[:300]
    assert 0.4 <= took <= 1.5, "504 after %.2fs with query_timeout 500ms" % took
    # The statement ended on the server too (statement_timeout), not just for the client.
    wait_until(lambda: not [a for a in pg.activity() if a[1] == "active" and "pg_sleep(5)" in (a[2] or "")],
               2.0, "the timed-out statement gone from pg_stat_activity")
    for i in range(1, 6):
        status, _, body, _ = call(gw, "/api/projects/%d" % i)
        assert status == 200, "the pool did not recover after a timeout: %d %r" % (status, body[:300])
    status, _, body, took = call(gw, "/api/slow?s=0.2")
    assert status == 200 and took < 1.5, (status, took)


def test_query_wait_timeout_503(stack, postgres):
    pg = postgres.ensure_running()
    gw, _ = start_gateway(stack, pg, workers=1, default_pool_size=1, max_db_connections=1,
                          query_wait_timeout="300ms")
    errors_before = gw.metrics().sum("gateway_pool_errors_total", database="main")
    slow = {}

    def occupy():
        slow["result"] = call(gw, "/api/slow?s=2", timeout=10)
    t = threading.Thread(target=occupy, daemon=True)
    t.start()
    try:
        wait_until(lambda: [a for a in pg.activity() if a[1] == "active" and "pg_sleep" in (a[2] or "")], 3.0,
                   "the slow query running on the only server connection")
        status, headers, body, took = call(gw, "/api/projects/1")
        assert_retry_after(status, headers, body, took)
        assert 0.25 <= took <= 1.3, "503 after %.2fs with query_wait_timeout 300ms" % took
        assert pg.count_connections() == 1, "max_db_connections 1, yet %r" % pg.activity()
    finally:
        t.join(15)
    assert slow.get("result") and slow["result"][0] == 200, "the slow query itself failed: %r" % (slow,)
    assert call(gw, "/api/projects/1")[0] == 200
    m = gw.metrics()
    assert m.sum("gateway_pool_errors_total", database="main") > errors_before, \
        "a wait timeout must count in gateway_pool_errors_total"
    assert m.types.get("gateway_pool_errors_total") == "counter", m.types.get("gateway_pool_errors_total")
    assert m.value("gateway_pool_wait_seconds_count", database="main") >= 2


def test_max_client_conn_503(stack, postgres):
    pg = postgres.ensure_running()
    gw, _ = start_gateway(stack, pg, workers=1, max_client_conn=5, default_pool_size=1, max_db_connections=1,
                          query_wait_timeout="5s")
    results = []
    lock = threading.Lock()

    def one():
        r = call(gw, "/api/slow?s=0.5", timeout=15)
        with lock:
            results.append(r)
    threads = [threading.Thread(target=one, daemon=True) for _ in range(5)]
    for t in threads:
        t.start()
    try:
        def admitted():
            m = gw.metrics()
            return (m.value("gateway_pool_client_requests", database="main", state="active")
                    + m.value("gateway_pool_client_requests", database="main", state="waiting")) >= 5
        wait_until(admitted, 3.0, "5 SQL requests admitted (gateway_pool_client_requests active + waiting)")
        status, headers, body, took = call(gw, "/api/projects/1")
        assert_retry_after(status, headers, body, took)
        assert took < 1.0, "a request over max_client_conn must be refused at once, took %.2fs" % took
        r = fresh("GET", gw.url("/up/echo/not-sql"), timeout=5)
        assert r.status_code == 200, "max_client_conn must not limit proxy routes"
    finally:
        for t in threads:
            t.join(15)
    assert len(results) == 5 and all(r[0] == 200 for r in results), [(r[0], r[2][:100]) for r in results]
    assert call(gw, "/api/projects/1")[0] == 200


# --- metrics ---------------------------------------------------------------------------------------

def test_pool_metrics(stack, postgres):
    pg = postgres.ensure_running()
    gw, _ = start_gateway(stack, pg, workers=2, default_pool_size=6, max_db_connections=20, min_pool_size=2)
    wait_until(lambda: pg.count_connections() >= 2, 3.0, "min_pool_size=2 connections opened at start")
    for i in range(1, 51):
        assert call(gw, "/api/projects/%d" % i)[0] == 200
    m, gauges = pool_gauges(gw)
    for name, kind in (("gateway_pool_server_connections", "gauge"), ("gateway_pool_client_requests", "gauge"),
                       ("gateway_pool_max_connections", "gauge"), ("gateway_pool_wait_seconds", "histogram")):
        assert m.types.get(name) == kind, "# TYPE %s: %r, expected %s" % (name, m.types.get(name), kind)
    assert all(v is not None and v >= 0 for v in gauges.values()), "server connection states: %r" % gauges
    assert 2 <= sum(gauges.values()) <= 20, gauges
    assert m.get("gateway_pool_max_connections", database="main") == 20
    # Idle now: nothing active or waiting, and the gateway's count agrees with PostgreSQL's.
    wait_until(lambda: (lambda mm: mm.value("gateway_pool_client_requests", -1, database="main", state="active")
                        == 0 and mm.value("gateway_pool_client_requests", -1, database="main", state="waiting")
                        == 0)(gw.metrics()),
               2.0, "gateway_pool_client_requests active and waiting 0 when idle")

    def agree():
        _, g = pool_gauges(gw)
        return sum(v or 0 for v in g.values()) == pg.count_connections() and g["active"] == 0
    wait_until(agree, 3.0, "gateway_pool_server_connections summing to pg_stat_activity's count")
    # The wait histogram: one observation per request at least, buckets cumulative.
    m = gw.metrics()
    count = m.get("gateway_pool_wait_seconds_count", database="main")
    assert count is not None and count >= 50, count
    assert m.get("gateway_pool_wait_seconds_sum", database="main") >= 0
    buckets = sorted(((float(lab["le"]), v) for lab, v in m.series("gateway_pool_wait_seconds_bucket",
                                                                    database="main")), key=lambda x: x[0])
    assert buckets and buckets[-1][0] == float("inf") and buckets[-1][1] == count, buckets[-3:]
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), "buckets not cumulative: %r" % buckets
    gw.stop()
    wait_no_connections(pg)


# --- pool modes --------------------------------------------------------------------------------------

def pid_of(gw, conn):
    status, _, body, _ = call(gw, "/api/pid", conn=conn)
    assert status == 200, body[:300]
    return json.loads(body)["pid"]


def test_session_mode_keeps_backend_per_connection(stack, postgres):
    pg = postgres.ensure_running()
    gw, _ = start_gateway(stack, pg, workers=1, pool_mode="session", default_pool_size=4)
    a = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    b = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        pids_a = [pid_of(gw, a) for _ in range(5)]
        pids_b = [pid_of(gw, b) for _ in range(5)]
        pids_a += [pid_of(gw, a) for _ in range(3)]
    finally:
        a.close()
        b.close()
    assert len(set(pids_a)) == 1, "session mode: one HTTP connection's requests ran on backends %r" % pids_a
    assert len(set(pids_b)) == 1, "session mode: one HTTP connection's requests ran on backends %r" % pids_b
    assert pids_a[0] != pids_b[0], "two open sessions shared backend %s" % pids_a[0]
    backends = {int(r[0]) for r in pg.activity()}
    assert pids_a[0] in backends, "pg_backend_pid %s not among app's backends %r" % (pids_a[0], backends)


def test_session_mode_holds_connection_until_client_leaves(stack, postgres):
    pg = postgres.ensure_running()
    gw, _ = start_gateway(stack, pg, workers=1, pool_mode="session", default_pool_size=1, max_db_connections=1,
                          query_wait_timeout="300ms")
    a = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        pid_a = pid_of(gw, a)
        status, headers, body, took = call(gw, "/api/pid", timeout=5)
        assert_retry_after(status, headers, body, took)   # the only server connection belongs to a's session
        assert pid_of(gw, a) == pid_a
    finally:
        a.close()
    wait_until(lambda: call(gw, "/api/pid", timeout=3)[0] == 200, 3.0,
               "the session's server connection given back after its client closed")
    assert pg.count_connections() == 1


def test_session_mode_client_leaves_during_statement(stack, postgres):
    """A session whose client goes away while its statement runs must not keep
    the server connection bound once the statement ends."""
    pg = postgres.ensure_running()
    gw, _ = start_gateway(stack, pg, workers=1, pool_mode="session", default_pool_size=1, max_db_connections=1,
                          query_wait_timeout="3s")
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    sock.sendall(b"GET /api/slow?s=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: [a for a in pg.activity() if a[1] == "active" and "pg_sleep" in (a[2] or "")], 3.0,
               "the slow statement running")
    sock.close()  # gone before its answer
    status, _, body, took = call(gw, "/api/pid", timeout=10)
    assert status == 200, "the only server connection stayed bound to a closed session: %d %r" % (status, body[:200])
    assert took < 2.0, "waited %.2fs for a connection the closed session should have given back" % took
    _, gauges = pool_gauges(gw)
    assert gauges["active"] == 0 and gauges["idle"] == 1, "after both requests: %r" % gauges


def test_transaction_mode_shares_backend(stack, postgres):
    pg = postgres.ensure_running()
    gw, _ = start_gateway(stack, pg, workers=1, pool_mode="transaction", default_pool_size=1,
                          max_db_connections=1)
    a = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    b = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        pids = []
        for _ in range(3):
            pids.append(pid_of(gw, a))
            pids.append(pid_of(gw, b))
    finally:
        a.close()
        b.close()
    assert len(set(pids)) == 1, "transaction mode, pool of 1: clients must take turns on one backend: %r" % pids

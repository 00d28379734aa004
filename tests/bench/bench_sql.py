#!/usr/bin/python3
"""bench_sql.py - a SQL route through the gateway's pool against pgbench hitting
PostgreSQL directly: the same point select, same machine, same run.

A program that prints figures, not a test. It starts, in scratch directories on
loopback ports:
  * PostgreSQL (tests/integration/pg.py: a throw-away cluster, fsync off, run as
    an unprivileged user when we are root), loaded with `pgbench -i -s SCALE`;
  * the gateway with W workers and one route,
        GET /accounts/:aid -> select abalance from pgbench_accounts where aid = $1
    (result: object), its pool in transaction mode.
Then, for R rounds, alternating which side goes first:
  * (a) `pgbench -S -M prepared -T D -c C -j 2 -n` at each client count C of
    --clients (over TCP to 127.0.0.1 with a password, the path the gateway takes;
    --pgbench-socket uses the Unix socket instead), its tps;
  * (b) `wrk -tT -cN -dD` against the route at each connection count N of
    --connections, a random aid per request (a Lua script in the scratch
    directory; its done() hook prints P50/P95/P99 and the error counts).
It prints every run, the median per client/connection count, each side's best
median and the ratio gateway/pgbench of the bests (>= 1.00: the gateway serves
at least as many point selects per second as pgbench reaches alone), and the
paired per-round ratio. Finally one run with --big-clients (1000) wrk
connections: req/s, P50/P95/P99, errors, and the peak of server connections that
pg_stat_activity showed (sampled every 50 ms) against max_db_connections.

Everything it starts is stopped on the way out, on errors and Ctrl-C too. All
traffic stays on 127.0.0.1. Time is bounded: about
rounds * (len(clients) + len(connections)) * (duration + 2) + duration + init s.

Usage:
  tests/bench/bench_sql.py [--workers 1] [--rounds 3] [--duration 5] [--scale 10]
                           [--clients 4,8,16,32] [--connections 8,16,32,64,128]
                           [--big-clients 1000] [--pool-size 25] [--max-db 100]
                           [--threads 2] [--gateway build/gateway] [--keep]
On a 2-core machine keep --workers 1: wrk and pgbench need a core too.
"""

import argparse
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE_DIR = Path(os.environ.get("GATEWAY_SOURCE_DIR") or HERE.parents[1])
sys.path.insert(0, str(SOURCE_DIR / "tests" / "integration"))
sys.path.insert(0, str(HERE))

import pg as pgmod  # noqa: E402
from bench_proxy import Proc, free_port  # noqa: E402

DEFAULT_GATEWAY = os.environ.get("GATEWAY_BIN") or str(SOURCE_DIR / "build" / "gateway")
START_TIMEOUT = 15.0

LUA = """\
-- bench_sql.py: a random pgbench_accounts aid per request; figures printed by done().
local naccounts = %(naccounts)d
local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() * 1000 + (tid or 0) * 7919)
end

function request()
  return wrk.format("GET", "/accounts/" .. math.random(1, naccounts))
end

function done(summary, latency, requests)
  io.write(string.format("BENCH latency_us p50=%%d p95=%%d p99=%%d max=%%d\\n",
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
  local e = summary.errors
  io.write(string.format("BENCH counts requests=%%d connect=%%d read=%%d write=%%d timeout=%%d status=%%d\\n",
    summary.requests, e.connect, e.read, e.write, e.timeout, e.status))
end
"""


def http_get(port, path, timeout=2.0):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an env proxy
    try:
        with opener.open("http://127.0.0.1:%d%s" % (port, path), timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def start_gateway(scratch, gateway, port, pg, args):
    conf = scratch / "gateway.yaml"
    conf.write_text("""\
server:
  listen: "127.0.0.1:%d"
  workers: %d
  read_timeout: 30s
  request_timeout: 30s
  drain_timeout: 5s
log:
  level: warn
  format: json
  access: false
postgres:
  databases:
    main: {host: 127.0.0.1, port: "%d", dbname: %s, user: %s, password: %s}
  pool_mode: transaction
  max_client_conn: %d
  default_pool_size: %d
  max_db_connections: %d
  query_wait_timeout: 10s
  query_timeout: 10s
upstreams: {}
routes:
  - name: account
    match: { path: "/accounts/:aid", methods: [GET] }
    sql:
      database: main
      query: "select abalance from pgbench_accounts where aid = $1"
      params: [path.aid]
      result: object
""" % (port, args.workers, pg.port, pgmod.APP_DB, pgmod.APP_USER, pgmod.APP_PASSWORD,
       max(args.big_clients, max(args.connections)) + 100, args.pool_size, args.max_db))
    p = Proc("gateway", [gateway, "-c", str(conf)], scratch)
    deadline = time.monotonic() + START_TIMEOUT
    last = None
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError("gateway exited with %s during start-up:\n%s" % (p.returncode, p.stderr_tail()))
        try:
            status, body = http_get(port, "/accounts/1")
            if status == 200:
                return p, body
            last = "%d %r" % (status, body[:200])
        except Exception as e:  # noqa: BLE001 - not up yet
            last = repr(e)
        time.sleep(0.05)
    raise RuntimeError("gateway did not answer GET /accounts/1 with 200 within %.0fs (last: %s)\n%s"
                       % (START_TIMEOUT, last, p.stderr_tail()))


def run_pgbench(pg, clients, duration, socket):
    res = pg.pgbench(["-S", "-M", "prepared", "-n", "-T", str(duration), "-c", str(clients), "-j", "2"],
                     timeout=duration + 60, tcp=not socket)
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", res.stdout)
    lat = re.search(r"latency average = ([\d.]+) ms", res.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", res.stdout)
    if not m:
        raise RuntimeError("could not parse pgbench output:\n%s\n%s" % (res.stdout, res.stderr))
    return {"rps": float(m.group(1)), "avg_ms": float(lat.group(1)) if lat else float("nan"),
            "errors": int(failed.group(1)) if failed else 0}


def run_wrk(wrk, script, port, threads, connections, duration):
    threads = min(threads, connections)
    argv = [wrk, "-t%d" % threads, "-c%d" % connections, "-d%ds" % duration, "--timeout", "10s", "-s", str(script),
            "http://127.0.0.1:%d/" % port]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired:
        raise RuntimeError("wrk did not finish within %ds" % (duration + 60))
    if res.returncode != 0:
        raise RuntimeError("wrk failed (%d): %s" % (res.returncode, res.stderr.strip()))
    out = res.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    lat = re.search(r"BENCH latency_us p50=(\d+) p95=(\d+) p99=(\d+) max=(\d+)", out)
    cnt = re.search(r"BENCH counts requests=(\d+) connect=(\d+) read=(\d+) write=(\d+) timeout=(\d+) status=(\d+)",
                    out)
    if not (rps and lat and cnt):
        raise RuntimeError("could not parse wrk output:\n" + out)
    p50, p95, p99, mx = (int(x) / 1000.0 for x in lat.groups())
    c = [int(x) for x in cnt.groups()]
    return {"rps": float(rps.group(1)), "p50": p50, "p95": p95, "p99": p99, "max": mx, "requests": c[0],
            "socket_errors": sum(c[1:5]), "non2xx": c[5]}


class PeakSampler:
    def __init__(self, pg):
        self.stop_event = threading.Event()
        self.samples = []
        self.thread = threading.Thread(target=lambda: self.samples.extend(
            pgmod.sample_connections(pg, self.stop_event, 0.05)), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(30)

    def peak(self):
        return max((c for _, c in self.samples if c is not None), default=0)


def ints(text):
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected a comma-separated list of integers: %r" % text)
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError("expected positive integers: %r" % text)
    return vals


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=1, help="gateway workers (default 1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5, help="seconds per pgbench/wrk run")
    ap.add_argument("--scale", type=int, default=10, help="pgbench -i -s (100000 accounts per unit)")
    ap.add_argument("--clients", type=ints, default=[4, 8, 16, 32], help="pgbench client counts")
    ap.add_argument("--connections", type=ints, default=[8, 16, 32, 64, 128], help="wrk connection counts")
    ap.add_argument("--big-clients", type=int, default=1000, help="the final many-clients run (0: skip)")
    ap.add_argument("--pool-size", type=int, default=25, help="postgres.default_pool_size")
    ap.add_argument("--max-db", type=int, default=100, help="postgres.max_db_connections")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--pgbench-socket", action="store_true", help="pgbench over the Unix socket, not TCP")
    ap.add_argument("--gateway", default=DEFAULT_GATEWAY)
    ap.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directories (logs, configs)")
    args = ap.parse_args()

    for path, what in ((args.gateway, "gateway"), (args.wrk, "wrk"),
                       (os.path.join(pgmod.PG_BIN, "pgbench"), "pgbench")):
        if not os.access(path, os.X_OK):
            sys.exit("bench_sql: %s not found or not executable: %s" % (what, path))
    if args.rounds < 1 or args.duration < 1 or args.scale < 1 or args.pool_size > args.max_db:
        sys.exit("bench_sql: need rounds, duration, scale >= 1 and pool-size <= max-db")
    if args.max_db > 250:
        sys.exit("bench_sql: --max-db at most 250 (the test cluster has max_connections 300)")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * max(args.big_clients, max(args.connections)) + 1024
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard),
                                                    hard))

    def interrupted(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    scratch = Path(tempfile.mkdtemp(prefix="bench-sql-"))
    pg = pgmod.Postgres(name="bench")
    gw = None
    status = 0
    runs = len(args.clients) + len(args.connections)
    estimate = args.rounds * runs * (args.duration + 2) + (args.duration + 3 if args.big_clients else 0) \
        + 2 * args.scale + 10
    print("bench_sql: gateway workers %d, pool %d (max %d), scale %d, %d rounds x %d runs of %ds, ~%ds; scratch %s, %s"
          % (args.workers, args.pool_size, args.max_db, args.scale, args.rounds, runs, args.duration, estimate,
             scratch, pg.scratch), flush=True)
    try:
        pg.setup()
        t = time.monotonic()
        pg.pgbench(["-i", "-s", str(args.scale), "-q"], timeout=120 + 30 * args.scale)
        naccounts = int(pg.scalar("select count(*) from pgbench_accounts"))
        print("pgbench -i -s %d: %d accounts in %.1fs" % (args.scale, naccounts, time.monotonic() - t), flush=True)

        script = scratch / "random_aid.lua"
        script.write_text(LUA % {"naccounts": naccounts})
        gw_port = free_port()
        gw, body = start_gateway(scratch, args.gateway, gw_port, pg, args)
        print("gateway answers GET /accounts/1: %s" % body.decode(errors="replace").strip(), flush=True)
        status_code, body = http_get(gw_port, "/accounts/%d" % naccounts)
        if status_code != 200:
            raise RuntimeError("GET /accounts/%d: %d %r" % (naccounts, status_code, body[:200]))

        # Warm-up: both sides, short.
        run_pgbench(pg, args.clients[0], 1, args.pgbench_socket)
        run_wrk(args.wrk, script, gw_port, args.threads, args.connections[0], 1)

        pgb = {c: [] for c in args.clients}
        gwr = {c: [] for c in args.connections}
        best_per_round = []
        print("\n  %-22s %12s %10s %10s %10s" % ("run", "req/s", "P50 ms", "P99 ms", "errors"))
        for rnd in range(args.rounds):
            order = ["pgbench", "gateway"] if rnd % 2 == 0 else ["gateway", "pgbench"]
            bests = {}
            for side in order:
                if gw.poll() is not None:
                    raise RuntimeError("the gateway died (exit %s):\n%s" % (gw.returncode, gw.stderr_tail()))
                if side == "pgbench":
                    for c in args.clients:
                        r = run_pgbench(pg, c, args.duration, args.pgbench_socket)
                        pgb[c].append(r)
                        bests["pgbench"] = max(bests.get("pgbench", 0), r["rps"])
                        print("  %-22s %12.0f %10s %10s %10d   (latency avg %.3f ms)" % (
                            "pgbench -c%d #%d" % (c, rnd + 1), r["rps"], "-", "-", r["errors"], r["avg_ms"]),
                            flush=True)
                else:
                    for n in args.connections:
                        r = run_wrk(args.wrk, script, gw_port, args.threads, n, args.duration)
                        gwr[n].append(r)
                        bests["gateway"] = max(bests.get("gateway", 0), r["rps"])
                        print("  %-22s %12.0f %10.3f %10.3f %10d" % (
                            "gateway -c%d #%d" % (n, rnd + 1), r["rps"], r["p50"], r["p99"],
                            r["non2xx"] + r["socket_errors"]), flush=True)
            best_per_round.append(bests)

        print("\n  %-22s %12s %10s %10s" % ("median", "req/s", "P50 ms", "P99 ms"))
        med_pgb = {c: statistics.median(r["rps"] for r in rs) for c, rs in pgb.items()}
        for c in args.clients:
            print("  %-22s %12.0f" % ("pgbench -c%d" % c, med_pgb[c]))
        med_gw = {}
        for n in args.connections:
            rs = gwr[n]
            med_gw[n] = statistics.median(r["rps"] for r in rs)
            print("  %-22s %12.0f %10.3f %10.3f" % ("gateway -c%d" % n, med_gw[n],
                                                    statistics.median(r["p50"] for r in rs),
                                                    statistics.median(r["p99"] for r in rs)))
        best_c = max(med_pgb, key=med_pgb.get)
        best_n = max(med_gw, key=med_gw.get)
        print("\n  best pgbench:  %10.0f tps    (-c%d, direct to PostgreSQL over %s)" % (
            med_pgb[best_c], best_c, "the Unix socket" if args.pgbench_socket else "TCP"))
        print("  best gateway:  %10.0f req/s  (wrk -c%d, HTTP -> pool -> PostgreSQL over TCP)" % (
            med_gw[best_n], best_n))
        print("  gateway/pgbench: %.2f" % (med_gw[best_n] / med_pgb[best_c] if med_pgb[best_c] else float("nan")))
        paired = [b["gateway"] / b["pgbench"] for b in best_per_round if b.get("pgbench")]
        if paired:
            print("  paired median:   %.2f   (per round, best of each side: %s)" % (
                statistics.median(paired), " ".join("%.2f" % x for x in paired)))
        errors = sum(r["non2xx"] + r["socket_errors"] for rs in gwr.values() for r in rs)
        errors_pgb = sum(r["errors"] for rs in pgb.values() for r in rs)
        if errors or errors_pgb:
            print("  WARNING: errors during the runs: gateway %d, pgbench %d" % (errors, errors_pgb))

        if args.big_clients:
            with PeakSampler(pg) as sampler:
                r = run_wrk(args.wrk, script, gw_port, args.threads, args.big_clients, args.duration)
            print("\n  %d clients (wrk -c%d -d%ds):" % (args.big_clients, args.big_clients, args.duration))
            print("    req/s %.0f   P50 %.3f ms   P95 %.3f ms   P99 %.3f ms   max %.3f ms" % (
                r["rps"], r["p50"], r["p95"], r["p99"], r["max"]))
            print("    requests %d   non-2xx %d   socket errors %d" % (r["requests"], r["non2xx"],
                                                                     r["socket_errors"]))
            print("    peak server connections (pg_stat_activity, every 50 ms): %d   (max_db_connections %d)%s" % (
                sampler.peak(), args.max_db, "   OVER THE CAP" if sampler.peak() > args.max_db else ""))
    except KeyboardInterrupt:
        print("\nbench_sql: interrupted; stopping everything", file=sys.stderr)
        status = 130
    except Exception as e:  # noqa: BLE001 - report, then clean up
        print("bench_sql: %s" % e, file=sys.stderr)
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        if gw is not None:
            rc = gw.stop()
            if rc not in (0, None) and status == 0:
                print("bench_sql: the gateway exited with %s:\n%s" % (rc, gw.stderr_tail()), file=sys.stderr)
                status = 1
        keep = args.keep or status not in (0, 130)
        if keep:
            os.environ["GATEWAY_TEST_KEEP"] = "1"
        try:
            pg.close()
        except Exception as e:  # noqa: BLE001
            print("bench_sql: stopping PostgreSQL: %s" % e, file=sys.stderr)
        if keep:
            print("bench_sql: logs kept in %s and %s" % (scratch, pg.scratch), file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

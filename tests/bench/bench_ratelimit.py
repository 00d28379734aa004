#!/usr/bin/python3
"""bench_ratelimit.py - what rate limiting costs: a limited route against the same route unlimited.

A program that prints figures, not a test. It starts, in a scratch directory on
loopback ports:
  * an upstream: nginx answering every request with a fixed ~1 KiB JSON body
    (as bench_proxy.py does);
  * a redis-server (nothing persisted);
  * for each worker count W asked for (--workers 1,2), two gateways with W workers
    and upstream keep-alive, each with three routes to the upstream: /free/
    (no ratelimit), /lim/ (one policy of 1000000 per 1 s, key client_ip, so
    nothing is ever refused and every request has the same key) and /keys/ (the
    same limit, key header:X-Key): gateway "local" (ratelimit.store: local) and
    gateway "redis" (ratelimit.store: redis, on_store_error: allow, redis.timeout
    200ms).
Then, per W, it runs the same `wrk -tT -cC -dD --latency` against six targets,
rotating which goes first each round, for R rounds:
  one key:   unlimited (/free/ on the local gateway), local (/lim/ on the local
             gateway), redis (/lim/ on the redis gateway): one key for every
             request, which the Redis store batches (a script call per batch);
  many keys: the same three through a wrk Lua script that sends X-Key, one of
             --keys (default 100,000) values at random per request, to /free/,
             and /keys/ on each gateway: about one key per request in flight, so
             the Redis store batches across keys (one script call per turn of the
             worker's loop, deciding every key read in it; about 0.07 to 0.1
             calls per request) and the local store touches a fresh slot each
             time. The unlimited run uses the same script, so the script's own
             cost is in both sides.
It prints req/s, P50 and P99 of every run, the medians, the ratios against the
matching unlimited run (median of medians and the median of the per-round
ratios), and for Redis the EVALSHA calls per request (INFO commandstats). Targets:
local overhead < 3 % (ratio >= 0.97), Redis < 15 % (ratio >= 0.85).

Every run must be all 2xx (a 429 means the limit was reached: not a fair figure)
and the redis gateway's gateway_ratelimit_store_fallbacks_total must stay 0 (else
the "redis" figures were on_store_error's). Both are checked and printed.

Everything it starts is stopped on the way out, on errors and Ctrl-C too.

Usage:
  tests/bench/bench_ratelimit.py [--workers 1[,2]] [--rounds 3] [--duration 10]
                                 [--connections 64] [--threads 2] [--keys 100000]
                                 [--targets unlimited,local,...] [--gateway build/gateway]
On a 2-core machine --workers 1 is the fair one: wrk and Redis need cores too.
"""

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_proxy import (DEFAULT_GATEWAY, Proc, cpu_seconds, fixed_body, free_port,  # noqa: E402
                         parse_wrk, start_upstream)

START_TIMEOUT = 10.0
# Never reached by wrk, and within what store: redis can hold (a whole
# microsecond per period: the configuration refuses a limit above the window in us).
LIMIT = 1000000
ALL_TARGETS = ("unlimited", "local", "redis", "unlimited-keys", "local-keys", "redis-keys")
TARGETS = ALL_TARGETS  # --targets may run fewer (each ratio needs its baseline too)
BASELINE = {"local": "unlimited", "redis": "unlimited", "local-keys": "unlimited-keys",
            "redis-keys": "unlimited-keys"}
RATIO_TARGET = {"local": 0.97, "redis": 0.85, "local-keys": 0.97, "redis-keys": 0.85}
# wrk: a random X-Key of KEYS values per request, seeded per thread.
KEYS_LUA = """\
local counter = 0
function setup(thread)
   counter = counter + 1
   thread:set("id", counter)
end
function init(args)
   math.randomseed(os.time() * 1000 + id)
end
function request()
   return wrk.format(nil, nil, {["X-Key"] = tostring(math.random(%d))})
end
"""


def http_get(port, path, timeout=2.0):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open("http://127.0.0.1:%d%s" % (port, path), timeout=timeout) as r:
        return r.status, r.read(), dict(r.headers)


def wait_until(pred, proc, what, timeout=START_TIMEOUT):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("%s exited with %s during start-up:\n%s" % (what, proc.returncode,
                                                                        proc.stderr_tail()))
        try:
            if pred():
                return
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.05)
    raise RuntimeError("%s not ready within %.0fs (last: %r)" % (what, timeout, last))


def start_redis(scratch, redis_server, redis_cli, port):
    p = Proc("redis", [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                       "no", "--dir", str(scratch), "--protected-mode", "no", "--daemonize", "no"], scratch)

    def pong():
        res = subprocess.run([redis_cli, "-p", str(port), "ping"], capture_output=True, text=True, timeout=2)
        return res.stdout.strip() == "PONG"
    wait_until(pong, p, "redis-server")
    return p


def start_gateway(scratch, gateway, name, port, upstream_port, workers, store, redis_port):
    redis = ""
    extra = ""
    if store == "redis":
        redis = 'redis:\n  url: "redis://127.0.0.1:%d/0"\n  timeout: 200ms\n' % redis_port
        extra = "  on_store_error: allow\n"
    conf = scratch / ("%s.yaml" % name)
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
%sratelimit:
  store: %s
%s  policies:
    huge: { limit: %d, window: 1s, key: client_ip }
    many: { limit: %d, window: 1s, key: "header:X-Key" }
upstreams:
  backend:
    targets: ["127.0.0.1:%d"]
    connect_timeout: 2s
    timeout: 10s
    keepalive: 64
routes:
  - name: free
    match: { prefix: /free/ }
    upstream: backend
  - name: lim
    match: { prefix: /lim/ }
    upstream: backend
    ratelimit: [huge]
  - name: keys
    match: { prefix: /keys/ }
    upstream: backend
    ratelimit: [many]
""" % (port, workers, redis, store, extra, LIMIT, LIMIT, upstream_port))
    p = Proc(name, [gateway, "-c", str(conf)], scratch)
    wait_until(lambda: http_get(port, "/free/")[0] == 200, p, name)
    return p


def fallbacks(port):
    _, body, _ = http_get(port, "/metrics", timeout=5)
    m = re.search(r"^gateway_ratelimit_store_fallbacks_total(?:\{\})?\s+(\S+)", body.decode(), re.M)
    return float(m.group(1)) if m else 0.0


def evalsha_calls(redis_cli, port):
    res = subprocess.run([redis_cli, "-p", str(port), "info", "commandstats"], capture_output=True, text=True,
                         timeout=5)
    m = re.search(r"^cmdstat_evalsha:calls=(\d+)", res.stdout, re.M)
    return int(m.group(1)) if m else 0


def run_wrk(wrk, port, path, threads, connections, duration, script=None):
    argv = [wrk, "-t%d" % threads, "-c%d" % connections, "-d%ds" % duration, "--latency"]
    if script:
        argv += ["-s", str(script)]
    argv.append("http://127.0.0.1:%d%s" % (port, path))
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise RuntimeError("wrk did not finish within %ds" % (duration + 30))
    if res.returncode != 0:
        raise RuntimeError("wrk failed (%d): %s" % (res.returncode, res.stderr.strip()))
    parsed = parse_wrk(res.stdout)
    if parsed["rps"] is None or parsed["p50"] is None or parsed["p99"] is None:
        raise RuntimeError("could not parse wrk output:\n" + res.stdout)
    return parsed


def fmt_row(label, r):
    errs = ""
    if r["non2xx"] or r["socket_errors"]:
        errs = "  non-2xx %d, socket errors %d" % (r["non2xx"], r["socket_errors"])
    return "  %-20s %12.0f %10.3f %10.3f%s" % (label, r["rps"], r["p50"], r["p99"], errs)


def bench_workers(args, scratch, procs, up_port, redis_port, body, workers, redis_pid):
    """Start the two gateways with `workers` workers, run the rounds, stop them; True when clean."""
    ports = {"local": free_port(), "redis": free_port()}
    gws = {}
    for store in ("local", "redis"):
        gws[store] = start_gateway(scratch, args.gateway, "gateway-%s-w%d" % (store, workers), ports[store],
                                   up_port, workers, store, redis_port)
        procs.append(gws[store])
    script = scratch / "keys.lua"
    script.write_text(KEYS_LUA % args.keys)
    # name: (port, path, wrk script)
    targets = {"unlimited": (ports["local"], "/free/", None), "local": (ports["local"], "/lim/", None),
               "redis": (ports["redis"], "/lim/", None), "unlimited-keys": (ports["local"], "/free/", script),
               "local-keys": (ports["local"], "/keys/", script), "redis-keys": (ports["redis"], "/keys/", script)}
    for name, (port, path, _) in targets.items():
        status, got, headers = http_get(port, path)
        if status != 200 or got != body.encode():
            raise RuntimeError("%s: %s%s does not pass the body through (%d, %d bytes)" % (
                name, port, path, status, len(got)))
        limited = "RateLimit-Limit" in headers
        if limited != (name in BASELINE):
            raise RuntimeError("%s: RateLimit-Limit %s on %s" % (name, "present" if limited else "absent", path))
    if fallbacks(ports["redis"]) != 0:
        raise RuntimeError("the redis gateway is not using Redis (fallbacks counted before the runs)")

    print("\n== %d worker%s: wrk -t%d -c%d -d%ds, %d rounds; many keys: X-Key of %d values" % (
        workers, "s" if workers > 1 else "", args.threads, args.connections, args.duration, args.rounds,
        args.keys), flush=True)
    if args.warmup:
        for name in TARGETS:
            port, path, sc = targets[name]
            run_wrk(args.wrk, port, path, args.threads, args.connections, args.warmup, sc)

    results = {name: [] for name in TARGETS}
    calls = {"redis": [], "redis-keys": []}  # EVALSHA per request, per run
    # CPU per request, us, per run: the gateway's own, and Redis's (redis targets)
    cpu = {name: [] for name in TARGETS}
    rcpu = {"redis": [], "redis-keys": []}
    print("  %-20s %12s %10s %10s %8s %8s %12s" % ("run", "req/s", "P50 ms", "P99 ms", "gw us", "redis us",
                                                 "EVALSHA/req"))
    n = len(TARGETS)
    for rnd in range(args.rounds):
        order = list(TARGETS[rnd % n:] + TARGETS[:rnd % n])
        if (rnd // n) % 2:
            order.reverse()
        for name in order:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError("%s died (exit %s):\n%s" % (p.name, p.returncode, p.stderr_tail()))
            port, path, sc = targets[name]
            before = evalsha_calls(args.redis_cli, redis_port) if name in calls else 0
            gw_pid = gws["redis" if name.startswith("redis") else "local"].proc.pid
            cpu0 = (cpu_seconds([gw_pid]), cpu_seconds([redis_pid]))
            r = run_wrk(args.wrk, port, path, args.threads, args.connections, args.duration, sc)
            cpu1 = (cpu_seconds([gw_pid]), cpu_seconds([redis_pid]))
            reqs = max(r["requests"] or 0, 1)
            cpu[name].append((cpu1[0] - cpu0[0]) / reqs * 1e6)
            per = "%9.1f %8s" % (cpu[name][-1], "")
            if name in calls and r["requests"]:
                rcpu[name].append((cpu1[1] - cpu0[1]) / reqs * 1e6)
                calls[name].append((evalsha_calls(args.redis_cli, redis_port) - before) / r["requests"])
                per = "%9.1f %8.1f %12.3f" % (cpu[name][-1], rcpu[name][-1], calls[name][-1])
            results[name].append(r)
            print(fmt_row("%s #%d" % (name, rnd + 1), r) + per, flush=True)

    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99")}
           for name, rs in results.items()}
    print("\n  %-20s %12s %10s %10s %8s %8s" % ("median", "req/s", "P50 ms", "P99 ms", "gw us", "redis us"))
    for name in TARGETS:
        print("  %-20s %12.0f %10.3f %10.3f %8.1f %8s" % (
            name, med[name]["rps"], med[name]["p50"], med[name]["p99"], statistics.median(cpu[name]),
            "%.1f" % statistics.median(rcpu[name]) if rcpu.get(name) else ""))
    clean = True
    pairs = {name: base for name, base in BASELINE.items() if name in results and base in results}
    for name, base in pairs.items():
        target = RATIO_TARGET[name]
        ratio = med[name]["rps"] / med[base]["rps"]
        paired = [a["rps"] / u["rps"] for a, u in zip(results[name], results[base]) if u["rps"]]
        print("  %-26s %7.3f   overhead %5.1f %%  (target < %.0f %%: %s)  paired median %.3f (per round: %s)" % (
            "%s/%s" % (name, base), ratio, (1 - ratio) * 100, (1 - target) * 100,
            "met" if ratio >= target else "NOT met", statistics.median(paired),
            " ".join("%.3f" % x for x in paired)))
    # CPU per request is steadier than req/s on a shared machine: what the
    # limiter adds to the gateway (and, for Redis, what Redis spends) per request.
    for name, base in pairs.items():
        gw, b = statistics.median(cpu[name]), statistics.median(cpu[base])
        extra = statistics.median(rcpu[name]) if rcpu.get(name) else 0.0
        print("  %-26s gateway CPU %+6.1f us per request (%+5.1f %%)%s" % (
            "%s vs %s" % (name, base), gw - b, (gw / b - 1) * 100 if b else 0.0,
            "; Redis %.1f us per request: gateway + Redis %+5.1f %%" % (extra, (gw + extra) / b * 100 - 100)
            if extra else ""))
    for name, per in calls.items():
        if per:
            print("  %-26s %7.3f EVALSHA per request (median of the runs)" % (name, statistics.median(per)))
    fb = fallbacks(ports["redis"])
    print("  redis gateway fallbacks during the runs: %d%s" % (fb, "" if fb == 0 else
                                                               "  WARNING: the redis figures are partly allow's"))
    errors = {name: sum(r["non2xx"] + r["socket_errors"] for r in rs) for name, rs in results.items()}
    if any(errors.values()):
        print("  WARNING: errors (non-2xx or socket) during the runs: %s" % errors)
        clean = False
    if fb:
        clean = False
    for store in ("local", "redis"):
        p = gws[store]
        procs.remove(p)
        rc = p.stop()
        if rc != 0:
            print("bench_ratelimit: %s exited with %s:\n%s" % (p.name, rc, p.stderr_tail()), file=sys.stderr)
            clean = False
    return clean


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1", help="gateway worker counts, comma-separated (default 1; e.g. 1,2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per target (0: none)")
    ap.add_argument("--body-bytes", type=int, default=1024)
    ap.add_argument("--keys", type=int, default=100000, help="distinct X-Key values of the many-keys runs")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS),
                    help="which targets to run, comma-separated (default all six); a ratio is printed for each "
                         "limited target run with its unlimited baseline: e.g. unlimited,local for more rounds "
                         "of that pair alone")
    ap.add_argument("--gateway", default=DEFAULT_GATEWAY)
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    ap.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    ap.add_argument("--redis-server", default=shutil.which("redis-server") or "/usr/bin/redis-server")
    ap.add_argument("--redis-cli", default=shutil.which("redis-cli") or "/usr/bin/redis-cli")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, configs)")
    args = ap.parse_args()

    try:
        worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        sys.exit("bench_ratelimit: --workers takes numbers, comma-separated")
    for path, what in ((args.gateway, "gateway"), (args.nginx, "nginx"), (args.wrk, "wrk"),
                       (args.redis_server, "redis-server"), (args.redis_cli, "redis-cli")):
        if not os.access(path, os.X_OK):
            sys.exit("bench_ratelimit: %s not found or not executable: %s" % (what, path))
    if (not worker_counts or min(worker_counts) < 1 or args.rounds < 1 or args.duration < 1
            or args.connections < args.threads or args.keys < 1):
        sys.exit("bench_ratelimit: need workers >= 1, rounds >= 1, duration >= 1, connections >= threads, keys >= 1")

    global TARGETS
    chosen = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in ALL_TARGETS]
    if unknown or not chosen:
        sys.exit("bench_ratelimit: unknown targets %s (known: %s)" % (",".join(unknown), ",".join(ALL_TARGETS)))
    TARGETS = tuple(t for t in ALL_TARGETS if t in chosen)

    def interrupted(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    scratch = Path(tempfile.mkdtemp(prefix="bench-ratelimit-"))
    procs = []
    status = 0
    n = len(TARGETS)
    estimate = len(worker_counts) * (args.rounds * n * (args.duration + 1) + n * (args.warmup + 1) + 3) + 3
    print("bench_ratelimit: workers %s, wrk -t%d -c%d -d%ds, %d rounds x %d targets, ~%ds; scratch %s" % (
        ",".join(map(str, worker_counts)), args.threads, args.connections, args.duration, args.rounds, n,
        estimate, scratch), flush=True)
    try:
        body = fixed_body(args.body_bytes)
        up_port, redis_port = free_port(), free_port()
        procs.append(start_upstream(scratch, args.nginx, up_port, body))
        redis = start_redis(scratch, args.redis_server, args.redis_cli, redis_port)
        procs.append(redis)
        print("upstream body %d bytes; policy %d per 1 s (never refuses)" % (len(body), LIMIT), flush=True)
        for w in worker_counts:
            if not bench_workers(args, scratch, procs, up_port, redis_port, body, w, redis.proc.pid):
                status = 1
    except KeyboardInterrupt:
        print("\nbench_ratelimit: interrupted; stopping everything", file=sys.stderr)
        status = 130
    except Exception as e:  # noqa: BLE001 - report, then clean up
        print("bench_ratelimit: %s" % e, file=sys.stderr)
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for p in reversed(procs):
            rc = p.stop()
            if p.name.startswith("gateway") and rc not in (0, None) and status == 0:
                print("bench_ratelimit: %s exited with %s:\n%s" % (p.name, rc, p.stderr_tail()), file=sys.stderr)
                status = 1
        if args.keep or status not in (0, 130):
            print("bench_ratelimit: logs kept in %s" % scratch, file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""bench_cache.py - the gateway's cache hits against nginx proxy_cache hits and a bare evhttp server.

A program that prints figures, not a test. It starts, in a scratch directory on
loopback ports:
  * an upstream: nginx (one worker) answering every path with the same JSON file
    (--body-bytes, default 1024; nginx's `return` cannot hold 16 KiB), logging each
    request it gets, so we can count what reached it;
  * nginx-cache: nginx with W worker_processes, proxy_cache (keys_zone in the
    scratch dir, proxy_cache_valid 200 10m, proxy_cache_lock on), keep-alive to
    the upstream, `X-Cache-Status: $upstream_cache_status`;
  * gateway: the gateway with W workers, cache store: memory
    (memory_max_bytes --zipf-memory), routes /hot and /items/ cached (ttl 10m);
  * bare: tests/bench/static_evhttp (one event_base + evhttp per thread, W
    threads, SO_REUSEPORT) answering the same bytes with the same Content-Type
    from memory;
  * with --redis: a redis-server and two more gateways, store: redis with
    hot_tier true (gw-redis-hot) and false (gw-redis-nohot).

Part 1, hits: every target is warmed and checked (the gateway's X-Cache: HIT,
nginx's X-Cache-Status: HIT, same body bytes and Content-Type), then R rounds of
`wrk -tT -cC -dD --latency` on one path, rotating the order of the targets each
round. Printed: req/s, P50, P99 and CPU time per request (of the target's own
processes) of every run, the medians, and for each gateway the ratios to
nginx-cache and to bare (ratio of the medians; median of the per-round req/s
ratios), against the targets (>= 1.0 x nginx, >= 0.9 x bare). Afterwards the
gateways' gateway_cache_requests_total{route="hot"} must have counted only hits
and the upstream must have seen no request for /hot; Redis's GET count per
request is printed for the Redis gateways.

Part 2, hit rate (skip with --no-zipf): a wrk Lua script asks for /items/<k>, k
drawn from a Zipf-like distribution (P(k) ~ 1/k^s, --zipf-s 1.1) over --zipf-keys
10000 keys, with a store too small for them all (gateway memory_max_bytes
--zipf-memory 4MiB, i.e. at most F = 4MiB / body bodies; nginx: a keys_zone of
about F keys, evicted at once when full, and max_size room for F cache files,
measured on disk, which its cache manager enforces up to 10 s late). Per
target: a cold run from an empty cache, then a measured run; printed: req/s, P99,
the hit rate (gateway: gateway_cache_requests_total by result; nginx: its access
log of $upstream_cache_status) and the upstream fetches per request.

Everything it starts is stopped on the way out, on errors and Ctrl-C too. All
traffic stays on 127.0.0.1. Time: about rounds x targets x (duration + 1) s,
plus 2 x targets x zipf-duration s, plus start-up and warm-up.

Usage:
  tests/bench/bench_cache.py --gateway BUILD/gateway [--static-evhttp BUILD/static_evhttp]
                             [--workers 1] [--rounds 5] [--duration 5] [--threads 2]
                             [--connections 64] [--body-bytes 1024] [--redis] [--no-zipf]
On a 2-core machine keep --workers 1: wrk needs a core of its own.
"""

import argparse
import bisect
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_proxy import (DEFAULT_GATEWAY, Proc, fixed_body, free_port, nginx_conf,  # noqa: E402
                         parse_wrk)

START_TIMEOUT = 10.0
HOT_PATH = "/hot"
TTL = "10m"
ZONE_SPARE_PAGES = 2
ZONE_PAGE_OVERHEAD = 24


def http_get(port, path, timeout=2.0):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an env proxy
    with opener.open("http://127.0.0.1:%d%s" % (port, path), timeout=timeout) as r:
        return r.status, r.read(), r.headers


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


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+)\s*(|B|KiB|MiB|GiB|K|M|G|k|m|g)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError("size %r: a number with B, KiB, MiB or GiB" % text)
    mult = {"": 1, "B": 1, "K": 1024, "KiB": 1024, "k": 1024, "M": 1 << 20, "MiB": 1 << 20, "m": 1 << 20,
            "G": 1 << 30, "GiB": 1 << 30, "g": 1 << 30}[m.group(2)]
    return int(m.group(1)) * mult


# --- the servers -----------------------------------------------------------

def start_nginx(name, scratch, nginx, workers, body, port, ready_path="/"):
    conf = scratch / ("%s.conf" % name)
    conf.write_text(nginx_conf(name, scratch, workers, body))
    p = Proc(name, [nginx, "-p", str(scratch), "-e", str(scratch / ("%s.error.log" % name)), "-c", str(conf)],
             scratch, stop_signal=signal.SIGQUIT)
    wait_until(lambda: http_get(port, ready_path)[0] == 200, p, name)
    return p


def start_upstream(scratch, nginx, port):
    """nginx answering every path with www/body.json, one log line per request."""
    http = """\
    log_format fetch '$request_uri';
    server {
        listen 127.0.0.1:%d backlog=4096;
        access_log %s/upstream.fetch.log fetch;
        etag off;
        location / {
            root %s/www;
            types { }
            default_type application/json;
            rewrite ^ /body.json break;
        }
    }""" % (port, scratch, scratch)
    return start_nginx("upstream", scratch, nginx, 1, http, port)


def start_nginx_cache(scratch, nginx, port, upstream_port, workers, zipf_max_size, zipf_zone_bytes):
    """The reference: nginx proxy_cache, zone "hot" for the hit rounds, "zipf" for the hit rate."""
    # nginx takes the block size that max_size counts in from statfs() of the cache
    # directory when it starts; a directory that does not exist yet makes it 512.
    for zone in ("hot", "zipf"):
        (scratch / ("ngx-cache-%s" % zone)).mkdir(exist_ok=True)
    http = """\
    proxy_cache_path %(dir)s/ngx-cache-hot levels=1:2 keys_zone=hot:1m inactive=60m use_temp_path=off;
    proxy_cache_path %(dir)s/ngx-cache-zipf levels=1:2 keys_zone=zipf:%(zone)d max_size=%(max)d inactive=60m
                     use_temp_path=off manager_files=10000 manager_sleep=10ms;
    log_format cachestatus '$upstream_cache_status';
    upstream backend {
        server 127.0.0.1:%(up)d;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:%(port)d backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_cache_valid 200 10m;
        proxy_cache_lock on;
        add_header X-Cache-Status $upstream_cache_status;
        location / {
            proxy_pass http://backend;
            proxy_cache hot;
        }
        location /items/ {
            proxy_pass http://backend;
            proxy_cache zipf;
            access_log %(dir)s/nginx-cache.zipf.log cachestatus buffer=256k flush=1s;
        }
    }""" % {"dir": scratch, "max": zipf_max_size, "zone": zipf_zone_bytes, "up": upstream_port, "port": port}
    return start_nginx("nginx-cache", scratch, nginx, workers, http, port, ready_path=HOT_PATH)


def zone_bytes_for(keys):
    """A keys_zone holding about `keys` keys: 32 nodes of 128 bytes per 4 KiB slab page."""
    return (-(-keys // 32) + ZONE_SPARE_PAGES) * (4096 + ZONE_PAGE_OVERHEAD)


def redis_gets(args):
    """GET commands the Redis server has run (INFO commandstats)."""
    res = subprocess.run([args.redis_cli, "-p", str(args.redis_port), "info", "commandstats"], capture_output=True,
                         text=True, timeout=5)
    m = re.search(r"^cmdstat_get:calls=(\d+)", res.stdout, re.M)
    return int(m.group(1)) if m else 0


def start_redis(scratch, redis_server, redis_cli, port):
    p = Proc("redis", [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                       "no", "--dir", str(scratch), "--protected-mode", "no", "--daemonize", "no"], scratch)

    def pong():
        res = subprocess.run([redis_cli, "-p", str(port), "ping"], capture_output=True, text=True, timeout=2)
        return res.stdout.strip() == "PONG"
    wait_until(pong, p, "redis-server")
    return p


def start_gateway(scratch, gateway, name, port, upstream_port, workers, memory, store, hot_tier, redis_port):
    redis = ""
    cache = "cache:\n  store: %s\n  memory_max_bytes: %d\n" % (store, memory)
    if store == "redis":
        redis = 'redis:\n  url: "redis://127.0.0.1:%d/0"\n  timeout: 200ms\n' % redis_port
        # Own keys per gateway: the two Redis gateways must not warm each other.
        cache += "  hot_tier: %s\n  key_prefix: \"%s:\"\n" % ("true" if hot_tier else "false", name)
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
%s%supstreams:
  backend:
    targets: ["127.0.0.1:%d"]
    connect_timeout: 2s
    timeout: 10s
    keepalive: 64
routes:
  - name: hot
    match: { prefix: %s }
    upstream: backend
    cache: { ttl: %s }
  - name: items
    match: { prefix: /items/ }
    upstream: backend
    cache: { ttl: %s }
""" % (port, workers, redis, cache, upstream_port, HOT_PATH, TTL, TTL))
    p = Proc(name, [gateway, "-c", str(conf)], scratch)
    wait_until(lambda: http_get(port, "/ready")[0] == 200, p, name)
    return p


def start_bare(scratch, static_evhttp, port, threads, body_file):
    p = Proc("bare", [static_evhttp, str(port), str(threads), str(body_file)], scratch)
    wait_until(lambda: http_get(port, HOT_PATH)[0] == 200, p, "static_evhttp")
    return p


# --- what they say ---------------------------------------------------------

def cache_counts(port, route):
    """gateway_cache_requests_total{route=...} by result."""
    _, text, _ = http_get(port, "/metrics", timeout=5)
    counts = {}
    for line in text.decode().splitlines():
        if not line.startswith("gateway_cache_requests_total{"):
            continue
        m = re.match(r"gateway_cache_requests_total\{([^}]*)\}\s+(\S+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1)))
        if labels.get("route") == route:
            counts[labels.get("result", "?")] = counts.get(labels.get("result", "?"), 0) + float(m.group(2))
    return counts


def delta(after, before):
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)
            if after.get(k, 0) - before.get(k, 0)}


def count_lines(path, pred=None):
    try:
        with open(path, "rb") as f:
            if pred is None:
                return sum(1 for _ in f)
            return sum(1 for line in f if pred(line))
    except FileNotFoundError:
        return 0


def upstream_fetches(scratch, prefix):
    p = prefix.encode()
    return count_lines(scratch / "upstream.fetch.log", lambda line: line.startswith(p))


def nginx_zipf_statuses(scratch, nginx_proc, at_least):
    """$upstream_cache_status counts of the zipf log, after making nginx flush its buffer."""
    path = scratch / "nginx-cache.zipf.log"
    os.kill(nginx_proc.proc.pid, signal.SIGUSR1)  # reopen: the workers flush their log buffers
    deadline = time.monotonic() + 10
    last = -1
    while True:
        n = count_lines(path)
        if (n >= at_least and n == last) or time.monotonic() > deadline:
            break
        last = n
        time.sleep(0.3)
    counts = {}
    try:
        with open(path, "rb") as f:
            for line in f:
                s = line.strip().decode() or "-"
                counts[s] = counts.get(s, 0) + 1
    except FileNotFoundError:
        pass
    return counts


# --- wrk -------------------------------------------------------------------

ZIPF_LUA = """\
-- /items/<k>, k in 1..N with P(k) ~ 1/k^S; each thread its own fixed seed.
local N, S = %d, %r
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("seed", counter)
end
local cdf, reqs = {}, {}
function init(args)
  math.randomseed(7919 * (seed or 1))
  local sum = 0
  for k = 1, N do sum = sum + 1 / k ^ S; cdf[k] = sum end
  for k = 1, N do cdf[k] = cdf[k] / sum; reqs[k] = wrk.format("GET", "/items/" .. k) end
end
function request()
  local u = math.random()
  local lo, hi = 1, N
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return reqs[lo]
end
"""


def run_wrk(args, port, path, duration, script=None):
    argv = [args.wrk, "-t%d" % args.threads, "-c%d" % args.connections, "-d%ds" % duration, "--latency"]
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


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system CPU time of a process (all its threads) and of its children (nginx's workers)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(entry) == pid or int(fields[1]) == pid:  # fields[1] is the ppid
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def fmt_row(label, r):
    errs = ""
    if r["non2xx"] or r["socket_errors"]:
        errs = "  non-2xx %d, socket errors %d" % (r["non2xx"], r["socket_errors"])
    cpu = " %10.1f" % r["cpu_us"] if "cpu_us" in r else ""
    return "  %-26s %12.0f %10.3f %10.3f%s%s" % (label, r["rps"], r["p50"], r["p99"], cpu, errs)


def check_alive(procs):
    for p in procs:
        if p.poll() is not None:
            raise RuntimeError("%s died (exit %s):\n%s" % (p.name, p.returncode, p.stderr_tail()))


# --- the two parts ---------------------------------------------------------

def warm_and_check(name, port, body, kind):
    """GET the hot path until it is a hit; check body bytes and Content-Type."""
    deadline = time.monotonic() + START_TIMEOUT
    seen = []
    while True:
        status, got, headers = http_get(port, HOT_PATH)
        if status != 200 or got != body:
            raise RuntimeError("%s: %s answers %d with %d bytes, not the %d-byte body" % (
                name, HOT_PATH, status, len(got), len(body)))
        ctype = headers.get("Content-Type")
        if ctype != "application/json":
            raise RuntimeError("%s: Content-Type %r" % (name, ctype))
        state = {"gateway": headers.get("X-Cache"), "nginx": headers.get("X-Cache-Status"), "bare": "HIT"}[kind]
        seen.append(state)
        if state == "HIT":
            return seen
        if time.monotonic() > deadline:
            raise RuntimeError("%s never answered %s from its cache (saw %s)" % (name, HOT_PATH, seen[-5:]))
        time.sleep(0.02)


def bench_hits(args, scratch, procs, targets, kinds, gateways, body, pids):
    for name in targets:
        seen = warm_and_check(name, targets[name], body, kinds[name])
        if kinds[name] != "bare":
            print("  %-14s warmed: %s" % (name, " -> ".join(str(s) for s in seen)), flush=True)
    if args.warmup:
        for name, port in targets.items():
            run_wrk(args, port, HOT_PATH, args.warmup)

    before = {g: cache_counts(targets[g], "hot") for g in gateways}
    fetched_before = upstream_fetches(scratch, HOT_PATH)
    names = list(targets)
    results = {name: [] for name in names}
    redis_seen = {}  # gateway: [Redis GETs, wrk requests] during its runs
    print("\n== hits: %s, wrk -t%d -c%d -d%ds --latency, %d rounds" % (
        HOT_PATH, args.threads, args.connections, args.duration, args.rounds), flush=True)
    print("  %-26s %12s %10s %10s %10s" % ("run", "req/s", "P50 ms", "P99 ms", "CPU us/req"))
    for rnd in range(args.rounds):
        k = rnd % len(names)
        order = names[k:] + names[:k]
        if (rnd // len(names)) % 2:
            order.reverse()
        for name in order:
            check_alive(procs)
            gets = redis_gets(args) if name.startswith("gw-redis") else None
            cpu = cpu_seconds(pids[name])
            r = run_wrk(args, targets[name], HOT_PATH, args.duration)
            r["cpu_us"] = (cpu_seconds(pids[name]) - cpu) * 1e6 / r["requests"] if r["requests"] else float("nan")
            results[name].append(r)
            if gets is not None:
                redis_seen[name] = [a + b for a, b in zip(redis_seen.get(name, [0, 0]),
                                                         (redis_gets(args) - gets, r["requests"]))]
            print(fmt_row("%s #%d" % (name, rnd + 1), r), flush=True)

    keys = ("rps", "p50", "p99", "cpu_us")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in results.items()}
    print("\n  %-26s %12s %10s %10s %10s" % ("median", "req/s", "P50 ms", "P99 ms", "CPU us/req"))
    for name in names:
        print("  %-26s %12.0f %10.3f %10.3f %10.1f" % (name, *(med[name][k] for k in keys)))
    clean = True
    print("\n  %-26s %12s %10s %10s %10s   %s" % ("ratio", "req/s", "P50", "P99", "CPU/req",
                                                "paired req/s median (per round)"))
    for g in gateways:
        for ref, target in (("nginx-cache", 1.0), ("bare", 0.9)):
            ratio = {k: med[g][k] / med[ref][k] if med[ref][k] else float("nan") for k in keys}
            paired = [a["rps"] / b["rps"] for a, b in zip(results[g], results[ref]) if b["rps"]]
            print("  %-26s %12.3f %10.2f %10.2f %10.2f   %.3f (%s)  target >= %.1f: %s" % (
                "%s/%s" % (g, ref), *(ratio[k] for k in keys), statistics.median(paired),
                " ".join("%.2f" % x for x in paired), target, "met" if ratio["rps"] >= target else "NOT met"))
    print("  (req/s: higher is better; latency and CPU ratios <= 1.00 mean at least as quick / as cheap.\n"
          "   CPU us/req: the target's own processes (threads, nginx's workers) per answered request, without\n"
          "   Redis; on a machine where wrk and the server share cores it is the steadier figure)")

    print()
    for g in gateways:
        d = delta(cache_counts(targets[g], "hot"), before[g])
        total = sum(d.values())
        others = {k: int(v) for k, v in d.items() if k != "hit"}
        print("  %s: gateway_cache_requests_total{route=\"hot\"} during the rounds: %d, hit %d%s" % (
            g, total, d.get("hit", 0), ("  WARNING: not hits: %s" % others) if others else ""))
        if others:
            clean = False
    for g, (gets, reqs) in sorted(redis_seen.items()):
        print("  %s: Redis GETs during its runs: %d, %.3f per request" % (g, gets, gets / reqs if reqs else 0))
    fetched = upstream_fetches(scratch, HOT_PATH) - fetched_before
    print("  upstream requests for %s during the rounds: %d%s" % (
        HOT_PATH, fetched, "" if fetched == 0 else "  WARNING: some answers were not hits"))
    errors = {name: sum(r["non2xx"] + r["socket_errors"] for r in rs) for name, rs in results.items()}
    if any(errors.values()):
        print("  WARNING: errors (non-2xx or socket) during the runs: %s" % errors)
        clean = False
    return clean and fetched == 0


def zipf_top_share(n, s, top):
    w = [1 / k ** s for k in range(1, n + 1)]
    return sum(w[:top]) / sum(w)


def lru_hit_rate(n, s, capacity, draws=300000):
    """Steady-state hit rate of an exact LRU of `capacity` entries under the same key mix."""
    rng = random.Random(1)
    w = [1 / k ** s for k in range(1, n + 1)]
    total = sum(w)
    cdf, acc = [], 0.0
    for x in w:
        acc += x / total
        cdf.append(acc)
    lru, hits = OrderedDict(), 0
    for i in range(draws):
        k = min(bisect.bisect_left(cdf, rng.random()), n - 1)
        if k in lru:
            lru.move_to_end(k)
            hits += i >= draws // 2
        else:
            lru[k] = True
            if len(lru) > capacity:
                lru.popitem(last=False)
    return hits / (draws - draws // 2)


def bench_zipf(args, scratch, procs, targets, kinds, nginx_proc, body, nginx_max_size, nginx_zone):
    script = scratch / "zipf.lua"
    script.write_text(ZIPF_LUA % (args.zipf_keys, args.zipf_s))
    fit = args.zipf_memory // len(body)
    print("\n== hit rate: /items/<k>, Zipf s=%.2f over %d keys, wrk -t%d -c%d -d%ds; per target a cold run, "
          "then a measured one" % (args.zipf_s, args.zipf_keys, args.threads, args.connections, args.zipf_duration))
    print("  stores: gateway memory_max_bytes %d (at most %d bodies); nginx keys_zone %d (~%d keys), max_size %d"
          % (args.zipf_memory, fit, nginx_zone, (nginx_zone // (4096 + ZONE_PAGE_OVERHEAD) - ZONE_SPARE_PAGES) * 32,
             nginx_max_size))
    print("  the most requested %d keys get %.1f %% of the requests; an exact LRU of %d entries would hit %.1f %%" % (
              min(fit, args.zipf_keys),
              100 * zipf_top_share(args.zipf_keys, args.zipf_s, fit), fit,
              100 * lru_hit_rate(args.zipf_keys, args.zipf_s, fit)), flush=True)
    print("  %-26s %12s %10s %10s %8s %10s   %s" % ("run", "req/s", "P50 ms", "P99 ms", "hit %", "fetch/req",
                                                  "by result"))
    clean = True
    rows = {}
    for name, port in targets.items():
        for phase in ("cold", "measured"):
            check_alive(procs)
            if kinds[name] == "gateway":
                before = cache_counts(port, "items")
            else:
                before = nginx_zipf_statuses(scratch, nginx_proc, 0)
            fetched_before = upstream_fetches(scratch, "/items/")
            r = run_wrk(args, port, "/", args.zipf_duration, script)
            if kinds[name] == "gateway":
                by = delta(cache_counts(port, "items"), before)
                hits = by.get("hit", 0)
            else:
                by = delta(nginx_zipf_statuses(scratch, nginx_proc, sum(before.values()) + r["requests"]), before)
                hits = by.get("HIT", 0)
            total = sum(by.values())
            fetched = upstream_fetches(scratch, "/items/") - fetched_before
            rate = 100.0 * hits / total if total else float("nan")
            per_req = fetched / total if total else float("nan")
            print(fmt_row("%s %s" % (name, phase), r) + " %8.1f %10.3f   %s" % (
                rate, per_req, " ".join("%s=%d" % kv for kv in sorted(by.items()))), flush=True)
            if r["non2xx"] or r["socket_errors"]:
                clean = False
            rows[(name, phase)] = (r, rate)
    sizes = [os.stat(Path(d) / f).st_blocks * 512 for d, _, fs in os.walk(scratch / "ngx-cache-zipf") for f in fs]
    print("  nginx's zipf cache at the end: %d files, %d bytes on disk (max_size %d; its cache manager trims "
          "behind the writes)" % (len(sizes), sum(sizes), nginx_max_size))
    print("  (the gateway's entries also hold their fields, key and bookkeeping, so it keeps fewer than %d)" % fit)
    return clean


# --- main ------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1,
                    help="gateway server.workers = nginx worker_processes = bare threads (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the hit part (default %(default)s)")
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default %(default)s)")
    ap.add_argument("--connections", type=int, default=64, help="wrk -c (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="wrk -t (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="seconds of wrk per target before the rounds, 0: none (default %(default)s)")
    ap.add_argument("--body-bytes", type=int, default=1024,
                    help="size of the JSON body, e.g. 16384 (default %(default)s)")
    ap.add_argument("--redis", action="store_true",
                    help="also run redis-server and gateways with store: redis, hot_tier true and false")
    ap.add_argument("--no-zipf", action="store_true", help="skip the hit-rate part")
    ap.add_argument("--zipf-keys", type=int, default=10000,
                    help="number of distinct /items/<k> keys (default %(default)s)")
    ap.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent (default %(default)s)")
    ap.add_argument("--zipf-memory", type=parse_size, default=parse_size("4MiB"),
                    help="the gateways' cache.memory_max_bytes, also the hot tier's; B, KiB, MiB, GiB "
                         "(default 4MiB)")
    ap.add_argument("--zipf-duration", type=int, default=None,
                    help="seconds per zipf run (default: --duration)")
    ap.add_argument("--nginx-zipf-max-size", type=parse_size, default=None,
                    help="nginx's max_size for the zipf zone (default: room for as many bodies as "
                         "--zipf-memory holds, from the disk size of one of its cache files)")
    ap.add_argument("--nginx-zipf-keys-zone", type=parse_size, default=None,
                    help="size of nginx's keys_zone for the zipf zone (default: room for as many keys as "
                         "--zipf-memory holds bodies; nginx evicts at once when it is full, whereas max_size is "
                         "enforced by its cache manager, up to 10 s late)")
    ap.add_argument("--gateway", default=DEFAULT_GATEWAY, help="(default %(default)s)")
    ap.add_argument("--static-evhttp", default=None, help="(default: static_evhttp next to --gateway)")
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx", help="(default %(default)s)")
    ap.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk", help="(default %(default)s)")
    ap.add_argument("--redis-server", default=shutil.which("redis-server") or "/usr/bin/redis-server",
                    help="(default %(default)s)")
    ap.add_argument("--redis-cli", default=shutil.which("redis-cli") or "/usr/bin/redis-cli",
                    help="(default %(default)s)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, configs)")
    args = ap.parse_args()
    if args.static_evhttp is None:
        args.static_evhttp = str(Path(args.gateway).resolve().parent / "static_evhttp")
    if args.zipf_duration is None:
        args.zipf_duration = args.duration

    need = [(args.gateway, "gateway"), (args.static_evhttp, "static_evhttp"), (args.nginx, "nginx"),
            (args.wrk, "wrk")]
    if args.redis:
        need += [(args.redis_server, "redis-server"), (args.redis_cli, "redis-cli")]
    for path, what in need:
        if not os.access(path, os.X_OK):
            sys.exit("bench_cache: %s not found or not executable: %s" % (what, path))
    if (args.workers < 1 or args.rounds < 1 or args.duration < 1 or args.zipf_duration < 1
            or args.connections < args.threads or args.body_bytes < 16 or args.zipf_keys < 1
            or args.zipf_s <= 0 or args.zipf_memory < (1 << 20)):
        sys.exit("bench_cache: need workers, rounds, durations >= 1, connections >= threads, body-bytes >= 16, "
                 "zipf-keys >= 1, zipf-s > 0, zipf-memory >= 1MiB (cache.max_object_bytes)")

    def interrupted(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    signal.signal(signal.SIGINT, interrupted)  # also when started with SIGINT ignored (a background job)

    ntargets = 3 + (2 if args.redis else 0)
    estimate = (args.rounds * ntargets * (args.duration + 1) + ntargets * (args.warmup + 1)
                + (0 if args.no_zipf else 2 * (ntargets - 1) * (args.zipf_duration + 2)) + 10)
    scratch = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    procs = []
    status = 0
    print("bench_cache: workers %d, body %d bytes, wrk -t%d -c%d, %d rounds x %d targets x %ds, ~%ds; scratch %s"
          % (args.workers, args.body_bytes, args.threads, args.connections, args.rounds, ntargets, args.duration,
             estimate, scratch), flush=True)
    try:
        body = fixed_body(args.body_bytes).encode()
        (scratch / "www").mkdir()
        body_file = scratch / "www" / "body.json"
        body_file.write_bytes(body)

        up_port, ngx_port, gw_port, bare_port = free_port(), free_port(), free_port(), free_port()
        procs.append(start_upstream(scratch, args.nginx, up_port))
        # nginx's max_size counts file-system blocks: start with the hot zone, measure one cache
        # file, then size the zipf zone (the config is written once; nginx is reloaded never).
        nginx_max = args.nginx_zipf_max_size
        if nginx_max is None:
            probe = start_nginx_cache(scratch, args.nginx, ngx_port, up_port, args.workers, 1 << 30, 1 << 20)
            procs.append(probe)
            warm_and_check("nginx-cache", ngx_port, body, "nginx")
            files = [Path(d) / f for d, _, fs in os.walk(scratch / "ngx-cache-hot") for f in fs]
            per_file = max(os.stat(f).st_blocks * 512 for f in files)
            nginx_max = max(args.zipf_memory // len(body), 1) * per_file
            procs.remove(probe)
            probe.stop()
            shutil.rmtree(scratch / "ngx-cache-hot", ignore_errors=True)
            shutil.rmtree(scratch / "ngx-cache-zipf", ignore_errors=True)
            print("nginx cache file for a %d-byte body: %d bytes on disk" % (len(body), per_file), flush=True)
        fit = max(args.zipf_memory // len(body), 1)
        zone = args.nginx_zipf_keys_zone or zone_bytes_for(fit)
        nginx_proc = start_nginx_cache(scratch, args.nginx, ngx_port, up_port, args.workers, nginx_max, zone)
        procs.append(nginx_proc)
        redis_port = None
        if args.redis:
            redis_port = args.redis_port = free_port()
            procs.append(start_redis(scratch, args.redis_server, args.redis_cli, redis_port))
        targets = {"gateway": gw_port}
        procs.append(start_gateway(scratch, args.gateway, "gateway", gw_port, up_port, args.workers,
                                   args.zipf_memory, "memory", False, None))
        if args.redis:
            for name, hot in (("gw-redis-hot", True), ("gw-redis-nohot", False)):
                targets[name] = free_port()
                procs.append(start_gateway(scratch, args.gateway, name, targets[name], up_port, args.workers,
                                           args.zipf_memory, "redis", hot, redis_port))
        gateways = list(targets)
        targets["nginx-cache"] = ngx_port
        procs.append(start_bare(scratch, args.static_evhttp, bare_port, args.workers, body_file))
        targets["bare"] = bare_port
        kinds = {name: "gateway" for name in gateways}
        kinds.update({"nginx-cache": "nginx", "bare": "bare"})
        print("all started: upstream :%d, nginx-cache :%d, %s, bare :%d" % (
            up_port, ngx_port, ", ".join("%s :%d" % (g, targets[g]) for g in gateways), bare_port), flush=True)

        pids = {p.name: p.proc.pid for p in procs}
        pids["nginx-cache"] = nginx_proc.proc.pid
        if not bench_hits(args, scratch, procs, targets, kinds, gateways, body, pids):
            status = 1
        if not args.no_zipf:
            ztargets = {name: port for name, port in targets.items() if name != "bare"}
            if not bench_zipf(args, scratch, procs, ztargets, kinds, nginx_proc, body, nginx_max, zone):
                status = 1
        check_alive(procs)
    except KeyboardInterrupt:
        print("\nbench_cache: interrupted; stopping everything", file=sys.stderr)
        status = 130
    except Exception as e:  # noqa: BLE001 - report, then clean up
        print("bench_cache: %s" % e, file=sys.stderr)
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        for p in reversed(procs):
            rc = p.stop()
            if (p.name == "gateway" or p.name.startswith("gw-")) and rc not in (0, None) and status in (0, 1):
                print("bench_cache: %s exited with %s:\n%s" % (p.name, rc, p.stderr_tail()), file=sys.stderr)
                status = 1
        if args.keep or status not in (0, 130):
            print("bench_cache: logs kept in %s" % scratch, file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

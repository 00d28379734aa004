#!/usr/bin/python3
"""bench_proxy.py - the gateway's proxying against nginx's proxy_pass, same machine, same run.

A program that prints figures, not a test. It starts, in a scratch directory on
loopback ports:
  * an upstream: nginx answering every request with a fixed ~1 KiB JSON body
    (keep-alive, one worker);
  * (a) the gateway with W workers proxying to it, upstream keep-alive on;
  * (b) nginx with W worker_processes proxying to it with `proxy_http_version 1.1;
    proxy_set_header Connection "";` and an upstream block with `keepalive 64`,
    in two configs: "nginx" also adds what the gateway adds to every request
    (X-Forwarded-For/Proto/Host, an X-Request-Id sent upstream and returned),
    so both do the same job; "nginx-bare" is proxy_pass alone.
Then it runs the same `wrk -tT -cC -dD --latency` against each, rotating which
goes first, for R rounds, and prints req/s, P50, P99 and the proxy's own CPU
time per request (from /proc) of every run, with the upstream's CPU time per
request and the whole machine's busy CPU time per request (wrk included: on a
shared machine every process's CPU comes out of the proxy's throughput), the
median of each, and the ratios gateway/nginx (req/s: higher is better;
latencies and CPU: lower is better), with the median of the per-round ratios. Non-2xx answers and socket errors are
printed too: a run with errors is not a fair figure.

Everything it starts is stopped on the way out, on errors and Ctrl-C too. All
traffic stays on 127.0.0.1. Time is bounded: about rounds * 3 * (duration + 2) s
plus start-up.

Usage:
  tests/bench/bench_proxy.py [--workers 1] [--rounds 3] [--duration 10]
                             [--connections 64] [--threads 2] [--gateway build/gateway]
                             [--against both|same|bare]
On a 2-core machine keep --workers 1: wrk needs a core of its own.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SOURCE_DIR = Path(os.environ.get("GATEWAY_SOURCE_DIR") or Path(__file__).resolve().parents[2])
DEFAULT_GATEWAY = os.environ.get("GATEWAY_BIN") or str(SOURCE_DIR / "build" / "gateway")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 15.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixed_body(size):
    """A JSON document of about `size` bytes, the same on every run."""
    items = []
    doc = {"id": 42, "name": "blueprint", "items": items}
    i = 0
    while len(json.dumps(doc, separators=(",", ":"))) < size:
        items.append({"n": i, "label": "item-%04d" % i})
        i += 1
    return json.dumps(doc, separators=(",", ":"))


def http_get(port, path="/", timeout=2.0):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an env proxy
    with opener.open("http://127.0.0.1:%d%s" % (port, path), timeout=timeout) as r:
        return r.status, r.read()


def wait_http(port, proc, what, timeout=START_TIMEOUT):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("%s exited with %s during start-up" % (what, proc.returncode))
        try:
            status, body = http_get(port, "/")
            if status == 200:
                return body
            last = status
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.05)
    raise RuntimeError("%s did not answer on port %d within %.0fs (last: %r)" % (what, port, timeout, last))


class Proc:
    """A child process with its logs in the scratch directory, stopped by stop()."""

    def __init__(self, name, argv, scratch, stop_signal=signal.SIGTERM):
        self.name = name
        self.stop_signal = stop_signal
        self.out = open(scratch / ("%s.out" % name), "wb")
        self.err_path = scratch / ("%s.err" % name)
        self.err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.err,
                                     cwd=str(scratch), start_new_session=True)

    def poll(self):
        return self.proc.poll()

    @property
    def returncode(self):
        return self.proc.returncode

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.out.close()
        self.err.close()
        return self.proc.returncode

    def stderr_tail(self, n=20):
        try:
            return "\n".join(self.err_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


NGINX_COMMON = """\
{user}
worker_processes {workers};
daemon off;
master_process on;
pid {dir}/{name}.pid;
error_log {dir}/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/{name}-client-tmp;
    proxy_temp_path {dir}/{name}-proxy-tmp;
    fastcgi_temp_path {dir}/{name}-fastcgi-tmp;
    uwsgi_temp_path {dir}/{name}-uwsgi-tmp;
    scgi_temp_path {dir}/{name}-scgi-tmp;
    keepalive_requests 1000000;
    keepalive_timeout 65s;
{body}
}}
"""


def nginx_conf(name, scratch, workers, body):
    user = "user root;" if os.geteuid() == 0 else ""  # workers must reach the scratch dir (0700)
    return NGINX_COMMON.format(user=user, workers=workers, dir=scratch, name=name, body=body)


def start_nginx(name, scratch, nginx, workers, body, port):
    conf = scratch / ("%s.conf" % name)
    conf.write_text(nginx_conf(name, scratch, workers, body))
    p = Proc(name, [nginx, "-p", str(scratch), "-e", str(scratch / ("%s.error.log" % name)), "-c", str(conf)],
             scratch, stop_signal=signal.SIGQUIT)
    wait_http(port, p.proc, name)
    return p


def start_upstream(scratch, nginx, port, body):
    escaped = body.replace("\\", "\\\\").replace("'", "\\'")
    http = """\
    server {
        listen 127.0.0.1:%d backlog=4096;
        location / {
            default_type application/json;
            return 200 '%s';
        }
    }""" % (port, escaped)
    return start_nginx("upstream", scratch, nginx, 1, http, port)


# What the gateway adds to every proxied request and answer (PRODUCT.md), as
# nginx would be told to: the client's Host passed on, X-Forwarded-For/Proto/Host,
# and a request id sent upstream and returned to the client. (nginx has no
# traceparent of its own; the gateway also mints one.)
SAME_HEADERS = """
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Request-Id $request_id;
            add_header X-Request-Id $request_id always;"""


def start_nginx_proxy(scratch, nginx, port, upstream_port, workers, name="nginx-proxy", same_headers=False):
    http = """\
    upstream backend {
        server 127.0.0.1:%d;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:%d backlog=4096;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";%s
        }
    }""" % (upstream_port, port, SAME_HEADERS if same_headers else "")
    return start_nginx(name, scratch, nginx, workers, http, port)


def cpu_seconds(pids):
    """User + system CPU time of the processes, in seconds (from /proc)."""
    total = 0
    for pid in pids:
        fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds():
    """CPU time every core of the machine spent busy (not idle or iowait), in seconds."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user..steal, less idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def nginx_workers(proc):
    """The worker processes of an nginx master (the ones doing the work)."""
    out = subprocess.run(["pgrep", "-P", str(proc.proc.pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def start_gateway(scratch, gateway, port, upstream_port, workers):
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
upstreams:
  backend:
    targets: ["127.0.0.1:%d"]
    connect_timeout: 2s
    timeout: 10s
    keepalive: 64
routes:
  - name: all
    match: { prefix: / }
    upstream: backend
""" % (port, workers, upstream_port))
    p = Proc("gateway", [gateway, "-c", str(conf)], scratch)
    wait_http(port, p.proc, "gateway")
    return p


UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def to_ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError("latency %r" % text)
    return float(m.group(1)) * UNIT[m.group(2)]


def parse_wrk(out):
    res = {"rps": None, "p50": None, "p99": None, "non2xx": 0, "socket_errors": 0, "requests": None}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res["rps"] = float(m.group(1))
    for pct, key in (("50", "p50"), ("99", "p99")):
        m = re.search(r"^\s+%s(?:\.000)?%%\s+(\S+)" % pct, out, re.M)
        if m:
            res[key] = to_ms(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        res["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["socket_errors"] = sum(int(x) for x in m.groups())
    m = re.search(r"(\d+) requests in", out)
    if m:
        res["requests"] = int(m.group(1))
    return res


def run_wrk(wrk, port, threads, connections, duration):
    argv = [wrk, "-t%d" % threads, "-c%d" % connections, "-d%ds" % duration, "--latency",
            "http://127.0.0.1:%d/" % port]
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
    return "  %-16s %12.0f %10.3f %10.3f %12.1f %12.1f %12.1f%s" % (
        label, r["rps"], r["p50"], r["p99"], r["cpu_us"], r["up_us"], r["all_us"], errs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=1, help="gateway workers = nginx worker_processes (default 1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per target (0: none)")
    ap.add_argument("--body-bytes", type=int, default=1024)
    ap.add_argument("--gateway", default=DEFAULT_GATEWAY)
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    ap.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    ap.add_argument("--against", dest="nginx_variants", choices=("both", "same", "bare"), default="both",
                    help="nginx configs to run against: 'same' adds the headers the gateway adds "
                         "(X-Forwarded-*, X-Request-Id both ways), 'bare' is proxy_pass alone (default both)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, configs)")
    args = ap.parse_args()

    for path, what in ((args.gateway, "gateway"), (args.nginx, "nginx"), (args.wrk, "wrk")):
        if not os.access(path, os.X_OK):
            sys.exit("bench_proxy: %s not found or not executable: %s" % (what, path))
    if args.rounds < 1 or args.duration < 1 or args.connections < args.threads:
        sys.exit("bench_proxy: need rounds >= 1, duration >= 1, connections >= threads")

    # SIGTERM/SIGHUP end the run like Ctrl-C does, so the finally below cleans up.
    def interrupted(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    scratch = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    procs = []
    status = 0
    variants = {"both": ["nginx", "nginx-bare"], "same": ["nginx"], "bare": ["nginx-bare"]}[args.nginx_variants]
    names = ["gateway"] + variants
    estimate = args.rounds * len(names) * (args.duration + 2) + len(names) * (args.warmup + 2) + 5
    print("bench_proxy: workers %d, wrk -t%d -c%d -d%ds, %d rounds, ~%ds; scratch %s" % (
        args.workers, args.threads, args.connections, args.duration, args.rounds, estimate, scratch), flush=True)
    try:
        body = fixed_body(args.body_bytes)
        up_port, gw_port, ngx_port = free_port(), free_port(), free_port()
        procs.append(start_upstream(scratch, args.nginx, up_port, body))
        gw = start_gateway(scratch, args.gateway, gw_port, up_port, args.workers)
        procs.append(gw)
        targets = {"gateway": gw_port}
        pids = {"gateway": [gw.proc.pid]}
        upstream_pids = nginx_workers(procs[0])
        for name in variants:
            port = ngx_port if name == "nginx" else free_port()
            p = start_nginx_proxy(scratch, args.nginx, port, up_port, args.workers, name=name,
                                  same_headers=(name == "nginx"))
            procs.append(p)
            targets[name] = port
            pids[name] = nginx_workers(p)
        for name, port in targets.items():
            status_code, got = http_get(port)
            if status_code != 200 or got != body.encode():
                raise RuntimeError("%s does not pass the upstream's body through (%d, %d bytes)" % (
                    name, status_code, len(got)))
        print("upstream body %d bytes; every proxy passes it through unchanged" % len(body), flush=True)
        if "nginx" in variants:
            print("'nginx' adds the headers the gateway adds (X-Forwarded-For/Proto/Host, X-Request-Id);"
                  " 'nginx-bare' is proxy_pass alone", flush=True)

        if args.warmup:
            for name, port in targets.items():
                run_wrk(args.wrk, port, args.threads, args.connections, args.warmup)

        results = {name: [] for name in names}
        print("\n  %-16s %12s %10s %10s %12s %12s %12s" % ("run", "req/s", "P50 ms", "P99 ms", "CPU us/req",
                                                     "upstream us", "machine us"))
        for rnd in range(args.rounds):
            # Rotate who goes first, so no one always meets the machine in the same state.
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                for p in procs:
                    if p.poll() is not None:
                        raise RuntimeError("%s died (exit %s):\n%s" % (p.name, p.returncode, p.stderr_tail()))
                cpu0, up0, all0 = cpu_seconds(pids[name]), cpu_seconds(upstream_pids), machine_busy_seconds()
                r = run_wrk(args.wrk, targets[name], args.threads, args.connections, args.duration)
                n = r["requests"] or 0
                per = (lambda d: d * 1e6 / n) if n else (lambda d: 0.0)
                r["cpu_us"] = per(cpu_seconds(pids[name]) - cpu0)
                r["up_us"] = per(cpu_seconds(upstream_pids) - up0)
                r["all_us"] = per(machine_busy_seconds() - all0)
                results[name].append(r)
                print(fmt_row("%s #%d" % (name, rnd + 1), r), flush=True)

        keys = ("rps", "p50", "p99", "cpu_us", "up_us", "all_us")
        med = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in results.items()}
        print("\n  %-16s %12s %10s %10s %12s %12s %12s" % ("median", "req/s", "P50 ms", "P99 ms", "CPU us/req",
                                                          "upstream us", "machine us"))
        for name in names:
            print(fmt_row(name, dict(med[name], non2xx=0, socket_errors=0)))
        for ref in variants:
            ratio = {k: med["gateway"][k] / med[ref][k] if med[ref][k] else float("nan") for k in keys}
            print("  %-16s %12.2f %10.2f %10.2f %12.2f %12.2f %12.2f" % (
                "gateway/" + ref, ratio["rps"], ratio["p50"], ratio["p99"], ratio["cpu_us"], ratio["up_us"],
                ratio["all_us"]))
            # Each round runs all back to back, so the ratio within a round shares the
            # machine's state of the moment; its median is steadier on a shared box.
            paired = [g["rps"] / n["rps"] for g, n in zip(results["gateway"], results[ref]) if n["rps"]]
            if paired:
                print("  %-16s %12.2f   (per round: %s)" % ("  paired median", statistics.median(paired),
                                                         " ".join("%.2f" % x for x in paired)))
        print("\n  req/s ratio >= 1.00 means the gateway is at least as fast as nginx proxy_pass;"
              "\n  latency and CPU ratios <= 1.00 mean it is at least as quick and as frugal."
              "\n  CPU us/req is the proxy's own processes (user + system), the upstream and wrk excluded;"
              "\n  'upstream us' is the upstream nginx's, 'machine us' every core's busy time (wrk included).")
        errors = {name: sum(r["non2xx"] + r["socket_errors"] for r in rs) for name, rs in results.items()}
        if any(errors.values()):
            print("  WARNING: errors during the runs: %s" % errors)
    except KeyboardInterrupt:
        print("\nbench_proxy: interrupted; stopping everything", file=sys.stderr)
        status = 130
    except Exception as e:  # noqa: BLE001 - report, then clean up
        print("bench_proxy: %s" % e, file=sys.stderr)
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        for p in reversed(procs):
            rc = p.stop()
            if p.name == "gateway" and rc not in (0, None) and status == 0:
                print("bench_proxy: the gateway exited with %s:\n%s" % (rc, p.stderr_tail()), file=sys.stderr)
                status = 1
        if args.keep or status not in (0, 130):
            print("bench_proxy: logs kept in %s" % scratch, file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""bench_compression.py - what response compression costs, and what it does to throughput.

A program that prints figures, not a test. Two parts:

(1) Cost per level, in this process, with the libraries the gateway links: gzip
    through Python's zlib (the same zlib, windowBits 31, memLevel 8, as
    gateway/compress.c) at levels 1, 6, 9, and brotli through ctypes on
    libbrotlienc.so.1 (BrotliEncoderCompress, lgwin 22, generic mode: the
    encoder's defaults, as the gateway uses for a buffered answer; a streamed
    one has lgwin 19) at qualities 1, 4, 5, 6, 9, 11, on
    JSON bodies of 1 KiB, 16 KiB, 128 KiB and 1 MiB. For each: ms per MiB of
    input (median of the timed runs) and the ratio compressed/original. Every
    output is decoded once and compared with the input.

(2) Throughput through the gateway: nginx (one worker) serves a 16 KiB JSON
    document; the gateway (W workers, a `compression:` section with the default
    levels, gzip 6 and brotli 5) proxies it; `wrk -tT -cC -dD --latency` runs with
    `-H "Accept-Encoding: br"`, `gzip`, and none, plus the same gateway without a
    compression section ("off"), alternating the order for R rounds. Printed:
    req/s, P50, P99 and transfer per run, the median of each, and the ratios
    compressed/identity. Before the runs, one request per variant checks that
    the gateway really answers with that coding and that it decodes to the
    upstream's body.

(3) Cache hits of compressed entries against identity hits: part 2 with the
    route cached (store: memory). Every answer is then a hit, and an entry holds
    each coding made once when it was stored, so br and gzip hits send stored
    bytes as identity hits do; the target is br/none and gzip/none >= 0.95.

(4) A streamed answer: nginx serves a --stream-mib (default 32) MiB JSON file;
    the gateway (the default levels) proxies it, over its 1 MiB buffer, so it
    streams (compressed piece by piece for gzip and br); nginx proxy_pass
    (proxy_buffering on, `gzip on` at level 6 for its gzip row; Debian's nginx
    has no brotli) does the same. One curl at a time downloads it (-o
    /dev/null, no decoding), R rounds, order alternating. Printed: MiB/s of
    the identity body per second of download, the bytes on the wire against
    the body compressed whole (what flushing each read costs), and the proxy's
    CPU ms per MiB (from /proc). Every variant is decoded once and compared
    with the file first.

Everything it starts is stopped on the way out, on errors and Ctrl-C too. All
traffic stays on 127.0.0.1. Time is bounded: part 1 takes about 36 cells x
--cell-seconds (a single brotli-11 run on 1 MiB can take longer than that);
part 2 about rounds * 4 * (duration + 1) s plus warm-up and start-up.

Usage:
  tests/bench/bench_compression.py [--part 1|2|3|4|both|all] [--cell-seconds 0.3]
       [--stream-mib 32]
       [--workers 1] [--rounds 3] [--duration 5] [--connections 64] [--threads 2]
       [--body-bytes 16384] [--gateway build/gateway]
On a 2-core machine keep --workers 1: wrk needs a core of its own.
"""

import argparse
import ctypes
import http.client
import json
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
import zlib
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_proxy import (DEFAULT_GATEWAY, Proc, cpu_seconds, free_port, nginx_workers,  # noqa: E402
                         parse_wrk, start_nginx, wait_http)

KIB = 1024
MIB = 1024 * 1024
GZIP_LEVELS = [1, 6, 9]
BROTLI_QUALITIES = [1, 4, 5, 6, 9, 11]
SIZES = [KIB, 16 * KIB, 128 * KIB, MIB]

_WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett",
          "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]


def json_body(size, seed=1):
    """A valid JSON document of exactly `size` bytes (at least 40): records (ids, words, numbers, hex, booleans, ISO
    dates) of about `size` bytes, the same on every run: compresses like a
    typical API answer, not like a run of one repeated record."""
    rnd = random.Random(seed)
    items = []
    doc = {"count": 0, "items": items}
    length = 24
    i = 0
    while length < size:
        item = {"id": 100000 + i, "name": "%s %s" % (rnd.choice(_WORDS), rnd.choice(_WORDS)),
                "owner": rnd.choice(_WORDS) + "@example.com", "score": round(rnd.random() * 1000, 2),
                "hash": "%016x" % rnd.getrandbits(64), "active": rnd.random() < 0.5,
                "created": "2024-%02d-%02dT%02d:%02d:00Z" % (rnd.randint(1, 12), rnd.randint(1, 28),
                                                              rnd.randint(0, 23), rnd.randint(0, 59)),
                "tags": [rnd.choice(_WORDS) for _ in range(rnd.randint(0, 3))]}
        items.append(item)
        length += len(json.dumps(item, separators=(",", ":"))) + 1
        i += 1
    # Trim to leave room for a "note" of words that makes the size exact.
    overhead = len(',"note":""')
    while True:
        doc["count"] = len(items)
        text = json.dumps(doc, separators=(",", ":"))
        if len(text) + overhead <= size or not items:
            break
        items.pop()
    need = size - len(text) - overhead
    if need < 0:
        return text.encode()
    note = ""
    while len(note) < need:
        note += rnd.choice(_WORDS) + " "
    doc["note"] = note[:need]
    text = json.dumps(doc, separators=(",", ":"))
    assert len(text) == size, (len(text), size)
    return text.encode()


# ---------------------------------------------------------------------------
# Codecs

class Brotli:
    """libbrotlienc / libbrotlidec through ctypes (no Python brotli module here)."""

    def __init__(self):
        enc = ctypes.CDLL("libbrotlienc.so.1")
        dec = ctypes.CDLL("libbrotlidec.so.1")
        self._max = enc.BrotliEncoderMaxCompressedSize
        self._max.restype = ctypes.c_size_t
        self._max.argtypes = [ctypes.c_size_t]
        self._enc = enc.BrotliEncoderCompress
        self._enc.restype = ctypes.c_int
        self._enc.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_char_p,
                              ctypes.POINTER(ctypes.c_size_t), ctypes.c_char_p]
        self._dec = dec.BrotliDecoderDecompress
        self._dec.restype = ctypes.c_int
        self._dec.argtypes = [ctypes.c_size_t, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_char_p]

    def compress(self, data, quality, lgwin=22, mode=0):
        cap = self._max(len(data)) or len(data) + 1024
        out = ctypes.create_string_buffer(cap)
        size = ctypes.c_size_t(cap)
        if self._enc(quality, lgwin, mode, len(data), data, ctypes.byref(size), out) != 1:
            raise RuntimeError("BrotliEncoderCompress failed (quality %d, %d bytes)" % (quality, len(data)))
        return out.raw[:size.value]

    def decompress(self, data, expect_size):
        out = ctypes.create_string_buffer(expect_size + 1)
        size = ctypes.c_size_t(expect_size + 1)
        if self._dec(len(data), data, ctypes.byref(size), out) != 1:
            raise RuntimeError("BrotliDecoderDecompress failed")
        return out.raw[:size.value]


def gzip_compress(data, level):
    c = zlib.compressobj(level, zlib.DEFLATED, 31, 8, zlib.Z_DEFAULT_STRATEGY)
    return c.compress(data) + c.flush()


def gunzip(data):
    d = zlib.decompressobj(31)
    out = d.decompress(data) + d.flush()
    if not d.eof or d.unused_data:
        raise RuntimeError("bad gzip stream")
    return out


# ---------------------------------------------------------------------------
# Part 1: cost per MiB and ratio

def time_cell(fn, data, budget):
    """Median seconds of fn(data) over runs filling about `budget` seconds (at
    least 3 runs, or 1 when a single run takes longer than the budget)."""
    times = []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        out = fn(data)
        times.append(time.perf_counter() - t0)
        spent = time.perf_counter() - started
        if spent >= budget and (len(times) >= 3 or times[0] >= budget):
            break
        if len(times) >= 2000:
            break
    return statistics.median(times), out, len(times)


def part1(budget):
    br = Brotli()
    bodies = {size: json_body(size) for size in SIZES}
    codecs = [("gzip-%d" % lv, (lambda lv: lambda d: gzip_compress(d, lv))(lv), "gzip") for lv in GZIP_LEVELS]
    codecs += [("br-%d" % q, (lambda q: lambda d: br.compress(d, q))(q), "br") for q in BROTLI_QUALITIES]
    print("\n(1) compression cost, in process: ms per MiB of input (median) / ratio compressed:original")
    print("    JSON bodies: %s" % ", ".join("%s = %d bytes" % (label(s), len(b)) for s, b in bodies.items()))
    head = "  %-8s" % "codec" + "".join("%22s" % label(s) for s in SIZES)
    print(head)
    print("  %-8s" % "" + "".join("%22s" % "ms/MiB   ratio" for _ in SIZES))
    for name, fn, kind in codecs:
        cells = []
        for size in SIZES:
            data = bodies[size]
            t, out, _runs = time_cell(fn, data, budget)
            back = gunzip(out) if kind == "gzip" else br.decompress(out, len(data))
            if back != data:
                raise RuntimeError("%s on %d bytes does not decode to its input" % (name, len(data)))
            ms_per_mib = t * 1000.0 / (len(data) / MIB)
            cells.append("%13.1f %7.3f" % (ms_per_mib, len(out) / len(data)))
        print("  %-8s" % name + "".join("%22s" % c for c in cells), flush=True)
    print("  (ms/MiB: lower is cheaper; a 16 KiB answer costs ms/MiB / 64 ms. ratio: lower is smaller.)")


def label(size):
    return "%d KiB" % (size // KIB) if size < MIB else "%d MiB" % (size // MIB)


# ---------------------------------------------------------------------------
# Part 2: req/s through the gateway

def start_static_upstream(scratch, nginx, port, body):
    www = scratch / "www"
    www.mkdir(exist_ok=True)
    (www / "body.json").write_bytes(body)
    http = """\
    server {
        listen 127.0.0.1:%d backlog=4096;
        root %s;
        etag off;
        location / {
            default_type application/json;
            try_files /body.json =404;
        }
    }""" % (port, www)
    return start_nginx("upstream", scratch, nginx, 1, http, port)


def start_gateway(scratch, gateway, name, port, upstream_port, workers, compression, cached=False):
    conf = scratch / ("%s.yaml" % name)
    section = "cache:\n  store: memory\n  default_ttl: 600s\n" if cached else ""
    if compression:
        section += """\
compression:
  algorithms: [br, gzip]
  min_bytes: 1024
  types: [application/json, "text/*", application/javascript, image/svg+xml]
  brotli_quality: 5
  gzip_level: 6
"""
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
%supstreams:
  backend:
    targets: ["127.0.0.1:%d"]
    connect_timeout: 2s
    timeout: 10s
    keepalive: 64
routes:
  - name: all
    match: { prefix: / }
    upstream: backend
%s""" % (port, workers, section, upstream_port, "    cache: { ttl: 600s }\n" if cached else ""))
    p = Proc(name, [gateway, "-c", str(conf)], scratch)
    wait_http(port, p.proc, name)
    return p


def check_variant(port, ae, body, br, cached=False):
    """One request: the coding must be the one asked for, and decode to body.
    Returns the size of the answer's body on the wire."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", "/", skip_accept_encoding=True)
        if ae:
            conn.putheader("Accept-Encoding", ae)
        conn.endheaders()
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    ce = resp.getheader("Content-Encoding")
    want = ae or None
    if resp.status != 200 or ce != want:
        raise RuntimeError("Accept-Encoding %r: got %d with Content-Encoding %r (expected %r)"
                           % (ae, resp.status, ce, want))
    if cached and resp.getheader("X-Cache") not in ("HIT", "MISS"):
        raise RuntimeError("Accept-Encoding %r: X-Cache %r" % (ae, resp.getheader("X-Cache")))
    got = gunzip(raw) if ce == "gzip" else br.decompress(raw, len(body)) if ce == "br" else raw
    if got != body:
        raise RuntimeError("Accept-Encoding %r: the body does not decode to the upstream's" % ae)
    return len(raw)


def run_wrk(wrk, port, threads, connections, duration, ae):
    argv = [wrk, "-t%d" % threads, "-c%d" % connections, "-d%ds" % duration, "--latency"]
    if ae:
        argv += ["-H", "Accept-Encoding: %s" % ae]
    argv.append("http://127.0.0.1:%d/" % port)
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise RuntimeError("wrk did not finish within %ds" % (duration + 30))
    if res.returncode != 0:
        raise RuntimeError("wrk failed (%d): %s" % (res.returncode, res.stderr.strip()))
    parsed = parse_wrk(res.stdout)
    if parsed["rps"] is None or parsed["p50"] is None or parsed["p99"] is None:
        raise RuntimeError("could not parse wrk output:\n" + res.stdout)
    m = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)", res.stdout)
    parsed["mib_s"] = float(m.group(1)) * {"B": 1 / MIB, "KB": 1 / KIB, "MB": 1.0, "GB": 1024.0}[m.group(2)] \
        if m else float("nan")
    return parsed


def part2(args, scratch, procs, cached=False):
    br = Brotli()
    body = json_body(args.body_bytes)
    tag = "cached-" if cached else ""
    up_port, gw_port, off_port = free_port(), free_port(), free_port()
    procs.append(start_static_upstream(scratch, args.nginx, up_port, body))
    procs.append(start_gateway(scratch, args.gateway, tag + "gateway", gw_port, up_port, args.workers, True, cached))
    procs.append(start_gateway(scratch, args.gateway, tag + "gateway-off", off_port, up_port, args.workers, False,
                               cached))
    variants = [("br", gw_port, "br"), ("gzip", gw_port, "gzip"), ("none", gw_port, None), ("off", off_port, None)]
    wire = {}
    for name, port, ae in variants:
        wire[name] = check_variant(port, ae, body, br, cached)
        if cached:  # the first was a MISS: from here on every answer must be a hit
            check_variant(port, ae, body, br, cached)
    if cached:
        print("\n(3) cache hits through the gateway (workers %d, store: memory): %d-byte JSON; wrk -t%d -c%d -d%ds, "
              "%d rounds; target br/none and gzip/none >= 0.95"
              % (args.workers, len(body), args.threads, args.connections, args.duration, args.rounds))
    else:
        print("\n(2) through the gateway (workers %d): nginx upstream, %d-byte JSON; wrk -t%d -c%d -d%ds, %d rounds"
              % (args.workers, len(body), args.threads, args.connections, args.duration, args.rounds))
    print("    body on the wire: br %d, gzip %d, none %d bytes; 'off' = a gateway without a compression section"
          % (wire["br"], wire["gzip"], wire["none"]))
    if args.warmup:
        for name, port, ae in variants:
            run_wrk(args.wrk, port, args.threads, args.connections, args.warmup, ae)
    results = {name: [] for name, _, _ in variants}
    print("\n  %-12s %12s %10s %10s %12s" % ("run", "req/s", "P50 ms", "P99 ms", "MiB/s"))
    for rnd in range(args.rounds):
        order = variants if rnd % 2 == 0 else list(reversed(variants))
        for name, port, ae in order:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError("%s died (exit %s):\n%s" % (p.name, p.returncode, p.stderr_tail()))
            r = run_wrk(args.wrk, port, args.threads, args.connections, args.duration, ae)
            results[name].append(r)
            errs = ""
            if r["non2xx"] or r["socket_errors"]:
                errs = "  non-2xx %d, socket errors %d" % (r["non2xx"], r["socket_errors"])
            print("  %-12s %12.0f %10.3f %10.3f %12.1f%s" % ("%s #%d" % (name, rnd + 1), r["rps"], r["p50"],
                                                             r["p99"], r["mib_s"], errs), flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99", "mib_s")}
           for name, rs in results.items()}
    print("\n  %-12s %12s %10s %10s %12s" % ("median", "req/s", "P50 ms", "P99 ms", "MiB/s"))
    for name, _, _ in variants:
        m = med[name]
        print("  %-12s %12.0f %10.3f %10.3f %12.1f" % (name, m["rps"], m["p50"], m["p99"], m["mib_s"]))
    print()
    for name in ("br", "gzip"):
        for base in ("none", "off"):
            b = med[base]
            print("  %-12s req/s %5.2f   P50 %5.2f   P99 %5.2f   bytes on the wire %5.3f" % (
                "%s/%s" % (name, base), med[name]["rps"] / b["rps"], med[name]["p50"] / b["p50"],
                med[name]["p99"] / b["p99"], wire[name] / wire["none"]))
    b = med["off"]
    print("  %-12s req/s %5.2f   P50 %5.2f   P99 %5.2f   (the cost of the checks alone)" % (
        "none/off", med["none"]["rps"] / b["rps"], med["none"]["p50"] / b["p50"], med["none"]["p99"] / b["p99"]))
    # Each round runs every variant back to back, so a ratio within a round shares
    # the machine's state of the moment; its median is steadier on a shared box.
    print()
    for name, base in (("br", "none"), ("gzip", "none"), ("none", "off")):
        paired = [x["rps"] / y["rps"] for x, y in zip(results[name], results[base]) if y["rps"]]
        print("  %-12s req/s paired median %5.2f   (per round: %s)" % (
            "%s/%s" % (name, base), statistics.median(paired), " ".join("%.2f" % x for x in paired)))
    errors = {name: sum(r["non2xx"] + r["socket_errors"] for r in rs) for name, rs in results.items()}
    if any(errors.values()):
        print("  WARNING: errors during the runs: %s" % errors)


# ---------------------------------------------------------------------------
# Part 4: a streamed answer

def stream_body(mib):
    """mib MiB of JSON-like text: 8 different 1 MiB documents, repeated (a
    repeat is 8 MiB back, beyond brotli's 4 MiB window and gzip's 32 KiB)."""
    docs = [json_body(MIB, seed=100 + i) for i in range(min(8, mib))]
    return b"".join(docs[i % len(docs)] for i in range(mib))


def start_stream_upstream(scratch, nginx, port, body):
    www = scratch / "www-stream"
    www.mkdir(exist_ok=True)
    (www / "big.json").write_bytes(body)
    http = """\
    server {
        listen 127.0.0.1:%d backlog=4096;
        root %s;
        etag off;
        location / {
            default_type application/json;
            try_files /big.json =404;
        }
    }""" % (port, www)
    return start_nginx("stream-upstream", scratch, nginx, 1, http, port)


def start_stream_nginx(scratch, nginx, port, upstream_port):
    http = """\
    upstream backend {
        server 127.0.0.1:%d;
        keepalive 16;
    }
    server {
        listen 127.0.0.1:%d backlog=4096;
        gzip on;
        gzip_comp_level 6;
        gzip_min_length 1024;
        gzip_types application/json;
        gzip_proxied any;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }""" % (upstream_port, port)
    return start_nginx("stream-nginx", scratch, nginx, 1, http, port)


def download(port, ae, pids):
    """(seconds, bytes on the wire, proxy CPU seconds) of one download."""
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{time_total} %{size_download} %{http_code}",
            "--max-time", "120"]
    if ae:
        argv += ["-H", "Accept-Encoding: %s" % ae]
    argv.append("http://127.0.0.1:%d/big.json" % port)
    cpu0 = cpu_seconds(pids)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=130).stdout.split()
    cpu = cpu_seconds(pids) - cpu0
    if len(out) != 3 or out[2] != "200":
        raise RuntimeError("download %r from port %d: %r" % (ae, port, out))
    return float(out[0]), int(out[1]), cpu


def check_stream(port, ae, body, br):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.putrequest("GET", "/big.json", skip_accept_encoding=True)
        if ae:
            conn.putheader("Accept-Encoding", ae)
        conn.endheaders()
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    ce = resp.getheader("Content-Encoding")
    if resp.status != 200 or ce != ae:
        raise RuntimeError("stream %r: %d, Content-Encoding %r" % (ae, resp.status, ce))
    got = gunzip(raw) if ce == "gzip" else br.decompress(raw, len(body)) if ce == "br" else raw
    if got != body:
        raise RuntimeError("stream %r: the body does not decode to the file" % ae)


def part4(args, scratch, procs):
    br = Brotli()
    body = stream_body(args.stream_mib)
    up_port, gw_port, ngx_port = free_port(), free_port(), free_port()
    procs.append(start_stream_upstream(scratch, args.nginx, up_port, body))
    gw = start_gateway(scratch, args.gateway, "stream-gateway", gw_port, up_port, args.workers, True)
    procs.append(gw)
    ngx = start_stream_nginx(scratch, args.nginx, ngx_port, up_port)
    procs.append(ngx)
    variants = [("gateway identity", gw_port, None, gw), ("gateway gzip", gw_port, "gzip", gw),
                ("gateway br", gw_port, "br", gw), ("nginx identity", ngx_port, None, ngx),
                ("nginx gzip", ngx_port, "gzip", ngx)]
    for name, port, ae, _ in variants:
        check_stream(port, ae, body, br)
    whole = {"gzip": len(gzip_compress(body, 6)), "br": len(br.compress(body, 5))}
    print("\n(4) a streamed %d MiB JSON answer, one download at a time (curl, no decoding), %d rounds; "
          "gateway workers %d, nginx 1 worker" % (args.stream_mib, args.rounds, args.workers))
    res = {name: [] for name, _, _, _ in variants}
    for rnd in range(args.rounds):
        order = variants if rnd % 2 == 0 else list(reversed(variants))
        for name, port, ae, proc in order:
            pids = nginx_workers(proc) if name.startswith("nginx") else [proc.proc.pid]
            res[name].append(download(port, ae, pids))
    print("\n  %-18s %10s %14s %12s %14s" % ("median", "MiB/s", "wire bytes", "wire/whole", "CPU ms/MiB"))
    for name, _, ae, _ in variants:
        t = statistics.median(r[0] for r in res[name])
        wire = statistics.median(r[1] for r in res[name])
        cpu = statistics.median(r[2] for r in res[name])
        rel = "%12.4f" % (wire / whole[ae]) if ae else "%12s" % "-"
        print("  %-18s %10.1f %14d %s %14.2f" % (name, args.stream_mib / t, wire, rel,
                                                 cpu * 1000 / args.stream_mib), flush=True)
    print("  (MiB/s of the %d MiB body; wire/whole: bytes sent against the body compressed in one piece at the "
          "same level, gzip %d, br %d)" % (args.stream_mib, whole["gzip"], whole["br"]))
    for name in ("gateway identity", "gateway gzip"):
        base = name.replace("gateway", "nginx")
        paired = [b[0] / a[0] for a, b in zip(res[name], res[base])]
        print("  %-34s throughput paired median %5.2f" % ("%s / %s" % (name, base), statistics.median(paired)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["1", "2", "3", "4", "both", "all"], default="both",
                    help="both = 1 and 2; all = 1, 2, 3 and 4")
    ap.add_argument("--stream-mib", type=int, default=32, help="part 4: the streamed answer's size")
    ap.add_argument("--cell-seconds", type=float, default=0.3, help="timing budget per part-1 cell")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per variant (0: none)")
    ap.add_argument("--body-bytes", type=int, default=16 * KIB)
    ap.add_argument("--gateway", default=DEFAULT_GATEWAY)
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    ap.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, configs)")
    args = ap.parse_args()

    if args.part in ("2", "3", "4", "both", "all"):
        for path, what in ((args.gateway, "gateway"), (args.nginx, "nginx"), (args.wrk, "wrk")):
            if not os.access(path, os.X_OK):
                sys.exit("bench_compression: %s not found or not executable: %s" % (what, path))
        if args.rounds < 1 or args.duration < 1 or args.connections < args.threads:
            sys.exit("bench_compression: need rounds >= 1, duration >= 1, connections >= threads")

    def interrupted(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    scratch = Path(tempfile.mkdtemp(prefix="bench-compression-"))
    procs = []
    status = 0
    try:
        if args.part in ("1", "both", "all"):
            part1(args.cell_seconds)
        if args.part in ("2", "both", "all"):
            part2(args, scratch, procs)
        if args.part in ("3", "all"):
            part2(args, scratch, procs, cached=True)
        if args.part in ("4", "all"):
            part4(args, scratch, procs)
    except KeyboardInterrupt:
        print("\nbench_compression: interrupted; stopping everything", file=sys.stderr)
        status = 130
    except Exception as e:  # noqa: BLE001 - report, then clean up
        print("bench_compression: %s" % e, file=sys.stderr)
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for p in reversed(procs):
            rc = p.stop()
            if p.name.startswith("gateway") and rc not in (0, None) and status == 0:
                print("bench_compression: %s exited with %s:\n%s" % (p.name, rc, p.stderr_tail()), file=sys.stderr)
                status = 1
        if args.keep or status not in (0, 130):
            print("bench_compression: logs kept in %s" % scratch, file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

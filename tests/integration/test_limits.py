"""Client-side limits: max_body_bytes (413), max_header_bytes (431 or 400, connection
closed), read_timeout against idle and slow (slowloris) clients, max_connections.
Each limit is checked on both sides of its edge, and the upstream must not see what
the gateway refused."""

import json
import socket
import threading
import time

import pytest

from harness import (fresh, gateway_config, peer_closed, raw_connect, read_response, session, upstream_config,
                     wait_until)

BODY_LIMIT = 64 * 1024
HEADER_LIMIT = 8 * 1024
READ_TIMEOUT = 1.0


class Env:
    pass


@pytest.fixture(scope="module")
def env(module_stack):
    e = Env()
    e.up = module_stack.upstream()
    e.gw = module_stack.gateway(gateway_config(
        {"up": upstream_config([e.up])},
        server={"max_body_bytes": "64KiB", "max_header_bytes": "8KiB", "read_timeout": "1s"}))
    return e


def assert_gateway_error(status, headers, body, expect):
    assert status in expect, "expected %s, got %d: %r" % (expect, status, body[:300])
    ctype = headers.get("Content-Type") or ""
    assert ctype.startswith("application/json"), "error answer is %r, not JSON: %r" % (ctype, body[:200])
    doc = json.loads(body)
    assert doc.get("status") == status and doc.get("error"), doc
    assert doc.get("request_id") == headers.get("X-Request-Id"), (doc, headers.get("X-Request-Id"))


# --- body size -------------------------------------------------------------------

def test_body_at_limit_accepted(env):
    body = b"b" * BODY_LIMIT
    r = fresh("POST", env.gw.url("/body/at-limit"), data=body)
    assert r.status_code == 200, r.text[:200]
    assert r.json()["body_len"] == BODY_LIMIT


def test_body_over_limit_413(env):
    body = b"b" * (BODY_LIMIT + 1)
    r = fresh("POST", env.gw.url("/body/over-limit"), data=body)
    assert_gateway_error(r.status_code, r.headers, r.content, (413,))
    assert env.up.count(path="/body/over-limit") == 0, "the upstream got a body over the limit"


def test_chunked_body_over_limit_413(env):
    """No Content-Length to judge by: the limit holds for a chunked body too."""
    pieces = (b"c" * 8192 for _ in range(BODY_LIMIT // 8192 + 2))
    r = fresh("POST", env.gw.url("/body/over-limit-chunked"), data=pieces)
    assert_gateway_error(r.status_code, r.headers, r.content, (413,))
    assert env.up.count(path="/body/over-limit-chunked") == 0


def test_chunked_body_under_limit_accepted(env):
    pieces = (b"c" * 8192 for _ in range(4))
    r = fresh("POST", env.gw.url("/body/under-limit-chunked"), data=pieces)
    assert r.status_code == 200 and r.json()["body_len"] == 4 * 8192


# --- header size -------------------------------------------------------------------

def _raw_exchange(port, data, timeout=5):
    s = raw_connect(port, timeout)
    try:
        s.sendall(data)
        status, headers, body = read_response(s)
        closed = peer_closed(s, 3)
        return status, headers, body, closed
    finally:
        s.close()


def test_headers_under_limit_accepted(env):
    big = "h" * 6000
    r = fresh("GET", env.gw.url("/hdr/under"), headers={"X-Big": big})
    assert r.status_code == 200
    assert r.json()["headers"].get("x-big") == [big]


@pytest.mark.parametrize("shape", ["one-big-header", "many-headers"])
def test_headers_over_limit_rejected_and_closed(env, shape):
    if shape == "one-big-header":
        extra = "X-Big: %s\r\n" % ("h" * (HEADER_LIMIT + 2000))
    else:
        extra = "".join("X-H%03d: %s\r\n" % (i, "v" * 60) for i in range(200))
    req = ("GET /hdr/over HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % extra).encode()
    status, headers, body, closed = _raw_exchange(env.gw.port, req)
    assert_gateway_error(status, headers, body, (431, 400))
    assert closed, "connection left open after a header block over max_header_bytes"
    assert env.up.count(path="/hdr/over") == 0


def test_malformed_request_400(env):
    status, headers, body, closed = _raw_exchange(env.gw.port, b"GARBAGE\r\n\r\n")
    assert status == 400, "malformed request line: %d %r" % (status, body[:200])
    assert closed
    status, headers, body, closed = _raw_exchange(env.gw.port, b"GET /x HTTP/1.1\r\nNo colon here\r\n\r\n")
    assert status == 400, "malformed header line: %d %r" % (status, body[:200])


# --- read_timeout (slow and idle clients) ---------------------------------------------

def _time_to_close(sock, limit):
    t0 = time.monotonic()
    closed = peer_closed(sock, limit)
    return closed, time.monotonic() - t0


def test_idle_connection_closed(env):
    with raw_connect(env.gw.port) as s:
        closed, dt = _time_to_close(s, READ_TIMEOUT + 3)
    assert closed, "an idle connection (nothing sent) was still open after %.1fs" % dt
    assert dt >= READ_TIMEOUT * 0.5, "closed after %.2fs, before read_timeout (%.1fs)" % (dt, READ_TIMEOUT)


def test_partial_headers_then_silence_closed(env):
    with raw_connect(env.gw.port) as s:
        s.sendall(b"GET /slow/partial HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: 1\r\n")
        closed, dt = _time_to_close(s, READ_TIMEOUT + 3)
    assert closed, "a connection with half a header block was still open after %.1fs" % dt
    assert env.up.count(path="/slow/partial") == 0


def test_slowloris_trickle_closed(env):
    """A byte every 0.2 s, never finishing the header block: read_timeout bounds the
    whole header block, not just the gap between two reads."""
    with raw_connect(env.gw.port) as s:
        s.sendall(b"GET /slow/trickle HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        t0 = time.monotonic()
        closed = False
        limit = READ_TIMEOUT * 3 + 2
        while time.monotonic() - t0 < limit:
            try:
                s.sendall(b"X")
            except OSError:
                closed = True
                break
            if peer_closed(s, 0.2):
                closed = True
                break
        dt = time.monotonic() - t0
    assert closed, "a client trickling one header byte every 0.2s was still connected after %.1fs " \
                   "(read_timeout %.1fs)" % (dt, READ_TIMEOUT)
    assert env.up.count(path="/slow/trickle") == 0


def test_slow_body_closed(env):
    with raw_connect(env.gw.port) as s:
        s.sendall(b"POST /slow/body HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nonly-part")
        closed, dt = _time_to_close(s, READ_TIMEOUT + 3)
    assert closed, "a connection stuck in the middle of its body was still open after %.1fs" % dt
    assert env.up.count(path="/slow/body") == 0


def test_idle_keepalive_closed_after_request(env):
    with raw_connect(env.gw.port) as s:
        s.sendall(b"GET /slow/ka HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, _ = read_response(s)
        assert status == 200
        closed, dt = _time_to_close(s, READ_TIMEOUT + 3)
    assert closed, "an idle keep-alive connection was still open %.1fs after its answer" % dt


def test_slow_clients_do_not_block_others(env):
    socks = []
    try:
        for i in range(20):
            s = raw_connect(env.gw.port)
            s.sendall(b"GET /slow/many HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        for i in range(5):
            r = fresh("GET", env.gw.url("/slow/other?i=%d" % i), timeout=2)
            assert r.status_code == 200 and r.json()["query"] == "i=%d" % i
    finally:
        for s in socks:
            s.close()


# --- max_connections ------------------------------------------------------------------------

def test_max_connections(stack):
    up = stack.upstream()
    gw = stack.gateway(gateway_config({"up": [up]}, server={"max_connections": 4, "read_timeout": "30s"}))
    held = []
    fifth = None
    try:
        for i in range(4):
            s = raw_connect(gw.port)
            s.sendall(b"GET /mc/held/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            status, _, _ = read_response(s)
            assert status == 200, "held connection %d: %d" % (i, status)
            held.append(s)
        fifth = raw_connect(gw.port)  # completes in the kernel's backlog
        fifth.sendall(b"GET /mc/fifth HTTP/1.1\r\nHost: x\r\n\r\n")
        fifth.settimeout(1.0)
        try:
            early = fifth.recv(1)
        except socket.timeout:
            early = None
        assert early is None, "the 5th connection was served (or closed: %r) while 4 were open; " \
                              "max_connections is 4" % early
        assert up.count(path="/mc/fifth") == 0

        held.pop(0).close()
        fifth.settimeout(5)
        t0 = time.monotonic()
        status, _, body = read_response(fifth)
        assert status == 200, "the waiting connection got %d" % status
        assert json.loads(body)["path"] == "/mc/fifth"
        assert time.monotonic() - t0 < 3, "the waiting connection was served late"
        # The other held connections still work.
        for i, s in enumerate(held):
            s.sendall(b"GET /mc/again/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            assert read_response(s)[0] == 200
    finally:
        for s in held:
            s.close()
        if fifth:
            fifth.close()
    # All closed: new connections are served at once.
    wait_until(lambda: fresh("GET", gw.url("/mc/after"), timeout=1).status_code == 200, 5,
               "a new connection served after all were closed")


def test_many_concurrent_connections_under_default_cap(stack):
    """200 clients at once, each a new connection: every one answered."""
    up = stack.upstream()
    gw = stack.gateway(gateway_config({"up": [up]}))
    codes = []
    lock = threading.Lock()

    def client(i):
        try:
            with session() as s:
                c = s.get(gw.url("/conc/echo?i=%d" % i), timeout=10)
                ok = c.status_code == 200 and c.json()["query"] == "i=%d" % i
        except Exception as e:  # noqa: BLE001
            ok = repr(e)
        with lock:
            codes.append(ok)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert codes.count(True) == 200, [c for c in codes if c is not True][:5]
    assert up.count(path="/conc/echo") == 200

"""Hostile request paths and odd request heads: dot segments (plain and
percent-encoded), encoded slashes and NUL must never carry a request out of the
route's prefix (400 from the gateway, nothing upstream); duplicate Host is 400; an
HTTP/1.0 request without Host still reaches the upstream with one; repeated
X-Forwarded-For headers are joined and the client appended; TRACE and CONNECT get
405 at once; a 431 says "Request Header Fields Too Large".

Requests go out on raw sockets, byte for byte, so no client library normalises
the path first. One gateway for the file: /public/ goes to upstream `pub`,
/admin/ to `admin`, everything else to `other`; a path that escaped /public/
would show up at one of them."""

import http.client
import io
import json
import re
import time

import pytest

from harness import gateway_config, raw_connect, route, upstream_config

HEADER_LIMIT = 8 * 1024


class Env:
    pass


@pytest.fixture(scope="module")
def env(module_stack):
    e = Env()
    e.ups = {n: module_stack.upstream(n) for n in ("pub", "admin", "other")}
    e.pub = e.ups["pub"]
    routes = [route("public", "pub", prefix="/public/"),
              route("admin", "admin", prefix="/admin/"),
              route("other", "other", prefix="/")]
    e.gw = module_stack.gateway(gateway_config({n: upstream_config([u]) for n, u in e.ups.items()}, routes=routes,
                                               server={"max_header_bytes": "8KiB"}))
    return e


def total(env):
    return sum(u.count() for u in env.ups.values())


def all_seen(env):
    return [(name, r.method, r.target) for name, u in env.ups.items() for r in u.seen()]


def exchange(port, data, timeout=5):
    """Send raw bytes, read one response: (status, reason, headers, body, seconds)."""
    with raw_connect(port, timeout) as s:
        t0 = time.monotonic()
        s.sendall(data)
        resp = http.client.HTTPResponse(s, method=data.split(b" ", 1)[0].decode())
        resp.begin()
        body = resp.read()
        return resp.status, resp.reason, resp.msg, body, time.monotonic() - t0


def assert_gateway_error(status, headers, body, expect):
    assert status == expect, "expected %d, got %d: %r" % (expect, status, body[:300])
    ctype = headers.get("Content-Type") or ""
    assert ctype.startswith("application/json"), "error answer is %r, not JSON: %r" % (ctype, body[:200])
    doc = json.loads(body)
    assert doc.get("status") == expect and doc.get("error"), doc
    assert doc.get("request_id") == headers.get("X-Request-Id"), (doc, headers.get("X-Request-Id"))


# --- paths that must not leave /public/ ------------------------------------------

HOSTILE = [
    "/public/../admin/secret",
    "/public/%2e%2e/admin/secret",
    "/public/%2E%2E/x",
    "/public/./x",
    "/public/..%2fadmin",
    "/public/a%00b",
    "/public/%00/../admin/secret",
    "/public/.%2e/admin/secret",
    "/public/%2e./admin/secret",
    "/public/x/../../admin/secret",
    "/public/..",
    "/public/%2e%2e",
]


@pytest.mark.parametrize("target", HOSTILE)
def test_hostile_path_400_and_not_forwarded(env, target):
    before = all_seen(env)
    req = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % target).encode()
    status, _, headers, body, _ = exchange(env.gw.port, req)
    after = all_seen(env)
    new = after[len(before):] if after[:len(before)] == before else after
    assert not new, "%s reached an upstream: %s (client got %d %r)" % (target, new, status, body[:200])
    assert_gateway_error(status, headers, body, 400)


@pytest.mark.parametrize("target", [
    "/public/a/b",
    "/public/a..b",
    "/public/..a/b..",
    "/public/a.b/.c",
    "/public/x?p=../../admin/secret",
])
def test_normal_paths_allowed(env, target):
    before = env.pub.count()
    req = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % target).encode()
    status, _, headers, body, _ = exchange(env.gw.port, req)
    assert status == 200, "%s: %d %r" % (target, status, body[:300])
    doc = json.loads(body)
    assert doc["server"] == "pub"
    want_path, _, want_query = target.partition("?")
    assert doc["path"] == want_path and doc["query"] == want_query, doc
    assert env.pub.count() == before + 1


# --- Host and X-Forwarded-For ------------------------------------------------------

def test_duplicate_host_400(env):
    before = total(env)
    req = b"GET /public/dup-host HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"
    status, _, headers, body, _ = exchange(env.gw.port, req)
    assert_gateway_error(status, headers, body, 400)
    assert total(env) == before, "a request with two Host headers reached an upstream: %s" % all_seen(env)[-1:]


def test_http10_without_host_gets_host_upstream(env):
    status, _, headers, body, _ = exchange(env.gw.port, b"GET /public/http10-no-host HTTP/1.0\r\n\r\n")
    assert status == 200, (status, body[:300])
    seen = env.pub.seen(path="/public/http10-no-host")
    assert len(seen) == 1, seen
    hosts = seen[0].headers.get("host")
    assert hosts and len(hosts) == 1 and hosts[0].strip(), "upstream got Host %r for an HTTP/1.0 request without one" % (
        hosts,)


def test_repeated_x_forwarded_for_joined(env):
    req = (b"GET /public/xff-twice HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           b"X-Forwarded-For: 203.0.113.1\r\nX-Forwarded-For: 198.51.100.2\r\n\r\n")
    status, _, headers, body, _ = exchange(env.gw.port, req)
    assert status == 200, (status, body[:300])
    xff = json.loads(body)["headers"].get("x-forwarded-for") or []
    joined = ", ".join(xff)
    assert re.fullmatch(r"203\.0\.113\.1, ?198\.51\.100\.2, ?127\.0\.0\.1", joined), (
        "both X-Forwarded-For headers must be kept, in order, with the client appended; upstream got %r" % xff)
    assert len(xff) == 1, "X-Forwarded-For should reach the upstream as one joined header, got %d: %r" % (len(xff), xff)


# --- TRACE and CONNECT ----------------------------------------------------------------

def answer_within(port, data, limit):
    """Send raw bytes; read one whole response within `limit` seconds: the body must be
    delimited (Content-Length, chunked) or ended by a close. Fails with what arrived."""
    with raw_connect(port, limit) as s:
        t0 = time.monotonic()
        s.sendall(data)
        buf = b""
        complete = None
        while True:
            left = limit - (time.monotonic() - t0)
            if left <= 0:
                break
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                if b"\r\n\r\n" in buf:
                    complete = buf  # close-delimited
                break
            buf += chunk
            if b"\r\n\r\n" in buf:
                head, body = buf.split(b"\r\n\r\n", 1)
                m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
                if m and len(body) >= int(m.group(1)):
                    complete = buf
                    break
        dt = time.monotonic() - t0
    if complete is None:
        pytest.fail("no complete answer within %.0fs (the body is neither length-delimited nor ended by a "
                    "close); received: %r" % (limit, buf[:600]))
    body = complete.split(b"\r\n\r\n", 1)[1]
    resp = http.client.HTTPResponse(_FakeSock(complete), method="GET")
    resp.begin()
    return resp.status, resp.msg, body, dt


class _FakeSock:
    def __init__(self, data):
        self.data = data

    def makefile(self, mode):
        return io.BytesIO(self.data)


@pytest.mark.parametrize("request_line", [
    "TRACE /public/trace HTTP/1.1",
    "CONNECT /public/connect HTTP/1.1",
])
def test_trace_connect_405_at_once(env, request_line):
    before = total(env)
    req = ("%s\r\nHost: 127.0.0.1\r\n\r\n" % request_line).encode()
    status, headers, body, dt = answer_within(env.gw.port, req, 2)
    assert_gateway_error(status, headers, body, 405)
    allow = {m.strip().upper() for m in (headers.get("Allow") or "").split(",") if m.strip()}
    assert allow, "405 without Allow: %r" % dict(headers)
    assert not allow & {"TRACE", "CONNECT"}, "Allow lists %s" % sorted(allow & {"TRACE", "CONNECT"})
    assert "GET" in allow, "Allow: %r" % headers.get("Allow")
    assert total(env) == before, "%s reached an upstream: %s" % (request_line, all_seen(env)[-1:])


def test_connect_authority_form_answered_at_once(env):
    before = total(env)
    req = b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n"
    status, headers, body, dt = answer_within(env.gw.port, req, 2)
    assert status in (400, 405), "CONNECT 127.0.0.1:443: %d %r" % (status, body[:200])
    assert_gateway_error(status, headers, body, status)
    assert total(env) == before, "CONNECT reached an upstream: %s" % all_seen(env)[-1:]


# --- 431 -------------------------------------------------------------------------------

def test_431_reason_phrase(env):
    req = ("GET /public/big-head HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: %s\r\n\r\n"
           % ("h" * (HEADER_LIMIT + 2000))).encode()
    with raw_connect(env.gw.port, 5) as s:
        s.sendall(req)
        buf = b""
        deadline = time.monotonic() + 5
        while b"\r\n" not in buf and time.monotonic() < deadline:
            data = s.recv(4096)
            if not data:
                break
            buf += data
    status_line = buf.split(b"\r\n", 1)[0].decode("latin-1")
    assert status_line == "HTTP/1.1 431 Request Header Fields Too Large", "status line: %r" % status_line
    assert env.pub.count(path="/public/big-head") == 0

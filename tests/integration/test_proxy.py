"""Proxying: methods, bodies, status codes, headers both ways, X-Forwarded-*,
hop-by-hop stripping, request ids, traceparent, HEAD, chunked and big bodies,
upstream keep-alive reuse, 404/405 and route specificity.

One gateway for the whole file, in front of four test upstreams a, b, c, d; which
upstream answered tells which route matched. Each test uses paths of its own and
checks what the upstream saw for those paths."""

import hashlib
import http.client
import json
import re

import pytest

from harness import fresh, gateway_config, route, session, upstream_config
from upstream import big_body, chunked_body

HEX32 = re.compile(r"[0-9a-f]{32}\Z")
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})\Z")
VALID_TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

ROUTES = [
    # Deliberately least specific first: specificity must beat file order.
    route("api-prefix", "d", prefix="/api/"),
    route("items-prefix", "c", prefix="/api/items/"),
    route("items-param", "b", path="/api/items/:id"),
    route("items-exact", "a", path="/api/items/special"),
    route("tie-first", "a", prefix="/tie/"),
    route("tie-second", "b", prefix="/tie/"),
    route("things-read", "a", path="/v2/things", methods=["GET", "HEAD"]),
    route("things-write", "b", path="/v2/things", methods=["POST"]),
    route("user-post", "b", path="/v2/users/:uid/posts/:pid"),
    route("main", "a", prefix="/p/"),
]


class Env:
    pass


@pytest.fixture(scope="module")
def env(module_stack):
    e = Env()
    e.ups = {n: module_stack.upstream(n) for n in "abcd"}
    e.a = e.ups["a"]
    cfg = gateway_config({n: upstream_config([u], keepalive=16) for n, u in e.ups.items()}, routes=ROUTES)
    e.gw = module_stack.gateway(cfg)
    e.http = session()
    yield e
    e.http.close()


def total_seen(env, path):
    return sum(u.count(path=path) for u in env.ups.values())


def assert_gateway_error(r, status):
    assert r.status_code == status, "expected %d, got %d: %r" % (status, r.status_code, r.text[:300])
    assert r.headers.get("Content-Type", "").startswith("application/json"), r.headers
    doc = r.json()
    assert doc.get("status") == status, doc
    assert isinstance(doc.get("error"), str) and doc["error"], doc
    assert doc.get("request_id") == r.headers.get("X-Request-Id"), (doc, dict(r.headers))
    return doc


# --- methods and bodies ---------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "GET"])
def test_method_and_body_forwarded(env, method):
    path = "/p/echo/method-%s" % method.lower()
    body = ("%s body \u00e9 " % method * 20).encode()
    r = env.http.request(method, env.gw.url(path + "?q=1&r=two"), data=body,
                         headers={"Content-Type": "text/plain; charset=utf-8"})
    assert r.status_code == 200, r.text[:300]
    doc = r.json()
    assert doc["method"] == method
    assert doc["path"] == path
    assert doc["query"] == "q=1&r=two"
    assert doc["body_len"] == len(body), "upstream got %d body bytes of %d" % (doc["body_len"], len(body))
    assert doc["body"] == body.decode()
    assert doc["headers"].get("content-type") == ["text/plain; charset=utf-8"]
    assert env.a.count(path=path, method=method) == 1
    assert env.a.count(path=path) == 1, "the request reached the upstream more than once"


def test_empty_post(env):
    path = "/p/echo/empty-post"
    r = env.http.post(env.gw.url(path), data=b"")
    assert r.status_code == 200
    assert r.json()["body_len"] == 0
    assert env.a.count(path=path, method="POST") == 1


def test_path_and_query_forwarded_verbatim(env):
    path = "/p/echo/a%20b/c%2Fd"
    query = "x=1&y=%2F%3F&z&x=2"
    conn = http.client.HTTPConnection("127.0.0.1", env.gw.port, timeout=10)
    try:
        conn.request("GET", path + "?" + query)
        resp = conn.getresponse()
        doc = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200
    assert doc["path"] == path, "path changed on the way: %r" % doc["path"]
    assert doc["query"] == query, "query changed on the way: %r" % doc["query"]


# --- status codes -----------------------------------------------------------

@pytest.mark.parametrize("code", [200, 201, 202, 204, 301, 302, 304, 400, 401, 404, 409, 418, 500, 502, 503])
def test_status_passthrough(env, code):
    path = "/p/status/%d" % code
    r = env.http.get(env.gw.url(path), allow_redirects=False)
    assert r.status_code == code, "upstream answered %d, client got %d: %r" % (code, r.status_code, r.text[:200])
    if code in (204, 304):
        assert r.content == b""
    else:
        assert r.json() == {"server": "a", "status": code}, "the upstream's body must come through: %r" % r.text[:200]
    if code in (301, 302):
        assert r.headers.get("Location") == "/echo"
    assert env.a.count(path=path) == 1, "a %d answer must not be retried" % code


# --- headers ------------------------------------------------------------------

def test_request_headers_forwarded(env):
    path = "/p/echo/headers-in"
    conn = http.client.HTTPConnection("127.0.0.1", env.gw.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.putheader("Authorization", "Bearer abc.def")
        conn.putheader("Cookie", "a=1; b=2")
        conn.putheader("User-Agent", "integration-test/1.0")
        conn.putheader("Accept", "application/json")
        conn.putheader("X-Custom", "some value, with comma")
        conn.putheader("X-Multi", "one")
        conn.putheader("X-Multi", "two")
        conn.endheaders()
        resp = conn.getresponse()
        doc = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200
    h = doc["headers"]
    assert h.get("authorization") == ["Bearer abc.def"]
    assert h.get("cookie") == ["a=1; b=2"]
    assert h.get("user-agent") == ["integration-test/1.0"]
    assert h.get("accept") == ["application/json"]
    assert h.get("x-custom") == ["some value, with comma"]
    assert h.get("x-multi") in (["one", "two"], ["one, two"], ["one,two"]), h.get("x-multi")


def test_response_headers_returned(env):
    conn = http.client.HTTPConnection("127.0.0.1", env.gw.port, timeout=10)
    try:
        conn.request("GET", "/p/headers?X-Custom=v1&Cache-Control=no-store&Set-Cookie=a%3D1%3B+Path%3D%2F"
                            "&Set-Cookie=b%3D2&ETag=%22abc%22&X-Empty-Not=x")
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    assert resp.status == 200
    assert resp.getheader("X-Custom") == "v1"
    assert resp.getheader("Cache-Control") == "no-store"
    assert resp.getheader("ETag") == '"abc"'
    assert resp.getheader("Content-Type") == "application/json"
    # Set-Cookie cannot be folded into one line: both must arrive as they were.
    assert resp.msg.get_all("Set-Cookie") == ["a=1; Path=/", "b=2"], resp.msg.get_all("Set-Cookie")


def test_x_forwarded_headers(env):
    path = "/p/echo/xff"
    r = env.http.get(env.gw.url(path))
    h = r.json()["headers"]
    assert h.get("x-forwarded-for") == ["127.0.0.1"], h.get("x-forwarded-for")
    assert h.get("x-forwarded-proto") == ["http"], h.get("x-forwarded-proto")
    assert h.get("x-forwarded-host") == ["127.0.0.1:%d" % env.gw.port], h.get("x-forwarded-host")

    r = env.http.get(env.gw.url(path), headers={"X-Forwarded-For": "203.0.113.7, 198.51.100.2",
                                                 "Host": "api.example.test:8443"})
    h = r.json()["headers"]
    xff = ", ".join(h.get("x-forwarded-for", []))
    assert re.fullmatch(r"203\.0\.113\.7, ?198\.51\.100\.2, ?127\.0\.0\.1", xff), \
        "X-Forwarded-For must append the client address to the existing value: %r" % xff
    assert h.get("x-forwarded-host") == ["api.example.test:8443"], h.get("x-forwarded-host")


def test_hop_by_hop_request_headers_not_forwarded(env):
    path = "/p/echo/hop-in"
    conn = http.client.HTTPConnection("127.0.0.1", env.gw.port, timeout=10)
    try:
        conn.putrequest("GET", path)
        conn.putheader("Connection", "keep-alive, X-Foo, X-Bar")
        conn.putheader("X-Foo", "named-by-connection")
        conn.putheader("X-Bar", "named-by-connection-too")
        conn.putheader("Keep-Alive", "timeout=99")
        conn.putheader("TE", "trailers")
        conn.putheader("Trailer", "X-Checksum")
        conn.putheader("Upgrade", "h2c")
        conn.putheader("Proxy-Authorization", "Basic Zm9vOmJhcg==")
        conn.putheader("Proxy-Foo", "bar")
        conn.putheader("X-End", "kept")
        conn.endheaders()
        resp = conn.getresponse()
        doc = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200
    h = doc["headers"]
    assert h.get("x-end") == ["kept"], "an end-to-end header was lost: %s" % h
    for name in ("x-foo", "x-bar", "te", "trailer", "upgrade", "proxy-authorization", "proxy-foo"):
        assert name not in h, "hop-by-hop header %s reached the upstream: %s" % (name, h[name])
    assert "timeout=99" not in h.get("keep-alive", []), "the client's Keep-Alive reached the upstream"
    conn_hdr = ", ".join(h.get("connection", [])).lower()
    assert "x-foo" not in conn_hdr and "x-bar" not in conn_hdr, "client's Connection header forwarded: %r" % conn_hdr


def test_hop_by_hop_response_headers_not_returned(env):
    conn = http.client.HTTPConnection("127.0.0.1", env.gw.port, timeout=10)
    try:
        conn.request("GET", "/p/headers?Connection=X-Foo&X-Foo=1&Keep-Alive=timeout%3D99&Proxy-Authenticate=Basic"
                            "&Proxy-Foo=1&Trailer=X-Checksum&Upgrade=h2c&X-End=kept")
        resp = conn.getresponse()
        resp.read()
        # The same client connection still works after that answer.
        conn.request("GET", "/p/echo/hop-out-after")
        resp2 = conn.getresponse()
        resp2.read()
    finally:
        conn.close()
    assert resp.status == 200
    assert resp.getheader("X-End") == "kept"
    for name in ("X-Foo", "Proxy-Authenticate", "Proxy-Foo", "Trailer", "Upgrade"):
        assert resp.getheader(name) is None, "hop-by-hop header %s reached the client: %r" % (name, resp.getheader(name))
    assert resp.getheader("Keep-Alive") != "timeout=99", "the upstream's Keep-Alive reached the client"
    assert "x-foo" not in (resp.getheader("Connection") or "").lower()
    assert resp2.status == 200


# --- request id and traceparent --------------------------------------------------

@pytest.mark.parametrize("rid", ["abc", "A-Z.a_z:0-9", "x" * 128, "0", "7f3c9a1e-2b4d-4c8e-9f00-123456789abc"])
def test_sane_request_id_kept(env, rid):
    r = env.http.get(env.gw.url("/p/echo/rid-kept"), headers={"X-Request-Id": rid})
    assert r.status_code == 200
    assert r.headers.get("X-Request-Id") == rid, "client got %r back" % r.headers.get("X-Request-Id")
    assert r.json()["headers"].get("x-request-id") == [rid], "upstream got %r" % r.json()["headers"].get("x-request-id")


@pytest.mark.parametrize("rid", ["", "has space", "x" * 129, "a;b", "a/b", "<script>", "a,b", "\u00e9t\u00e9"])
def test_insane_request_id_replaced(env, rid):
    headers = {"X-Request-Id": rid.encode("utf-8") if not rid.isascii() else rid}
    r = env.http.get(env.gw.url("/p/echo/rid-insane"), headers=headers)
    assert r.status_code == 200
    got = r.headers.get("X-Request-Id")
    assert got and HEX32.match(got), "expected a minted 32-hex id, client got %r" % got
    assert r.json()["headers"].get("x-request-id") == [got], "upstream must get the same id as the client"


def test_request_id_minted(env):
    ids = []
    for _ in range(3):
        r = env.http.get(env.gw.url("/p/echo/rid-minted"))
        rid = r.headers.get("X-Request-Id")
        assert rid and HEX32.match(rid), "minted id %r is not 32 lowercase hex" % rid
        assert r.json()["headers"].get("x-request-id") == [rid]
        ids.append(rid)
    assert len(set(ids)) == 3, "minted ids repeat: %s" % ids


def test_traceparent_passed_through(env):
    r = env.http.get(env.gw.url("/p/echo/tp"), headers={"traceparent": VALID_TP, "tracestate": "v=1"})
    h = r.json()["headers"]
    assert h.get("traceparent") == [VALID_TP], h.get("traceparent")
    assert h.get("tracestate") == ["v=1"]


def _check_minted_tp(h, not_equal=None):
    tps = h.get("traceparent")
    assert tps and len(tps) == 1, "upstream got traceparent %r" % tps
    m = TRACEPARENT.match(tps[0])
    assert m, "minted traceparent %r is not valid W3C" % tps[0]
    assert m.group(1) != "0" * 32 and m.group(2) != "0" * 16, "all-zero ids in %r" % tps[0]
    assert tps[0] != not_equal
    return tps[0]


def test_traceparent_minted_when_absent(env):
    a = _check_minted_tp(env.http.get(env.gw.url("/p/echo/tp-minted")).json()["headers"])
    b = _check_minted_tp(env.http.get(env.gw.url("/p/echo/tp-minted")).json()["headers"])
    assert a != b, "two requests got the same minted traceparent"


@pytest.mark.parametrize("tp", [
    "garbage",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
])
def test_invalid_traceparent_replaced(env, tp):
    h = env.http.get(env.gw.url("/p/echo/tp-invalid"), headers={"traceparent": tp}).json()["headers"]
    _check_minted_tp(h, not_equal=tp)


# --- HEAD, chunked, big bodies ----------------------------------------------------

def test_head(env):
    conn = http.client.HTTPConnection("127.0.0.1", env.gw.port, timeout=10)
    try:
        conn.request("HEAD", "/p/big/5000")
        resp = conn.getresponse()
        body = resp.read()
        # If the gateway sent a body after the HEAD answer, this second answer is garbage.
        conn.request("GET", "/p/echo/after-head")
        resp2 = conn.getresponse()
        doc = json.loads(resp2.read())
    finally:
        conn.close()
    assert resp.status == 200
    assert body == b""
    assert resp.getheader("Content-Length") in (None, "5000"), resp.getheader("Content-Length")
    assert env.a.count(path="/p/big/5000", method="HEAD") == 1
    assert resp2.status == 200 and doc["path"] == "/p/echo/after-head"


@pytest.mark.parametrize("n", [1, 8, 200])
def test_chunked_upstream_answer(env, n):
    r = env.http.get(env.gw.url("/p/chunked?n=%d" % n))
    assert r.status_code == 200
    assert r.content == chunked_body(n), "chunked answer arrived as %r" % r.content[:200]


def test_big_request_body(env):
    body = big_body(1 << 20)
    r = env.http.post(env.gw.url("/p/echo/big-up"), data=body, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200
    doc = r.json()
    assert doc["body_len"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_big_chunked_request_body(env):
    body = big_body(1 << 20)
    pieces = (body[i:i + 65536] for i in range(0, len(body), 65536))
    r = env.http.post(env.gw.url("/p/echo/big-up-chunked"), data=pieces)
    assert r.status_code == 200
    doc = r.json()
    assert doc["body_len"] == len(body), "a chunked request body arrived with %d of %d bytes" % (
        doc["body_len"], len(body))
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_big_response_body(env):
    r = env.http.get(env.gw.url("/p/big/%d" % (1 << 20)))
    assert r.status_code == 200
    assert len(r.content) == 1 << 20
    assert r.content == big_body(1 << 20)


# --- upstream keep-alive -------------------------------------------------------------

def test_upstream_connections_reused(env):
    path = "/p/echo/keepalive"
    conns = set()
    with session() as s:  # one client connection
        for _ in range(100):
            r = s.get(env.gw.url(path))
            assert r.status_code == 200
            conns.add(r.json()["conn"])
    for _ in range(30):  # a new client connection each time
        r = fresh("GET", env.gw.url(path))
        assert r.status_code == 200
        conns.add(r.json()["conn"])
    assert env.a.count(path=path) == 130
    assert len(conns) <= 4, "130 sequential requests used %d upstream connections (2 workers)" % len(conns)


# --- 404, 405, routing -------------------------------------------------------------------

def test_no_route_404(env):
    for path in ("/nothing/here", "/v2/thingsx", "/v2/things/1", "/api", "/v2/users/7/posts"):
        r = env.http.get(env.gw.url(path), headers={"X-Request-Id": "err-404"})
        doc = assert_gateway_error(r, 404)
        assert doc["request_id"] == "err-404"
        assert total_seen(env, path) == 0, "a 404 path reached an upstream"


def test_method_not_allowed_405(env):
    for method in ("PATCH", "DELETE", "PUT"):
        r = env.http.request(method, env.gw.url("/v2/things"))
        assert_gateway_error(r, 405)
        allow = {m.strip().upper() for m in r.headers.get("Allow", "").split(",") if m.strip()}
        assert allow == {"GET", "HEAD", "POST"}, "Allow: %r" % r.headers.get("Allow")
    assert total_seen(env, "/v2/things") == 0
    assert env.http.get(env.gw.url("/v2/things")).json()["server"] == "a"
    assert env.http.post(env.gw.url("/v2/things")).json()["server"] == "b"
    assert env.http.head(env.gw.url("/v2/things")).status_code == 200
    assert env.ups["a"].count(path="/v2/things", method="HEAD") == 1


@pytest.mark.parametrize("path,server", [
    ("/api/items/special", "a"),        # exact beats :param and prefixes declared before it
    ("/api/items/42", "b"),             # :param beats prefixes
    ("/api/items/42/extra", "c"),       # longest prefix, though declared after the shorter one
    ("/api/items", "d"),
    ("/api/other/thing", "d"),
    ("/tie/x", "a"),                    # equal prefixes: the first in the file
    ("/v2/users/7/posts/9", "b"),
])
def test_route_specificity(env, path, server):
    r = env.http.get(env.gw.url(path + "?probe=1"))
    assert r.status_code == 200, r.text[:200]
    doc = r.json()
    assert doc["server"] == server, "%s went to upstream %s, expected %s" % (path, doc["server"], server)
    assert doc["path"] == path and doc["query"] == "probe=1"
    assert env.ups[server].count(path=path) == 1
    for name, up in env.ups.items():
        if name != server:
            assert up.count(path=path) == 0, "%s also reached upstream %s" % (path, name)

"""The response cache with store: memory (no Redis): what a client sees (status,
body bytes, X-Cache / X-Cache-Key / Age / Cache-Status, Content-Encoding) and
what the test upstream saw (how many requests reached it, with which method).

One gateway for most of the file (env), with routes of its own per concern, and
each test on paths of its own so the upstream's per-path counts are exact. The
tests that need other cache settings (stale_*, coalesce, lock_timeout,
compression, admin) start gateways of their own.

Requests go through raw http.client (helpers below): no Accept-Encoding unless
a test sends one, every header line kept, nothing decoded on the way.

Checked: MISS/HIT (bytes, end-to-end fields, Age, X-Cache-Key), ttl and the
upstream's max-age / s-maxage, every key template part and the query
normalisation, hashed credentials, unless, Authorization, what may not be
stored (Cache-Control, Set-Cookie, Vary, encodings, statuses, size), HEAD,
compressed variants from one entry, coalescing (and coalesce: off,
lock_timeout), stale_if_error and stale_while_revalidate, invalidation by
route and by the admin endpoints, the metrics, memory_max_bytes, the rate
limiter's place before the cache, and --check on the new keys.

The upstream's /answer/<name> endpoint (upstream.py, set_answer) answers what
the test chose last, so a test can change what one URL answers between two
requests (new body, a 500, a delay) without changing the cache key.
"""

import hashlib
import http.client
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import free_port, fresh, gateway_config, route, run_gateway, to_yaml, upstream_config, wait_until
from test_compression import BROTLI, gunzip
from upstream import respond_body

# Fields that may differ between a MISS and the HIT after it.
VOLATILE = {"date", "age", "x-cache", "cache-status", "x-request-id"}
ADMIN_TOKEN = "cache-admin-token-0123456789"


# ---------------------------------------------------------------------------
# Requests

class Ans:
    def __init__(self, status, headers, body, elapsed):
        self.status = status
        self.headers = headers  # http.client.HTTPMessage: every line kept
        self.body = body
        self.elapsed = elapsed

    def h(self, name):
        return self.headers.get(name)

    def all(self, name):
        return self.headers.get_all(name) or []

    @property
    def xcache(self):
        return self.h("X-Cache")

    @property
    def key(self):
        return self.h("X-Cache-Key")

    @property
    def cstatus(self):
        return self.h("Cache-Status")

    def e2e(self):
        """The header lines a MISS and its HIT must share, sorted."""
        return sorted((k.lower(), v) for k, v in self.headers.items() if k.lower() not in VOLATILE)

    def __repr__(self):
        return "<%d %s; %d body bytes: %r>" % (self.status, list(self.headers.items()), len(self.body),
                                              self.body[:120])


def req(gw, path, method="GET", headers=(), ae=None, body=None, timeout=10):
    """One request on a connection of its own. headers: dict or (name, value)
    pairs; ae: Accept-Encoding (None sends none)."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=timeout)
    try:
        t = time.monotonic()
        conn.putrequest(method, path, skip_accept_encoding=True)
        if ae is not None:
            conn.putheader("Accept-Encoding", ae)
        for k, v in (headers.items() if isinstance(headers, dict) else headers):
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return Ans(resp.status, resp.msg, data, time.monotonic() - t)
    finally:
        conn.close()


def respond(prefix, size=64, seed=0, headers=(), status=None, **more):
    """A path to the upstream's /respond under `prefix` (see upstream.py)."""
    q = [("size", size), ("seed", seed)]
    if status is not None:
        q.append(("status", status))
    for k, v in headers:
        q.append(("h", "%s:%s" % (k, v)))
    q += list(more.items())
    return "%s/respond?%s" % (prefix, urllib.parse.urlencode(q))


def path_of(p):
    return urllib.parse.urlsplit(p).path


def assert_miss(a, stored=True, body=None):
    assert a.status != 0
    assert a.xcache == "MISS", "expected X-Cache: MISS: %r" % a
    cs = a.cstatus or ""
    assert cs.startswith("gateway;") and "fwd=uri-miss" in cs, "Cache-Status of a miss: %r" % a
    if stored is True:
        assert "stored" in cs, "a miss that is stored says so in Cache-Status: %r" % a
    elif stored is False:
        assert "stored" not in cs, "this answer must not be stored: %r" % a
    if body is not None:
        assert a.body == body, "body: %r, expected %r" % (a.body[:100], body[:100])


def assert_hit(a, body=None):
    assert a.xcache == "HIT", "expected X-Cache: HIT: %r" % a
    cs = a.cstatus or ""
    assert cs.startswith("gateway;") and "hit" in cs.split(";")[1], "Cache-Status of a hit: %r" % a
    age = a.h("Age")
    assert age is not None and age.isdigit(), "a hit carries Age: %r" % a
    if body is not None:
        assert a.body == body, "body: %r, expected %r" % (a.body[:100], body[:100])


def assert_bypass(a, detail=None):
    assert a.xcache == "BYPASS", "expected X-Cache: BYPASS: %r" % a
    cs = a.cstatus or ""
    assert "fwd=bypass" in cs, "Cache-Status of a bypass: %r" % a
    if detail:
        assert "detail=%s" % detail in cs, "Cache-Status detail=%s expected: %r" % (detail, a)


def cs_ttl(a):
    for part in (a.cstatus or "").split(";"):
        part = part.strip()
        if part.startswith("ttl="):
            return int(part[4:])
    raise AssertionError("no ttl= in Cache-Status: %r" % a)


def cache_counts(gw, route_name):
    m = gw.metrics()
    return {res: m.value("gateway_cache_requests_total", route=route_name, result=res)
            for res in ("hit", "miss", "bypass", "stale")}


def concurrently(fn, n):
    """fn(i) for i in range(n), all released together; results in order."""
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait(10)
        return fn(i)
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


# ---------------------------------------------------------------------------
# The shared gateway

def cached(name, upstream="up", cache=None, **match):
    r = route(name, upstream, **match)
    r["cache"] = cache if cache is not None else {}
    return r


MAX_OBJECT = 8192

ROUTES = [
    cached("basic", prefix="/basic/", cache={"ttl": "60s"}),
    cached("short", prefix="/short/", cache={"ttl": "1s"}),
    cached("tmpl", path="/tmpl/:id/view",
           cache={"key": "{method}|{path}|{path.id}|{query}|{query.x}|{header.X-Tenant}"}),
    cached("tmpl2", path="/tmpl2/:id", cache={"key": "t2:{path.id}:{query.x}:{header.X-Tenant}"}),
    cached("authkey", prefix="/authkey/", cache={"key": "auth:{header.Authorization}:{header.Cookie}:{path}"}),
    cached("unless", prefix="/unless/",
           cache={"unless": {"query.nocache": "1", "header.X-No-Cache": "yes", "method": "HEAD"}}),
    cached("s404", prefix="/s404/", cache={"statuses": [200, 404]}),
    cached("smore", prefix="/smore/", cache={"statuses": [204, 301, 410]}),
    cached("metered", prefix="/metered/", cache={"unless": {"query.skip": "1"}}),
    cached("items-read", prefix="/api/items", methods=["GET"]),
    dict(route("items-write", "up", prefix="/api/items", methods=["POST", "PUT", "DELETE"]),
         invalidate=["cache:GET:/api/items*"]),
    cached("item-read", path="/api/item/:id", methods=["GET"], cache={"key": "item:{path.id}"}),
    dict(route("item-write", "up", path="/api/item/:id", methods=["PUT", "DELETE"]),
         invalidate=["cache:item:{path.id}"]),
    route("plain", "up", prefix="/plain/"),
    dict(cached("rlc", prefix="/rlc/"), ratelimit=["cache-rl"]),
]


class Env:
    pass


@pytest.fixture(scope="module")
def env(module_stack):
    e = Env()
    e.up = module_stack.upstream("up")
    cfg = gateway_config({"up": upstream_config([e.up], timeout="5s", keepalive=16)}, routes=ROUTES,
                         cache={"store": "memory", "max_object_bytes": MAX_OBJECT, "default_ttl": "60s"},
                         ratelimit={"store": "local",
                                    "policies": {"cache-rl": {"limit": 2, "window": "10m", "key": "route"}}})
    e.gw = module_stack.gateway(cfg, name="gw-cache")
    return e


# ---------------------------------------------------------------------------
# MISS, HIT, key, TTL

def test_miss_then_hit_identical(env):
    gw, up = env.gw, env.up
    path = "/basic/first/respond?size=300&seed=3&h=X-Custom%3Aone&h=ETag%3A%22e1%22"
    a = req(gw, path)
    assert a.status == 200
    assert_miss(a, body=respond_body(300, "json", 3))
    b = req(gw, path)
    assert b.status == 200
    assert_hit(b, body=a.body)
    assert b.h("Age") in ("0", "1"), b
    assert b.e2e() == a.e2e(), "end-to-end headers differ:\nMISS %s\nHIT  %s" % (a.e2e(), b.e2e())
    assert b.h("X-Custom") == "one" and b.h("ETag") == '"e1"', b
    assert b.h("Content-Type") == "application/json", b
    assert b.all("Content-Length") == [str(len(b.body))], b
    # Sorted by name; the two h= pairs keep their order.
    want_key = "cache:GET:/basic/first/respond?h=X-Custom%3Aone&h=ETag%3A%22e1%22&seed=3&size=300"
    assert a.key == want_key and b.key == want_key, (a.key, b.key)
    assert b.h("X-Request-Id") and b.h("X-Request-Id") != a.h("X-Request-Id")
    assert up.count(path="/basic/first/respond") == 1
    c = req(gw, path)
    assert_hit(c, body=a.body)
    assert up.count(path="/basic/first/respond") == 1


def test_no_cache_headers_on_uncached_route_and_methods(env):
    gw, up = env.gw, env.up
    a = req(gw, "/plain/x/respond?size=10")
    assert a.status == 200 and a.xcache is None and a.cstatus is None and a.key is None, a
    # A POST on a cached route goes to the backend and neither reads nor writes the entry.
    p = "/basic/post/respond?size=20"
    for _ in range(2):
        r = req(gw, p, method="POST", body=b"x")
        assert r.status == 200 and r.xcache is None, r
    assert up.count(path="/basic/post/respond", method="POST") == 2
    assert_miss(req(gw, p))
    assert_hit(req(gw, p))
    r = req(gw, p, method="POST", body=b"y")
    assert r.xcache is None and r.status == 200
    assert up.count(path="/basic/post/respond", method="POST") == 3


def test_ttl_expiry(env):
    """route ttl 1s: HIT until ~1 s after the store, then MISS."""
    gw = env.gw
    path = "/short/ttl/respond?size=50"
    t0 = time.monotonic()
    assert_miss(req(gw, path))
    hits = 0
    while True:
        a = req(gw, path)
        el = time.monotonic() - t0
        if a.xcache != "HIT":
            break
        hits += 1
        assert int(a.h("Age")) <= 1 and cs_ttl(a) <= 1, a
        assert el < 1.7, "still a HIT %.2fs after a 1s ttl" % el
        time.sleep(0.05)
    assert_miss(a)
    assert el >= 0.9, "expired after %.2fs, the ttl is 1s" % el
    assert hits >= 5, "only %d hits before expiry" % hits
    assert env.up.count(path="/short/ttl/respond") == 2
    assert_hit(req(gw, path))


# ---------------------------------------------------------------------------
# Keys

def test_query_normalisation(env):
    gw, up = env.gw, env.up
    first = req(gw, "/basic/norm?b=2&a=1")
    assert_miss(first)
    for q in ("a=1&b=2", "a=%31&b=2", "b=2&a=1&", "&a=1&&b=2"):
        a = req(gw, "/basic/norm?" + q)
        assert_hit(a, body=first.body)
        assert a.key == "cache:GET:/basic/norm?a=1&b=2", (q, a.key)
    assert first.key == "cache:GET:/basic/norm?a=1&b=2"
    assert up.count(path="/basic/norm") == 1
    # Decoded then re-encoded: %7e is '~'; '+' stays '+' (a space to some
    # upstreams, a plus to others), so it shares a key with neither %20 nor %2B.
    a = req(gw, "/basic/norm2?q=a+b&t=%7e")
    assert_miss(a)
    assert a.key == "cache:GET:/basic/norm2?q=a+b&t=~", a.key
    b = req(gw, "/basic/norm2?t=~&q=a+b")
    assert_hit(b, body=a.body)
    for other in ("q=a%20b&t=~", "q=a%2Bb&t=~"):
        assert_miss(req(gw, "/basic/norm2?" + other))
    # Repeated names keep their order: ?s=x&s=y and ?s=y&s=x are two entries.
    assert_miss(req(gw, "/basic/norm3?s=x&s=y"))
    o = req(gw, "/basic/norm3?s=y&s=x")
    assert_miss(o)
    assert o.key == "cache:GET:/basic/norm3?s=y&s=x", o.key
    # A different value is a different entry; no query at all has no '?'.
    c = req(gw, "/basic/norm?a=1&b=3")
    assert_miss(c)
    d = req(gw, "/basic/norm")
    assert_miss(d)
    assert d.key == "cache:GET:/basic/norm", d.key
    assert up.count(path="/basic/norm") == 3
    # The default key holds no request header.
    e = req(gw, "/basic/norm", headers={"X-Tenant": "other", "Accept": "text/plain"})
    assert_hit(e, body=d.body)


def test_key_template_parts(env):
    gw, up = env.gw, env.up
    a = req(gw, "/tmpl/7/view?x=9&a=1&x=8", headers={"X-Tenant": "acme"})
    assert_miss(a)
    assert a.key == "cache:GET|/tmpl/7/view|7|a=1&x=9&x=8|9|acme", a.key
    # HEAD is keyed as GET.
    h = req(gw, "/tmpl/7/view?x=9&a=1&x=8", method="HEAD", headers={"X-Tenant": "acme"})
    assert_hit(h)
    assert h.key == a.key and h.body == b""
    # A part the request lacks expands to nothing.
    b = req(gw, "/tmpl/8/view")
    assert_miss(b)
    assert b.key == "cache:GET|/tmpl/8/view|8|||", b.key
    assert up.count(prefix="/tmpl/") == 2

    # Only what the template names counts: another y, another Accept share the entry...
    c = req(gw, "/tmpl2/5?x=1&y=1", headers={"X-Tenant": "t1"})
    assert_miss(c)
    assert c.key == "cache:t2:5:1:t1", c.key
    d = req(gw, "/tmpl2/5?y=2&x=1", headers={"X-Tenant": "t1", "Accept": "x/y"})
    assert_hit(d, body=c.body)
    # ...while another id, x or tenant does not.
    for p, t, k in (("/tmpl2/6?x=1", "t1", "cache:t2:6:1:t1"), ("/tmpl2/5?x=2", "t1", "cache:t2:5:2:t1"),
                    ("/tmpl2/5?x=1", "t2", "cache:t2:5:1:t2")):
        e = req(gw, p, headers={"X-Tenant": t})
        assert_miss(e)
        assert e.key == k, (p, t, e.key)
    assert up.count(prefix="/tmpl2/") == 4


def test_credentials_in_key_are_hashed(env):
    gw, up = env.gw, env.up
    cred, cookie = "Bearer s3cret-token-one", "sid=cookie-secret-42"
    hsh = lambda v: "h:" + hashlib.sha256(v.encode()).hexdigest()[:32]  # noqa: E731
    a = req(gw, "/authkey/x/respond?size=40", headers={"Authorization": cred, "Cookie": cookie})
    assert_miss(a)  # the key names Authorization: cached, not bypassed
    assert a.key == "cache:auth:%s:%s:/authkey/x/respond" % (hsh(cred), hsh(cookie)), a.key
    for secret in ("s3cret-token-one", "cookie-secret-42"):
        for k, v in a.headers.items():
            assert secret not in v, "credential in the answer's %s: %r" % (k, v)
    b = req(gw, "/authkey/x/respond?size=40", headers={"Authorization": cred, "Cookie": cookie})
    assert_hit(b, body=a.body)
    # Someone else's credential is someone else's entry.
    c = req(gw, "/authkey/x/respond?size=40", headers={"Authorization": "Bearer other", "Cookie": cookie})
    assert_miss(c)
    assert c.key == "cache:auth:%s:%s:/authkey/x/respond" % (hsh("Bearer other"), hsh(cookie))
    assert up.count(path="/authkey/x/respond") == 2


def test_authorization_bypasses_unless_key_names_it(env):
    gw, up = env.gw, env.up
    p = "/basic/authz/respond?size=30"
    for _ in range(2):
        a = req(gw, p, headers={"Authorization": "Bearer abc"})
        assert a.status == 200
        assert_bypass(a, "authorization")
    assert up.count(path="/basic/authz/respond") == 2
    # Nothing was stored by those: the first anonymous request misses.
    assert_miss(req(gw, p))
    assert_hit(req(gw, p))
    # An entry made anonymously is not served to a request with credentials either.
    a = req(gw, p, headers={"Authorization": "Bearer abc"})
    assert_bypass(a, "authorization")
    assert up.count(path="/basic/authz/respond") == 4


def test_unless(env):
    gw, up = env.gw, env.up
    base = "/unless/u/respond?size=30"
    assert_miss(req(gw, base))
    assert_hit(req(gw, base))
    cases = [
        (base + "&nocache=1", {}, "GET"),
        (base, {"X-No-Cache": "yes"}, "GET"),
        (base, {}, "HEAD"),
    ]
    n = up.count(path="/unless/u/respond")
    for path, headers, method in cases:
        for _ in range(2):
            a = req(gw, path, method=method, headers=headers)
            assert a.status == 200
            assert_bypass(a, "unless")
            n += 1
            assert up.count(path="/unless/u/respond") == n, (path, headers, method)
    # A condition that does not hold changes nothing.
    for path, headers in ((base + "&nocache=0", {}), (base, {"X-No-Cache": "no"})):
        a = req(gw, path, headers=headers)
        assert a.xcache in ("HIT", "MISS"), a
    assert_hit(req(gw, base))


# ---------------------------------------------------------------------------
# What is stored

NOT_STORED = [
    ("no-store", [("Cache-Control", "no-store")]),
    ("NO-STORE", [("Cache-Control", "NO-STORE")]),
    ("private", [("Cache-Control", "private")]),
    ("private-max-age", [("Cache-Control", "private, max-age=60")]),
    ("no-cache", [("Cache-Control", "no-cache")]),
    ("max-age-0", [("Cache-Control", "max-age=0")]),
    ("public-max-age-0", [("Cache-Control", "public, max-age=0")]),
    ("set-cookie", [("Set-Cookie", "sid=1; Path=/")]),
    ("vary-cookie", [("Vary", "Cookie")]),
    ("vary-star", [("Vary", "*")]),
    ("vary-ae-cookie", [("Vary", "Accept-Encoding, Cookie")]),
    ("content-range", [("Content-Range", "bytes 0-29/100")]),
]


@pytest.mark.parametrize("label,headers", NOT_STORED, ids=[c[0] for c in NOT_STORED])
def test_not_stored(env, label, headers):
    gw, up = env.gw, env.up
    p = respond("/basic/ns-%s" % label, size=30, headers=headers)
    for _ in range(2):
        a = req(gw, p)
        assert a.status == 200
        assert_miss(a, stored=False, body=respond_body(30))
    assert up.count(path=path_of(p)) == 2


def test_upstream_encoded_not_stored(env):
    gw, up = env.gw, env.up
    p = respond("/basic/ns-gz", size=500, headers=[("Content-Encoding", "gzip")], gzip=1)
    for _ in range(2):
        a = req(gw, p)
        assert_miss(a, stored=False)
        assert gunzip(a.body) == respond_body(500)
    assert up.count(path=path_of(p)) == 2


STORED = [
    ("vary-ae", [("Vary", "Accept-Encoding")]),
    ("public", [("Cache-Control", "public")]),
    ("max-age-60", [("Cache-Control", "max-age=60")]),
    ("must-revalidate", [("Cache-Control", "must-revalidate, max-age=60")]),
]


@pytest.mark.parametrize("label,headers", STORED, ids=[c[0] for c in STORED])
def test_stored(env, label, headers):
    gw, up = env.gw, env.up
    p = respond("/basic/st-%s" % label, size=30, headers=headers)
    a = req(gw, p)
    assert_miss(a, body=respond_body(30))
    b = req(gw, p)
    assert_hit(b, body=a.body)
    assert b.e2e() == a.e2e()
    assert up.count(path=path_of(p)) == 1


def test_upstream_max_age_and_s_maxage(env):
    """Route ttl 60s. max-age=1: gone after ~1 s. s-maxage=1 with max-age=100: gone
    after ~1 s (s-maxage wins). s-maxage=100 with max-age=1: still there."""
    gw, up = env.gw, env.up
    paths = {
        "ma1": respond("/basic/fresh-ma1", headers=[("Cache-Control", "max-age=1")]),
        "sma1": respond("/basic/fresh-sma1", headers=[("Cache-Control", "max-age=100, s-maxage=1")]),
        "sma100": respond("/basic/fresh-sma100", headers=[("Cache-Control", "s-maxage=100, max-age=1")]),
    }
    t0 = time.monotonic()
    for p in paths.values():
        assert_miss(req(gw, p))
    ttls = {}
    for name, p in paths.items():
        a = req(gw, p)
        assert_hit(a)
        ttls[name] = cs_ttl(a)
    assert ttls["ma1"] <= 1 and ttls["sma1"] <= 1, ttls
    assert 98 <= ttls["sma100"] <= 100, ttls
    time.sleep(max(0.0, 1.3 - (time.monotonic() - t0)))  # let 1 s of freshness pass
    assert_miss(req(gw, paths["ma1"]))
    assert_miss(req(gw, paths["sma1"]))
    assert_hit(req(gw, paths["sma100"]))
    assert [up.count(path=path_of(p)) for p in paths.values()] == [2, 2, 1]


def test_expires_and_age(env):
    """Without max-age: Expires - Date is the lifetime (an Expires that does
    not parse, "0", is in the past: not stored); an upstream Age is spent."""
    from email.utils import formatdate
    gw, up = env.gw, env.up
    now = time.time()
    paths = {
        "exp100": respond("/basic/exp100", headers=[("Expires", formatdate(now + 100, usegmt=True))]),
        "exp0": respond("/basic/exp0", headers=[("Expires", "0")]),
        "past": respond("/basic/exppast", headers=[("Expires", formatdate(now - 10, usegmt=True))]),
        "aged": respond("/basic/aged", headers=[("Cache-Control", "max-age=100"), ("Age", "40")]),
        "spent": respond("/basic/spent", headers=[("Cache-Control", "max-age=10"), ("Age", "11")]),
    }
    for p in paths.values():
        req(gw, p)
    got = {name: req(gw, p) for name, p in paths.items()}
    assert_hit(got["exp100"])
    assert 95 <= cs_ttl(got["exp100"]) <= 100, got["exp100"]
    assert_miss(got["exp0"], stored=False)
    assert_miss(got["past"], stored=False)
    assert_hit(got["aged"])
    assert 55 <= cs_ttl(got["aged"]) <= 60, got["aged"]
    assert_miss(got["spent"], stored=False)


def test_must_revalidate_never_stale(stack):
    """must-revalidate: past its freshness the entry is not served stale even
    within stale_if_error; the upstream's failure is passed on."""
    gw, up = stale_gateway(stack, stale_if_error="30s", up_timeout="600ms")
    up.set_answer("mr", body=b'{"v": 1}', headers=[("Cache-Control", "max-age=1, must-revalidate")])
    p = "/st/answer/mr"
    t0 = time.monotonic()
    assert_miss(req(gw, p), body=b'{"v": 1}')
    assert_hit(req(gw, p), body=b'{"v": 1}')
    up.set_answer("mr", body=b'{"error": "boom"}', status=503)
    time.sleep(max(0.0, 1.2 - (time.monotonic() - t0)))
    a = req(gw, p)
    assert a.status == 503 and a.xcache != "STALE", a


def test_statuses(env):
    gw, up = env.gw, env.up
    # 404 on a route with the default statuses: not stored.
    for _ in range(2):
        a = req(gw, "/basic/st404/status/404")
        assert a.status == 404
        assert_miss(a, stored=False)
    assert up.count(path="/basic/st404/status/404") == 2
    # ... stored where the route lists 404.
    a = req(gw, "/s404/a/status/404")
    assert a.status == 404
    assert_miss(a)
    b = req(gw, "/s404/a/status/404")
    assert b.status == 404
    assert_hit(b, body=a.body)
    assert up.count(path="/s404/a/status/404") == 1
    # 500, 410 (not listed), 201, 301 (not listed): never.
    for code in (500, 410, 201, 301):
        p = "/s404/b/status/%d" % code
        for _ in range(2):
            a = req(gw, p)
            assert a.status == code
            assert_miss(a, stored=False)
        assert up.count(path=p) == 2, code
    # 200 still is.
    assert_miss(req(gw, "/s404/c/respond?size=5"))
    assert_hit(req(gw, "/s404/c/respond?size=5"))


def test_statuses_listed(env):
    """statuses [204, 301, 410] (200 left out): each listed one is stored and its
    HIT is the same answer; 200 is not stored."""
    gw, up = env.gw, env.up
    for code in (204, 301, 410):
        p = "/smore/a/status/%d" % code
        a = req(gw, p)
        assert a.status == code
        assert_miss(a)
        b = req(gw, p)
        assert b.status == code
        assert_hit(b, body=a.body)
        assert b.e2e() == a.e2e()
        if code == 204:
            assert b.body == b"" and b.h("Content-Length") in (None, "0"), b
        if code == 301:
            assert b.h("Location") == "/echo", b
        assert up.count(path=p) == 1, code
    for _ in range(2):
        assert_miss(req(gw, "/smore/b/respond?size=5"), stored=False)
    assert up.count(path="/smore/b/respond") == 2


def test_header_value_with_control_byte_is_encoded(env):
    """A header value's bytes outside the unreserved set are %XX in the key, a
    tab too: the key stays a valid header value and the answer is cached."""
    gw, up = env.gw, env.up
    a = req(gw, "/tmpl2/9?x=1", headers={"X-Tenant": "a\tb"})
    b = req(gw, "/tmpl2/9?x=1", headers={"X-Tenant": "a\tb"})
    assert_miss(a)
    assert_hit(b)
    assert "a%09b" in b.headers.get("X-Cache-Key"), b
    assert up.count(path="/tmpl2/9") == 1


def test_values_cannot_forge_another_requests_key(env):
    """Text shifted from one template part into another does not reach another
    request's entry: /tmpl2/5:1 for tenant t1 and /tmpl2/5?x=1 for tenant ":t1"
    would both read t2:5:1::t1 with raw values."""
    gw, up = env.gw, env.up
    a = req(gw, "/tmpl2/5:1", headers={"X-Tenant": "t1"})
    b = req(gw, "/tmpl2/5?x=1", headers={"X-Tenant": ":t1"})
    assert_miss(a)
    assert_miss(b)
    assert a.headers.get("X-Cache-Key") != b.headers.get("X-Cache-Key"), (a, b)
    assert up.count(path="/tmpl2/5:1") == 1 and up.count(path="/tmpl2/5") >= 1


def test_unusable_key_bypasses(env):
    """A key over 2 KiB, or from more than 256 query pairs: BYPASS
    (detail=key), never a truncated key that another request could share."""
    gw, up = env.gw, env.up
    many = "&".join("p%d=1" % i for i in range(300))
    cases = [("/basic/longkey?x=" + "a" * 2100, {}, "/basic/longkey"),
             ("/basic/many?" + many, {}, "/basic/many")]
    for path, headers, upath in cases:
        for i in range(2):
            a = req(gw, path, headers=headers)
            assert a.status == 200
            assert_bypass(a, "key")
        assert up.count(path=upath) == 2, path[:40]


def test_upstream_cache_fields_not_kept(env):
    """An upstream's own X-Cache / Cache-Status do not come back from the
    entry: one X-Cache (ours). One Age: the upstream's (the time the answer
    spent in caches before us) plus ours."""
    gw, up = env.gw, env.up
    theirs = [("X-Cache", "HIT"), ("Age", "77"), ("Cache-Status", "upstream; hit")]
    p = respond("/basic/theirs", size=20, headers=theirs)
    a = req(gw, p)
    b = req(gw, p)
    assert_miss(a)
    assert_hit(b)
    for x in (a, b):
        assert x.all("X-Cache") == [x.xcache], x
        assert x.all("Age") in (["77"], ["78"]), x
        assert x.all("Cache-Status") == [x.cstatus] and x.cstatus.startswith("gateway;"), x


@pytest.mark.parametrize("kind", ["miss-not-stored", "bypass"])
def test_upstream_x_cache_not_passed_on_pass_through(env, kind):
    """Not served from an entry either: the client sees one X-Cache, ours."""
    gw = env.gw
    hdrs = [("X-Cache", "HIT"), ("X-Cache-Key", "theirs")] + (
        [("Set-Cookie", "a=1")] if kind == "miss-not-stored" else [])
    p = respond("/unless/theirs-%s" % kind, size=20, headers=hdrs, **({"nocache": 1} if kind == "bypass" else {}))
    a = req(gw, p)
    want = "MISS" if kind == "miss-not-stored" else "BYPASS"
    assert a.all("X-Cache") == [want], "X-Cache lines: %r" % a.all("X-Cache")
    assert "theirs" not in a.all("X-Cache-Key") and len(a.all("X-Cache-Key")) <= 1, a


def test_max_object_bytes(env):
    gw, up = env.gw, env.up
    for size, chunked, stored in ((MAX_OBJECT + 1, False, False), (MAX_OBJECT + 1, True, False),
                                  (MAX_OBJECT, False, True), (MAX_OBJECT, True, True)):
        more = {"chunked": 1} if chunked else {}
        p = respond("/basic/max-%d-%d" % (size, chunked), size=size, kind="random", **more)
        a = req(gw, p)
        b = req(gw, p)
        want = respond_body(size, "random", 0)
        assert a.body == want and b.body == want
        if stored:
            assert_miss(a)
            assert_hit(b)
            assert up.count(path=path_of(p)) == 1, (size, chunked)
        else:
            assert_miss(a, stored=False)
            assert_miss(b, stored=False)
            assert up.count(path=path_of(p)) == 2, (size, chunked)


def test_memory_max_bytes(stack):
    """memory_max_bytes 64 KiB, ten 10000-byte answers stored one after the other:
    at most six stay (each is charged a little more than its body), the newest
    one among them."""
    up = stack.upstream("up")
    cfg = gateway_config({"up": upstream_config([up], timeout="5s")}, routes=[cached("mm", prefix="/mm/")],
                         server={"workers": 1},
                         cache={"store": "memory", "memory_max_bytes": "64KiB", "max_object_bytes": "16KiB"})
    gw = stack.gateway(cfg)
    paths = [respond("/mm/e%d" % i, size=10000, kind="random") for i in range(10)]
    for p in paths:
        assert_miss(req(gw, p))
    # Newest first: a HIT stores nothing, so the count is of what was kept.
    got = [req(gw, p).xcache for p in reversed(paths)]
    assert got[0] == "HIT", "the entry stored last was evicted: %s" % got
    assert got.count("HIT") <= 6, "more than 64 KiB kept: %s" % got


CONFIG_ERRORS = [
    ({"store": "memory", "memory_max_bytes": "1KiB", "max_object_bytes": "4KiB"}, {}, "cache.memory_max_bytes"),
    ({}, {"statuses": [200, 500]}, "routes[0].cache.statuses[1]"),
    ({}, {"statuses": []}, "routes[0].cache.statuses"),
    ({"coalesce": "bogus"}, {}, "cache.coalesce"),
    ({}, {"unless": {"body.x": "1"}}, "routes[0].cache.unless"),
    ({"store": "redis"}, {}, "cache.store"),
    ({"lock_timeout": "0s"}, {}, "cache.lock_timeout"),
    ({"hot_tier": "maybe"}, {}, "cache.hot_tier"),
]


@pytest.mark.parametrize("cache,rcache,key", CONFIG_ERRORS, ids=[c[2] + "-%d" % i for i, c in enumerate(CONFIG_ERRORS)])
def test_config_errors(stack, cache, rcache, key):
    cfg = gateway_config({"up": upstream_config(["127.0.0.1:9"])}, routes=[cached("r", prefix="/", cache=rcache)],
                         **({"cache": cache} if cache else {}))
    cfg["server"]["listen"] = "127.0.0.1:1"
    path = stack.scratch / "cache-check.yaml"
    path.write_text(to_yaml(cfg))
    res = run_gateway(["--check", "-c", str(path)])
    assert res.returncode == 1, "exit %d, stderr %s" % (res.returncode, res.stderr[-500:])
    assert ("cache-check.yaml:" in res.stderr) and (": %s" % key) in res.stderr, res.stderr[-500:]


# ---------------------------------------------------------------------------
# HEAD

def test_head_from_get_entry(env):
    gw, up = env.gw, env.up
    p = "/basic/head1/respond?size=700"
    g = req(gw, p)
    assert_miss(g)
    h = req(gw, p, method="HEAD")
    assert h.status == 200
    assert_hit(h)
    assert h.body == b""
    assert h.h("Content-Length") == "700", h
    assert h.e2e() == g.e2e()
    assert up.count(path="/basic/head1/respond") == 1


def test_head_miss_populates_entry(env):
    gw, up = env.gw, env.up
    p = "/basic/head2/respond?size=900"
    h = req(gw, p, method="HEAD")
    assert h.status == 200 and h.body == b""
    assert_miss(h)
    assert h.h("Content-Length") == "900", h
    assert [r.method for r in up.seen(path="/basic/head2/respond")] == ["GET"], \
        "a HEAD miss is fetched upstream as GET"
    g = req(gw, p)
    assert_hit(g, body=respond_body(900))
    assert g.e2e() == h.e2e()
    h2 = req(gw, p, method="HEAD")
    assert_hit(h2)
    assert h2.body == b""
    assert up.count(path="/basic/head2/respond") == 1


def test_head_miss_not_storable(env):
    """A HEAD miss whose answer may not be stored: no body, the length of the GET's."""
    gw, up = env.gw, env.up
    p = respond("/basic/head3", size=60, headers=[("Set-Cookie", "a=1")])
    for _ in range(2):
        h = req(gw, p, method="HEAD")
        assert h.status == 200 and h.body == b""
        assert_miss(h, stored=False)
        assert h.h("Content-Length") == "60", h
    assert up.count(path="/basic/head3/respond") == 2


# ---------------------------------------------------------------------------
# Invalidation by route

def test_invalidate_on_write(env):
    gw, up = env.gw, env.up
    a = req(gw, "/api/items/list")
    assert_miss(a)
    assert_hit(req(gw, "/api/items/list"), body=a.body)
    other = req(gw, "/api/items?page=2")
    assert_miss(other)
    w = req(gw, "/api/items/new", method="POST", body=b'{"name": "x"}')
    assert w.status == 200 and w.xcache is None
    b = req(gw, "/api/items/list")
    assert_miss(b)
    assert b.body != a.body, "the answer after the write is a new fetch (new request id in the echo)"
    assert up.count(path="/api/items/list", method="GET") == 2
    assert_miss(req(gw, "/api/items?page=2"))
    assert_hit(req(gw, "/api/items/list"), body=b.body)


@pytest.mark.parametrize("code", [400, 404, 500, 503])
def test_failed_write_does_not_invalidate(env, code):
    gw, up = env.gw, env.up
    p = "/api/items/keep%d" % code
    a = req(gw, p)
    assert_miss(a)
    w = req(gw, "/api/items/status/%d" % code, method="POST", body=b"{}")
    assert w.status == code
    assert_hit(req(gw, p), body=a.body)
    assert up.count(path=p) == 1


def test_invalidate_template_pattern(env):
    gw, up = env.gw, env.up
    first = {}
    for i in ("1", "2", "12"):
        a = req(gw, "/api/item/%s" % i)
        assert_miss(a)
        assert a.key == "cache:item:%s" % i
        first[i] = a.body
    w = req(gw, "/api/item/1", method="PUT", body=b"{}")
    assert w.status == 200
    assert_miss(req(gw, "/api/item/1"))
    assert_hit(req(gw, "/api/item/2"), body=first["2"])
    assert_hit(req(gw, "/api/item/12"), body=first["12"])
    # A '*' in the value is a literal '*', not a glob that takes every item.
    w = req(gw, "/api/item/*", method="DELETE")
    assert w.status == 200
    assert_hit(req(gw, "/api/item/2"), body=first["2"])
    assert_hit(req(gw, "/api/item/12"), body=first["12"])
    assert up.count(path="/api/item/1", method="GET") == 2
    assert up.count(path="/api/item/2", method="GET") == 1


def test_invalidation_during_fetch_not_stored(env):
    """A miss being fetched when a matching invalidation comes is not stored."""
    gw, up = env.gw, env.up
    p = "/api/items/slow/delay/600"
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(req, gw, p)
        assert up.wait_in_flight(1, 5), "the slow GET never reached the upstream"
        w = req(gw, "/api/items/x", method="POST", body=b"{}")
        assert w.status == 200
        a = fut.result(10)
    assert a.status == 200
    assert a.xcache == "MISS", a
    b = req(gw, p)
    assert_miss(b)
    assert b.body != a.body
    assert up.count(path=p) == 2


def test_rate_limit_before_cache(env):
    """The limiter comes first: hits count against the limit, and a refused
    request is not a cache request at all."""
    gw, up = env.gw, env.up
    got = [req(gw, "/rlc/x") for _ in range(4)]
    assert [(a.status, a.xcache) for a in got] == [(200, "MISS"), (200, "HIT"), (429, None), (429, None)], got
    assert up.count(prefix="/rlc/") == 1
    assert cache_counts(gw, "rlc") == {"hit": 1, "miss": 1, "bypass": 0, "stale": 0}


# ---------------------------------------------------------------------------
# Metrics

def test_metrics_counts(env):
    gw = env.gw
    assert cache_counts(gw, "metered") == {"hit": 0, "miss": 0, "bypass": 0, "stale": 0}
    for p in ("/metered/a", "/metered/b"):
        assert_miss(req(gw, p))  # 2 miss
    for _ in range(3):
        assert_hit(req(gw, "/metered/a"))  # 3 hit
    assert_hit(req(gw, "/metered/a", method="HEAD"))  # 1 hit
    for _ in range(2):
        assert_bypass(req(gw, "/metered/a?skip=1"))  # 2 bypass
    assert_bypass(req(gw, "/metered/a", headers={"Authorization": "Basic eDp5"}))  # 1 bypass
    for _ in range(2):
        assert_miss(req(gw, respond("/metered/c", headers=[("Set-Cookie", "a=1")])), stored=False)  # 2 miss
    r = req(gw, "/metered/a", method="POST", body=b"")  # not a cache request
    assert r.status == 200
    want = {"hit": 4, "miss": 4, "bypass": 3, "stale": 0}
    assert cache_counts(gw, "metered") == want
    m = gw.metrics()
    assert m.types.get("gateway_cache_requests_total") == "counter"
    for lab, _ in m.series("gateway_cache_requests_total"):
        assert set(lab) == {"route", "result"} and lab["result"] in ("hit", "miss", "bypass", "stale"), lab
        assert not lab["route"].startswith("/"), lab


# ---------------------------------------------------------------------------
# Compression with the cache

COMPRESSION = {"algorithms": ["br", "gzip"], "min_bytes": 64, "types": ["application/json"]}


@pytest.fixture(scope="module")
def cenv(module_stack, env):
    e = Env()
    e.up = env.up
    cfg = gateway_config({"up": upstream_config([e.up], timeout="5s", keepalive=8)},
                         routes=[cached("cz", prefix="/cz/", cache={"ttl": "60s"})],
                         cache={"store": "memory"}, compression=COMPRESSION)
    e.gw = module_stack.gateway(cfg, name="gw-cache-compress")
    return e


def decoded(a):
    ce = a.all("Content-Encoding")
    assert len(ce) <= 1, a
    assert a.all("Content-Length") == [str(len(a.body))], "Content-Length vs %d bytes: %r" % (len(a.body), a)
    if not ce or ce == ["identity"]:
        return a.body
    if ce == ["br"]:
        return BROTLI.decompress(a.body)
    if ce == ["gzip"]:
        return gunzip(a.body)
    raise AssertionError("unexpected Content-Encoding %r" % ce)


def vary_ae(a):
    return "accept-encoding" in [t.strip().lower() for v in a.all("Vary") for t in v.split(",")]


@pytest.mark.parametrize("first_ae", ["br", None, "gzip"])
def test_compressed_variants_from_one_entry(cenv, first_ae):
    gw, up = cenv.gw, cenv.up
    p = respond("/cz/v-%s" % first_ae, size=5000, seed=5, headers=[("ETag", '"tag5"')])
    want = respond_body(5000, "json", 5)
    a = req(gw, p, ae=first_ae)
    assert_miss(a)
    assert decoded(a) == want
    expect = {None: None, "br": "br", "gzip": "gzip"}[first_ae]
    assert a.h("Content-Encoding") == expect, a
    cases = [(None, None), ("br", "br"), ("gzip", "gzip"), ("gzip, br", "br"), ("br;q=0.5, gzip", "gzip"),
             ("identity", None), ("br;q=0, gzip;q=0", None), ("deflate", None), (None, None)]
    for ae, coding in cases:
        b = req(gw, p, ae=ae)
        assert b.status == 200
        assert_hit(b)
        assert b.h("Content-Encoding") == coding, (ae, b)
        assert decoded(b) == want, ae
        assert vary_ae(b), "Vary: Accept-Encoding on every variant (%r): %r" % (ae, b)
        if coding:
            assert len(b.body) < len(want)
            assert b.h("ETag") == 'W/"tag5"', (ae, b)
        else:
            assert b.h("ETag") == '"tag5"', (ae, b)
    assert up.count(path=path_of(p)) == 1


@pytest.mark.parametrize("ae", [None, "gzip", "br", "gzip, br"])
def test_head_on_compressible_entry_is_uncompressed(cenv, ae):
    """HEAD is answered as on an uncached route: the GET's fields with Vary,
    the identity length, no Content-Encoding, the strong ETag; on the miss
    that fills the entry and on the hit."""
    gw, up = cenv.gw, cenv.up
    p = respond("/cz/head-%s" % (ae or "none").replace(", ", "-"), size=9000, seed=77,
                headers=[("ETag", '"h1"')])
    for n, a in enumerate((req(gw, p, method="HEAD", ae=ae), req(gw, p, method="HEAD", ae=ae))):
        (assert_miss if n == 0 else assert_hit)(a)
        assert a.status == 200 and a.body == b"", a
        assert a.h("Content-Encoding") is None, (ae, a)
        assert a.h("Content-Length") == "9000", (ae, a)
        assert a.h("ETag") == '"h1"', (ae, a)
        assert vary_ae(a), (ae, a)
    g = req(gw, p, ae=ae)
    assert_hit(g)
    assert decoded(g) == respond_body(9000, "json", 77)
    assert g.h("Content-Encoding") == ({"gzip": "gzip", "br": "br", "gzip, br": "br"}.get(ae)), (ae, g)
    assert up.count(path=path_of(p)) == 1


def test_if_none_match_on_hits(cenv):
    """A hit whose request names the entry's ETag (weak comparison) is a 304
    with the validator this client's variant carries, and no body; another
    tag gets the 200. Like nginx's proxy_cache."""
    gw, up = cenv.gw, cenv.up
    p = respond("/cz/inm", size=5000, seed=8, headers=[("ETag", '"t8"'), ("Cache-Control", "public")])
    assert_miss(req(gw, p))
    for ae, inm, etag in ((None, '"t8"', '"t8"'), (None, 'W/"t8"', '"t8"'), (None, '"x", "t8"', '"t8"'),
                          ("br", 'W/"t8"', 'W/"t8"'), ("gzip", '"t8"', 'W/"t8"'), (None, "*", '"t8"')):
        b = req(gw, p, ae=ae, headers={"If-None-Match": inm})
        assert b.status == 304, (ae, inm, b)
        assert b.body == b"" and b.h("ETag") == etag, (ae, inm, b)
        assert b.h("Cache-Control") == "public" and vary_ae(b), b
        assert b.h("Content-Encoding") is None and b.h("Content-Type") is None, b
        assert b.cstatus.startswith("gateway; hit"), b
    b = req(gw, p, headers={"If-None-Match": '"other"'})
    assert b.status == 200 and len(b.body) == 5000, b
    assert_hit(b)
    assert up.count(path=path_of(p)) == 1


def test_fill_asks_for_the_whole_representation(cenv):
    """A miss carrying validators or a Range: the fill goes upstream without
    them (a 304 or 206 could not be stored), the entry is stored, and the
    client gets its 304 from it."""
    gw, up = cenv.gw, cenv.up
    p = respond("/cz/fill", size=3000, seed=9, headers=[("ETag", '"t9"')])
    a = req(gw, p, headers={"If-None-Match": '"t9"', "If-Modified-Since": "Sun, 06 Nov 1994 08:49:37 GMT",
                            "Range": "bytes=0-10"})
    assert a.status == 304 and a.body == b"" and a.h("ETag") == '"t9"', a
    seen = up.seen(path=path_of(p))
    assert len(seen) == 1
    for name in ("If-None-Match", "If-Modified-Since", "Range"):
        assert seen[0].header(name) is None, (name, seen[0])
    b = req(gw, p)
    assert_hit(b)
    assert len(b.body) == 3000


def test_uncompressible_and_small_with_cache(cenv):
    gw, up = cenv.gw, cenv.up
    # Random bytes: no coding is smaller, so everyone gets identity (still Vary).
    p = respond("/cz/rand", size=3000, kind="random")
    want = respond_body(3000, "random", 0)
    assert_miss(req(gw, p, ae="br"))
    for ae in ("br", "gzip", None):
        b = req(gw, p, ae=ae)
        assert_hit(b, body=want)
        assert b.h("Content-Encoding") is None and vary_ae(b), b
    # Under min_bytes: not compressed, no Vary.
    p = respond("/cz/small", size=40)
    assert_miss(req(gw, p, ae="br"))
    b = req(gw, p, ae="br")
    assert_hit(b, body=respond_body(40))
    assert b.h("Content-Encoding") is None and not vary_ae(b), b
    assert up.count(path="/cz/rand/respond") == 1 and up.count(path="/cz/small/respond") == 1


# ---------------------------------------------------------------------------
# Coalescing

def coalesce_gateway(stack, coalesce="worker", lock_timeout=None):
    up = stack.upstream("up")
    cache = {"store": "memory", "coalesce": coalesce}
    if lock_timeout:
        cache["lock_timeout"] = lock_timeout
    cfg = gateway_config({"up": upstream_config([up], timeout="5s", keepalive=32)},
                         routes=[cached("co", prefix="/co/", cache={"ttl": "60s"})],
                         server={"workers": 1, "request_timeout": "10s"}, cache=cache)
    return stack.gateway(cfg), up


N = 20


def test_coalescing_one_fetch(stack):
    gw, up = coalesce_gateway(stack)
    p = "/co/x/delay/700"
    got = concurrently(lambda i: req(gw, p, timeout=10), N)
    assert [a.status for a in got] == [200] * N
    assert up.count(path=p) == 1, "%d upstream requests for %d identical concurrent misses" % (up.count(path=p), N)
    assert len({a.body for a in got}) == 1, "different bodies: they were not all the one fetch"
    xc = sorted(a.xcache for a in got)
    assert xc == ["HIT"] * (N - 1) + ["MISS"], xc
    collapsed = [a for a in got if "collapsed" in (a.cstatus or "")]
    assert collapsed, "no answer says collapsed: %s" % [a.cstatus for a in got]
    assert cache_counts(gw, "co") == {"hit": N - 1, "miss": 1, "bypass": 0, "stale": 0}


def test_coalescing_head_leader_get_followers(stack):
    """The leader is a HEAD (fetched as GET): the GETs waiting on it get the body."""
    gw, up = coalesce_gateway(stack)
    p = "/co/h/delay/500"
    with ThreadPoolExecutor(4) as pool:
        lead = pool.submit(req, gw, p, "HEAD")
        assert up.wait_in_flight(1, 5)
        follow = [pool.submit(req, gw, p) for _ in range(3)]
        h = lead.result(10)
        got = [f.result(10) for f in follow]
    assert h.status == 200 and h.body == b"" and h.xcache == "MISS", h
    for a in got:
        assert a.status == 200 and a.xcache == "HIT" and len(a.body) == int(h.h("Content-Length")), a
        assert b'"method": "GET"' in a.body, a
    assert len({a.body for a in got}) == 1
    assert up.count(path=p) == 1 and up.seen(path=p)[0].method == "GET"


def test_coalescing_leader_client_gone(stack):
    """The leader's client hangs up while its fetch runs: the waiting requests
    are still answered, with one body."""
    gw, up = coalesce_gateway(stack)
    p = "/co/gone/delay/400"
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    try:
        sock.sendall(b"GET " + p.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert up.wait_in_flight(1, 5), "the leader's fetch never reached the upstream"
        with ThreadPoolExecutor(3) as pool:
            follow = [pool.submit(req, gw, p) for _ in range(3)]
            time.sleep(0.1)  # the followers are waiting on the flight now
            sock.close()
            got = [f.result(10) for f in follow]
    finally:
        sock.close()
    assert [a.status for a in got] == [200] * 3, got
    assert len({a.body for a in got}) == 1
    assert up.count(path=p) <= 2


def test_coalescing_off(stack):
    gw, up = coalesce_gateway(stack, coalesce="off")
    p = "/co/y/delay/700"
    got = concurrently(lambda i: req(gw, p, timeout=10), N)
    assert [a.status for a in got] == [200] * N
    n = up.count(path=p)
    assert n > 1, "coalesce: off still made one fetch"
    assert sum(a.xcache == "MISS" for a in got) == n, [a.xcache for a in got]


def test_coalescing_lock_timeout(stack):
    """lock_timeout 100ms, a 700ms fetch: the waiters give up and fetch themselves."""
    gw, up = coalesce_gateway(stack, lock_timeout="100ms")
    p = "/co/z/delay/700"
    got = concurrently(lambda i: req(gw, p, timeout=10), 5)
    assert [a.status for a in got] == [200] * 5
    assert up.count(path=p) > 1


def test_coalescing_not_stored_followers_fetch(stack):
    """The leader's answer is not cacheable (Set-Cookie): each waiter fetches its own,
    nobody gets another client's cookie."""
    gw, up = coalesce_gateway(stack)
    up.set_answer("nc", body=b'{"v": 1}', headers=[("Set-Cookie", "sid=secret")], delay=0.3)
    got = concurrently(lambda i: req(gw, "/co/answer/nc", timeout=10), 5)
    assert [a.status for a in got] == [200] * 5
    assert up.count(path="/co/answer/nc") == 5
    for a in got:
        assert_miss(a, stored=False)


# ---------------------------------------------------------------------------
# Stale

def stale_gateway(stack, up_timeout="5s", **cache):
    up = stack.upstream("up")
    c = {"store": "memory"}
    c.update(cache)
    cfg = gateway_config({"up": upstream_config([up], timeout=up_timeout, keepalive=16)},
                         routes=[cached("st", prefix="/st/", cache={"ttl": "1s"})],
                         server={"workers": 1, "request_timeout": "10s"}, cache=c)
    return stack.gateway(cfg), up


def test_stale_if_error(stack):
    gw, up = stale_gateway(stack, stale_if_error="30s", up_timeout="600ms")
    up.set_answer("sie", body=b'{"v": 1}')
    p = "/st/answer/sie"
    t0 = time.monotonic()
    assert_miss(req(gw, p), body=b'{"v": 1}')
    assert_hit(req(gw, p), body=b'{"v": 1}')
    up.set_answer("sie", body=b'{"error": "boom"}', status=500)
    time.sleep(max(0.0, 1.2 - (time.monotonic() - t0)))  # past the 1s ttl
    for code in (500, 503):
        up.set_answer("sie", body=b'{"error": "boom"}', status=code)
        a = req(gw, p)
        assert a.status == 200, "upstream %d within stale_if_error: %r" % (code, a)
        assert a.xcache == "STALE" and "stale-if-error" in (a.cstatus or ""), a
        assert a.body == b'{"v": 1}'
    assert up.count(path=p) == 3  # 1 + one attempt per failure
    # A 404 is an answer, not a failure: passed on.
    up.set_answer("sie", body=b'{"gone": true}', status=404)
    a = req(gw, p)
    assert a.status == 404 and a.body == b'{"gone": true}', a
    # Past the upstream's timeout (our 504): the old copy.
    up.set_answer("sie", body=b'{"v": "late"}', delay=1.0)
    t = time.monotonic()
    a = req(gw, p)
    assert a.status == 200 and a.xcache == "STALE" and a.body == b'{"v": 1}', a
    assert time.monotonic() - t < 1.0
    # The upstream gone (connection refused: our 502): the old copy.
    up.stop()
    a = req(gw, p)
    assert a.status == 200 and a.xcache == "STALE" and a.body == b'{"v": 1}', a
    # Nothing to fall back on: the 502 itself.
    b = req(gw, "/st/answer/never")
    assert b.status == 502, b
    counts = cache_counts(gw, "st")
    assert counts["stale"] == 4, counts


def test_stale_while_revalidate(stack):
    gw, up = stale_gateway(stack, stale_while_revalidate="30s")
    up.set_answer("swr", body=b'{"v": 1}')
    p = "/st/answer/swr"
    t0 = time.monotonic()
    assert_miss(req(gw, p), body=b'{"v": 1}')
    up.set_answer("swr", body=b'{"v": 2}', delay=0.8)
    time.sleep(max(0.0, 1.2 - (time.monotonic() - t0)))  # past the 1s ttl
    with ThreadPoolExecutor(1) as pool:
        lead = pool.submit(req, gw, p)
        assert up.wait_in_flight(1, 5), "no refresh reached the upstream"
        others = concurrently(lambda i: req(gw, p), 8)
        still = up.in_flight
        leader = lead.result(10)
    for a in others:
        assert a.status == 200 and a.body == b'{"v": 1}', a
        assert a.xcache == "STALE" and "stale-while-revalidate" in (a.cstatus or ""), a
        assert a.elapsed < 0.5, "a stale answer waited for the refresh (%.2fs)" % a.elapsed
    assert still == 1, "the stale answers came after the refresh ended"
    assert leader.status == 200 and leader.body == b'{"v": 2}', leader
    assert leader.xcache == "MISS", leader
    assert up.count(path=p) == 2
    assert_hit(req(gw, p), body=b'{"v": 2}')
    assert cache_counts(gw, "st")["stale"] == 8


# ---------------------------------------------------------------------------
# Admin

def admin_post(port, path, token=ADMIN_TOKEN, params=None, method="POST"):
    headers = {"Authorization": "Bearer %s" % token} if token else {}
    return fresh(method, "http://127.0.0.1:%d%s" % (port, path), headers=headers, params=params, timeout=10)


def test_admin_invalidate_and_clear(stack):
    up = stack.upstream("up")
    aport = free_port()
    cfg = gateway_config({"up": upstream_config([up], timeout="5s")},
                         routes=[cached("adm", prefix="/adm/")], cache={"store": "memory"},
                         admin={"listen": "127.0.0.1:%d" % aport, "token": ADMIN_TOKEN})
    gw = stack.gateway(cfg)
    wait_until(lambda: fresh("GET", "http://127.0.0.1:%d/metrics" % aport, timeout=2).status_code == 200, 5,
               "the admin listener answering")
    for p in ("/adm/a/1", "/adm/a/2", "/adm/a/3", "/adm/b/1", "/adm/b/2"):
        assert_miss(req(gw, p))
    assert_miss(req(gw, respond("/adm/a/nostore", headers=[("Set-Cookie", "x=1")])), stored=False)

    # Refusals first: none of them deletes anything.
    for token in (None, "wrong-token"):
        for path in ("/admin/cache/clear", "/admin/cache/invalidate?pattern=*"):
            r = admin_post(aport, path, token=token)
            assert r.status_code == 401, (token, path, r.status_code, r.text)
    for path in ("/admin/cache/clear", "/admin/cache/invalidate?pattern=*"):
        r = admin_post(aport, path, method="GET")
        assert r.status_code == 405, (path, r.status_code, r.text)
        assert "POST" in r.headers.get("Allow", ""), r.headers
    for params in (None, {"pattern": ""}):
        r = admin_post(aport, "/admin/cache/invalidate", params=params)
        assert r.status_code == 400, (params, r.status_code, r.text)
    # Not on the main listener.
    r = fresh("POST", gw.url("/admin/cache/clear"), headers={"Authorization": "Bearer " + ADMIN_TOKEN})
    assert r.status_code == 404, r.status_code
    assert_hit(req(gw, "/adm/a/1"))

    r = admin_post(aport, "/admin/cache/invalidate", params={"pattern": "cache:GET:/adm/a/*"})
    assert r.status_code == 200, r.text
    assert r.headers.get("Content-Type", "").startswith("application/json")
    assert r.json() == {"pattern": "cache:GET:/adm/a/*", "deleted": 3}, r.text
    assert_miss(req(gw, "/adm/a/1"))
    assert_hit(req(gw, "/adm/b/1"))
    r = admin_post(aport, "/admin/cache/invalidate", params={"pattern": "cache:GET:/adm/zzz*"})
    assert r.json() == {"pattern": "cache:GET:/adm/zzz*", "deleted": 0}, r.text
    r = admin_post(aport, "/admin/cache/invalidate", params={"pattern": "cache:GET:/adm/b/2"})
    assert r.json() == {"pattern": "cache:GET:/adm/b/2", "deleted": 1}, r.text
    assert_miss(req(gw, "/adm/b/2"))
    # Now stored: /adm/a/1, /adm/b/1, /adm/b/2.
    r = admin_post(aport, "/admin/cache/clear")
    assert r.status_code == 200, r.text
    assert r.json() == {"pattern": "cache:*", "deleted": 3}, r.text
    for p in ("/adm/a/1", "/adm/b/1", "/adm/b/2", "/adm/a/3"):
        assert_miss(req(gw, p))
    r = admin_post(aport, "/admin/cache/clear")
    assert r.json()["deleted"] == 4, r.text
    r = admin_post(aport, "/admin/cache/clear")
    assert r.json()["deleted"] == 0, r.text

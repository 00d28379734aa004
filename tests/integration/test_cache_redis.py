"""The response cache with store: redis, against a real redis-server.

One Redis for the file (redis_server.py); each test starts gateways of its own
(2 workers, redis.timeout 200ms unless said) and, where it counts keys, empties
Redis first. Checked: what clients got (X-Cache, bodies), what the upstream
saw, the keys in Redis (EXISTS, PTTL, the entry's magic), what an invalidation
on one instance does to another (Redis and its hot tier, through pub/sub),
the admin endpoints' counts, what happens while Redis is killed, comes
back, or stalls (gateway_redis_up, gateway_cache_store_errors_total), and the
compressed variants an entry carries through Redis.
"""

import socket
import struct
import threading
import time
import uuid

import pytest
import requests

from harness import free_port, fresh, gateway_config, route, session, upstream_config, wait_until
from redis_server import redis_server  # noqa: F401 - the fixture
from test_cache import (ADMIN_TOKEN, admin_post, assert_bypass, assert_hit, assert_miss, cached, concurrently,
                        decoded, path_of, req, respond, vary_ae)
from upstream import respond_body


def redis_gateway(stack, redis, routes, up=None, name=None, timeout="200ms", admin_port=None, compression=None,
                  **cache):
    up = up or stack.upstream("up")
    c = {"store": "redis"}
    c.update(cache)
    sections = {}
    if compression:
        sections["compression"] = compression
    if admin_port:
        sections["admin"] = {"listen": "127.0.0.1:%d" % admin_port, "token": ADMIN_TOKEN}
    cfg = gateway_config({"up": upstream_config([up], timeout="5s", keepalive=16)}, routes=routes,
                         server={"workers": 2}, cache=c, redis=redis.redis_section(timeout=timeout), **sections)
    gw = stack.gateway(cfg, name=name)
    if admin_port:
        wait_until(lambda: fresh("GET", "http://127.0.0.1:%d/metrics" % admin_port, timeout=2).status_code == 200,
                   5, "the admin listener answering")
    return gw, up


def exists(redis, key):
    return redis.cli("exists", key).strip() == "1"


def wait_key(redis, key, timeout=2.0):
    wait_until(lambda: exists(redis, key), timeout, "key %r in Redis" % key)


def metric(gw, name, **labels):
    return gw.metrics().value(name, **labels)


def wait_cache_from_redis(gw, redis, prefix, probes=6, timeout=4.0):
    """Until `probes` fresh-connection requests (so over both workers), each to a
    new URL, are all MISS-and-stored in Redis then HIT; returns the seconds it took."""
    start = time.monotonic()

    def good():
        for _ in range(probes):
            p = "%s/%s" % (prefix, uuid.uuid4().hex)
            a = req(gw, p, timeout=5)
            if a.status != 200 or a.xcache != "MISS" or "stored" not in (a.cstatus or ""):
                return False
            wait_key(redis, a.key, 1.0)
            if req(gw, p, timeout=5).xcache != "HIT":
                return False
        return True
    wait_until(good, timeout, "cache hits through Redis on every worker", interval=0.05)
    return time.monotonic() - start


# ---------------------------------------------------------------------------

def test_miss_hit_entry_in_redis(stack, redis_server):
    gw, up = redis_gateway(stack, redis_server, [cached("r1", prefix="/r1/", cache={"ttl": "20s"})],
                           stale_if_error="10s")
    p = "/r1/x/respond?size=200&seed=1"
    a = req(gw, p)
    assert a.status == 200
    assert_miss(a)
    key = "cache:GET:/r1/x/respond?seed=1&size=200"
    assert a.key == key
    wait_key(redis_server, key)
    pttl = int(redis_server.cli("pttl", key).strip())
    assert 28000 <= pttl <= 30000, "PTTL %d: expected ttl 20s + stale_if_error 10s" % pttl
    assert redis_server.cli("getrange", key, 0, 3).strip() == "GWC1"
    b = req(gw, p)
    assert_hit(b, body=a.body)
    assert b.e2e() == a.e2e()
    assert up.count(path="/r1/x/respond") == 1
    wait_until(lambda: metric(gw, "gateway_redis_up") == 1, 3, "gateway_redis_up 1")
    assert metric(gw, "gateway_cache_store_errors_total") == 0


def test_hot_tier_off_hits_come_from_redis(stack, redis_server):
    gw, up = redis_gateway(stack, redis_server, [cached("r2", prefix="/r2/", cache={"ttl": "60s"})],
                           hot_tier=False)
    p = "/r2/x/respond?size=300"
    a = req(gw, p)
    assert_miss(a)
    wait_key(redis_server, a.key)
    up.stop()  # from here on only Redis can answer
    gets = redis_server.command_calls("get")
    for _ in range(4):
        assert_hit(req(gw, p), body=a.body)
    assert redis_server.command_calls("get") >= gets + 4, "hits without a Redis GET each (hot_tier: false)"
    redis_server.cli("del", a.key)
    b = req(gw, p)
    # (The gateway's own 502 carries no X-Cache; what matters is that it is not a hit.)
    assert b.status == 502 and b.xcache in (None, "MISS"), "no copy anywhere but Redis, and it is gone: %r" % b


def test_hot_tier_on_serves_from_memory(stack, redis_server):
    gw, up = redis_gateway(stack, redis_server, [cached("r3", prefix="/r3/", cache={"ttl": "60s"})])
    p = "/r3/x/respond?size=300"
    a = req(gw, p)
    assert_miss(a)
    wait_key(redis_server, a.key)
    gets = redis_server.command_calls("get")
    for _ in range(4):
        assert_hit(req(gw, p), body=a.body)
    assert redis_server.command_calls("get") == gets, "hot tier hits went to Redis"
    assert up.count(path="/r3/x/respond") == 1


def test_stale_if_error_from_redis(stack, redis_server):
    """hot_tier false: the expired copy kept in Redis (PX = ttl + stale_if_error)
    is served when the upstream fails."""
    gw, up = redis_gateway(stack, redis_server, [cached("rs", prefix="/rs/", cache={"ttl": "1s"})],
                           hot_tier=False, stale_if_error="30s")
    up.set_answer("a", body=b'{"v": 1}')
    t0 = time.monotonic()
    a = req(gw, "/rs/answer/a")
    assert_miss(a, body=b'{"v": 1}')
    wait_key(redis_server, a.key)
    assert 30000 <= int(redis_server.cli("pttl", a.key).strip()) <= 31000
    up.set_answer("a", body=b"{}", status=503)
    time.sleep(max(0.0, 1.2 - (time.monotonic() - t0)))  # past the 1s ttl
    b = req(gw, "/rs/answer/a")
    assert b.status == 200 and b.xcache == "STALE" and b.body == b'{"v": 1}', b
    assert up.count(path="/rs/answer/a") == 2


def test_coalescing_through_redis(stack, redis_server):
    """One worker, store redis: 20 identical concurrent misses make one Redis
    lookup's worth of waiting and one upstream request."""
    up = stack.upstream("up")
    cfg = gateway_config({"up": upstream_config([up], timeout="5s", keepalive=32)},
                         routes=[cached("rc", prefix="/rc/", cache={"ttl": "60s"})],
                         server={"workers": 1, "request_timeout": "10s"}, cache={"store": "redis"},
                         redis=redis_server.redis_section())
    gw = stack.gateway(cfg)
    wait_cache_from_redis(gw, redis_server, "/rc/warm", probes=1)
    got = concurrently(lambda i: req(gw, "/rc/x/delay/500", timeout=10), 20)
    assert [a.status for a in got] == [200] * 20
    assert up.count(path="/rc/x/delay/500") == 1
    assert len({a.body for a in got}) == 1


def test_corrupt_value_is_a_miss(stack, redis_server):
    """A value under a cache key that is not an entry (another program's, or cut
    short) is not served: MISS, and the key then holds a real entry."""
    gw, up = redis_gateway(stack, redis_server, [cached("r4", prefix="/r4/", cache={"ttl": "60s"})],
                           hot_tier=False)
    redis_server.cli("set", "cache:GET:/r4/garbage", "not an entry")
    a = req(gw, "/r4/garbage")
    assert a.status == 200
    assert_miss(a)
    wait_until(lambda: redis_server.cli("getrange", "cache:GET:/r4/garbage", 0, 3).strip() == "GWC1", 2,
               "a real entry under the key")
    assert_hit(req(gw, "/r4/garbage"), body=a.body)
    # A real entry with bytes after its end: lengths do not add up.
    p = "/r4/t/respond?size=100"
    b = req(gw, p)
    assert_miss(b)
    wait_key(redis_server, b.key)
    redis_server.cli("append", b.key, "junk")
    c = req(gw, p)
    assert c.status == 200 and c.body == b.body
    assert_miss(c)
    assert up.count(path="/r4/t/respond") == 2


def next_after_invalidation(gw, path, hot_tier, old_body):
    """B's answer after an invalidation made on A. Without a hot tier the very next
    GET must miss (the key is gone from Redis before A answers). With one, B
    hears of it through pub/sub, which A does not wait for: B may still answer
    from its hot tier for a moment, so we allow that for at most 1 s."""
    deadline = time.monotonic() + (1.0 if hot_tier else 0.0)
    while True:
        a = req(gw, path)
        if a.xcache != "HIT" or time.monotonic() >= deadline:
            return a
        assert a.body == old_body, a
        time.sleep(0.01)


@pytest.mark.parametrize("hot_tier", [False, True])
def test_two_instances_share_and_invalidate(stack, redis_server, hot_tier):
    redis_server.flushall()
    aport = free_port()
    routes = [cached("sh", prefix="/sh/", methods=["GET"], cache={"ttl": "60s"}),
              dict(route("sh-write", "up", prefix="/sh/", methods=["POST"]), invalidate=["cache:GET:/sh/*"])]
    a_gw, up = redis_gateway(stack, redis_server, routes, name="gw-a", admin_port=aport, hot_tier=hot_tier)
    b_gw, _ = redis_gateway(stack, redis_server, routes, up=up, name="gw-b", hot_tier=hot_tier)
    p = "/sh/x"
    a1 = req(a_gw, p)
    assert_miss(a1)
    wait_key(redis_server, a1.key)
    b1 = req(b_gw, p)
    assert_hit(b1, body=a1.body)
    assert_hit(req(b_gw, p), body=a1.body)
    assert up.count(path=p) == 1

    # A write on A: gone from Redis before A answers, and from B (its hot tier too).
    publishes = redis_server.command_calls("publish")
    w = req(a_gw, "/sh/w", method="POST", body=b"{}")
    assert w.status == 200
    assert not exists(redis_server, a1.key), "the key survived the write's invalidation"
    assert redis_server.command_calls("publish") > publishes, "the invalidation was not published"
    b2 = next_after_invalidation(b_gw, p, hot_tier, a1.body)
    assert_miss(b2)
    assert b2.body != a1.body
    assert up.count(path=p) == 2
    wait_key(redis_server, b2.key)
    assert_hit(req(a_gw, p), body=b2.body)

    # The admin endpoint on A: B forgets too. A's own hot tier holds /sh/x now
    # (copied on the hit just above) when it has one.
    r = admin_post(aport, "/admin/cache/invalidate", params={"pattern": "cache:GET:/sh/*"})
    assert r.status_code == 200, r.text
    assert r.json() == {"pattern": "cache:GET:/sh/*", "deleted": 1, "memory_deleted": 1 if hot_tier else 0}, r.text
    b3 = next_after_invalidation(b_gw, p, hot_tier, b2.body)
    assert_miss(b3)
    assert up.count(path=p) == 3
    wait_key(redis_server, b3.key)
    y = req(a_gw, "/sh/y")
    assert_miss(y)
    wait_key(redis_server, y.key)
    assert_hit(req(b_gw, "/sh/y"), body=y.body)

    r = admin_post(aport, "/admin/cache/clear")
    assert r.status_code == 200, r.text
    assert r.json() == {"pattern": "cache:*", "deleted": 2, "memory_deleted": 1 if hot_tier else 0}, r.text
    assert redis_server.keys("cache:*") == []
    assert_miss(next_after_invalidation(b_gw, p, hot_tier, b3.body))
    assert_miss(next_after_invalidation(b_gw, "/sh/y", hot_tier, y.body))


def test_admin_counts_redis_keys_under_prefix_only(stack, redis_server):
    redis_server.flushall()
    aport = free_port()
    prefix = "gw[1]:"  # glob characters: the prefix must be matched literally
    gw, up = redis_gateway(stack, redis_server, [cached("adm", prefix="/adm/")], admin_port=aport,
                           key_prefix=prefix)
    foreign = ["gw1:foreign", "other:key", "gw[1]", "gw[2]:x"]
    for k in foreign:
        redis_server.cli("set", k, "keep-me")
    paths = ["/adm/a/1", "/adm/a/2", "/adm/a/3", "/adm/b/1", "/adm/b/2"]
    for p in paths:
        a = req(gw, p)
        assert_miss(a)
        assert a.key == prefix + "GET:" + p
        wait_key(redis_server, a.key)
    assert_miss(req(gw, respond("/adm/nostore", headers=[("Set-Cookie", "x=1")])), stored=False)
    assert len(redis_server.keys("gw\\[1\\]:*")) == 5

    pat = "gw\\[1\\]:GET:/adm/a/*"
    r = admin_post(aport, "/admin/cache/invalidate", params={"pattern": pat})
    assert r.status_code == 200, r.text
    assert r.json() == {"pattern": pat, "deleted": 3, "memory_deleted": 3}, r.text
    assert sorted(redis_server.keys("gw\\[1\\]:*")) == [prefix + "GET:/adm/b/1", prefix + "GET:/adm/b/2"]
    assert_miss(req(gw, "/adm/a/1"))
    assert_hit(req(gw, "/adm/b/1"))
    wait_key(redis_server, prefix + "GET:/adm/a/1")

    # A pattern with no glob left once its escapes are read names one key
    # (deleted with UNLINK, unescaped): /adm/c*1 goes, /adm/c11 stays.
    for p in ("/adm/c*1", "/adm/c11"):
        a = req(gw, p)
        assert_miss(a)
        wait_key(redis_server, a.key)
    pat = "gw\\[1\\]:GET:/adm/c\\*1"
    r = admin_post(aport, "/admin/cache/invalidate", params={"pattern": pat})
    assert r.json() == {"pattern": pat, "deleted": 1, "memory_deleted": 1}, r.text
    assert not exists(redis_server, prefix + "GET:/adm/c*1")
    assert_hit(req(gw, "/adm/c11"))

    r = admin_post(aport, "/admin/cache/clear")
    assert r.status_code == 200, r.text
    assert r.json() == {"pattern": "gw\\[1\\]:*", "deleted": 4, "memory_deleted": 4}, r.text
    for k in foreign:
        assert exists(redis_server, k), "admin clear deleted %r, which is not under key_prefix" % k
    assert redis_server.keys("gw\\[1\\]:*") == []
    assert_miss(req(gw, "/adm/b/1"))

    # Redis gone: the admin answers 503 and says how far it got.
    redis_server.kill()
    try:
        r = admin_post(aport, "/admin/cache/clear")
        assert r.status_code == 503, (r.status_code, r.text)
        assert "error" in r.json()
    finally:
        redis_server.start()


# ---------------------------------------------------------------------------
# Redis failing

class Load:
    """Threads sending GETs as fast as answers come, alternating a hot path and
    new URLs; records (start, end, path kind, status, X-Cache)."""

    def __init__(self, gw, hot_path, prefix, threads=4):
        self.gw, self.hot_path, self.prefix = gw, hot_path, prefix
        self.stop = threading.Event()
        self.results = []
        self.errors = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i):
        n = 0
        with session() as s:
            while not self.stop.is_set():
                n += 1
                hot = n % 2 == 0
                path = self.hot_path if hot else "%s/t%d-%d" % (self.prefix, i, n)
                t = time.monotonic()
                try:
                    r = s.get(self.gw.url(path), timeout=5)
                except requests.RequestException as e:
                    with self.lock:
                        self.errors.append(repr(e))
                    continue
                with self.lock:
                    self.results.append((t, time.monotonic(), "hot" if hot else "new", r.status_code,
                                         r.headers.get("X-Cache")))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(10)


def test_redis_killed_during_load(stack, redis_server):
    gw, up = redis_gateway(stack, redis_server, [cached("ld", prefix="/ld/", cache={"ttl": "60s"})])
    wait_cache_from_redis(gw, redis_server, "/ld/warm")
    hot = "/ld/hot"
    quiet = "/ld/quiet"
    for p in (hot, quiet):
        assert_miss(req(gw, p))
        assert_hit(req(gw, p))
    wait_until(lambda: metric(gw, "gateway_redis_up") == 1, 3, "gateway_redis_up 1 before the kill")

    with Load(gw, hot, "/ld/new") as load:
        time.sleep(0.5)
        redis_server.kill()
        killed = time.monotonic()
        # Probes while it is down.
        time.sleep(0.2)
        probe = req(gw, "/ld/probe-down")
        assert probe.status == 200
        assert_bypass(probe, "store-unavailable")
        assert_hit(req(gw, hot))
        wait_until(lambda: metric(gw, "gateway_redis_up") == 0, 3, "gateway_redis_up 0 with Redis killed")
        time.sleep(max(0.0, 2.0 - (time.monotonic() - killed)))
        restarting = time.monotonic()
        redis_server.start()  # same port, empty
        back = time.monotonic()
        took = wait_cache_from_redis(gw, redis_server, "/ld/back", timeout=4.0)
        wait_until(lambda: metric(gw, "gateway_redis_up") == 1, 2.5, "gateway_redis_up 1 after Redis came back")
        time.sleep(0.2)
    assert took < 2.0, "hits through Redis resumed %.2fs after its return" % took
    assert not load.errors, load.errors[:5]
    codes = sorted({c for _, _, _, c, _ in load.results})
    assert codes == [200], "statuses under load: %s" % codes
    slow = [round(e - s, 3) for s, e, _, _, _ in load.results if e - s > 1.0]
    assert not slow, "answers slower than 1 s: %s" % slow[:10]
    down = [(k, x) for s, e, k, _, x in load.results if s > killed + 0.05 and e < restarting]
    assert len(down) > 20, "too few requests while Redis was down: %d" % len(down)
    assert {x for k, x in down if k == "new"} == {"BYPASS"}, sorted({x for k, x in down if k == "new"})
    assert {x for k, x in down if k == "hot"} == {"HIT"}, sorted({x for k, x in down if k == "hot"})
    assert metric(gw, "redis_memory_used_bytes") > 0
    # Invalidations may have been missed while the subscription was down: the
    # hot tier forgets everything once it is made again. Redis came back empty,
    # so /ld/quiet (in the hot tier only, asked for by nobody since) misses.
    wait_until(lambda: req(gw, quiet).xcache == "MISS", 3, "the hot tier emptied after the resubscription")


def test_redis_paused_bypasses_promptly(stack, redis_server):
    gw, up = redis_gateway(stack, redis_server, [cached("ps", prefix="/ps/", cache={"ttl": "60s"})],
                           timeout="50ms")
    wait_cache_from_redis(gw, redis_server, "/ps/warm")
    errors = metric(gw, "gateway_cache_store_errors_total")
    redis_server.pause(1.0)
    paused = time.monotonic()
    got = []
    lock = threading.Lock()

    def one(i):
        a = req(gw, "/ps/slow-%d" % i, timeout=5)
        with lock:
            got.append(a)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    done = time.monotonic()
    assert done - paused < 0.9, "the requests outlasted the pause (%.2fs): inconclusive" % (done - paused)
    assert len(got) == 8
    for a in got:
        assert a.status == 200, a
        assert_bypass(a, "store-unavailable")
        assert a.elapsed < 0.4, "answered in %.3fs with redis.timeout 50ms" % a.elapsed
    assert metric(gw, "gateway_cache_store_errors_total") > errors
    wait_until(lambda: time.monotonic() - paused > 1.05, 2, "the pause over")
    wait_cache_from_redis(gw, redis_server, "/ps/after", timeout=4.0)


# ---------------------------------------------------------------------------
# Compressed variants through Redis

COMPRESSION = {"algorithms": ["br", "gzip"], "min_bytes": 64, "types": ["application/json"]}


def redis_get_bytes(redis, key):
    """GET key as bytes (redis-cli would mangle a binary value), over RESP."""
    with socket.create_connection((redis.host, redis.port), timeout=5) as s:
        k = key.encode()
        s.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k))
        f = s.makefile("rb")
        head = f.readline()
        assert head.startswith(b"$"), head
        n = int(head[1:])
        return None if n < 0 else f.read(n + 2)[:n]


def entry_variant_lengths(blob):
    """(flags, {variant: body bytes}) from an entry's serialized form
    (cache/entry.h: "GWC1", u16 status, u16 flags, 3 x i64, u32 fields_len,
    u32 identity, gzip, br lengths)."""
    assert blob[:4] == b"GWC1", blob[:16]
    flags = struct.unpack_from("<H", blob, 6)[0]
    identity, gz, br = struct.unpack_from("<III", blob, 36)
    return flags, {"identity": identity, "gzip": gz, "br": br}


# (Accept-Encoding, the Content-Encoding the hit must carry); none of the
# clients with None accepts gzip, and neither do "br" or "gzip;q=0, br".
REDIS_CODINGS = [("br", "br"), ("gzip", "gzip"), ("identity", None), (None, None), ("gzip, br", "br"),
                 ("br;q=0, gzip", "gzip"), ("gzip;q=0, br", "br"), ("gzip;q=0", None), ("deflate", None)]


def test_codings_through_redis_without_hot_tier(stack, redis_server):
    """store: redis, hot_tier: false, compression on. One fetch (by a client
    sending no Accept-Encoding) stores an entry whose value in Redis holds the
    identity body and its br and gzip variants; every later request is a hit
    read from Redis (a GET each) and gets the variant its Accept-Encoding
    chooses: br, gzip, or none for identity / no header / gzip refused. Each
    decodes to the upstream's body, carries Vary: Accept-Encoding, and the
    upstream saw one request. A client that does not accept gzip never gets
    gzip."""
    gw, up = redis_gateway(stack, redis_server, [cached("rz", prefix="/rz/", cache={"ttl": "60s"})],
                           hot_tier=False, compression=COMPRESSION)
    p = respond("/rz/v", size=20000, seed=21)
    want = respond_body(20000, "json", 21)
    a = req(gw, p)
    assert_miss(a)
    assert a.h("Content-Encoding") is None and decoded(a) == want and vary_ae(a), a
    wait_key(redis_server, a.key)
    flags, lens = entry_variant_lengths(redis_get_bytes(redis_server, a.key))
    assert flags & 1, "the entry in Redis lacks its Vary: Accept-Encoding flag"
    assert lens["identity"] == len(want), lens
    assert 0 < lens["br"] < len(want) and 0 < lens["gzip"] < len(want), \
        "the entry in Redis must hold both compressed variants: %s" % lens

    gets = redis_server.command_calls("get")
    hits = 0
    for ae, coding in REDIS_CODINGS * 2:  # twice: over both workers, most likely
        b = req(gw, p, ae=ae)
        hits += 1
        assert b.status == 200, (ae, b)
        assert_hit(b)
        assert b.all("Content-Encoding") == ([coding] if coding else []), (ae, b)
        assert decoded(b) == want, "Accept-Encoding %r: the body does not decode to the upstream's" % ae
        assert vary_ae(b), "Vary: Accept-Encoding on every variant (%r): %r" % (ae, b)
        if coding:
            assert len(b.body) == lens[coding], (ae, len(b.body), lens)  # the stored variant, as stored
        if ae is None or "gzip" not in ae or "gzip;q=0" in ae:
            assert b.h("Content-Encoding") != "gzip", "gzip to a client that does not accept it (%r)" % ae
    assert redis_server.command_calls("get") >= gets + hits, \
        "hits not read from Redis (hot_tier: false): %d GETs for %d hits" % (
            redis_server.command_calls("get") - gets, hits)
    assert up.count(path=path_of(p)) == 1, up.seen(path=path_of(p))

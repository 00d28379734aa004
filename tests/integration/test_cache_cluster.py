"""The response cache shared by several gateway instances through a real Redis.

One redis-server for the file (redis_server.py; a second one with requirepass
for the password test); each test starts its own gateways (server.workers: 2,
store: redis). Checked: coalesce: cluster (identical concurrent misses spread
over two instances make one upstream request; the fill lock is let go) against
coalesce: worker (at most one per worker), lock_timeout (followers on other
workers and instances go to the upstream themselves once it passes, well
before a slow leader is done), an invalidation Redis missed while paused being
done once it is back, a SIGHUP reload changing a route's ttl and the key
prefix (keys, ttl, admin clear, the pub/sub channel), and redis.password (key
and URL) with connections_per_worker.

The upstream's /answer/<name> (upstream.py set_answer) gives a slow answer of
the test's choosing; its arrival times tell when each fetch started.
"""

import copy
import subprocess
import time
import uuid

import pytest

from harness import free_port, fresh, gateway_config, route, upstream_config, wait_until
from redis_server import REDIS_CLI, RedisServer, _ensure_reporter, redis_server  # noqa: F401 - the fixture
from test_cache import (ADMIN_TOKEN, admin_post, assert_bypass, assert_hit, assert_miss, cached, concurrently, cs_ttl,
                        req)
from test_cache_redis import exists, metric, wait_cache_from_redis, wait_key


def cluster_config(up, redis, routes, cache=None, admin_port=None, redis_extra=None, timeout="200ms"):
    c = {"store": "redis"}
    c.update(cache or {})
    sections = {}
    if admin_port:
        sections["admin"] = {"listen": "127.0.0.1:%d" % admin_port, "token": ADMIN_TOKEN}
    return gateway_config({"up": upstream_config([up], timeout="5s", keepalive=16)}, routes=routes,
                          server={"workers": 2, "request_timeout": "10s"}, cache=c,
                          redis=redis.redis_section(timeout=timeout, **(redis_extra or {})), **sections)


def start(stack, cfg, name, redis, warm_prefix, admin_port=None):
    gw = stack.gateway(cfg, name=name)
    if admin_port:
        wait_until(lambda: fresh("GET", "http://127.0.0.1:%d/metrics" % admin_port, timeout=2).status_code == 200,
                   5, "the admin listener answering")
    if warm_prefix:
        wait_cache_from_redis(gw, redis, warm_prefix, probes=4)
    return gw


def two_instances(stack, redis, cache, prefix="/cl/"):
    redis.flushall()
    up = stack.upstream("up")
    routes = [cached("cl", prefix=prefix, cache={"ttl": "60s"})]
    gws = [start(stack, cluster_config(up, redis, routes, cache=cache), name, redis, prefix + "warm")
           for name in ("gw-a", "gw-b")]
    return gws, up


def spread(gws, path, n):
    """n identical requests released together, alternating between the
    instances, each on a connection of its own (so over their workers)."""
    return concurrently(lambda i: req(gws[i % len(gws)], path, timeout=15), n)


# ---------------------------------------------------------------------------
# Coalescing

def test_coalesce_cluster_one_fetch(stack, redis_server):
    gws, up = two_instances(stack, redis_server, {"coalesce": "cluster"})
    body = b'{"v": "cluster-%s"}' % uuid.uuid4().hex.encode()
    up.set_answer("slow", body=body, delay=0.7)
    p = "/cl/answer/slow"
    got = spread(gws, p, 10)
    assert [a.status for a in got] == [200] * 10, got
    n = up.count(path=p)
    assert n == 1, "%d upstream requests for 10 identical concurrent misses over two instances " \
                   "with coalesce: cluster" % n
    assert {a.body for a in got} == {body}
    xc = sorted(a.xcache for a in got)
    assert xc == ["HIT"] * 9 + ["MISS"], xc
    assert {a.key for a in got} == {"cache:GET:/cl/answer/slow"}
    assert exists(redis_server, "cache:GET:/cl/answer/slow")
    assert not exists(redis_server, "cache:GET:/cl/answer/slow:lock"), \
        "the fill lock was not let go after the entry was stored"
    assert all(a.elapsed < 3.0 for a in got), [round(a.elapsed, 2) for a in got]
    # Stored once, shared: both instances hit from now on.
    for gw in gws:
        assert_hit(req(gw, p), body=body)
    assert up.count(path=p) == 1


def test_coalesce_worker_one_fetch_per_worker(stack, redis_server):
    gws, up = two_instances(stack, redis_server, {"coalesce": "worker"})
    body = b'{"v": "worker-%s"}' % uuid.uuid4().hex.encode()
    up.set_answer("slow-w", body=body, delay=0.7)
    p = "/cl/answer/slow-w"
    got = spread(gws, p, 10)
    assert [a.status for a in got] == [200] * 10, got
    assert {a.body for a in got} == {body}
    n = up.count(path=p)
    assert 1 <= n <= 4, "%d upstream requests: coalesce: worker allows one per worker (2 instances x 2)" % n
    assert sum(a.xcache == "MISS" for a in got) == n, [a.xcache for a in got]


def test_lock_timeout_followers_fetch_themselves(stack, redis_server):
    """lock_timeout 500ms, an upstream answer taking 2.5 s: the requests that
    did not get the lock (other workers, the other instance) and those waiting
    on a worker's flight go to the upstream after ~0.5 s, not after the
    leader's 2.5 s."""
    gws, up = two_instances(stack, redis_server, {"coalesce": "cluster", "lock_timeout": "500ms"})
    body = b'{"v": "slow-%s"}' % uuid.uuid4().hex.encode()
    up.set_answer("slower", body=body, delay=2.5)
    p = "/cl/answer/slower"
    t0 = time.monotonic()
    got = spread(gws, p, 6)
    took = time.monotonic() - t0
    assert [a.status for a in got] == [200] * 6, got
    assert {a.body for a in got} == {body}
    seen = up.seen(path=p)
    assert len(seen) > 1, "one upstream request: the followers waited past lock_timeout for the leader"
    arrivals = sorted(r.time for r in seen)
    late = [round(t - arrivals[0], 2) for t in arrivals[1:]]
    assert 0.35 <= late[0] <= 1.5, "the first follower's own fetch started %.2fs after the leader's " \
                                   "(lock_timeout 500ms, the leader takes 2.5s): %s" % (late[0], late)
    assert took < 5.0, "answers took %.2fs: 2.5s fetches that started by ~0.5s" % took


def test_coalesce_cluster_not_stored_releases_waiters(stack, redis_server):
    """The leader's answer may not be stored (Set-Cookie): it lets go of the
    fill lock (worker.c cache_request_end: "fetched, not stored: let the others
    go on"), so the requests polling Redis for its entry on the other workers
    and instance must go to the upstream then, not sit out lock_timeout (3s
    here) for an entry that will never come."""
    gws, up = two_instances(stack, redis_server, {"coalesce": "cluster", "lock_timeout": "3s"})
    up.set_answer("nostore", body=b'{"v": 1}', headers=[("Set-Cookie", "sid=secret")], delay=0.5)
    p = "/cl/answer/nostore"
    t0 = time.monotonic()
    got = spread(gws, p, 6)
    took = time.monotonic() - t0
    assert [a.status for a in got] == [200] * 6, got
    for a in got:
        assert_miss(a, stored=False)
    assert up.count(path=p) == 6
    assert not exists(redis_server, "cache:GET:/cl/answer/nostore")
    assert not exists(redis_server, "cache:GET:/cl/answer/nostore:lock")
    slow = sorted(round(a.elapsed, 2) for a in got if a.elapsed > 2.0)
    assert not slow, "answers waited for lock_timeout (3s) after the leader gave up the lock at ~0.5s: %s " \
                     "(all: %s, %.2fs in all)" % (slow, sorted(round(a.elapsed, 2) for a in got), took)


# ---------------------------------------------------------------------------
# Invalidation Redis missed

def test_invalidation_retried_after_redis_pause(stack, redis_server):
    up = stack.upstream("up")
    routes = [cached("iv", prefix="/iv/", methods=["GET"], cache={"ttl": "60s"}),
              dict(route("iv-write", "up", prefix="/iv/", methods=["POST"]), invalidate=["cache:GET:/iv/*"])]
    gw = start(stack, cluster_config(up, redis_server, routes, cache={"hot_tier": False}), "gw-iv", redis_server,
               "/iv/warm")
    p = "/iv/x"
    a = req(gw, p)
    assert_miss(a)
    wait_key(redis_server, a.key)
    assert_hit(req(gw, p), body=a.body)

    pause = 1.5
    redis_server.pause(pause)
    paused = time.monotonic()
    w = req(gw, "/iv/write", method="POST", body=b"{}", timeout=5)
    done = time.monotonic()
    assert w.status == 200, w
    assert w.elapsed < 1.0, "the write waited %.2fs for a paused Redis (redis.timeout 200ms)" % w.elapsed
    assert done - paused < pause - 0.1, "the write came back after the pause ended (%.2fs): inconclusive" % (
        done - paused)

    # Redis back: the gateway does the invalidation it could not do then.
    wait_until(lambda: time.monotonic() - paused > pause, pause + 1, "the pause over")
    try:
        wait_until(lambda: not exists(redis_server, a.key), 4.0,
                   "the entry from before the write deleted once Redis answers again")
    except AssertionError as e:
        raise AssertionError("%s\n%s" % (e, "\n".join(gw.stderr().splitlines()[-15:])))
    assert redis_server.keys("cache:GET:/iv/*") == [], "entries from before the write still in Redis"
    b = wait_until(lambda: (lambda x: x if x.xcache != "BYPASS" else None)(req(gw, p)), 3.0,
                   "a cache lookup through Redis again")
    assert_miss(b)
    assert b.body != a.body
    assert up.count(path=p, method="GET") == 2


def test_entry_from_before_a_missed_invalidation_not_served(stack, redis_server):
    """Right after Redis comes back, before any retry of the write's
    invalidation can have run, the entry from before the write is still in
    Redis: the gateway must not serve it (it knows that invalidation is pending)."""
    up = stack.upstream("up")
    routes = [cached("pv", prefix="/pv/", methods=["GET"], cache={"ttl": "60s"}),
              dict(route("pv-write", "up", prefix="/pv/", methods=["POST"]), invalidate=["cache:GET:/pv/*"])]
    gw = start(stack, cluster_config(up, redis_server, routes, cache={"hot_tier": False}), "gw-pv", redis_server,
               "/pv/warm")
    p = "/pv/x"
    a = req(gw, p)
    assert_miss(a)
    wait_key(redis_server, a.key)
    pause = 1.5
    redis_server.pause(pause)
    paused = time.monotonic()
    w = req(gw, "/pv/write", method="POST", body=b"{}", timeout=5)
    assert w.status == 200 and w.elapsed < 1.0, w
    wait_until(lambda: time.monotonic() - paused > pause + 0.05, pause + 1, "the pause over")
    seen = []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        b = req(gw, p)
        seen.append((b.xcache, exists(redis_server, a.key)))
        assert not (b.xcache == "HIT" and b.body == a.body), \
            "served the entry from before the write (entry still in Redis: %s); seen %s" % (seen[-1][1], seen)
        time.sleep(0.05)


def test_repeated_key_header_bypasses(stack, redis_server):
    """A header the key names, sent twice: the upstream sees both lines, a key
    only one, so the request bypasses the cache instead of storing under
    another client's key."""
    up = stack.upstream("up")
    routes = [cached("rh", prefix="/rh/", methods=["GET"], cache={"ttl": "60s", "key": "rh:{header.X-Tenant}:{path}"})]
    gw = start(stack, cluster_config(up, redis_server, routes), "gw-rh", redis_server, "/rh/warm")
    two = req(gw, "/rh/echo", headers=[("X-Tenant", "victim"), ("X-Tenant", "attacker")])
    assert_bypass(two, "key")
    v = req(gw, "/rh/echo", headers={"X-Tenant": "victim"})
    assert_miss(v)
    assert up.count(path="/rh/echo") == 2


# ---------------------------------------------------------------------------
# Reload

def test_reload_changes_ttl_and_key_prefix(stack, redis_server):
    redis_server.flushall()
    up = stack.upstream("up")
    aport = free_port()
    routes = [cached("rl", prefix="/rl/", cache={"ttl": "60s"})]
    cfg = cluster_config(up, redis_server, routes, cache={"key_prefix": "v1:"}, admin_port=aport)
    gw = start(stack, cfg, "gw-rl", redis_server, "/rl/warm", admin_port=aport)
    b_cfg = copy.deepcopy(cfg)
    del b_cfg["admin"]
    b_gw = start(stack, b_cfg, "gw-rl-b", redis_server, None)
    a = req(gw, "/rl/a")
    assert_miss(a)
    assert a.key == "v1:GET:/rl/a"
    wait_key(redis_server, "v1:GET:/rl/a")
    assert 58000 <= int(redis_server.cli("pttl", "v1:GET:/rl/a").strip()) <= 60000
    assert cs_ttl(req(gw, "/rl/a")) > 50

    new = copy.deepcopy(cfg)
    new["cache"]["key_prefix"] = "v2:"
    new["routes"][0]["cache"]["ttl"] = "7s"
    b_new = copy.deepcopy(new)
    del b_new["admin"]
    for g, c in ((gw, new), (b_gw, b_new)):
        g.write_config(c)
        g.reload("success")

    b = req(gw, "/rl/a")
    assert b.status == 200
    assert_miss(b)
    assert b.key == "v2:GET:/rl/a", b.key
    wait_key(redis_server, "v2:GET:/rl/a")
    pttl = int(redis_server.cli("pttl", "v2:GET:/rl/a").strip())
    assert 5000 < pttl <= 7000, "PTTL %d of an entry stored with the new ttl 7s" % pttl
    c = req(gw, "/rl/a")
    assert_hit(c, body=b.body)
    assert c.key == "v2:GET:/rl/a" and 5 <= cs_ttl(c) <= 7, c
    d = req(gw, "/rl/b")
    assert_miss(d)
    assert d.key == "v2:GET:/rl/b"
    wait_key(redis_server, d.key)
    assert_hit(req(b_gw, "/rl/b"), body=d.body)  # B reads the new prefix too (now in its hot tier)
    assert exists(redis_server, "v1:GET:/rl/a"), "the old prefix's entry is no business of the new config"

    v2 = sorted(redis_server.keys("v2:*"))
    assert "v2:GET:/rl/a" in v2 and "v2:GET:/rl/b" in v2, v2
    v1 = sorted(redis_server.keys("v1:*"))
    r = admin_post(aport, "/admin/cache/clear")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["pattern"] == "v2:*" and doc["deleted"] == len(v2), (doc, v2)
    assert redis_server.keys("v2:*") == []
    assert sorted(redis_server.keys("v1:*")) == v1, "admin clear after the reload deleted under the old prefix"
    e = req(gw, "/rl/a")
    assert_miss(e)
    assert e.key == "v2:GET:/rl/a"
    # B heard the clear on the new prefix's channel: its hot tier forgets /rl/b.
    wait_until(lambda: req(b_gw, "/rl/b").xcache == "MISS", 1.5,
               "instance B dropping v2:GET:/rl/b from its hot tier after the clear on A (pub/sub on "
               "v2:invalidate after the reload)")
    assert up.count(path="/rl/a") == 3


# ---------------------------------------------------------------------------
# Password and connections per worker

@pytest.fixture(scope="module")
def redis_pw(request):
    _ensure_reporter(request.config)
    r = RedisServer(name="test_cache_cluster_pw", password="pw-S3cret-%s" % uuid.uuid4().hex[:8])
    request.addfinalizer(r.close)
    r.start()
    return r


def gateway_clients(redis):
    """Client connections Redis has other than redis-cli's own."""
    return [line for line in redis.cli("client", "list").splitlines() if line and "cmd=client" not in line]


def test_password_and_connections_per_worker(stack, redis_pw):
    # The server does want the password.
    res = subprocess.run([REDIS_CLI, "-h", redis_pw.host, "-p", str(redis_pw.port), "get", "x"],
                         capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    assert "NOAUTH" in res.stdout + res.stderr, (res.stdout, res.stderr)

    up = stack.upstream("up")
    routes = [cached("pw", prefix="/pw/", cache={"ttl": "60s"})]
    cfg = cluster_config(up, redis_pw, routes, cache={"hot_tier": False}, redis_extra={"connections_per_worker": 3})
    assert cfg["redis"]["password"] == redis_pw.password
    gw = start(stack, cfg, "gw-pw", redis_pw, "/pw/warm")
    a = req(gw, "/pw/x")
    assert_miss(a)
    wait_key(redis_pw, a.key)
    assert redis_pw.cli("getrange", a.key, 0, 3).strip() == "GWC1"
    gets = redis_pw.command_calls("get")
    for _ in range(6):
        assert_hit(req(gw, "/pw/x"), body=a.body)
    assert redis_pw.command_calls("get") >= gets + 6, "hits not from Redis (hot_tier: false)"
    clients = gateway_clients(redis_pw)
    assert len(clients) >= 2 * 3, "2 workers x connections_per_worker 3, found %d:\n%s" % (
        len(clients), "\n".join(clients))
    assert up.count(path="/pw/x") == 1
    assert metric(gw, "gateway_cache_store_errors_total") == 0

    # The password in the URL instead.
    url_cfg = copy.deepcopy(cfg)
    del url_cfg["redis"]["password"]
    url_cfg["redis"]["url"] = redis_pw.url(with_password=True)
    gw2 = start(stack, url_cfg, "gw-pw-url", redis_pw, None)
    wait_until(lambda: req(gw2, "/pw/x").xcache == "HIT", 3, "a hit through Redis with the URL's password")

    # A wrong password: no Redis, so no cache (bypass), but answers all the same.
    bad = copy.deepcopy(cfg)
    bad["redis"]["password"] = "wrong-password"
    gw3 = start(stack, bad, "gw-pw-bad", redis_pw, None)
    for _ in range(2):
        x = req(gw3, "/pw/x")
        assert x.status == 200
        assert_bypass(x, "store-unavailable")
    wait_until(lambda: metric(gw3, "gateway_redis_up") == 0 or None, 3, "gateway_redis_up 0 with a wrong password")
    assert metric(gw3, "gateway_redis_up") == 0

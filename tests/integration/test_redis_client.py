"""The gateway's Redis client (redis/redis.c) as the rate limiter uses it, against a
real redis-server: redis.connections_per_worker connections per worker, commands
round-robin over them, a URL with a user, a password and a database, every
connection made again after Redis drops them all, a paused Redis (CLIENT PAUSE)
met with a backoff instead of a reconnect per redis.timeout, and the cache's
invalidation subscriber checking its connection without making it again.

Checked on Redis's side (CLIENT LIST: the gateway's connections and the last
command each ran; keys per database) and on the user's (exact counts, no
fallback to on_store_error).
"""

import time

from harness import fresh, gateway_config, route, session, upstream_config, wait_until
from redis_server import RedisServer, redis_server  # noqa: F401 - the fixture
from test_ratelimit_redis import fallbacks, race, wait_redis_decides


def limited(name, prefix, policies):
    r = route(name, "up", prefix=prefix)
    r["ratelimit"] = list(policies)
    return r


def limiter_clients(red):
    """CLIENT LIST entries (dicts) of the connections whose last command was the
    limiter's script: the rate limiter's, not the response cache's (which shares
    the Redis and never runs EVAL)."""
    out = []
    for line in red.cli("client", "list").splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if fields.get("cmd") in ("evalsha", "eval"):
            out.append(fields)
    return out


def start(stack, red, policies, routes, redis_section, workers=2):
    up = stack.upstream("up")
    cfg = gateway_config({"up": upstream_config([up], keepalive=16)}, routes=routes, server={"workers": workers},
                         ratelimit={"store": "redis", "on_store_error": "deny", "policies": policies},
                         redis=redis_section)
    return stack.gateway(cfg), up


def test_connections_per_worker_round_robin_exact(stack, redis_server):
    """2 workers x 3 connections; 300 racing requests for 100 per 5 min give
    exactly 100, and all 6 connections (no more) carried decisions."""
    pol = {"rc_rr": {"limit": 100, "window": "5m", "key": "route"}}
    gw, up = start(stack, redis_server, pol, [limited("rr", "/rr/", ["rc_rr"])],
                   redis_server.redis_section(connections_per_worker=3))
    wait_redis_decides(gw, "/rr/echo")
    redis_server.cli("del", *redis_server.keys("rl:*"))
    statuses = race([gw.url("/rr/echo")], 300, 20)
    assert statuses.count(200) == 100, sorted(set(statuses))
    assert statuses.count(429) == 200
    assert fallbacks(gw) == 0
    clients = limiter_clients(redis_server)
    assert len(clients) == 6, clients


def test_url_user_password_and_db(stack, tmp_path):
    """redis://default:PW@host:port/5: AUTH with the ACL user, SELECT 5; the keys
    land in database 5 and nowhere else; the password is never logged."""
    red = RedisServer(name="redis-url", scratch=tmp_path / "redis", password="url-pw-4711")
    try:
        red.start()
        pol = {"rc_db": {"limit": 2, "window": "5m", "key": "client_ip"}}
        url = "redis://default:url-pw-4711@%s:%d/5" % (red.host, red.port)
        gw, _ = start(stack, red, pol, [limited("db", "/db/", ["rc_db"])], {"url": url, "timeout": "200ms"})
        got = [fresh("GET", gw.url("/db/echo")).status_code for _ in range(4)]
        assert got == [200, 200, 429, 429], got
        assert fallbacks(gw) == 0
        in5 = [k for k in red.cli("-n", "5", "--scan", "--pattern", "rl:*").splitlines() if k]
        assert len(in5) == 1, in5
        assert red.keys("rl:*") == [], "a key in database 0"
        clients = limiter_clients(red)
        assert clients and all(c.get("db") == "5" and c.get("user") == "default" for c in clients), clients
        assert "url-pw-4711" not in gw.stderr()
    finally:
        red.close()


def test_every_connection_made_again(stack, redis_server):
    """CLIENT KILL of every connection: Redis decides again well within 2 s
    (capped backoff) and all 6 limiter connections are new ones."""
    pol = {"rc_back": {"limit": 100000, "window": "5m", "key": "header:X-API-Key"}}
    gw, _ = start(stack, redis_server, pol, [limited("bk", "/bk/", ["rc_back"])],
                  redis_server.redis_section(connections_per_worker=3))
    wait_redis_decides(gw, "/bk/echo")
    race([gw.url("/bk/echo")], 100, 10, headers={"X-API-Key": "bulk"})
    before = {c["id"] for c in limiter_clients(redis_server)}
    assert len(before) == 6, before
    redis_server.cli("client", "kill", "type", "normal", "skipme", "yes")
    assert limiter_clients(redis_server) == []
    took = wait_redis_decides(gw, "/bk/echo")
    assert took < 2.0, took
    race([gw.url("/bk/echo")], 100, 10, headers={"X-API-Key": "bulk"})
    after = {c["id"] for c in limiter_clients(redis_server)}
    assert len(after) == 6 and not (after & before), (before, after)
    assert "connection lost" in gw.stderr()


def test_paused_redis_backs_off(stack, redis_server):
    """CLIENT PAUSE 2 s, redis.timeout 200ms, 1 worker x 1 connection: the first
    request waits out the timeout, then the connection is remade with a growing
    backoff and is not up until Redis answers its PING, so the requests behind
    are decided at once by on_store_error (not one in four waiting 200 ms, as
    with a reconnect per timeout), with one warning, not one per retry."""
    pol = {"rc_pause": {"limit": 100000, "window": "5m", "key": "header:X-API-Key"}}
    gw, _ = start(stack, redis_server, pol, [limited("pz", "/pz/", ["rc_pause"])],
                  redis_server.redis_section(timeout="200ms"), workers=1)
    wait_redis_decides(gw, "/pz/echo", probes=3)
    warned = gw.stderr().count("no answer within")
    redis_server.pause(2.0)
    paused_at = time.monotonic()
    took = []
    with session() as s:
        while time.monotonic() - paused_at < 1.6:
            t = time.monotonic()
            r = s.get(gw.url("/pz/echo"), headers={"X-API-Key": "pz"}, timeout=5)
            took.append(time.monotonic() - t)
            assert r.status_code == 429, r.status_code  # on_store_error: deny
    assert time.monotonic() - paused_at < 1.9, "the paused phase outlasted the pause: results not conclusive"
    slow = [round(d, 3) for d in took if d > 0.15]
    assert len(slow) <= 2, "requests that waited for Redis: %s of %d" % (slow, len(took))
    assert len(took) >= 20, len(took)
    # The limiter's connection and the main thread's (INFO every second) may each warn once.
    assert gw.stderr().count("no answer within") - warned <= 2, gw.stderr()[-3000:]

    wait_until(lambda: time.monotonic() - paused_at > 2.05, 3, "pause over")
    took = wait_redis_decides(gw, "/pz/echo", probes=3)
    assert took < 2.0, took  # the backoff is capped at 1 s


def subscribers(red):
    out = []
    for line in red.cli("client", "list").splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if int(fields.get("sub", "0")) > 0:
            out.append(fields)
    return out


def test_subscriber_checks_and_keeps_its_connection(stack, redis_server):
    """The cache's invalidation subscriber (store redis, hot tier) checks its
    connection every 2 s: Redis answers each check (the same connection stays,
    subscribed to one channel) and nothing is logged."""
    up = stack.upstream("up")
    r = route("c", "up", prefix="/c/")
    r["cache"] = {"ttl": "10s"}
    cfg = gateway_config({"up": upstream_config([up])}, routes=[r], server={"workers": 1},
                         cache={"store": "redis", "hot_tier": True}, redis=redis_server.redis_section())
    gw = stack.gateway(cfg)
    wait_until(lambda: len(subscribers(redis_server)) == 1, 5, "the subscriber connected")
    first = subscribers(redis_server)[0]
    calls = redis_server.command_calls("subscribe")
    time.sleep(4.5)
    now = subscribers(redis_server)
    assert len(now) == 1 and now[0]["id"] == first["id"], (first, now)
    assert now[0]["sub"] == "1", now
    assert redis_server.command_calls("subscribe") >= calls + 2, "no checks in 4.5 s"
    assert "no answer within" not in gw.stderr()
    assert fresh("GET", gw.url("/c/echo")).status_code == 200

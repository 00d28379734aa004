"""When an upstream fails: 502 at once for a refused connection, 504 at the
deadline for a slow one, passive health (ejection after max_fails, return after
fail_timeout, gateway_upstream_target_up), retry of idempotent requests on another
target and no retry of POST/PATCH, and no wrong answer after a failure (a late
answer or a closed pooled connection must never reach the next client)."""

import threading
import time

from harness import fresh, gateway_config, session, tcp_sockets, upstream_config, wait_until


def assert_error(r, status):
    assert r.status_code == status, "expected %d, got %d: %r" % (status, r.status_code, r.text[:300])
    assert r.headers.get("Content-Type", "").startswith("application/json"), r.headers
    doc = r.json()
    assert doc.get("status") == status and doc.get("error"), doc
    assert doc.get("request_id") == r.headers.get("X-Request-Id"), (doc, dict(r.headers))


def timed(method, url, **kw):
    t0 = time.monotonic()
    r = fresh(method, url, **kw)
    return r, time.monotonic() - t0


def target_up(gw, upstream, target):
    return gw.metrics().get("gateway_upstream_target_up", upstream=upstream, target=target)


def test_refused_target_502_fast(stack):
    dead = stack.dead_port()
    gw = stack.gateway(gateway_config({"up": [dead]}))
    for i, method in enumerate(["GET", "POST", "GET", "PUT", "GET"]):
        r, dt = timed(method, gw.url("/refused/%d" % i), data=b"x" if method != "GET" else None)
        assert_error(r, 502)
        assert dt < 0.75, "%s to a refusing target took %.2fs; expected a 502 at once" % (method, dt)


def test_all_targets_refused_502(stack):
    d1, d2 = stack.dead_port(), stack.dead_port()
    gw = stack.gateway(gateway_config({"up": [d1, d2]}))
    for i in range(4):
        r, dt = timed("GET", gw.url("/both-dead/%d" % i))
        assert_error(r, 502)
        assert dt < 0.75, "took %.2fs" % dt


def test_slow_target_504_at_upstream_timeout(stack):
    up = stack.upstream()
    gw = stack.gateway(gateway_config({"up": upstream_config([up], timeout="1s")},
                                      server={"request_timeout": "5s"}))
    r, dt = timed("GET", gw.url("/slow/delay/3000"))
    assert_error(r, 504)
    # 0.95: a timer may fire a hair early on a coarse clock; what matters is "at the deadline".
    assert 0.95 <= dt <= 2.0, "504 after %.2fs; upstream timeout is 1s" % dt
    assert up.count(path="/slow/delay/3000") == 1, "a timed-out request was sent %d times" % up.count(
        path="/slow/delay/3000")
    check_no_stale_answers(gw, up)


def test_slow_target_504_at_request_timeout(stack):
    up = stack.upstream()
    gw = stack.gateway(gateway_config({"up": upstream_config([up], timeout="5s")},
                                      server={"request_timeout": "1s"}))
    r, dt = timed("POST", gw.url("/slow/delay/3000"), data=b"payload")
    assert_error(r, 504)
    assert 0.95 <= dt <= 2.0, "504 after %.2fs; server.request_timeout is 1s" % dt
    check_no_stale_answers(gw, up)


def check_no_stale_answers(gw, up):
    """The late answer of a timed-out request must never be given to a later request."""
    def burst(tag):
        for i in range(10):
            r = fresh("GET", gw.url("/after/echo?n=%s-%d" % (tag, i)))
            assert r.status_code == 200, r.text[:200]
            assert r.json()["query"] == "n=%s-%d" % (tag, i), "got someone else's answer: %r" % r.text[:200]
    burst("early")
    wait_until(lambda: up.in_flight == 0, 5, "the slow upstream request to finish")
    burst("late")


def test_ejection_and_return(stack):
    """Two targets, one refusing. GETs never fail (retried on the live one); after
    max_fails the dead one is ejected (target_up 0) and even POSTs, which are not
    retried, all succeed; after fail_timeout it is tried again, and once it is back
    it gets traffic and target_up is 1."""
    live = stack.upstream("live")
    dead = stack.dead_port()
    dead_addr = dead.address
    # One worker: whether health state is shared between workers is not what this test is about.
    cfg = gateway_config({"up": upstream_config([dead_addr, live], max_fails=2, fail_timeout="3s", retries=1)},
                         server={"workers": 1})
    gw = stack.gateway(cfg)
    m = gw.metrics()
    assert m.get("gateway_upstream_target_up", upstream="up", target=live.address) == 1, m.text
    assert m.get("gateway_upstream_target_up", upstream="up", target=dead_addr) == 1, \
        "targets start up; got %r" % m.get("gateway_upstream_target_up", upstream="up", target=dead_addr)

    sent = [0]

    def get_until_ejected():
        r = fresh("GET", gw.url("/eject/get"))
        sent[0] += 1
        assert r.status_code == 200, "GET #%d failed with %d though a live target exists: %r" % (
            sent[0], r.status_code, r.text[:200])
        return target_up(gw, "up", dead_addr) == 0
    wait_until(get_until_ejected, 10, "dead target ejected (target_up 0) after GETs")
    t_ejected = time.monotonic()
    assert live.count(path="/eject/get") == sent[0], "each GET should reach the live target exactly once"

    for i in range(10):
        r = fresh("POST", gw.url("/eject/post"), data=b"%d" % i)
        assert r.status_code == 200, "POST #%d got %d while the dead target is ejected" % (i, r.status_code)
    assert live.count(path="/eject/post", method="POST") == 10
    assert time.monotonic() - t_ejected < 3.0, "too slow to observe the ejection window; test inconclusive"

    # Bring the dead target back on its port.
    dead.close()
    revived = stack.upstream("revived", port=int(dead_addr.rsplit(":", 1)[1]))

    def until_revived_used():
        r = fresh("GET", gw.url("/eject/back"))
        assert r.status_code == 200, "GET failed with %d while waiting for the target's return" % r.status_code
        return revived.count() > 0
    wait_until(until_revived_used, 3 + 5, "the returned target to get traffic after fail_timeout", interval=0.05)
    waited = time.monotonic() - t_ejected
    assert waited >= 1.5, "the ejected target was tried again after %.2fs; fail_timeout is 3s" % waited
    wait_until(lambda: target_up(gw, "up", dead_addr) == 1, 5, "target_up back to 1")
    before = revived.count()
    for i in range(10):
        assert fresh("GET", gw.url("/eject/rr")).status_code == 200
    assert revived.count() > before and live.count(path="/eject/rr") > 0, "round robin over both targets again"


def test_idempotent_retried_post_patch_not(stack):
    live = stack.upstream("live")
    dead = stack.dead_port()
    cfg = gateway_config({"up": upstream_config([dead, live], max_fails=50, fail_timeout="10s", retries=1)})
    gw = stack.gateway(cfg)

    for method in ("GET", "PUT", "DELETE", "OPTIONS", "HEAD"):
        path = "/retry/%s" % method.lower()
        for i in range(6):
            r = fresh(method, gw.url(path), data=b"body" if method in ("PUT", "DELETE") else None)
            assert r.status_code == 200, "%s #%d got %d: a failed connect must be retried on the live target" % (
                method, i, r.status_code)
        assert live.count(path=path, method=method) == 6, "%s reached the live target %d times for 6 requests" % (
            method, live.count(path=path, method=method))

    for method in ("POST", "PATCH"):
        path = "/retry/%s" % method.lower()
        codes = [fresh(method, gw.url(path), data=b"once").status_code for _ in range(10)]
        ok, bad = codes.count(200), codes.count(502)
        assert ok + bad == 10, "unexpected statuses: %s" % codes
        assert bad >= 1, "no %s went to the dead target; the test cannot tell whether it is retried" % method
        assert live.count(path=path, method=method) == ok, \
            "%s must not be retried: live target saw %d, clients got %d answers" % (
                method, live.count(path=path, method=method), ok)


def test_upstream_closing_connections(stack):
    """An upstream that answers with Connection: close: the gateway must not reuse that connection."""
    up = stack.upstream()
    gw = stack.gateway(gateway_config({"up": [up]}))
    with session() as s:
        for i in range(15):
            r = s.get(gw.url("/c/close?i=%d" % i))
            assert r.status_code == 200 and r.json()["query"] == "i=%d" % i
            r = s.get(gw.url("/c/echo?j=%d" % i))
            assert r.status_code == 200 and r.json()["query"] == "j=%d" % i, r.text[:200]
    assert up.count(prefix="/c/") == 30


def test_upstream_reset_gives_502(stack):
    up = stack.upstream()
    gw = stack.gateway(gateway_config({"up": [up]}))
    r = fresh("POST", gw.url("/r/reset"), data=b"x")
    assert_error(r, 502)
    r = fresh("GET", gw.url("/r/echo"))
    assert r.status_code == 200


def test_idle_pooled_connections_closed_by_upstream(stack):
    """The upstream closes idle keep-alive connections after 0.3 s. Once the gateway
    has seen those closes, requests (POST too) must not fail on a dead pooled connection."""
    up = stack.upstream(idle_timeout=0.3)
    gw = stack.gateway(gateway_config({"up": [up]}))
    for round_ in range(3):
        for i in range(4):
            assert fresh("GET", gw.url("/idle/echo")).status_code == 200
        wait_until(lambda: up.connections > 0 and up.open_connections == 0, 5, "upstream closed its idle connections")

        def gateway_closed_its_side():
            return not [s for s in tcp_sockets(remote_port=up.port) if s[2] == "CLOSE_WAIT"]
        wait_until(gateway_closed_its_side, 5, "the gateway to close upstream connections the upstream closed "
                                               "(sockets left in CLOSE_WAIT)")
        r = fresh("POST", gw.url("/idle/echo?round=%d" % round_), data=b"after idle")
        assert r.status_code == 200, "POST after the upstream closed idle connections: %d %r" % (
            r.status_code, r.text[:200])
        r = fresh("GET", gw.url("/idle/echo"))
        assert r.status_code == 200


def test_concurrent_requests_to_slow_and_fast(stack):
    """Slow requests do not hold up fast ones on the same workers."""
    up = stack.upstream()
    gw = stack.gateway(gateway_config({"up": upstream_config([up], timeout="3s")}, server={"request_timeout": "5s"}))
    results = []

    def slow():
        results.append(fresh("GET", gw.url("/mix/delay/1500")).status_code)
    threads = [threading.Thread(target=slow) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        assert up.wait_in_flight(6, 5), "the slow requests did not all reach the upstream"
        t0 = time.monotonic()
        for i in range(10):
            r = fresh("GET", gw.url("/mix/echo?i=%d" % i))
            assert r.status_code == 200 and r.json()["query"] == "i=%d" % i
        fast = time.monotonic() - t0
    finally:
        for t in threads:
            t.join(10)
    assert fast < 1.0, "10 fast requests took %.2fs while slow ones were in flight" % fast
    assert results == [200] * 6, results

"""SIGTERM/SIGINT: stop accepting, finish every in-flight request, exit 0 within
server.drain_timeout; idle keep-alive connections do not hold the exit up; requests
that outlive drain_timeout do not keep the process alive."""

import signal
import threading
import time

from harness import fresh, gateway_config, raw_connect, read_response, upstream_config, wait_until

DRAIN = 5.0


def run_clients(gw, n, path):
    results = [None] * n

    def client(i):
        try:
            r = fresh("GET", gw.url("%s?i=%d" % (path, i)), timeout=15)
            results[i] = (r.status_code, r.json().get("query") if r.status_code == 200 else r.text[:100])
        except Exception as e:  # noqa: BLE001
            results[i] = (None, repr(e))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def refused(port):
    try:
        s = raw_connect(port, timeout=1)
    except ConnectionRefusedError:
        return True
    s.close()
    return False


def test_sigterm_finishes_in_flight(stack):
    up = stack.upstream()
    gw = stack.gateway(gateway_config({"up": upstream_config([up], timeout="5s")},
                                      server={"drain_timeout": "5s", "request_timeout": "5s"}))
    threads, results = run_clients(gw, 20, "/drain/delay/1500")
    try:
        assert up.wait_in_flight(20, 10), "only %d of 20 requests reached the upstream" % up.in_flight
        t0 = time.monotonic()
        gw.send_signal(signal.SIGTERM)
        wait_until(lambda: refused(gw.port), 1.0, "new connections refused after SIGTERM (listener closed)")
        assert up.in_flight == 20, "in-flight requests were cut short"
        rc = gw.wait_exit(DRAIN + 2)
        elapsed = time.monotonic() - t0
    finally:
        for t in threads:
            t.join(15)
    assert results == [(200, "i=%d" % i) for i in range(20)], "in-flight requests lost: %s" % [
        r for r in results if r is None or r[0] != 200][:5]
    assert rc is not None, "still running %.1fs after SIGTERM (drain_timeout %.0fs)" % (elapsed, DRAIN)
    assert rc == 0, "exit code %s after SIGTERM\n%s" % (rc, gw.logs())
    assert elapsed <= DRAIN + 1, "exit took %.1fs, drain_timeout is %.0fs" % (elapsed, DRAIN)
    assert elapsed < 1.5 + 2.0, "exit took %.1fs though the last request ended at ~1.5s" % elapsed
    assert up.count(path="/drain/delay/1500") == 20
    logged = [d for d in gw.access_log() if d.get("path", "").startswith("/drain/delay/1500")]
    assert len(logged) == 20, "%d access-log lines for the 20 drained requests: the access log must be " \
                              "flushed before exit" % len(logged)


def test_idle_keepalive_connections_do_not_hold_exit(stack):
    up = stack.upstream()
    gw = stack.gateway(gateway_config({"up": [up]}, server={"drain_timeout": "5s", "read_timeout": "30s"}))
    socks = []
    try:
        for i in range(5):
            s = raw_connect(gw.port)
            s.sendall(b"GET /idle/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            assert read_response(s)[0] == 200
            socks.append(s)
        t0 = time.monotonic()
        gw.send_signal(signal.SIGTERM)
        rc = gw.wait_exit(DRAIN + 2)
        elapsed = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
    assert rc == 0, "exit code %s\n%s" % (rc, gw.logs())
    assert elapsed < 2.0, "exit took %.1fs with only idle keep-alive connections open" % elapsed


def test_drain_timeout_bounds_exit(stack):
    up = stack.upstream()
    gw = stack.gateway(gateway_config({"up": upstream_config([up], timeout="10s")},
                                      server={"drain_timeout": "1s", "request_timeout": "10s"}))
    threads, results = run_clients(gw, 5, "/drain/delay/8000")
    try:
        assert up.wait_in_flight(5, 10)
        t0 = time.monotonic()
        gw.send_signal(signal.SIGTERM)
        rc = gw.wait_exit(6)
        elapsed = time.monotonic() - t0
    finally:
        up._stop_event.set()  # let the upstream's handlers go
        for t in threads:
            t.join(15)
    assert rc is not None, "requests longer than drain_timeout kept the process alive"
    assert elapsed <= 1.0 + 1.5, "exit took %.1fs, drain_timeout is 1s" % elapsed
    assert rc == 0, "exit code %s after the drain deadline\n%s" % (rc, gw.logs())
    assert all(r is not None for r in results), "a client hung after the gateway exited"


def test_sigint_exits_cleanly(stack):
    up = stack.upstream()
    gw = stack.gateway(gateway_config({"up": [up]}))
    assert fresh("GET", gw.url("/x")).status_code == 200
    t0 = time.monotonic()
    gw.send_signal(signal.SIGINT)
    rc = gw.wait_exit(DRAIN + 2)
    assert rc == 0, "exit code %s after SIGINT\n%s" % (rc, gw.logs())
    assert time.monotonic() - t0 < 2.0

"""Rate limiting with store: redis behind a slow link: redis.timeout is each
script call's deadline from its send.

A TCP relay in front of the real redis-server holds every reply chunk DELAY
after it arrived (in order), as a distant Redis would: more than half of
redis.timeout, less than all of it. Requests on one hot key batch behind the
call in flight; each batch, sent when that call's reply comes, must still be
decided by Redis, not by on_store_error (deny here: a fallback would be a 429).
"""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from harness import free_port, gateway_config, route, session, upstream_config, wait_until
from redis_server import redis_server  # noqa: F401 - the fixture

TIMEOUT_MS = 200
DELAY = 0.120  # s: past half of redis.timeout, within it
FALLBACKS = "gateway_ratelimit_store_fallbacks_total"


class SlowLink:
    """Relay 127.0.0.1:port -> target; replies delayed by `delay` from their arrival."""

    def __init__(self, target_port, delay):
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.delay = delay
        self.target = target_port
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(5), "the relay did not start"

    async def _forward(self, reader, writer, delay):
        queue = asyncio.Queue()

        async def pump():
            while True:
                at, data = await queue.get()
                if data is None:
                    break
                wait = at + delay - self.loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
        task = asyncio.ensure_future(pump())
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                queue.put_nowait((self.loop.time(), data))
        except (ConnectionError, asyncio.CancelledError):
            pass
        queue.put_nowait((0, None))
        try:
            await task
        except ConnectionError:
            pass
        writer.close()

    async def _handle(self, client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target)
        asyncio.ensure_future(self._forward(client_reader, server_writer, 0))
        asyncio.ensure_future(self._forward(server_reader, client_writer, self.delay))

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.stopping = self.loop.create_future()

        async def serve():
            server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            self.ready.set()
            await self.stopping
            server.close()
            await server.wait_closed()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.loop.run_until_complete(serve())
        self.loop.close()

    def stop(self):
        self.loop.call_soon_threadsafe(self.stopping.set_result, None)
        self.thread.join(5)


def test_slow_redis_within_timeout_decides_every_request(stack, redis_server):
    """redis.timeout 200 ms, every reply 120 ms late, one worker, one hot key,
    16 clients x 20 requests (after one that loads the script): all 320
    answered 200 (on_store_error deny would answer 429), no fallback counted,
    far fewer script calls than requests (batches), and the upstream saw every
    request."""
    link = SlowLink(redis_server.port, DELAY)
    try:
        up = stack.upstream("up")
        r = route("lim", "up", prefix="/lim/")
        r["ratelimit"] = ["hot"]
        cfg = gateway_config({"up": upstream_config([up], keepalive=16, timeout="10s")}, routes=[r],
                             server={"workers": 1, "request_timeout": "10s"},
                             ratelimit={"store": "redis", "on_store_error": "deny",
                                        "policies": {"hot": {"limit": 1000000, "window": "1h", "key": "route"}}},
                             redis={"url": "redis://127.0.0.1:%d/0" % link.port, "timeout": "%dms" % TIMEOUT_MS})
        gw = stack.gateway(cfg)
        wait_until(lambda: gw.metrics().value("gateway_redis_up") == 1, 10, "the gateway never connected to Redis")
        # One request first: Redis has no script yet, and NOSCRIPT then EVAL is
        # two slow round trips, past the deadline the first send set (the rule
        # of the resend). What is measured comes after.
        with session() as s:
            s.get(gw.url("/lim/echo"), timeout=10)
        fallbacks = gw.metrics().value(FALLBACKS)
        before = redis_server.command_calls("evalsha") + redis_server.command_calls("eval")
        lock = threading.Lock()
        got = []

        def client(i):
            with session() as s:
                for _ in range(20):
                    code = s.get(gw.url("/lim/echo"), timeout=10).status_code
                    with lock:
                        got.append(code)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(client, range(16)))
        calls = redis_server.command_calls("evalsha") + redis_server.command_calls("eval") - before
        assert got.count(200) == 320, "statuses: %d x 200, %d x 429" % (got.count(200), got.count(429))
        assert gw.metrics().value(FALLBACKS) == fallbacks
        assert 1 <= calls < 160, calls
        assert up.count(prefix="/lim/") >= 320
    finally:
        link.stop()

"""The response cache on SQL routes (sql: + cache:), against a real PostgreSQL.

One PostgreSQL cluster for the file (pg.py) with a table of its own
(cache_items, owned by app, changed with psql behind the gateway's back), one
gateway (store: memory, compression on) for most tests, and gateways of their
own where the cache section differs (stale_if_error).

How many statements the gateway sent is read from its own metrics:
gateway_pool_wait_seconds_count{database="main"} is observed once per
statement handed to a server connection (pool.c conn_assign), so a HIT must
leave it where it was and a MISS must move it by one.

Checked: result: object keyed by a template (MISS/HIT bytes and fields,
Content-Type, the row changed in the database is not seen until the ttl ends,
then a MISS with the new value), result: array (Content-Range and Link kept
with the entry, every page its own entry), statuses: [200, 404] caching the
"not found" answer (and not without it), stale_if_error with PostgreSQL
stopped, a write route (INSERT ... RETURNING) invalidating by glob (and a
failed write not), and the compressed variants of a SQL entry.
"""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import gateway_config, wait_until
from pg import postgres, postgres_section, sql_route  # noqa: F401 - postgres is a fixture
from test_cache import assert_hit, assert_miss, cs_ttl, req
from test_compression import BROTLI, gunzip

ITEMS = 40
COMPRESSION = {"algorithms": ["br", "gzip"], "min_bytes": 512, "types": ["application/json"]}
OBJECT_Q = "select row_to_json(t) from cache_items t where t.id = $1"
LINK_NEXT = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')


def cached_sql(name, path, query, cache, params=(), result=None, max_rows=None):
    r = sql_route(name, path, query, params=params, result=result, max_rows=max_rows)
    r["cache"] = cache
    return r


ROUTES = [
    cached_sql("item", "/c/items/:id", OBJECT_Q, {"key": "p:{path.id}", "ttl": "2s"}, params=["path.id"],
               result="object"),
    cached_sql("item404", "/c404/items/:id", OBJECT_Q, {"key": "n:{path.id}", "statuses": [200, 404]},
               params=["path.id"], result="object"),
    cached_sql("item-no404", "/cno/items/:id", OBJECT_Q, {"key": "m:{path.id}"}, params=["path.id"],
               result="object"),
    cached_sql("list", "/c/list", "select id, name from cache_items where id <= %d order by id" % ITEMS,
               {"ttl": "60s"}, result="array", max_rows=5),
    # Big enough to be compressed; its key is under p: too, so the write below drops it.
    cached_sql("plist", "/c/plist", "select id, name, repeat(md5(id::text), 4) as pad from cache_items order by id",
               {"key": "p:list:{query}"}, result="array", max_rows=100),
    cached_sql("slow", "/c/slow/:id", "select row_to_json(t) from cache_items t, pg_sleep(0.6) where t.id = $1",
               {"key": "p:slow:{path.id}"}, params=["path.id"], result="object"),
    cached_sql("hitem", "/h/items/:id", OBJECT_Q, {"key": "h:{path.id}"}, params=["path.id"], result="object"),
    dict(sql_route("item-write", "/c/items/:id", "insert into cache_items (id, name) values ($1, $2) "
                   "returning id, name", params=["path.id", "query.name"], result="object", methods=["POST"]),
         invalidate=["cache:p:*"]),
]


def load_items(pg):
    rows = ",".join("(%d, 'item %02d')" % (i, i) for i in range(1, ITEMS + 1))
    pg.psql("drop table if exists cache_items;"
            "create table cache_items (id int primary key, name text not null);"
            "insert into cache_items (id, name) values %s;" % rows, user="app")


def sql_gateway(stack, pg, routes=ROUTES, name=None, **cache):
    c = {"store": "memory", "default_ttl": "60s"}
    c.update(cache)
    pool = postgres_section(pg, query_wait_timeout="1s", server_connect_timeout="1s", query_timeout="5s")
    cfg = gateway_config({}, routes=routes, server={"workers": 2, "request_timeout": "5s"}, cache=c,
                         compression=COMPRESSION, postgres=pool)
    return stack.gateway(cfg, name=name)


class Env:
    pass


@pytest.fixture(scope="module")
def env(postgres, module_stack):
    # postgres first: set up before the gateway, so torn down after it.
    load_items(postgres)
    e = Env()
    e.pg = postgres
    e.gw = sql_gateway(module_stack, postgres, name="gw-sql-cache")
    return e


def statements(gw):
    """Statements the gateway has handed to PostgreSQL so far (all workers)."""
    return gw.metrics().value("gateway_pool_wait_seconds_count", database="main")


def row_json(pg, i):
    return json.loads(pg.scalar("select row_to_json(t) from cache_items t where t.id = %d" % i))


# ---------------------------------------------------------------------------

def test_object_miss_hit_then_ttl(env):
    gw, pg = env.gw, env.pg
    n0 = statements(gw)
    t0 = time.monotonic()
    a = req(gw, "/c/items/7")
    assert a.status == 200, a
    assert_miss(a)
    assert a.key == "cache:p:7", a.key
    assert a.h("Content-Type") == "application/json", a
    assert json.loads(a.body) == row_json(pg, 7) == {"id": 7, "name": "item 07"}
    b = req(gw, "/c/items/7")
    assert_hit(b, body=a.body)
    assert b.e2e() == a.e2e(), "fields differ:\nMISS %s\nHIT  %s" % (a.e2e(), b.e2e())
    assert b.h("Content-Type") == "application/json" and b.key == "cache:p:7", b
    assert b.all("Content-Length") == [str(len(a.body))], b
    assert cs_ttl(b) <= 2, b
    assert statements(gw) == n0 + 1, "a HIT went to PostgreSQL"

    # Changed behind the gateway's back: the entry still answers until its ttl.
    pg.psql("update cache_items set name = 'renamed' where id = 7")
    assert row_json(pg, 7)["name"] == "renamed"
    c = req(gw, "/c/items/7")
    assert time.monotonic() - t0 < 1.8, "too slow to tell (%.2fs): the ttl is 2s" % (time.monotonic() - t0)
    assert_hit(c, body=a.body)
    assert statements(gw) == n0 + 1

    # Past the ttl: a MISS with what the database holds now.
    d = wait_until(lambda: (lambda x: x if x.xcache != "HIT" else None)(req(gw, "/c/items/7")), 4.0,
                   "the entry expiring (ttl 2s)", interval=0.05)
    el = time.monotonic() - t0
    assert el >= 1.9, "expired after %.2fs; the ttl is 2s" % el
    assert d.status == 200
    assert_miss(d)
    assert json.loads(d.body) == {"id": 7, "name": "renamed"}, d
    assert_hit(req(gw, "/c/items/7"), body=d.body)
    assert statements(gw) == n0 + 2


def test_array_paging_fields_kept(env):
    gw = env.gw
    n0 = statements(gw)
    a = req(gw, "/c/list?limit=3&offset=0")
    assert a.status == 200, a
    assert_miss(a)
    assert [r["id"] for r in json.loads(a.body)] == [1, 2, 3]
    assert a.h("Content-Range") == "0-2/*", a
    link = a.h("Link")
    m = LINK_NEXT.search(link or "")
    assert m and "offset=3" in m.group(1) and "limit=3" in m.group(1), a
    b = req(gw, "/c/list?limit=3&offset=0")
    assert_hit(b, body=a.body)
    assert b.all("Content-Range") == ["0-2/*"] and b.all("Link") == [link], b
    assert b.e2e() == a.e2e()
    # The same query in another order is the same entry.
    assert_hit(req(gw, "/c/list?offset=0&limit=3"), body=a.body)
    assert statements(gw) == n0 + 1

    # Another page, another limit, no paging at all: entries of their own.
    pages = {"/c/list?limit=3&offset=3": ([4, 5, 6], "3-5/*"),
             "/c/list?limit=2&offset=0": ([1, 2], "0-1/*"),
             "/c/list": ([1, 2, 3, 4, 5], "0-4/*"),
             "/c/list?limit=5&offset=38": ([39, 40], "38-39/*")}
    for p, (ids, rng) in pages.items():
        x = req(gw, p)
        assert x.status == 200, (p, x)
        assert_miss(x)
        assert [r["id"] for r in json.loads(x.body)] == ids, p
        assert x.h("Content-Range") == rng, (p, x)
        y = req(gw, p)
        assert_hit(y, body=x.body)
        assert y.all("Content-Range") == [rng] and y.all("Link") == x.all("Link"), (p, y)
    last = req(gw, "/c/list?limit=5&offset=38")
    assert last.h("Link") is None, "Link rel=next on the last page: %r" % last
    assert statements(gw) == n0 + 1 + len(pages)


def test_404_cached_only_where_listed(env):
    gw = env.gw
    n0 = statements(gw)
    a = req(gw, "/c404/items/999")
    assert a.status == 404, a
    assert_miss(a)
    assert a.h("Content-Type") == "application/json"
    assert json.loads(a.body)["status"] == 404
    for _ in range(2):
        b = req(gw, "/c404/items/999")
        assert b.status == 404
        assert_hit(b, body=a.body)
        assert b.e2e() == a.e2e()
    assert statements(gw) == n0 + 1, "a cached 404 went to PostgreSQL again"
    # A 200 on the same route is cached too.
    assert_miss(req(gw, "/c404/items/3"))
    assert_hit(req(gw, "/c404/items/3"))
    assert statements(gw) == n0 + 2

    # Without 404 in statuses: every request asks the database.
    for i in range(2):
        c = req(gw, "/cno/items/999")
        assert c.status == 404, c
        assert_miss(c, stored=False)
    assert statements(gw) == n0 + 4
    assert_miss(req(gw, "/cno/items/3"))
    assert_hit(req(gw, "/cno/items/3"))
    assert statements(gw) == n0 + 5


def test_write_invalidates_and_compressed_variants(env):
    gw, pg = env.gw, env.pg
    # The list: stored with its codings; br, identity and gzip from the one entry.
    a = req(gw, "/c/plist", ae="br")
    assert a.status == 200, a
    assert_miss(a)
    assert a.key == "cache:p:list:"
    assert a.h("Content-Encoding") == "br", a
    plain = BROTLI.decompress(a.body)
    rows = json.loads(plain)
    assert [r["id"] for r in rows] == list(range(1, ITEMS + 1))
    assert len(a.body) < len(plain)
    n0 = statements(gw)
    i = req(gw, "/c/plist")
    assert_hit(i, body=plain)
    assert i.h("Content-Encoding") is None and i.h("Content-Type") == "application/json", i
    assert i.h("Content-Range") == "0-%d/*" % (ITEMS - 1), i
    g = req(gw, "/c/plist", ae="gzip")
    assert_hit(g)
    assert g.h("Content-Encoding") == "gzip" and gunzip(g.body) == plain, g
    b = req(gw, "/c/plist", ae="gzip, br")
    assert_hit(b, body=a.body)
    assert b.h("Content-Encoding") == "br"
    for x in (a, i, g, b):
        vary = [t.strip().lower() for v in x.all("Vary") for t in v.split(",")]
        assert "accept-encoding" in vary, x
    assert statements(gw) == n0

    item = req(gw, "/c/items/3")
    assert_miss(item)
    assert_hit(req(gw, "/c/items/3"), body=item.body)
    other = req(gw, "/c404/items/3")  # not under cache:p:
    assert other.xcache in ("MISS", "HIT")

    # A failed write (unique violation: 409) invalidates nothing.
    w = req(gw, "/c/items/3?name=dup", method="POST", body=b"")
    assert w.status == 409, w
    assert_hit(req(gw, "/c/items/3"), body=item.body)
    assert_hit(req(gw, "/c/plist", ae="br"), body=a.body)

    # A 2xx write: every cache:p:* entry goes.
    w = req(gw, "/c/items/41?name=new%20one", method="POST", body=b"")
    assert w.status == 200, w
    assert w.xcache is None
    assert json.loads(w.body) == {"id": 41, "name": "new one"}
    assert pg.scalar("select name from cache_items where id = 41") == "new one"
    c = req(gw, "/c/items/3")
    assert_miss(c, body=item.body)
    d = req(gw, "/c/plist", ae="br")
    assert_miss(d)
    assert d.h("Content-Encoding") == "br", d
    rows = json.loads(BROTLI.decompress(d.body))
    assert [r["id"] for r in rows] == list(range(1, ITEMS + 2)), "the new row is not in the list after the write"
    e = req(gw, "/c/plist")
    assert_hit(e)
    assert e.h("Content-Encoding") is None and json.loads(e.body) == rows
    # Not under the pattern: still there.
    assert_hit(req(gw, "/c404/items/3"), body=other.body)


def test_head_miss_stores_for_get(env):
    """GET implies HEAD: a HEAD miss runs the query, answers without the body
    and stores the entry, from which the GET is a HIT."""
    gw = env.gw
    n0 = statements(gw)
    h = req(gw, "/h/items/9", method="HEAD")
    assert h.status == 200 and h.body == b"", h
    assert_miss(h)
    g = req(gw, "/h/items/9")
    assert_hit(g)
    assert json.loads(g.body) == row_json(env.pg, 9)
    assert h.h("Content-Length") == str(len(g.body)), (h, g)
    assert h.e2e() == g.e2e()
    h2 = req(gw, "/h/items/9", method="HEAD")
    assert_hit(h2)
    assert h2.body == b"" and h2.h("Content-Length") == str(len(g.body))
    assert statements(gw) == n0 + 1


def test_invalidation_during_sql_fetch_not_stored(env):
    """A write's invalidation that comes while a matching GET's query runs
    (pg_sleep 0.6 s): that GET's answer is not stored."""
    gw = env.gw
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(req, gw, "/c/slow/2")
        wait_until(lambda: any("pg_sleep" in (q or "") and st == "active" for _, st, q in env.pg.activity()), 5,
                   "the slow query running in PostgreSQL", interval=0.02)
        w = req(gw, "/c/items/%d?name=during" % (ITEMS + 2), method="POST", body=b"")
        assert w.status == 200, w
        a = fut.result(10)
    assert a.status == 200 and a.xcache == "MISS", a
    assert json.loads(a.body) == row_json(env.pg, 2)
    b = req(gw, "/c/slow/2")
    assert_miss(b)  # a.'s answer was not stored
    assert_hit(req(gw, "/c/slow/2"), body=b.body)


def test_stale_if_error_with_postgres_stopped(stack, env):
    pg = env.pg
    gw = sql_gateway(stack, pg, name="gw-sql-stale", stale_if_error="30s",
                     routes=[cached_sql("sitem", "/s/items/:id", OBJECT_Q, {"key": "s:{path.id}", "ttl": "1s"},
                                        params=["path.id"], result="object"),
                             cached_sql("s404", "/s404/items/:id", OBJECT_Q,
                                        {"key": "s404:{path.id}", "statuses": [200, 404]},
                                        params=["path.id"], result="object")])
    t0 = time.monotonic()
    a = req(gw, "/s/items/5")
    assert a.status == 200
    assert_miss(a)
    assert json.loads(a.body) == row_json(pg, 5)
    nf = req(gw, "/s404/items/999")
    assert nf.status == 404
    assert_miss(nf)
    pg.stop()
    try:
        # Fresh entries need no database: the cached 404 too.
        h = req(gw, "/s404/items/999")
        assert h.status == 404
        assert_hit(h, body=nf.body)
        # Nothing stored: the database's failure is what the client sees.
        x = req(gw, "/s/items/6")
        assert x.status in (500, 502, 503, 504), x
        time.sleep(max(0.0, 1.2 - (time.monotonic() - t0)))  # past the 1s ttl
        for _ in range(2):
            s = req(gw, "/s/items/5")
            assert s.status == 200, "PostgreSQL stopped, an expired entry within stale_if_error: %r" % s
            assert s.xcache == "STALE" and "stale-if-error" in (s.cstatus or ""), s
            assert s.body == a.body and s.all("Content-Type") == ["application/json"], s
            assert s.h("Retry-After") is None, "the failed query's fields leaked into the stale answer: %r" % s
            assert s.elapsed < 2.5, "the stale answer took %.2fs" % s.elapsed
    finally:
        pg.start()
    # The database back: the next request refreshes the entry.
    b = wait_until(lambda: (lambda r: r if r.status == 200 and r.xcache != "STALE" else None)(
        req(gw, "/s/items/5")), 10, "a fresh answer once PostgreSQL is back", interval=0.1)
    assert b.body == a.body
    assert_hit(req(gw, "/s/items/5"), body=a.body)

"""SQL routes: the gateway answering from a real PostgreSQL through its pool.

One PostgreSQL cluster (pg.py) with the projects table and one gateway for the
whole file. Checked here: result: object (the single json column passed through
verbatim, other rows as objects typed by column type, 404 when no row), result:
array with paging (limit/offset, the max_rows cap, Content-Range, Link rel=next,
400 for a bad limit, queries that page themselves), parameters from the path, the
query string, headers and defaults, percent-decoding, injection attempts in every
source (bound, never spliced: they come back as data or as 400, and the tables
survive), error mapping (400 with sqlstate 22P02, 500 with sqlstate and without
the query text, 409 for a unique violation), unicode, NULLs, numbers and big
results. Where it helps, the answer is compared with what psql says the database
holds.
"""

import json
import re
import urllib.parse
from decimal import Decimal

import pytest

from harness import gateway_config, session
from pg import (BIG_BUDGET, EMOJI_NAME, NULL_ID, PROJECT_COUNT, PROJECTS, UNICODE_NAME, postgres,  # noqa: F401
                postgres_section, project_count, sql_literal, sql_route)

LIST_MAX_ROWS = 25
PAGED_MAX_ROWS = 20
SERIES_MAX_ROWS = 20000
QUERY_MARKER = "qm-7f3a-do-not-leak"   # in the broken routes' SQL only: must never reach a client

ROUTES = [
    sql_route("project", "/api/projects/:id", "select row_to_json(p) from projects p where p.id = $1",
              params=["path.id"], result="object"),
    sql_route("project-by-query", "/api/project", "select row_to_json(p) from projects p where p.id = $1",
              params=["query.id"], result="object"),
    sql_route("project-by-header", "/api/project-by-header",
              "select row_to_json(p) from projects p where p.id = $1", params=["header.X-Project-Id"],
              result="object"),
    sql_route("project-cols", "/api/project-cols/:id",
              "select id, name, owner, budget, active, meta, created from projects where id = $1",
              params=["path.id"], result="object"),
    # Paged by the gateway (the query is wrapped in LIMIT/OFFSET).
    sql_route("projects", "/api/projects", "select id, name from projects order by id", result="array",
              max_rows=LIST_MAX_ROWS),
    sql_route("projects-json", "/api/projects-json", "select row_to_json(p) from projects p order by p.id;",
              result="array", max_rows=200),
    sql_route("owner-projects", "/api/owners/:owner/projects",
              "select id from projects where owner = $1 order by id", params=["path.owner"], result="array"),
    # Pages itself: binds query.limit and query.offset.
    sql_route("projects-paged", "/api/projects-paged", "select id from projects order by id limit $1 offset $2",
              params=["query.limit", "query.offset"], result="array", max_rows=PAGED_MAX_ROWS),
    sql_route("series", "/api/series", "select g as n, md5(g::text) as h from generate_series(1, $1::int) g",
              params=["query.n"], result="array", max_rows=SERIES_MAX_ROWS),
    sql_route("bigtext", "/api/bigtext", "select repeat($1::text, $2::int) as t", params=["query.s", "query.n"]),
    sql_route("types", "/api/types",
              "select 1::int2 as i2, 2147483647::int4 as i4, 9007199254740993::int8 as i8, 42::oid as o, "
              "1.5::float4 as f4, 0.1::float8 as f8, 12345678901234567890.123456789::numeric as n, "
              "-0.5::numeric as neg, 'NaN'::float8 as nan, 'Infinity'::float8 as inf, "
              "'-Infinity'::numeric as ninf, 'NaN'::numeric as nnan, true as t, false as f, null::int as nul, "
              "null::text as nult, null::jsonb as nulj, "
              "'{\"a\": [1, 2, {\"b\": null}], \"c\": \"\\u00e9\"}'::jsonb as jb, "
              "'[1,  \"x\" , {}]'::json as js, '2024-02-29'::date as d, 'text'::text as s, "
              "'ab'::bytea as by, '{1,2}'::int[] as arr, '12:34:56'::time as tm, "
              "'018f2c3e-0000-7000-8000-000000000000'::uuid as u"),
    sql_route("last-project", "/api/last-project", "select id, name from projects order by id desc"),
    sql_route("echo-path", "/echo/path/:v", "select $1::text as v", params=["path.v"]),
    sql_route("echo-query", "/echo/query", "select $1::text as v", params=["query.v"]),
    sql_route("echo-header", "/echo/header", "select $1::text as v", params=["header.X-Echo"]),
    sql_route("echo-default", "/echo/default", "select $1::text as v", params=["query.v"],
              defaults={"query.v": "fallback value"}),
    sql_route("echo-header-default", "/echo/header-default", "select $1::text as v", params=["header.X-Tenant"],
              defaults={"header.X-Tenant": "public"}),
    sql_route("echo-multi", "/echo/multi/:a", "select $1::text as a, $2::text as b, $3::text as c, $4::text as d",
              params=["path.a", "query.b", "header.X-C", "query.d"], defaults={"query.d": "dflt"}),
    sql_route("echo-null", "/echo/null", "select null::text as v, $1::int as n", params=["query.n"]),
    sql_route("tag-insert", "/api/tags/:name", "insert into tags (name) values ($1) returning name",
              params=["path.name"], methods=["POST"]),
    sql_route("broken-table", "/api/broken/table",
              "select * from no_such_table_xyz /* %s */ where id = $1" % QUERY_MARKER, params=["query.id"],
              defaults={"query.id": "1"}),
    sql_route("broken-syntax", "/api/broken/syntax", "selec 1 /* %s */ as v" % QUERY_MARKER),
    sql_route("broken-column", "/api/broken/column",
              "select no_such_column /* %s */ from projects where id = $1" % QUERY_MARKER, params=["query.id"],
              defaults={"query.id": "1"}),
]

INJECTIONS = [
    "1; drop table projects",
    "' or 1=1 --",
    "1) union select 1, 'x' --",
    "'; delete from projects; --",
    "Robert'); DROP TABLE projects;--",
    "$1",
    "1 or 1=1",
    "\\'; select pg_sleep(10); --",
    "\"; truncate tags; --",
]


class Env:
    pass


@pytest.fixture(scope="module")
def env(postgres, module_stack):
    # postgres first: set up before the gateway, so torn down after it.
    e = Env()
    e.pg = postgres
    e.gw = module_stack.gateway(gateway_config({}, routes=ROUTES, postgres=postgres_section(postgres)))
    e.http = session()
    yield e
    e.http.close()


def get(env, path, **kw):
    kw.setdefault("timeout", 15)
    kw.setdefault("allow_redirects", False)
    return env.http.get(env.gw.url(path), **kw)


def ok_json(r):
    assert r.status_code == 200, "expected 200, got %d: %r" % (r.status_code, r.text[:500])
    ctype = r.headers.get("Content-Type", "")
    assert ctype.startswith("application/json"), "Content-Type %r" % ctype
    return json.loads(r.content.decode("utf-8"), parse_float=Decimal)


def assert_error(r, status, sqlstate=None):
    """A gateway error answer: JSON {"error", "status", "request_id"[, "sqlstate"]}."""
    assert r.status_code == status, "expected %d, got %d: %r" % (status, r.status_code, r.text[:500])
    assert r.headers.get("Content-Type", "").startswith("application/json"), dict(r.headers)
    doc = r.json()
    assert isinstance(doc, dict), doc
    assert doc.get("status") == status, doc
    assert isinstance(doc.get("error"), str) and doc["error"], doc
    assert doc.get("request_id") == r.headers.get("X-Request-Id"), (doc, dict(r.headers))
    if sqlstate:
        assert doc.get("sqlstate") == sqlstate, "expected sqlstate %s: %r" % (sqlstate, doc)
    return doc


def expected_project(p):
    """A PROJECTS entry as the database renders it (numeric as a number)."""
    return dict(p)


def assert_tables_intact(env):
    assert project_count(env.pg) == PROJECT_COUNT, "projects lost rows"
    assert env.pg.scalar("select to_regclass('public.tags') is not null") == "t", "table tags is gone"


def q(s):
    """Percent-encode s for a path segment or a query value (everything but unreserved)."""
    return urllib.parse.quote(s, safe="")


# --- result: object ----------------------------------------------------------------

@pytest.mark.parametrize("pid", [1, 2, 3, 4, 5, NULL_ID, 7, 8, 9, 42, PROJECT_COUNT])
def test_object_single_json_column_is_verbatim(env, pid):
    """One json column: the body is the value exactly as PostgreSQL wrote it."""
    r = get(env, "/api/projects/%d" % pid)
    doc = ok_json(r)
    want = env.pg.scalar("select row_to_json(p) from projects p where p.id = %d" % pid)
    body = r.content.decode("utf-8")
    assert body in (want, want + "\n"), "body is not row_to_json's text verbatim: %r" % body[:300]
    assert doc == expected_project(PROJECTS[pid - 1])


def test_object_columns_typed(env):
    doc = ok_json(get(env, "/api/project-cols/8"))
    p = PROJECTS[7]
    assert list(doc) == ["id", "name", "owner", "budget", "active", "meta", "created"], "column order"
    assert doc["id"] == 8 and isinstance(doc["id"], int)
    assert doc["name"] == p["name"] and doc["owner"] == p["owner"]
    assert doc["budget"] == BIG_BUDGET and isinstance(doc["budget"], Decimal), "numeric must be a JSON number"
    assert doc["active"] is True
    assert doc["meta"] == p["meta"], "jsonb must be nested JSON, not a string"
    assert doc["created"] == p["created"]


def test_object_nulls(env):
    doc = ok_json(get(env, "/api/project-cols/%d" % NULL_ID))
    assert doc == {"id": NULL_ID, "name": PROJECTS[NULL_ID - 1]["name"], "owner": None, "budget": None,
                   "active": None, "meta": None, "created": None}
    doc = ok_json(get(env, "/echo/null?n=7"))
    assert doc == {"v": None, "n": 7}


def test_value_typing(env):
    r = get(env, "/api/types")
    doc = ok_json(r)
    assert doc["i2"] == 1 and doc["i4"] == 2147483647
    assert doc["i8"] == 9007199254740993, "int8 must be written exactly (not through a double)"
    assert re.search(rb'"i8"\s*:\s*9007199254740993\b', r.content), r.content[:200]
    assert doc["o"] == 42 and isinstance(doc["o"], int)
    assert doc["f4"] == Decimal("1.5") and doc["f8"] == Decimal("0.1")
    assert doc["n"] == Decimal("12345678901234567890.123456789"), "numeric must keep every digit"
    assert doc["neg"] == Decimal("-0.5")
    assert doc["nan"] == "NaN" and doc["inf"] == "Infinity" and doc["ninf"] == "-Infinity" and doc["nnan"] == "NaN"
    assert doc["t"] is True and doc["f"] is False
    assert doc["nul"] is None and doc["nult"] is None and doc["nulj"] is None
    assert doc["jb"] == {"a": [1, 2, {"b": None}], "c": "\u00e9"}
    assert doc["js"] == [1, "x", {}]
    assert doc["d"] == "2024-02-29" and doc["s"] == "text" and doc["tm"] == "12:34:56"
    assert doc["by"] == "\\x6162", "bytea as PostgreSQL's text form"
    assert doc["arr"] == "{1,2}", "arrays are strings (PostgreSQL's text form)"
    assert doc["u"] == "018f2c3e-0000-7000-8000-000000000000"


def test_object_no_row_404(env):
    for path in ("/api/projects/99999", "/api/projects/0", "/api/projects/-1", "/api/project-cols/1000"):
        assert_error(get(env, path), 404)


def test_object_uses_first_row(env):
    """result: object with a query returning many rows answers the first one."""
    doc = ok_json(get(env, "/api/last-project"))
    assert doc == {"id": PROJECT_COUNT, "name": PROJECTS[-1]["name"]}


# --- unicode --------------------------------------------------------------------------

def test_unicode_round_trip(env):
    for pid, name in ((1, UNICODE_NAME), (2, EMOJI_NAME)):
        r = get(env, "/api/project-cols/%d" % pid)
        doc = ok_json(r)
        assert doc["name"] == name
        assert name.encode("utf-8") in r.content or json.dumps(name).encode() in r.content
    for value in (UNICODE_NAME, EMOJI_NAME, "\u00e9\u00e8 \u4e2d\u6587 \u0645\u0631\u062d\u0628\u0627"):
        assert ok_json(get(env, "/echo/query?v=" + q(value)))["v"] == value
        assert ok_json(get(env, "/echo/path/" + q(value)))["v"] == value


def test_special_characters_escaped(env):
    """Quotes, backslashes, newlines and control characters come back as valid
    JSON holding exactly the stored text."""
    for pid in (3, 4, 5, 7):
        r = get(env, "/api/project-cols/%d" % pid)
        doc = ok_json(r)
        assert doc["name"] == PROJECTS[pid - 1]["name"], "project %d" % pid   # ok_json parses strictly
    for value in ("tab\there", "nl\nthere", "cr\rthere", "quote\"back\\slash", "ctl\x01\x02\x1f\x7f"):
        assert ok_json(get(env, "/echo/query?v=" + q(value)))["v"] == value, repr(value)


# --- parameters -------------------------------------------------------------------------

def test_param_sources(env):
    doc = ok_json(get(env, "/echo/multi/from-path?b=from-query&d=given", headers={"X-C": "from-header"}))
    assert doc == {"a": "from-path", "b": "from-query", "c": "from-header", "d": "given"}


def test_header_param_case_insensitive(env):
    assert ok_json(get(env, "/echo/header", headers={"x-echo": "lower"}))["v"] == "lower"
    assert ok_json(get(env, "/echo/header", headers={"X-ECHO": "upper"}))["v"] == "upper"


def test_defaults(env):
    assert ok_json(get(env, "/echo/default"))["v"] == "fallback value"
    assert ok_json(get(env, "/echo/default?v=given"))["v"] == "given"
    assert ok_json(get(env, "/echo/header-default"))["v"] == "public"
    assert ok_json(get(env, "/echo/header-default", headers={"X-Tenant": "acme"}))["v"] == "acme"


def test_empty_values_are_values(env):
    """A parameter that is present but empty binds the empty string (not the
    default, not NULL)."""
    assert ok_json(get(env, "/echo/query?v="))["v"] == ""
    assert ok_json(get(env, "/echo/default?v="))["v"] == ""


@pytest.mark.parametrize("path,headers", [
    ("/echo/query", {}),
    ("/echo/query?w=1", {}),
    ("/echo/header", {}),
    ("/echo/multi/a?d=1", {"X-C": "c"}),        # query.b missing
    ("/echo/multi/a?b=1", {}),                  # header.X-C missing
    ("/api/project", {}),
])
def test_missing_param_400(env, path, headers):
    assert_error(get(env, path, headers=headers), 400)


def test_path_params_percent_decoded(env):
    cases = {
        "a%20b": "a b",
        "caf%C3%A9": "caf\u00e9",
        "100%25": "100%",
        "1+1": "1+1",                       # '+' is only a space in a query string
        "%E6%97%A5%E6%9C%AC": "\u65e5\u672c",
        "semi%3Bcolon": "semi;colon",
        "q%3Fmark%23hash": "q?mark#hash",
    }
    for raw, want in cases.items():
        assert ok_json(get(env, "/echo/path/" + raw))["v"] == want, raw


def test_query_params_decoded(env):
    cases = {
        "a+b": "a b",
        "a%2Bb": "a+b",
        "x%26y%3Dz": "x&y=z",
        "%C3%BC%E2%9C%93": "\u00fc\u2713",
        "50%25": "50%",
    }
    for raw, want in cases.items():
        assert ok_json(get(env, "/echo/query?v=" + raw))["v"] == want, raw
        assert ok_json(get(env, "/echo/query?other=1&v=" + raw + "&more=2"))["v"] == want, raw


# --- injection ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", INJECTIONS)
def test_injection_comes_back_as_data(env, text):
    assert ok_json(get(env, "/echo/path/" + q(text)))["v"] == text, "path"
    assert ok_json(get(env, "/echo/query?v=" + q(text)))["v"] == text, "query"
    assert ok_json(get(env, "/echo/header", headers={"X-Echo": text}))["v"] == text, "header"
    doc = ok_json(get(env, "/echo/multi/%s?b=%s&d=%s" % (q(text), q(text), q(text)), headers={"X-C": text}))
    assert doc == {"a": text, "b": text, "c": text, "d": text}
    assert_tables_intact(env)


@pytest.mark.parametrize("text", INJECTIONS)
def test_injection_into_int_param_400(env, text):
    assert_error(get(env, "/api/projects/" + q(text)), 400, "22P02")
    assert_error(get(env, "/api/project?id=" + q(text)), 400, "22P02")
    assert_error(get(env, "/api/project-by-header", headers={"X-Project-Id": text}), 400, "22P02")
    assert_tables_intact(env)


def test_injection_into_paging_params_400(env):
    for text in ("1; drop table projects", "1 or 1=1", "1) union select 1 --", "10 --"):
        assert_error(get(env, "/api/projects?limit=" + q(text)), 400)
        assert_error(get(env, "/api/projects?offset=" + q(text)), 400)
        assert_error(get(env, "/api/projects-paged?limit=" + q(text)), 400)
    assert_tables_intact(env)


def test_injection_in_insert_stored_as_data(env):
    text = "x'); drop table projects; --"
    r = env.http.post(env.gw.url("/api/tags/" + q(text)), timeout=15)
    assert ok_json(r) == {"name": text}
    assert env.pg.psql("select name from tags where name = %s" % sql_literal(text)) == [[text]]
    assert_tables_intact(env)


# --- errors -----------------------------------------------------------------------------

def test_type_error_400(env):
    for path in ("/api/projects/abc", "/api/projects/1.5", "/api/projects/99999999999", "/api/project?id=x"):
        doc = assert_error(get(env, path), 400)
        assert doc.get("sqlstate") in ("22P02", "22003"), doc
    assert_error(get(env, "/api/projects/abc"), 400, "22P02")
    assert_error(get(env, "/api/series?n=lots"), 400, "22P02")


@pytest.mark.parametrize("path,sqlstate", [
    ("/api/broken/table", "42P01"),
    ("/api/broken/syntax", "42601"),
    ("/api/broken/column", "42703"),
])
def test_sql_error_500_without_query_text(env, path, sqlstate):
    r = get(env, path)
    assert_error(r, 500, sqlstate)
    route = next(rt for rt in ROUTES if rt["match"]["path"] == path)
    assert QUERY_MARKER not in r.text, "the answer leaks the route's SQL: %r" % r.text
    assert route["sql"]["query"] not in r.text, "the answer holds the query text: %r" % r.text


def test_sql_error_does_not_poison_the_pool(env):
    """After errors (which abort the statement on the server), the same pooled
    connections still answer."""
    for _ in range(10):
        assert_error(get(env, "/api/broken/table"), 500, "42P01")
        assert ok_json(get(env, "/api/projects/1"))["id"] == 1


def test_unique_violation_409(env):
    name = "dup-tag-\u00e9"
    r = env.http.post(env.gw.url("/api/tags/" + q(name)), timeout=15)
    assert ok_json(r) == {"name": name}
    r = env.http.post(env.gw.url("/api/tags/" + q(name)), timeout=15)
    assert_error(r, 409, "23505")
    assert env.pg.psql("select count(*) from tags where name = %s" % sql_literal(name)) == [["1"]]


def test_method_not_allowed_on_sql_route(env):
    r = env.http.post(env.gw.url("/api/projects/1"), timeout=15)
    assert r.status_code in (404, 405), r.status_code
    r = get(env, "/api/tags/x")
    assert r.status_code in (404, 405), r.status_code
    assert env.pg.psql("select count(*) from tags where name = 'x'") == [["0"]]


# --- result: array and paging -------------------------------------------------------------

LINK_NEXT = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')


def next_link(r):
    """The (path, query dict) of the Link rel=next URL, or None."""
    link = r.headers.get("Link")
    if link is None:
        return None
    m = LINK_NEXT.search(link)
    assert m, "Link header without rel=next: %r" % link
    parts = urllib.parse.urlsplit(m.group(1))
    if parts.netloc:
        assert parts.netloc == "127.0.0.1:%d" % r.gw_port, "Link to another host: %r" % link
    return parts.path, urllib.parse.parse_qs(parts.query, keep_blank_values=True), m.group(1)


def page(env, path):
    r = get(env, path)
    r.gw_port = env.gw.port
    return r, ok_json(r)


def assert_page(r, rows, offset, more, path, extra=None, limit=None):
    """Content-Range and Link of a page of `rows` starting at `offset`."""
    if rows:
        want = "%d-%d/*" % (offset, offset + len(rows) - 1)
    else:
        want = "*/*"
    assert r.headers.get("Content-Range") == want, "Content-Range %r, expected %r" % (
        r.headers.get("Content-Range"), want)
    nxt = next_link(r)
    if not more:
        assert nxt is None, "Link rel=next on the last page: %r" % r.headers.get("Link")
        return None
    assert nxt is not None, "no Link rel=next, but there are more rows"
    npath, nq, url = nxt
    assert npath == path, "next link path %r, expected %r" % (npath, path)
    assert nq.get("offset") == [str(offset + len(rows))], "next offset in %r" % url
    if limit is not None and "limit" in nq:
        assert nq["limit"] == [str(limit)], url
    for k, v in (extra or {}).items():
        assert nq.get(k) == [v], "query parameter %s lost in the next link %r" % (k, url)
    return url


def test_array_default_limit_is_max_rows(env):
    r, rows = page(env, "/api/projects")
    assert isinstance(rows, list)
    assert [x["id"] for x in rows] == list(range(1, LIST_MAX_ROWS + 1))
    assert rows[0] == {"id": 1, "name": UNICODE_NAME}
    assert_page(r, rows, 0, True, "/api/projects")


def test_array_limit_capped_at_max_rows(env):
    r, rows = page(env, "/api/projects?limit=1000")
    assert len(rows) == LIST_MAX_ROWS
    assert_page(r, rows, 0, True, "/api/projects")


def test_array_limit_and_offset(env):
    r, rows = page(env, "/api/projects?limit=10&offset=20&tag=keep")
    assert [x["id"] for x in rows] == list(range(21, 31))
    assert_page(r, rows, 20, True, "/api/projects", extra={"tag": "keep"}, limit=10)


def test_array_more_check_at_the_end(env):
    r, rows = page(env, "/api/projects?limit=10&offset=89")
    assert [x["id"] for x in rows] == list(range(90, 100))
    assert_page(r, rows, 89, True, "/api/projects", limit=10)
    r, rows = page(env, "/api/projects?limit=10&offset=90")
    assert [x["id"] for x in rows] == list(range(91, 101))
    assert_page(r, rows, 90, False, "/api/projects")
    r, rows = page(env, "/api/projects?limit=10&offset=97")
    assert [x["id"] for x in rows] == [98, 99, 100]
    assert_page(r, rows, 97, False, "/api/projects")


def test_array_offset_past_the_end(env):
    r, rows = page(env, "/api/projects?offset=500")
    assert rows == []
    assert_page(r, rows, 500, False, "/api/projects")


def test_array_empty_result(env):
    r, rows = page(env, "/api/owners/nobody/projects")
    assert rows == []
    assert_page(r, rows, 0, False, "/api/owners/nobody/projects")


def test_array_follow_links_to_the_end(env):
    """Following rel=next from the first page visits every row exactly once."""
    seen, ranges = [], []
    url = "/api/projects?limit=22"
    for _ in range(10):
        r, rows = page(env, url)
        seen += [x["id"] for x in rows]
        ranges.append(r.headers.get("Content-Range"))
        nxt = next_link(r)
        if nxt is None:
            break
        parts = urllib.parse.urlsplit(nxt[2])
        url = parts.path + ("?" + parts.query if parts.query else "")
    assert seen == list(range(1, PROJECT_COUNT + 1)), "pages lost or repeated rows"
    assert ranges == ["0-21/*", "22-43/*", "44-65/*", "66-87/*", "88-99/*"], ranges


def test_array_param_filter(env):
    owner = "o'brien"
    r, rows = page(env, "/api/owners/%s/projects" % q(owner))
    want = [p["id"] for p in PROJECTS if p["owner"] == owner]
    assert [x["id"] for x in rows] == want
    assert_page(r, rows, 0, False, "/api/owners/%s/projects" % q(owner))


def test_array_of_json_column_verbatim(env):
    r, rows = page(env, "/api/projects-json")
    assert rows == [expected_project(p) for p in PROJECTS]
    assert_page(r, rows, 0, False, "/api/projects-json")
    want = env.pg.scalar("select row_to_json(p) from projects p where p.id = 5")
    assert want in r.content.decode("utf-8"), "json values must be passed through as PostgreSQL wrote them"


@pytest.mark.parametrize("qs", ["limit=-1", "limit=abc", "limit=1.5", "limit=1e3", "limit=0x10", "offset=-3",
                                "offset=two", "limit=5&offset=-1", "limit=99999999999999999999999",
                                "limit=%2B5"])
def test_array_bad_paging_400(env, qs):
    assert_error(get(env, "/api/projects?" + qs), 400)
    assert_error(get(env, "/api/projects-paged?" + qs), 400)


def test_self_paging_query_binds_limit_and_offset(env):
    """The route binds query.limit/query.offset: the query pages itself, so
    the offset must apply once (a second OFFSET would skip more rows)."""
    r, rows = page(env, "/api/projects-paged?limit=5&offset=10")
    assert [x["id"] for x in rows] == [11, 12, 13, 14, 15], "offset applied %s" % (
        "twice" if rows and rows[0]["id"] == 21 else "wrongly")
    assert_page(r, rows, 10, True, "/api/projects-paged", limit=5)
    r, rows = page(env, "/api/projects-paged?limit=5&offset=95")
    assert [x["id"] for x in rows] == [96, 97, 98, 99, 100]
    assert_page(r, rows, 95, False, "/api/projects-paged")
    r, rows = page(env, "/api/projects-paged?limit=500&offset=0")
    assert [x["id"] for x in rows] == list(range(1, PAGED_MAX_ROWS + 1)), "limit must be capped at max_rows"
    assert_page(r, rows, 0, True, "/api/projects-paged")


def test_self_paging_defaults(env):
    """No limit/offset from the client: the paging parameters are never
    "missing"; the gateway binds its validated values (limit max_rows, offset 0),
    as for a route it pages itself."""
    r, rows = page(env, "/api/projects-paged")
    assert [x["id"] for x in rows] == list(range(1, PAGED_MAX_ROWS + 1))
    assert_page(r, rows, 0, True, "/api/projects-paged")


# --- big results --------------------------------------------------------------------------

def test_large_array_10k_rows(env):
    r, rows = page(env, "/api/series?n=10000")
    assert len(rows) == 10000
    assert rows[0]["n"] == 1 and rows[-1]["n"] == 10000
    assert [x["n"] for x in rows] == list(range(1, 10001))
    assert rows[4999]["h"] == env.pg.scalar("select md5('5000')")
    assert_page(r, rows, 0, False, "/api/series")


def test_large_array_capped(env):
    r, rows = page(env, "/api/series?n=%d" % (SERIES_MAX_ROWS + 5))
    assert len(rows) == SERIES_MAX_ROWS
    assert_page(r, rows, 0, True, "/api/series", extra={"n": str(SERIES_MAX_ROWS + 5)})


def test_large_single_value_1mib(env):
    unit = "ab\u2713\"\\"           # a multi-byte character and two characters JSON escapes
    n = (1 << 20) // len(unit.encode()) + 1
    doc = ok_json(get(env, "/api/bigtext?s=%s&n=%d" % (q(unit), n)))
    assert len(doc["t"]) == n * len(unit)
    assert doc["t"] == unit * n


def test_pool_still_healthy_after_everything(env):
    """Many requests in a row on keep-alive: every answer right, none lost."""
    for i in range(1, 101):
        assert ok_json(get(env, "/api/projects/%d" % i))["id"] == i
    assert env.gw.running()
    assert_tables_intact(env)

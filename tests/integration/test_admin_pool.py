"""The admin endpoints for the pool: PgBouncer's SHOW POOLS / SHOW STATS /
SHOW DATABASES as JSON (/admin/pools, /admin/stats, /admin/databases) and the
effective configuration (/admin/config), on admin.listen only, behind a bearer
token.

Checked: 401 without the token or with a wrong one (and the admin paths are not
served on server.listen); each answer is a JSON array of objects whose keys are
exactly PgBouncer 1.18's columns; the values are plausible and agree with what
PostgreSQL saw (pg_stat_activity) and with the requests this file made; the
configuration shows neither the database password nor the admin token.
"""

import json
import secrets

import pytest

from harness import free_port, fresh, gateway_config, session, wait_until
from pg import APP_PASSWORD, postgres, postgres_section, sql_route  # noqa: F401

# Read off a real PgBouncer 1.18.0 (psql -A on its admin console, `SHOW POOLS;`,
# `SHOW STATS;`, `SHOW DATABASES;`, `SHOW CONFIG;`), run by hand against this
# suite's PostgreSQL (pg.py). The gateway must use exactly these names.
SHOW_POOLS_COLUMNS = [
    "database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req",
    "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login",
    "maxwait", "maxwait_us", "pool_mode",
]
SHOW_STATS_COLUMNS = [
    "database", "total_xact_count", "total_query_count", "total_received", "total_sent", "total_xact_time",
    "total_query_time", "total_wait_time", "avg_xact_count", "avg_query_count", "avg_recv", "avg_sent",
    "avg_xact_time", "avg_query_time", "avg_wait_time",
]
SHOW_DATABASES_COLUMNS = [
    "name", "host", "port", "database", "force_user", "pool_size", "min_pool_size", "reserve_pool",
    "pool_mode", "max_connections", "current_connections", "paused", "disabled",
]
SHOW_CONFIG_COLUMNS = ["key", "value", "default", "changeable"]

# Columns holding text; every other column is a non-negative number.
TEXT_COLUMNS = {"database", "user", "pool_mode", "name", "host", "force_user"}

ENDPOINTS = {
    "/admin/pools": SHOW_POOLS_COLUMNS,
    "/admin/stats": SHOW_STATS_COLUMNS,
    "/admin/databases": SHOW_DATABASES_COLUMNS,
    "/admin/config": None,
}

TOKEN = "adm-" + secrets.token_hex(16)
POOL_SIZE, MIN_POOL, RESERVE, MAX_DB = 7, 1, 2, 40
WARMUP_REQUESTS = 30

ROUTES = [
    sql_route("project", "/api/projects/:id", "select id, name from projects where id = $1", params=["path.id"]),
]


class Env:
    pass


@pytest.fixture(scope="module")
def env(postgres, module_stack):
    e = Env()
    e.pg = postgres
    e.admin_port = free_port()
    cfg = gateway_config({}, routes=ROUTES,
                         admin={"listen": "127.0.0.1:%d" % e.admin_port, "token": TOKEN},
                         postgres=postgres_section(postgres, default_pool_size=POOL_SIZE, min_pool_size=MIN_POOL,
                                                   reserve_pool_size=RESERVE, max_db_connections=MAX_DB,
                                                   pool_mode="transaction"))
    e.gw = module_stack.gateway(cfg)
    e.http = session()
    wait_until(lambda: fresh("GET", admin_url(e, "/admin/pools"), timeout=2,
                             headers=auth()).status_code == 200, 5.0, "the admin listener answering")
    for i in range(WARMUP_REQUESTS):
        r = e.http.get(e.gw.url("/api/projects/%d" % (i % 100 + 1)), timeout=10)
        assert r.status_code == 200, r.text[:300]
    yield e
    e.http.close()


def admin_url(env, path):
    return "http://127.0.0.1:%d%s" % (env.admin_port, path)


def auth(token=TOKEN):
    return {"Authorization": "Bearer " + token}


def admin_get(env, path):
    r = fresh("GET", admin_url(env, path), headers=auth(), timeout=10)
    assert r.status_code == 200, "GET %s: %d %r" % (path, r.status_code, r.text[:300])
    assert r.headers.get("Content-Type", "").startswith("application/json"), dict(r.headers)
    doc = json.loads(r.content.decode("utf-8"))
    assert isinstance(doc, list), "%s: expected a JSON array, got %r" % (path, r.text[:300])
    assert all(isinstance(row, dict) for row in doc), "%s: rows must be objects: %r" % (path, r.text[:300])
    return doc


def main_row(rows, key="database", value="main"):
    found = [row for row in rows if row.get(key) == value]
    assert len(found) == 1, "expected one row with %s=%r, got %r" % (key, value, rows)
    return found[0]


def is_count(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


# --- authentication ---------------------------------------------------------------------

@pytest.mark.parametrize("path", list(ENDPOINTS))
@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": "Bearer " + TOKEN + "x"},
    {"Authorization": "Bearer " + TOKEN[:-1]},
    {"Authorization": "Basic " + TOKEN},
    {"Authorization": TOKEN},
    {"X-Admin-Token": TOKEN},
], ids=["none", "empty", "wrong", "longer", "shorter", "basic", "no-scheme", "other-header"])
def test_admin_401_without_right_token(env, path, headers):
    r = fresh("GET", admin_url(env, path), headers=headers, timeout=10)
    assert r.status_code == 401, "GET %s with %r: %d %r" % (path, headers, r.status_code, r.text[:200])
    assert TOKEN not in r.text and APP_PASSWORD not in r.text


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_admin_200_with_token(env, path):
    admin_get(env, path)


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_admin_not_on_main_listener(env, path):
    r = env.http.get(env.gw.url(path), headers=auth(), timeout=10)
    assert r.status_code == 404, "GET %s on server.listen: %d %r" % (path, r.status_code, r.text[:200])


# --- columns ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [p for p, cols in ENDPOINTS.items() if cols])
def test_columns_are_pgbouncers(env, path):
    rows = admin_get(env, path)
    assert rows, "%s: no rows although database main is configured" % path
    want = ENDPOINTS[path]
    for row in rows:
        missing = [c for c in want if c not in row]
        extra = [c for c in row if c not in want]
        assert not missing and not extra, "%s: columns differ from PgBouncer 1.18's: missing %r, extra %r" % (
            path, missing, extra)
        for c in want:
            if c in TEXT_COLUMNS:
                assert row[c] is None or isinstance(row[c], str), "%s: %s=%r should be text" % (path, c, row[c])
            elif not (path == "/admin/databases" and c in ("paused", "disabled", "port")):
                assert is_count(row[c]), "%s: %s=%r should be a non-negative number" % (path, c, row[c])


# --- values ----------------------------------------------------------------------------------------

def test_pools_values(env):
    def idle_and_agrees():
        row = main_row(admin_get(env, "/admin/pools"))
        servers = sum(row[c] for c in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))
        return row if (row["cl_active"] == 0 and row["cl_waiting"] == 0
                       and servers == env.pg.count_connections()) else None
    row = wait_until(idle_and_agrees, 3.0, "SHOW POOLS idle, its sv_* summing to pg_stat_activity's count")
    assert row["user"] == "app"
    assert row["pool_mode"] == "transaction"
    assert 1 <= row["sv_active"] + row["sv_idle"] + row["sv_used"] + row["sv_tested"] + row["sv_login"] <= MAX_DB
    assert row["sv_active"] == 0
    assert row["maxwait"] >= 0 and row["maxwait_us"] >= 0 and row["maxwait_us"] < 1000000


def test_stats_values(env):
    row = main_row(admin_get(env, "/admin/stats"))
    assert row["total_query_count"] >= WARMUP_REQUESTS, row
    assert row["total_xact_count"] >= 1, row
    assert row["total_query_time"] > 0, "%d queries took no time at all? %r" % (row["total_query_count"], row)
    assert row["total_xact_time"] >= 0 and row["total_wait_time"] >= 0
    before = row["total_query_count"]
    for i in range(10):
        assert env.http.get(env.gw.url("/api/projects/%d" % (i + 1)), timeout=10).status_code == 200
    after = wait_until(lambda: (lambda r: r if r["total_query_count"] >= before + 10 else None)(
        main_row(admin_get(env, "/admin/stats"))), 3.0, "total_query_count up by 10 after 10 SQL requests")
    assert after["total_query_count"] >= before + 10
    assert after["total_query_time"] >= row["total_query_time"]


def test_databases_values(env):
    row = main_row(admin_get(env, "/admin/databases"), key="name")
    assert row["host"] == "127.0.0.1"
    assert int(row["port"]) == env.pg.port
    assert row["database"] == "app"
    assert row["force_user"] == "app"
    assert row["pool_size"] == POOL_SIZE
    assert row["min_pool_size"] == MIN_POOL
    assert row["reserve_pool"] == RESERVE
    assert row["max_connections"] == MAX_DB
    assert row["pool_mode"] in ("transaction", "", None), row["pool_mode"]
    assert row["paused"] in (0, False) and row["disabled"] in (0, False), row
    wait_until(lambda: main_row(admin_get(env, "/admin/databases"), key="name")["current_connections"]
               == env.pg.count_connections(), 3.0, "current_connections equal to pg_stat_activity's count")


def test_config_redacted(env):
    rows = admin_get(env, "/admin/config")
    assert rows, "/admin/config is empty"
    for row in rows:
        assert "key" in row and "value" in row, "config rows need key and value (PgBouncer's SHOW CONFIG " \
                                                "has %s): %r" % (", ".join(SHOW_CONFIG_COLUMNS), row)
    text = json.dumps(rows, ensure_ascii=False)
    assert APP_PASSWORD not in text, "/admin/config shows the database password"
    assert TOKEN not in text, "/admin/config shows the admin token"
    raw = fresh("GET", admin_url(env, "/admin/config"), headers=auth(), timeout=10).text
    assert APP_PASSWORD not in raw and TOKEN not in raw
    # It is the real configuration: the pool size and the database's port are there.
    pool = [row for row in rows if str(row["key"]).endswith("default_pool_size")]
    assert pool and str(pool[0]["value"]) == str(POOL_SIZE), pool
    assert str(env.pg.port) in text, "the database's port is not in /admin/config"


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_no_secrets_anywhere(env, path):
    r = fresh("GET", admin_url(env, path), headers=auth(), timeout=10)
    assert r.status_code == 200, (path, r.status_code)
    assert APP_PASSWORD not in r.text and TOKEN not in r.text, "%s shows a secret" % path
    r = env.http.get(env.gw.url("/metrics"), timeout=10)
    assert APP_PASSWORD not in r.text and TOKEN not in r.text

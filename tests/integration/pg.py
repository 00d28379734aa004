"""A real PostgreSQL for the integration tests (and the SQL benchmark).

`Postgres` makes a throw-away cluster in a scratch directory of its own: initdb,
settings for a test (fsync off, max_connections 300, listening on 127.0.0.1 on a
free port, its Unix socket in the scratch directory), the role `app` (LOGIN
PASSWORD 'secret', scram-sha-256 over TCP) and the database `app` owned by it.
start(), stop(), restart() and kill() (an immediate-mode stop, like a crash) go
through pg_ctl with a deadline; psql() runs SQL as the superuser over the Unix
socket (no Python driver needed) and returns rows.

PostgreSQL refuses to run as root. When the tests run as root (CI), initdb, pg_ctl
(so the postmaster) and pgbench run as an unprivileged user through
`runuser -u <user> --`: the Debian `postgres` system user, else `nobody`
(override with GATEWAY_TEST_PG_USER). The scratch directory is chowned to that
user. Clients that only connect (psql, the gateway) stay root: root can reach the
socket in the 0700 directory, and TCP needs no file access anyway. When the tests
do not run as root, everything runs as the current user.

The module-scoped pytest fixture `postgres` (import it into a test file:
`from pg import postgres`) starts one cluster per test file and always stops it,
even when a test failed; the server log's tail is attached to a failed test's
report. Every wait has a deadline and fails with the log's tail. A watchdog
process (one per cluster) stops the server and removes its directory if the test
process dies without cleaning up, even by SIGKILL.

Environment: GATEWAY_TEST_PG_BIN (default: the newest /usr/lib/postgresql/*/bin),
GATEWAY_TEST_PG_USER, GATEWAY_TEST_KEEP=1 keeps the scratch directory.
"""

import atexit
import datetime
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from harness import free_port, wait_until


def _default_bin():
    env = os.environ.get("GATEWAY_TEST_PG_BIN")
    if env:
        return env
    found = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if os.path.exists(os.path.join(d, "initdb"))]

    def version(d):
        try:
            return int(Path(d).parent.name)
        except ValueError:
            return 0
    found.sort(key=version)
    return found[-1] if found else "/usr/lib/postgresql/15/bin"


PG_BIN = _default_bin()
PSQL = os.path.join(PG_BIN, "psql") if os.path.exists(os.path.join(PG_BIN, "psql")) else (
    shutil.which("psql") or "/usr/bin/psql")

SUPERUSER = "gwsuper"
APP_USER = "app"
APP_PASSWORD = "secret"
APP_DB = "app"

START_TIMEOUT = 30.0   # initdb + start on a loaded 2-core box
STOP_TIMEOUT = 30.0
PSQL_TIMEOUT = 30.0

# psql output: records end with NUL (never in a text value), fields are split by the
# ASCII unit separator (no test value holds one), NULL shows as a marker no test
# value contains: values with tabs and newlines survive.
_FS, _NULL = "\x1f", "\x1d<NULL>\x1d"

ACTIVE = []  # clusters running now: stopped at exit, their logs shown on failure

# The watchdog: a tiny process of its own session that holds the read end of a
# pipe from us. When the pipe closes - we closed the cluster, or we died, even by
# SIGKILL (a CTest timeout) - it stops a postmaster still running on the data
# directory (immediate mode) and removes the scratch directory. So no test run
# leaves a PostgreSQL behind.
_WATCHDOG = r"""# tests/integration/pg.py watchdog: stops a test PostgreSQL its owner left behind
import os, shutil, signal, subprocess, sys
for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
    signal.signal(s, signal.SIG_IGN)
data, scratch, keep, stop = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4:]
while sys.stdin.buffer.read(4096):
    pass
if os.path.exists(os.path.join(data, "postmaster.pid")):
    try:
        subprocess.run(stop, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=60, cwd="/")
    except Exception:
        pass
if not keep:
    shutil.rmtree(scratch, ignore_errors=True)
"""


class PostgresError(AssertionError):
    pass


def run_as_user():
    """The user PostgreSQL runs as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in filter(None, (os.environ.get("GATEWAY_TEST_PG_USER"), "postgres", "nobody")):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresError("running as root and no unprivileged user to run PostgreSQL as "
                        "(install the postgresql package, which creates `postgres`, or set GATEWAY_TEST_PG_USER)")


def as_user(argv):
    """argv, wrapped in runuser when we are root."""
    user = run_as_user()
    if user is None:
        return list(argv)
    return ["runuser", "-u", user.pw_name, "--"] + list(argv)


def sql_literal(value):
    """A SQL literal for a Python value (standard_conforming_strings is on)."""
    if value is None:
        return "NULL"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, Decimal)):
        return str(value)
    if isinstance(value, (dict, list)):
        return sql_literal(json.dumps(value, ensure_ascii=False))
    return "'" + str(value).replace("'", "''") + "'"


class Postgres:
    """One throw-away PostgreSQL cluster (see the module docstring)."""

    def __init__(self, name="pg", scratch=None, max_connections=300, settings=None):
        self.name = name
        self.scratch = Path(scratch) if scratch else Path(tempfile.mkdtemp(prefix="gw-pg-"))
        self.data = self.scratch / "data"
        self.log_path = self.scratch / "postgres.log"
        self.port = None
        self.host = "127.0.0.1"
        self.socket_dir = str(self.scratch)
        self.superuser = SUPERUSER
        self.max_connections = max_connections
        self.settings = dict(settings or {})
        self.user = run_as_user()
        self.initialized = False
        self.watchdog = None

    # --- running the server's programs ----------------------------------------
    def _run(self, argv, timeout, what, as_server_user=True, check=True, env=None, input=None):
        argv = as_user(argv) if as_server_user else list(argv)
        full_env = dict(os.environ, LC_ALL="C", PGCLIENTENCODING="UTF8")
        full_env.update(env or {})
        try:
            res = subprocess.run(argv, capture_output=True, timeout=timeout, cwd=str(self.scratch),
                                 env=full_env, stdin=subprocess.DEVNULL if input is None else None,
                                 input=input)
        except subprocess.TimeoutExpired as e:
            raise PostgresError("%s did not finish within %.0fs\nstdout: %s\nstderr: %s\n%s"
                                % (what, timeout, _text(e.stdout), _text(e.stderr), self.log_tail()))
        if check and res.returncode != 0:
            raise PostgresError("%s failed (exit %d)\nstdout: %s\nstderr: %s\n%s"
                                % (what, res.returncode, _text(res.stdout), _text(res.stderr), self.log_tail()))
        return res

    def _pg_ctl(self, *args, timeout=START_TIMEOUT, check=True):
        return self._run([os.path.join(PG_BIN, "pg_ctl"), "-D", str(self.data)] + list(args), timeout + 10,
                         "pg_ctl %s" % " ".join(args), check=check)

    # --- life cycle -------------------------------------------------------------
    def init(self):
        """initdb and the test settings. Idempotent."""
        if self.initialized:
            return self
        if not os.access(os.path.join(PG_BIN, "initdb"), os.X_OK):
            raise PostgresError("PostgreSQL's initdb not found in %s (install postgresql, or set "
                                "GATEWAY_TEST_PG_BIN)" % PG_BIN)
        self._start_watchdog()
        if self.user is not None:
            os.chown(self.scratch, self.user.pw_uid, self.user.pw_gid)
        os.chmod(self.scratch, 0o700)
        self._run([os.path.join(PG_BIN, "initdb"), "-D", str(self.data), "-U", self.superuser, "-A", "trust",
                   "-E", "UTF8", "--no-locale", "--no-sync"], START_TIMEOUT * 2, "initdb")
        self.port = free_port()
        conf = {
            "port": self.port,
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": self.socket_dir,
            "max_connections": self.max_connections,
            "shared_buffers": "64MB",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "password_encryption": "scram-sha-256",
            "logging_collector": "off",
            "log_min_messages": "warning",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "timezone": "UTC",
        }
        conf.update(self.settings)
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n# gateway integration tests\n")
            for k, v in conf.items():
                f.write("%s = %s\n" % (k, v if isinstance(v, int) else "'%s'" % str(v).replace("'", "''")))
        with open(self.data / "pg_hba.conf", "w") as f:
            f.write("# gateway integration tests\n"
                    "local all all trust\n"
                    "host all all 127.0.0.1/32 scram-sha-256\n")
        self.initialized = True
        return self

    def setup(self):
        """initdb, start, role and database `app`. The usual way to get a cluster."""
        self.init()
        self.start()
        self.psql("create role %s login password %s" % (APP_USER, sql_literal(APP_PASSWORD)), db="postgres")
        self.psql("create database %s owner %s" % (APP_DB, APP_USER), db="postgres")
        return self

    def start(self, timeout=START_TIMEOUT):
        """pg_ctl -w start, then wait until a query answers."""
        self.init()
        if self not in ACTIVE:
            ACTIVE.append(self)
        self._start_watchdog()
        self._pg_ctl("-l", str(self.log_path), "-w", "-t", "%d" % timeout, "start", timeout=timeout)
        self.wait_accepting(timeout)
        return self

    def _start_watchdog(self):
        if self.watchdog is not None and self.watchdog.poll() is None:
            return
        stop = as_user([os.path.join(PG_BIN, "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "30",
                        "stop"])
        keep = "1" if os.environ.get("GATEWAY_TEST_KEEP") else "0"
        self.watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(self.data), str(self.scratch), keep]
                                         + stop, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True, cwd="/")

    def _stop_watchdog(self):
        if self.watchdog is None:
            return
        try:
            self.watchdog.stdin.close()
            self.watchdog.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.watchdog.kill()
            self.watchdog.wait(5)
        self.watchdog = None

    def wait_accepting(self, timeout=START_TIMEOUT):
        try:
            wait_until(lambda: self._ping(), timeout, "PostgreSQL on port %s accepting queries" % self.port,
                       interval=0.05)
        except AssertionError as e:
            raise PostgresError("%s\n%s" % (e, self.log_tail()))

    def _ping(self):
        res = subprocess.run([PSQL, "-X", "-q", "-At", "-h", self.socket_dir, "-p", str(self.port), "-U",
                              self.superuser, "-d", "postgres", "-c", "select 1"],
                             capture_output=True, timeout=5, stdin=subprocess.DEVNULL, env=self._client_env())
        return res.returncode == 0 and res.stdout.strip() == b"1"

    def running(self):
        """The postmaster is alive (by its pid file)."""
        pid = self.postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def postmaster_pid(self):
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def stop(self, mode="fast", timeout=STOP_TIMEOUT):
        """pg_ctl -m MODE -w stop (fast: disconnect clients and shut down cleanly;
        immediate: like a crash). No-op when not running."""
        if not self.initialized or not self.running():
            return self
        self._pg_ctl("-m", mode, "-w", "-t", "%d" % timeout, "stop", timeout=timeout)
        wait_until(lambda: not self.running(), 10, "postmaster of port %s gone after pg_ctl stop" % self.port)
        return self

    def kill(self, timeout=STOP_TIMEOUT):
        """Stop in immediate mode: every backend is dropped at once, no checkpoint."""
        return self.stop(mode="immediate", timeout=timeout)

    def restart(self, mode="fast", timeout=START_TIMEOUT):
        self.stop(mode=mode)
        return self.start(timeout=timeout)

    def ensure_running(self):
        if not self.running():
            self.start()
        return self

    def close(self):
        """Stop (fast, then immediate, then SIGKILL by pid) and remove the scratch
        directory. Never raises for a server that will not die: kills it."""
        try:
            if self.initialized and self.running():
                try:
                    self.stop(mode="fast", timeout=15)
                except Exception:  # noqa: BLE001 - escalate below
                    try:
                        self.stop(mode="immediate", timeout=10)
                    except Exception:  # noqa: BLE001
                        pid = self.postmaster_pid()
                        if pid:
                            try:
                                os.killpg(pid, signal.SIGKILL)
                            except OSError:
                                try:
                                    os.kill(pid, signal.SIGKILL)
                                except OSError:
                                    pass
        finally:
            self._stop_watchdog()
            if self in ACTIVE:
                ACTIVE.remove(self)
            if not os.environ.get("GATEWAY_TEST_KEEP"):
                shutil.rmtree(self.scratch, ignore_errors=True)

    # --- talking to it ------------------------------------------------------------
    def _client_env(self):
        env = dict(os.environ, PGCLIENTENCODING="UTF8", LC_ALL="C")
        for k in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGSERVICE", "PGOPTIONS"):
            env.pop(k, None)
        return env

    def psql(self, sql, db=APP_DB, user=None, timeout=PSQL_TIMEOUT):
        """Run SQL (one or more statements, ON_ERROR_STOP) as the superuser (or
        `user`, trusted on the socket) and return the rows of every statement's
        output, in order, as lists of str (None for SQL NULL). Values must not
        contain the byte 0x1f (the field separator)."""
        argv = [PSQL, "-X", "-q", "-A", "-t", "-0", "-v", "ON_ERROR_STOP=1", "-F", _FS, "-P", "null=" + _NULL,
                "-h", self.socket_dir, "-p", str(self.port), "-U", user or self.superuser, "-d", db, "-f", "-"]
        try:
            res = subprocess.run(argv, input=sql.encode(), capture_output=True, timeout=timeout,
                                 env=self._client_env())
        except subprocess.TimeoutExpired:
            raise PostgresError("psql did not finish within %.0fs: %s\n%s" % (timeout, sql[:300], self.log_tail()))
        if res.returncode != 0:
            raise PostgresError("psql failed (exit %d): %s\n%s\n%s" % (res.returncode, sql[:300],
                                                                      _text(res.stderr), self.log_tail(20)))
        # -0: every record ends with a NUL byte, whatever statement it came from.
        records = res.stdout.decode("utf-8").split("\0")
        assert records[-1] == "", "psql output does not end with a record: %r" % res.stdout[-100:]
        return [[None if f == _NULL else f for f in rec.split(_FS)] for rec in records[:-1]]

    def scalar(self, sql, **kw):
        rows = self.psql(sql, **kw)
        assert rows and rows[0], "no value from %r" % sql
        return rows[0][0]

    def count_connections(self, user=APP_USER, state=None):
        """Backends of `user` (pg_stat_activity), not counting the asking session."""
        cond = " and state = %s" % sql_literal(state) if state else ""
        return int(self.scalar("select count(*) from pg_stat_activity where usename = %s "
                               "and pid <> pg_backend_pid()%s" % (sql_literal(user), cond), db="postgres"))

    def activity(self, user=APP_USER):
        """(pid, state, query) of `user`'s backends."""
        return [tuple(r) for r in self.psql("select pid, state, query from pg_stat_activity where usename = %s "
                                            "and pid <> pg_backend_pid()" % sql_literal(user), db="postgres")]

    def app_psql(self, sql, timeout=PSQL_TIMEOUT):
        """Run SQL as `app` over TCP with its password: what the gateway does."""
        env = self._client_env()
        env["PGPASSWORD"] = APP_PASSWORD
        res = subprocess.run([PSQL, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", self.host, "-p",
                              str(self.port), "-U", APP_USER, "-d", APP_DB, "-c", sql],
                             capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise PostgresError("psql as app over TCP failed: %s\n%s" % (_text(res.stderr), self.log_tail(20)))
        return res.stdout.decode("utf-8")

    def database_config(self, **overrides):
        """The gateway's postgres.databases.<name> entry for this cluster."""
        cfg = {"host": self.host, "port": str(self.port), "dbname": APP_DB, "user": APP_USER,
               "password": APP_PASSWORD}
        cfg.update(overrides)
        return cfg

    def pgbench(self, args, timeout=120, user=APP_USER, check=True, tcp=False):
        """Run pgbench (as the unprivileged user when root) against database app,
        over the Unix socket, or with tcp=True over 127.0.0.1 with app's password
        (the gateway's path); returns CompletedProcess with text output."""
        host, env = (self.host, {"PGPASSWORD": APP_PASSWORD}) if tcp else (self.socket_dir, None)
        res = self._run([os.path.join(PG_BIN, "pgbench"), "-h", host, "-p", str(self.port), "-U", user]
                        + list(args) + [APP_DB], timeout, "pgbench %s" % " ".join(args), check=check, env=env)
        res.stdout = _text(res.stdout)
        res.stderr = _text(res.stderr)
        return res

    # --- logs -------------------------------------------------------------------------
    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n=40):
        lines = self.log().splitlines()
        return "---- PostgreSQL log (%s), last %d lines ----\n%s" % (self.log_path, min(n, len(lines)),
                                                                      "\n".join(lines[-n:]))

    def summary(self):
        return "PostgreSQL %s port %s (%s), data %s\n%s" % (
            self.name, self.port, "running" if self.running() else "stopped", self.data, self.log_tail())


def _text(b):
    if b is None:
        return ""
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else b


@atexit.register
def _stop_all():
    for pg in list(ACTIVE):
        try:
            pg.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


# ---------------------------------------------------------------------------
# Test data: the projects table

UNICODE_NAME = "\u00dcn\u00efc\u00f8d\u00e9 \u2713 \u65e5\u672c"      # Ünïcødé ✓ 日本
EMOJI_NAME = "Rocket \U0001f680 launch \U0001f468\u200d\U0001f469\u200d\U0001f467"
QUOTES_NAME = "He said \"hi\" and it's 'fine'"
BACKSLASH_NAME = "C:\\path\\to\\dir \\\\ \\n not-a-newline \\u0041"
NEWLINE_NAME = "line one\nline two\r\n\tindented"
CONTROL_NAME = "bell\x07 esc\x1b soh\x01 del\x7f end"
PROJECT_COUNT = 100
NULL_ID = 6            # every nullable column NULL
BIG_BUDGET = Decimal("12345678901234567890.123456789")


def _project(i):
    names = {1: UNICODE_NAME, 2: EMOJI_NAME, 3: QUOTES_NAME, 4: BACKSLASH_NAME, 5: NEWLINE_NAME, 7: CONTROL_NAME}
    p = {
        "id": i,
        "name": names.get(i, "project %03d" % i),
        "owner": ["ada", "grace", "linus", "o'brien", "\u00e9mile"][i % 5],
        "budget": Decimal(i * 1000) + Decimal("0.50") if i != 8 else BIG_BUDGET,
        "active": i % 3 != 0,
        "meta": {"level": i, "tags": ["t%d" % (i % 4), "all"], "nested": {"even": i % 2 == 0, "note": None}},
        "created": (datetime.date(2024, 1, 1) + datetime.timedelta(days=i)).isoformat(),
    }
    if i == 9:
        p["meta"] = {"quote": "\"q\"", "unicode": UNICODE_NAME, "list": [1, 2.5, None, True]}
    if i == NULL_ID:
        p.update(owner=None, budget=None, active=None, meta=None, created=None)
    return p


PROJECTS = [_project(i) for i in range(1, PROJECT_COUNT + 1)]

SCHEMA = """
drop table if exists projects, tags;
create table projects (
    id int primary key,
    name text not null,
    owner text,
    budget numeric,
    active bool,
    meta jsonb,
    created date
);
create table tags (name text primary key, created timestamptz not null default now());
"""


def load_schema(pg):
    """(Re)create projects (PROJECTS, 100 rows) and tags (empty), owned by app."""
    rows = ",\n".join("(%s)" % ", ".join(sql_literal(p[c]) for c in
                                         ("id", "name", "owner", "budget", "active", "meta", "created"))
                      for p in PROJECTS)
    pg.psql(SCHEMA + "insert into projects (id, name, owner, budget, active, meta, created) values\n"
            + rows + ";\nanalyze projects;\n", user=APP_USER)
    got = int(pg.scalar("select count(*) from projects"))
    assert got == PROJECT_COUNT, "loaded %d projects, expected %d" % (got, PROJECT_COUNT)


def project_count(pg):
    return int(pg.scalar("select count(*) from projects"))


# ---------------------------------------------------------------------------
# Gateway configuration pieces

def postgres_section(pg, database="main", **overrides):
    """A gateway `postgres:` section with one database (`main`) on this cluster;
    keyword arguments set pool keys (default_pool_size=..., pool_mode=...)."""
    sec = {"databases": {database: pg.database_config()}}
    sec.update(overrides)
    return sec


def sql_route(name, path, query, params=(), result=None, defaults=None, max_rows=None, methods=("GET",),
              database="main"):
    """A route answered from PostgreSQL."""
    sql = {"database": database, "query": query}
    if params:
        sql["params"] = list(params)
    if defaults:
        sql["defaults"] = dict(defaults)
    if result:
        sql["result"] = result
    if max_rows is not None:
        sql["max_rows"] = max_rows
    match = {"path": path}
    if methods:
        match["methods"] = list(methods)
    return {"name": name, "match": match, "sql": sql}


# ---------------------------------------------------------------------------
# pytest glue

class _Reporter:
    """Attaches running clusters' log tails to failed tests' reports."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        rep = outcome.get_result()
        if rep.failed and rep.when in ("setup", "call"):
            for pg in list(ACTIVE):
                rep.sections.append(("postgres %s" % pg.name, pg.summary()))


def _ensure_reporter(config):
    if not config.pluginmanager.has_plugin("gateway-pg-reporter"):
        config.pluginmanager.register(_Reporter(), "gateway-pg-reporter")


@pytest.fixture(scope="module")
def postgres(request):
    """One running cluster for the test file, with role/database app and the
    projects table; stopped and removed afterwards whatever happened."""
    _ensure_reporter(request.config)
    pg = Postgres(name=request.module.__name__.rsplit(".", 1)[-1])
    request.addfinalizer(pg.close)
    pg.setup()
    load_schema(pg)
    return pg


def wait_no_connections(pg, timeout=5.0, user=APP_USER):
    """Wait until `user` has no backend left; fail with what is still there."""
    try:
        wait_until(lambda: pg.count_connections(user) == 0, timeout,
                   "no %s connections left in pg_stat_activity" % user, interval=0.05)
    except AssertionError as e:
        raise AssertionError("%s; still there: %r" % (e, pg.activity(user)))


def sample_connections(pg, stop_event, interval=0.05, user=APP_USER):
    """Sample count_connections until stop_event is set: list of (t, count).
    Meant for a thread; errors while sampling are recorded as count None."""
    samples = []
    while not stop_event.is_set():
        t = time.monotonic()
        try:
            samples.append((t, pg.count_connections(user)))
        except Exception:  # noqa: BLE001 - recorded, the test decides
            samples.append((t, None))
        stop_event.wait(max(0.0, interval - (time.monotonic() - t)))
    return samples


class Sampler:
    """pg_stat_activity's count of `app` backends, every ~50 ms, on a thread."""

    def __init__(self, pg, interval=0.05):
        self.stop_event = threading.Event()
        self.samples = []
        self.thread = threading.Thread(target=self._run, args=(pg, interval), daemon=True)

    def _run(self, pg, interval):
        self.samples = sample_connections(pg, self.stop_event, interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(30)

    def counts(self):
        return [c for _, c in self.samples if c is not None]

    def peak(self):
        return max(self.counts(), default=0)

    def over(self, limit):
        """Samples above limit: (seconds since the first sample, count)."""
        t0 = self.samples[0][0] if self.samples else 0
        return [(round(t - t0, 2), c) for t, c in self.samples if c is not None and c > limit]



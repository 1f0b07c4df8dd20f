"""The serving app's state, shared by all of its replicas: jobs (progress, heartbeats, cancellation), tenant
quotas and the response cache, behind one interface (`Store`), in the backend `ServeArgs.state_store` names:

- `sqlite://` (the default) or `sqlite:///PATH`: an embedded SQLite file in WAL mode, opened by every
  replica of the app; each check-and-add (a job under `max_jobs`, a quota's moving window) is one
  transaction. The default file is `<Ray session dir>/dtrain-state/<app>.sqlite`, so a new cluster starts
  clean; an explicit PATH is kept across clusters. The state is in the file, not in a process: it survives
  the death of any replica (ingress, sampler) and, at an explicit PATH, a cluster restart. It is ONE
  MACHINE's: replicas on other nodes would each open a file of their own, so a multi-node cluster uses Redis.
  (Not Ray's GCS key-value store: it has no transactions, so no atomic check-and-add.)
- `redis://HOST:PORT/DB`: Redis, shared by every replica on every node and kept while the server runs (its
  own persistence settings decide what a server restart keeps); check-and-add in Lua scripts, quotas by
  `limits`' Redis storage.

A job's heartbeat is refreshed by the ingress task that owns it and by its sampler's progress reports; one
whose heartbeat is older than `heartbeat_timeout_s` is failed, naming the lost heartbeat, by the next
cleanup (a job created, a stale job read, and every heartbeat round of an ingress that owns jobs), which
also frees its `max_jobs` slot and removes jobs finished more than `job_ttl_s` ago.

Methods block (well under a millisecond: docs/serving.md): replicas call them in a thread. Times are each
machine's clock; a multi-node cluster keeps its clocks in step (NTP), well within the heartbeat timeout.
"""
from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

from limits.storage import MovingWindowSupport, Storage

FINISHED = ("done", "cancelled", "failed")


def check_url(url: str) -> str:
    """`url` if it names a backend, else a ValueError saying which do."""
    try:
        u = urlparse(url)
        ok = (u.scheme == "sqlite" and not u.netloc) or (u.scheme in ("redis", "rediss") and u.hostname and u.port != 0)
    except ValueError:  # a bad port
        ok = False
    if not ok:
        raise ValueError(f"{url!r} is none of sqlite:// (a file in the Ray session directory), sqlite:///ABSOLUTE/PATH "
                         "or redis://HOST:PORT/DB")
    return url


@dataclass(frozen=True)
class StoreSpec:
    """What a replica opens the store from (it travels to every replica; connections do not)."""
    url: str = "sqlite://"
    job_ttl_s: float = 600.0
    heartbeat_timeout_s: float = 10.0

    def open(self, app: str) -> Store:
        if urlparse(self.url).scheme.startswith("redis"):
            return RedisStore(self.url, app, self.job_ttl_s, self.heartbeat_timeout_s)
        return SQLiteStore(urlparse(self.url).path or default_path(app), self.job_ttl_s, self.heartbeat_timeout_s)


def default_path(app: str) -> str:
    """The default SQLite file of an app: in this cluster's session directory, so a new cluster starts clean."""
    import ray

    if not ray.is_initialized():
        raise ValueError("state_store sqlite:// (a file in the Ray session directory) needs Ray: outside a cluster "
                         "give sqlite:///ABSOLUTE/PATH")
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())  # no public API names it
    (session / "dtrain-state").mkdir(exist_ok=True)
    return str(session / "dtrain-state" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', app) or 'app'}.sqlite")


def lost_heartbeat(timeout_s: float) -> str:
    return f"lost heartbeat: neither its ingress nor its sampler replica reported for {timeout_s:g} s (one of them died)"


class Store(ABC):
    """Job records are dicts: job_id, owner, steps, calls (network calls of the whole job), state, calls_done,
    created_at, finished_at, error, cancel, version (+1 at every change), replica (the sampler replica that
    last reported it) and, when asked, result."""
    errors: tuple[type[Exception], ...]  # what the backend raises when it fails

    def __init__(self, job_ttl_s: float, heartbeat_timeout_s: float):
        self.ttl_s, self.timeout_s = job_ttl_s, heartbeat_timeout_s

    @staticmethod
    def _new(job_id: str, owner: str, steps: int, calls: int, now: float) -> dict:
        return {"job_id": job_id, "owner": owner, "steps": steps, "calls": calls, "state": "queued", "calls_done": 0,
                "created_at": now, "finished_at": None, "error": None, "cancel": None, "version": 0, "replica": None}

    def _visible(self, rec: Optional[dict], owner: str, now: float) -> Optional[dict]:
        """None for an unknown or expired job, and for another tenant's (it does not exist for them)."""
        if rec is None or rec["owner"] != owner:
            return None
        return None if rec["finished_at"] is not None and rec["finished_at"] < now - self.ttl_s else rec

    def get_job(self, job_id: str, owner: str, with_result: bool = True) -> Optional[dict]:
        """The job's record (None: unknown, expired or another owner's); a stale one is failed first."""
        now = time.time()
        rec, beat = self._read(job_id, with_result)
        if rec is not None and rec["finished_at"] is None and beat < now - self.timeout_s:
            self.cleanup()
            rec, _ = self._read(job_id, with_result)
        return self._visible(rec, owner, now)

    @abstractmethod
    def _read(self, job_id: str, with_result: bool) -> tuple[Optional[dict], float]:
        """The record as stored and its last heartbeat."""

    @abstractmethod
    def create_job(self, job_id: str, owner: str, steps: int, calls: int, max_jobs: int) -> Optional[dict]:
        """Clean up, then register a queued job unless `max_jobs` are kept (None then)."""

    @abstractmethod
    def cancel_job(self, job_id: str, owner: str) -> Optional[dict]:
        """Ask an active job to stop (a queued one is cancelled at once); a finished one stays as it is."""

    @abstractmethod
    def heartbeat(self, job_ids: list[str]) -> None:
        """These jobs are alive (the finished among them are left alone)."""

    @abstractmethod
    def report(self, progress: dict[str, int], replica: str) -> list[str]:
        """A sampler replica's progress, network calls so far per job (a heartbeat too; queued jobs become
        running): returns the jobs it should stop computing (cancelled, finished or gone)."""

    @abstractmethod
    def finish_job(self, job_id: str, state: str, calls_done: Optional[int] = None, result: Optional[dict] = None,
                   error: Optional[str] = None, cancel: Optional[dict] = None) -> bool:
        """End an active job (False if it had already ended: cancelled while queued, failed as stale)."""

    @abstractmethod
    def cleanup(self) -> None:
        """Fail the stale jobs (their slots freed), remove those finished over `job_ttl_s` ago."""

    @abstractmethod
    def limits_storage(self) -> MovingWindowSupport:
        """A `limits` storage with the moving window, for dtrain.serving.tenancy.Quotas."""

    @abstractmethod
    def cache_get(self, key: str) -> Optional[bytes]:
        """The response cached under `key`, None if none or expired."""

    @abstractmethod
    def cache_put(self, key: str, value: bytes, ttl_s: float, max_entries: int) -> None:
        """Cache `value` for `ttl_s`; beyond `max_entries` the ones nearest to expiry go."""


# --- SQLite ------------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, owner TEXT NOT NULL, steps INTEGER NOT NULL,
    calls INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'queued', calls_done INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, heartbeat_at REAL NOT NULL,
    finished_at REAL, error TEXT, cancel TEXT, result TEXT, replica TEXT, version INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS jobs_beat ON jobs (heartbeat_at) WHERE finished_at IS NULL;
CREATE INDEX IF NOT EXISTS jobs_end ON jobs (finished_at);
CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS cache_end ON cache (expires_at);
CREATE TABLE IF NOT EXISTS hits (key TEXT NOT NULL, at REAL NOT NULL, amount INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS hits_key ON hits (key, at);
"""
COLUMNS = ("id", "owner", "steps", "calls", "state", "calls_done", "created_at", "finished_at", "error", "cancel",
           "version", "replica")


class SQLiteStore(Store):
    errors = (sqlite3.Error,)

    def __init__(self, path: str, job_ttl_s: float, heartbeat_timeout_s: float):
        super().__init__(job_ttl_s, heartbeat_timeout_s)
        self.path, self.local = path, threading.local()  # a connection per thread (sqlite3's rule)
        self.db()  # a bad path fails here, at the replica's start

    def db(self) -> sqlite3.Connection:
        db = getattr(self.local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # transactions are explicit: tx()
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            db.execute("PRAGMA synchronous=NORMAL")  # a dead process loses nothing; a power cut may lose the last commits
            db.executescript(SCHEMA)
            self.local.db = db
        return db

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        db = self.db()
        db.execute("BEGIN IMMEDIATE")  # the write lock first: what a check-and-add reads no one changes
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _read(self, job_id: str, with_result: bool) -> tuple[Optional[dict], float]:
        row = self.db().execute(f"SELECT {', '.join(COLUMNS)}, heartbeat_at, result FROM jobs WHERE id = ?",
                                (job_id,)).fetchone()
        if row is None:
            return None, 0.0
        rec = dict(zip(("job_id", *COLUMNS[1:]), row))
        rec["cancel"] = rec["cancel"] and json.loads(rec["cancel"])
        if with_result:
            rec["result"] = row[-1] and json.loads(row[-1])
        return rec, row[-2]

    def _cleanup(self, db: sqlite3.Connection, now: float) -> None:
        db.execute("UPDATE jobs SET state = 'failed', finished_at = ?, error = ?, version = version + 1 "
                   "WHERE finished_at IS NULL AND heartbeat_at < ?", (now, lost_heartbeat(self.timeout_s), now - self.timeout_s))
        db.execute("DELETE FROM jobs WHERE finished_at < ?", (now - self.ttl_s,))
        db.execute("DELETE FROM cache WHERE expires_at < ?", (now,))

    def cleanup(self) -> None:
        with self.tx() as db:
            self._cleanup(db, time.time())

    def create_job(self, job_id: str, owner: str, steps: int, calls: int, max_jobs: int) -> Optional[dict]:
        now = time.time()
        with self.tx() as db:
            self._cleanup(db, now)
            if db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] >= max_jobs:
                return None
            db.execute("INSERT INTO jobs (id, owner, steps, calls, created_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?)",
                       (job_id, owner, steps, calls, now, now))
        return self._new(job_id, owner, steps, calls, now)

    def cancel_job(self, job_id: str, owner: str) -> Optional[dict]:
        if self.get_job(job_id, owner, False) is None:  # also fails it first if stale
            return None
        with self.tx() as db:  # every SET reads the row as it was: a queued job ends cancelled at once
            db.execute("UPDATE jobs SET cancel_requested = 1, version = version + 1, "
                       "state = CASE state WHEN 'queued' THEN 'cancelled' ELSE state END, "
                       "finished_at = CASE state WHEN 'queued' THEN ? END, "
                       "cancel = CASE state WHEN 'queued' THEN ? END "
                       "WHERE id = ? AND finished_at IS NULL AND cancel_requested = 0",
                       (time.time(), json.dumps({"seen_at_step": 0, "last_step": 0}), job_id))
        return self.get_job(job_id, owner, False)

    def heartbeat(self, job_ids: list[str]) -> None:
        now = time.time()
        with self.tx() as db:
            db.executemany("UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND finished_at IS NULL",
                           [(now, j) for j in job_ids])

    def report(self, progress: dict[str, int], replica: str) -> list[str]:
        if not progress:
            return []
        now = time.time()
        with self.tx() as db:
            db.executemany("UPDATE jobs SET version = version + (state = 'queued' OR calls_done != :calls), "
                           "state = 'running', calls_done = :calls, replica = :replica, heartbeat_at = :now "
                           "WHERE id = :id AND finished_at IS NULL",
                           [{"id": j, "calls": c, "replica": replica, "now": now} for j, c in progress.items()])
            ids = list(progress)
            live = {r[0] for r in db.execute(f"SELECT id FROM jobs WHERE id IN ({', '.join('?' * len(ids))}) "
                                             "AND finished_at IS NULL AND cancel_requested = 0", ids)}
        return [j for j in ids if j not in live]

    def finish_job(self, job_id: str, state: str, calls_done: Optional[int] = None, result: Optional[dict] = None,
                   error: Optional[str] = None, cancel: Optional[dict] = None) -> bool:
        with self.tx() as db:
            return db.execute("UPDATE jobs SET state = ?, finished_at = ?, calls_done = COALESCE(?, calls_done), "
                              "result = ?, error = ?, cancel = ?, version = version + 1 WHERE id = ? AND finished_at IS NULL",
                              (state, time.time(), calls_done, result and json.dumps(result), error,
                               cancel and json.dumps(cancel), job_id)).rowcount == 1

    def limits_storage(self) -> MovingWindowSupport:
        return SQLiteWindows(self)

    def cache_get(self, key: str) -> Optional[bytes]:
        row = self.db().execute("SELECT value FROM cache WHERE key = ? AND expires_at > ?", (key, time.time())).fetchone()
        return row and row[0]

    def cache_put(self, key: str, value: bytes, ttl_s: float, max_entries: int) -> None:
        now = time.time()
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO cache VALUES (?, ?, ?)", (key, value, now + ttl_s))
            db.execute("DELETE FROM cache WHERE expires_at < ? OR key IN "
                       "(SELECT key FROM cache ORDER BY expires_at DESC LIMIT -1 OFFSET ?)", (now, max_entries))


class SQLiteWindows(Storage, MovingWindowSupport):
    """`limits`' moving window in SQL: a hit is a row (key, time, amount), and acquiring sums the window's
    rows and adds one in the same transaction, so two replicas never both take the last room."""
    STORAGE_SCHEME = None  # made by SQLiteStore, never from a URI

    def __init__(self, store: SQLiteStore):
        super().__init__()
        self.store = store

    @property
    def base_exceptions(self) -> type[Exception]:
        return sqlite3.Error

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        now = time.time()
        with self.store.tx() as db:
            db.execute("DELETE FROM hits WHERE key = ? AND at <= ?", (key, now - expiry))
            if db.execute("SELECT COALESCE(SUM(amount), 0) FROM hits WHERE key = ?", (key,)).fetchone()[0] + amount > limit:
                return False
            db.execute("INSERT INTO hits VALUES (?, ?, ?)", (key, now, amount))
        return True

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = time.time()
        start, used = self.store.db().execute("SELECT MIN(at), COALESCE(SUM(amount), 0) FROM hits WHERE key = ? AND at > ?",
                                              (key, now - expiry)).fetchone()
        return (now if start is None else start), used

    def check(self) -> bool:
        return self.store.db().execute("SELECT 1").fetchone() == (1,)

    def clear(self, key: str) -> None:
        with self.store.tx() as db:
            db.execute("DELETE FROM hits WHERE key = ?", (key,))

    def reset(self) -> Optional[int]:
        with self.store.tx() as db:
            return db.execute("DELETE FROM hits").rowcount

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        raise NotImplementedError("the moving window only")

    def get(self, key: str) -> int:
        raise NotImplementedError("the moving window only")

    def get_expiry(self, key: str) -> float:
        raise NotImplementedError("the moving window only")


# --- Redis -------------------------------------------------------------------------------------
# Keys under dtrain:<app>:  job:<id> a hash of the record; jobs a sorted set of every kept job (max_jobs);
# live the active ones by heartbeat; ended the finished ones by end; cache:<key> and cached (by expiry).
# Every check-and-add is one Lua script (atomic in Redis); ARGV[1] the prefix, ARGV[2] the time.

_FINISH = """
local p, now = ARGV[1], tonumber(ARGV[2])
local function finish(id, state, fields)
  local k = p .. 'job:' .. id
  if redis.call('EXISTS', k) == 0 or redis.call('HEXISTS', k, 'finished_at') == 1 then return 0 end
  redis.call('HSET', k, 'state', state, 'finished_at', ARGV[2], unpack(fields))
  redis.call('HINCRBY', k, 'version', 1)
  redis.call('ZREM', p .. 'live', id)
  redis.call('ZADD', p .. 'ended', now, id)
  return 1
end
"""
_CLEANUP = _FINISH + """
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'live', '-inf', '(' .. ARGV[3])) do
  finish(id, 'failed', {'error', ARGV[5]})
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'ended', '-inf', '(' .. ARGV[4])) do
  redis.call('DEL', p .. 'job:' .. id)
  redis.call('ZREM', p .. 'ended', id)
  redis.call('ZREM', p .. 'jobs', id)
end
"""
CLEANUP = _CLEANUP + "return 1"  # ARGV: prefix, now, stale before, expired before, reason
CREATE = _CLEANUP + """
if redis.call('ZCARD', p .. 'jobs') >= tonumber(ARGV[6]) then return 0 end
redis.call('HSET', p .. 'job:' .. ARGV[7], 'owner', ARGV[8], 'steps', ARGV[9], 'calls', ARGV[10], 'state', 'queued',
           'calls_done', 0, 'cancel_requested', 0, 'created_at', ARGV[2], 'version', 0)
redis.call('ZADD', p .. 'jobs', now, ARGV[7])
redis.call('ZADD', p .. 'live', now, ARGV[7])
return 1
"""  # ARGV 6..10: max_jobs, id, owner, steps, calls
CANCEL = _FINISH + """
local k = p .. 'job:' .. ARGV[3]
local v = redis.call('HMGET', k, 'finished_at', 'cancel_requested', 'state')
if redis.call('EXISTS', k) == 0 or v[1] or v[2] == '1' then return 0 end
redis.call('HSET', k, 'cancel_requested', 1)
if v[3] == 'queued' then return finish(ARGV[3], 'cancelled', {'cancel', ARGV[4]}) end
return redis.call('HINCRBY', k, 'version', 1)
"""  # ARGV 3..4: id, the cancel record of a job never started
REPORT = """
local p, now, stop = ARGV[1], tonumber(ARGV[2]), {}
for i = 4, #ARGV, 2 do
  local id, calls = ARGV[i], ARGV[i + 1]
  local k = p .. 'job:' .. id
  local v = redis.call('HMGET', k, 'state', 'calls_done', 'cancel_requested', 'finished_at')
  if v[1] and not v[4] then
    if v[1] == 'queued' or v[2] ~= calls then
      redis.call('HSET', k, 'state', 'running', 'calls_done', calls, 'replica', ARGV[3])
      redis.call('HINCRBY', k, 'version', 1)
    end
    redis.call('ZADD', p .. 'live', now, id)
  end
  if not v[1] or v[4] or v[3] == '1' then stop[#stop + 1] = id end
end
return stop
"""  # ARGV 3: the replica, then job id and calls pairs
FINISH = _FINISH + """
local fields = {}
for i, name in ipairs({'calls_done', 'result', 'error', 'cancel'}) do
  if ARGV[4 + i] ~= '' then fields[#fields + 1] = name; fields[#fields + 1] = ARGV[4 + i] end
end
return finish(ARGV[3], ARGV[4], fields)
"""  # ARGV 3..8: id, state, calls_done, result, error, cancel ('' for none)
CACHE_PUT = """
local p, now = ARGV[1], tonumber(ARGV[2])
redis.call('SET', p .. 'cache:' .. ARGV[3], ARGV[4], 'PX', math.ceil(1000 * tonumber(ARGV[5])))
redis.call('ZADD', p .. 'cached', now + tonumber(ARGV[5]), ARGV[3])
redis.call('ZREMRANGEBYSCORE', p .. 'cached', '-inf', now)
local over = redis.call('ZCARD', p .. 'cached') - tonumber(ARGV[6])
if over > 0 then
  local gone = redis.call('ZPOPMIN', p .. 'cached', over)
  for i = 1, #gone, 2 do redis.call('DEL', p .. 'cache:' .. gone[i]) end
end
return 1
"""  # ARGV 3..6: key, value, ttl_s, max_entries
_INTS, _FLOATS = ("steps", "calls", "calls_done", "version"), ("created_at", "finished_at")


class RedisStore(Store):
    def __init__(self, url: str, app: str, job_ttl_s: float, heartbeat_timeout_s: float):
        import redis

        super().__init__(job_ttl_s, heartbeat_timeout_s)
        self.errors = (redis.RedisError,)
        self.url, self.prefix = url, f"dtrain:{app}:"
        self.redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)  # a dead server: 5 s, not forever
        self.scripts = {name: self.redis.register_script(src) for name, src in
                        (("cleanup", CLEANUP), ("create", CREATE), ("cancel", CANCEL), ("report", REPORT),
                         ("finish", FINISH), ("cache_put", CACHE_PUT))}
        self.redis.ping()  # an unreachable server fails here, at the replica's start

    def _run(self, script: str, *args) -> object:
        return self.scripts[script](args=[self.prefix, repr(time.time()), *args])

    def _read(self, job_id: str, with_result: bool) -> tuple[Optional[dict], float]:
        fields = (*COLUMNS[1:], "result")
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(self.prefix + "job:" + job_id, fields)
        pipe.zscore(self.prefix + "live", job_id)
        values, beat = pipe.execute()
        if values[0] is None:
            return None, 0.0
        rec = {"job_id": job_id, **{f: v and v.decode() for f, v in zip(fields, values)}}
        for f in _INTS:
            rec[f] = int(rec[f])
        for f in _FLOATS:
            rec[f] = rec[f] and float(rec[f])
        rec["cancel"] = rec["cancel"] and json.loads(rec["cancel"])
        result = rec.pop("result")
        if with_result:
            rec["result"] = result and json.loads(result)
        return rec, beat or 0.0

    def cleanup(self) -> None:
        now = time.time()
        self._run("cleanup", repr(now - self.timeout_s), repr(now - self.ttl_s), lost_heartbeat(self.timeout_s))

    def create_job(self, job_id: str, owner: str, steps: int, calls: int, max_jobs: int) -> Optional[dict]:
        now = time.time()
        made = self.scripts["create"](args=[self.prefix, repr(now), repr(now - self.timeout_s), repr(now - self.ttl_s),
                                            lost_heartbeat(self.timeout_s), max_jobs, job_id, owner, steps, calls])
        return self._new(job_id, owner, steps, calls, now) if made else None

    def cancel_job(self, job_id: str, owner: str) -> Optional[dict]:
        if self.get_job(job_id, owner, False) is None:  # also fails it first if stale
            return None
        self._run("cancel", job_id, json.dumps({"seen_at_step": 0, "last_step": 0}))
        return self.get_job(job_id, owner, False)

    def heartbeat(self, job_ids: list[str]) -> None:
        if job_ids:  # XX: only the active jobs are in `live`
            self.redis.zadd(self.prefix + "live", {j: time.time() for j in job_ids}, xx=True)

    def report(self, progress: dict[str, int], replica: str) -> list[str]:
        return [j.decode() for j in self._run("report", replica, *[x for jc in progress.items() for x in jc])]

    def finish_job(self, job_id: str, state: str, calls_done: Optional[int] = None, result: Optional[dict] = None,
                   error: Optional[str] = None, cancel: Optional[dict] = None) -> bool:
        return self._run("finish", job_id, state, "" if calls_done is None else calls_done,
                         json.dumps(result) if result else "", error or "", json.dumps(cancel) if cancel else "") == 1

    def limits_storage(self) -> MovingWindowSupport:
        from limits.storage import RedisStorage

        return RedisStorage(self.url, key_prefix=self.prefix + "quota", socket_timeout=5, socket_connect_timeout=5)

    def cache_get(self, key: str) -> Optional[bytes]:
        return self.redis.get(self.prefix + "cache:" + key)

    def cache_put(self, key: str, value: bytes, ttl_s: float, max_entries: int) -> None:
        self._run("cache_put", key, value, repr(ttl_s), max_entries)

"""Where a sequence's state lives between its steps (`--state-store`).

- `memory` (the default): in the SequenceManager's own process memory, as
  always. Nothing is written anywhere else; a restart forgets the sequences.
- `redis://HOST:PORT/DB` (Redis or Valkey): every step's new state is written
  through to Redis before the step is answered, so any replica can serve any
  step and a sequence outlives a drain, a restart or a crash of the replica
  that ran it. The replica keeps its copy in memory too, as a cache.

One record per sequence, key `rnnserve:seq:<model>:<id>`, a Redis hash with
two fields: `tok`, a token that changes on every write, and `data`, the record
(SeqRecord: model and version, the state tensors by input name as raw bytes
with dtype and shape, the id of the last applied step and, when that step
carried an id, its answer). The key expires after the idle timeout; each
write renews it.

Writes are compare-and-set on `tok` (one Lua script call per sequence, all of
one batch run in one pipeline, so one round trip per run): a replica that
computed a step from a stale copy (another replica has since moved the
sequence on) finds a different token, throws its result away, reloads and
runs the step again. A missing key is written unconditionally: the replica's
copy is then the only one (Redis restarted empty), and it repopulates Redis.

The store is called from the engine's threads (loads on a small pool, writes
on the batcher's completion thread), never from a request's own thread.
"""
from __future__ import annotations

import itertools
import json
import logging
import struct
import threading
import uuid
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from rnnserve.serve.engine.promise import Promise
from rnnserve.serve.errors import Unavailable

log = logging.getLogger(__name__)

MEMORY = "memory"
KEY_PREFIX = "rnnserve:seq:"
CONNECT_TIMEOUT_S = 1.0   # a Redis that is down answers "unavailable" within these, never hangs
IO_TIMEOUT_S = 2.0
LOAD_THREADS = 4

# KEYS[1] the record; ARGV: expected token ('*' = any), new token, data, ttl ms. 1 = written.
_CAS = """
local cur = redis.call('HGET', KEYS[1], 'tok')
if cur and ARGV[1] ~= '*' and cur ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'tok', ARGV[2], 'data', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""


@dataclass
class SeqRecord:
    """What the store keeps of one sequence."""
    model: str
    version: str
    batch: int                                    # rows of each step
    step: int                                     # id of the last applied step
    states: dict[str, np.ndarray] = field(default_factory=dict)   # state input name -> array; {} once ended
    answer: dict[str, np.ndarray] | None = None   # the last step's outputs, kept when it carried an id
    digest: str = ""                              # of the last step's inputs (a repeat must match)
    ended: bool = False
    token: str = ""                               # the store's write token (set by load / commit)


@dataclass
class Write:
    key: Hashable                 # the sequence id
    expect: str                   # the token this replica last saw ('*' = overwrite: a START)
    record: SeqRecord
    written: bool = False         # set by commit: False = another replica moved the sequence on
    error: BaseException | None = None


def _pack(arrays: Mapping[str, np.ndarray]) -> tuple[list, list[bytes]]:
    heads, blobs = [], []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        heads.append([name, a.dtype.str, list(a.shape)])
        blobs.append(a.tobytes())
    return heads, blobs


def encode(rec: SeqRecord) -> bytes:
    """The record as one blob: a 4-byte header length, a JSON header, then the raw tensors."""
    states, sblobs = _pack(rec.states)
    answer, ablobs = _pack(rec.answer) if rec.answer is not None else (None, [])
    head = json.dumps({"model": rec.model, "version": rec.version, "batch": rec.batch, "step": rec.step,
                       "ended": rec.ended, "digest": rec.digest, "states": states, "answer": answer}).encode()
    return b"".join([struct.pack("<I", len(head)), head, *sblobs, *ablobs])


def decode(blob: bytes, token: str = "") -> SeqRecord:
    (n,) = struct.unpack_from("<I", blob)
    head = json.loads(blob[4:4 + n])
    pos = 4 + n

    def arrays(heads) -> dict[str, np.ndarray]:
        nonlocal pos
        out = {}
        for name, dtype, shape in heads:
            dt = np.dtype(dtype)
            size = dt.itemsize * int(np.prod(shape, dtype=np.int64))
            out[name] = np.frombuffer(blob, dt, int(np.prod(shape, dtype=np.int64)), pos).reshape(shape).copy()
            pos += size
        return out

    states = arrays(head["states"])
    answer = arrays(head["answer"]) if head["answer"] is not None else None
    return SeqRecord(head["model"], head["version"], head["batch"], head["step"], states, answer, head["digest"],
                     head["ended"], token)


class StateStore:
    """What the SequenceManager needs of a store. `shared`: other processes see its records
    (load them when a sequence is not held here; write each step through)."""
    shared = False
    url = MEMORY

    def ping(self) -> None:
        """Raise Unavailable unless the store answers."""

    def load(self, model: str, seq_id: Hashable) -> SeqRecord | None:
        return None

    def load_async(self, model: str, seq_id: Hashable) -> Future:
        """load() off the caller's thread: a Future of the record or None."""
        fut: Future = Promise()
        fut.set_result(self.load(model, seq_id))
        return fut

    def commit(self, model: str, writes: Sequence[Write], ttl_s: float) -> None:
        """Store every write (set each one's written / error)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class MemoryStore(StateStore):
    """The embedded default: the SequenceManager's memory is the only copy."""

    def commit(self, model: str, writes: Sequence[Write], ttl_s: float) -> None:
        for w in writes:
            w.written = True


class RedisStore(StateStore):
    """Redis or Valkey, through the `redis` package's synchronous client and its connection pool."""
    shared = True

    def __init__(self, url: str, pool_size: int = 16) -> None:
        # only a server with a Redis store loads the package
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = _without_password(url)   # the form messages and logs show
        self._errors = (redis.RedisError, OSError)
        self._redis = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                           socket_timeout=IO_TIMEOUT_S, retry=Retry(NoBackoff(), 0),
                                           max_connections=pool_size)
        self._writer = uuid.uuid4().hex[:12] + ":"   # tokens: this process's id and a count
        self._writes = itertools.count()
        self._sha: str | None = None   # the CAS script, loaded on first use and after a Redis restart
        self._loader = ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="statestore-load")

    @staticmethod
    def key(model: str, seq_id: Hashable) -> str:
        kind = "i" if isinstance(seq_id, int) else "s"   # 5 and "5" are different sequences
        return f"{KEY_PREFIX}{model}:{kind}:{seq_id}"

    def _unavailable(self, e: BaseException) -> Unavailable:
        return Unavailable(f"the sequence state store ({self.url}) is unreachable: {e}; "
                           "the step was not applied, retry it")

    def ping(self) -> None:
        """Raise Unavailable unless the store answers (checked at start-up)."""
        try:
            self._redis.ping()
        except self._errors as e:
            raise self._unavailable(e) from None

    def load(self, model: str, seq_id: Hashable) -> SeqRecord | None:
        try:
            tok, data = cast(list, self._redis.hmget(self.key(model, seq_id), ["tok", "data"]))
        except self._errors as e:
            raise self._unavailable(e) from None
        return None if data is None or tok is None else decode(bytes(data), bytes(tok).decode())

    def load_async(self, model: str, seq_id: Hashable) -> Future:
        return self._loader.submit(self.load, model, seq_id)

    def commit(self, model: str, writes: Sequence[Write], ttl_s: float) -> None:
        """Compare-and-set every write in one pipeline (one round trip); sets each Write's
        written/error and, when written, its record's new token."""
        import redis

        ttl_ms = max(1, int(ttl_s * 1000))
        tokens = [f"{self._writer}{next(self._writes)}" for _ in writes]
        blobs = [encode(w.record) for w in writes]
        results = None
        try:
            for attempt in (1, 2):
                if self._sha is None:
                    self._sha = self._redis.script_load(_CAS)
                pipe = self._redis.pipeline(transaction=False)
                for w, tok, blob in zip(writes, tokens, blobs):
                    pipe.evalsha(self._sha, 1, self.key(model, w.key), w.expect, tok, blob, ttl_ms)
                try:
                    results = pipe.execute()
                    break
                except redis.exceptions.NoScriptError:   # Redis restarted: load the script again
                    self._sha = None
                    if attempt == 2:
                        raise
        except self._errors as e:
            err = self._unavailable(e)
            for w in writes:
                w.error = err
            return
        assert results is not None   # the loop either set it or raised
        for w, tok, ok in zip(writes, tokens, results):
            w.written = ok == 1
            if w.written:
                w.record.token = tok

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._redis.close()


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"***@{netloc}"))


def open_store(url: str) -> StateStore:
    """`memory` or `redis://HOST:PORT/DB`; ValueError for anything else."""
    if url == MEMORY:
        return MemoryStore()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url)
    raise ValueError(f"--state-store must be 'memory' or redis://HOST:PORT/DB, got {url[:80]!r}")


_opened: dict[str, StateStore] = {}
_opened_lock = threading.Lock()


def shared_store(url: str) -> StateStore:
    """One store (one connection pool) per URL in this process, shared by every model version."""
    with _opened_lock:
        if url not in _opened:
            _opened[url] = open_store(url)
        return _opened[url]

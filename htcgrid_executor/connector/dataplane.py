"""The data plane: where task inputs, submission payloads and outputs live, under the keys of
:mod:`htcgrid_executor.wire`.

One small interface, :class:`DataPlane`, three implementations (``grid_storage_service``):

* ``REDIS``: :class:`RedisStore`. Each batch is one round trip (a pipeline of MSET/MGET/DEL chunks).
* ``S3``: :class:`S3Store`. One object per key in the bucket, the same key names; a batch runs its
  requests in parallel on a small thread pool that :meth:`S3Store.close` shuts down.
* ``S3+REDIS``: :class:`LayeredStore`. Writes go to both, reads come from Redis and fall back to
  S3 for keys Redis does not have (evicted under memory pressure, as a deployment's Redis is
  configured to do).

Errors of redis and botocore are translated here: a store that cannot be reached raises
:class:`GridUnavailableError`, one that refuses or fails an operation raises :class:`StorageError` (:class:`StorageFullError` when
Redis refuses writes: OOM, MISCONF), always with the original as ``__cause__``. Values are never logged.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from ..backoff import time_left
from ..errors import ConfigurationError, GridUnavailableError, StorageError, StorageFullError
from ..wire import REDIS_PIECE_BYTES
from .aws_errors import boto_error_code
from .config import ClientConfig
from .redis_budget import within_budget

__all__ = [
    "DataPlane",
    "RedisStore",
    "S3Store",
    "LayeredStore",
    "redis_connection_kwargs",
    "make_store",
    "REDIS_DEFAULT_PORT",
]

logger = logging.getLogger(__name__)

REDIS_DEFAULT_PORT = 6379

# Keys per MSET/MGET/DEL command inside one pipeline: one huge command would make Redis build one
# huge reply and block every other client meanwhile; chunks keep each command short while the
# whole batch still travels in one round trip.
_REDIS_CHUNK = 500
# S3 DeleteObjects takes at most 1000 keys per request.
_S3_DELETE_CHUNK = 1000


class DataPlane:
    """Interface of a data-plane store. Thread-safe: the executor writes from its submitting
    thread while its poller reads."""

    def put_many(self, items: Mapping[str, bytes], *, expire_sec: float | None = None) -> None:
        """Write every ``key -> value``; returns when all are stored. Raises StorageError or
        GridUnavailableError (some keys may then have been written). ``expire_sec``: the keys
        expire after that long where the store can say so per key (Redis); S3 keeps them until
        a lifecycle rule of the bucket removes them."""
        raise NotImplementedError

    def create_many(self, items: Mapping[str, bytes]) -> set[str]:
        """Write each ``key -> value`` whose key does not exist yet, each key as one atomic step
        (Redis ``SET NX``, S3 ``If-None-Match: *``): the keys written. A key another writer
        created first keeps its value. Raises as :meth:`put_many`."""
        raise NotImplementedError

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Read ``keys``; the result is parallel to ``keys``, None for a key that does not exist."""
        raise NotImplementedError

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete ``keys``; keys that do not exist are ignored."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections and threads. Repeatable."""

    def __enter__(self) -> DataPlane:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- Redis


def redis_connection_kwargs(url: str, password: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``redis.Redis`` from a config's ``redis_url``.

    ``redis://``, ``rediss://`` (TLS) and ``unix://`` URLs are taken as redis-py parses them. A
    bare host name (what a deployment writes: an ElastiCache endpoint), optionally ``host:port``,
    means TLS on port 6379. ``password`` (config key ``redis_password``) is used unless the URL
    carries one. Raises ConfigurationError naming ``redis_url`` for a malformed URL.
    """
    from redis.connection import parse_url

    if "://" in url:
        try:
            kwargs = parse_url(url)
        except ValueError as exc:
            raise ConfigurationError(f"config key 'redis_url' is not a Redis URL: {exc}") from exc
    else:
        host, sep, port_text = url.rpartition(":")
        if not sep:
            host, port_text = url, ""
        if not host or "/" in host:
            raise ConfigurationError(f"config key 'redis_url' is not a host name or Redis URL: {url!r}")
        try:
            port = int(port_text) if port_text else REDIS_DEFAULT_PORT
        except ValueError:
            raise ConfigurationError(f"config key 'redis_url' has a bad port: {url!r}") from None
        kwargs = {"host": host, "port": port, "ssl": True}
    if password and "password" not in kwargs:
        kwargs["password"] = password
    return kwargs


@contextlib.contextmanager
def _redis_errors(what: str) -> Iterator[None]:
    """Translate redis-py's errors (RedisError and OSError subclasses) of one operation, ``what``
    ("write 3 keys"), into the package's tree."""
    import redis.exceptions as rex

    try:
        yield
    # AuthenticationError is a ConnectionError subclass in redis-py: a refused password is not an
    # unreachable server, so it is checked first.
    except (rex.AuthenticationError, rex.AuthorizationError) as exc:
        raise StorageError(f"data plane (Redis) refused the credentials while trying to {what}: {exc}") from exc
    except Exception as exc:
        full = isinstance(exc, rex.OutOfMemoryError)
        if full or str(exc).startswith(("MISCONF ", "OOM ")):
            raise StorageFullError(f"data plane (Redis) refuses writes, full memory or disk, while trying to "
                                   f"{what}: {'OOM ' if full else ''}{exc}") from exc
        if isinstance(exc, (rex.ConnectionError, rex.TimeoutError, OSError)):
            raise GridUnavailableError(f"data plane (Redis) unreachable while trying to {what}: {exc}") from exc
        raise StorageError(f"data plane (Redis) failed to {what}: {exc}") from exc


class RedisStore(DataPlane):
    """The data plane on Redis; each call is one round trip whatever the number of keys."""

    def __init__(self, url: str, *, password: str | None = None, socket_timeout: float = 30.0,
                 connect_timeout: float = 10.0) -> None:
        import redis

        kwargs = redis_connection_kwargs(url, password)
        kwargs.setdefault("socket_timeout", socket_timeout)
        kwargs.setdefault("socket_connect_timeout", connect_timeout)
        # A few quick retries ride out a blip or a failover; redis-py's defaults differ between
        # versions (none before 6, about 3 s of backoff since), so they are set here. Retries and
        # socket timeouts stop at the caller's budget (the executor's broken_after_sec).
        kwargs = within_budget(kwargs, retries=3)
        self._client = redis.Redis(connection_pool=redis.ConnectionPool(**kwargs))
        self._where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port', REDIS_DEFAULT_PORT)}"

    def __repr__(self) -> str:
        return f"RedisStore({self._where})"

    @property
    def client(self) -> Any:
        """The underlying ``redis.Redis`` (for tests and tools)."""
        return self._client

    def put_many(self, items: Mapping[str, bytes], *, expire_sec: float | None = None) -> None:
        if not items:
            return
        pairs = [(k, v) for k, v in items.items() if len(v) <= REDIS_PIECE_BYTES]
        big = [(k, v) for k, v in items.items() if len(v) > REDIS_PIECE_BYTES]
        with _redis_errors(f"write {len(items)} keys"):
            pipe = self._client.pipeline(transaction=False)
            if expire_sec is None:
                for start in range(0, len(pairs), _REDIS_CHUNK):
                    pipe.mset(dict(pairs[start:start + _REDIS_CHUNK]))
            else:
                for key, value in pairs:  # MSET sets no expiry: one SET PX each, same round trip
                    pipe.set(key, value, px=max(1, int(expire_sec * 1000)))
            if pairs:
                pipe.execute()
            for key, value in big:  # nobody reads a key before put_many returns (then it is whole)
                self._put_in_pieces(key, value, expire_sec)
        logger.debug("redis %s: wrote %d keys", self._where, len(items))

    def create_many(self, items: Mapping[str, bytes]) -> set[str]:
        if not items:
            return set()
        keys = list(items)
        with _redis_errors(f"create {len(keys)} keys"):
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.set(key, items[key], nx=True)
            written = pipe.execute()
        return {key for key, ok in zip(keys, written, strict=True) if ok}

    def _put_in_pieces(self, key: str, value: bytes, expire_sec: float | None) -> None:
        view = memoryview(value)
        ttl = {} if expire_sec is None else {"px": max(1, int(expire_sec * 1000))}
        self._client.set(key, view[:REDIS_PIECE_BYTES], **ttl)
        for start in range(REDIS_PIECE_BYTES, len(view), REDIS_PIECE_BYTES):
            # one round trip each: a pipeline would pack every piece into memory at once
            self._client.append(key, view[start:start + REDIS_PIECE_BYTES])

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        keys = list(keys)
        if not keys:
            return []
        with _redis_errors(f"read {len(keys)} keys"):
            pipe = self._client.pipeline(transaction=False)
            for start in range(0, len(keys), _REDIS_CHUNK):
                pipe.mget(keys[start:start + _REDIS_CHUNK])
            chunks = pipe.execute()
        return [value for chunk in chunks for value in chunk]

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if not keys:
            return
        with _redis_errors(f"delete {len(keys)} keys"):
            pipe = self._client.pipeline(transaction=False)
            for start in range(0, len(keys), _REDIS_CHUNK):
                pipe.delete(*keys[start:start + _REDIS_CHUNK])
            pipe.execute()

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # closing a broken connection must not hide the error that broke it
            logger.debug("redis %s: error while closing", self._where, exc_info=True)


# ------------------------------------------------------------------------------------------------ S3


@contextlib.contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """Translate botocore's errors of one S3 operation, ``what``, into the package's tree (the
    package's own errors, raised inside, pass unchanged)."""
    from botocore.exceptions import ConnectionError as BotoConnectionError

    try:
        yield
    except (GridUnavailableError, StorageError):
        raise
    except (BotoConnectionError, OSError) as exc:
        raise GridUnavailableError(f"data plane (S3) unreachable while trying to {what}: {exc}") from exc
    except Exception as exc:
        raise StorageError(f"data plane (S3) failed to {what}: {exc}") from exc


class S3Store(DataPlane):
    """The data plane on S3: one object per key in ``bucket``.

    A batch runs up to ``max_workers`` requests at once on a thread pool created on first use
    (threads named ``htcgrid-s3``) and shut down by :meth:`close`. ``kms_key_id`` (config key
    ``s3_kms_key_id``) asks for SSE-KMS, as a deployment's bucket policy may require.
    """

    def __init__(self, bucket: str, *, region: str | None = None, kms_key_id: str | None = None,
                 max_workers: int = 16, client: Any = None, endpoint_url: str | None = None) -> None:
        self.bucket = bucket
        self._kms_key_id = kms_key_id
        self._max_workers = max(1, max_workers)
        if client is None:
            import boto3
            from botocore.config import Config

            # one pooled connection per worker thread, and botocore's own retries for throttling
            config = Config(max_pool_connections=self._max_workers, retries={"mode": "standard"})
            # endpoint_url None lets botocore honour AWS_ENDPOINT_URL(_S3) as usual
            client = boto3.client("s3", region_name=region, config=config, endpoint_url=endpoint_url)
        self._client = client
        self._lock = threading.Lock()  # guards _pool creation and shutdown
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._abandoned = False  # a call left running past a budget: close() does not wait for it

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r})"

    def _map(self, fn: Any, items: list[Any]) -> list[Any]:
        """``fn`` over ``items`` on the pool. Inside a caller's budget (``spend_until``: the
        executor's ``broken_after_sec``) the caller waits no longer than what is left, whatever
        botocore's own timeouts and retries would take, and gets ``GridUnavailableError``."""
        left = time_left()
        if len(items) == 1 and left is None:  # no thread hop for the common single-key call
            return [fn(items[0])]
        with self._lock:
            if self._closed:
                raise StorageError("data plane (S3) store is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._max_workers, thread_name_prefix="htcgrid-s3")
            pool = self._pool
        if left is None:
            return list(pool.map(fn, items))
        futures = [pool.submit(fn, item) for item in items]
        done, late = wait(futures, timeout=left)
        if late:
            for future in late:
                future.cancel()  # those not started never start; a started one ends at botocore's limits
            self._abandoned = True
            raise GridUnavailableError(f"data plane (S3) bucket {self.bucket!r} did not answer within the "
                                       f"{left:.1f} s left of the caller's budget")
        return [future.result() for future in futures]

    def _put_object(self, key: str, value: bytes, **condition: str) -> None:
        encryption = ({"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self._kms_key_id}
                      if self._kms_key_id else {})
        self._client.put_object(Bucket=self.bucket, Key=key, Body=value, **condition, **encryption)

    def _put_one(self, item: tuple[str, bytes]) -> None:
        self._put_object(*item)

    def _create_one(self, item: tuple[str, bytes]) -> bool:
        try:
            self._put_object(*item, IfNoneMatch="*")
        except Exception as exc:
            # 412: the key exists; 409: another conditional write of it is under way (it wins)
            if boto_error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise
        return True

    def _get_one(self, key: str) -> bytes | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            # S3 answers AccessDenied, not NoSuchKey, for a missing key when the caller may not
            # list the bucket: that one surfaces as a StorageError naming the cause.
            if boto_error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        body = response["Body"]
        try:
            return body.read()
        finally:
            body.close()

    def put_many(self, items: Mapping[str, bytes], *, expire_sec: float | None = None) -> None:
        if not items:
            return
        with _s3_errors(f"write {len(items)} keys to bucket {self.bucket!r}"):
            self._map(self._put_one, list(items.items()))  # no expiry per object on S3
        logger.debug("s3 %s: wrote %d keys", self.bucket, len(items))

    def create_many(self, items: Mapping[str, bytes]) -> set[str]:
        if not items:
            return set()
        pairs = list(items.items())
        with _s3_errors(f"create {len(pairs)} keys in bucket {self.bucket!r}"):
            written = self._map(self._create_one, pairs)
        return {key for (key, _), ok in zip(pairs, written, strict=True) if ok}

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        keys = list(keys)
        if not keys:
            return []
        with _s3_errors(f"read {len(keys)} keys from bucket {self.bucket!r}"):
            return self._map(self._get_one, keys)

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        with _s3_errors(f"delete {len(keys)} keys from bucket {self.bucket!r}"):
            for start in range(0, len(keys), _S3_DELETE_CHUNK):
                chunk = keys[start:start + _S3_DELETE_CHUNK]
                answer = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True},
                )
                errors = answer.get("Errors") or []
                if errors:
                    first = errors[0]
                    raise StorageError(
                        f"data plane (S3) could not delete {len(errors)} keys from bucket {self.bucket!r}: "
                        f"{first.get('Code')}: {first.get('Message')}"
                    )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            # a call abandoned at a caller's deadline ends at botocore's own timeouts, on its thread
            pool.shutdown(wait=not self._abandoned, cancel_futures=True)


# ------------------------------------------------------------------------------------------- layered


class LayeredStore(DataPlane):
    """``S3+REDIS``: write to both stores, read from ``cache`` (Redis) first and from ``backing``
    (S3) for the keys the cache does not have. Deletes go to both."""

    def __init__(self, cache: DataPlane, backing: DataPlane) -> None:
        self.cache = cache
        self.backing = backing

    def __repr__(self) -> str:
        return f"LayeredStore({self.cache!r} over {self.backing!r})"

    def put_many(self, items: Mapping[str, bytes], *, expire_sec: float | None = None) -> None:
        # S3 first: once a key is in the durable store, a failure writing the cache loses nothing
        # a reader cannot find through the fallback.
        self.backing.put_many(items, expire_sec=expire_sec)
        self.cache.put_many(items, expire_sec=expire_sec)

    def create_many(self, items: Mapping[str, bytes]) -> set[str]:
        """In the cache alone: a key created in two stores could be won by different writers in
        each. (The deployment guard keeps its run markers in Redis where there is one.)"""
        return self.cache.create_many(items)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        keys = list(keys)
        try:
            values = self.cache.get_many(keys)
        except GridUnavailableError:
            # The cache is down: everything is in S3 too. (A refusal, StorageError, is raised:
            # a wrong Redis password should not silently turn every read into an S3 read.)
            logger.warning("data plane: Redis unreachable, reading %d keys from S3", len(keys))
            return self.backing.get_many(keys)
        missing = [i for i, value in enumerate(values) if value is None]
        if missing:
            found = self.backing.get_many([keys[i] for i in missing])
            for i, value in zip(missing, found, strict=True):
                values[i] = value
        return values

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self.cache.delete_many(keys)
        self.backing.delete_many(keys)

    def close(self) -> None:
        try:
            self.cache.close()
        finally:
            self.backing.close()


def make_store(config: ClientConfig) -> DataPlane:
    """The store a config's ``grid_storage_service`` names. Connects lazily (nothing is contacted
    until the first read or write)."""
    redis_store = s3_store = None
    if config.uses_redis:
        assert config.redis_url is not None  # checked by ClientConfig
        redis_store = RedisStore(config.redis_url, password=config.redis_password)
    if config.uses_s3:
        assert config.s3_bucket is not None
        s3_store = S3Store(config.s3_bucket, region=config.region, kms_key_id=config.s3_kms_key_id)
    if redis_store is not None and s3_store is not None:
        return LayeredStore(redis_store, s3_store)
    store = redis_store or s3_store
    assert store is not None
    return store

"""What the tasks of one executor share in a runner process: the scoped unpickler of their
pickles (see :class:`Scope`) and the cache of shared objects (``HTCGridExecutor.share``).

The worker side of the task codec (:mod:`htcgrid_executor.codec`); imports only the standard
library, cloudpickle and this package's pure modules (``redis``/``boto3`` lazily, for a shared
object on a deployment).
"""

from __future__ import annotations

import builtins
import functools
import io
import json
import os
import pickle
import threading
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .errors import PayloadError
from .payload import (
    PAYLOAD_KEY_ENV,
    SignedPickle,
    loads_signed,
    missing_module_message,
    signing_key_from_env,
    verify_bytes,
)
from .wire import shared_key

__all__ = ["Scope", "scope_named", "cache_key", "SHARED_CONTEXT_PREFIX", "shared_object"]

class Scope:
    """What the tasks of one executor share in a runner process, as a ProcessPoolExecutor's
    worker shares it between the initializer and the calls: the globals of the client's modules
    sent by value (its script's ``__main__`` above all), the initializers that ran, and the
    functions unpickled.

    cloudpickle gives each pickle its own copy of a by-value module's globals, so an initializer
    that sets ``global MODEL`` in the script would set it in a copy no task reads. Here every
    by-value function of a task of this executor is bound to one namespace per module (per
    ``__name__`` and ``__file__``): the first pickle that names a global supplies its value, and
    what the user's code assigns later stays (a later pickle's copy of the client's value does not
    overwrite it), which is what a worker process that imported or forked the script sees.
    """

    def __init__(self) -> None:
        self.namespaces: dict[tuple[str, str | None], dict[str, Any]] = {}
        self._namespace_ids: set[int] = set()
        self.initialized: set[str] = set()  # initializer blobs that ran (once per runner, as PPE)
        # Unpickled callables by the exact text of their signed pickle: every task of a map
        # carries the same text, so it is unpickled (and verified) once. The text is the key, not
        # its MAC alone, so a hit means these exact bytes were verified before. Bounded.
        self.functions: OrderedDict[str, Callable[..., Any]] = OrderedDict()

    def load_call(self, task: dict[str, Any], key: str) -> tuple[Any, Callable[..., Any], Any]:
        """``(initializer pair or None, function, arguments)`` of a task whose seal was checked:
        every signature is checked before anything is unpickled. The pair is None when the task
        has no initializer or its initializer ran in this scope already. Raises SignatureError
        (nothing unpickled), PayloadError (a pickle that cannot be loaded)."""
        init, fn_text = task.get("init"), task["fn"]
        init_data = None if init is None or init in self.initialized else verify_bytes(init, key)
        fn = self.functions.get(fn_text)
        # the function is signed for its scope: a task moved into another scope is refused
        fn_data = verify_bytes(fn_text, key, task.get("scope", "")) if fn is None else None
        args_data = verify_bytes(task["args"], key)
        pair = None if init_data is None else self.unpickle(init_data)
        if fn_data is not None:
            # not checked for being callable: calling it raises TypeError ("'int' object is not
            # callable") as the call's own exception, as in a process pool
            fn = self.functions[cache_key(fn_text)] = self.unpickle(fn_data)
            if len(self.functions) > _FUNCTION_CACHE_SIZE:
                self.functions.popitem(last=False)
        else:
            self.functions.move_to_end(fn_text)
        return pair, fn, self.unpickle(args_data)

    def unpickle(self, data: bytes) -> Any:
        """Unpickle verified ``data``, binding by-value functions to this scope's namespaces."""
        try:
            if len(data) <= _SMALL_PICKLE:
                # one copy of a small pickle costs less than the Python-level reads of a view; and
                # one that names nothing of cloudpickle has no by-value function to bind here, so
                # the C unpickler loads it as the scoped one would
                small = bytes(data)
                return pickle.loads(small) if b"cloudpickle" not in small \
                    else _ScopedUnpickler(io.BytesIO(small), self).load()
            return _ScopedUnpickler(_ViewReader(data), self).load()
        except ModuleNotFoundError as exc:
            raise PayloadError(missing_module_message(exc)) from exc
        except Exception as exc:  # unpickling can raise anything (broken __setstate__, ...)
            raise PayloadError(f"cannot unpickle payload: {exc}") from exc

    def namespace_for(self, base_globals: dict[str, Any]) -> dict[str, Any]:
        name = base_globals.get("__name__")
        if not isinstance(name, str):
            return base_globals  # nothing says which module: cloudpickle's own copy
        where = (name, base_globals.get("__file__"))
        namespace = self.namespaces.get(where)
        if namespace is None:
            namespace = self.namespaces[where] = {}
            self._namespace_ids.add(id(namespace))
        for item, value in base_globals.items():
            namespace.setdefault(item, value)
        return namespace

    def owns(self, namespace: dict[str, Any]) -> bool:
        return id(namespace) in self._namespace_ids


def cache_key(blob: Any) -> Any:
    """``blob`` as a key of a scope's caches: a raw input's pickle copied out of it (a view would
    keep the whole input, the call's arguments with it, alive as long as the cache)."""
    return blob.detached() if isinstance(blob, SignedPickle) else blob


class _ViewReader:
    """The file an unpickler reads ``data`` from, without the copy ``io.BytesIO`` makes of a
    memoryview: a big buffer (a numpy array's bytes) is copied once, straight into its object."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else min(len(self._view), self._pos + size)
        chunk = bytes(self._view[self._pos:end])
        self._pos = end
        return chunk

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        size = min(len(target), len(self._view) - self._pos)
        target[:size] = self._view[self._pos:self._pos + size]
        self._pos += size
        return size

    def readline(self) -> bytes:
        scan = self._pos
        while scan < len(self._view):  # in windows: a memoryview has no find
            found = bytes(self._view[scan:scan + 4096]).find(b"\n")
            if found >= 0:
                return self.read(scan + found + 1 - self._pos)
            scan += 4096
        return self.read()


class _ScopedUnpickler(pickle.Unpickler):
    """An unpickler that routes cloudpickle's two by-value function constructors through a
    :class:`Scope`. Anything else unpickles as ``pickle.loads`` would. (cloudpickle 3.x names
    them ``_make_function`` and ``_function_setstate``, which pyproject.toml pins; a version that
    renames them loses only the sharing, and the tests that check it fail.)"""

    def __init__(self, file: Any, scope: Scope) -> None:
        super().__init__(file)
        self._scope = scope

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if module.startswith("cloudpickle"):
            if name == "_make_function":
                return functools.partial(_make_scoped_function, self._scope)
            if name == "_function_setstate":
                return functools.partial(_set_scoped_function_state, self._scope, found)
        return found


def _make_scoped_function(scope: Scope, code: Any, base_globals: dict[str, Any], name: Any,
                          argdefs: Any, closure: Any) -> Any:
    namespace = scope.namespace_for(base_globals)
    namespace["__builtins__"] = builtins.__dict__
    return types.FunctionType(code, namespace, name, argdefs, closure)


def _set_scoped_function_state(scope: Scope, setstate: Callable[[Any, Any], None], obj: Any,
                               state: Any) -> None:
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict) \
            and scope.owns(obj.__globals__):
        # the client's values of the globals the function names: only those not set already
        pickled = state[1].get("__globals__") or {}
        for item, value in pickled.items():
            obj.__globals__.setdefault(item, value)
        state = (state[0], {**state[1], "__globals__": {}})
    setstate(obj, state)


_FUNCTION_CACHE_SIZE = 32
_SMALL_PICKLE = 64 * 1024

# Scopes by the id an executor puts in its tasks, least recently used first. Bounded, and small:
# a long-lived runner serves executor after executor, and each scope holds what its initializer
# loaded (a model, say) until evicted; an evicted scope is rebuilt (initializer included) as a
# fresh worker process would be.
_SCOPES: OrderedDict[str, Scope] = OrderedDict()
_SCOPE_LIMIT = 4


def scope_named(name: str) -> Scope:
    scope = _SCOPES.get(name)
    if scope is None:
        scope = _SCOPES[name] = Scope()
        if len(_SCOPES) > _SCOPE_LIMIT:
            _SCOPES.popitem(last=False)
    else:
        _SCOPES.move_to_end(name)
    return scope


#: what a shared object's pickle is signed for: this prefix and its share id (so that a blob
#: signed for one share, or for a task, is refused as another)
SHARED_CONTEXT_PREFIX = "share:"
_SHARED_LIMIT = 4  # shared objects kept per worker process, least recently used evicted
_shared: OrderedDict[str, Any] = OrderedDict()
_shared_lock = threading.RLock()  # re-entrant: a shared object may hold another handle


def shared_object(share_id: str, location: dict[str, Any]) -> Any:
    """What a ``SharedHandle`` unpickles to in a worker: the shared object, read from the data
    plane and unpickled once per process, then served from a small cache (a map of many tasks
    over one object moves it once per worker process). ``location`` ``{"store": "GRID"}``: the
    data plane of the local grid this runner's agent serves; else as ``worker_guard.guard_location``.
    Raises PayloadError when the object is gone (released, or its executor shut down) or not
    signed with the grid secret."""
    with _shared_lock:  # threads of one task that unpickle the same handle load it once
        if share_id in _shared:
            _shared.move_to_end(share_id)
            return _shared[share_id]
        key = signing_key_from_env()
        if key is None:
            raise PayloadError(f"{PAYLOAD_KEY_ENV} is not set in the worker's environment")
        from .worker_guard import read_data_plane_key  # lazy: it needs redis or boto3

        if location.get("store") == "GRID":
            from .grid.agent import AGENT_CONFIG_ENV  # the runner's agent: its Redis is the data plane

            location = {"store": "REDIS", "redis_url": json.loads(os.environ[AGENT_CONFIG_ENV])["redis_url"]}
        data = read_data_plane_key(location, shared_key(share_id))
        if data is None:
            raise PayloadError(f"shared object {share_id} is not in the data plane (released, or its "
                               "executor shut down, before this task started)")
        value = loads_signed(data.decode(), key, SHARED_CONTEXT_PREFIX + share_id)
        del data
        _shared[share_id] = value
        if len(_shared) > _SHARED_LIMIT:
            _shared.popitem(last=False)
        return value



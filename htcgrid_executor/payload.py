"""Signed pickles: the only way a pickle enters or leaves this package.

A pickle runs code when it is loaded, so one is loaded only when it carries an HMAC-SHA256 made
with the grid's secret (``payload_signing_key`` in the client config, ``HTCGRID_PAYLOAD_KEY`` in a
worker's environment). Anyone who can write to the data plane but does not hold the secret
cannot get code run by an agent or by a client.

Format of a signed blob, as text: ``v1.<urlsafe-b64 hmac>.<standard-b64 pickle>``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import pickle
import secrets
from typing import Any

import cloudpickle

from .errors import PayloadError, SignatureError

__all__ = ["PAYLOAD_KEY_ENV", "new_signing_key", "signing_key_from_env", "dumps_signed", "loads_signed",
           "sign_bytes", "verify_bytes"]

#: environment variable through which agents and deployed workers receive the grid secret
PAYLOAD_KEY_ENV = "HTCGRID_PAYLOAD_KEY"

_PREFIX = "v1."


def new_signing_key() -> str:
    """A fresh random secret, as text that fits in a JSON config file."""
    return secrets.token_urlsafe(32)


def signing_key_from_env() -> str | None:
    return os.environ.get(PAYLOAD_KEY_ENV) or None


def _mac(key: str, data: bytes, context: str = "") -> bytes:
    # the context (if any) is MACed with the data: a blob signed for one context does not verify
    # in another ("\n" cannot occur in a context, which is made of base64 text)
    message = f"{context}\n".encode() + data if context else data
    return hmac.new(key.encode(), message, hashlib.sha256).digest()


def dumps_signed(obj: Any, key: str, context: str = "") -> str:
    """Pickle ``obj`` with cloudpickle and sign it (for ``context``, see :func:`loads_signed`).
    Raises PayloadError naming what could not be pickled (the pickler's error is the
    ``__cause__``)."""
    try:
        data = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # pickling can raise anything a __reduce__ raises
        raise PayloadError(f"cannot pickle {_describe(obj)}: {exc}") from exc
    return sign_bytes(data, key, context)


def sign_bytes(data: bytes, key: str, context: str = "") -> str:
    """Sign already-pickled ``data``."""
    mac = base64.urlsafe_b64encode(_mac(key, data, context)).decode()
    return f"{_PREFIX}{mac}.{base64.b64encode(data).decode()}"


def verify_bytes(text: str, key: str, context: str = "") -> bytes:
    """The data of a signed blob (:func:`sign_bytes`) once its signature is checked. Raises
    SignatureError when the HMAC does not match, PayloadError when ``text`` is not a signed blob."""
    if not isinstance(text, str) or not text.startswith(_PREFIX):
        raise PayloadError("payload is not a signed htcgrid_executor blob")
    try:
        mac_text, data_text = text[len(_PREFIX):].split(".", 1)
        mac = base64.urlsafe_b64decode(mac_text)
        data = base64.b64decode(data_text, validate=True)
    except ValueError as exc:
        raise PayloadError(f"payload is not a signed htcgrid_executor blob: {exc}") from exc
    if not hmac.compare_digest(mac, _mac(key, data, context)):
        raise SignatureError("payload signature does not match the grid secret; refusing to unpickle it")
    return data


def loads_signed(text: str, key: str, context: str = "") -> Any:
    """Check the signature of ``text`` and only then unpickle it.

    ``context``: what the blob was signed for (a task's outputs are signed for that task); a blob
    signed for another context does not verify.

    Raises SignatureError when the HMAC does not match (nothing is unpickled), PayloadError when
    the text is not a signed blob at all or the pickle cannot be loaded.
    """
    data = verify_bytes(text, key, context)
    try:
        return pickle.loads(data)
    except ModuleNotFoundError as exc:
        raise PayloadError(missing_module_message(exc)) from exc
    except Exception as exc:  # unpickling can raise anything (missing module, broken __setstate__)
        raise PayloadError(f"cannot unpickle payload: {exc}") from exc


def missing_module_message(exc: ModuleNotFoundError) -> str:
    """What to do when a pickle names a module this process cannot import."""
    return (f"cannot unpickle payload: it needs the module {exc.name!r}, which cannot be imported "
            "here. Pickles name functions and classes of importable modules by reference: make "
            f"{exc.name!r} importable where this runs (install it, or put its folder on PYTHONPATH "
            "before the grid starts: a folder added to sys.path or a module loaded with importlib "
            "after that is not seen by its agents), or send it by value with "
            f"cloudpickle.register_pickle_by_value(module) in the client ({exc})")


def _describe(obj: Any) -> str:
    if isinstance(obj, tuple) and obj:
        return "call " + ", ".join(type(part).__name__ for part in obj)
    return f"object of type {type(obj).__name__}"

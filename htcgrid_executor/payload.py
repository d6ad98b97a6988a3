"""Signed pickles: the only way a pickle enters or leaves this package.

A pickle runs code when it is loaded, so one is loaded only when it carries an HMAC-SHA256 made
with the grid's secret (``payload_signing_key`` in the client config, ``HTCGRID_PAYLOAD_KEY`` in a
worker's environment). Anyone who can write to the data plane but does not hold the secret
cannot get code run by an agent or by a client.

Format of a signed blob, as text: ``v1.<urlsafe-b64 hmac>.<standard-b64 pickle>``. In memory a
blob is a :class:`SignedPickle` (the MAC and the pickle's bytes, no base64): the text is made only
for the JSON wire format of a deployment; the local grid's raw inputs and outputs carry the bytes
(:func:`htcgrid_executor.wire.encode_raw`). The MAC is the same either way: it covers the bytes.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import pickle
import secrets
from typing import Any

import cloudpickle

from .errors import PayloadError, SignatureError

__all__ = ["PAYLOAD_KEY_ENV", "SignedPickle", "new_signing_key", "signing_key_from_env", "dumps_signed",
           "pickle_signed", "loads_signed", "sign_bytes", "verify_bytes", "mac_from_text"]

#: environment variable through which agents and deployed workers receive the grid secret
PAYLOAD_KEY_ENV = "HTCGRID_PAYLOAD_KEY"

_PREFIX = "v1."
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_STANDARD_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


class SignedPickle:
    """A signed pickle in memory: its HMAC (``mac``, 32 bytes) and the pickle (``data``: bytes, or
    a memoryview into a raw input, never copied). Equal (and hashed) by both. :meth:`text` is the
    blob's text form, the only one the JSON wire format knows."""

    __slots__ = ("mac", "data")

    def __init__(self, mac: bytes, data: bytes | memoryview) -> None:
        self.mac = mac
        self.data = data

    @classmethod
    def from_text(cls, text: str) -> SignedPickle:
        """The blob whose :meth:`text` is ``text`` (nothing verified). Raises PayloadError when
        ``text`` is not a signed blob."""
        if not isinstance(text, str) or not text.startswith(_PREFIX):
            raise PayloadError("payload is not a signed htcgrid_executor blob")
        try:
            mac_text, data_text = text[len(_PREFIX):].split(".", 1)
            return cls(mac_from_text(mac_text), base64.b64decode(data_text, validate=True))
        except ValueError as exc:
            raise PayloadError(f"payload is not a signed htcgrid_executor blob: {exc}") from exc

    @property
    def mac_text(self) -> str:
        """The MAC as the text form writes it (what a task's binding is made of)."""
        return binascii.b2a_base64(self.mac, newline=False).translate(_STANDARD_TO_URLSAFE).decode()

    def text(self) -> str:
        return f"{_PREFIX}{self.mac_text}.{base64.b64encode(self.data).decode()}"

    def text_length(self) -> int:
        """``len(self.text())``, without making it."""
        return len(_PREFIX) + 44 + 1 + 4 * ((len(self.data) + 2) // 3)

    def detached(self) -> SignedPickle:
        """This blob with its own copy of the bytes (one kept in a cache must not pin the whole
        raw input its memoryview points into)."""
        return self if isinstance(self.data, bytes) else SignedPickle(self.mac, bytes(self.data))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SignedPickle) and self.mac == other.mac and self.data == other.data

    def __hash__(self) -> int:
        return hash((self.mac, len(self.data)))

    def __repr__(self) -> str:
        return f"SignedPickle({self.mac_text[:8]}..., {len(self.data):,} bytes)"


def mac_from_text(text: str) -> bytes:
    """The MAC that :attr:`SignedPickle.mac_text` wrote: ``base64.urlsafe_b64decode`` in one
    step (a task's pickles each carry one). Raises ValueError when ``text`` is not base64 text."""
    if not isinstance(text, str):
        raise ValueError(f"a MAC is base64 text, not {type(text).__name__}")
    return binascii.a2b_base64(text.encode("ascii").translate(_URLSAFE_TO_STANDARD))


def new_signing_key() -> str:
    """A fresh random secret, as text that fits in a JSON config file."""
    return secrets.token_urlsafe(32)


def signing_key_from_env() -> str | None:
    return os.environ.get(PAYLOAD_KEY_ENV) or None


def _mac(key: str, data: bytes | memoryview, context: str = "") -> bytes:
    # the context (if any) is MACed with the data: a blob signed for one context does not verify
    # in another ("\n" cannot occur in a context, which is made of base64 text). Fed in parts:
    # no copy of a big pickle; OpenSSL hashes it without holding the GIL
    inner, outer = _hmac_pads(key)
    digest = inner.copy()
    if context:
        digest.update(f"{context}\n".encode())
    digest.update(data)
    result = outer.copy()
    result.update(digest.digest())
    return result.digest()


@functools.lru_cache(maxsize=8)
def _hmac_pads(key: str) -> tuple[Any, Any]:
    """HMAC-SHA256 (RFC 2104) of ``key`` as its two SHA-256 states after the padded key: copying
    them is a quarter of what ``hmac.new`` costs per MAC, and a task takes six. The output is
    ``hmac.new(key, msg, sha256).digest()``'s, byte for byte."""
    block = key.encode()
    if len(block) > 64:  # SHA-256's block size: a longer key is hashed first
        block = hashlib.sha256(block).digest()
    block = block.ljust(64, b"\0")
    return (hashlib.sha256(bytes(b ^ 0x36 for b in block)),
            hashlib.sha256(bytes(b ^ 0x5C for b in block)))


def dumps_signed(obj: Any, key: str, context: str = "") -> str:
    """The text form of :func:`pickle_signed`."""
    return pickle_signed(obj, key, context).text()


def pickle_signed(obj: Any, key: str, context: str = "") -> SignedPickle:
    """Pickle ``obj`` and sign it (for ``context``, see :func:`loads_signed`). Raises PayloadError
    naming what could not be pickled (the pickler's error is the ``__cause__``).

    Arguments and results are mostly plain data, which the C pickler writes several times faster
    than cloudpickle (pickling is most of a client's cost per call). Its output is used only when
    cloudpickle would have written the same thing: it pickled without error (so nothing needed
    pickling by value: no lambda, closure or dynamic class), it names nothing in ``__main__``
    (which cloudpickle sends by value, as the worker has another ``__main__``), and no module is
    registered with ``cloudpickle.register_pickle_by_value``. Otherwise cloudpickle does it.
    """
    data = None
    if not cloudpickle.list_registry_pickle_by_value():
        try:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # anything the C pickler refuses, cloudpickle may do by value
            data = None
        else:
            if b"__main__" in data:
                data = None
    if data is None:
        try:
            data = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # pickling can raise anything a __reduce__ raises
            raise PayloadError(f"cannot pickle {_describe(obj)}: {exc}") from exc
    return SignedPickle(_mac(key, data, context), data)


def sign_bytes(data: bytes, key: str, context: str = "") -> str:
    """Sign already-pickled ``data``."""
    return SignedPickle(_mac(key, data, context), data).text()


def verify_bytes(text: str | SignedPickle, key: str, context: str = "") -> bytes | memoryview:
    """The data of a signed blob (:func:`sign_bytes`, or a :class:`SignedPickle`) once its
    signature is checked. Raises SignatureError when the HMAC does not match, PayloadError when
    ``text`` is not a signed blob."""
    if not isinstance(text, SignedPickle):
        text = SignedPickle.from_text(text)
    if not hmac.compare_digest(text.mac, _mac(key, text.data, context)):
        raise SignatureError("payload signature does not match the grid secret; refusing to unpickle it")
    return text.data


def loads_signed(text: str | SignedPickle, key: str, context: str = "") -> Any:
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

"""The client configuration: the seed's ``client_config_data`` dict, parsed and checked once.

A deployment writes this dict as a JSON file (``Agent_config.tfvars.json``, its path usually in the
``AGENT_CONFIG_FILE`` environment variable) holding many more keys than a client needs; unknown keys
are ignored. Every key that the chosen mode needs is checked when the connector is built, and a
missing or malformed one raises :class:`ConfigurationError` whose message names the key.

Which keys are required:

=====================================  =================================================================
mode                                   keys
=====================================  =================================================================
always                                 ``grid_storage_service`` (``REDIS``, ``S3`` or ``S3+REDIS``)
data plane ``REDIS`` / ``S3+REDIS``    ``redis_url``
data plane ``S3`` / ``S3+REDIS``       ``s3_bucket``
public API (Cognito)                   ``public_api_gateway_url``, ``user_pool_id``,
                                       ``cognito_userpool_client_id``; ``username`` and ``password``
                                       only when :meth:`authenticate` runs
intra-VPC (``intra_vpc`` / env)        ``private_api_gateway_url``, ``api_gateway_key``
=====================================  =================================================================

Environment variables are read when a :class:`ClientConfig` is built (never at import):
``USERNAME`` / ``PASSWORD`` when the config and the arguments give none, ``INTRA_VPC`` when the
config has no ``intra_vpc`` key (an explicit key wins over the environment).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError

__all__ = [
    "AGENT_CONFIG_FILE",
    "STORAGE_SERVICES",
    "DEFAULT_PULL_INTERVAL_SEC",
    "ClientConfig",
    "parse_flag",
]

#: environment variable holding the path of the deployment's client config file
AGENT_CONFIG_FILE = "AGENT_CONFIG_FILE"

#: accepted values of ``grid_storage_service``
STORAGE_SERVICES = ("REDIS", "S3", "S3+REDIS")

#: the deployment's default for ``dynamodb_results_pull_interval_sec``
DEFAULT_PULL_INTERVAL_SEC = 0.5

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def parse_flag(value: object, name: str) -> bool:
    """A 0/1-style flag as config files and environment variables spell it.

    Accepts booleans, the integers 0 and 1, and the strings ``0/1/true/false/yes/no/on/off``
    (any case). Anything else raises ConfigurationError naming ``name``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ConfigurationError(f"config key {name!r} must be 0 or 1, got {value!r}")


def _optional_str(data: Mapping[str, Any], name: str) -> str | None:
    """A string key that may be absent; an empty string counts as absent (deployment files leave
    the keys of unused modes empty)."""
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigurationError(f"config key {name!r} must be a string, got {type(value).__name__}")
    value = value.strip()
    return value or None


def _required_str(data: Mapping[str, Any], name: str, why: str) -> str:
    value = _optional_str(data, name)
    if value is None:
        raise ConfigurationError(f"config key {name!r} is missing or empty; it is required {why}")
    return value


def _url(data: Mapping[str, Any], name: str, why: str) -> str:
    value = _required_str(data, name, why)
    if not value.startswith(("http://", "https://")):
        raise ConfigurationError(f"config key {name!r} must be an http:// or https:// URL, got {value!r}")
    # routes are appended as "/submit" etc.; a trailing slash would give "//submit"
    return value.rstrip("/")


def _positive_number(data: Mapping[str, Any], name: str, default: float) -> float:
    value = data.get(name, default)
    if isinstance(value, bool):
        raise ConfigurationError(f"config key {name!r} must be a positive number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"config key {name!r} must be a positive number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ConfigurationError(f"config key {name!r} must be a positive number, got {value!r}")
    return number


@dataclass(frozen=True)
class ClientConfig:
    """A checked client configuration. Build it with :meth:`from_dict` or :meth:`from_file`.

    ``raw`` is a copy of the dict it was built from (unknown keys included).
    """

    grid_storage_service: str
    api_url: str
    intra_vpc: bool
    results_pull_interval_sec: float
    redis_url: str | None = None
    redis_password: str | None = field(default=None, repr=False)
    s3_bucket: str | None = None
    s3_kms_key_id: str | None = None
    region: str | None = None
    api_gateway_key: str | None = field(default=None, repr=False)
    user_pool_id: str | None = None
    cognito_userpool_client_id: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    payload_signing_key: str | None = field(default=None, repr=False)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def uses_redis(self) -> bool:
        return "REDIS" in self.grid_storage_service

    @property
    def uses_s3(self) -> bool:
        return "S3" in self.grid_storage_service

    @property
    def cognito_region(self) -> str | None:
        """Region of the Cognito user pool: ``region`` if given, else the pool id's prefix
        (pool ids are ``<region>_<id>``)."""
        if self.region:
            return self.region
        if self.user_pool_id and "_" in self.user_pool_id:
            return self.user_pool_id.split("_", 1)[0]
        return None

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        username: str | None = None,
        password: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ClientConfig:
        """Check ``data`` and build a config. Raises ConfigurationError naming the first bad key.

        ``username``/``password`` arguments win over the config's keys, which win over the
        ``USERNAME``/``PASSWORD`` environment variables. ``environ`` defaults to ``os.environ``
        as it is now.
        """
        if not isinstance(data, Mapping):
            raise ConfigurationError(
                f"client_config_data must be a dict of config keys, got {type(data).__name__}"
            )
        env = os.environ if environ is None else environ

        storage = data.get("grid_storage_service")
        if storage is None or storage == "":
            raise ConfigurationError(
                "config key 'grid_storage_service' is missing; it must be one of " + ", ".join(STORAGE_SERVICES)
            )
        if not isinstance(storage, str) or storage.strip().upper() not in STORAGE_SERVICES:
            raise ConfigurationError(
                f"config key 'grid_storage_service' must be one of {', '.join(STORAGE_SERVICES)}, got {storage!r}"
            )
        storage = storage.strip().upper()

        redis_url = s3_bucket = None
        if "REDIS" in storage:
            redis_url = _required_str(data, "redis_url", f"when grid_storage_service is {storage}")
        if "S3" in storage:
            s3_bucket = _required_str(data, "s3_bucket", f"when grid_storage_service is {storage}")

        # The explicit config key (a local grid writes intra_vpc: 1) wins over the environment.
        if "intra_vpc" in data:
            intra_vpc = parse_flag(data["intra_vpc"], "intra_vpc")
        else:
            # As the public client does, any non-empty value switches it on, except explicit "off"
            # spellings (0, false, no, off) which people also write.
            intra_vpc = env.get("INTRA_VPC", "").strip().lower() not in _FALSE

        user_pool_id = _optional_str(data, "user_pool_id")
        client_id = _optional_str(data, "cognito_userpool_client_id")
        api_key = _optional_str(data, "api_gateway_key")
        if intra_vpc:
            why = "in intra-VPC mode (intra_vpc / INTRA_VPC set)"
            api_url = _url(data, "private_api_gateway_url", why)
            api_key = _required_str(data, "api_gateway_key", why)
        else:
            why = "for the public API (set intra_vpc or INTRA_VPC=1 to use the private one)"
            api_url = _url(data, "public_api_gateway_url", why)
            user_pool_id = _required_str(data, "user_pool_id", why)
            client_id = _required_str(data, "cognito_userpool_client_id", why)

        if "task_input_passed_via_external_storage" in data:
            flag = data["task_input_passed_via_external_storage"]
            if isinstance(flag, bool) or str(flag).strip() not in ("1", "1.0"):
                raise ConfigurationError(
                    "config key 'task_input_passed_via_external_storage' must be 1: this client always "
                    f"passes task inputs through the data plane, got {flag!r}"
                )

        user = username or _optional_str(data, "username") or env.get("USERNAME") or None
        secret = password or _optional_str(data, "password") or env.get("PASSWORD") or None

        return cls(
            grid_storage_service=storage,
            api_url=api_url,
            intra_vpc=intra_vpc,
            results_pull_interval_sec=_positive_number(
                data, "dynamodb_results_pull_interval_sec", DEFAULT_PULL_INTERVAL_SEC
            ),
            redis_url=redis_url,
            redis_password=_optional_str(data, "redis_password"),
            s3_bucket=s3_bucket,
            s3_kms_key_id=_optional_str(data, "s3_kms_key_id"),
            region=_optional_str(data, "region"),
            api_gateway_key=api_key,
            user_pool_id=user_pool_id,
            cognito_userpool_client_id=client_id,
            username=user,
            password=secret,
            payload_signing_key=_optional_str(data, "payload_signing_key"),
            raw=dict(data),
        )

    @staticmethod
    def load_file(path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Read a JSON config file; ``path`` None means the file named by ``$AGENT_CONFIG_FILE``.
        The one config-file reader: the connector, the executor's ``config=`` and the CLI use it.

        Raises ConfigurationError when no path is given and the variable is unset, when the file
        cannot be read, or when it does not hold a JSON object.
        """
        env = os.environ if environ is None else environ
        if path is None:
            path = env.get(AGENT_CONFIG_FILE) or None
            if path is None:
                raise ConfigurationError(
                    f"no config file given and the environment variable {AGENT_CONFIG_FILE} is not set"
                )
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except OSError as exc:
            raise ConfigurationError(f"cannot read client config file {os.fspath(path)!r}: {exc}") from exc
        except ValueError as exc:
            raise ConfigurationError(f"client config file {os.fspath(path)!r} is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigurationError(f"client config file {os.fspath(path)!r} must hold a JSON object")
        return data

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ClientConfig:
        """:meth:`load_file` then :meth:`from_dict`."""
        data = cls.load_file(path, environ=environ)
        return cls.from_dict(data, username=username, password=password, environ=environ)

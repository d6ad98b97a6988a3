"""Client configuration: required keys per mode, malformed values, environment fallbacks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from htcgrid_executor.connector import AGENT_CONFIG_FILE, AWSConnector, ClientConfig
from htcgrid_executor.connector.auth import ApiKeyAuth, CognitoAuth
from htcgrid_executor.connector.dataplane import redis_connection_kwargs
from htcgrid_executor.errors import ConfigurationError, ConnectorClosedError

# what a deployment's Agent_config.tfvars.json holds, many keys a client does not use
PUBLIC = {
    "grid_storage_service": "REDIS",
    "s3_bucket": "htc-stdout-bucket-abc",
    "redis_url": "htc-redis.abc.cache.amazonaws.com",
    "redis_password": "redis-secret",
    "public_api_gateway_url": "https://abc.execute-api.eu-west-1.amazonaws.com/v1/",
    "private_api_gateway_url": "https://def.execute-api.eu-west-1.amazonaws.com/v1",
    "api_gateway_key": "key-123",
    "user_pool_id": "eu-west-1_AbCdEf",
    "cognito_userpool_client_id": "client-123",
    "dynamodb_results_pull_interval_sec": 0.5,
    "task_input_passed_via_external_storage": 1,
    "region": "eu-west-1",
    # unknown keys, as in a real file
    "sqs_queue": "htc_task_queue",
    "ddb_status_table": "htc_tasks_status_table",
    "lambda_name_ttl_checker": "ttl_checker",
    "htc_agent_config": {"nested": True},
}
INTRA = {
    "grid_storage_service": "REDIS",
    "redis_url": "redis://127.0.0.1:6379/0",
    "private_api_gateway_url": "http://127.0.0.1:8000",
    "api_gateway_key": "key-123",
    "intra_vpc": 1,
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("INTRA_VPC", "USERNAME", "PASSWORD", AGENT_CONFIG_FILE):
        monkeypatch.delenv(name, raising=False)


def without(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != key}


def test_public_deployment_file_is_accepted_and_unknown_keys_are_ignored() -> None:
    config = ClientConfig.from_dict(PUBLIC, username="alice", password="s3cr3t-pass")
    assert config.intra_vpc is False
    assert config.api_url == "https://abc.execute-api.eu-west-1.amazonaws.com/v1"  # slash stripped
    assert config.grid_storage_service == "REDIS"
    assert config.redis_url == "htc-redis.abc.cache.amazonaws.com"
    assert config.redis_password == "redis-secret"
    assert config.results_pull_interval_sec == 0.5
    assert config.cognito_region == "eu-west-1"
    assert config.raw == PUBLIC
    for secret in ("s3cr3t-pass", "redis-secret", "key-123"):  # no secret in a repr or a log line
        assert secret not in repr(config)


def test_intra_vpc_needs_no_cognito_keys() -> None:
    config = ClientConfig.from_dict(INTRA)
    assert config.intra_vpc is True
    assert config.api_url == "http://127.0.0.1:8000"
    assert config.api_gateway_key == "key-123"
    assert config.user_pool_id is None
    assert config.results_pull_interval_sec == 0.5  # the deployment's default


@pytest.mark.parametrize("key", ["grid_storage_service", "redis_url", "public_api_gateway_url",
                                 "user_pool_id", "cognito_userpool_client_id"])
def test_missing_public_key_is_named(key: str) -> None:
    with pytest.raises(ConfigurationError, match=repr(key)):
        ClientConfig.from_dict(without(PUBLIC, key))


@pytest.mark.parametrize("key", ["private_api_gateway_url", "api_gateway_key", "redis_url"])
def test_missing_intra_vpc_key_is_named(key: str) -> None:
    with pytest.raises(ConfigurationError, match=repr(key)):
        ClientConfig.from_dict(without(INTRA, key))


@pytest.mark.parametrize("storage, key", [("S3", "s3_bucket"), ("S3+REDIS", "s3_bucket"),
                                          ("S3+REDIS", "redis_url")])
def test_storage_modes_need_their_keys(storage: str, key: str) -> None:
    data = dict(INTRA, grid_storage_service=storage, s3_bucket="bucket")
    ClientConfig.from_dict(data)  # complete: fine
    with pytest.raises(ConfigurationError, match=repr(key)):
        ClientConfig.from_dict(dict(data, **{key: ""}))  # a deployment file leaves unused keys empty


def test_s3_mode_does_not_need_redis() -> None:
    config = ClientConfig.from_dict(dict(without(INTRA, "redis_url"), grid_storage_service="s3", s3_bucket="b"))
    assert config.grid_storage_service == "S3" and config.uses_s3 and not config.uses_redis


@pytest.mark.parametrize("key, value", [
    ("grid_storage_service", "DYNAMODB"),
    ("grid_storage_service", 3),
    ("redis_url", 6379),
    ("private_api_gateway_url", "ftp://host"),
    ("private_api_gateway_url", "127.0.0.1:8000"),
    ("api_gateway_key", ["k"]),
    ("dynamodb_results_pull_interval_sec", "soon"),
    ("dynamodb_results_pull_interval_sec", -1),
    ("dynamodb_results_pull_interval_sec", 0),
    ("dynamodb_results_pull_interval_sec", float("nan")),
    ("dynamodb_results_pull_interval_sec", True),
    ("task_input_passed_via_external_storage", 0),
    ("intra_vpc", "maybe"),
    ("intra_vpc", 2),
])
def test_malformed_value_is_named(key: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=repr(key)):
        ClientConfig.from_dict(dict(INTRA, **{key: value}))


def test_pull_interval_accepts_numeric_strings() -> None:
    assert ClientConfig.from_dict(dict(INTRA, dynamodb_results_pull_interval_sec="0.25")) \
        .results_pull_interval_sec == 0.25


def test_config_must_be_a_dict() -> None:
    with pytest.raises(ConfigurationError, match="dict"):
        AWSConnector(["not", "a", "dict"])  # type: ignore[arg-type]


def test_username_and_password_fall_back_to_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USERNAME", "env-user")
    monkeypatch.setenv("PASSWORD", "env-pass")
    config = ClientConfig.from_dict(PUBLIC)
    assert (config.username, config.password) == ("env-user", "env-pass")
    # config keys win over the environment, arguments win over both
    config = ClientConfig.from_dict(dict(PUBLIC, username="cfg-user", password="cfg-pass"))
    assert (config.username, config.password) == ("cfg-user", "cfg-pass")
    config = ClientConfig.from_dict(dict(PUBLIC, username="cfg-user"), username="arg-user", password="arg-pass")
    assert (config.username, config.password) == ("arg-user", "arg-pass")


def test_intra_vpc_environment_is_read_when_the_connector_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    public_only = dict(PUBLIC)  # no intra_vpc key: the environment decides
    before = AWSConnector(public_only, username="u", password="p")
    monkeypatch.setenv("INTRA_VPC", "1")
    after = AWSConnector(public_only)
    try:
        # the variable was set after import and after the first connector: only the second sees it
        assert isinstance(before.transport.auth, CognitoAuth)
        assert before.transport.base_url == "https://abc.execute-api.eu-west-1.amazonaws.com/v1"
        assert isinstance(after.transport.auth, ApiKeyAuth)
        assert after.transport.base_url == "https://def.execute-api.eu-west-1.amazonaws.com/v1"
        assert after.transport.auth.headers() == {"x-api-key": "key-123"}
    finally:
        before.close()
        after.close()


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("anything", True),
                                             ("0", False), ("false", False), ("", False)])
def test_intra_vpc_environment_values(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("INTRA_VPC", value)
    assert ClientConfig.from_dict(PUBLIC).intra_vpc is expected


def test_intra_vpc_key_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTRA_VPC", "1")
    assert ClientConfig.from_dict(dict(PUBLIC, intra_vpc=0)).intra_vpc is False
    monkeypatch.setenv("INTRA_VPC", "0")
    assert ClientConfig.from_dict(dict(INTRA, intra_vpc="true")).intra_vpc is True


def test_from_config_file_with_path_and_with_environment(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "Agent_config.tfvars.json"
    path.write_text(json.dumps(dict(INTRA, payload_signing_key="sig")))
    with AWSConnector.from_config_file(str(path)) as conn:
        assert conn.client_config["api_gateway_key"] == "key-123"
        assert conn.payload_signing_key == "sig"
    monkeypatch.setenv(AGENT_CONFIG_FILE, str(path))
    with AWSConnector.from_config_file() as conn:
        assert conn.client_config == dict(INTRA, payload_signing_key="sig")


def test_config_file_errors_are_configuration_errors(tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError, match=AGENT_CONFIG_FILE):
        AWSConnector.from_config_file()
    with pytest.raises(ConfigurationError, match="cannot read") as info:
        AWSConnector.from_config_file(str(tmp_path / "missing.json"))
    assert isinstance(info.value.__cause__, OSError)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigurationError, match="not JSON"):
        AWSConnector.from_config_file(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigurationError, match="JSON object"):
        AWSConnector.from_config_file(str(bad))


def test_public_client_two_step_style() -> None:
    conn = AWSConnector()
    with pytest.raises(ConfigurationError, match="init"):
        conn.send([{}])
    conn.init(PUBLIC, username="alice", password="secret")
    try:
        assert conn.client_config == PUBLIC
        assert conn.payload_signing_key is None
        assert conn.config is not None and conn.config.username == "alice"
    finally:
        conn.close()
    with pytest.raises(ConnectorClosedError, match="closed"):  # a GridError (and a RuntimeError)
        conn.send([{}])


@pytest.mark.parametrize("url, password, expected", [
    ("htc-redis.abc.cache.amazonaws.com", "pw",
     {"host": "htc-redis.abc.cache.amazonaws.com", "port": 6379, "ssl": True, "password": "pw"}),
    ("my-host:6380", None, {"host": "my-host", "port": 6380, "ssl": True}),
    ("redis://127.0.0.1:7000/2", "pw", {"host": "127.0.0.1", "port": 7000, "db": 2, "password": "pw"}),
    ("redis://:inurl@127.0.0.1:7000/0", "pw", {"host": "127.0.0.1", "port": 7000, "db": 0, "password": "inurl"}),
])
def test_redis_url_forms(url: str, password: str | None, expected: dict[str, Any]) -> None:
    assert redis_connection_kwargs(url, password) == expected


def test_redis_tls_and_unix_urls() -> None:
    from redis.connection import SSLConnection, UnixDomainSocketConnection

    kwargs = redis_connection_kwargs("rediss://cache.example:6379/0", "pw")
    assert kwargs["connection_class"] is SSLConnection and kwargs["password"] == "pw"
    kwargs = redis_connection_kwargs("unix:///tmp/redis.sock?db=1")
    assert kwargs["connection_class"] is UnixDomainSocketConnection and kwargs["path"] == "/tmp/redis.sock"


@pytest.mark.parametrize("url", ["http://host:6379", "host:port", "a/b"])
def test_bad_redis_url_is_named(url: str) -> None:
    with pytest.raises(ConfigurationError, match="'redis_url'"):
        redis_connection_kwargs(url)

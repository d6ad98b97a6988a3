"""Public-API mode: Cognito USER_SRP_AUTH (pycognito) against moto's Cognito, and the header sent.

moto runs the SRP exchange but does not check the password proof (it accepts any proof from a known,
enabled user), so "wrong credentials" are exercised with the refusals moto does make: an unknown
user (UserNotFoundException) and a disabled one (NotAuthorizedException, the code Cognito also
answers for a wrong password). Both must come back as AuthenticationError.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import boto3
import jwt
import pytest
from connector_fixtures import *  # noqa: F403 - pytest fixtures
from connector_helpers import RecordingGrid, fast_transport

from htcgrid_executor import wire
from htcgrid_executor.connector import AWSConnector
from htcgrid_executor.connector.auth import CognitoAuth
from htcgrid_executor.errors import AuthenticationError, ConfigurationError, PasswordChangeRequired

REGION = "eu-west-1"
PASSWORD = "Correct-Horse-9!"


@pytest.fixture
def pool(aws: None) -> dict[str, str]:
    idp = boto3.client("cognito-idp", region_name=REGION)
    pool_id = idp.create_user_pool(PoolName="htc-grid")["UserPool"]["Id"]
    client_id = idp.create_user_pool_client(
        UserPoolId=pool_id, ClientName="htc-client",
        ExplicitAuthFlows=["ALLOW_USER_SRP_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"],
    )["UserPoolClient"]["ClientId"]
    idp.admin_create_user(UserPoolId=pool_id, Username="alice", TemporaryPassword="Temp-Pass-1!")
    idp.admin_set_user_password(UserPoolId=pool_id, Username="alice", Password=PASSWORD, Permanent=True)
    idp.admin_create_user(UserPoolId=pool_id, Username="newbie", TemporaryPassword="Temp-Pass-2!")
    idp.admin_create_user(UserPoolId=pool_id, Username="mallory", TemporaryPassword="Temp-Pass-3!")
    idp.admin_set_user_password(UserPoolId=pool_id, Username="mallory", Password=PASSWORD, Permanent=True)
    idp.admin_disable_user(UserPoolId=pool_id, Username="mallory")
    return {"pool_id": pool_id, "client_id": client_id}


def public_config(grid: RecordingGrid, redis_server: Any, pool: dict[str, str], **extra: Any) -> dict[str, Any]:
    config = {
        "grid_storage_service": "REDIS",
        "redis_url": redis_server.url,
        "redis_password": redis_server.password,
        "public_api_gateway_url": grid.url,
        "private_api_gateway_url": "http://unused.invalid",
        "api_gateway_key": "the-api-key",
        "user_pool_id": pool["pool_id"],
        "cognito_userpool_client_id": pool["client_id"],
        "dynamodb_results_pull_interval_sec": 0.02,
        "task_input_passed_via_external_storage": 1,
        "region": REGION,
    }
    config.update(extra)
    return config


@pytest.fixture
def public(recording_grid: RecordingGrid, redis_server: Any, redis_db: Any, pool: dict[str, str],
           monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[AWSConnector, RecordingGrid]]:
    monkeypatch.delenv("INTRA_VPC", raising=False)
    auth = CognitoAuth(user_pool_id=pool["pool_id"], client_id=pool["client_id"], region=REGION,
                       username="alice", password=PASSWORD)
    conn = AWSConnector(public_config(recording_grid, redis_server, pool), username="alice", password=PASSWORD,
                        transport=fast_transport(recording_grid.url, auth))
    recording_grid.store = conn.store
    yield conn, recording_grid
    conn.close()


def test_login_and_the_raw_id_token_is_sent(public: tuple[AWSConnector, RecordingGrid]) -> None:
    conn, grid = public
    conn.authenticate()
    auth = conn.transport.auth
    assert isinstance(auth, CognitoAuth)
    token = auth.id_token
    assert token and token.count(".") == 2
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["token_use"] == "id" and claims["aud"] == conn.config.cognito_userpool_client_id
    conn.send([{"x": 1}])
    [req] = grid.calls()
    assert req.headers["authorization"] == token  # the raw JWT: no "Bearer " prefix
    assert not req.headers["authorization"].startswith("Bearer")
    assert "x-api-key" not in req.headers


def test_authenticate_twice_is_harmless(public: tuple[AWSConnector, RecordingGrid]) -> None:
    conn, grid = public
    conn.authenticate()
    conn.authenticate()
    conn.send([{}])
    assert grid.calls()[0].headers["authorization"] == conn.transport.auth.id_token


def test_call_before_authenticate_is_refused_locally(public: tuple[AWSConnector, RecordingGrid]) -> None:
    conn, grid = public
    with pytest.raises(AuthenticationError, match=r"authenticate\(\)"):
        conn.poll_session(wire.new_session_id())
    assert grid.calls() == []


def test_token_is_renewed_before_expiry_and_the_new_one_is_sent(public: tuple[AWSConnector, RecordingGrid]) -> None:
    conn, grid = public
    conn.authenticate()
    auth = conn.transport.auth
    old_token = auth.id_token
    conn.poll_session(wire.new_session_id())
    auth.expires_at = time.time() + 10  # within the renewal margin: looks about to expire
    conn.poll_session(wire.new_session_id())
    first, second = grid.calls()
    assert first.headers["authorization"] == old_token
    new_token = auth.id_token
    assert new_token != old_token
    assert second.headers["authorization"] == new_token
    assert jwt.decode(new_token, options={"verify_signature": False})["token_use"] == "id"
    assert auth.expires_at > time.time() + 3000  # the renewed token's own expiry


def test_a_401_triggers_one_renewal_and_one_more_try(public: tuple[AWSConnector, RecordingGrid]) -> None:
    conn, grid = public
    conn.authenticate()
    old_token = conn.transport.auth.id_token
    grid.script("GET", "/result", [(401, {"message": "Unauthorized"})])
    conn.poll_session(wire.new_session_id())
    first, second = grid.calls()
    assert first.headers["authorization"] == old_token
    assert second.headers["authorization"] == conn.transport.auth.id_token != old_token
    # a second refusal in a row is final
    grid.script("GET", "/result", [(403, {"message": "denied"})] * 2)
    with pytest.raises(AuthenticationError, match="denied") as info:
        conn.poll_session(wire.new_session_id())
    assert info.value.status == 403


@pytest.mark.parametrize("user", ["nobody", "mallory"])
def test_refused_credentials(recording_grid: RecordingGrid, redis_server: Any, pool: dict[str, str],
                             user: str) -> None:
    with AWSConnector(public_config(recording_grid, redis_server, pool, intra_vpc=0),
                      username=user, password="Wrong-Pass-1!") as conn:
        with pytest.raises(AuthenticationError) as info:
            conn.authenticate()
        assert not isinstance(info.value, PasswordChangeRequired)
        assert user in str(info.value)
        assert info.value.__cause__ is not None  # botocore's error stays visible
        with pytest.raises(AuthenticationError, match=r"authenticate\(\)"):
            conn.send([{}])
    assert recording_grid.calls() == []


def test_temporary_password_needs_changing(recording_grid: RecordingGrid, redis_server: Any,
                                           pool: dict[str, str]) -> None:
    with AWSConnector(public_config(recording_grid, redis_server, pool, intra_vpc=0),
                      username="newbie", password="Temp-Pass-2!") as conn:
        with pytest.raises(PasswordChangeRequired, match="temporary password"):
            conn.authenticate()
        auth = conn.transport.auth
        assert isinstance(auth, CognitoAuth) and not auth.authenticated
        auth.set_new_password("Brand-New-Pass-7!")
        assert auth.authenticated
        recording_grid.store = conn.store
        conn.send([{}])
        assert recording_grid.calls()[0].headers["authorization"] == auth.id_token


def test_missing_username_is_named(recording_grid: RecordingGrid, redis_server: Any, pool: dict[str, str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USERNAME", raising=False)
    monkeypatch.delenv("PASSWORD", raising=False)
    with AWSConnector(public_config(recording_grid, redis_server, pool, intra_vpc=0)) as conn:
        with pytest.raises(ConfigurationError, match="'username'.*USERNAME"):
            conn.authenticate()


def test_credentials_from_environment(recording_grid: RecordingGrid, redis_server: Any, pool: dict[str, str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USERNAME", "alice")
    monkeypatch.setenv("PASSWORD", PASSWORD)
    with AWSConnector(public_config(recording_grid, redis_server, pool, intra_vpc=0)) as conn:
        conn.authenticate()
        assert conn.transport.auth.authenticated


def test_unknown_pool_client_is_a_configuration_error(recording_grid: RecordingGrid, redis_server: Any,
                                                      pool: dict[str, str]) -> None:
    config = public_config(recording_grid, redis_server, pool, intra_vpc=0, cognito_userpool_client_id="nope")
    with AWSConnector(config, username="alice", password=PASSWORD) as conn:
        with pytest.raises(ConfigurationError, match="cognito_userpool_client_id"):
            conn.authenticate()

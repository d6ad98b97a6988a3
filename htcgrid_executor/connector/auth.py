"""How the connector proves who it is to the grid's HTTP API.

Two modes, as a deployment has them:

* public API: a Cognito user pool. :class:`CognitoAuth` logs in with USER_SRP_AUTH (pycognito), sends
  the IdToken as ``Authorization: <jwt>`` (no ``Bearer `` prefix) and renews it with
  REFRESH_TOKEN_AUTH shortly before it expires, so the header sent is always the renewed token.
  There is no background thread: renewal happens on the calling thread, just before a request.
* private API (inside the grid's VPC, and the local grid): :class:`ApiKeyAuth` sends
  ``x-api-key: <api_gateway_key>``; nothing to log in to.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import (
    AuthenticationError,
    ConfigurationError,
    GridError,
    GridUnavailableError,
    PasswordChangeRequired,
)
from .aws_errors import boto_error_code, boto_error_message

__all__ = ["Auth", "ApiKeyAuth", "CognitoAuth", "RENEW_MARGIN_SEC"]

logger = logging.getLogger(__name__)

#: renew the IdToken when fewer than this many seconds of its life are left (it lives 60 min)
RENEW_MARGIN_SEC = 300.0


class Auth:
    """Interface of an authentication mode: headers to send, and a hook for a rejected request."""

    #: True once requests can be authorised (always True for an API key)
    authenticated: bool = False

    def authenticate(self) -> None:
        """Obtain credentials. Calling it again is harmless."""

    def headers(self) -> dict[str, str]:
        """Headers that authorise one request. Raises AuthenticationError when there are none."""
        raise NotImplementedError

    def on_rejected(self) -> bool:
        """The grid answered 401/403 to the headers last given. Return True when new credentials
        were obtained and the request is worth one more try."""
        return False


class ApiKeyAuth(Auth):
    """``x-api-key: <api_gateway_key>``: the private API of a deployment, and the local grid."""

    authenticated = True

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def headers(self) -> dict[str, str]:
        return {"x-api-key": self._api_key}

    def __repr__(self) -> str:  # never show the key
        return "ApiKeyAuth(x-api-key=***)"


@contextlib.contextmanager
def _cognito_errors(what: str, username: str | None) -> Iterator[None]:
    """Translate the errors of one pycognito call (``what``: "log in", ...) into the package's tree."""
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from pycognito.exceptions import ForceChangePasswordException, MFAChallengeException, WarrantException

    try:
        yield
    except ForceChangePasswordException as exc:
        raise PasswordChangeRequired(
            f"Cognito user {username!r} must change the temporary password before using the "
            "grid (set a new one with CognitoAuth.set_new_password, the AWS console, or "
            "'aws cognito-idp admin-set-user-password --permanent')"
        ) from exc
    except MFAChallengeException as exc:
        raise AuthenticationError(
            f"Cognito asks user {username!r} for multi-factor authentication, which this "
            "client does not support"
        ) from exc
    except WarrantException as exc:  # token verification and other pycognito refusals
        raise AuthenticationError(f"Cognito: cannot {what}: {exc}") from exc
    except ClientError as exc:
        raise _client_error(exc, what, username) from exc
    except BotoConnectionError as exc:
        raise GridUnavailableError(f"cannot reach Cognito to {what}: {exc}") from exc
    except BotoCoreError as exc:  # no region, no credentials config ...
        raise AuthenticationError(f"Cognito: cannot {what}: {exc}") from exc
    except OSError as exc:  # requests' ConnectionError fetching the pool's public keys
        raise GridUnavailableError(f"cannot reach Cognito to {what}: {exc}") from exc
    except ValueError as exc:  # the pool's public keys were not JSON
        raise AuthenticationError(f"Cognito: cannot {what}: {exc}") from exc


def _client_error(exc: BaseException, what: str, username: str | None) -> GridError:
    code = boto_error_code(exc)
    if code == "PasswordResetRequiredException":
        return PasswordChangeRequired(f"Cognito requires user {username!r} to reset the password")
    if code == "ResourceNotFoundException":
        return ConfigurationError(
            "Cognito does not know the user pool or app client: check config keys "
            f"'user_pool_id' and 'cognito_userpool_client_id' ({boto_error_message(exc)})"
        )
    # NotAuthorizedException (wrong password, disabled user, expired refresh token),
    # UserNotFoundException, UserNotConfirmedException, throttling ...
    return AuthenticationError(
        f"Cognito refused to {what} for user {username!r}: {code or 'error'}: {boto_error_message(exc)}"
    )


class CognitoAuth(Auth):
    """Cognito user-pool login (USER_SRP_AUTH) with renewal before expiry (REFRESH_TOKEN_AUTH).

    Thread-safe: the executor's submitting thread and its poller share one instance; a lock makes
    sure only one of them renews. ``clock`` (seconds since the epoch) exists for tests.
    """

    def __init__(
        self,
        *,
        user_pool_id: str,
        client_id: str,
        region: str | None,
        username: str | None,
        password: str | None,
        renew_margin_sec: float = RENEW_MARGIN_SEC,
        clock: Callable[[], float] = time.time,
        boto3_client_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._user_pool_id = user_pool_id
        self._client_id = client_id
        self._region = region
        self._username = username
        self._password = password
        self._boto3_kwargs = dict(boto3_client_kwargs or {})
        self.renew_margin_sec = renew_margin_sec
        self.clock = clock
        self._lock = threading.Lock()  # guards the token fields and _cognito
        self._cognito: Any = None
        self.id_token: str | None = None
        #: epoch seconds at which the IdToken stops being accepted (its ``exp`` claim)
        self.expires_at: float = 0.0

    def __repr__(self) -> str:
        state = "authenticated" if self.authenticated else "not authenticated"
        return f"CognitoAuth(user={self._username!r}, pool={self._user_pool_id!r}, {state})"

    @property
    def authenticated(self) -> bool:  # type: ignore[override]
        return self.id_token is not None

    def _new_cognito(self) -> Any:
        # pycognito (and through it boto3) is imported here so that intra-VPC users and the
        # local grid never pay for it.
        from pycognito import Cognito

        return Cognito(
            self._user_pool_id,
            self._client_id,
            user_pool_region=self._region,
            username=self._username,
            boto3_client_kwargs=dict(self._boto3_kwargs),
        )

    def authenticate(self) -> None:
        """Log in with USER_SRP_AUTH. Blocks for the Cognito round trips (two, plus the pool's
        public keys once). Calling it again logs in afresh, which is harmless.

        Raises ConfigurationError when no username/password is known, PasswordChangeRequired when
        Cognito wants the temporary password changed first, AuthenticationError when Cognito
        refuses the credentials, GridUnavailableError when Cognito cannot be reached.
        """
        if not self._username:
            raise ConfigurationError(
                "config key 'username' is missing: give it in client_config_data, as the username "
                "argument, or in the USERNAME environment variable"
            )
        if not self._password:
            raise ConfigurationError(
                "config key 'password' is missing: give it in client_config_data, as the password "
                "argument, or in the PASSWORD environment variable"
            )
        with self._lock:
            cognito = self._new_cognito()
            with _cognito_errors("log in", self._username):
                cognito.authenticate(password=self._password)
            self._cognito = cognito
            self._take_tokens()
        logger.debug("cognito: user %s logged in", self._username)

    def set_new_password(self, new_password: str) -> None:
        """Answer Cognito's NEW_PASSWORD_REQUIRED challenge (after PasswordChangeRequired): set
        ``new_password`` using the current (temporary) password, and log in with it."""
        with self._lock:
            cognito = self._new_cognito()
            with _cognito_errors("set a new password", self._username):
                cognito.new_password_challenge(password=self._password, new_password=new_password)
            self._password = new_password
            self._cognito = cognito
            self._take_tokens()

    def headers(self) -> dict[str, str]:
        """``Authorization: <IdToken>``, renewing the token first when it expires within
        ``renew_margin_sec``. Raises AuthenticationError before :meth:`authenticate`."""
        with self._lock:
            if self._cognito is None or self.id_token is None:
                raise AuthenticationError(
                    "not authenticated: call authenticate() before using the public API"
                )
            if self.clock() >= self.expires_at - self.renew_margin_sec:
                self._renew_locked()
            return {"Authorization": self.id_token}

    def on_rejected(self) -> bool:
        # A 401 with a token we thought valid: revoked, or our clock is off. One forced renewal.
        with self._lock:
            if self._cognito is None:
                return False
            before = self.id_token
            try:
                self._renew_locked()
            except AuthenticationError:
                return False
            return self.id_token != before

    def _renew_locked(self) -> None:
        cognito = self._cognito
        try:
            with _cognito_errors("renew the token", self._username):
                cognito.renew_access_token()
        except PasswordChangeRequired:
            raise
        except AuthenticationError:
            # The refresh token lives 30 days by default; past that, log in again if we can.
            if not self._password:
                raise
            logger.debug("cognito: refresh token refused, logging in again as %s", self._username)
            cognito = self._new_cognito()
            with _cognito_errors("log in", self._username):
                cognito.authenticate(password=self._password)
            self._cognito = cognito
        self._take_tokens()
        logger.debug("cognito: token of %s renewed", self._username)

    def _take_tokens(self) -> None:
        cognito = self._cognito
        self.id_token = cognito.id_token
        claims = getattr(cognito, "id_claims", None) or {}
        try:
            self.expires_at = float(claims["exp"])
        except (KeyError, TypeError, ValueError):
            # pycognito always verifies and stores the claims; if that ever changes, assume the
            # documented 60 minutes rather than renewing on every call.
            self.expires_at = self.clock() + 3600

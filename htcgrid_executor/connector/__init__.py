"""HTC-Grid's client API: :class:`AWSConnector` (the seed's), its data plane and its transport.

::

    AWSConnector (client.py)        send / get_results / poll_* / cancel_* / delete_session_data
      ├── ClientConfig (config.py)  the client_config_data dict, checked once
      ├── Auth (auth.py)            Cognito SRP + renewal, or x-api-key (intra-VPC, local grid)
      ├── HTTPTransport (transport.py)  one pooled session, timeouts, retries, error mapping
      └── DataPlane (dataplane.py)  RedisStore / S3Store / LayeredStore (S3+REDIS)
"""

from __future__ import annotations

from .auth import ApiKeyAuth, Auth, CognitoAuth
from .client import AWSConnector, ResultBatch, SessionStatus
from .config import AGENT_CONFIG_FILE, ClientConfig
from .dataplane import DataPlane, LayeredStore, RedisStore, S3Store, make_store
from .transport import HTTPTransport

__all__ = [
    "AWSConnector",
    "ResultBatch",
    "SessionStatus",
    "ClientConfig",
    "AGENT_CONFIG_FILE",
    "Auth",
    "ApiKeyAuth",
    "CognitoAuth",
    "HTTPTransport",
    "DataPlane",
    "RedisStore",
    "S3Store",
    "LayeredStore",
    "make_store",
]

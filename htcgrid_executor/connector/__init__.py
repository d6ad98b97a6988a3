"""HTC-Grid's client API: :class:`AWSConnector` (the seed's), its data plane and its transport.

::

    AWSConnector (client.py)        send / cancel_* / delete_session_data / logs; lifecycle (ConnectorState)
      ├── arguments.py              ids, submission responses, send's options, checked before sending
      ├── ResultPolling (polling.py)  get_results / poll_* / session_status: GET /result, outputs read
      │     ├── results.py          Answer (a /result body, checked), ResultBatch, SessionStatus, seed dict
      │     └── plain_deployment.py the fallback for a plain HTC-Grid: pacing, what a listener was told
      ├── ClientConfig (config.py)  the client_config_data dict, checked once; the one file reader
      ├── Auth (auth.py)            Cognito SRP + renewal, or x-api-key (intra-VPC, local grid)
      ├── HTTPTransport (transport.py)  one pooled session, timeouts, retries (backoff.Backoff), error mapping
      └── DataPlane (dataplane.py)  RedisStore / S3Store / LayeredStore (S3+REDIS), counted (stats.py)

``AWSConnector(config, transport=..., store=...)`` takes injected parts instead of building them.
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

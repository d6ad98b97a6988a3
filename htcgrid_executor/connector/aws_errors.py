"""Reading botocore's errors, for the two places that talk to AWS (Cognito in ``auth.py``, S3 in
``dataplane.py``): the error code and message of a ``ClientError``, spelt once."""

from __future__ import annotations

__all__ = ["boto_error_code", "boto_error_message"]


def boto_error_code(exc: BaseException) -> str:
    """The ``Error.Code`` of a botocore ``ClientError`` (``"NoSuchKey"``, ``"404"``, ...), or ``""``."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def boto_error_message(exc: BaseException) -> str:
    """The ``Error.Message`` of a botocore ``ClientError``, else the exception's text."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        message = response.get("Error", {}).get("Message")
        if message:
            return str(message)
    return str(exc)

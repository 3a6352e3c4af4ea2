"""Keep credentials out of MLflow params and tags, logs and error messages.

A tracking URI may carry a user and password (``https://user:secret@host``), and the
environment holds tokens (``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``,
``AWS_SECRET_ACCESS_KEY``, ``HF_TOKEN`` ...). Whatever text lmops logs or prints that may
quote a URL or an exception goes through :func:`redact` first.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping

MASK = "***"
# environment variables whose value is a credential: by name, and these in any case
SECRET_NAME = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|PRIVATE_KEY|"
    r"CREDENTIALS?|CONNECTION_STRING)(_|$)",
    re.IGNORECASE,
)
SECRET_ENV = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "DATABRICKS_TOKEN",
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_SERVER_API_AUTH_STRING",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCESS_KEY",
)
_MIN_SECRET = 6  # shorter values ("1", "yes") would mask ordinary text
_NOT_SECRET = {"true", "false", "none", "null"}
# scheme://userinfo@ : the user (a token, often) and the password both go
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]+@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&](?:token|access_token|api_key|apikey|key|password|secret|sig|signature)=)"
    r"[^&\s'\"]+",
    re.IGNORECASE,
)


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of the credential variables of ``env`` (this process's environment)."""
    env = os.environ if env is None else env
    values = {
        v
        for k, v in env.items()
        if (k in SECRET_ENV or SECRET_NAME.search(k))
        and len(v) >= _MIN_SECRET
        and v.lower() not in _NOT_SECRET
    }
    return sorted(values, key=len, reverse=True)  # a secret inside another: longest first


def redact_uri(uri: str) -> str:
    """``uri`` without the user and password or a token in its query string."""
    return _QUERY_SECRET.sub(rf"\g<key>{MASK}", _USERINFO.sub(rf"\g<scheme>{MASK}@", uri))


def public_url(uri: str) -> str:
    """``uri`` as a link to show: without user, password, query string or fragment."""
    parts = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit(
        (parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", "")
    )


def redact(text: str) -> str:
    """``text`` with URL credentials and the values of secret variables masked."""
    text = redact_uri(text)
    for value in secret_values():
        text = text.replace(value, MASK)
    return text

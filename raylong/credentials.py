"""Credentials: which environment variables hold them, how they reach the training workers, and how a
URI is made safe to print. Values are never logged, recorded or put in a recipe; only names are shown.

Credentials come from the driver's environment (or the job's runtime_env) and reach the Ray Train
workers inside the WorkerSpec (Ray's object store), never through a worker runtime_env: Ray's
runtime-env agent writes every runtime_env it sets up, env_vars included, to its log.
"""

from __future__ import annotations

import os
import re

CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                  "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "GOOGLE_APPLICATION_CREDENTIALS",
                  "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "MLFLOW_TRACKING_USERNAME",
                  "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_S3_ENDPOINT_URL", "HF_TOKEN")

# query parameters whose values are secrets (presigned URLs, SAS tokens, ...)
SECRET_QUERY_NAMES = ("access_key", "secret_key", "secret", "password", "token", "sig", "signature", "sas",
                      r"x-amz-[a-z-]+")
_USERINFO = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@?#]*:[^/@?#]*@", re.I)
_SECRET_QUERY = re.compile(r"([?&](?:" + "|".join(SECRET_QUERY_NAMES) + r")=)[^&#]*", re.I)


def credential_names() -> list[str]:
    """Names of the credential variables set in this process's environment."""
    return [k for k in CREDENTIAL_ENV if os.environ.get(k)]


def credential_values() -> dict[str, str]:
    """The credentials to hand to the workers (inside the WorkerSpec; never logged)."""
    return {k: os.environ[k] for k in credential_names()}


def carries_credentials(uri: str) -> bool:
    return bool(_USERINFO.search(uri) or _SECRET_QUERY.search(uri))


def reject_credentials(value: str | None, field: str) -> str | None:
    """Recipe validator: a URI with user:password@ or a secret query value is refused."""
    if value is not None and carries_credentials(value):
        raise ValueError(
            f"{field} carries credentials in the URI; recipes are logged to MLflow, so set credentials in the "
            f"environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, "
            f"MLFLOW_TRACKING_TOKEN, ...) or Ray's runtime_env instead"
        )
    return value


def redact(uri: str) -> str:
    """A URI safe to print or log: user:password@ and secret query values replaced by ***."""
    out = re.sub(r"^([a-z][a-z0-9+.-]*://)[^/@?#]*@", r"\1***@", uri, flags=re.I)
    return _SECRET_QUERY.sub(r"\1***", out)

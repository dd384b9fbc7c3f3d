"""Secrets never leave in text: `redact` is applied to every store error, log line and dead-letter
reason, and so to what reaches events and HTTP answers.

It removes URL query strings (SAS tokens, presigned signatures) and user:password parts, the
values of secret keys in connection strings (`AccountKey=`, `SharedAccessSignature=`, ...),
bearer tokens, and every literal value of a secret-looking environment variable (names with
KEY, SECRET, TOKEN, PASSWORD, SAS, CREDENTIAL or CONNECTION_STRING), wherever it appears.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

MARK = "<redacted>"
_QUERY = re.compile(r"((?:https?|s3|gs|az|file)://[^\s?'\"<>]*)\?[^\s'\"<>]+")
_USERINFO = re.compile(r"((?:https?|kafka|sasl_ssl)://)[^\s/@:'\"]+:[^\s/@'\"]+@")
_PAIRS = re.compile(r"\b(AccountKey|SharedAccessSignature|SharedAccessKey|Password|pwd|sig|"
                    r"aws_secret_access_key|aws_session_token|X-Amz-Signature|X-Amz-Credential|"
                    r"X-Amz-Security-Token)=([^;&\s'\"]+)", re.IGNORECASE)
_BEARER = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/-]+=*", re.IGNORECASE)
_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|SAS|CREDENTIAL|CONNECTION_STRING", re.IGNORECASE)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables (8 characters or more), longest first."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= 8}
    parts = {p.split("=", 1)[1] for v in values for p in v.split(";") if "=" in p and len(p.split("=", 1)[1]) >= 8}
    return sorted(values | parts, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    if not text:
        return text
    for value in secret_values(environ):
        text = text.replace(value, MARK)
    text = _QUERY.sub(rf"\1?{MARK}", text)
    text = _USERINFO.sub(rf"\1{MARK}@", text)
    text = _PAIRS.sub(rf"\1={MARK}", text)
    return _BEARER.sub(rf"\1 {MARK}", text)

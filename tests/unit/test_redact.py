"""A secret planted in the environment never comes out: not in a store error (so not in a
dead-letter reason, a deployment status or /health), not in a log line."""
import json
import logging

import pytest

from skyfuse.redact import MARK, redact
from skyfuse.runtime.function import JsonFormatter
from skyfuse.storage.base import StoreError

SAS = "sv=2024-08-04&ss=b&srt=sco&sp=rwdlac&se=2030-01-01T00:00:00Z&sig=Zm9vYmFyc2VjcmV0c2lnbmF0dXJl%3D"


@pytest.fixture
def planted(monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_URL", f"https://acct.blob.core.windows.net/?{SAS}")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                       "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=c2VjcmV0LWtleS12YWx1ZQ==;")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")


def leaks(text: str) -> list[str]:
    return [s for s in ("Zm9vYmFyc2VjcmV0c2lnbmF0dXJl", "c2VjcmV0LWtleS12YWx1ZQ==", "wJalrXUtnFEMI", "sig=Zm9v")
            if s in text]


def test_store_errors_carry_no_secret(planted):
    error = StoreError(f"cannot reach Azure Blob Storage at https://acct.blob.core.windows.net/?{SAS} for "
                       "az://skyfuse-azure: AccountKey=c2VjcmV0LWtleS12YWx1ZQ== refused, "
                       "key wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert not leaks(str(error)) and MARK in str(error) and "az://skyfuse-azure" in str(error)


def test_log_lines_carry_no_secret_even_in_a_traceback(planted):
    try:
        raise RuntimeError(f"upload to https://acct.blob.core.windows.net/c/x?{SAS} failed")
    except RuntimeError:
        record = logging.getLogger("t").makeRecord("t", logging.ERROR, __file__, 1, "failed: %s", (SAS,), True)
        import sys
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert not leaks(line) and json.loads(line)["level"] == "error"


def test_other_shapes_of_secrets_are_redacted():
    text = redact("kafka://user:hunter2secret@broker:9093 Authorization: Bearer eyJhbGciOi.payload.sig "
                  "https://bucket.s3.amazonaws.com/k?X-Amz-Signature=abcdef123456", environ={})
    assert "hunter2secret" not in text and "eyJhbGciOi" not in text and "abcdef123456" not in text
    assert redact("nothing secret here: az://skyfuse-azure/runs/r1", environ={}) == \
        "nothing secret here: az://skyfuse-azure/runs/r1"


def test_a_real_azure_store_error_with_a_sas_url_carries_no_secret(planted, monkeypatch):
    from skyfuse.storage.azure import AzureStore

    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    store = AzureStore("az://skyfuse-azure", account_url=f"http://127.0.0.1:1/acct?{SAS}")  # nothing listens
    with pytest.raises(StoreError) as caught:
        store.read("runs/r1/model.onnx")
    assert not leaks(str(caught.value)), str(caught.value)

"""``redact``: credentials in URIs are masked wherever text leaves the process; the rest of the text stays."""

from __future__ import annotations

import pytest

from qgdist.core.config import describe
from qgdist.core.secrets import redact, redact_config


@pytest.mark.parametrize("text, masked", [
    ("http://user:password@mlflow:5000", "http://user:***@mlflow:5000"),
    ("postgresql://mlflow:pa:ss@db.example:5432/mlflow", "postgresql://mlflow:***@db.example:5432/mlflow"),
    ("http://user:p@ss@host/x", "http://user:***@host/x"),                     # an unescaped '@' in the password
    ("https://ghp_TOKEN@github.com/org/repo", "https://***@github.com/org/repo"),   # a lone user info: a token
    ("ray://admin:pw@head:10001", "ray://admin:***@head:10001"),
    ("s3://bucket/x.tar?X-Amz-Signature=abc&X-Amz-Credential=AKIA/1&part=1",
     "s3://bucket/x.tar?X-Amz-Signature=***&X-Amz-Credential=***&part=1"),
    ("http://h/?access_token=t0k&page=2", "http://h/?access_token=***&page=2"),
    ("at http://u:pw@a and http://v:pw2@b:1/c.", "at http://u:***@a and http://v:***@b:1/c."),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),                         # nothing to mask
    ("sqlite:////runs/x/mlflow/mlflow.db", "sqlite:////runs/x/mlflow/mlflow.db"),
    ("runs/a=b/c", "runs/a=b/c"),
    ("user@example.org", "user@example.org"),                                   # not a URI
])
def test_redact_masks_credentials_and_only_them(text: str, masked: str) -> None:
    assert redact(text) == masked
    assert redact(masked) == masked


def test_redact_config_walks_nested_data_and_describe_uses_it() -> None:
    from qgdist.train.config import TrainConfig

    doc = {"a": ["http://u:secret@h", ("x", "http://u:secret@h")], "b": {"c": "http://u:secret@h"}, "n": 3}
    assert "secret" not in repr(redact_config(doc)) and redact_config(doc)["n"] == 3
    cfg = TrainConfig.of(data="d", model="resnet15", tracking_uri="http://me:secret@mlflow:5000",
                         address="ray://me:secret@head:10001")
    text = describe(cfg)
    assert "secret" not in text and "http://me:***@mlflow:5000" in text and "ray://me:***@head:10001" in text
    assert cfg.tracking.tracking_uri == "http://me:secret@mlflow:5000"   # the run itself uses the real one

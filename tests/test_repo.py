"""Repository hygiene: ruff is clean, and CI runs exactly the README's test command."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.+?)\n```", text, re.S)
    assert match, "README.md must mark its test command with <!-- test-command -->"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_test_command() in [line.strip() for line in ci]


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the [dev] extra)")
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_main_job_needs_no_extras():
    """The main-job command installs plain featsim (no [torch], no [tfds]) and runs
    `featsim distance` with no flags; test_cli_distance.py runs that job in-process.
    (Every README code block runs in tests/test_docs.py.)"""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- main-job -->\s*```(?:bash|sh)?\n(.+?)\n```", text, re.S)
    assert match, "README.md must mark its main-job command with <!-- main-job -->"
    command = match.group(1)
    assert 'pip install -e .' in command and "[" not in command
    assert command.rstrip().endswith("&& featsim distance"), command

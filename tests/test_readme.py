"""The README stays true: CI runs its test command, and its file tree names every file in the repository."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    pytest_lines = [ln for ln in ci_lines if "pytest" in ln and not ln.startswith("#") and "pip" not in ln]
    assert len(pytest_lines) == 1, pytest_lines
    command = pytest_lines[0].removeprefix("python3 ").removeprefix("python ")
    assert command in readme(), f"README does not show CI's test command {command!r}"


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if f.endswith(".py") or f.endswith(".md") and "/" in f]


def test_file_tree_names_every_source_file():
    text = readme()
    block = text[text.index("## Files"):]
    missing = []
    for f in tracked_files():
        name = f.rsplit("/", 1)[-1]
        if not re.search(rf"(^|[\s/]){re.escape(name)}(\s|$)", block, re.M):
            missing.append(f)
    assert not missing, f"README file tree lacks: {missing}"

"""The README stays true: its run command installs CPU torch at CI's pin and runs `python train.py`, CI runs its test
command, and its file tree names every file in the repository."""
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


def bash_blocks(section: str) -> list[str]:
    text = readme()
    body = text[text.index(section):]
    body = body[: body.index("\n## ", 1)] if "\n## " in body[1:] else body
    return re.findall(r"```bash\n(.*?)```", body, re.S)


def test_the_run_command_installs_cpu_torch_and_runs_the_default_job():
    run = [c.strip() for c in bash_blocks("## Two commands")[0].strip().split("&&")]
    assert run[-1] == "python train.py"  # the main job on the embedded default, not --help
    assert "pip install -e ." in run
    ci = (ROOT / ".ci" / "run").read_text()
    ci_pin = re.search(r"pip install -q (torch==[\d.]+)", ci).group(1)
    assert run[0] == f"pip install {ci_pin} --index-url https://download.pytorch.org/whl/cpu"  # CI's version, CPU build
    assert f"pip install {ci_pin} && pip install -e ." in readme()  # what a GPU user runs instead


def test_ci_installs_what_the_readme_test_command_installs():
    test = bash_blocks("## Two commands")[1].strip()
    assert test == 'pip install -e ".[test]" && python -m pytest -q tests'
    assert 'pip install -q -e ".[test]"' in (ROOT / ".ci" / "run").read_text()


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


def test_every_design_citation_points_to_a_section_of_design_md():
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "DESIGN.md").read_text(), re.M))
    cited = {}
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for f in out.splitlines():
        if f.endswith((".py", ".md")) and f not in ("DESIGN.md", "BENCHMARKS.md"):
            for m in re.finditer(r"DESIGN(?:\.md)? §(\d+)", (ROOT / f).read_text(encoding="utf-8")):
                cited.setdefault(m.group(1), []).append(f)
    assert cited, "no citation found: the pattern is wrong"
    missing = {n: files for n, files in cited.items() if n not in sections}
    assert not missing, f"DESIGN.md has no section for {missing}"


def test_the_rl_step_walkthrough_names_real_functions():
    """Every function or class the README's "One RL step, file by file" names exists in train.py or in a file
    that section names (a renamed or moved function makes the walkthrough false)."""
    text = readme()
    body = text[text.index("## One RL step, file by file"):]
    body = body[:body.index("\n## ", 1)]
    files = {"train.py"} | set(re.findall(r"`((?:memrl|kernels)/\w+\.py)`", body))
    sources = {f: (ROOT / f).read_text(encoding="utf-8") for f in files}
    names = {n for n in re.findall(r"`([A-Za-z_]\w*(?:\.\w+)?)(?:\(\))?`", body) if not n.endswith((".py", ".jsonl"))}
    assert {"rollout", "episode_score", "policy_loss"} <= names, names  # the pattern still finds them
    missing = []
    for name in sorted(names):
        last = name.rsplit(".", 1)[-1]
        defined = re.compile(rf"^\s*(?:def|class)\s+{last}\b|^{last}\s*[:=]", re.M)
        if not any(defined.search(src) for src in sources.values()):
            missing.append(name)
    assert not missing, f"the walkthrough names what none of {sorted(files)} defines: {missing}"

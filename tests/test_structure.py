"""The layering readers rely on (issue 16), read from the source with `ast`, nothing imported:

- the library never imports a script: no module under memrl/ imports train, evaluate, setup, scripts.* or
  benchmarks.* (the scripts import the library, never the other way);
- one direction between memrl and data_tools: data_tools imports memrl (the schema, the generator, noise
  placement); memrl imports nothing from data_tools (a chunker it needs is passed in by the script);
- train.py reads on one screen: every line <= 100 characters, the loop over steps <= 60 lines of calls.

Every import statement counts, at any depth (a function-local import too), relative ones resolved, and so does
importlib.import_module / __import__ with a literal name. Each check names the file and line it objects to.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train", "evaluate", "setup", "scripts", "benchmarks")  # top-level names the library may not import
MAX_TRAIN_LINE = 100
MAX_LOOP_LINES = 60  # rollout -> reward -> advantage -> loss -> step -> log, helpers above it


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import in the file at `path` (a module of the tree under `root`).
    `from a import b` yields both a and a.b (b may be a submodule); relative imports are resolved."""
    package = list(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module.split(".") if node.module else []
            if node.level:  # from . import x: the file's package; each extra dot goes one package up
                base = package[:len(package) - (node.level - 1)] + base
            if base:
                found.append((node.lineno, ".".join(base)))
            found += [(node.lineno, ".".join(base + [alias.name])) for alias in node.names if alias.name != "*"]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.append((node.lineno, node.args[0].value))
    return found


def offending_imports(package_dir: Path, root: Path, forbidden: tuple[str, ...]) -> list[str]:
    """`file:line imports module` for every import, in any .py under package_dir, of a module whose top-level name
    is in `forbidden`."""
    bad = []
    for path in sorted(package_dir.rglob("*.py")):
        for line, module in imported_modules(path, root):
            if module.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(root)}:{line} imports {module}")
    return sorted(set(bad))


def test_the_library_imports_no_script():
    bad = offending_imports(ROOT / "memrl", ROOT, SCRIPTS)
    assert not bad, "memrl/ must not import the scripts (they import it):\n" + "\n".join(bad)


def test_memrl_imports_nothing_from_data_tools():
    bad = offending_imports(ROOT / "memrl", ROOT, ("data_tools",))
    assert not bad, "the direction is data_tools -> memrl; memrl imports from data_tools:\n" + "\n".join(bad)
    users = offending_imports(ROOT / "data_tools", ROOT, ("memrl",))
    assert users, "data_tools imports nothing from memrl: the checked direction no longer describes the code"


def test_the_checks_catch_every_kind_of_import(tmp_path):
    """The checker itself can fail: a planted module with each kind of forbidden import is named, line by line."""
    pkg = tmp_path / "memrl"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "ok.py").write_text("import torch\nfrom memrl import model\nfrom . import config\n")
    (pkg / "sub" / "bad.py").write_text(
        "import train\n"                                      # 1: a script, plainly
        "def f():\n"
        "    from evaluate import main\n"                     # 3: function-local
        "from scripts.gguf_to_hf import convert\n"            # 4: a scripts.* module
        "from ... import benchmarks\n"                        # 5: relative, up to the top level
        "import importlib\n"
        "x = importlib.import_module('setup')\n"              # 7: by name
        "from data_tools.noise import place\n")               # 8: the wrong direction
    scripts = offending_imports(pkg, tmp_path, SCRIPTS)
    assert scripts == ["memrl/sub/bad.py:1 imports train", "memrl/sub/bad.py:3 imports evaluate",
                       "memrl/sub/bad.py:3 imports evaluate.main", "memrl/sub/bad.py:4 imports scripts.gguf_to_hf",
                       "memrl/sub/bad.py:4 imports scripts.gguf_to_hf.convert",
                       "memrl/sub/bad.py:5 imports benchmarks", "memrl/sub/bad.py:7 imports setup"], scripts
    data = offending_imports(pkg, tmp_path, ("data_tools",))
    assert data == ["memrl/sub/bad.py:8 imports data_tools.noise", "memrl/sub/bad.py:8 imports data_tools.noise.place"]


def test_train_py_lines_fit_100_characters():
    lines = (ROOT / "train.py").read_text(encoding="utf-8").splitlines()
    long = [f"train.py:{i}: {len(ln)} characters" for i, ln in enumerate(lines, 1) if len(ln) > MAX_TRAIN_LINE]
    assert not long, "\n".join(long)


def test_the_training_loop_fits_one_screen():
    tree = ast.parse((ROOT / "train.py").read_text(encoding="utf-8"))
    loops = [n for n in tree.body if isinstance(n, ast.For) and isinstance(n.target, ast.Name)
             and n.target.id == "step"]
    assert len(loops) == 1, "train.py should hold one top-level `for step in ...` loop"
    length = loops[0].end_lineno - loops[0].lineno + 1
    assert length <= MAX_LOOP_LINES, f"train.py:{loops[0].lineno}: the step loop is {length} lines"

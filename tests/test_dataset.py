"""Contributor discovery: by folder, by CSV manifest, by filename prefix; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from datacredit.dataset import DatasetError, discover
from datacredit.spec import ContributorsSpec, DatasetSpec
from datacredit.storage import S3Options


def touch(root: Path, *paths: str) -> None:
    for p in paths:
        f = root / p
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"not decoded here")


def test_by_folder(tmp_path: Path) -> None:
    touch(tmp_path, "monet/1.png", "monet/2.JPG", "van gogh/a.jpeg", "loose.png", "monet/notes.txt")
    d = discover(DatasetSpec(images=str(tmp_path)), S3Options())
    assert d.contributors == {"monet": ["monet/1.png", "monet/2.JPG"], "van gogh": ["van gogh/a.jpeg"]}
    assert d.ignored == [{"path": "loose.png", "reason": "not inside a contributor folder"}]


def test_by_prefix(tmp_path: Path) -> None:
    touch(tmp_path, "monet_1.png", "monet_2.png", "degas_x.png", "nosep.png")
    spec = DatasetSpec(images=str(tmp_path), contributors=ContributorsSpec(by="filename-prefix"))
    d = discover(spec, S3Options())
    assert sorted(d.contributors) == ["degas", "monet"]
    assert d.ignored[0]["path"] == "nosep.png"


def test_by_manifest_and_empty_contributor(tmp_path: Path) -> None:
    touch(tmp_path / "img", "1.png", "2.png", "3.png")
    csv = tmp_path / "who.csv"
    csv.write_text("path,contributor\n1.png,ann\n2.png,bob\n3.png,bob\n")
    spec = DatasetSpec(images=str(tmp_path / "img"),
                       contributors=ContributorsSpec(by="manifest", manifest=str(csv)))
    assert discover(spec, S3Options()).contributors == {"ann": ["1.png"], "bob": ["2.png", "3.png"]}
    csv.write_text("path,contributor\n1.png,ann\n2.png,bob\nmissing.png,cy\n")
    with pytest.raises(DatasetError, match="cy"):
        discover(spec, S3Options())


def test_no_images_or_one_contributor(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no PNG or JPEG"):
        discover(DatasetSpec(images=str(tmp_path)), S3Options())
    touch(tmp_path, "solo/1.png")
    with pytest.raises(DatasetError, match="at least 2"):
        discover(DatasetSpec(images=str(tmp_path)), S3Options())

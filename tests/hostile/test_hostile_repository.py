"""A bad image in a repository: gc reports it and keeps what it may need,
fsck names it, import-image refuses it (nothing stored)."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from pathlib import Path

import pytest

import hostilelib as H
from composefs import fsverity
from composefs.erofs import reader
from composefs.errors import ImageError
from composefs.repository import Repository

FILES = [bytes([i]) * 1000 for i in range(3)]


def _setup(repo: Repository) -> tuple[list[str], str, str]:
    digests = [repo.ensure_object(f) for f in FILES]
    loose = repo.ensure_object(b"L" * 300)
    good = repo.commit_image(H.deep_chain(1), "good")
    return digests, loose, good


def test_gc_survives_bad_images(repo: Repository) -> None:
    digests, loose, _ = _setup(repo)
    rng = random.Random(2)
    for cls, image in H.bad_images(rng, digests):
        try:
            reader.read_image(image)
            continue  # a bit flip the reader tolerates: not a bad image
        except ImageError:
            pass
        repo.ensure_object(b"L" * 300)
        for f in FILES:
            repo.ensure_object(f)  # collected with the previous bad image
        bad = repo.write_image(image, "bad")  # unvalidated, as older tools stored it
        result = repo.gc()
        assert [p for p, _ in result.unreadable] == [f"images/{bad}"], cls
        assert "invalid composefs image" in result.unreadable[0][1]
        assert not repo.has_object(loose), cls  # the rest is collected
        if cls in ("deep-2100", "deep-2100-v0", "escaped-whiteout-v2"):
            assert all(repo.has_object(d) for d in digests), cls  # what it names is kept
        assert repo.has_object(bad)
        fsck = repo.fsck()
        assert "image-invalid" in fsck.kinds() and any(bad in str(e) for e in fsck.errors), cls
        (Path(repo.path) / "images/refs/bad").unlink()
        repo.gc()
        assert not repo.has_object(bad)


def test_gc_keeps_everything_for_an_unreadable_stream(repo: Repository) -> None:
    _, loose, _ = _setup(repo)
    w = repo.create_stream(0)
    w.write_inline(b"x")
    stream_id = repo.write_stream(w, "s", "s")
    path = Path(repo.path) / "objects" / stream_id[:2] / stream_id[2:]
    path.write_bytes(b"garbage" * 20)
    result = repo.gc()
    assert result.kept_everything and result.unreadable[0][0] == "streams/s"
    assert repo.has_object(loose) and result.objects_removed == 0


def test_cli_gc_reports_and_exits_zero(tmp_path: Path) -> None:
    r, _ = Repository.init(tmp_path / "repo", insecure=True)
    with r:
        digests = _setup(r)[0]
        image = next(i for c, i in H.bad_images(random.Random(1), digests) if c == "deep-2100")
        bad = r.write_image(image, "bad")
    cfsctl = [str(Path(sys.executable).parent / "cfsctl"), "--repo", str(tmp_path / "repo")]
    p = subprocess.run([*cfsctl, "gc"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert f"warning: images/{bad}: invalid composefs image" in p.stderr
    assert "Objects: 1 removed" in p.stdout
    p = subprocess.run([*cfsctl, "fsck"], capture_output=True, text=True)
    assert p.returncode != 0 and f"images/{bad}" in p.stdout + p.stderr


def test_import_image_checks_what_it_stores(repo: Repository) -> None:
    """Mutated images: stored only if the reader accepts them (600 of 600
    were stored before, readable or not)."""
    good = H.mkfs_v(H.deep_chain(3), 0)
    rng = random.Random(3)
    stored = refused = 0
    for _ in range(300):
        img = bytearray(good)
        for _ in range(rng.randrange(1, 6)):
            img[rng.randrange(len(img))] ^= 1 << rng.randrange(8)
        try:
            oid = repo.import_image(io.BytesIO(bytes(img)))
        except ImageError as e:
            assert str(e).startswith("import-image: invalid composefs image")
            assert not repo.has_object(fsverity.digest_hex(bytes(img), "sha512"))
            refused += 1
        else:
            reader.read_image(repo.read_image(oid))
            stored += 1
    assert refused > 0 and stored > 0
    for bad in (b"", b"\n", b"garbage"):
        with pytest.raises(ImageError):
            repo.import_image(io.BytesIO(bad))

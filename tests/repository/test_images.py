"""`repository.images`: image commit, import, open and the objects an image references.

See repotestlib for the shared helpers.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from repotestlib import (
    bare_store,
    tree_with,
)

from composefs import fsverity
from composefs.errors import NotFoundError, RepositoryError
from composefs.repository import (
    FormatConfig,
    ImageStore,
    Repository,
)
from composefs.tree import Directory, Leaf, Regular, Stat


def test_images(repo: Repository) -> None:
    root = tree_with(repo, {"a": b"A" * 5000, "small": b"tiny"})
    oid = repo.commit_image(root, "mine")
    fd, verity = repo.open_image(oid)
    os.close(fd)
    assert verity is False  # insecure repository: overlayfs won't require verity
    assert repo.objects_for_image("refs/mine") == [fsverity.digest_hex(b"A" * 5000, "sha512")]
    assert repo.read_image("refs/mine") == repo.read_image(oid)
    with pytest.raises(NotFoundError, match="image not found"):
        repo.open_image("refs/nope")
    os.symlink(f"../objects/{oid[:2]}/{oid[2:]}", Path(repo.path) / "images/deadbeef")
    with pytest.raises(RepositoryError, match="not a sha512 id"):
        repo.open_image("deadbeef")
    os.unlink(Path(repo.path) / "images/deadbeef")
    # By id the digest is checked (in userspace here); by ref it is not.
    path = Path(repo.path) / "objects" / oid[:2] / oid[2:]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(RepositoryError, match="mismatch"):
        repo.open_image(oid)
    os.close(repo.open_image("refs/mine")[0])

    from composefs.erofs.writer import mkfs
    from composefs.errors import ImageError

    image = mkfs(root)
    iid = repo.import_image(io.BytesIO(image), "imported")
    assert repo.read_image("refs/imported") == image
    assert iid == fsverity.digest_hex(image, "sha512")
    # what the reader refuses is not stored (nor linked)
    before = sorted(p.name for p in (Path(repo.path) / "images").iterdir())
    for bad in (b"", b"raw image bytes" * 10, image[:-1], image[:4096] + bytes(len(image) - 4096)):
        with pytest.raises(ImageError, match=r"^import-image: invalid composefs image"):
            repo.import_image(io.BytesIO(bad), "bad")
    assert sorted(p.name for p in (Path(repo.path) / "images").iterdir()) == before


def test_commit_all_formats(tmp_path: Path) -> None:
    r, _ = Repository.init(tmp_path / "r", insecure=True, formats=FormatConfig(1, (2,)))
    root = tree_with(r, {"f": b"F" * 100})
    ids = r.commit_images(root, "both")
    assert list(ids) == [1, 2] and ids[1] != ids[2]
    assert os.readlink(tmp_path / "r/images/refs/both") == f"../{ids[1]}"
    assert (tmp_path / "r/images" / ids[2]).is_symlink()
    r.close()


def test_image_store_alone(tmp_path: Path) -> None:
    """Images over a bare `ObjectStore` with a fixed format configuration."""
    store = bare_store(tmp_path / "store", "sha512")
    images = ImageStore(store, FormatConfig(1))
    root = Directory(Stat(0o755, mtime=1000))
    root.insert(
        b"/f", Leaf(Stat(0o644, mtime=1000), Regular(5000, digest=store.ensure_object(b"F" * 5000)))
    )
    ids = images.commit_images(root, "one")
    assert list(ids) == [1]
    oid = ids[1]
    assert images.read_image("refs/one") == images.read_image(oid)
    assert images.objects_for_image(oid) == [fsverity.digest_hex(b"F" * 5000, "sha512")]
    fd, verity = images.open_image(oid)
    os.close(fd)
    assert not verity  # an insecure store does not ask overlayfs for fs-verity
    store.close()

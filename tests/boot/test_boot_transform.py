"""transform_for_boot on whole trees: boot-resource discovery, /boot and
/sysroot emptied, SELinux labels; from a repository (external objects) and
from an on-disk root (no repository) — both must give the same image.
Oracles: composefs-rs's rules as pinned in its tests, fsck.erofs, and the
agreement of the two independent file-reading paths."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from composefs import dumpfile, fs
from composefs.boot import (
    PEType,
    Type1Entry,
    Type2Entry,
    UsrLibModulesVmlinuz,
    repo_file_reader,
    transform_for_boot,
)
from composefs.erofs.format import FormatVersion
from composefs.erofs.writer import mkfs
from composefs.errors import BootError
from composefs.fsverity import digest_hex
from composefs.repository import Repository
from composefs.tree import Directory, Leaf, Regular

# BLS paths are resolved against the image root (composefs-rs Type1Entry::load)
BLS = "title Test OS\nversion 6.1\nlinux /boot/vmlinuz-6.1\ninitrd /boot/initramfs-6.1.img\noptions rw\n"
FC = "/(/.*)?\tsystem_u:object_r:default_t:s0\n/usr(/.*)?\tsystem_u:object_r:usr_t:s0\n"


def esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\\x20")


def inline(path: str, data: str, mode: str = "100644") -> str:
    return f"{path} {len(data.encode())} {mode} 1 0 0 0 0.0 - {esc(data)} -\n"


def d(path: str, mtime: str = "0.0", xattr: str = "") -> str:
    return f"{path} 0 40755 2 0 0 0 {mtime} - - -{' ' + xattr if xattr else ''}\n"


def tree() -> Directory:
    text = (
        d("/")
        + d("/boot", "5.0")
        + d("/boot/EFI")
        + d("/boot/EFI/Linux")
        + inline("/boot/EFI/Linux/os.efi", "MZuki")
        + d("/boot/EFI/Linux/os.efi.extra.d")
        + inline("/boot/EFI/Linux/os.efi.extra.d/a.addon.efi", "MZaddon")
        + inline("/boot/EFI/Linux/readme.txt", "not an efi")
        + inline("/boot/initramfs-6.1.img", "INITRD")
        + d("/boot/loader")
        + d("/boot/loader/entries")
        + inline("/boot/loader/entries/a.conf", BLS)
        + inline("/boot/loader/entries/b.txt", "ignored")
        + inline("/boot/vmlinuz-6.1", "KERNEL")
        + d("/etc")
        + d("/etc/selinux")
        + inline("/etc/selinux/config", "SELINUXTYPE=targeted\n")
        + d("/etc/selinux/targeted")
        + d("/etc/selinux/targeted/contexts")
        + d("/etc/selinux/targeted/contexts/files")
        + inline("/etc/selinux/targeted/contexts/files/file_contexts", FC)
        + d("/sysroot", "9.0")
        + d("/sysroot/ostree")
        + inline("/sysroot/ostree/x", "y")
        + d("/usr", "1234.5", "security.selinux=stale")
        + d("/usr/lib")
        + inline("/usr/lib/os-release", "NAME=Test\n")
        + d("/usr/lib/modules")
        + d("/usr/lib/modules/6.1")
        + inline("/usr/lib/modules/6.1/initramfs.img", "INITRD61")
        + inline("/usr/lib/modules/6.1/vmlinuz", "VMLINUZ61")
        + inline("/usr/lib/modules/6.1/uki.efi", "MZmoduki")
        + d("/usr/lib/modules/6.2")
        + inline("/usr/lib/modules/6.2/vmlinuz", "VMLINUZ62")
        + "/usr/lib/modules/6.3 0 40755 2 0 0 0 0.0 - - -\n"
        + "/usr/lib/modules/6.3/vmlinuz 4 120777 1 0 0 0 0.0 ../x - -\n"
        + inline("/usr/lib/modules/notadir", "x")
    )
    return dumpfile.parse(text.encode())


def test_discovery_and_transform() -> None:
    root = tree()
    entries = transform_for_boot(root)
    kinds = [type(e).__name__ for e in entries]
    assert (
        kinds
        == ["Type1Entry", "Type2Entry", "Type2Entry", "Type2Entry"] + ["UsrLibModulesVmlinuz"] * 2
    )
    t1 = entries[0]
    assert isinstance(t1, Type1Entry)
    assert t1.filename == "a.conf"
    assert sorted(t1.files) == ["/boot/initramfs-6.1.img", "/boot/vmlinuz-6.1"]
    assert t1.files["/boot/vmlinuz-6.1"].data == b"KERNEL"
    t2 = [e for e in entries if isinstance(e, Type2Entry)]
    assert [(e.file_path, e.pe_type, e.kver) for e in t2] == [
        (b"os.efi", PEType.UKI, None),
        (b"os.efi.extra.d/a.addon.efi", PEType.UKI_ADDON, None),
        (b"uki.efi", PEType.UKI, b"6.1"),
    ]
    mods = [e for e in entries if isinstance(e, UsrLibModulesVmlinuz)]
    assert [(m.kver, m.initramfs is not None) for m in mods] == [("6.1", True), ("6.2", False)]
    assert mods[0].os_release is not None
    # /boot and /sysroot: empty, mtime (seconds) of /usr, own nsec kept
    for name in (b"/boot", b"/sysroot"):
        node = root.get_dir(name)
        assert node.entries == {}
        assert node.stat.mtime == 1234
    # labels
    assert root.stat.xattrs[b"security.selinux"] == b"system_u:object_r:default_t:s0"
    assert root.get_dir(b"/usr").stat.xattrs[b"security.selinux"] == b"system_u:object_r:usr_t:s0"
    # "/(/.*)?" matches only "/" itself (and "//…"): /boot gets no label
    assert b"security.selinux" not in root.get_dir(b"/boot").stat.xattrs


def test_vmlinuz_entry_text() -> None:
    """The generated BLS entry for /usr/lib/modules kernels (spec §3)."""
    root = tree()
    mods = [e for e in transform_for_boot(root) if isinstance(e, UsrLibModulesVmlinuz)]
    t1 = mods[0].into_type1(None)
    assert t1.filename == "6.1.conf"
    assert t1.entry.render() == (
        "# File created by composefs\ntitle todoOS\nversion 0-todo\n"
        "linux /6.1/vmlinuz\ninitrd /6.1/initramfs.img\n"
    )
    with pytest.raises(BootError, match=r"has no initramfs\.img"):
        mods[1].into_type1(None)
    t1b = mods[0].into_type1("myid")
    assert sorted(t1b.files) == ["/myid/initramfs.img", "/myid/vmlinuz"]


def test_relocate() -> None:
    root = tree()
    t1 = transform_for_boot(root)[0]
    assert isinstance(t1, Type1Entry)
    t1.relocate(None, "deploy1")
    assert t1.filename == "deploy1.conf"
    assert t1.entry.lines == [
        "title Test OS",
        "version 6.1",
        "linux /deploy1/vmlinuz-6.1",
        "initrd /deploy1/initramfs-6.1.img",
        "options rw",
    ]
    assert sorted(t1.files) == ["/deploy1/initramfs-6.1.img", "/deploy1/vmlinuz-6.1"]
    t1.relocate("sub", "x")
    assert t1.entry.lines[2] == "linux /sub/x/vmlinuz-6.1"


@pytest.mark.parametrize("missing", [b"boot", b"sysroot", b"usr"])
def test_required_dirs(missing: bytes) -> None:
    root = tree()
    del root.entries[missing]
    with pytest.raises(BootError, match=f"/{missing.decode()}"):
        transform_for_boot(root)


def test_bad_entries() -> None:
    root = tree()
    entries = root.get_dir(b"/boot/loader/entries")
    assert isinstance(entries.entries[b"a.conf"], Leaf)
    content = entries.entries[b"a.conf"].content  # type: ignore[union-attr]
    assert isinstance(content, Regular)
    content.data = b"linux /nonexistent\n"
    content.size = len(content.data)
    with pytest.raises(BootError, match="/nonexistent"):
        transform_for_boot(root)
    content.data = b"linux /boot\n"
    with pytest.raises(BootError, match="not a regular file"):
        transform_for_boot(root)
    entries.entries[b"dir.conf"] = Directory()
    del entries.entries[b"a.conf"]
    with pytest.raises(BootError, match="is a directory"):
        transform_for_boot(root)


def test_no_policy_strips_and_policy_dir_missing_errors() -> None:
    root = tree()
    del root.get_dir(b"/etc/selinux").entries[b"targeted"]
    with pytest.raises(BootError, match="contexts/files"):
        transform_for_boot(root)


# -- repository objects vs on-disk root ----------------------------------------


def write_root(base: Path) -> None:
    big_fc = FC + "".join(
        f"/usr/share/f{i}(/.*)?\tsystem_u:object_r:f{i}_t:s0\n" for i in range(50)
    )
    files = {
        "boot/loader/entries/a.conf": BLS + "# padding to make the entry external " * 4,
        "boot/vmlinuz-6.1": "K" * 5000,
        "boot/initramfs-6.1.img": "I" * 7000,
        "etc/selinux/config": "# comment\nSELINUX=enforcing\nSELINUXTYPE=targeted\n",
        "etc/selinux/targeted/contexts/files/file_contexts": big_fc,
        "usr/share/f3/data": "D" * 3000,
        "usr/lib/modules/6.1/vmlinuz": "V" * 4000,
        "usr/lib/modules/6.1/initramfs.img": "R" * 4000,
        "sysroot/ostree/repo/config": "x",
    }
    for rel, data in files.items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(data)
    os.link(base / "usr/share/f3/data", base / "usr/lib/data-link")
    for p in sorted(base.rglob("*"), reverse=True):
        os.utime(p, (1000, 1000), follow_symlinks=False)
    os.utime(base / "usr", (4242, 4242))


def test_repo_and_disk_paths_agree(tmp_path: Path) -> None:
    src = tmp_path / "root"
    write_root(src)
    repo, _ = Repository.init(tmp_path / "repo", algorithm="sha256", insecure=True)
    try:
        root_repo = fs.read_container_root(
            str(src), algorithm="sha256", object_sink=repo.object_sink()
        )
        entries = transform_for_boot(root_repo, repo=repo, source=str(src))
        assert [type(e).__name__ for e in entries] == ["Type1Entry", "UsrLibModulesVmlinuz"]
        t1 = entries[0]
        assert isinstance(t1, Type1Entry)
        # the kernel is an external object: read back from the repository
        kernel = t1.files["/boot/vmlinuz-6.1"]
        assert kernel.data is None
        assert repo_file_reader(repo)(kernel) == b"K" * 5000
    finally:
        repo.close()
    root_disk = fs.read_container_root(str(src), algorithm="sha256")
    assert transform_for_boot(root_disk, source=str(src)) == []
    for version in FormatVersion:
        a, b = mkfs(root_repo, version), mkfs(root_disk, version)
        assert digest_hex(a) == digest_hex(b)
    # The hardlink /usr/lib/data-link <-> /usr/share/f3/data was split (two labels).
    link = root_disk.lookup(b"/usr/lib/data-link")
    data = root_disk.lookup(b"/usr/share/f3/data")
    assert isinstance(link, Leaf) and isinstance(data, Leaf) and link is not data
    assert data.stat.xattrs[b"security.selinux"] == b"system_u:object_r:f3_t:s0"
    assert link.stat.xattrs[b"security.selinux"] == b"system_u:object_r:usr_t:s0"
    assert root_disk.get_dir(b"/boot").stat.mtime == 4242


def test_image_passes_fsck_erofs(tmp_path: Path) -> None:
    fsck = shutil.which("fsck.erofs")
    if fsck is None:
        pytest.skip("fsck.erofs not installed (make system-deps installs it)")
    src = tmp_path / "root"
    write_root(src)
    root = fs.read_container_root(str(src), algorithm="sha256")
    transform_for_boot(root, source=str(src))
    for version in FormatVersion:
        img = tmp_path / f"img{int(version)}"
        img.write_bytes(mkfs(root, version))
        subprocess.run([fsck, str(img)], check=True, capture_output=True)

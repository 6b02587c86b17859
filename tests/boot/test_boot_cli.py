"""Boot from the command line: ``cfsctl compute-karg``, ``oci pull
--bootable``, ``oci prepare-boot`` and ``composefs-setup-root``, on real
repositories, OCI layouts built with ``tests/oci/ocitestlib.py`` and, as
root, real kernel mounts (in a private mount namespace, so nothing leaks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "oci"))
import ocitestlib as L
from boottestlib import make_pe

from composefs import fs
from composefs.boot import transform_for_boot
from composefs.cli import cfsctl
from composefs.erofs.format import FormatVersion
from composefs.erofs.writer import mkfs
from composefs.fsverity import digest_hex
from composefs.repository import Repository
from testlib import needs_root

Run = Callable[..., tuple[int, str, str]]

BLS = "title Test OS\nversion 6.1\nlinux /boot/vmlinuz-6.1\ninitrd /boot/initramfs-6.1.img\n"
KERNEL = bytes(range(256)) * 64  # 16 KiB: an external object
INITRD = b"INITRD" * 2000


@pytest.fixture
def cfs(capsys: pytest.CaptureFixture[str]) -> Run:
    """``cfsctl ARGS…`` in-process: (status, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            rc = cfsctl.main(list(args))
        except SystemExit as e:
            rc = int(e.code or 0)
        out, err = capsys.readouterr()
        return rc, out, err

    return run


# -- compute-karg ------------------------------------------------------------------


def disk_root(base: Path) -> Path:
    for d in ("usr/bin", "boot/loader/entries", "sysroot", "etc", "var"):
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "usr/bin/tool").write_bytes(KERNEL)
    (base / "boot/vmlinuz-6.1").write_bytes(KERNEL)
    (base / "boot/initramfs-6.1.img").write_bytes(INITRD)
    (base / "boot/loader/entries/a.conf").write_text(BLS)
    for p in sorted(base.rglob("*"), reverse=True):
        os.utime(p, (1000, 1000))
    return base


@pytest.mark.parametrize("hash_", ["sha256", "sha512"])
def test_compute_karg_forms(tmp_path: Path, cfs: Run, hash_: str) -> None:
    root = disk_root(tmp_path / "root")
    tree = fs.read_container_root(str(root), algorithm=hash_)
    transform_for_boot(tree, source=str(root))
    want = {v: digest_hex(mkfs(tree, FormatVersion(v)), hash_) for v in (0, 1, 2)}
    base = ("--no-repo", "--hash", hash_)
    rc, out, err = cfs(*base, "compute-karg", str(root))
    assert (rc, err) == (0, "")
    assert out == f"composefs={want[2]}\n"
    rc, out, _ = cfs(*base, "compute-id", "--bootable", str(root))
    assert out == want[2] + "\n"
    for v in (0, 1):
        rc, out, _ = cfs(*base, "--erofs-version", str(v), "compute-karg", str(root))
        assert out == f"composefs.digest=v1-{hash_}-12:{want[v]}\n"
    rc, out, _ = cfs(*base, "--insecure", "compute-karg", str(root))
    assert out == f"composefs=?{want[2]}\n"
    rc, out, _ = cfs(*base, "--insecure", "--erofs-version", "1", "compute-karg", str(root))
    assert out == f"composefs.digest=?v1-{hash_}-12:{want[1]}\n"


def test_compute_karg_needs_sysroot(tmp_path: Path, cfs: Run) -> None:
    root = disk_root(tmp_path / "root")
    (root / "sysroot").rmdir()
    rc, out, err = cfs("--no-repo", "compute-karg", str(root))
    assert rc == 1 and out == ""
    assert err.startswith("cfsctl: ") and "/sysroot" in err and err.count("\n") == 1


def test_create_image_bootable_matches_compute_id(tmp_path: Path, cfs: Run) -> None:
    """create-image --bootable reads boot files back from the repository;
    compute-id --bootable reads them from disk: same image."""
    root = disk_root(tmp_path / "root")
    repo = tmp_path / "repo"
    assert (
        cfs("--repo", str(repo), "init", "--algorithm", "fsverity-sha256-12", "--insecure")[0] == 0
    )
    rc, out, err = cfs("--repo", str(repo), "create-image", "--bootable", str(root), "b")
    assert rc == 0, err
    rc, out2, _ = cfs("--repo", str(repo), "compute-id", "--bootable", str(root))
    assert out == f"sha256:{out2}"


# -- OCI -------------------------------------------------------------------------


def os_layer() -> bytes:
    return L.tar_layer(
        [
            L.directory("usr", mtime=2000),
            L.directory("usr/bin"),
            L.file("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755),
            L.directory("usr/lib"),
            L.file("usr/lib/os-release", b'NAME="Test OS"\nVERSION_ID=1\n'),
            L.directory("etc"),
            L.file("etc/hostname", b"testhost\n"),
            L.directory("var"),
            L.directory("sysroot"),
            L.directory("boot"),
        ]
    )


def bls_layer() -> bytes:
    return L.tar_layer(
        [
            L.directory("boot/loader"),
            L.directory("boot/loader/entries"),
            L.file("boot/loader/entries/test.conf", BLS.encode()),
            L.file("boot/vmlinuz-6.1", KERNEL),
            L.file("boot/initramfs-6.1.img", INITRD),
        ]
    )


def modules_layer() -> bytes:
    return L.tar_layer(
        [
            L.directory("usr/lib/modules"),
            L.directory("usr/lib/modules/6.9.0"),
            L.file("usr/lib/modules/6.9.0/vmlinuz", KERNEL),
            L.file("usr/lib/modules/6.9.0/initramfs.img", INITRD),
        ]
    )


def uki_layer(cmdline: str) -> bytes:
    uki = make_pe({".osrel": b"NAME=Test\n", ".cmdline": cmdline.encode(), ".linux": KERNEL})
    return L.tar_layer(
        [
            L.directory("boot/EFI"),
            L.directory("boot/EFI/Linux"),
            L.file("boot/EFI/Linux/test.efi", uki),
        ]
    )


@pytest.fixture
def sysroot(tmp_path: Path) -> Iterator[tuple[Path, Repository]]:
    """<tmp>/sysroot with an (insecure, sha256) repository at sysroot/composefs."""
    s = tmp_path / "sysroot"
    s.mkdir()
    repo, _ = Repository.init(s / "composefs", algorithm="sha256", insecure=True)
    repo.close()
    yield s, repo


def pull(cfs: Run, repo: Path, layout: Path, tag: str, *extra: str) -> str:
    rc, out, err = cfs("--repo", str(repo), "oci", "pull", *extra, f"oci:{layout}:{tag}", tag)
    assert rc == 0, err
    return out


def layout_with(tmp_path: Path, name: str, layers: list[bytes], tag: str) -> Path:
    path = tmp_path / name
    L.write_oci_layout(path, [L.ImageSpec(layers, tag=tag)])
    return path


def test_pull_bootable(tmp_path: Path, cfs: Run, sysroot: tuple[Path, Repository]) -> None:
    s, _ = sysroot
    repo = s / "composefs"
    lay = layout_with(tmp_path, "lay", [os_layer(), bls_layer()], "v1")
    out = pull(cfs, repo, lay, "v1", "--bootable")
    boot_line = [x for x in out.splitlines() if x.startswith("Boot image: ")]
    assert len(boot_line) == 1
    boot_id = boot_line[0].removeprefix("Boot image: ")
    rc, out, _ = cfs("--repo", str(repo), "oci", "inspect", "v1")
    info = json.loads(out)
    assert info["composefs_boot_erofs"] == boot_id
    assert info["composefs_erofs"] != boot_id
    rc, out, _ = cfs("--repo", str(repo), "oci", "compute-id", "--bootable", "v1")
    assert out.strip() == boot_id
    assert (repo / "images" / boot_id).exists()
    # the bootable filesystem: /boot emptied, its mtime from /usr
    rc, out, _ = cfs("--repo", str(repo), "oci", "dump", "--bootable", "v1")
    assert rc == 0
    lines = {ln.split(" ")[0]: ln for ln in out.splitlines()}
    assert "/boot/vmlinuz-6.1" not in lines and "/boot" in lines
    assert lines["/boot"].split(" ")[7] == "2000.0"
    _rc, plain, _ = cfs("--repo", str(repo), "oci", "dump", "v1")
    assert "/boot/vmlinuz-6.1 " in plain
    # gc keeps the boot image (rooted through the tag's config stream)
    assert cfs("--repo", str(repo), "gc")[0] == 0
    assert (repo / "images" / boot_id).exists()


def test_prepare_boot_bls(tmp_path: Path, cfs: Run, sysroot: tuple[Path, Repository]) -> None:
    s, _ = sysroot
    repo = s / "composefs"
    lay = layout_with(tmp_path, "lay", [os_layer(), bls_layer(), modules_layer()], "os")
    pull(cfs, repo, lay, "os")
    rc, out, _ = cfs("--repo", str(repo), "oci", "compute-id", "--bootable", "os")
    image_id = out.strip()
    bootdir = tmp_path / "bootdir"
    rc, out, err = cfs(
        "--repo", str(repo), "oci", "prepare-boot", "os", "--bootdir", str(bootdir),
        "--cmdline", "console=ttyS0", "--cmdline", "rw",
    )  # fmt: skip
    assert (rc, out, err) == (0, "", "")
    # The first entry (Type 1 from /boot/loader/entries) is written as is,
    # plus the options line; its files land at their entry paths.
    assert (bootdir / "loader/entries/test.conf").read_text() == (
        BLS + f"options composefs=?{image_id} console=ttyS0 rw\n"
    )
    assert (bootdir / "boot/vmlinuz-6.1").read_bytes() == KERNEL
    assert (bootdir / "boot/initramfs-6.1.img").read_bytes() == INITRD
    state = s / "state" / "deploy" / image_id
    for sub in ("var", "etc/upper", "etc/work"):
        assert (state / sub).is_dir()
    # GC-rooted even without any tag (the reference quirk, fixed)
    assert os.readlink(repo / "images/refs/boot" / image_id).endswith(image_id)
    assert cfs("--repo", str(repo), "oci", "untag", "os")[0] == 0
    assert cfs("--repo", str(repo), "gc")[0] == 0
    assert (repo / "images" / image_id).exists()
    Repository.open(repo).read_image(image_id)  # digest still verifies


def test_prepare_boot_entry_id_and_vmlinuz(
    tmp_path: Path, cfs: Run, sysroot: tuple[Path, Repository]
) -> None:
    s, _ = sysroot
    repo = s / "composefs"
    lay = layout_with(tmp_path, "lay", [os_layer(), modules_layer()], "k")
    pull(cfs, repo, lay, "k")
    image_id = cfs("--repo", str(repo), "oci", "compute-id", "--bootable", "k")[1].strip()
    bootdir = tmp_path / "bootdir"
    rc, _, err = cfs(
        "--repo", str(repo), "oci", "prepare-boot", "k", "--bootdir", str(bootdir),
        "--entry-id", "deploy1",
    )  # fmt: skip
    assert rc == 0, err
    assert (bootdir / "loader/entries/deploy1.conf").read_text() == (
        "# File created by composefs\ntitle todoOS\nversion 0-todo\n"
        "linux /deploy1/vmlinuz\ninitrd /deploy1/initramfs.img\n"
        f"options composefs=?{image_id}\n"
    )
    assert (bootdir / "deploy1/vmlinuz").read_bytes() == KERNEL
    assert (bootdir / "deploy1/initramfs.img").read_bytes() == INITRD


def test_prepare_boot_v1_repo_karg(tmp_path: Path, cfs: Run) -> None:
    repo = tmp_path / "sys" / "composefs"
    rc, _, err = cfs(
        "--repo",
        str(repo),
        "init",
        "--algorithm",
        "fsverity-sha256-12",
        "--insecure",
        "--erofs-version",
        "1",
    )
    assert rc == 0, err
    lay = layout_with(tmp_path, "lay", [os_layer(), modules_layer()], "k")
    pull(cfs, repo, lay, "k")
    image_id = cfs("--repo", str(repo), "oci", "compute-id", "--bootable", "k")[1].strip()
    bootdir = tmp_path / "bootdir"
    assert cfs("--repo", str(repo), "oci", "prepare-boot", "k", "--bootdir", str(bootdir))[0] == 0
    text = (bootdir / "loader/entries/6.9.0.conf").read_text()
    assert text.endswith(f"options composefs.digest=?v1-sha256-12:{image_id}\n")


def test_prepare_boot_uki(tmp_path: Path, cfs: Run, sysroot: tuple[Path, Repository]) -> None:
    s, _ = sysroot
    repo = s / "composefs"
    # /boot is emptied, so the UKI does not change the image it names.
    base = layout_with(tmp_path, "base", [os_layer()], "base")
    pull(cfs, repo, base, "base")
    image_id = cfs("--repo", str(repo), "oci", "compute-id", "--bootable", "base")[1].strip()
    good = layout_with(tmp_path, "good", [os_layer(), uki_layer(f"composefs=?{image_id} rw")], "u")
    pull(cfs, repo, good, "u")
    bootdir = tmp_path / "bootdir"
    rc, _, err = cfs("--repo", str(repo), "oci", "prepare-boot", "u", "--bootdir", str(bootdir))
    assert rc == 0, err
    assert (bootdir / "EFI/Linux/test.efi").read_bytes()[:2] == b"MZ"
    rc, _, err = cfs(
        "--repo", str(repo), "oci", "prepare-boot", "u", "--bootdir", str(bootdir / "x"),
        "--cmdline", "quiet",
    )  # fmt: skip
    assert rc == 1 and "Can't add --cmdline args to UKIs" in err
    # --entry-id renames the UKI
    rc, _, err = cfs(
        "--repo", str(repo), "oci", "prepare-boot", "u", "--bootdir", str(bootdir),
        "--entry-id", "mine",
    )  # fmt: skip
    assert rc == 0 and (bootdir / "EFI/Linux/mine.efi").is_file()
    # a UKI naming another image is refused and nothing is written
    bad = layout_with(tmp_path, "bad", [os_layer(), uki_layer("composefs=" + "0" * 64)], "b")
    pull(cfs, repo, bad, "b")
    bad_boot = tmp_path / "badboot"
    rc, _, err = cfs("--repo", str(repo), "oci", "prepare-boot", "b", "--bootdir", str(bad_boot))
    assert rc == 1 and "wrong composefs digest" in err and err.count("\n") == 1
    assert not (bad_boot / "EFI/Linux/test.efi").exists()
    assert not any(p.is_file() for p in bad_boot.rglob("*"))
    # a failed prepare-boot roots nothing: in a fresh repository no boot ref
    # is left behind
    fresh = tmp_path / "fresh" / "composefs"
    fresh.parent.mkdir()
    Repository.init(fresh, algorithm="sha256", insecure=True)[0].close()
    pull(cfs, fresh, bad, "b")
    rc, _, err = cfs("--repo", str(fresh), "oci", "prepare-boot", "b", "--bootdir", str(bad_boot))
    assert rc == 1 and "wrong composefs digest" in err
    assert list((fresh / "images/refs/boot").iterdir()) == []


def test_prepare_boot_without_entries(
    tmp_path: Path, cfs: Run, sysroot: tuple[Path, Repository]
) -> None:
    s, _ = sysroot
    repo = s / "composefs"
    pull(cfs, repo, layout_with(tmp_path, "l", [os_layer()], "n"), "n")
    rc, _, err = cfs("--repo", str(repo), "oci", "prepare-boot", "n", "--bootdir", str(tmp_path))
    assert rc == 1 and err == "cfsctl: No boot entries!\n"


# -- composefs-setup-root -----------------------------------------------------------

SETUP = r"""
import json, os, sys
from composefs.cli import setup_root
s, args = sys.argv[1], sys.argv[2:]
try:
    rc = setup_root.main(["--sysroot", s, *args])
except SystemExit as e:
    rc = e.code
obs = {"rc": rc}
if rc == 0:
    obs["tool"] = open(f"{s}/usr/bin/tool").read()
    obs["hostname"] = open(f"{s}/etc/hostname").read()
    obs["sysroot_has_repo"] = os.path.isdir(f"{s}/sysroot/composefs/objects")
    for d in ("etc", "var", "usr"):
        try:
            with open(f"{s}/{d}/new", "w") as f:
                f.write(d + "!")
            obs[d + "_writable"] = True
        except OSError:
            obs[d + "_writable"] = False
mounts = [ln.split()[4] for ln in open("/proc/self/mountinfo")]
obs["mounts"] = [m for m in mounts if m.startswith(s)]
print(json.dumps(obs))
"""


def setup_root_in_namespace(s: Path, *args: str) -> tuple[dict[str, Any], str]:
    unshare = "/usr/bin/unshare"
    p = subprocess.run(
        [unshare, "--mount", "--propagation", "private", sys.executable, "-c", SETUP, str(s), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.stdout, p.stderr
    return json.loads(p.stdout), p.stderr


@needs_root
def test_setup_root_mounts(tmp_path: Path, cfs: Run, sysroot: tuple[Path, Repository]) -> None:
    s, _ = sysroot
    repo = s / "composefs"
    lay = layout_with(tmp_path, "lay", [os_layer(), modules_layer()], "os")
    pull(cfs, repo, lay, "os")
    rc, _, err = cfs(
        "--repo", str(repo), "oci", "prepare-boot", "os", "--bootdir", str(tmp_path / "b")
    )
    assert rc == 0, err
    image_id = cfs("--repo", str(repo), "oci", "compute-id", "--bootable", "os")[1].strip()
    state = s / "state" / "deploy" / image_id
    cmdline = f"root=/dev/vda quiet composefs=?{'1' * 64} composefs=?{image_id}"
    obs, err = setup_root_in_namespace(s, "--cmdline", cmdline, "--config", "/nonexistent")
    assert obs["rc"] == 0, err
    assert f"image {'1' * 64} not found, trying next karg" in err
    assert obs["tool"] == "#!/bin/sh\necho tool\n"
    assert obs["hostname"] == "testhost\n"
    assert obs["sysroot_has_repo"] is True
    assert (obs["etc_writable"], obs["var_writable"], obs["usr_writable"]) == (True, True, False)
    assert set(obs["mounts"]) == {
        str(s),
        f"{s}/sysroot",
        f"{s}/etc",
        f"{s}/var",
    }
    # /etc writes went to the state overlay, /var is the state directory
    assert (state / "etc/upper/new").read_text() == "etc!"
    assert (state / "var/new").read_text() == "var!"
    assert (state / "etc/upper").stat().st_mode & 0o777 == 0o755
    assert (state / "etc/work").is_dir()  # made by prepare-boot (0755), kept as is
    # the namespace is gone: nothing stays mounted here
    assert str(s) not in Path("/proc/self/mountinfo").read_text()

    # transient /etc, no /var mount: nothing reaches the state directory
    conf = tmp_path / "conf.toml"
    conf.write_text('[etc]\nmount = "transient"\n[var]\nmount = "none"\n')
    (state / "etc/upper/new").unlink()
    (state / "var/new").unlink()
    obs, err = setup_root_in_namespace(
        s, "--cmdline", f"composefs=?{image_id}", "--config", str(conf)
    )
    assert obs["rc"] == 0, err
    # /etc is a tmpfs-backed overlay, /var the image's (read-only) directory
    assert (obs["etc_writable"], obs["var_writable"]) == (True, False)
    assert set(obs["mounts"]) == {str(s), f"{s}/sysroot", f"{s}/etc"}
    assert not (state / "etc/upper/new").exists()

    # failures: one line, nothing left mounted
    for args, msg in [
        (["--cmdline", "quiet"], "no composefs karg found"),
        (["--cmdline", f"composefs=?{'2' * 64}"], "no composefs image found"),
        (["--cmdline", "composefs=abc"], "digest length"),
        (["--cmdline", f"composefs={image_id}"], "fs-verity"),
    ]:
        obs, err = setup_root_in_namespace(s, *args, "--config", "/nonexistent")
        assert obs["rc"] == 1 and msg in err, (args, err)
        assert err.splitlines()[-1].startswith("composefs-setup-root: ")
        assert obs["mounts"] == [], (args, obs)


def test_setup_root_config_parsing() -> None:
    from composefs.cli.setup_root import Config, parse_config
    from composefs.errors import BootError

    c = parse_config('[root]\ntransient = true\n[etc]\nmount = "bind"\n[var]\ntransient = true\n')
    assert c.root_transient
    assert c.etc is not None and c.etc.effective("overlay") == "bind"
    assert c.var is not None and c.var.effective("bind") == "transient"
    assert parse_config("") == Config(False, c.etc.__class__(), c.etc.__class__())
    for bad in ('[etc]\nmount = "tmpfs"\n', "[root]\ntransient = 1\n", "x = [", "etc = 3\n"):
        with pytest.raises(BootError):
            parse_config(bad)


MOUNT = r"""
import json, os, sys
from composefs.cli import cfsctl
repo, tag, mnt = sys.argv[1:]
rc = cfsctl.main(["--repo", repo, "oci", "mount", "--bootable", tag, mnt])
print(json.dumps({"rc": rc, "boot": sorted(os.listdir(f"{mnt}/boot")),
                  "tool": open(f"{mnt}/usr/bin/tool").read()}))
"""


@needs_root
def test_oci_mount_bootable(tmp_path: Path, cfs: Run, sysroot: tuple[Path, Repository]) -> None:
    s, _ = sysroot
    repo = s / "composefs"
    pull(cfs, repo, layout_with(tmp_path, "l", [os_layer(), bls_layer()], "os"), "os")
    rc, _, err = cfs("--repo", str(repo), "oci", "mount", "--bootable", "os", str(tmp_path))
    assert rc == 1 and "try pulling with --bootable" in err
    pull(cfs, repo, layout_with(tmp_path, "l", [os_layer(), bls_layer()], "os"), "os", "--bootable")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = subprocess.run(
        ["/usr/bin/unshare", "--mount", "--propagation", "private", sys.executable, "-c", MOUNT,
         str(repo), "os", str(mnt)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    obs = json.loads(p.stdout)
    assert obs == {"rc": 0, "boot": [], "tool": "#!/bin/sh\necho tool\n"}


@needs_root
def test_setup_root_root_fs(tmp_path: Path, sysroot: tuple[Path, Repository]) -> None:
    """--root-fs (composefs-rs's test hook): a plain directory as the new root."""
    s, _ = sysroot
    newroot = tmp_path / "newroot"
    for d in ("usr/bin", "etc", "var", "sysroot"):
        (newroot / d).mkdir(parents=True)
    (newroot / "usr/bin/tool").write_text("#!/bin/sh\necho tool\n")
    (newroot / "etc/hostname").write_text("rootfs\n")
    hex_ = "ab" * 32
    for sub in ("var", "etc/upper", "etc/work"):
        (s / "state/deploy" / hex_ / sub).mkdir(parents=True)
    obs, err = setup_root_in_namespace(
        s, "--root-fs", str(newroot), "--cmdline", f"composefs={hex_}", "--config", "/nonexistent"
    )
    assert obs["rc"] == 0, err
    assert obs["hostname"] == "rootfs\n" and obs["sysroot_has_repo"] is True
    assert (obs["etc_writable"], obs["var_writable"], obs["usr_writable"]) == (True, True, True)
    assert (s / "state/deploy" / hex_ / "etc/upper/new").read_text() == "etc!"
    assert not (newroot / "etc/new").exists()

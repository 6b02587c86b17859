"""mkcomposefs, composefs-info and composefs-dump as the user runs them:
subprocesses of the installed console scripts, checked against the C
composefs 1.0.8 test assets, the composefs-rs digests and fsverity(1)."""

from __future__ import annotations

import hashlib
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from composefs.erofs.format import FormatVersion
from composefs.erofs.reader import image_version, read_image
from testlib import need_tool
from vectorlib import C_VECTORS, LAX, c_vector_bytes

BIN = Path(sys.executable).parent
MKCOMPOSEFS = str(BIN / "mkcomposefs")
INFO = str(BIN / "composefs-info")
DUMP = str(BIN / "composefs-dump")

SHOULD_FAIL = [
    "should-fail-big-inline.dump",
    "should-fail-dir-hardlink.dump",
    "should-fail-dot-name.dump",
    "should-fail-dotdot-name.dump",
    "should-fail-empty-link-name.dump",
    "should-fail-empty-name.dump",
    "should-fail-empty-xattr-key.dump",
    "should-fail-honggfuzz-long-xattr.dump",
    "should-fail-long-link.dump",
    "should-fail-long-xattr-key.dump",
    "should-fail-long-xattr-value.dump",
    "should-fail-no-ftype.dump",
    "should-fail-self-hardlink.dump",
    "should-fail-too-big.dump",
]


def env(strict: bool) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "CFS_PARSE_STRICT"}
    if strict:
        e["CFS_PARSE_STRICT"] = "1"
    return e


def run(
    *args: str, stdin: bytes | None = None, strict: bool = True, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    r = subprocess.run(list(args), input=stdin, capture_output=True, env=env(strict), timeout=300)
    if check:
        assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r


def one_line_error(r: subprocess.CompletedProcess[bytes], prog: str) -> str:
    assert r.returncode != 0
    err = r.stderr.decode()
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"{prog}: "), err
    assert "Traceback" not in err
    return err


def version_args(vectors: Path, name: str) -> list[str]:
    vfile = vectors / "c-mkcomposefs" / f"{name}.version"
    if not vfile.exists():
        return []
    v = vfile.read_text().strip()
    return [f"--min-version={v}", f"--max-version={v}"]


# -- C test-checksums.sh ------------------------------------------------------


@pytest.mark.parametrize("name", C_VECTORS)
def test_checksums_and_reproducibility(vectors: Path, tmp_path: Path, name: str) -> None:
    """What C's tests/test-checksums.sh runs, with our tools."""
    vargs = version_args(vectors, name)
    out, out2, out3 = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "c.img"
    run(MKCOMPOSEFS, *vargs, "--from-file", "-", str(out),
        stdin=c_vector_bytes(vectors, name), strict=name not in LAX)  # fmt: skip
    expected = (vectors / "c-mkcomposefs" / f"{name}.sha256").read_text().split()[0]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected
    run(DUMP, str(out), str(out2))
    assert out2.read_bytes() == out.read_bytes(), "composefs-dump is not reproducible"
    dump = run(INFO, "dump", str(out)).stdout
    run(MKCOMPOSEFS, *vargs, "--from-file", "-", str(out3), stdin=dump)
    assert out3.read_bytes() == out.read_bytes(), "not reproducible via composefs-info dump"


@pytest.mark.parametrize("name", C_VECTORS)
def test_v2_reproducibility(vectors: Path, tmp_path: Path, name: str) -> None:
    """The same round trips for composefs-rs native images."""
    out, out2, out3 = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "c.img"
    run(MKCOMPOSEFS, "--erofs-version=2", "--from-file", "-", str(out),
        stdin=c_vector_bytes(vectors, name), strict=name not in LAX)  # fmt: skip
    assert image_version(out.read_bytes()) is FormatVersion.V2
    run(DUMP, str(out), str(out2))
    assert out2.read_bytes() == out.read_bytes()
    dump = run(INFO, "dump", str(out)).stdout
    run(MKCOMPOSEFS, "--erofs-version=2", "--from-file", "-", str(out3), stdin=dump)
    assert out3.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lax"])
@pytest.mark.parametrize("name", SHOULD_FAIL)
def test_should_fail(vectors: Path, tmp_path: Path, name: str, strict: bool) -> None:
    src = vectors / "c-mkcomposefs" / "should-fail" / name
    out = tmp_path / "out.img"
    r = run(MKCOMPOSEFS, "--from-file", str(src), str(out), strict=strict, check=False)
    one_line_error(r, "mkcomposefs")
    assert list(tmp_path.iterdir()) == [], "a rejected input left a file behind"


def test_failed_write_keeps_existing_image(vectors: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.img"
    out.write_bytes(b"old")
    src = vectors / "c-mkcomposefs" / "should-fail" / "should-fail-too-big.dump"
    one_line_error(run(MKCOMPOSEFS, "--from-file", str(src), str(out), check=False), "mkcomposefs")
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.img"]


@pytest.mark.parametrize("version", ["0", "2"])
def test_too_big_names_the_file(vectors: Path, tmp_path: Path, version: str) -> None:
    src = vectors / "c-mkcomposefs" / "should-fail" / "should-fail-too-big.dump"
    out = tmp_path / "out.img"
    r = run(MKCOMPOSEFS, f"--erofs-version={version}", "--from-file", str(src), str(out),
            check=False)  # fmt: skip
    err = one_line_error(r, "mkcomposefs")
    assert err == "mkcomposefs: /bigfile: file too large for composefs (9500000000000000 bytes)\n"
    assert not out.exists()


def test_parse_errors_name_the_line(tmp_path: Path) -> None:
    bad = b"/ 4096 40755 2 0 0 0 0.0 - - -\n/x 0 100644 1 0 0 0 zero - - -\n"
    r = run(MKCOMPOSEFS, "--from-file", "-", str(tmp_path / "o"), stdin=bad, check=False)
    assert "line 2" in one_line_error(r, "mkcomposefs")


def test_sha512_digest_is_refused_for_c_formats(tmp_path: Path) -> None:
    """C 1.0.8 ignores digest_to_raw's error and keeps the first 32 bytes of
    a 128-hex-digit digest: a sha256 metacopy that no file can match. We
    refuse it for the C formats; V2 (composefs-rs) stores sha512 digests."""
    digest = b"ab" * 64
    dump = b"/ 4096 40755 2 0 0 0 0.0 - - -\n/f 10 100644 1 0 0 0 0.0 - - " + digest + b"\n"
    for flags in ([], ["--max-version=1"], ["--erofs-version=1"]):
        out = tmp_path / "o"
        r = run(MKCOMPOSEFS, *flags, "--from-file", "-", str(out), stdin=dump, check=False)
        err = one_line_error(r, "mkcomposefs")
        assert "line 2" in err and "sha256" in err, err
        assert not out.exists()
    run(MKCOMPOSEFS, "--erofs-version=2", "--from-file", "-", str(tmp_path / "v2"), stdin=dump)
    assert digest.decode() in run(INFO, "dump", str(tmp_path / "v2")).stdout.decode()


# -- digests -----------------------------------------------------------------

RS_DIGESTS = [
    ("empty.dump", [], "8f589e8f57ecb88823736b0d857ddca1e1068a23e264fad164b28f7038eb3682"),
    ("empty.dump", ["--erofs-version", "2"],
     "086b702a519b57d6ef5aea6f8b3f2be24355cd1fb835cd80fb4e3d388b24d5a5"),
    ("simple.dump", [], "9f3f5620ee0c54708516467d0d58741e7963047c7106b245d94c298259d0fa01"),
    ("simple.dump", ["--erofs-version=2"],
     "a8fcd41f8b313bede69f462f2af0a38d64b99a6333f5df884ea9ab4037fac722"),
    ("special_v1.dump", ["--min-version=1", "--max-version=1"],
     "b1c78c25db8638be5b9b483472d32ee9624d8d32ded626a91cd536116e8df97c"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "flags", "digest"), RS_DIGESTS)
def test_print_digest_matches_composefs_rs(
    vectors: Path, tmp_path: Path, name: str, flags: list[str], digest: str
) -> None:
    src = str(vectors / "composefs-rs" / name)
    only = run(MKCOMPOSEFS, *flags, "--print-digest-only", "--from-file", src)
    assert only.stdout == f"{digest}\n".encode()
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "img"
    both = run(MKCOMPOSEFS, *flags, "--print-digest", "--from-file", src, str(out))
    assert both.stdout == f"{digest}\n".encode()
    tool = need_tool("fsverity")
    r = subprocess.run([tool, "digest", "--hash-alg=sha256", str(out)], capture_output=True)
    assert r.stdout.decode().split()[0] == f"sha256:{digest}"


def test_image_to_stdout(vectors: Path, tmp_path: Path) -> None:
    src = str(vectors / "composefs-rs" / "simple.dump")
    run(MKCOMPOSEFS, "--from-file", src, str(tmp_path / "img"))
    piped = run(MKCOMPOSEFS, "--from-file", src, "-").stdout
    assert piped == (tmp_path / "img").read_bytes()


def test_refuses_to_write_image_to_a_terminal(vectors: Path) -> None:
    src = str(vectors / "composefs-rs" / "simple.dump")
    master, slave = pty.openpty()
    try:
        r = subprocess.run([MKCOMPOSEFS, "--from-file", src, "-"], stdout=slave,
                           stderr=subprocess.PIPE, timeout=60)  # fmt: skip
    finally:
        os.close(slave)
        os.close(master)
    assert r.returncode != 0
    assert b"tty" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--print-digest-only", "SRC", "out"], "destination"),
        (["SRC"], "No destination"),
        (["--min-version=2", "SRC", "out"], "version"),
        (["--min-version=x", "SRC", "out"], "Invalid min version"),
        (["--threads=0", "SRC", "out"], "threads"),
        (["--erofs-version=2", "--min-version=1", "SRC", "out"], "erofs-version"),
        (["--erofs-version=3", "SRC", "out"], "erofs-version"),
        (["--bogus", "SRC", "out"], "bogus"),
        ([], "SOURCE"),
        (["--from-file", "/nonexistent/dump", "out"], "nonexistent"),
        (["/nonexistent/dir", "out"], "nonexistent"),
        (["SRC", "/nonexistent/out.img"], "failed to open output file '/nonexistent/out.img'"),
    ],
)
def test_usage_errors(vectors: Path, tmp_path: Path, args: list[str], message: str) -> None:
    src = str(vectors / "composefs-rs" / "simple.dump")
    argv = [src if a == "SRC" else str(tmp_path / a) if a == "out" else a for a in args]
    if "SRC" in args and "--from-file" not in args:
        argv.insert(0, "--from-file")
    err = one_line_error(run(MKCOMPOSEFS, *argv, check=False), "mkcomposefs")
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_version_flags_follow_c(tmp_path: Path) -> None:
    dump = b"/ 4096 40755 2 0 0 0 0.0 - - -\n/wh 0 20644 1 0 0 0 0.0 - - -\n"
    cases = {
        (): FormatVersion.V1,  # default 0..1: bumped for the whiteout
        ("--max-version=0",): FormatVersion.V0,  # min defaults to 0, no bump
        ("--min-version=0",): FormatVersion.V0,  # max defaults to 0 once a flag is given
        ("--min-version=1",): FormatVersion.V1,
        ("--erofs-version=2",): FormatVersion.V2,
    }
    for flags, version in cases.items():
        out = tmp_path / "img"
        run(MKCOMPOSEFS, *flags, "--from-file", "-", str(out), stdin=dump)
        assert image_version(out.read_bytes()) is version, flags


def test_help_is_fast_and_light() -> None:
    code = (
        "import sys\n"
        "from composefs.cli import mkcomposefs\n"
        "try:\n    mkcomposefs.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('composefs.erofs.writer', 'composefs.dumpfile', 'composefs.fs',"
        " 'composefs.fsverity', 'composefs.erofs.reader') if m in sys.modules]\n"
        "print(heavy, file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == 0
    assert b"SOURCE" in r.stdout
    assert r.stderr.strip() == b"[]"


# -- from a directory --------------------------------------------------------


def test_directory_source_and_digest_store(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "small").write_bytes(b"hi\n")
    big = os.urandom(10000)
    (src / "sub" / "big").write_bytes(big)
    (src / "link").symlink_to("small")
    os.utime(src / "small", (5, 5))
    store = tmp_path / "store"
    out = tmp_path / "img"
    run(MKCOMPOSEFS, "--digest-store", str(store), "--use-epoch", str(src), str(out))
    objects = run(INFO, "objects", str(out)).stdout.decode().split()
    assert len(objects) == 1
    assert (store / objects[0]).read_bytes() == big
    assert run(INFO, "missing-objects", "--basedir", str(store), str(out)).stdout == b""
    assert (
        run(INFO, "missing-objects", f"--basedir={tmp_path}", str(out)).stdout.decode().split()
        == objects
    )
    tree = read_image(out.read_bytes())
    assert tree.lookup(b"/small").stat.mtime == 0  # type: ignore[union-attr]


# -- composefs-info ------------------------------------------------------------

DIGEST = "ab" * 32
INFO_DUMP = f"""\
/ 4096 40755 3 0 0 0 0.0 - - -
/a\\x20b 0 100644 1 0 0 0 0.0 - - -
/dir 4096 40755 2 0 0 0 0.0 - - -
/dir/ext 100 100644 2 0 0 0 0.0 12/3456 - -
/dir/f 10 100644 1 0 0 0 0.0 ab/{DIGEST[2:]} - {DIGEST}
/dir/in 3 100644 1 0 0 0 0.0 - abc -
/sym 3 120777 1 0 0 0 0.0 x\\x20y - -
/z 100 @100644 2 0 0 0 0.0 /dir/ext - -
/zz 4096 40755 2 0 0 0 0.0 - - -
""".encode()


@pytest.fixture
def info_image(tmp_path: Path) -> Path:
    out = tmp_path / "info.img"
    run(MKCOMPOSEFS, "--from-file", "-", str(out), stdin=INFO_DUMP)
    return out


def test_info_ls(info_image: Path) -> None:
    expected = (
        "/a b\n"
        "/dir/\t\n"
        "/dir/ext\t@ 12/3456\n"
        f"/dir/f\t@ ab/{DIGEST[2:]}\n"
        "/dir/in\n"
        "/sym\t-> x\\x20y\n"
        "/z\n"  # a later name of a hardlinked file: path only, as C prints it
        "/zz/\t\n"
    )
    assert run(INFO, "ls", str(info_image)).stdout.decode() == expected
    filtered = run(INFO, "ls", "--filter=dir", "--filter", "sym", str(info_image)).stdout
    assert filtered.decode() == (
        f"/dir/\t\n/dir/ext\t@ 12/3456\n/dir/f\t@ ab/{DIGEST[2:]}\n/dir/in\n/sym\t-> x\\x20y\n"
    )


def test_info_dump_round_trips(info_image: Path, tmp_path: Path) -> None:
    dump = run(INFO, "dump", str(info_image)).stdout
    assert b"/z 100 @100644 2 0 0 0 0.0 /dir/ext - -\n" in dump
    again = tmp_path / "again.img"
    run(MKCOMPOSEFS, "--from-file", "-", str(again), stdin=dump)
    assert again.read_bytes() == info_image.read_bytes()


def test_info_objects_and_missing(info_image: Path, tmp_path: Path) -> None:
    objects = f"12/3456\nab/{DIGEST[2:]}\n"
    assert run(INFO, "objects", str(info_image)).stdout.decode() == objects
    # several images: one sorted, de-duplicated list
    assert run(INFO, "objects", str(info_image), str(info_image)).stdout.decode() == objects
    base = tmp_path / "objects"
    (base / "12").mkdir(parents=True)
    (base / "12" / "3456").write_bytes(b"x")
    missing = run(INFO, "missing-objects", "--basedir", str(base), str(info_image)).stdout
    assert missing.decode() == f"ab/{DIGEST[2:]}\n"


def test_info_measure_file(tmp_path: Path) -> None:
    files = {
        "hello": (
            b"hello world",
            "1e2eaa4202d750a41174ee454970b92c1bc2f925b1e35076d8c7d5f56362ba64",
        ),
        "z4095": (bytes(4095), "5372beb83c78537c8970c8361e3254119fafdf1763854ecd57d3f0fe2da7c719"),
        "z4097": (bytes(4097), "093756e4ea9683329106d4a16982682ed182c14bf076463a9e7f97305cbac743"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    paths = [str(tmp_path / n) for n in [*files, "empty"]]
    out = run(INFO, "measure-file", *paths).stdout.decode().split()
    assert out[:3] == [d for _, d in files.values()]
    tool = need_tool("fsverity")
    r = subprocess.run([tool, "digest", "--hash-alg=sha256", paths[3]], capture_output=True)
    assert r.stdout.decode().split()[0] == f"sha256:{out[3]}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "No command"),
        (["frobnicate", "IMG"], "Unknown command"),
        (["ls"], "No image"),
        (["measure-file"], "No files"),
        (["ls", "--filter=a/b", "IMG"], "single name"),
        (["missing-objects", "IMG"], "basedir"),
        (["ls", "/nonexistent.img"], "Failed to open"),
        (["objects", "--basedir=/nonexistent", "IMG"], "basedir"),
        (["ls", "CORRUPT"], "Failed to load"),
        (["dump", "NOTIMAGE"], "Failed to load"),
        (["measure-file", "/nonexistent"], "Failed to open"),
    ],
)
def test_info_errors(info_image: Path, tmp_path: Path, args: list[str], message: str) -> None:
    corrupt = tmp_path / "corrupt.img"
    data = bytearray(info_image.read_bytes())
    data[1024 + 12] = 13  # block size bits
    corrupt.write_bytes(bytes(data))
    notimage = tmp_path / "notimage"
    notimage.write_bytes(b"hello\n")
    subst = {"IMG": str(info_image), "CORRUPT": str(corrupt), "NOTIMAGE": str(notimage)}
    r = run(INFO, *[subst.get(a, a) for a in args], check=False)
    assert message in one_line_error(r, "composefs-info")
    assert r.stdout == b""


# -- composefs-dump ----------------------------------------------------------------


@pytest.mark.parametrize("flags", [[], ["--min-version=1"], ["--erofs-version=2"]])
def test_composefs_dump_keeps_the_format(vectors: Path, tmp_path: Path, flags: list[str]) -> None:
    src = str(vectors / "composefs-rs" / "special.dump")
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    run(MKCOMPOSEFS, *flags, "--from-file", src, str(a))
    run(DUMP, str(a), str(b))
    assert b.read_bytes() == a.read_bytes()


def test_composefs_dump_errors(info_image: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out.img"
    assert "No source" in one_line_error(run(DUMP, check=False), "composefs-dump")
    r = run(DUMP, str(info_image), check=False)
    assert "No destination" in one_line_error(r, "composefs-dump")
    corrupt = tmp_path / "corrupt.img"
    corrupt.write_bytes(info_image.read_bytes()[:5000])
    r = run(DUMP, str(corrupt), str(dest), check=False)
    assert "Failed to load" in one_line_error(r, "composefs-dump")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.img", "info.img"]

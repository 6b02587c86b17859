"""SELinux labelling. Expected labels are composefs-rs 0.7.0's own test
expectations (``composefs-boot/src/selabel.rs``); the PCRE translation is
checked against what PCRE means."""

from __future__ import annotations

import re

import pytest

from composefs import dumpfile
from composefs.boot import transform_for_boot
from composefs.boot.selabel import Policy, parse_spec_file, translate_pcre
from composefs.errors import BootError
from composefs.tree import Directory, Leaf, Regular, Stat, walk

SEL = b"security.selinux"
ROOT = "/ 0 40755 2 0 0 0 0.0 - - -\n"


def build(file_contexts: bytes, entries: str, extra: dict[str, bytes] | None = None) -> Directory:
    """A tree with /etc/selinux/targeted policy files plus dumpfile `entries`."""
    root = dumpfile.parse((ROOT + entries).encode())

    def mkdir(path: bytes) -> None:
        if root.lookup(path) is None:
            root.insert(path, Directory(Stat(0o755)))

    for p in (b"/etc", b"/etc/selinux", b"/etc/selinux/targeted"):
        mkdir(p)
    mkdir(b"/etc/selinux/targeted/contexts")
    mkdir(b"/etc/selinux/targeted/contexts/files")

    def put(path: str, data: bytes) -> None:
        root.insert(path.encode(), Leaf(Stat(0o644), Regular(len(data), data=data)))

    put("/etc/selinux/config", b"SELINUX=enforcing\nSELINUXTYPE=targeted\n")
    put("/etc/selinux/targeted/contexts/files/file_contexts", file_contexts)
    for name, data in (extra or {}).items():
        put(f"/etc/selinux/targeted/contexts/files/{name}", data)
    return root


def label(root: Directory, path: str) -> str | None:
    node = root.lookup(path.encode())
    assert node is not None, path
    v = node.stat.xattrs.get(SEL)
    return None if v is None else v.decode()


def relabel(root: Directory) -> None:
    from composefs.boot import _selabel_from_tree, repo_file_reader

    _selabel_from_tree(root, repo_file_reader(None))


def test_applies_correct_labels() -> None:
    fc = (
        b"/\t\tsystem_u:object_r:root_t:s0\n"
        b"/usr\t\tsystem_u:object_r:usr_t:s0\n"
        b"/usr/bin(/.*)?\t\tsystem_u:object_r:bin_t:s0\n"
        b"/etc(/.*)?\t\tsystem_u:object_r:etc_t:s0\n"
    )
    root = build(
        fc,
        "/usr 0 40755 2 0 0 0 1000.0 - - -\n"
        "/usr/bin 0 40755 2 0 0 0 1000.0 - - -\n"
        "/usr/bin/hello 21 100755 1 0 0 0 0.0 - #!/bin/sh\\necho\\x20hello\\n -\n",
    )
    relabel(root)
    assert label(root, "/") == "system_u:object_r:root_t:s0"
    assert label(root, "/usr") == "system_u:object_r:usr_t:s0"
    assert label(root, "/usr/bin") == "system_u:object_r:bin_t:s0"
    assert label(root, "/usr/bin/hello") == "system_u:object_r:bin_t:s0"
    assert label(root, "/etc") == "system_u:object_r:etc_t:s0"
    assert label(root, "/etc/selinux/config") == "system_u:object_r:etc_t:s0"


def test_strips_without_policy() -> None:
    root = dumpfile.parse(
        (ROOT + "/file 1 100644 1 0 0 0 0.0 - x - security.selinux=old_label\n").encode()
    )
    root.stat.xattrs[SEL] = b"x"
    relabel(root)
    assert label(root, "/") is None and label(root, "/file") is None
    # a config without SELINUXTYPE strips too
    root = build(b"/.* x\n", "/f 1 100644 1 0 0 0 0.0 - x - security.selinux=old\n")
    root.lookup(b"/etc/selinux/config").content.data = b"SELINUX=disabled\n"  # type: ignore[union-attr]
    relabel(root)
    assert label(root, "/f") is None


def test_type_specific_labels() -> None:
    fc = (
        b"/var(/.*)?\t\tsystem_u:object_r:var_t:s0\n"
        b"/var/log(/.*)? -d system_u:object_r:var_log_dir_t:s0\n"
        b"/var/log(/.*)? -- system_u:object_r:var_log_t:s0\n"
        b"/var/log(/.*)? -l system_u:object_r:var_log_link_t:s0\n"
    )
    root = build(
        fc,
        "/var 0 40755 2 0 0 0 0.0 - - -\n"
        "/var/log 0 40755 2 0 0 0 0.0 - - -\n"
        "/var/log/current 17 120777 1 0 0 0 0.0 /var/log/messages - -\n"
        "/var/log/messages 10 100644 1 0 0 0 0.0 - 0123456789 -\n",
    )
    relabel(root)
    assert label(root, "/var") == "system_u:object_r:var_t:s0"
    assert label(root, "/var/log") == "system_u:object_r:var_log_dir_t:s0"
    assert label(root, "/var/log/messages") == "system_u:object_r:var_log_t:s0"
    assert label(root, "/var/log/current") == "system_u:object_r:var_log_link_t:s0"


def test_subs_aliases_local_and_none() -> None:
    fc = (
        b"/home(/.*)?\t\tsystem_u:object_r:home_t:s0\n"
        b"/tmp(/.*)?\t\tsystem_u:object_r:tmp_t:s0\n"
        b"/tmp/private(/.*)?\t\t<<none>>\n"
        b"/opt(/.*)?\t\tsystem_u:object_r:opt_t:s0\n"
    )
    root = build(
        fc,
        "/home 0 40755 2 0 0 0 0.0 - - -\n"
        "/home/user.txt 5 100644 1 0 0 0 0.0 - hello -\n"
        "/opt 0 40755 2 0 0 0 0.0 - - -\n"
        "/opt/custom 0 40755 2 0 0 0 0.0 - - -\n"
        "/opt/custom/app 3 100755 1 0 0 0 0.0 - app -\n"
        "/opt/readme.txt 7 100644 1 0 0 0 0.0 - default -\n"
        "/srv 0 40755 2 0 0 0 0.0 - - -\n"
        "/srv/home 0 40755 2 0 0 0 0.0 - - -\n"
        "/srv/home/data.txt 5 100644 1 0 0 0 0.0 - world -\n"
        "/tmp 0 40755 2 0 0 0 0.0 - - -\n"
        "/tmp/private 0 40755 2 0 0 0 0.0 - - -\n"
        "/tmp/private/secret.txt 6 100644 1 0 0 0 0.0 - secret - security.selinux=x\n"
        "/tmp/scratch.txt 5 100644 1 0 0 0 0.0 - hello -\n",
        {
            "file_contexts.subs": b"# comment\n/srv/home /home\n",
            "file_contexts.local": b"/opt/custom(/.*)?\t\tsystem_u:object_r:custom_t:s0\n",
        },
    )
    relabel(root)
    assert label(root, "/home/user.txt") == "system_u:object_r:home_t:s0"
    assert label(root, "/srv/home") == "system_u:object_r:home_t:s0"
    assert label(root, "/srv/home/data.txt") == "system_u:object_r:home_t:s0"
    assert label(root, "/srv") is None
    assert label(root, "/tmp/scratch.txt") == "system_u:object_r:tmp_t:s0"
    assert label(root, "/tmp/private") is None
    assert label(root, "/tmp/private/secret.txt") is None
    assert label(root, "/opt/readme.txt") == "system_u:object_r:opt_t:s0"
    assert label(root, "/opt/custom") == "system_u:object_r:custom_t:s0"
    assert label(root, "/opt/custom/app") == "system_u:object_r:custom_t:s0"


def test_devices_and_fifos() -> None:
    fc = (
        b"/dev(/.*)?\t\tsystem_u:object_r:device_t:s0\n"
        b"/dev(/.*)? -b system_u:object_r:fixed_disk_device_t:s0\n"
        b"/dev(/.*)? -c system_u:object_r:tty_device_t:s0\n"
        b"/dev(/.*)? -p system_u:object_r:fifo_t:s0\n"
    )
    root = build(
        fc,
        "/dev 0 40755 2 0 0 0 0.0 - - -\n"
        "/dev/initctl 0 10644 1 0 0 0 0.0 - - -\n"
        "/dev/sda 0 60660 1 0 0 2049 0.0 - - -\n"
        "/dev/tty0 0 20666 1 0 0 1024 0.0 - - -\n",
    )
    relabel(root)
    assert label(root, "/dev") == "system_u:object_r:device_t:s0"
    assert label(root, "/dev/sda") == "system_u:object_r:fixed_disk_device_t:s0"
    assert label(root, "/dev/tty0") == "system_u:object_r:tty_device_t:s0"
    assert label(root, "/dev/initctl") == "system_u:object_r:fifo_t:s0"


def leaves_by_identity(root: Directory) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    for path, node in walk(root):
        if isinstance(node, Leaf):
            out.setdefault(id(node), []).append(path)
    return out


def test_hardlinks_split_when_labels_differ() -> None:
    fc = (
        b"/(/.*)?                             system_u:object_r:default_t:s0\n"
        b"/usr(/.*)?                          system_u:object_r:usr_t:s0\n"
        b"/usr/lib(/.*)?                      system_u:object_r:lib_t:s0\n"
        b"/usr/share(/.*)?                    system_u:object_r:usr_t:s0\n"
    )
    root = build(
        fc,
        "/usr 0 40755 2 0 0 0 0.0 - - -\n"
        "/usr/lib 0 40755 2 0 0 0 0.0 - - -\n"
        "/usr/lib/pkgA 0 40755 2 0 0 0 0.0 - - -\n"
        "/usr/lib/pkgA/COPYING 4 100644 3 0 0 0 0.0 - GPL2 -\n"
        "/usr/lib/pkgA/COPY2 0 @120000 - - - - 0.0 /usr/lib/pkgA/COPYING - -\n"
        "/usr/share 0 40755 2 0 0 0 0.0 - - -\n"
        "/usr/share/licenses 0 40755 2 0 0 0 0.0 - - -\n"
        "/usr/share/licenses/COPYING 0 @120000 - - - - 0.0 /usr/lib/pkgA/COPYING - -\n"
        "/usr/share/licenses/COPYING2 0 @120000 - - - - 0.0 /usr/lib/pkgA/COPYING - -\n",
    )
    relabel(root)
    assert label(root, "/usr/lib/pkgA/COPYING") == "system_u:object_r:lib_t:s0"
    assert label(root, "/usr/share/licenses/COPYING") == "system_u:object_r:usr_t:s0"
    groups = sorted(sorted(v) for v in leaves_by_identity(root).values() if len(v) > 1)
    # Same label -> still one inode; each differently-labelled name gets its
    # own copy (composefs-rs copies per name, even when two copies agree).
    assert groups == [[b"/usr/lib/pkgA/COPY2", b"/usr/lib/pkgA/COPYING"]]


def test_split_order_is_depth_first() -> None:
    """The first name in sorted depth-first order keeps the inode: /a/x
    (inside a subdirectory) comes before /b, a later sibling of /a."""
    fc = b"/a(/.*)?\tA\n/b\tB\n"
    root = build(
        fc,
        "/a 0 40755 2 0 0 0 0.0 - - -\n"
        "/a/x 1 100644 2 0 0 0 0.0 - x -\n"
        "/b 0 @120000 - - - - 0.0 /a/x - -\n",
    )
    original = root.lookup(b"/a/x")
    relabel(root)
    assert root.lookup(b"/a/x") is original
    assert root.lookup(b"/b") is not original
    assert (label(root, "/a/x"), label(root, "/b")) == ("A", "B")


def test_replaces_stale_labels() -> None:
    fc = b"/(/.*)?\t\tsystem_u:object_r:default_t:s0\n/usr(/.*)?\t\tsystem_u:object_r:usr_t:s0\n"
    stale = "security.selinux=unconfined_u:object_r:container_file_t:s0:c0,c1"
    root = build(
        fc,
        f"/usr 0 40755 2 0 0 0 0.0 - - - {stale}\n"
        f"/usr/lib 0 40755 2 0 0 0 0.0 - - - {stale}\n"
        f"/usr/lib/readme.txt 5 100644 1 0 0 0 0.0 - hello - {stale}\n",
    )
    relabel(root)
    for p in ("/usr", "/usr/lib", "/usr/lib/readme.txt"):
        assert label(root, p) == "system_u:object_r:usr_t:s0"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"/x\n", "missing separator"),
        (b"/x -q ctx\n", "invalid type code"),
        (b"/x --\n", "missing context"),
        (b"/x ctx trailing\n", "trailing data"),
        (b"/x( ctx\n", "bad regex"),
        (b"/x\\Y ctx\n", "unsupported escape"),
        (b"/x[[:nope:]] ctx\n", "POSIX class"),
        (b"\xff ctx\n", "not UTF-8"),
    ],
)
def test_bad_spec_files(data: bytes, fragment: str) -> None:
    with pytest.raises(BootError, match=fragment):
        parse_spec_file(data, Policy())


def test_missing_file_contexts_is_an_error() -> None:
    root = build(b"", "")
    files = root.lookup(b"/etc/selinux/targeted/contexts/files")
    assert isinstance(files, Directory)
    del files.entries[b"file_contexts"]
    with pytest.raises(BootError, match="mandatory file_contexts"):
        relabel(root)


@pytest.mark.parametrize(
    ("pcre", "matches", "nonmatches"),
    [
        ("/usr/lib(/.*)?", ["/usr/lib", "/usr/lib/x/y"], ["/usr/libx"]),
        ("/a[[:digit:]]+", ["/a12"], ["/ab"]),
        ("/a[^[:space:]]", ["/ax"], ["/a "]),
        ("/x\\Q.*\\E", ["/x.*"], ["/xab"]),
        ("/[[]x", ["/[x"], ["/x"]),
        ("/a&&b|/c", ["/a&&b", "/c"], ["/ab"]),
        ("/x[&|~-]", ["/x&", "/x-"], ["/xa"]),
        ("/(?<n>a)\\z", ["/a"], ["/b"]),
        ("/x\\.y", ["/x.y"], ["/xzy"]),
    ],
)
def test_pcre_translation(pcre: str, matches: list[str], nonmatches: list[str]) -> None:
    rx = re.compile(f"^({translate_pcre(pcre)})$".encode())
    for m in matches:
        assert rx.match(m.encode()), (pcre, m)
    for m in nonmatches:
        assert not rx.match(m.encode()), (pcre, m)


def test_index_keeps_last_match_semantics() -> None:
    """Specs with and without a literal first component interleave; the
    last matching one (in file order) must still win."""
    p = Policy()
    parse_spec_file(b"/usr/.* A\n.* B\n/usr/lib/.* C\n/u.r/lib/x D\n/usr/lib/y|/z E\n", p)
    assert p.lookup(b"/usr/lib/x", "-") == "D"
    assert p.lookup(b"/usr/lib/q", "-") == "C"
    assert p.lookup(b"/usr/bin", "-") == "B"
    assert p.lookup(b"/z", "-") == "E"
    assert p.lookup(b"/usr/lib/y", "-") == "E"
    assert p.lookup(b"/usr", "d") == "B"


def test_transform_keeps_xattr_on_unlabelled_none() -> None:
    """A tree with no /etc/selinux: transform strips labels everywhere."""
    root = dumpfile.parse(
        (
            ROOT + "/boot 0 40755 2 0 0 0 0.0 - - -\n"
            "/sysroot 0 40755 2 0 0 0 0.0 - - -\n"
            "/usr 0 40755 2 0 0 0 77.0 - - - security.selinux=a\n"
        ).encode()
    )
    assert transform_for_boot(root) == []
    assert label(root, "/usr") is None


@pytest.mark.parametrize(
    ("regex", "prefix"),
    [
        ("/usr/lib(/.*)?", "/usr/lib"),
        ("/usr/s?bin/x", "/usr/"),
        ("/a\\.b", "/a.b"),
        ("/usr/(a|b)", "/usr/"),
        ("/a|/b", ""),
        ("/x[|]y", "/x"),
        ("/x[]|]y", "/x"),
        ("/a+", "/a"),
        ("/ab*", "/a"),
        ("/a{2}", "/"),
        ("\\d/x", ""),
        ("/(.*/)?\\.ssh", "/"),
    ],
)
def test_literal_prefix(regex: str, prefix: str) -> None:
    from composefs.boot.selabel import _literal_prefix

    assert _literal_prefix(regex) == prefix


def test_prefix_index_agrees_with_brute_force() -> None:
    """The indexed lookup equals trying every spec, last first."""
    import random

    rng = random.Random(7)
    parts = ["usr", "lib", "bin", "etc", "x.so", "a", "ab", "s", "sbin"]
    specs = [
        "/.* A",
        "/usr(/.*)? B",
        "/usr/s?bin(/.*)? -- C",
        "/(usr/)?lib(/.*)? D",
        "/usr/lib/[^/]+\\.so -- E",
        "/etc|/usr/etc F",
        "/a+b* -d G",
        "/(.*/)?sbin H",
        "/usr/lib/a(/.*)? <<none>>",
        "/ab{1,2} I",
    ]
    p = Policy()
    parse_spec_file("\n".join(specs).encode(), p)
    for _ in range(3000):
        path = "/" + "/".join(rng.choice(parts) for _ in range(rng.randint(0, 4)))
        ifmt = rng.choice("-dl")
        key = (path + ifmt).encode()
        want = next((i for i in reversed(range(len(specs))) if p.regexes[i].match(key)), None)
        assert p.match_index(path.encode(), ifmt) == want, (path, ifmt)


@pytest.mark.parametrize("name", ["../../..", "a/b", ".."])
def test_policy_name_cannot_escape(name: str) -> None:
    root = build(b"/.* x\n", "")
    cfg = root.lookup(b"/etc/selinux/config")
    assert isinstance(cfg, Leaf) and isinstance(cfg.content, Regular)
    cfg.content.data = f"SELINUXTYPE={name}\n".encode()
    with pytest.raises(BootError, match="invalid SELINUXTYPE"):
        relabel(root)

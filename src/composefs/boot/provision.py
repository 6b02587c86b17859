"""Provisioning a repository copied onto a verity-capable filesystem.

A disk image is usually built on a machine whose kernel cannot enable
fs-verity (or with tools that do not carry it, like ``mke2fs -d``): its
repository is then insecure. `enable_repository_verity`, run once on the
target kernel, enables fs-verity on every object (checking that the digest
the kernel computes is the object's name) and finally on ``meta.json``,
which makes the repository secure: from then on every image and object is
verified by the kernel and ``composefs-setup-root`` can require it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .. import fsverity
from ..errors import RepositoryError, VerityNotEnabled
from ..repository import peek_algorithm

_HEX = frozenset("0123456789abcdef")


@dataclass
class ProvisionResult:
    objects: int  # regular files under objects/
    enabled: int  # of which fs-verity was enabled now (the rest had it)


def _enable_one(path: str, expected: str, algorithm: str) -> tuple[bool, str | None]:
    """(newly enabled, error message or None) for one object."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        try:
            fsverity.measure_verity(fd)
            had = True
        except VerityNotEnabled:
            had = False
            fsverity.enable_verity(fd, algorithm)
        alg, digest = fsverity.measure_verity(fd)
    finally:
        os.close(fd)
    if alg != algorithm or digest.hex() != expected:
        return not had, f"{path}: the kernel's fs-verity digest is {alg}:{digest.hex()}"
    return not had, None


def enable_repository_verity(path: str, threads: int | None = None) -> ProvisionResult:
    """Enable fs-verity on all objects of the repository at `path`, then on
    its ``meta.json``. Objects whose content does not match their name are
    reported (and the repository is left insecure)."""
    algorithm = peek_algorithm(path, infer=False)
    if algorithm is None:
        raise RepositoryError(f"{path}: not a composefs repository (no meta.json)")
    objects = os.path.join(path, "objects")
    jobs: list[tuple[str, str]] = []
    for prefix in sorted(os.listdir(objects)):
        if len(prefix) != 2 or not _HEX.issuperset(prefix):
            continue
        for entry in os.scandir(os.path.join(objects, prefix)):
            if entry.is_file(follow_symlinks=False) and _HEX.issuperset(entry.name):
                jobs.append((entry.path, prefix + entry.name))
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        results = list(pool.map(lambda j: _enable_one(j[0], j[1], algorithm), jobs))
    errors = [e for _, e in results if e is not None]
    if errors:
        raise RepositoryError(
            f"{len(errors)} object(s) do not match their names, first: {errors[0]}"
        )
    fd = os.open(os.path.join(path, "meta.json"), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fsverity.enable_verity(fd, algorithm)
    finally:
        os.close(fd)
    return ProvisionResult(len(jobs), sum(1 for new, _ in results if new))

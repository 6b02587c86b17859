"""The one place where composefs exceptions are defined.

Every error a user can cause derives from ComposefsError; the command-line
tools catch it and print its message as a single line.
"""

from __future__ import annotations


class ComposefsError(Exception):
    """Base class of every error composefs reports to a user."""


class UsageError(ComposefsError):
    """A command-line mistake (printed as one line, exit status 1)."""


class FormatError(ComposefsError):
    """Malformed input in one of the on-disk or text formats."""


class DumpfileError(FormatError):
    """A dumpfile line that cannot be parsed or is not allowed."""

    def __init__(self, message: str, lineno: int | None = None) -> None:
        self.lineno = lineno
        super().__init__(f"line {lineno}: {message}" if lineno is not None else message)


class ImageError(FormatError):
    """An EROFS image that is corrupt, hostile or not a composefs image."""


class SplitstreamError(FormatError):
    """A splitstream that cannot be parsed."""


class TreeError(ComposefsError):
    """A filesystem tree that violates composefs rules (e.g. hardlinked directory)."""


class VerityError(ComposefsError):
    """fs-verity is unavailable, or a measured digest does not match."""


class VerityNotSupported(VerityError):
    """The kernel or filesystem does not support fs-verity."""


class RepositoryError(ComposefsError):
    """A problem opening, reading or writing a composefs repository."""


class NotFoundError(RepositoryError):
    """A named image, stream, ref or object does not exist."""


class MountError(ComposefsError):
    """Mounting or unmounting failed."""


class OciError(ComposefsError):
    """An OCI image, layer, manifest or registry problem."""


class RegistryError(OciError):
    """The registry refused a request or answered something unusable."""


class DigestMismatch(OciError):
    """Downloaded or stored content does not match its declared digest."""


class VerityNotEnabled(VerityError):
    """The file has no fs-verity enabled (the kernel could measure it otherwise)."""


class RegistryAuthError(RegistryError):
    """The registry (or its token server) refused our credentials or wants some."""


class SourceError(ComposefsError):
    """A source directory tree could not be read (or changed while it was read)."""


class TarFormatError(OciError):
    """A tar archive (OCI layer) that is malformed, truncated or unsupported."""


class BootError(ComposefsError):
    """Boot resources, SELinux policy, UKIs or kernel arguments are unusable."""


class VarlinkCallError(ComposefsError):
    """A varlink method call failed: `error` is the qualified varlink error
    name (``org.composefs.Repository.InvalidHandle``), `parameters` its
    reply parameters."""

    def __init__(self, error: str, parameters: dict[str, object] | None = None) -> None:
        self.error = error
        self.parameters = dict(parameters or {})
        detail = ", ".join(f"{k}={v!r}" for k, v in self.parameters.items())
        super().__init__(f"{error}({detail})" if detail else error)


class FuseError(MountError):
    """Serving or mounting an image through FUSE failed (or FUSE is unavailable)."""


class HttpError(ComposefsError):
    """An HTTP server (composefs fetch) refused a request or sent something unusable."""


class HttpNotFound(HttpError):
    """The server answered 404/410 for a path."""


class Cancelled(ComposefsError):
    """An operation its caller stopped before it completed (`oci.pull.PullStop`)."""

"""os-release parsing for boot labels (composefs-rs ``os_release.rs``). IO-free."""

from __future__ import annotations


def dequote(value: str) -> str | None:
    """Shell-style unquoting of an os-release value (None if a quote is
    unterminated). Adjacent quoted pieces concatenate."""
    out: list[str] = []
    it = iter(value.strip())
    for c in it:
        if c == '"':
            while True:
                n = next(it, None)
                if n is None:
                    return None
                if n == "\\":
                    n = next(it, None)
                    if n is None:
                        return None
                elif n == '"':
                    break
                out.append(n)
        elif c == "'":
            while True:
                n = next(it, None)
                if n is None:
                    return None
                if n == "'":
                    break
                out.append(n)
        else:
            out.append(c)
    return "".join(out)


class OsReleaseInfo:
    def __init__(self, content: str) -> None:
        self.map: dict[str, str] = {}
        lines = content.split("\n")  # Rust str::lines: "\n" or "\r\n" only
        for line in (ln.removesuffix("\r") for ln in lines):
            if line.strip().startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if sep:
                # Later keys win, like a HashMap built from the lines.
                self.map[key] = value

    def get_value(self, keys: list[str]) -> str | None:
        for key in keys:
            v = self.map.get(key)
            if v is not None:
                d = dequote(v)
                if d is not None:
                    return d
        return None

    def get_pretty_name(self) -> str | None:
        return self.get_value(["PRETTY_NAME", "NAME", "ID"])

    def get_version(self) -> str | None:
        return self.get_value(["VERSION_ID", "VERSION"])

    def get_boot_label(self) -> str | None:
        name = self.get_pretty_name()
        if name is None:
            return None
        version = self.get_version()
        return name if version is None else f"{name} {version}"

"""Registry credentials and authentication challenges (IO-light helpers).

Three things live here:

* finding credentials for a registry the way podman/skopeo/docker do
  (`REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
  `$XDG_CONFIG_HOME/containers/auth.json`, `~/.docker/config.json`),
* parsing `WWW-Authenticate` challenges (RFC 7235 auth-params),
* turning a challenge plus credentials into an `Authorization` header,
  with bearer tokens fetched through a caller-supplied HTTP function so
  this module holds no connection logic of its own.

Credential helpers (`credHelpers`, `credsStore`) are not run: executing
programs named in a config file is a decision for the user, not a library.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .. import _json
from ..errors import RegistryAuthError, RegistryError

#: Docker Hub is spelled many ways in auth files.
DOCKER_HUB_KEYS = (
    "docker.io",
    "https://index.docker.io/v1/",
    "index.docker.io",
    "registry-1.docker.io",
    "https://registry-1.docker.io",
)


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def __repr__(self) -> str:  # never print a password by accident
        return f"Credentials(username={self.username!r}, password=<hidden>)"


def parse_creds(text: str) -> Credentials:
    """`user:password` as given to `--creds` (the password may contain ':')."""
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise RegistryAuthError("credentials must be given as USER:PASSWORD")
    return Credentials(user, password)


# ---------------------------------------------------------------- auth files


def auth_file_candidates(env: Mapping[str, str] | None = None) -> list[Path]:
    """Auth files in lookup order; the first one that names the registry wins."""
    env = os.environ if env is None else env
    explicit = env.get("REGISTRY_AUTH_FILE")
    if explicit:
        # An explicit file replaces the default search, like containers-auth.json(5).
        return [Path(explicit)]
    out: list[Path] = []
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        out.append(Path(runtime) / "containers" / "auth.json")
    home = env.get("HOME") or os.path.expanduser("~")
    config = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    out.append(Path(config) / "containers" / "auth.json")
    docker_config = env.get("DOCKER_CONFIG")
    out.append(Path(docker_config or os.path.join(home, ".docker")) / "config.json")
    return out


def _normalise_key(key: str) -> str:
    """Strip scheme and trailing path noise that docker writes (`https://host/v1/`)."""
    if "://" in key:
        parsed = urllib.parse.urlsplit(key)
        key = parsed.netloc + parsed.path
    key = key.rstrip("/")
    if key.endswith("/v1") or key.endswith("/v2"):
        key = key[:-3]
    return key


def _lookup_keys(registry: str, repository: str | None) -> Iterator[str]:
    """Most specific key first: `host/ns/repo`, `host/ns`, ..., `host`."""
    hub = registry in ("docker.io", "index.docker.io", "registry-1.docker.io")
    hosts = ["docker.io", "index.docker.io", "registry-1.docker.io"] if hub else [registry]
    for host in hosts:
        if repository:
            parts = repository.split("/")
            for n in range(len(parts), 0, -1):
                yield host + "/" + "/".join(parts[:n])
        yield host


def _decode_entry(entry: object, where: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            raw = base64.b64decode(auth, validate=False).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as e:
            raise RegistryAuthError(f"{where}: invalid base64 'auth' entry: {e}") from None
        user, sep, password = raw.partition(":")
        if not sep:
            raise RegistryAuthError(f"{where}: 'auth' entry is not USER:PASSWORD")
        return Credentials(user, password)
    name = entry.get("username")
    secret = entry.get("password")
    if isinstance(name, str) and isinstance(secret, str) and name:
        return Credentials(name, secret)
    return None


def load_credentials(
    registry: str,
    repository: str | None = None,
    *,
    auth_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Credentials | None:
    """Credentials for `registry` (host[:port]) from the usual auth files, or None.

    `auth_file` (like `--authfile`) replaces the search. Within a file the most
    specific `host/namespace` key wins. A file that exists but is not valid
    JSON is an error (silently pulling anonymously would be confusing).
    """
    files = [Path(auth_file)] if auth_file is not None else auth_file_candidates(env)
    wanted = list(_lookup_keys(registry, repository))
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if auth_file is not None:
                raise RegistryAuthError(f"auth file not found: {path}") from None
            continue
        except OSError as e:
            raise RegistryAuthError(f"cannot read auth file {path}: {e.strerror}") from None
        doc = _json.loads(text, f"auth file {path}", RegistryAuthError) if text.strip() else {}
        auths = doc.get("auths") if isinstance(doc, dict) else None
        if not isinstance(auths, dict):
            continue
        by_key = {_normalise_key(k): v for k, v in auths.items() if isinstance(k, str)}
        for key in wanted:
            if key in by_key:
                creds = _decode_entry(by_key[key], str(path))
                if creds is not None:
                    return creds
    return None


# ---------------------------------------------------------------- challenges


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "basic", "bearer", ...
    params: dict[str, str] = field(default_factory=dict)


_ALNUM = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~" + _ALNUM)
_TOKEN68_CHARS = frozenset("-._~+/" + _ALNUM)


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse one `WWW-Authenticate` value into challenges.

    Handles several challenges in one header, quoted strings with escapes and
    token68 values. Unparseable trailing junk is ignored rather than fatal: a
    registry's odd header should not hide the real 401.
    """
    s = header
    n = len(s)
    out: list[Challenge] = []
    current: Challenge | None = None

    def skip_ws(j: int) -> int:
        while j < n and s[j] in " \t":
            j += 1
        return j

    def token(j: int) -> tuple[str, int]:
        k = j
        while k < n and s[k] in _TOKEN_CHARS:
            k += 1
        return s[j:k], k

    i = 0
    while True:
        while i < n and s[i] in " \t,":
            i += 1
        if i >= n:
            break
        name, j = token(i)
        if not name:
            break  # junk: keep what we have
        k = skip_ws(j)
        if current is not None and "token68" not in current.params and k < n and s[k] == "=":
            # auth-param of the current challenge
            k = skip_ws(k + 1)
            if k < n and s[k] == '"':
                k += 1
                buf: list[str] = []
                while k < n and s[k] != '"':
                    if s[k] == "\\" and k + 1 < n:
                        k += 1
                    buf.append(s[k])
                    k += 1
                value, i = "".join(buf), k + 1
            else:
                value, i = token(k)
            current.params[name.lower()] = value
            continue
        # a new challenge: scheme, then a token68 or auth-params
        current = Challenge(name.lower(), {})
        out.append(current)
        i = skip_ws(j)
        m = i
        while m < n and s[m] in _TOKEN68_CHARS:
            m += 1
        while m < n and s[m] == "=":
            m += 1
        after = skip_ws(m)
        if m > i and (after >= n or s[after] == ","):
            current.params["token68"] = s[i:m]
            i = m
    return out


# ---------------------------------------------------------------- tokens

#: (url, headers) -> (status, body bytes). Supplied by the registry client so
#: token requests get the same TLS, retry and redirect rules as everything else.
TokenFetcher = Callable[[str, dict[str, str]], tuple[int, bytes]]


@dataclass
class _Token:
    header: str
    expires: float


class Authenticator:
    """Per-registry authorisation state: which scheme it wants, cached tokens.

    `header_for(scope)` gives the `Authorization` value to send (or None);
    `handle_challenge(value, scope)` reacts to a 401 and returns True when a
    retry with new authorisation is worth it.
    """

    def __init__(
        self,
        registry: str,
        credentials: Credentials | None,
        fetch: TokenFetcher,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.credentials = credentials
        self._fetch = fetch
        self._clock = clock
        self._challenge: Challenge | None = None
        self._tokens: dict[str, _Token] = {}

    @property
    def challenge(self) -> Challenge | None:
        return self._challenge

    def header_for(self, scope: str) -> str | None:
        ch = self._challenge
        if ch is None:
            return None
        if ch.scheme == "basic":
            return self.credentials.basic_header() if self.credentials else None
        if ch.scheme == "bearer":
            tok = self._tokens.get(scope)
            if tok is None or tok.expires <= self._clock():
                tok = self._get_token(ch, scope)
                self._tokens[scope] = tok
            return tok.header
        return None

    def note_challenge(self, header: str | None) -> None:
        """Remember the registry's preferred scheme (from a `/v2/` ping)."""
        if not header:
            return
        chosen = self._choose(parse_www_authenticate(header))
        if chosen is not None:
            self._challenge = chosen

    def handle_challenge(self, header: str | None, scope: str, *, had_auth: bool) -> bool:
        """React to a 401: True means retry with `header_for(scope)`.

        Raises RegistryAuthError when retrying cannot help (no credentials for
        basic auth, basic credentials already rejected). The caller bounds
        the number of bearer retries (a token can expire in flight).
        """
        chosen = self._choose(parse_www_authenticate(header or ""))
        if chosen is None:
            if header:
                scheme = header.strip().split(" ")[0]
                raise RegistryAuthError(
                    f"{self.registry}: unsupported authentication scheme {scheme!r}"
                )
            raise RegistryAuthError(f"{self.registry}: authentication required")
        if chosen.scheme == "basic":
            if self.credentials is None:
                raise RegistryAuthError(
                    f"{self.registry}: authentication required (no credentials found; "
                    "use --creds or an auth file)"
                )
            if had_auth:
                raise RegistryAuthError(f"{self.registry}: invalid username or password")
        self._tokens.pop(scope, None)
        self._challenge = chosen
        return True

    def denied(self) -> RegistryAuthError:
        """The registry keeps refusing a token it made us get: no access."""
        why = (
            "the credentials do not grant access, or the repository does not exist"
            if self.credentials is not None
            else "the repository does not exist or needs credentials"
        )
        return RegistryAuthError(f"{self.registry}: access denied: {why}")

    @staticmethod
    def _choose(challenges: list[Challenge]) -> Challenge | None:
        for wanted in ("bearer", "basic"):
            for ch in challenges:
                if ch.scheme == wanted:
                    return ch
        return None

    def _get_token(self, ch: Challenge, scope: str) -> _Token:
        realm = ch.params.get("realm")
        if not realm:
            raise RegistryAuthError(f"{self.registry}: bearer challenge without a realm")
        parsed = urllib.parse.urlsplit(realm)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise RegistryAuthError(f"{self.registry}: bad token realm {realm[:200]!r}")
        if "@" in parsed.netloc:
            # user@host: a host name disguised (or credentials smuggled) in the realm
            raise RegistryAuthError(
                f"{self.registry}: token realm {parsed.hostname} carries a user name; refused"
            )
        server = f"token server {parsed.netloc}"
        query: list[tuple[str, str]] = []
        if ch.params.get("service"):
            query.append(("service", ch.params["service"]))
        scopes = [scope]
        challenged = ch.params.get("scope")
        if challenged:
            scopes = [s for s in challenged.split(" ") if s]
            if scope not in scopes:
                scopes.append(scope)
        query.extend(("scope", s) for s in scopes)
        sep = "&" if parsed.query else "?"
        url = realm + (sep + urllib.parse.urlencode(query) if query else "")
        headers = {"Accept": "application/json"}
        if self.credentials is not None:
            headers["Authorization"] = self.credentials.basic_header()
        status, body = self._fetch(url, headers)
        if status in (401, 403):
            raise RegistryAuthError(
                f"{self.registry}: {server} refused the request ({_denied(self.credentials)})"
            )
        if status != 200:
            raise RegistryError(f"{self.registry}: {server} answered HTTP {status}")
        doc = _json.loads(body, f"{self.registry}: {server} answer", RegistryError)
        if not isinstance(doc, dict):
            raise RegistryError(f"{self.registry}: {server} sent malformed JSON")
        tok = doc.get("token") or doc.get("access_token")
        if not isinstance(tok, str) or not tok:
            raise RegistryError(f"{self.registry}: {server} sent no token")
        expires_in = doc.get("expires_in")
        # Spec default is 60 s; renew a little early so long pulls do not race expiry.
        # Capped at a day: a token server cannot make us keep a token forever
        # (nor overflow the clock arithmetic with a huge number).
        lifetime = (
            min(float(expires_in), _MAX_TOKEN_LIFETIME)
            if isinstance(expires_in, (int, float)) and expires_in > 0
            else 60.0
        )
        return _Token("Bearer " + tok, self._clock() + max(lifetime - 10.0, lifetime / 2))


_MAX_TOKEN_LIFETIME = 86400.0


def _denied(creds: Credentials | None) -> str:
    return "invalid username or password" if creds is not None else "anonymous access not allowed"

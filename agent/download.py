"""Resumable bundle downloads over HTTP(S) for the desired-state sync (docs/fleet.md).

A bundle goes to ``<dir>/<name>-<version>-<sha256[:12]>.part`` while it arrives and
is renamed to ``.bundle`` only when its size and sha256 are right. The ``.part``
stays on disk across interruptions *and* agent restarts; the next attempt hashes
what is already there and asks for the rest with ``Range: bytes=N-``. The sha256
prefix in the name ties a part to the exact bytes the fleet promised, so a part of
a different build of the same version is never continued.

Server answers to a Range request:

- ``206`` whose ``Content-Range`` starts at N: append;
- ``200``: the server ignored the Range (a proxy, a plain file server): start over;
- ``416``: the part is not a prefix of the file (it changed?): start over.

Transient failures (connection refused/reset/cut, timeouts, 5xx, 408, 429) are
retried with a jittered exponential backoff; an attempt that added bytes to the
part resets the backoff, so a flaky line that always gets a bit further never gives
up. Permanent ones (other 4xx, a size or sha256 mismatch, an oversized bundle) raise
at once. Every failure is a :class:`DownloadError` whose ``reason`` is one line for
``reported`` and events (``download: HTTP 404 from http://...``).

**Credentials.** The device's HTTP Basic credentials (its device id and secret, the
same secret as its MQTT login) go only to the fleet it enrolled with
(:class:`CredentialScope`): the origin ``edge-agent enroll`` recorded in
``fleet.sync.fleet_url``, and only over HTTPS unless that origin is on loopback. A
``desired`` document naming any other URL is still downloaded, *without* credentials
(a server that needs none can answer it; what arrives is checked against the promised
sha256 and then the bundle's signature, like any other download). Requests that
carry credentials never follow redirects.

Nothing here blocks the event loop: file writes and hashing run in a worker thread,
one hop per received chunk (hashlib releases the GIL on large buffers).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import logging
import random
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import aiohttp

from edgefleet.core.durable import durable_replace
from edgefleet.core.errors import EdgefleetError
from edgefleet.core.names import check_name

log = logging.getLogger(__name__)

PART_SUFFIX = ".part"
BUNDLE_SUFFIX = ".bundle"
_HASH_READ = 1 << 20
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class DownloadError(EdgefleetError):
    """A download failed; ``reason`` is one human line. ``transient``: worth retrying."""

    transient = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DownloadHTTPError(DownloadError):
    """The server answered with an HTTP error status."""

    def __init__(self, status: int, url: str, note: str = "") -> None:
        super().__init__(f"download: HTTP {status} from {url}{note}")
        self.status = status
        self.transient = status >= 500 or status in (408, 429)


class DownloadInterrupted(DownloadError):
    """Connection refused, reset, cut short or silent for too long: retried."""

    transient = True


class DownloadIntegrityError(DownloadError):
    """What arrived is not what the fleet promised (size or sha256)."""

    def __init__(self, reason: str, resumed: bool = False) -> None:
        super().__init__(reason)
        self.resumed = resumed  # the bytes came in more than one request


class DownloadTooLarge(DownloadError):
    """The bundle is over ``max_bundle_bytes``."""


@dataclass(frozen=True, slots=True)
class BundleSpec:
    """One bundle as a ``desired`` document describes it."""

    name: str
    version: str
    url: str
    sha256: str  # 64 lowercase hex digits
    size: int

    @property
    def stem(self) -> str:
        return f"{self.name}-{self.version}-{self.sha256[:12]}"


Origin = tuple[str, str, int]  # scheme, lowercase host, port
_DEFAULT_PORTS = {"http": 80, "https": 443}


def url_origin(url: str) -> Origin | None:
    """``(scheme, host, port)`` of an absolute http(s) URL; None for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``: traffic that never leaves the machine."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class CredentialScope:
    """Where the device's credentials may be sent: the fleet it enrolled with.

    ``fleet_origin`` is the origin of ``fleet.sync.fleet_url`` (written by ``edge-agent
    enroll``). A config from before that key existed has none; it then falls back to
    ``broker_host``: the host that already gets this very secret as the MQTT login (any
    port on it). Either way the scheme must be https, unless the host is loopback.
    """

    fleet_origin: Origin | None
    broker_host: str | None = None

    @classmethod
    def for_fleet(cls, fleet_url: str | None, broker_host: str | None) -> CredentialScope:
        origin = url_origin(fleet_url) if fleet_url else None
        if fleet_url and origin is None:
            raise ValueError(f"fleet_url {fleet_url!r} is not an absolute http(s) URL")
        return cls(origin, None if origin else (broker_host or "").lower() or None)

    def refusal(self, url: str) -> str | None:
        """None when ``url`` may get the credentials, else why not (one line)."""
        origin = url_origin(url)
        if origin is None:
            return "not an absolute http(s) URL"
        scheme, host, port = origin
        if self.fleet_origin is not None:
            if origin != self.fleet_origin:
                want = "{}://{}:{}".format(*self.fleet_origin)
                return f"{scheme}://{host}:{port} is not the enrolled fleet {want}"
        elif self.broker_host is None or host != self.broker_host:
            return f"host {host} is not the broker's ({self.broker_host}; no fleet.sync.fleet_url)"
        if scheme != "https" and not is_loopback(host):
            return "plain http outside loopback"
        return None


@dataclass(frozen=True)
class Credentials:
    """An ``Authorization`` header value (see :func:`basic_auth`) and where it may go."""

    header: str = field(repr=False)
    scope: CredentialScope


@dataclass
class DownloadStats:
    requests: int = 0
    resumed: int = 0  # requests answered 206 from an offset > 0
    restarted: int = 0  # Range ignored (200) or refused (416): started over
    retries: int = 0
    bytes: int = 0
    completed: int = 0
    without_credentials: int = 0  # requests to a URL outside the credentials' scope


def _hash_part(path: Path, size: int) -> tuple[int, Any]:
    """Bytes in the part and their running sha256; a part larger than ``size`` is emptied."""
    digest = hashlib.sha256()
    try:
        have = path.stat().st_size
    except FileNotFoundError:
        return 0, digest
    if have > size:
        path.unlink()
        return 0, digest
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_READ):
            digest.update(chunk)
    return have, digest


def _write(f: IO[bytes], digest: Any, chunk: bytes) -> None:
    f.write(chunk)
    # Flushed per chunk: bytes in Python's buffer would be lost by a SIGKILL, and
    # the page cache is enough to resume after a process crash.
    f.flush()
    digest.update(chunk)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_READ):
            digest.update(chunk)
    return digest.hexdigest()


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


class BundleDownloader:
    """Downloads bundles into ``directory``; ``open()`` before use, ``close()`` after."""

    def __init__(
        self,
        directory: Path,
        *,
        credentials: Credentials | None = None,
        timeout_s: float = 30.0,
        max_bytes: int = 1024 * 1024 * 1024,
        retry_min_s: float = 2.0,
        retry_max_s: float = 300.0,
        attempts: int = 8,
        chunk_bytes: int = 256 * 1024,
        rng: random.Random | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.directory = directory
        self.ca_file = ca_file
        # None: no request carries credentials. Settable before the first fetch.
        self.credentials = credentials
        self._warned: set[Origin | None] = set()
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.attempts = attempts
        self.chunk_bytes = chunk_bytes
        self.stats = DownloadStats()
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> BundleDownloader:
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
        if self._session is None:
            ssl_ctx: ssl.SSLContext | bool = True  # the system's trust store
            if self.ca_file is not None:
                ssl_ctx = await asyncio.to_thread(ssl.create_default_context, cafile=self.ca_file)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl_ctx),
                # Per request: connect, and the longest silence between bytes. No total:
                # a big bundle on a slow store line may take many minutes, and that is fine.
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self.timeout_s, sock_read=self.timeout_s
                ),
                # The sha256 is of the bytes on the wire: never let aiohttp decode them.
                auto_decompress=False,
            )
        return self

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def part_path(self, spec: BundleSpec) -> Path:
        return self.directory / (spec.stem + PART_SUFFIX)

    def bundle_path(self, spec: BundleSpec) -> Path:
        return self.directory / (spec.stem + BUNDLE_SUFFIX)

    async def fetch(self, spec: BundleSpec) -> Path:
        """The verified bundle file (size and sha256 checked); DownloadError otherwise."""
        check_name(spec.name, "model name")
        check_name(spec.version, "version")
        if spec.size > self.max_bytes:
            raise DownloadTooLarge(
                f"bundle of {spec.size} bytes is over the {self.max_bytes} byte limit"
            )
        final = self.bundle_path(spec)
        if await asyncio.to_thread(final.is_file):
            # Left by a run that stopped between the download and the install.
            if await asyncio.to_thread(_sha256_file, final) == spec.sha256:
                return final
            await asyncio.to_thread(_unlink, final)
        part = self.part_path(spec)
        failures = 0
        started_over = False
        while True:
            before = await asyncio.to_thread(_size, part)
            try:
                return await self._attempt(spec, part, final)
            except DownloadIntegrityError as exc:
                # A part from earlier requests may hold stale bytes (the file changed on
                # the server under the same promise): one clean try from zero.
                if not exc.resumed or started_over:
                    raise
                started_over = True
                log.warning("%s; downloading %s again from the start", exc.reason, spec.stem)
                continue
            except DownloadError as exc:
                if not exc.transient:
                    raise
                progressed = await asyncio.to_thread(_size, part) > before
                failures = 0 if progressed else failures + 1
                if failures >= self.attempts:
                    raise DownloadError(
                        f"{exc.reason} (gave up after {self.attempts} attempts)"
                    ) from exc
                delay = self._backoff(failures)
                self.stats.retries += 1
                log.info("%s; retrying %s in %.1f s", exc.reason, spec.stem, delay)
                await asyncio.sleep(delay)

    def _auth_for(self, url: str) -> str | None:
        """The Authorization header for ``url``, or None outside the credentials' scope."""
        creds = self.credentials
        if creds is None:
            return None
        why = creds.scope.refusal(url)
        if why is None:
            return creds.header
        self.stats.without_credentials += 1
        origin = url_origin(url)
        if origin not in self._warned:  # once per origin: a resume retries often
            self._warned.add(origin)
            log.warning("downloading %s without the device credentials: %s", url, why)
        return None

    def _backoff(self, failures: int) -> float:
        # Jittered ("equal jitter", like the MQTT link): stores that lost the same
        # fleet server must not all come back in the same second.
        cap = min(self.retry_max_s, self.retry_min_s * 2 ** max(0, failures - 1))
        return self._rng.uniform(cap / 2, cap)

    async def _attempt(self, spec: BundleSpec, part: Path, final: Path) -> Path:
        """One HTTP request: resume (or start) the part, verify, rename. Raises DownloadError."""
        if self._session is None:
            raise RuntimeError("downloader is not open")
        have, digest = await asyncio.to_thread(_hash_part, part, spec.size)
        resumed_from = have
        if have == spec.size:
            return await self._verify(spec, part, final, digest, resumed=True)
        headers = {"Range": f"bytes={have}-"} if have else {}
        auth = self._auth_for(spec.url)
        if auth is not None:
            headers["Authorization"] = auth
        self.stats.requests += 1
        f: IO[bytes] | None = None
        try:
            # A request with the secret follows no redirect: the secret must reach the
            # enrolled origin and nothing else, whatever that origin answers.
            async with self._session.get(
                spec.url, headers=headers, allow_redirects=auth is None
            ) as resp:
                if resp.status == 206 and have:
                    start, total = _content_range(resp.headers.get("Content-Range"))
                    if total is not None and total != spec.size:
                        raise DownloadIntegrityError(
                            f"size mismatch: expected {spec.size} bytes, server has {total}"
                        )
                    if start != have:
                        # Not the piece we asked for: drop the part, start over next time.
                        await asyncio.to_thread(_unlink, part)
                        self.stats.restarted += 1
                        raise DownloadInterrupted(
                            f"download: unexpected Content-Range from {spec.url}"
                        )
                    self.stats.resumed += 1
                elif resp.status == 200:
                    if have:
                        log.info("%s ignored the Range request; starting over", spec.url)
                        self.stats.restarted += 1
                        have, resumed_from, digest = 0, 0, hashlib.sha256()
                    if resp.content_length is not None and resp.content_length != spec.size:
                        raise DownloadIntegrityError(
                            f"size mismatch: expected {spec.size} bytes,"
                            f" server sends {resp.content_length}"
                        )
                elif resp.status == 416:
                    await asyncio.to_thread(_unlink, part)
                    self.stats.restarted += 1
                    raise DownloadInterrupted(f"download: HTTP 416 from {spec.url}; starting over")
                else:
                    note = ""
                    if resp.status == 401 and auth is None and self.credentials is not None:
                        why = self.credentials.scope.refusal(spec.url)
                        note = f" (sent without the device credentials: {why})"
                    raise DownloadHTTPError(resp.status, spec.url, note)
                f = await asyncio.to_thread(open, part, "ab" if have else "wb")
                async for chunk in resp.content.iter_chunked(self.chunk_bytes):
                    if have + len(chunk) > spec.size:
                        raise DownloadIntegrityError(
                            f"size mismatch: expected {spec.size} bytes, got more",
                            resumed=resumed_from > 0,
                        )
                    await asyncio.to_thread(_write, f, digest, chunk)
                    have += len(chunk)
                    self.stats.bytes += len(chunk)
        except DownloadIntegrityError:
            await self._close(f)
            f = None
            await asyncio.to_thread(_unlink, part)
            raise
        except aiohttp.InvalidURL as exc:
            raise DownloadError(f"download: invalid URL {spec.url}") from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DownloadInterrupted(
                f"download: {_describe(exc)} from {spec.url} after {have} of {spec.size} bytes"
            ) from exc
        finally:
            await self._close(f)
        if have < spec.size:
            raise DownloadInterrupted(
                f"download: {spec.url} ended after {have} of {spec.size} bytes"
            )
        return await self._verify(spec, part, final, digest, resumed=resumed_from > 0)

    async def _verify(
        self, spec: BundleSpec, part: Path, final: Path, digest: Any, resumed: bool
    ) -> Path:
        got = digest.hexdigest()
        if got != spec.sha256:
            await asyncio.to_thread(_unlink, part)
            raise DownloadIntegrityError(
                f"sha256 mismatch: expected {spec.sha256}, got {got}", resumed=resumed
            )
        await asyncio.to_thread(durable_replace, part, final)
        self.stats.completed += 1
        return final

    @staticmethod
    async def _close(f: IO[bytes] | None) -> None:
        if f is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(f.close)

    async def cleanup(self, keep: set[str]) -> list[str]:
        """Delete parts and bundles whose stem is not in ``keep`` (superseded downloads)."""
        return await asyncio.to_thread(self._cleanup, keep)

    def _cleanup(self, keep: set[str]) -> list[str]:
        removed: list[str] = []
        if not self.directory.is_dir():
            return removed
        for p in self.directory.iterdir():
            if p.suffix in (PART_SUFFIX, BUNDLE_SUFFIX) and p.stem not in keep:
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p.name)
        return removed


def _describe(exc: BaseException) -> str:
    """A short cause for a transient failure (aiohttp's own texts are long)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return "connection lost"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``(first byte, total or None)`` of a ``Content-Range`` header; (None, None) if absent."""
    m = _CONTENT_RANGE.match(value.strip()) if value else None
    if m is None:
        return None, None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), total


def basic_auth(user: str, password: str) -> str:
    """An HTTP Basic ``Authorization`` value (RFC 7617, UTF-8).

    Built here rather than with ``aiohttp.BasicAuth``, deprecated in aiohttp 3.14.
    Where it may be sent is :class:`CredentialScope`'s decision.
    """
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")

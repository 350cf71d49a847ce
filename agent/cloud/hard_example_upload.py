"""Hard examples back to the fleet (issue 11, part 6; docs/fleet.md, "Hard examples").

The cloud router starts one :class:`HardExampleUploader` when the agent has a hard-example
store *and* a ``fleet`` section. In the background it reads the store's final rows
(``answered`` or ``expired``: a ``pending`` one may still get its cloud answer), oldest
first, and sends each one to the fleet as ``PUT <fleet>/v1/hard-examples/<sha256>``
(the body: ``core.hard_example_wire.encode_upload``; its sha256 is the id).

- **Acknowledged before deletion**, like telemetry: a row is deleted only after the
  fleet answered 201 (stored) or 200 (already had it: the same body sent before, its
  answer lost). A crash in between sends it again; the fleet dedups by the id. A big
  body is first asked for with ``HEAD`` (nothing sent twice over a slow line).
- **Resumable**: one case per request, so an interruption costs at most the case in
  flight; the next round starts again from the oldest unacknowledged row.
- **Bandwidth budget** (``upload.max_bytes_per_s``) kept per fixed window of
  ``upload.window_s``: a window carries at most ``max_bytes_per_s * window_s`` body
  bytes; a case larger than that goes alone and the windows it overran stay empty
  (the ledger of recent windows is in ``stats()``). Headers are not counted.
- **The fleet's storage budget**: 507 (fleet full) backs off and keeps the rows; 400
  and 413 (a case the fleet will never take) mark the row ``upload_refused``, kept for
  the local caps to evict. 401/403, 5xx and network failures back off (doubling up to
  ``max_backoff_s``) and keep everything.
- **Credentials** (agent/download.py's rules): the device's HTTP Basic credentials
  go only to the enrolled fleet (``fleet.sync.fleet_url``, https unless loopback); if
  that URL is not allowed, nothing is uploaded at all (said once, and in ``stats()``).
  Requests never follow redirects.

Runs on the event loop (aiohttp); the store's SQLite work runs on its writer thread,
encoding and hashing a body (at most a few MiB) in a worker thread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from edgefleet.agent.cloud.config import HardExampleUploadConfig
from edgefleet.agent.cloud.hard_examples import HardExampleStore, UploadRow
from edgefleet.agent.config import FleetConfig
from edgefleet.agent.download import CredentialScope, basic_auth
from edgefleet.core.hard_example_wire import encode_upload, image_type

log = logging.getLogger(__name__)

HEAD_FIRST_BYTES = 64 * 1024  # bodies at least this big are asked for before sending
LEDGER_WINDOWS = 120


class BandwidthBudget:
    """At most ``allowance`` bytes per fixed window of ``window_s`` (module doc).

    Event loop only. ``clock`` is injectable for tests of the arithmetic; the ledger
    (window index → bytes) is what the uploader's tests check, not timings.
    """

    def __init__(
        self, bytes_per_s: int, window_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window_s = window_s
        self.allowance = max(1, int(bytes_per_s * window_s))
        self.clock = clock
        self.ledger: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._blocked_until = 0  # first window open again after an oversized case

    def _window(self) -> int:
        return int(self.clock() // self.window_s)

    def delay(self, n: int) -> float:
        """Seconds to wait before ``n`` bytes may go (0: now)."""
        w = self._window()
        if w < self._blocked_until:
            return (self._blocked_until * self.window_s) - self.clock()
        used = self.ledger.get(w, 0)
        if used + n <= self.allowance or (used == 0 and n > self.allowance):
            return 0.0
        return (w + 1) * self.window_s - self.clock()

    def spend(self, n: int) -> None:
        w = self._window()
        self.ledger[w] = self.ledger.get(w, 0) + n
        if n > self.allowance:
            # Its bytes count against the windows it took to send at the budget's rate.
            self._blocked_until = w + -(-n // self.allowance)
        while len(self.ledger) > LEDGER_WINDOWS:
            self.ledger.popitem(last=False)

    async def take(self, n: int) -> None:
        """Wait until ``n`` bytes fit the budget, then spend them (one sender only)."""
        wait = self.delay(n)
        while wait > 0:
            await asyncio.sleep(wait)  # until the next window opens: a time, not an event
            wait = self.delay(n)
        self.spend(n)


@dataclass
class UploadStats:
    uploaded: int = 0  # stored by the fleet now
    already: int = 0  # the fleet had it (a resend)
    skipped_by_head: int = 0  # HEAD said it had it: body not sent
    refused: dict[str, int] = field(default_factory=dict)  # by HTTP status, for good
    failures: int = 0  # rounds ended by a failure (fleet down, full, 5xx...)
    bytes_sent: int = 0
    last_error: str | None = None
    disabled: str | None = None  # why nothing is uploaded at all


class HardExampleUploader:
    def __init__(
        self,
        store: HardExampleStore,
        config: HardExampleUploadConfig,
        device_id: str,
        fleet: FleetConfig,
    ) -> None:
        self.store = store
        self.config = config
        self.device_id = device_id
        self.fleet = fleet
        self.budget = BandwidthBudget(config.max_bytes_per_s, config.window_s)
        self.stats = UploadStats()
        self.base: str | None = fleet.sync.fleet_url
        self._auth: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()

    def describe(self) -> dict[str, Any]:
        """For ``GET /v1/fallback`` (``hard_examples.upload``)."""
        from dataclasses import asdict

        return {
            "fleet": self.base,
            **asdict(self.stats),
            "max_bytes_per_s": self.config.max_bytes_per_s,
            "window_s": self.config.window_s,
            "ledger": [[w, n] for w, n in self.budget.ledger.items()],
        }

    def wake(self) -> None:
        """Look for new cases now (tests; the loop also looks every ``interval_s``)."""
        self._wake.set()

    # ---- lifecycle -------------------------------------------------------------------

    async def _open(self) -> bool:
        scope = CredentialScope.for_fleet(self.fleet.sync.fleet_url, self.fleet.host)
        if self.base is None:
            self.base = f"https://{self.fleet.host}"
        refusal = scope.refusal(self.base + "/v1/hard-examples")
        if refusal is not None:
            self.stats.disabled = f"not uploading: {refusal}"
            log.warning("hard examples are kept, not uploaded: %s", refusal)
            return False
        secret = await asyncio.to_thread(self.fleet.secret)
        if secret is None:
            self.stats.disabled = "not uploading: the device has no secret"
            return False
        self._auth = basic_auth(self.device_id, secret)
        ssl_ctx: ssl.SSLContext | bool = True
        if self.fleet.sync.ca_file is not None:
            ssl_ctx = await asyncio.to_thread(
                ssl.create_default_context, cafile=self.fleet.sync.ca_file
            )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=2),
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
        )
        return True

    async def run(self) -> None:
        """The background loop (the router spawns and cancels it)."""
        if not await self._open():
            return
        backoff = self.config.interval_s
        try:
            while True:
                try:
                    done = await self.run_once()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("hard-example upload round failed")
                    done = False
                if done:
                    backoff = self.config.interval_s
                    wait = self.config.interval_s
                else:
                    wait = backoff
                    backoff = min(backoff * 2, self.config.max_backoff_s)
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None

    # ---- one round ------------------------------------------------------------------

    async def run_once(self) -> bool:
        """Send what is there now; False when a failure ended the round (back off)."""
        after = 0
        while True:
            rows = await self.store.uploadable(self.config.batch, after)
            if not rows:
                return True
            for row in rows:
                after = row.id
                outcome = await self._send(row)
                if outcome == "stop":
                    self.stats.failures += 1
                    return False

    async def _send(self, row: UploadRow) -> str:
        """``ok`` (acknowledged, deleted), ``refused`` (marked) or ``stop``."""
        assert self._session is not None and self.base is not None and self._auth is not None
        hid, body = await asyncio.to_thread(self._encode, row)
        url = f"{self.base}/v1/hard-examples/{hid}"
        headers = {"Authorization": self._auth}
        try:
            if len(body) >= HEAD_FIRST_BYTES:
                async with self._session.head(url, headers=headers, allow_redirects=False) as r:
                    if r.status == 200:
                        self.stats.skipped_by_head += 1
                        await self.store.delete([row.id])
                        return "ok"
            await self.budget.take(len(body))
            async with self._session.put(
                url,
                data=body,
                headers={**headers, "Content-Type": "application/x-edgefleet-hard-example"},
                allow_redirects=False,
            ) as r:
                status = r.status
                text = (await r.text())[:300]
            self.stats.bytes_sent += len(body)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.stats.last_error = f"{type(exc).__name__}: {exc}"[:300]
            log.info("hard-example upload: fleet unreachable (%s); later", self.stats.last_error)
            return "stop"
        if status in (200, 201):
            if status == 201:
                self.stats.uploaded += 1
            else:
                self.stats.already += 1
            await self.store.delete([row.id])  # only now: the fleet has it
            return "ok"
        self.stats.last_error = f"HTTP {status}: {text}"
        if status in (400, 413):
            key = str(status)
            self.stats.refused[key] = self.stats.refused.get(key, 0) + 1
            log.warning("hard example %d refused by the fleet for good: %s", row.id, text)
            await self.store.refuse_upload(row.id, f"HTTP {status}: {text}")
            return "refused"
        log.info("hard-example upload: HTTP %d (%s); later", status, text)
        return "stop"  # 507 full, 401/403, 5xx, anything else: keep, back off

    def _encode(self, row: UploadRow) -> tuple[str, bytes]:
        """Worker thread: the body and its id (sha256)."""
        itype = image_type(row.image) if row.image else None
        header = {
            "device_id": self.device_id,
            "model": row.model,
            "version": row.version,
            "kind": row.kind,
            "status": row.status,
            "created_at": row.created_at,
            "cloud_model": row.cloud_model,
            "cloud_version": row.cloud_version,
            "edge_class": row.edge_class,
            "edge_confidence": row.edge_confidence,
            "cloud_class": row.cloud_class,
            "cloud_confidence": row.cloud_confidence,
            "agree": None if row.agree is None else bool(row.agree),
            "image_type": itype,
        }
        parts: dict[str, bytes] = {
            "inputs": row.inputs,
            "edge_outputs": row.edge_outputs,
            "cloud_outputs": row.cloud_outputs or b"",
            "image": (row.image or b"") if itype else b"",  # an image of another type stays home
        }
        return encode_upload(header, parts)

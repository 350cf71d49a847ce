"""``edge-fleet``: run the fleet service, and manage the fleet through its HTTP API.

    edge-fleet serve [--config FILE] [--data-dir DIR] [--port N] ...
    edge-fleet models push digits-edge-2.bundle
    edge-fleet assign digits-edge 2 --group north --waves 1,10%,100%
    edge-fleet rollout status --watch
    edge-fleet unassign digits-edge --group north
    edge-fleet models delete digits-edge 1

Client commands talk to ``--url`` (default http://127.0.0.1:8480, or
``EDGEFLEET_URL``) with the admin token from ``--token``, ``--token-file`` or
``EDGEFLEET_TOKEN`` (or ``EDGEFLEET_TOKEN_FILE``). Tables for people by default,
``--json`` for scripts. Exit codes: 0 ok, 1 the fleet refused (its error is
printed), 2 usage or configuration error, 3 the fleet could not be reached, 4
(``rollout status ID``) the rollout stopped or rolled back, 141 the reader of the
output went away (``... | head``: quietly, see ``main``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlencode, urlsplit

from edgefleet.core import logs
from edgefleet.core.errors import ConfigError, EdgefleetError

DEFAULT_URL = "http://127.0.0.1:8480"
_CHUNK = 256 * 1024
log = logging.getLogger("edgefleet.fleet")


class FleetRefused(EdgefleetError):
    """The fleet answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"fleet answered {status}: {message}")
        self.status = status


class Unreachable(EdgefleetError):
    pass


# ------------------------------------------------------------------------- client


class Client:
    """A small synchronous JSON client (http.client: no extra dependency, full control
    of the upload so that a refused one still yields the fleet's error message)."""

    def __init__(
        self, url: str, token: str | None, timeout: float = 30.0, ca_file: str | None = None
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--url {url!r} must be an http(s) URL")
        self.url = url.rstrip("/")
        self._parts = parts
        self.token = token
        self.timeout = timeout
        self.ca_file = ca_file

    def _connection(self) -> http.client.HTTPConnection:
        host, port = self._parts.hostname or "", self._parts.port
        if self._parts.scheme == "https":
            ctx = ssl.create_default_context(cafile=self.ca_file)
            return http.client.HTTPSConnection(host, port, timeout=self.timeout, context=ctx)
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, Any] | None = None,
        upload: tuple[BinaryIO, int, Callable[[int], None]] | None = None,
    ) -> tuple[int, Any]:
        target = self._parts.path.rstrip("/") + path
        query = {k: v for k, v in (params or {}).items() if v is not None}
        if query:
            target += "?" + urlencode(query)
        headers = {"Accept": "application/json", "User-Agent": "edge-fleet"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data: bytes | None = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif upload is not None:
            headers["Content-Type"] = "application/octet-stream"
            headers["Content-Length"] = str(upload[1])
        conn = self._connection()
        try:
            try:
                conn.request(method, target, body=data, headers=headers)
                if upload is not None:
                    self._send_file(conn, *upload)
            except (BrokenPipeError, ConnectionResetError):
                # The fleet refused before reading everything (e.g. 413): its answer
                # may still be waiting in the socket.
                if upload is None:
                    raise
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"cannot reach the fleet at {self.url}: {exc}") from exc
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = {"error": raw[:500].decode("utf-8", "replace")}
        if resp.status >= 400:
            message = doc.get("error", doc) if isinstance(doc, dict) else doc
            raise FleetRefused(resp.status, str(message))
        return resp.status, doc

    @staticmethod
    def _send_file(
        conn: http.client.HTTPConnection, f: BinaryIO, size: int, progress: Callable[[int], None]
    ) -> None:
        sent = 0
        while chunk := f.read(_CHUNK):
            conn.send(chunk)
            sent += len(chunk)
            progress(sent)
        if sent != size:
            raise OSError(f"file changed while uploading ({sent} of {size} bytes)")

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)[1]

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, {} if body is None else body)[1]

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)[1]

    def delete(self, path: str, body: Any = None) -> Any:
        return self.request("DELETE", path, body)[1]


def _q(part: str) -> str:
    return quote(part, safe="")


# ---------------------------------------------------------------------- rendering


def table(rows: Sequence[Sequence[Any]], out: Any = None) -> None:
    """Left-aligned columns, the first row as header."""
    out = out or sys.stdout
    if len(rows) <= 1:
        print("(none)", file=out)
        return
    cells = [["-" if c is None or c == "" else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)


def ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "never"
    delta = (now or time.time()) - ts
    if delta < 0:
        return "just now"
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= seconds:
            return f"{int(delta // seconds)}{unit} ago"
    return f"{int(delta)}s ago"


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def size_str(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _emit(args: argparse.Namespace, doc: Any, human: Callable[[Any], None]) -> int:
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        human(doc)
    return 0


class Progress:
    """Upload progress on stderr: a bar redrawn in place on a terminal, a line per
    quarter otherwise (logs stay readable)."""

    def __init__(self, label: str, total: int, stream: Any = None) -> None:
        self.label, self.total = label, max(total, 1)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_pct = -1
        self._last_t = 0.0

    def __call__(self, sent: int) -> None:
        pct = min(100, sent * 100 // self.total)
        if self.tty:
            t = time.monotonic()
            if pct != 100 and t - self._last_t < 0.1:
                return
            self._last_t = t
            bar = "#" * (pct // 4)
            self.stream.write(
                f"\r{self.label} [{bar:<25}] {pct:3d}% {size_str(sent)}/{size_str(self.total)}"
            )
            if pct == 100:
                self.stream.write("\n")
        elif pct // 25 > self._last_pct // 25 or (pct == 100 and self._last_pct != 100):
            self.stream.write(f"{self.label}: {pct}% ({size_str(sent)})\n")
        else:
            return
        self._last_pct = pct
        self.stream.flush()


# ----------------------------------------------------------------------- commands


def cmd_models_push(args: argparse.Namespace, client: Client) -> int:
    path = Path(args.file)
    try:
        size = path.stat().st_size
        f = path.open("rb")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    with f:
        progress = Progress(f"uploading {path.name}", size)
        status, doc = client.request("POST", "/v1/models", upload=(f, size, progress))

    def human(d: dict[str, Any]) -> None:
        what = "uploaded" if status == 201 else "already there (same bytes)"
        signer = d.get("key_id") or "nobody (unsigned)"
        print(
            f"{d['name']}:{d['version']} {what}: {size_str(d['size'])},"
            f" sha256 {d['sha256'][:16]}…, signed by {signer}"
        )

    return _emit(args, doc, human)


def cmd_models_list(args: argparse.Namespace, client: Client) -> int:
    doc = client.get("/v1/models")

    def human(d: dict[str, Any]) -> None:
        rows: list[Sequence[Any]] = [
            ("MODEL", "VERSION", "LABELS", "SIZE", "SHA256", "RUNTIME", "SIGNED-BY", "UPLOADED")
        ]
        for m in d["models"]:
            for v in m["versions"]:
                rows.append(
                    (
                        m["name"],
                        v["version"],
                        ",".join(v["labels"]),
                        size_str(v["size"]),
                        v["sha256"][:12],
                        v["runtime"],
                        v["key_id"] or "unsigned",
                        when(v["uploaded_at"]),
                    )
                )
        table(rows)

    return _emit(args, doc, human)


def cmd_models_show(args: argparse.Namespace, client: Client) -> int:
    doc = client.get(f"/v1/models/{_q(args.name)}")

    def human(d: dict[str, Any]) -> None:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(d["labels"].items())) or "none"
        print(f"{d['name']}: {len(d['versions'])} version(s); labels: {labels}")
        rows: list[Sequence[Any]] = [("VERSION", "SIZE", "SHA256", "UPLOADED", "METRICS")]
        for v in d["versions"]:
            metrics = ", ".join(f"{k}={val}" for k, val in sorted(v["metrics"].items()))
            rows.append(
                (
                    v["version"],
                    size_str(v["size"]),
                    v["sha256"][:12],
                    when(v["uploaded_at"]),
                    metrics,
                )
            )
        table(rows)

    return _emit(args, doc, human)


def cmd_models_label(args: argparse.Namespace, client: Client) -> int:
    doc = client.put(
        f"/v1/models/{_q(args.name)}/labels/{_q(args.label)}", {"version": args.version}
    )
    return _emit(args, doc, lambda d: print(f"{d['name']}: {d['label']} -> {d['version']}"))


def cmd_models_unlabel(args: argparse.Namespace, client: Client) -> int:
    doc = client.delete(f"/v1/models/{_q(args.name)}/labels/{_q(args.label)}")
    return _emit(
        args, doc, lambda d: print(f"{d['name']}: label {d['label']} removed (was {d['version']})")
    )


def cmd_models_delete(args: argparse.Namespace, client: Client) -> int:
    """``models delete NAME [VERSION]``: one version, or the whole model. The fleet
    refuses (exit 1, its 409 names why) while anything still uses it."""
    if args.version:
        doc = client.delete(f"/v1/models/{_q(args.name)}/versions/{_q(args.version)}")
    else:
        doc = client.delete(f"/v1/models/{_q(args.name)}")

    def human(d: dict[str, Any]) -> None:
        what = ", ".join(f"{d['name']}:{v}" for v in d["versions_removed"])
        print(f"deleted {what}")
        if d.get("labels_removed"):
            print(f"  labels removed: {', '.join(d['labels_removed'])}")
        if d.get("assignments_removed"):
            print(f"  {d['assignments_removed']} assignment(s) that could no longer apply removed")
        if d.get("files_missing"):
            print(f"  bundle file(s) already missing for: {', '.join(d['files_missing'])}")

    return _emit(args, doc, human)


def _model_cell(name: str, m: dict[str, Any]) -> str:
    state = m.get("state") or "?"
    cell = f"{name}:{m.get('active') or '-'}"
    if m.get("desired") and m.get("desired") != m.get("active"):
        cell += f"→{m['desired']}"
    return cell if state == "active" else f"{cell}({state})"


def cmd_devices_list(args: argparse.Namespace, client: Client) -> int:
    doc = client.get("/v1/devices", group=args.group)

    def human(d: dict[str, Any]) -> None:
        rows: list[Sequence[Any]] = [("DEVICE", "STATE", "LAST-SEEN", "AGENT", "GROUPS", "MODELS")]
        now = time.time()
        for dev in d["devices"]:
            models = " ".join(_model_cell(n, m) for n, m in sorted(dev["models"].items()))
            rows.append(
                (
                    dev["id"],
                    "online" if dev["online"] else "offline",
                    ago(dev["last_seen"], now),
                    dev["agent_version"],
                    ",".join(dev["groups"]),
                    models,
                )
            )
        table(rows)
        online = sum(1 for dev in d["devices"] if dev["online"])
        print(f"\n{len(d['devices'])} device(s), {online} online")

    return _emit(args, doc, human)


def cmd_devices_show(args: argparse.Namespace, client: Client) -> int:
    doc = client.get(f"/v1/devices/{_q(args.id)}")

    def human(d: dict[str, Any]) -> None:
        state = "online" if d["online"] else f"offline ({d.get('offline_reason') or 'never seen'})"
        print(f"device        {d['id']}")
        print(f"state         {state}, last seen {ago(d['last_seen'])}")
        print(f"agent         {d.get('agent_version') or '-'} ({d.get('protocol') or '-'})")
        print(f"groups        {', '.join(d['groups']) or '-'}")
        accel = d.get("accelerators") or {}
        print(
            "accelerators  "
            + ("; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(accel.items())) or "-")
        )
        print(f"revisions     desired {d['desired_revision']}, reported {d['reported_revision']}")
        desired = (d.get("desired") or {}).get("models") or {}
        if desired:
            print(
                "desired       "
                + ", ".join(f"{name}:{m.get('version')}" for name, m in sorted(desired.items()))
            )
        if d.get("last_error"):
            print(f"last error    {d['last_error']}")
        print()
        rows: list[Sequence[Any]] = [
            ("MODEL", "ACTIVE", "PREVIOUS", "DESIRED", "STATE", "PROVIDER", "LAST-ERROR")
        ]
        for name, m in sorted(d["models"].items()):
            rows.append(
                (
                    name,
                    m["active"],
                    m["previous"],
                    m["desired"],
                    m["state"],
                    m["provider"],
                    m["last_error"],
                )
            )
        table(rows)
        from edgefleet.fleet.cli_quality import print_fallback  # it imports this module

        print_fallback(d)  # the fallback policy each model runs, and its sources
        if d.get("events"):
            print("\nrecent events:")
            ev_rows: list[Sequence[Any]] = [("RECEIVED", "KIND", "MODEL", "VERSION", "REASON")]
            for e in d["events"][: args.events]:
                ev_rows.append(
                    (
                        when(e.get("received_at")),
                        e.get("kind"),
                        e.get("model"),
                        e.get("version"),
                        e.get("reason"),
                    )
                )
            table(ev_rows)

    return _emit(args, doc, human)


def cmd_devices_enrol_token(args: argparse.Namespace, client: Client) -> int:
    body: dict[str, Any] = {"groups": args.group or []}
    if args.device_id:
        body["device_id"] = args.device_id
    if args.ttl is not None:
        body["ttl_s"] = args.ttl
    doc = client.post("/v1/enrolment-tokens", body)

    def human(d: dict[str, Any]) -> None:
        print(d["token"])
        who = d.get("device_id") or "a new device id"
        groups = ", ".join(d["groups"]) or "no groups"
        print(
            f"one-time enrolment token for {who} ({groups}), expires {when(d['expires_at'])};"
            f" the device trades it at POST {client.url}/v1/enrol",
            file=sys.stderr,
        )

    return _emit(args, doc, human)


def cmd_devices_groups(args: argparse.Namespace, client: Client) -> int:
    doc = client.put(f"/v1/devices/{_q(args.id)}/groups", {"groups": args.groups})
    return _emit(
        args, doc, lambda d: print(f"{d['device_id']}: groups {', '.join(d['groups']) or 'none'}")
    )


def cmd_devices_revoke(args: argparse.Namespace, client: Client) -> int:
    doc = client.post(f"/v1/devices/{_q(args.id)}/revoke", {})
    return _emit(
        args,
        doc,
        lambda d: print(
            f"{d['device_id']}: revoked (downloads refused, {d['tokens_cancelled']} unused"
            f" token(s) cancelled, broker account {d['broker_account']})"
        ),
    )


def cmd_devices_command(args: argparse.Namespace, client: Client) -> int:
    body: dict[str, Any] = {"command": args.command_name}
    if args.model:
        body["model"] = args.model
    doc = client.post(f"/v1/devices/{_q(args.id)}/commands", body)
    return _emit(args, doc, lambda d: print(f"sent {d['command']} to {d['device_id']}: {d['id']}"))


def parse_waves_arg(text: str) -> list[int | str]:
    waves: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        waves.append(part if part.endswith("%") else int(part))
    if not waves:
        raise ValueError("no waves")
    return waves


def plan_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--plan plan.yaml`` (docs/fleet.md, "Rollout plans and gates") with the plan
    flags on top; None when neither is given (a plain assignment or waves rollout).
    The fleet validates the result (HTTP 400 with the first problem)."""
    plan: dict[str, Any] = {}
    if args.plan:
        import yaml

        try:
            loaded = yaml.safe_load(Path(args.plan).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"--plan {args.plan}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--plan {args.plan}: a YAML mapping with waves, gates, ...")
        plan = dict(loaded)
    if args.gate:
        plan["gates"] = list(args.gate)
    for flag, key in (
        ("on_fail", "on_fail"),
        ("min_requests", "min_requests"),
        ("promote", "promote"),
    ):
        if getattr(args, flag) is not None:
            plan[key] = getattr(args, flag)
    shadow = dict(plan.get("shadow") or {})
    for flag, key in (
        ("shadow_devices", "devices"),
        ("shadow_min_items", "min_items"),
        ("shadow_min_duration", "min_duration_s"),
        ("shadow_sample_rate", "sample_rate"),
    ):
        value = getattr(args, flag)
        if value is not None:
            shadow[key] = int(value) if key == "devices" and value.isdigit() else value
    if args.shadow_gate:
        shadow["gates"] = list(args.shadow_gate)
    if shadow:
        plan["shadow"] = shadow
    return plan or None


def _target_arg(args: argparse.Namespace) -> dict[str, Any]:
    if args.device:
        return {"device": args.device}
    if args.group:
        return {"group": args.group}
    return {"all": True}


def cmd_assign(args: argparse.Namespace, client: Client) -> int:
    target = _target_arg(args)
    body: dict[str, Any] = {"model": args.model, "version": args.version, "target": target}
    if args.waves:
        try:
            body["waves"] = parse_waves_arg(args.waves)
        except ValueError:
            raise ConfigError(
                f"--waves {args.waves!r}: use counts and shares like 1,10%,100%"
            ) from None
    if args.max_failure_share is not None:
        body["max_failure_share"] = args.max_failure_share
    if args.wave_timeout is not None:
        if not (args.waves or args.plan):
            raise ConfigError("--wave-timeout applies to a staged rollout: give --waves too")
        body["wave_timeout_s"] = args.wave_timeout  # the fleet checks it (400)
    plan = plan_from_args(args)
    if plan is not None:
        if "waves" in body:
            plan["waves"] = body.pop("waves")
        if "waves" not in plan:
            raise ConfigError("a rollout plan needs waves: --waves 1,10%,100% or waves: in --plan")
        if "wave_timeout_s" in body:
            plan["wave_timeout_s"] = body.pop("wave_timeout_s")
        body["plan"] = plan
    doc = client.post("/v1/assignments", body)

    def human(d: dict[str, Any]) -> None:
        if "assignment_id" in d:
            print(
                f"assigned {args.model}:{args.version} to {target_str(target)}"
                f" (assignment {d['assignment_id']})"
            )
        else:
            print_rollout(d)

    return _emit(args, doc, human)


def cmd_unassign(args: argparse.Namespace, client: Client) -> int:
    """Remove a model's assignments to one target (``DELETE /v1/assignments``)."""
    target = _target_arg(args)
    doc = client.delete("/v1/assignments", {"model": args.model, "target": target})

    def human(d: dict[str, Any]) -> None:
        versions = ", ".join(sorted({r["version"] for r in d["removed"]}))
        changed = d["devices_changed"]
        print(
            f"unassigned {d['model']} ({versions}) from {target_str(d['target'])}:"
            f" {len(d['removed'])} assignment(s) removed, {len(changed)} device(s) get a new"
            " desired state"
        )

    return _emit(args, doc, human)


def cmd_assignments(args: argparse.Namespace, client: Client) -> int:
    doc = client.get("/v1/assignments", model=args.model)

    def human(d: dict[str, Any]) -> None:
        rows: list[Sequence[Any]] = [("ID", "MODEL", "VERSION", "TARGET", "ROLLOUT", "CREATED")]
        for a in d["assignments"]:
            rollout = a.get("rollout_id")
            if rollout:
                rollout = f"{rollout} ({a.get('rollout_state')})"
            rows.append(
                (
                    a["assignment_id"],
                    a["model"],
                    a["version"],
                    target_str(a["target"]),
                    rollout,
                    when(a.get("created_at")),
                )
            )
        table(rows)

    return _emit(args, doc, human)


def wave_timeout_str(value: Any) -> str:
    return "none (a wave waits for every device)" if value is None else f"{value:g} s"


_TERMINAL = ("completed", "stopped", "rolled_back")
_FAILED = ("stopped", "rolled_back")
ROLLOUT_FAILED_EXIT = 4  # rollout status ID: the rollout stopped or rolled back


def _wave_counts(w: dict[str, Any]) -> str:
    keys = ("pending", "succeeded", "failed", "waiting", "rolled_back")
    return ", ".join(f"{w[k]} {k}" for k in keys if w.get(k))


def target_str(target: Any) -> str:
    """``{"group": "north"}`` → ``group north``; ``{"all": true}`` → ``all``."""
    if not isinstance(target, dict):
        return str(target or "-")
    return ", ".join(k if v is True else f"{k} {v}" for k, v in target.items())


def print_rollout(r: dict[str, Any]) -> None:
    print(
        f"rollout {r.get('id')}: {r.get('model')}:{r.get('version')} to"
        f" {target_str(r.get('target'))}, {r.get('state')},"
        f" wave {r.get('current_wave')} of {r.get('wave_count', '?')}"
        f" (plan {r.get('waves')}, stop above {r.get('max_failure_share')} failed)"
    )
    print(f"  wave timeout: {wave_timeout_str(r.get('wave_timeout_s'))}")
    if r.get("reason"):
        print(f"  reason: {r['reason']}")
    totals = r.get("counts")
    if isinstance(totals, dict):
        print(f"  all: {totals.get('devices', 0)} device(s): {_wave_counts(totals) or '-'}")
    for w in r.get("per_wave") or []:
        if isinstance(w, dict):
            print(
                f"  wave {w.get('wave')}: {w.get('devices', '?')} device(s):"
                f" {_wave_counts(w) or '-'}"
            )
    failures = r.get("failures") or []
    for f in failures[:20]:
        print(f"  failed {f.get('device_id')}: {f.get('reason')}")
    if len(failures) > 20:
        print(f"  … and {len(failures) - 20} more failures")
    plan = r.get("plan")
    if isinstance(plan, dict):
        stage = r.get("stage")
        print(f"  stage: {stage}; on a failed gate: {plan.get('on_fail')}")
        if plan.get("shadow"):
            print(f"  shadow on: {', '.join(r.get('shadow_devices') or []) or '-'}")
        for d in r.get("decisions") or []:
            where = "shadow" if d.get("stage") == "shadow" else f"wave {d.get('wave')}"
            print(f"  {where}: gates {d.get('outcome')}")
            for g in d.get("gates") or []:
                print(f"    {g.get('outcome')}: {g.get('gate')}: {g.get('why')}")
    ev = r.get("evidence")
    if isinstance(ev, dict):
        print(f"  evidence ({ev.get('action')}): gate {ev.get('gate')!r}")
        for g in ev.get("failed") or []:
            c, b = g.get("canary") or {}, g.get("baseline") or {}
            print(
                f"    canary {c.get('value')} (n={c.get('n')},"
                f" 95% {c.get('low')}..{c.get('high')}),"
                f" baseline {b.get('value')} (n={b.get('n')}), threshold {g.get('threshold')}"
            )
        served = ev.get("devices_served") or []
        print(
            f"    served by {ev.get('devices_served_count', len(served))} device(s):"
            f" {', '.join(served) or '-'}"
        )


def cmd_rollout_status(args: argparse.Namespace, client: Client) -> int:
    while True:
        if args.id:
            doc = client.get(f"/v1/rollouts/{_q(args.id)}")
        else:
            doc = client.get("/v1/rollouts")
        # For scripts: a stopped or rolled-back rollout is a failure (exit 4; 3 is
        # "fleet unreachable").
        failed = ROLLOUT_FAILED_EXIT if args.id and doc.get("state") in _FAILED else 0
        if args.json:
            print(json.dumps(doc, indent=2, sort_keys=True), flush=True)
        elif args.id:
            print_rollout(doc)
        else:
            rows: list[Sequence[Any]] = [
                ("ROLLOUT", "MODEL", "VERSION", "STATE", "WAVE", "TIMEOUT", "TARGET", "UPDATED")
            ]
            for r in doc.get("rollouts", []):
                wave = f"{r.get('current_wave')}/{r.get('wave_count', '?')}"
                rows.append(
                    (
                        r.get("id"),
                        r.get("model"),
                        r.get("version"),
                        r.get("state"),
                        wave,
                        "-" if r.get("wave_timeout_s") is None else f"{r['wave_timeout_s']:g}s",
                        target_str(r.get("target")),
                        ago(r.get("updated_at")),
                    )
                )
            table(rows)
        if not args.watch:
            return failed
        rollouts = [doc] if args.id else doc.get("rollouts", [])
        if rollouts and all(r.get("state") in _TERMINAL for r in rollouts):
            return failed
        sys.stdout.flush()
        time.sleep(args.interval)
        if not args.json:
            print(f"--- {when(time.time())}")


def _rollout_action(action: str) -> Callable[[argparse.Namespace, Client], int]:
    def run(args: argparse.Namespace, client: Client) -> int:
        doc = client.post(f"/v1/rollouts/{_q(args.id)}/{action}")
        return _emit(args, doc, print_rollout)

    return run


def _telemetry_rows(doc: Any) -> list[dict[str, Any]]:
    if isinstance(doc, dict):
        for key in ("models", "versions", "items"):
            if isinstance(doc.get(key), list):
                return list(doc[key])
    return list(doc) if isinstance(doc, list) else []


def _ms(value: Any, above: Any = False) -> str:
    if value is None:
        return "-"
    return f">{value:g}" if above else f"{value:g}"


def _drift(d: Any) -> str:
    """``max/mean/output`` PSI of a version's ``drift`` (docs/fleet.md), or "-"."""
    if not isinstance(d, dict) or (d.get("psi_max") is None and d.get("psi_output") is None):
        return "-"
    return "/".join("-" if d.get(k) is None else f"{d[k]:.2f}" for k in DRIFT_KEYS)


DRIFT_KEYS = ("psi_max", "psi_mean", "psi_output")


def print_telemetry(doc: Any) -> None:
    rows: list[Sequence[Any]] = [
        (
            "MODEL",
            "VERSION",
            "REQUESTS",
            "ERRORS",
            "P50-MS",
            "P95-MS",
            "DRIFT-PSI(MAX/MEAN/OUT)",
            "DEVICES",
            "LAST-SEEN",
        )
    ]
    for r in _telemetry_rows(doc):
        rows.append(
            (
                r.get("model"),
                r.get("version"),
                r.get("requests"),
                r.get("errors"),
                _ms(r.get("p50_ms"), r.get("p50_above")),
                _ms(r.get("p95_ms"), r.get("p95_above")),
                _drift(r.get("drift")),
                r.get("devices"),
                ago(r.get("last_seen")),
            )
        )
    table(rows)


def cmd_telemetry_models(args: argparse.Namespace, client: Client) -> int:
    return _emit(args, client.get("/v1/telemetry/models"), print_telemetry)


def cmd_telemetry_device(args: argparse.Namespace, client: Client) -> int:
    return _emit(args, client.get(f"/v1/telemetry/devices/{_q(args.id)}"), print_telemetry)


def cmd_events(args: argparse.Namespace, client: Client) -> int:
    doc = client.get("/v1/events", device=args.device, model=args.model, limit=args.limit)

    def human(d: Any) -> None:
        items = d.get("events", []) if isinstance(d, dict) else d
        rows: list[Sequence[Any]] = [
            ("RECEIVED", "DEVICE", "KIND", "MODEL", "VERSION", "ROLLOUT", "REASON")
        ]
        for e in items:
            rows.append(
                (
                    when(e.get("received_at") or e.get("at")),
                    e.get("device_id"),
                    e.get("kind"),
                    e.get("model"),
                    e.get("version"),
                    e.get("rollout"),
                    e.get("reason"),
                )
            )
        table(rows)

    return _emit(args, doc, human)


# -------------------------------------------------------------------------- serve


def service_config(args: argparse.Namespace) -> Any:
    """The config file (if any) with the command line's overrides laid over it."""
    from edgefleet.fleet.config import FleetServiceConfig, load_fleet_config

    cfg = (
        load_fleet_config(Path(args.config))
        if args.config
        else FleetServiceConfig(data_dir=Path("fleet-data").resolve())
    )
    http: dict[str, Any] = {}
    for key in ("host", "port", "public_url"):
        if getattr(args, key) is not None:
            http[key] = getattr(args, key)
    update: dict[str, Any] = {}
    if http:
        update["http"] = cfg.http.model_copy(update=http)
    if args.data_dir:
        update["data_dir"] = Path(args.data_dir).resolve()
    if args.token_file:
        update["auth"] = cfg.auth.model_copy(
            update={"token": None, "token_file": Path(args.token_file).resolve()}
        )
    if args.trust_key or args.allow_unsigned:
        keys = [Path(k).resolve() for k in args.trust_key] or cfg.trust.public_keys
        update["trust"] = cfg.trust.model_copy(
            update={
                "public_keys": keys,
                "allow_unsigned": args.allow_unsigned or cfg.trust.allow_unsigned,
            }
        )
    if args.mqtt_port is not None:
        if cfg.broker is not None:
            raise ConfigError("--mqtt-port is for the embedded broker; the config names a broker")
        update["embedded_broker"] = cfg.embedded_broker.model_copy(update={"port": args.mqtt_port})
    if args.log_level:
        update["logging"] = cfg.logging.model_copy(update={"level": args.log_level})
    if getattr(args, "log_format", None):
        logging_cfg = update.get("logging", cfg.logging)
        update["logging"] = logging_cfg.model_copy(update={"format": args.log_format})
    cfg = cfg.model_copy(update=update)
    # Re-validate: the overrides pass through the same checks as the file.
    return type(cfg).model_validate(cfg.model_dump(exclude_unset=True))


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from edgefleet.core.aio import event_loop_factory
    from edgefleet.fleet.service import serve

    cfg = service_config(args)
    logs.configure(cfg.logging.level, cfg.logging.format)  # stderr, text or JSON lines
    if cfg.logging.level != "DEBUG":
        # amqtt logs every state change of its broker and sessions at INFO.
        for noisy in ("amqtt", "transitions"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    with asyncio.Runner(loop_factory=event_loop_factory("auto")) as runner:
        return runner.run(serve(cfg))


def cmd_check_config(args: argparse.Namespace) -> int:
    from edgefleet.fleet.config import load_fleet_config

    cfg = load_fleet_config(Path(args.config))
    broker = f"broker {cfg.broker.host}" if cfg.broker else "embedded broker"
    print(f"{args.config}: OK (data in {cfg.data_dir}, API {cfg.http.base_url()}, {broker})")
    return 0


# ------------------------------------------------------------------------- parser


def _token(args: argparse.Namespace) -> str | None:
    if args.token:
        return str(args.token)
    token_file = args.token_file or os.environ.get("EDGEFLEET_TOKEN_FILE")
    if token_file:
        try:
            return Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read token file {token_file}: {exc.strerror}") from exc
    return os.environ.get("EDGEFLEET_TOKEN") or None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-fleet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    client_opts = argparse.ArgumentParser(add_help=False)
    client_opts.add_argument(
        "--url",
        default=os.environ.get("EDGEFLEET_URL", DEFAULT_URL),
        help=f"fleet API (default {DEFAULT_URL} or EDGEFLEET_URL)",
    )
    client_opts.add_argument("--token", help="admin token (or EDGEFLEET_TOKEN)")
    client_opts.add_argument(
        "--token-file", help="file holding the token (or EDGEFLEET_TOKEN_FILE)"
    )
    client_opts.add_argument(
        "--ca-file",
        default=os.environ.get("EDGEFLEET_CA_FILE"),
        help="PEM CA bundle for an https fleet with its own CA",
    )
    client_opts.add_argument("--timeout", type=float, default=60.0)
    client_opts.add_argument("--json", action="store_true", help="JSON output for scripts")

    def client(parent: Any, name: str, func: Callable[..., int], **kw: Any) -> Any:
        sp = parent.add_parser(name, parents=[client_opts], **kw)
        sp.set_defaults(func=func, needs_client=True)
        return sp

    s = sub.add_parser("serve", help="run the fleet service")
    s.add_argument("--config", help="YAML config (docs/fleet.md); without it: demo defaults")
    s.add_argument(
        "--data-dir", help="fleet.sqlite + bundles (default without config: ./fleet-data)"
    )
    s.add_argument("--host", help="HTTP bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="HTTP port (default 8480)")
    s.add_argument("--public-url", help="base URL devices reach the fleet at")
    s.add_argument(
        "--token-file", help="admin token file (default <data-dir>/admin.token, made once)"
    )
    s.add_argument(
        "--trust-key",
        action="append",
        default=[],
        metavar="PEM",
        help="public key uploads must be signed by (repeatable)",
    )
    s.add_argument(
        "--allow-unsigned", action="store_true", help="accept unsigned bundles (dev only)"
    )
    s.add_argument("--mqtt-port", type=int, help="embedded broker port (default 1883)")
    s.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    s.add_argument("--log-format", choices=logs.FORMATS, help="text or json lines on stderr")
    s.set_defaults(func=cmd_serve, needs_client=False)

    s = sub.add_parser("check-config", help="validate a fleet config file")
    s.add_argument("--config", required=True)
    s.set_defaults(func=cmd_check_config, needs_client=False)

    models = sub.add_parser("models", help="the model registry").add_subparsers(
        dest="sub", required=True
    )
    s = client(models, "push", cmd_models_push, help="upload a signed bundle")
    s.add_argument("file")
    client(models, "list", cmd_models_list, help="models, versions, labels")
    s = client(models, "show", cmd_models_show, help="one model's versions and metrics")
    s.add_argument("name")
    s = client(models, "label", cmd_models_label, help="point a label at a version")
    s.add_argument("name")
    s.add_argument("label")
    s.add_argument("version")
    s = client(models, "unlabel", cmd_models_unlabel, help="remove a label")
    s.add_argument("name")
    s.add_argument("label")
    s = client(
        models,
        "delete",
        cmd_models_delete,
        help="delete a version (or, without VERSION, the whole model); refused while in use",
    )
    s.add_argument("name")
    s.add_argument("version", nargs="?")

    devices = sub.add_parser("devices", help="devices and enrolment").add_subparsers(
        dest="sub", required=True
    )
    s = client(devices, "list", cmd_devices_list, help="all devices")
    s.add_argument("--group")
    s = client(devices, "show", cmd_devices_show, help="one device, its models and events")
    s.add_argument("id")
    s.add_argument("--events", type=int, default=10, help="recent events shown")
    s = client(devices, "enrol-token", cmd_devices_enrol_token, help="a one-time enrolment token")
    s.add_argument("--device-id")
    s.add_argument("--group", action="append", help="repeatable")
    s.add_argument("--ttl", type=float, help="seconds (default: the fleet's, 24 h)")
    s = client(devices, "groups", cmd_devices_groups, help="set a device's groups")
    s.add_argument("id")
    s.add_argument("groups", nargs="*")
    s = client(devices, "revoke", cmd_devices_revoke, help="revoke a device (admin)")
    s.add_argument("id")
    s = client(devices, "command", cmd_devices_command, help="send resync or rollback")
    s.add_argument("id")
    s.add_argument("command_name", choices=["resync", "rollback"])
    s.add_argument("--model", help="for rollback")

    s = client(sub, "assign", cmd_assign, help="assign a model version (optionally in waves)")
    s.add_argument("model")
    s.add_argument("version")
    target = s.add_mutually_exclusive_group(required=True)
    target.add_argument("--device")
    target.add_argument("--group")
    target.add_argument("--all", action="store_true")
    s.add_argument("--waves", help="staged rollout, e.g. 1,10%%,100%%")
    s.add_argument("--max-failure-share", type=float)
    s.add_argument(
        "--wave-timeout",
        type=float,
        metavar="S",
        help="seconds a wave waits for silent devices before it is judged on those that"
        " answered (staged rollouts; at most 7 days)",
    )
    s.add_argument("--plan", help="rollout plan YAML (docs/fleet.md, Rollout plans and gates)")
    s.add_argument(
        "--gate",
        action="append",
        help="gate on every serving wave, e.g. 'error_rate <= baseline + 0.01' (repeatable)",
    )
    s.add_argument("--on-fail", choices=["stop", "rollback"], help="default rollback")
    s.add_argument("--min-requests", type=int, help="canary requests per wave before deciding")
    s.add_argument("--promote", help="label moved to the version on success (default stable)")
    s.add_argument("--shadow-devices", help="shadow stage first: a count or a share like 10%%")
    s.add_argument("--shadow-gate", action="append", help="e.g. 'shadow_agreement >= 0.97'")
    s.add_argument("--shadow-min-items", type=int, help="compared items before deciding")
    s.add_argument("--shadow-min-duration", type=float, help="bake time, seconds")
    s.add_argument("--shadow-sample-rate", type=float, help="share of requests (default 1)")

    s = client(sub, "unassign", cmd_unassign, help="remove a model's assignment to a target")
    s.add_argument("model")
    target = s.add_mutually_exclusive_group(required=True)
    target.add_argument("--device")
    target.add_argument("--group")
    target.add_argument("--all", action="store_true")
    s = client(sub, "assignments", cmd_assignments, help="the assignments in force")
    s.add_argument("--model")

    rollout = sub.add_parser("rollout", help="staged rollouts").add_subparsers(
        dest="sub", required=True
    )
    s = client(rollout, "status", cmd_rollout_status, help="all rollouts, or one")
    s.add_argument("id", nargs="?")
    s.add_argument("--watch", action="store_true", help="refresh until finished")
    s.add_argument("--interval", type=float, default=2.0)
    for action in ("pause", "resume", "rollback", "advance"):
        s = client(rollout, action, _rollout_action(action), help=f"{action} a rollout")
        s.add_argument("id")

    telemetry = sub.add_parser("telemetry", help="inference statistics").add_subparsers(
        dest="sub", required=True
    )
    client(telemetry, "models", cmd_telemetry_models, help="per model and version")
    s = client(telemetry, "device", cmd_telemetry_device, help="per model on one device")
    s.add_argument("id")

    s = client(sub, "events", cmd_events, help="recent device events")
    s.add_argument("--device")
    s.add_argument("--model")
    s.add_argument("--limit", type=int, default=50)

    from edgefleet.fleet.cli_quality import add_parsers  # it imports this module

    add_parsers(sub, client)  # policy ..., hard-examples ... (issue 11)
    return p


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `yes | head`


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (module doc).

    A reader that goes away early (``edge-fleet ... --json | head``) ends the command
    quietly with ``EXIT_BROKEN_PIPE`` (141, as if SIGPIPE had ended it, like other
    Unix tools): the output was cut, so a script with ``set -o pipefail`` must not
    take it as complete. stdout is flushed here, inside the handler, so the error
    cannot surface later, at interpreter exit, as "Exception ignored ... BrokenPipeError".
    """
    try:
        code = _run(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python's own recipe (docs: signal, "Note on SIGPIPE"): point stdout at
        # devnull so the interpreter's final flush has nowhere to fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.needs_client:
            return int(args.func(args))
        client = Client(args.url, _token(args), args.timeout, args.ca_file)
        return int(args.func(args, client))
    except ConfigError as exc:
        print(f"edge-fleet: {exc}", file=sys.stderr)
        return 2
    except FleetRefused as exc:
        print(f"edge-fleet: {exc}", file=sys.stderr)
        return 1
    except Unreachable as exc:
        print(f"edge-fleet: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

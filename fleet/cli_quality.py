"""``edge-fleet policy ...`` and ``edge-fleet hard-examples ...`` (issue 11, parts 5-6).

Added to the parser by ``edgefleet.fleet.cli.build_parser``; every command talks to
the fleet's HTTP API with the same client, options and exit codes as the others
(docs/fleet.md, "Fallback policy from the fleet" and "Hard examples").

``hard-examples export`` writes a folder that ``edge-convert calibrate`` reads as is:

- ``eval.npz``: one array per model input (the tensors the edge model saw, stacked)
  and ``y``, the labels as class ids (``--eval``);
- ``cloud.npz``: ``y_pred``, the cloud's class per example (``--cloud-predictions``),
  written when every exported example has a cloud answer;
- ``images/<id>.<ext>``: the original image, when the device kept one;
- ``index.jsonl``: one line per example, in ``eval.npz`` row order: id, device, model,
  version, reason, label, label id, both answers, image file.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.core.errors import ConfigError
from edgefleet.fleet.cli import Client, FleetRefused, Unreachable, _emit, _q, target_str
from edgefleet.fleet.hard_example_export import ExportWriter


def _target(args: argparse.Namespace) -> dict[str, Any]:
    if args.device:
        return {"device": args.device}
    if args.group:
        return {"group": args.group}
    return {"all": True}


def _class_thresholds(items: list[str] | None) -> dict[str, float] | None:
    if not items:
        return None
    out: dict[str, float] = {}
    for item in items:
        label, sep, value = item.rpartition("=")
        try:
            if not sep or not label:
                raise ValueError
            out[label] = float(value)
        except ValueError:
            raise ConfigError(f"--class-threshold {item!r}: use LABEL=0.9") from None
    return out


def cmd_policy_set(args: argparse.Namespace, client: Client) -> int:
    settings: dict[str, Any] = {}
    for key in ("mode", "confidence_rule", "threshold", "audit_rate"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    thresholds = _class_thresholds(args.class_threshold)
    if thresholds is not None:
        settings["class_thresholds"] = thresholds
    for key in args.unset or []:
        settings[key.replace("-", "_")] = None
    if not settings:
        raise ConfigError("give at least one setting (--mode, --threshold, ...) or --unset")
    target = _target(args)
    doc = client.put(f"/v1/policies/{_q(args.model)}", {"target": target, "fallback": settings})

    def human(d: dict[str, Any]) -> None:
        print(
            f"fallback policy of {args.model} for {target_str(target)}:"
            f" {json.dumps(d.get('fallback'), sort_keys=True)}"
            f" ({d.get('devices_changed', 0)} device(s) pushed)"
        )

    return _emit(args, doc, human)


def cmd_policy_clear(args: argparse.Namespace, client: Client) -> int:
    target = _target(args)
    doc = client.post(f"/v1/policies/{_q(args.model)}/clear", {"target": target})

    def human(d: dict[str, Any]) -> None:
        print(
            f"fallback policy of {args.model} for {target_str(target)} cleared"
            f" ({d.get('devices_changed', 0)} device(s) pushed)"
        )

    return _emit(args, doc, human)


def cmd_policy_list(args: argparse.Namespace, client: Client) -> int:
    doc = client.get("/v1/policies", model=args.model)

    def human(d: dict[str, Any]) -> None:
        rows = d.get("policies") or []
        if not rows:
            print("no fallback policies")
        for r in rows:
            print(
                f"{r['model']:<24} {target_str(r['target']):<24}"
                f" {json.dumps(r['fallback'], sort_keys=True)}"
            )

    return _emit(args, doc, human)


def print_fallback(device: dict[str, Any]) -> None:
    """``devices show``: per model, the fallback policy in force on the device (from its
    ``reported``), each setting not from the bundle marked with its source."""
    reported = (device.get("reported") or {}).get("models") or {}
    lines = []
    for name, m in sorted(reported.items()):
        eff, src = m.get("fallback_effective"), m.get("fallback_source") or {}
        if not isinstance(eff, dict):
            continue

        def mark(key: str, src: dict[str, Any] = src) -> str:
            where = src.get(key)
            return f" ({where})" if where in ("fleet", "local") else ""

        mode = eff.get("mode")
        if eff.get("configured_mode") != mode:
            mode = f"{mode}, configured {eff.get('configured_mode')}: {eff.get('inactive')}"
        lines.append(
            f"  {name}: {mode}{mark('mode')}, {eff.get('confidence_rule')}{mark('confidence_rule')}"
            f" < {eff.get('threshold')}{mark('threshold')}, audit {eff.get('audit_rate')}"
            f"{mark('audit_rate')}"
            + (
                f", classes {eff.get('class_thresholds')}{mark('class_thresholds')}"
                if eff.get("class_thresholds")
                else ""
            )
        )
    if lines:
        print("\nfallback policy (source when not the bundle's):")
        print("\n".join(lines))


# ---- hard examples ------------------------------------------------------------------------


def get_bytes(client: Client, path: str) -> tuple[bytes, str]:
    """A binary GET (image, tensors): the body and its Content-Type."""
    conn = client._connection()
    headers = {"User-Agent": "edge-fleet"}
    if client.token:
        headers["Authorization"] = f"Bearer {client.token}"
    try:
        conn.request("GET", client._parts.path.rstrip("/") + path, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise Unreachable(f"cannot reach the fleet at {client.url}: {exc}") from exc
    finally:
        conn.close()
    if resp.status >= 400:
        try:
            message = json.loads(raw).get("error", raw[:200])
        except ValueError:
            message = raw[:200].decode("utf-8", "replace")
        raise FleetRefused(resp.status, str(message))
    return raw, resp.headers.get("Content-Type", "")


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "version": args.version,
        "reason": args.reason,
        "device": args.device,
        "labelled": None if args.labelled is None else str(args.labelled).lower(),
        "limit": args.limit,
    }


def cmd_hard_examples_list(args: argparse.Namespace, client: Client) -> int:
    doc = client.get("/v1/hard-examples", **_filters(args))

    def human(d: dict[str, Any]) -> None:
        rows = d.get("hard_examples") or []
        if not rows:
            print("no hard examples")
        for r in rows:
            print(
                f"{r['id'][:16]}  {r['device_id']:<16} {r['model']}:{r['version']:<8}"
                f" {r['reason']:<10} edge {r.get('edge_class')}"
                f" ({r.get('edge_confidence') or 0:.2f})"
                f" cloud {r.get('cloud_class')}  label {r.get('label') or '-'}"
                f"{'  [image]' if r.get('has_image') else ''}"
            )

    return _emit(args, doc, human)


def _resolve_id(client: Client, given: str) -> str:
    if len(given) == 64:
        return given
    doc = client.get("/v1/hard-examples", prefix=given, limit=2)
    rows = doc.get("hard_examples") or []
    if len(rows) != 1:
        raise ConfigError(f"{given!r} names {len(rows) or 'no'} hard examples: give more of it")
    return str(rows[0]["id"])


def cmd_hard_examples_show(args: argparse.Namespace, client: Client) -> int:
    hid = _resolve_id(client, args.id)
    doc = client.get(f"/v1/hard-examples/{hid}")
    if args.image:
        raw, _ = get_bytes(client, f"/v1/hard-examples/{hid}/image")
        Path(args.image).write_bytes(raw)

    def human(d: dict[str, Any]) -> None:
        for key in ("id", "device_id", "model", "version", "reason", "status", "label"):
            print(f"{key + ':':<18}{d.get(key)}")
        print(f"{'edge answer:':<18}{d.get('edge_label')} ({d.get('edge_confidence')})")
        print(f"{'cloud answer:':<18}{d.get('cloud_label')} ({d.get('cloud_confidence')})")
        if args.image:
            print(f"{'image:':<18}written to {args.image}")

    return _emit(args, doc, human)


def cmd_hard_examples_label(args: argparse.Namespace, client: Client) -> int:
    hid = _resolve_id(client, args.id)
    label = None if args.clear else args.label
    if label is None and not args.clear:
        raise ConfigError("give a label, or --clear")
    doc = client.put(f"/v1/hard-examples/{hid}/label", {"label": label})
    return _emit(args, doc, lambda d: print(f"{hid[:16]}: label {d.get('label') or 'cleared'}"))


def cmd_hard_examples_delete(args: argparse.Namespace, client: Client) -> int:
    hid = _resolve_id(client, args.id)
    doc = client.request("DELETE", f"/v1/hard-examples/{hid}")[1]
    return _emit(args, doc, lambda d: print(f"{hid[:16]}: deleted ({d.get('bytes')} bytes freed)"))


def export_dataset(client: Client, out: Path, filters: dict[str, Any]) -> dict[str, Any]:
    """Write the labelled examples matching ``filters`` as a calibrate-ready folder
    (module doc); returns a summary. Examples of several versions of one model share
    its inputs; several models in one export are refused (their inputs differ)."""
    rows = client.get("/v1/hard-examples", **{**filters, "labelled": "true"}).get("hard_examples")
    if not rows:
        raise ConfigError("no labelled hard examples match")
    models = {r["model"] for r in rows}
    if len(models) > 1:
        raise ConfigError(f"examples of several models {sorted(models)}: pick one with --model")
    (out / "images").mkdir(parents=True, exist_ok=True)

    def write(name: str, data: bytes) -> None:
        (out / name).write_bytes(data)

    export = ExportWriter(write)
    for r in rows:
        hid = str(r["id"])
        doc = client.get(f"/v1/hard-examples/{hid}")
        raw, _ = get_bytes(client, f"/v1/hard-examples/{hid}/tensors")
        buf = io.BytesIO(raw)
        with np.load(buf, allow_pickle=False) as npz:  # never unpickle fleet data
            inputs = {
                name.removeprefix("input."): npz[name]
                for name in npz.files
                if name.startswith("input.")
            }
        image, ctype = None, None
        if doc.get("has_image"):
            image, ctype = get_bytes(client, f"/v1/hard-examples/{hid}/image")
        export.add(doc, inputs, image, ctype)
    export.finish()
    return {
        "examples": len(rows),
        "model": models.pop(),
        "out": str(out),
        "eval": str(out / "eval.npz"),
        "cloud_predictions": str(out / "cloud.npz") if export.with_cloud else None,
        "images": export.images,
    }


def cmd_hard_examples_export(args: argparse.Namespace, client: Client) -> int:
    filters = _filters(args)
    filters["limit"] = args.limit
    summary = export_dataset(client, Path(args.out), filters)

    def human(d: dict[str, Any]) -> None:
        print(f"exported {d['examples']} labelled example(s) of {d['model']} to {d['out']}")
        cloud = f" --cloud-predictions {d['cloud_predictions']}" if d["cloud_predictions"] else ""
        print(f"  edge-convert calibrate BUNDLE --eval {d['eval']}{cloud}")

    return _emit(args, summary, human)


# ---- the parsers ---------------------------------------------------------------------------


def add_parsers(sub: Any, client: Callable[..., Any]) -> None:
    """``policy`` and ``hard-examples`` into ``edge-fleet``'s subcommands (``client``:
    build_parser's helper that adds the client options)."""
    policy = sub.add_parser("policy", help="fallback policies pushed to devices").add_subparsers(
        dest="sub", required=True
    )
    s = client(policy, "set", cmd_policy_set, help="set fallback settings for a model")
    s.add_argument("model")
    _target_args(s)
    s.add_argument("--mode", choices=["edge_only", "cloud_when_unsure", "edge_first_escalate"])
    s.add_argument("--threshold", type=float, help="0..1: items below it are unsure")
    s.add_argument(
        "--rule",
        dest="confidence_rule",
        choices=["top1", "margin", "entropy", "mean_box", "min_box"],
    )
    s.add_argument("--audit-rate", type=float, help="0..1: share of confident items audited")
    s.add_argument("--class-threshold", action="append", metavar="LABEL=T", help="repeatable")
    s.add_argument(
        "--unset",
        action="append",
        choices=["mode", "threshold", "confidence-rule", "audit-rate", "class-thresholds"],
        help="remove one setting from this target's policy (repeatable)",
    )
    s = client(policy, "clear", cmd_policy_clear, help="remove a target's policy")
    s.add_argument("model")
    _target_args(s)
    s = client(policy, "list", cmd_policy_list, help="every policy")
    s.add_argument("--model")

    he = sub.add_parser("hard-examples", help="the labelling queue").add_subparsers(
        dest="sub", required=True
    )
    for name, func, what in (
        ("list", cmd_hard_examples_list, "uploaded hard examples, newest first"),
        ("export", cmd_hard_examples_export, "labelled examples as a calibrate-ready folder"),
    ):
        s = client(he, name, func, help=what)
        s.add_argument("--model")
        s.add_argument("--version")
        s.add_argument("--reason", help="unsure, escalated, audit, ...")
        s.add_argument("--device")
        s.add_argument("--limit", type=int, default=100 if name == "list" else 100_000)
        if name == "list":
            labelled = s.add_mutually_exclusive_group()
            labelled.add_argument("--labelled", action="store_true", default=None)
            labelled.add_argument("--unlabelled", dest="labelled", action="store_false")
        else:
            s.set_defaults(labelled=True)
            s.add_argument("--out", required=True, help="the folder to write")
    s = client(he, "show", cmd_hard_examples_show, help="one example and both answers")
    s.add_argument("id", help="the id or a unique prefix of it")
    s.add_argument("--image", metavar="FILE", help="write the image here")
    s = client(he, "label", cmd_hard_examples_label, help="set (or clear) the label")
    s.add_argument("id")
    s.add_argument("label", nargs="?")
    s.add_argument("--clear", action="store_true")
    s = client(he, "delete", cmd_hard_examples_delete, help="remove one (frees fleet storage)")
    s.add_argument("id")


def _target_args(s: argparse.ArgumentParser) -> None:
    target = s.add_mutually_exclusive_group(required=True)
    target.add_argument("--device")
    target.add_argument("--group")
    target.add_argument("--all", action="store_true")

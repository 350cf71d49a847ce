"""``edge-convert calibrate``: choose a model's cloud-fallback threshold from data.

Given an edge bundle, a labelled validation set and the cloud model's answers on
it (the cloud bundle run here, its predictions from a file, or a live OIP
endpoint), compute for every useful threshold *t*: the share of items the edge
would send to the cloud (confidence < *t*, with the bundle's confidence rule,
computed by the agent's own code) and the joint accuracy (the cloud's answer for
those, the edge's for the rest). Then pick the threshold for a target — at most a
share of calls to the cloud, or at least an accuracy — and write it into a new,
signed bundle version's ``fallback.threshold``, with the figures in its metrics.

Candidate thresholds sit midway between consecutive distinct confidences seen in
the validation set, not on them, so a new item a hair away from a validation item
is routed the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.converters.evaluate import EvalSet, EvaluationError, load_npz, open_model, predict
from edgefleet.core.bundle.archive import DEFAULT_MAX_MEMBER_BYTES, read_bundle, write_bundle
from edgefleet.core.bundle.manifest import MANIFEST_NAME, ClassificationPost, Manifest
from edgefleet.core.bundle.signing import TrustStore
from edgefleet.core.errors import EdgefleetError
from edgefleet.core.processing import classification

log = logging.getLogger(__name__)

# Rows shown in the summary table: the curve at these cloud shares.
SUMMARY_SHARES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


class CalibrationError(EdgefleetError):
    """The inputs cannot be calibrated (wrong task, mismatched sizes, no target met)."""


@dataclass(frozen=True)
class Point:
    """One threshold: items with confidence below it go to the cloud."""

    threshold: float
    cloud_share: float
    joint_accuracy: float
    cloud_items: int


@dataclass(frozen=True)
class Calibration:
    model: str
    version: str
    rule: str
    samples: int
    edge_accuracy: float
    cloud_accuracy: float
    curve: list[Point]
    current: Point  # at the bundle's present threshold

    def at(self, threshold: float) -> Point:
        return point_at(self.curve, threshold)


# ---- the curve -------------------------------------------------------------------------------


def confidences(probs: np.ndarray, rule: str) -> np.ndarray:
    """The agent's own confidence for each row (``edgefleet.core.processing``: the same
    code the agent scores its answers with)."""
    return classification.confidences(probs, rule)


def curve(
    confidence: np.ndarray, edge_pred: np.ndarray, cloud_pred: np.ndarray, labels: np.ndarray
) -> list[Point]:
    """Share sent and joint accuracy for every threshold that changes the routing."""
    n = labels.shape[0]
    if not (confidence.shape[0] == edge_pred.shape[0] == cloud_pred.shape[0] == n) or n == 0:
        raise CalibrationError("confidences, predictions and labels must have one row per item")
    order = np.argsort(confidence, kind="stable")
    conf = confidence[order]
    edge_ok = (edge_pred == labels)[order].astype(np.int64)
    cloud_ok = (cloud_pred == labels)[order].astype(np.int64)
    # Sending the k least confident items: their cloud answers plus the rest's edge answers.
    gain = np.concatenate([[0], np.cumsum(cloud_ok - edge_ok)])
    base = int(edge_ok.sum())
    distinct = np.flatnonzero(np.diff(conf) > 0)  # k = i + 1 items lie below a cut after i
    cuts: list[tuple[float, int]] = [(0.0, 0)]
    cuts += [((conf[i] + conf[i + 1]) / 2.0, int(i) + 1) for i in distinct]
    if conf[-1] < 1.0:
        cuts.append((float(min(1.0, np.nextafter(conf[-1], np.inf))), n))
    # Thresholds stay unrounded: rounding could move one onto a validation item.
    return [Point(float(t), k / n, (base + int(gain[k])) / n, k) for t, k in cuts]


def point_at(points: Sequence[Point], threshold: float) -> Point:
    """The routing a given threshold produces (the last cut at or below it)."""
    best = points[0]
    for p in points:
        if p.threshold <= threshold:
            best = p
    return best


def choose(
    points: Sequence[Point],
    *,
    max_share: float | None = None,
    min_accuracy: float | None = None,
) -> Point:
    """For a share budget: the most accurate point within it, using as much of the
    budget as that accuracy allows (margin for unseen data). For an accuracy target:
    the cheapest point reaching it."""
    if (max_share is None) == (min_accuracy is None):
        raise CalibrationError("give exactly one target: a cloud share or an accuracy")
    if max_share is not None:
        within = [p for p in points if p.cloud_share <= max_share + 1e-12]
        best = max(p.joint_accuracy for p in within)
        return max((p for p in within if p.joint_accuracy == best), key=lambda p: p.threshold)
    assert min_accuracy is not None
    reaching = [p for p in points if p.joint_accuracy >= min_accuracy - 1e-12]
    if not reaching:
        top = max(p.joint_accuracy for p in points)
        raise CalibrationError(
            f"no threshold reaches accuracy {min_accuracy:.4f}; the best is {top:.4f}"
        )
    return min(reaching, key=lambda p: (p.cloud_share, p.threshold))


def summary(cal: Calibration, chosen: Point | None = None) -> list[Point]:
    """A readable handful of rows: the curve at round shares, plus the marked ones."""
    rows = {point_at_share(cal.curve, s) for s in SUMMARY_SHARES}
    rows.add(cal.current)
    if chosen is not None:
        rows.add(chosen)
    return sorted(rows, key=lambda p: p.threshold)


def point_at_share(points: Sequence[Point], share: float) -> Point:
    within = [p for p in points if p.cloud_share <= share + 1e-12]
    return within[-1] if within else points[0]


def format_table(cal: Calibration, rows: Sequence[Point], chosen: Point | None) -> str:
    lines = [
        f"{cal.model}:{cal.version}, {cal.samples} validation items, confidence rule {cal.rule}:"
        f" edge alone {cal.edge_accuracy:.4f}, cloud alone {cal.cloud_accuracy:.4f}",
        "",
        f"  {'threshold':>9}  {'to cloud':>8}  {'joint accuracy':>14}",
    ]
    for p in rows:
        marks = []
        if p == cal.current:
            marks.append("bundle now")
        if chosen is not None and p == chosen:
            marks.append("chosen")
        lines.append(
            f"  {p.threshold:>9.4f}  {p.cloud_share:>7.1%}  {p.joint_accuracy:>14.4f}"
            + (f"   <- {', '.join(marks)}" if marks else "")
        )
    return "\n".join(lines)


# ---- running the models ----------------------------------------------------------------------


@dataclass(frozen=True)
class OpenedBundle:
    manifest: Manifest
    directory: Path


def open_bundle(bundle: Path, trust: TrustStore, into: Path) -> OpenedBundle:
    """Verify and extract ``bundle`` as an agent would."""
    contents = read_bundle(bundle, into, trust, DEFAULT_MAX_MEMBER_BYTES)
    return OpenedBundle(contents.manifest, contents.directory)


def class_probabilities(opened: OpenedBundle, data: EvalSet) -> np.ndarray:
    """(N, classes) probabilities of a classifier bundle on ``data``, via the agent's backend."""
    m = opened.manifest
    post = m.postprocessing
    if not isinstance(post, ClassificationPost):
        raise CalibrationError(
            f"{m.name} is a {m.task} model; calibration needs a classifier's scores"
        )
    fields = m.model_dump(exclude={"files", "self_test", "metrics"})
    with open_model(opened.directory / m.model_file, fields) as backend:
        scores = predict(backend, data, post.output)
    return classification.probabilities({post.output: scores}, post)


def predictions_from_file(path: Path, n: int) -> np.ndarray:
    """Class ids from an .npz: ``y_pred``/``pred`` (ids) or ``probabilities``/``scores``."""
    arrays = load_npz(path)
    for key in ("y_pred", "pred", "predictions", "probabilities", "scores"):
        if key in arrays:
            value = np.asarray(arrays[key])
            break
    else:
        raise CalibrationError(
            f"{path.name} holds {sorted(arrays)}; expected y_pred (class ids) or probabilities"
        )
    pred = value.argmax(axis=-1) if value.ndim == 2 else value.reshape(-1)
    if pred.shape[0] != n:
        raise CalibrationError(f"{path.name} has {pred.shape[0]} predictions for {n} items")
    return pred.astype(np.int64)


def predictions_from_endpoint(
    url: str,
    model: str,
    data: EvalSet,
    output: str,
    *,
    token: str | None = None,
    ca_file: Path | None = None,
    batch: int = 64,
    timeout_s: float = 30.0,
) -> np.ndarray:
    """Class ids from a live OIP endpoint (the agent's own client, batches of ``batch``)."""
    from edgefleet.core.oip_client import CloudError, OipClient

    async def run() -> np.ndarray:
        client = OipClient(url, token=token, ca_file=ca_file)
        try:
            parts = []
            for start in range(0, len(data), batch):
                chunk = data.take(slice(start, start + batch))
                answer = await client.infer(model, chunk, [output], timeout_s=timeout_s)
                parts.append(answer.outputs[output])
            return np.concatenate(parts)
        except CloudError as exc:
            raise CalibrationError(f"cloud endpoint {url}: {exc.message}") from exc
        finally:
            await client.close()

    scores = asyncio.run(run())
    return scores.argmax(axis=-1) if scores.ndim == 2 else scores.reshape(-1).astype(np.int64)


def calibrate(
    edge: OpenedBundle,
    data: EvalSet,
    cloud_pred: np.ndarray,
    rule: str | None = None,
) -> Calibration:
    probs = class_probabilities(edge, data)
    m = edge.manifest
    rule = rule or m.confidence.rule
    if rule not in classification.RULES:
        raise CalibrationError(f"confidence rule {rule} is not a classifier's")
    conf = confidences(probs, rule)
    edge_pred = probs.argmax(axis=1)
    points = curve(conf, edge_pred, cloud_pred, data.labels)
    return Calibration(
        model=m.name,
        version=m.version,
        rule=rule,
        samples=len(data),
        edge_accuracy=float(np.mean(edge_pred == data.labels)),
        cloud_accuracy=float(np.mean(cloud_pred == data.labels)),
        curve=points,
        current=_with_threshold(point_at(points, m.fallback.threshold), m.fallback.threshold),
    )


def _with_threshold(p: Point, threshold: float) -> Point:
    return Point(threshold, p.cloud_share, p.joint_accuracy, p.cloud_items)


# ---- writing the new bundle ------------------------------------------------------------------


def next_version(version: str) -> str:
    return str(int(version) + 1) if version.isdigit() else f"{version}-calibrated"


def write_calibrated(
    edge: OpenedBundle,
    out: Path,
    cal: Calibration,
    chosen: Point,
    target: str,
    private_key: Ed25519PrivateKey,
    version: str | None = None,
    cloud_model: str | None = None,
) -> Manifest:
    """A new signed version of the edge bundle with ``chosen.threshold`` as its default."""
    doc: dict[str, Any] = json.loads((edge.directory / MANIFEST_NAME).read_bytes())
    files = {name: edge.directory / name for name in doc.pop("files")}
    doc["version"] = version or next_version(edge.manifest.version)
    doc["fallback"] = {**doc.get("fallback", {}), "threshold": chosen.threshold}
    if cloud_model:
        doc["fallback"]["cloud_model"] = cloud_model
    doc["confidence"] = {"rule": cal.rule}
    doc["metrics"] = {
        **doc.get("metrics", {}),
        "calibration_target": target,
        "calibration_samples": cal.samples,
        "calibration_threshold": chosen.threshold,
        "calibration_cloud_share": round(chosen.cloud_share, 4),
        "calibration_joint_accuracy": round(chosen.joint_accuracy, 4),
        "calibration_edge_accuracy": round(cal.edge_accuracy, 4),
        "calibration_cloud_accuracy": round(cal.cloud_accuracy, 4),
        "calibrated_from_version": edge.manifest.version,
    }
    doc["created_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    doc["created_by"] = f"{doc.get('created_by') or 'edge-convert'}; calibrate"
    return write_bundle(out, doc, files, private_key)


def trust_for(pubkeys: Sequence[Path], private_key: Ed25519PrivateKey | None) -> TrustStore:
    """The given public keys, plus the signing key's own (re-signing what we signed)."""
    pems: list[bytes | str] = [p.read_bytes() for p in pubkeys]
    if private_key is not None:
        pems.append(
            private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    if not pems:
        raise CalibrationError("give --pubkey (or --key) to verify the bundles")
    return TrustStore.from_pem(pems)


def report_json(cal: Calibration, chosen: Point | None) -> dict[str, Any]:
    return {
        **{k: v for k, v in asdict(cal).items() if k != "curve"},
        "chosen": asdict(chosen) if chosen else None,
        "curve": [asdict(p) for p in cal.curve],
    }


def load_eval(path: Path, manifest: Manifest) -> EvalSet:
    from edgefleet.converters.evaluate import load_eval_set

    try:
        return load_eval_set(path, [t.model_dump() for t in manifest.inputs])
    except EvaluationError as exc:
        raise CalibrationError(str(exc)) from exc


def tempdir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="calibrate-")

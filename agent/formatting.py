"""Human-readable lines for the agent's answers (``edge-agent predict`` and the demo)."""

from __future__ import annotations

from typing import Any


def format_prediction(answer: dict[str, Any]) -> str:
    """One line for an image answer: model, who answered, time, labels or boxes."""
    head = (
        f"{answer['model']}:{answer['version']} ({_provenance(answer)}, "
        f"{answer['latency_ms']:.1f} ms{_edge_said(answer)})"
    )
    if "predictions" in answer:
        preds = ", ".join(f"{p['label']} {p['confidence']:.3f}" for p in answer["predictions"][:3])
        return f"{head}: {preds}"
    dets = answer.get("detections", [])
    boxes = "; ".join(
        f"{d['label']} {d['confidence']:.2f} at [{', '.join(f'{v:.0f}' for v in d['box'])}]"
        for d in dets
    )
    return f"{head}: {len(dets)} detection(s) {boxes}"


def _provenance(answer: dict[str, Any]) -> str:
    """``edge``, ``cloud digits-cloud:1``, ``edge, fallback offline``, ``edge, escalated``."""
    source = answer["source"]
    cloud = answer.get("cloud") or {}
    if source == "cloud" and cloud:
        return f"cloud {cloud.get('model')}:{cloud.get('version')}"
    if answer.get("fallback"):
        return f"{source}, fallback {answer['fallback']}"
    if answer.get("escalated"):
        return f"{source}, escalated"
    return str(source)


def _edge_said(answer: dict[str, Any]) -> str:
    edge = answer.get("edge") or {}
    if answer["source"] != "cloud" or "label" not in edge:
        return ""
    return f"; edge said {edge['label']} {edge.get('confidence', 0):.3f}"

"""Where an answer came from: the edge model, the cloud, or both (protocol-neutral).

The data plane (``agent/dataplane.py``) starts one per request with the edge model's
part; the cloud router (``agent/cloud/router.py``) adds the cloud's when the policy
involves it. Each protocol adapter writes it in its own form (OIP ``parameters`` in
``agent/server/oip.py``, nested JSON in ``agent/server/image.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Provenance:
    """``source``: edge, cloud, or mixed (a batch of both).

    Per-item lists are in batch order; the confidences are by the fallback policy's
    rule, and are only set when the policy judged the items (a cloud is configured
    and the model's policy involves it).
    """

    source: str
    edge_model: str
    edge_version: str
    edge_ms: float
    fallback: str | None = None  # why the cloud did not answer items it should have
    fallback_detail: str | None = None
    edge_confidence: list[float] | None = None
    edge_class: list[int] | None = None
    cloud_model: str | None = None
    cloud_version: str | None = None
    cloud_ms: float | None = None  # time spent on the cloud call, answered or not
    cloud_items: list[int] = field(default_factory=list)  # batch rows the cloud answered
    cloud_confidence: list[float] | None = None  # per cloud item, in cloud_items order
    cloud_class: list[int] | None = None
    escalated: bool = False  # unsure items sent to the cloud in the background
    audited: bool = False  # confident items sent to the cloud for an audit

"""scikit-learn estimators to ONNX (skl2onnx), with plain tensor outputs.

Classifiers get ``zipmap`` disabled: skl2onnx would otherwise return the class
probabilities as a sequence of maps, which neither the Open Inference Protocol nor
ONNX Runtime's quantizer can handle.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgefleet.core.errors import EdgefleetError

log = logging.getLogger(__name__)

# Opset 17 runs on every ONNX Runtime since 1.13, which is older than any box we support.
DEFAULT_OPSET = 17


class SklearnConversionError(EdgefleetError):
    pass


def load_joblib(path: Path) -> Any:
    """Load a pickled estimator.

    A joblib file is a pickle: loading one runs whatever code it was made to run.
    Only load files from a source you trust (your own training job).
    """
    import joblib

    log.info("loading %s (a pickle: trusted sources only)", path)
    return joblib.load(path)


def rename_tensor(model: Any, old: str, new: str) -> None:
    """Rename a graph input/output (and every reference to it) in an ONNX ModelProto."""
    graph = model.graph
    names = {v.name for v in [*graph.input, *graph.output]}
    if old not in names:
        raise SklearnConversionError(f"model has no input or output {old!r} (has {sorted(names)})")
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]


def sklearn_to_onnx(
    estimator: Any,
    n_features: int,
    out: Path,
    *,
    input_name: str = "input",
    rename_outputs: Mapping[str, str] | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Convert a fitted estimator taking ``n_features`` floats into ``out``.

    Classifiers produce ``label`` (INT64, [N]) and ``probabilities`` (FP32, [N, classes])
    unless renamed with ``rename_outputs`` ({old: new}).
    """
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier

    # A global option reaches the classifier at the end of a Pipeline too.
    options: dict[str, Any] = {"zipmap": False} if is_classifier(estimator) else {}
    log.info("converting %s (%d features) to ONNX", type(estimator).__name__, n_features)
    try:
        with warnings.catch_warnings():
            # skl2onnx reads SVC.probA_/probB_, which sklearn 1.9 flags as deprecated
            # even when the SVC sits inside CalibratedClassifierCV: noise, not news.
            warnings.filterwarnings(
                "ignore", message=r"Attribute `prob[AB]_` was deprecated", category=FutureWarning
            )
            model = convert_sklearn(
                estimator,
                # skl2onnx otherwise names the graph with a random uuid: the same
                # estimator must give the same bytes (and sha256) on every build.
                name=type(estimator).__name__,
                initial_types=[(input_name, FloatTensorType([None, n_features]))],
                options=options,
                target_opset={"": opset, "ai.onnx.ml": 3},
            )
    except Exception as exc:
        raise SklearnConversionError(
            f"skl2onnx cannot convert {type(estimator).__name__}: {exc}"
        ) from exc
    for old, new in (rename_outputs or {}).items():
        rename_tensor(model, old, new)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.SerializeToString())
    log.info(
        "wrote %s (%d bytes): outputs %s",
        out,
        out.stat().st_size,
        [o.name for o in model.graph.output],
    )
    return out

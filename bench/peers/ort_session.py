"""The one ONNX Runtime session every peer server wraps, set up like the agent's.

The benchmark compares serving layers, not ONNX Runtime tunings, so the peers get
the agent's session options (threads, spin-waiting, graph optimisation). They come
from the environment because MLServer's workers and uvicorn import these modules
themselves, in the peers venv, not through our code.
"""

from __future__ import annotations

import json
import os

import onnxruntime as ort

# Set by bench/serving.py: {"intra_op_threads": int, "inter_op_threads": int,
# "allow_spinning": bool}, i.e. the agent's runtime.onnx section.
OPTIONS_ENV = "EDGEFLEET_BENCH_ORT"


def open_session(path: str) -> ort.InferenceSession:
    cfg = json.loads(os.environ.get(OPTIONS_ENV, "{}"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(cfg.get("intra_op_threads", 0))
    opts.inter_op_num_threads = int(cfg.get("inter_op_threads", 1))
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    spin = "1" if cfg.get("allow_spinning", False) else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])

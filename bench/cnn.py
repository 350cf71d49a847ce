"""Bench models built with ``onnx.helper``: a tiny overhead-bound model and a
MobileNet-size CNN (fp32 and static QDQ u8s8 int8).

Random weights are fine for speed: the operators, shapes and parameter count decide
how long a run takes, not the values. The weights are He-initialised so activations
neither vanish nor explode through 28 layers; otherwise the int8 calibration ranges
(and so the int8 model's speed and agreement) would describe a degenerate network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

TINY_FEATURES, TINY_CLASSES = 4, 3
CNN_SHAPE = (3, 224, 224)  # one image, NCHW
CNN_CLASSES = 1000
# MobileNetV1 (width 1.0): (pointwise output channels, depthwise stride) per block.
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)
OPSET = 17


@dataclass(frozen=True)
class CnnInfo:
    path: Path
    parameters: int
    macs: int  # multiply-accumulates for one 224x224 image


def write_tiny_onnx(path: Path, seed: int = 0) -> Path:
    """softmax(x @ W + b): 4 features -> 3 classes, dynamic batch (like tests/conftest.py).

    Its compute is a few hundred nanoseconds, so a round trip measures the server.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(size=(TINY_FEATURES, TINY_CLASSES)).astype(np.float32)
    b = rng.normal(size=(TINY_CLASSES,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["z0"]),
            helper.make_node("Add", ["z0", "B"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=1),
        ],
        "bench_tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TINY_FEATURES])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", TINY_CLASSES])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def write_mobilenet_onnx(path: Path, seed: int = 0) -> CnnInfo:
    """A MobileNetV1-shaped CNN: image FP32 [N,3,224,224] -> logits FP32 [N,1000].

    conv 3x3/2 -> 13 x (depthwise 3x3 + ReLU, pointwise 1x1 + ReLU) -> global
    average pool -> Gemm. 4.2 M parameters, ~0.57 G multiply-accumulates per image:
    the size of the CNNs store PCs actually run (MobileNetV1/V2, EfficientNet-lite0).
    BatchNorm is left out because converters fold it into the convolutions anyway.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    params = 0
    macs = 0
    side = CNN_SHAPE[1]

    def conv(
        x: str, cin: int, cout: int, k: int, stride: int, group: int, name: str
    ) -> tuple[str, int]:
        nonlocal params, macs
        fan_in = (cin // group) * k * k
        # He-normal: keeps the ReLU activations' scale roughly constant layer to layer.
        w = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(cout, cin // group, k, k))
        b = rng.normal(0.0, 0.01, size=(cout,))
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}_w"))
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"{name}_b"))
        params += w.size + b.size
        out_side = (side + stride - 1) // stride
        macs += w.size * out_side * out_side
        pad = k // 2
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}_w", f"{name}_b"],
                [f"{name}_c"],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
                group=group,
            )
        )
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"]))
        return f"{name}_r", out_side

    x, side = conv("image", CNN_SHAPE[0], 32, 3, 2, 1, "stem")
    channels = 32
    for i, (cout, stride) in enumerate(MOBILENET_V1_BLOCKS):
        x, side = conv(x, channels, channels, 3, stride, channels, f"b{i}_dw")
        x, side = conv(x, channels, cout, 1, 1, 1, f"b{i}_pw")
        channels = cout
    fc_w = rng.normal(0.0, np.sqrt(1.0 / channels), size=(channels, CNN_CLASSES))
    fc_b = np.zeros(CNN_CLASSES)
    inits.append(numpy_helper.from_array(fc_w.astype(np.float32), "fc_w"))
    inits.append(numpy_helper.from_array(fc_b.astype(np.float32), "fc_b"))
    params += fc_w.size + fc_b.size
    macs += fc_w.size
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bench_mobilenet_v1",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", *CNN_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CNN_CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return CnnInfo(path, int(params), int(macs))


def random_images(n: int, seed: int) -> np.ndarray:
    """Images in [0, 1), NCHW FP32: what a normalised camera frame's range looks like."""
    return np.random.default_rng(seed).random((n, *CNN_SHAPE), dtype=np.float32)


def quantize_cnn(fp32: Path, out: Path, calibration_images: int = 32, seed: int = 7) -> Path:
    """Static QDQ u8s8 (the converters' default, the fastest int8 on VNNI CPUs).

    Calibrated on random images: with random weights there is no real data to prefer.
    """
    from edgefleet.converters.quantize import quantize_model

    quantize_model(
        fp32, out, calibration={"image": random_images(calibration_images, seed)}, fmt="qdq"
    )
    return out

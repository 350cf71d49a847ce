"""The bundle manifest: what a model is, how to feed it and how to read its answer.

The manifest is the only signed member of a bundle; every other file is bound to it
by the sha256 it lists, so one signature covers the whole bundle.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgefleet.core.names import check_model_name, check_version
from edgefleet.core.names import check_name as check_name  # re-exported for older imports

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
SCHEMA_VERSION: Final = 1
# The reference profile of the eval data (core/drift.py), when the converter made one:
# a member listed in ``files`` like any other, so the signature covers it through its
# sha256, and no manifest field an older agent would refuse (docs/bundle-format.md).
PROFILE_NAME: Final = "profile.json"

# Open Inference Protocol datatype names and the numpy dtypes they travel as.
OIP_TO_NUMPY: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
NUMPY_TO_OIP = {v: k for k, v in OIP_TO_NUMPY.items()}
Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    name: str
    datatype: Datatype
    shape: list[int] = Field(description="-1 marks a dynamic dimension")

    def matches(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )


class QuantParams(_Strict):
    scale: float
    zero_point: int


class ImagePreprocessing(_Strict):
    """How the image endpoint turns decoded pixels into the model's input tensor."""

    type: Literal["image"] = "image"
    input: str = Field(description="name of the model input the image feeds")
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    color: Literal["RGB", "BGR", "GRAY"] = "RGB"
    layout: Literal["NHWC", "NCHW", "NC"] = Field(
        "NHWC", description="NC flattens the (height, width, channels) image into one vector"
    )
    resize: Literal["stretch", "letterbox"] = "stretch"
    interpolation: Literal["area", "linear", "nearest"] = "linear"
    invert: bool = Field(False, description="255 - pixel first: dark ink on light paper")
    scale: float = Field(1.0 / 255.0, description="multiplies pixel values (0..255)")
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    input_quantization: QuantParams | None = Field(
        None, description="informational: the backend quantizes float input itself"
    )


class ClassificationPost(_Strict):
    type: Literal["classification"] = "classification"
    output: str = Field(description="output tensor holding scores per class")
    apply_softmax: bool = Field(False, description="scores are logits")
    top_k: int = Field(5, ge=1)


class SsdAnchors(_Strict):
    """MediaPipe SsdAnchorsCalculator options (BlazeFace uses these)."""

    num_layers: int
    min_scale: float
    max_scale: float
    input_size_width: int
    input_size_height: int
    anchor_offset_x: float = 0.5
    anchor_offset_y: float = 0.5
    strides: list[int]
    aspect_ratios: list[float]
    fixed_anchor_size: bool = True
    interpolated_scale_aspect_ratio: float = 1.0
    reduce_boxes_in_lowest_layer: bool = False


class DetectionPost(_Strict):
    """Decoding of an SSD-style detector with anchors (MediaPipe TfLiteTensorsToDetections)."""

    type: Literal["ssd_anchors"] = "ssd_anchors"
    boxes_output: str
    scores_output: str
    anchors: SsdAnchors
    num_coords: int = 16
    box_coord_offset: int = 0
    # MediaPipe's reverse_output_order: true gives xywh (BlazeFace); TF SSD models give yxhw.
    box_format: Literal["xywh", "yxhw"] = "xywh"
    keypoint_coord_offset: int = Field(4, ge=0, description="from box_coord_offset")
    apply_exponential_on_box_size: bool = False
    num_keypoints: int = 6
    x_scale: float
    y_scale: float
    w_scale: float
    h_scale: float
    sigmoid_score: bool = True
    score_clipping_thresh: float = 100.0
    min_score: float = 0.5
    iou_threshold: float = 0.3
    max_detections: int = 100
    weighted_nms: bool = True


class RawPost(_Strict):
    """No interpretation: the OIP endpoint returns tensors, the image endpoint refuses."""

    type: Literal["raw"] = "raw"


Postprocessing = Annotated[
    ClassificationPost | DetectionPost | RawPost, Field(discriminator="type")
]


class ConfidenceRule(_Strict):
    """How one number in [0, 1] is drawn from an answer, for the cloud fallback."""

    rule: Literal["top1", "margin", "entropy", "mean_box", "min_box"] = "top1"


class FallbackDefaults(_Strict):
    """The converter's cloud-fallback defaults; the agent config may override each."""

    mode: Literal["edge_only", "cloud_when_unsure", "edge_first_escalate"] = "cloud_when_unsure"
    threshold: float = Field(default=0.8, ge=0.0, le=1.0)
    cloud_model: str | None = None
    # Label -> threshold for answers whose top-1 is that label (classifiers only).
    class_thresholds: dict[str, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=dict
    )
    audit_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="confident answers also sent"
    )


class SelfTestSpec(_Strict):
    """Test vectors (an .npz of ``input.<name>`` / ``expected.<name>`` arrays)."""

    file: str = "selftest.npz"
    atol: float = 1e-3
    rtol: float = 1e-3
    # For quantized models the scores may move a little between CPUs; the
    # predicted class must not.
    argmax_output: str | None = None
    min_argmax_agreement: float = Field(1.0, ge=0.0, le=1.0)


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: str
    runtime: Literal["onnx", "litert"]
    model_file: str
    description: str = ""
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    labels: list[str] = Field(default_factory=list)
    preprocessing: ImagePreprocessing | None = None
    postprocessing: Postprocessing = Field(default_factory=RawPost)
    confidence: ConfidenceRule = Field(default_factory=ConfidenceRule)
    fallback: FallbackDefaults = Field(default_factory=FallbackDefaults)
    self_test: SelfTestSpec | None = None
    metrics: dict[str, float | int | str | None] = Field(default_factory=dict)
    files: dict[str, FileEntry]
    created_at: str = ""
    created_by: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # Model names and versions end up in paths, URLs and topics (core/names.py).
        return check_model_name(v)

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        return check_version(v)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.model_file not in self.files:
            raise ValueError(f"model_file {self.model_file!r} is not listed in files")
        if self.self_test is not None and self.self_test.file not in self.files:
            raise ValueError(f"self_test file {self.self_test.file!r} is not listed in files")
        inputs = {t.name for t in self.inputs}
        outputs = {t.name for t in self.outputs}
        if self.preprocessing is not None and self.preprocessing.input not in inputs:
            raise ValueError(f"preprocessing.input {self.preprocessing.input!r} is not an input")
        post = self.postprocessing
        wanted = {
            ClassificationPost: lambda p: [p.output],
            DetectionPost: lambda p: [p.boxes_output, p.scores_output],
        }.get(type(post), lambda p: [])(post)
        for name in wanted:
            if name not in outputs:
                raise ValueError(f"postprocessing refers to unknown output {name!r}")
        return self

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def reference_profile(self) -> str | None:
        """The bundle's reference profile member (``PROFILE_NAME``), None without one."""
        return PROFILE_NAME if PROFILE_NAME in self.files else None

    @property
    def task(self) -> str:
        return self.postprocessing.type

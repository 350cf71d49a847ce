"""``edge-convert``: trained model → ONNX → int8 → gated, signed bundle.

A thin argparse layer: every subcommand calls one importable function (the sample
model recipes call the same functions in-process), so the CLI adds only argument
parsing, progress output and exit codes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.core.errors import EdgeError

log = logging.getLogger("edgefleet.converters")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_GATE = 3  # distinct, so CI can tell "model not good enough" from "tool broke"


class _Elapsed(logging.Formatter):
    """``[  1.2s] message``: the converter's steps range from ms to minutes."""

    def __init__(self) -> None:
        super().__init__()
        self._start = time.monotonic()

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"[{time.monotonic() - self._start:6.1f}s] "
        if record.levelno >= logging.WARNING:
            prefix += record.levelname.lower() + ": "
        return prefix + record.getMessage()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is *now*: tests and callers swap it.

    Sits on the root logger and shows our own progress (INFO from ``converters``
    and ``models``) plus anyone's warnings, each exactly once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.quiet = False
        self.setFormatter(_Elapsed())

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        ours = record.name.split(".")[0] in _OUR_LOGGERS
        return ours and not self.quiet and record.levelno >= logging.INFO


_OUR_LOGGERS = ("converters", "models")


@contextmanager
def cli_logging(quiet: bool = False) -> Iterator[None]:
    """Progress lines on stderr while a command-line entry point runs.

    One handler on the root logger: a root with a handler also stops libraries that
    call ``logging.warning()`` directly (ONNX Runtime's quantizer does) from
    installing their own ``basicConfig`` and printing everything twice. Everything
    is undone on exit, so calling ``main()`` in-process (tests, notebooks) leaves the
    caller's logging as it was.
    """
    root = logging.getLogger()
    handler = _StderrHandler()
    handler.quiet = quiet
    loggers = [logging.getLogger(name) for name in _OUR_LOGGERS]
    levels = [lg.level for lg in loggers]
    root.addHandler(handler)
    for lg in loggers:
        lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# --- subcommands --------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    from edgefleet.core.bundle.signing import generate_keypair, key_id, load_private_key

    out: Path = args.out
    existing = [p for p in (out / f"{args.name}.key", out / f"{args.name}.pub") if p.exists()]
    if existing and not args.force:
        raise _Fail(f"{existing[0]} exists; refusing to overwrite a key (use --force)")
    priv, pub = generate_keypair(out, args.name)
    print(f"private key {priv} (mode 0600: keep it secret)")
    print(f"public key  {pub}  key id {key_id(load_private_key(priv).public_key())}")
    return EXIT_OK


def cmd_sklearn(args: argparse.Namespace) -> int:
    from edgefleet.converters.sklearn import load_joblib, sklearn_to_onnx

    renames = dict(_pair(r, "--rename-output") for r in args.rename_output)
    estimator = load_joblib(args.model)
    sklearn_to_onnx(
        estimator,
        args.features,
        args.output,
        input_name=args.input_name,
        rename_outputs=renames,
        opset=args.opset,
    )
    print(args.output)
    return EXIT_OK


def cmd_quantize(args: argparse.Namespace) -> int:
    from edgefleet.converters.quantize import load_calibration, quantize_model

    calibration = None
    if args.mode == "static":
        if args.calibration is None:
            raise _Fail("static quantization needs --calibration DATA.npz")
        calibration = load_calibration(args.calibration, args.model, args.calibration_samples)
        log.info(
            "calibration: %d samples from %s",
            next(iter(calibration.values())).shape[0],
            args.calibration,
        )
    result = quantize_model(
        args.model,
        args.output,
        mode=args.mode,
        fmt=args.format,
        activations=args.activations,
        weights=args.weights,
        calibration=calibration,
        per_channel=args.per_channel,
        method=args.method,
    )
    before, after = args.model.stat().st_size, args.output.stat().st_size
    kind = (
        f"dynamic, {result.weights} weights"
        if result.mode == "dynamic"
        else f"static {result.format}, {result.activations} activations, {result.weights} weights"
    )
    print(f"{result.path}: {kind}, {before} -> {after} bytes")
    return EXIT_OK


def cmd_torch(args: argparse.Namespace) -> int:
    from edgefleet.converters.torch_export import export_torch, parse_shape

    export_torch(
        args.module,
        args.output,
        parse_shape(args.input_shape),
        weights=args.weights,
        input_name=args.input_name,
        output_names=args.output_name or ["output"],
        dynamic_batch=not args.static_batch,
        opset=args.opset,
        exporter=args.exporter,
    )
    print(args.output)
    return EXIT_OK


def cmd_bundle(args: argparse.Namespace) -> int:
    from edgefleet.converters.evaluate import load_eval_set
    from edgefleet.converters.gate import bundle_model, load_spec, prepare_spec

    if not args.no_profile and not 2 <= args.profile_bins <= 100:
        raise _Fail("--profile-bins must be between 2 and 100")
    spec = load_spec(args.spec)
    fields, _, _ = prepare_spec(spec, args.model, args.version)
    key = _load_key(args.key)
    data = load_eval_set(args.eval, fields["inputs"])
    out = args.output or Path(f"{fields['name']}-{fields['version']}.bundle")
    report = bundle_model(
        model=args.model,
        spec=spec,
        eval_set=data,
        out=out,
        private_key=key,
        reference=args.reference,
        max_drop=args.max_drop,
        version=args.version,
        selftest_samples=args.selftest_samples,
        latency_runs=args.latency_runs,
        skip_gate=args.skip_gate,
        output=args.score_output,
        profile_bins=None if args.no_profile else args.profile_bins,
    )
    m = report.metrics
    print(f"{out}: {report.manifest.name}:{report.manifest.version}")
    for key_name in sorted(m):
        print(f"  {key_name:<22} {m[key_name]}")
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    from edgefleet.converters.bundletools import sign_bundle

    out = args.output or args.bundle
    kid = sign_bundle(args.bundle, _load_key(args.key), out)
    print(f"signed {out} with key {kid}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from edgefleet.converters.bundletools import verify_bundle
    from edgefleet.core.bundle.signing import TrustStore

    try:
        trust = TrustStore.from_files(args.pubkey)
    except ValueError as exc:  # a file that is not an Ed25519 PEM public key
        raise _Fail(f"--pubkey: {exc}") from exc
    result = verify_bundle(args.bundle, trust, self_test=args.self_test)
    m = result.manifest
    line = f"OK {args.bundle}: {m.name}:{m.version} signed by key {result.key_id}"
    if result.self_test is not None:
        line += f"; self-test {result.self_test}"
    print(line)
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from edgefleet.converters import calibrate as cal

    key = _load_key(args.key) if args.key else None
    if args.output and key is None:
        raise _Fail("writing a calibrated bundle (-o) needs --key to sign it")
    if args.output and args.target_share is None and args.target_accuracy is None:
        raise _Fail("writing a calibrated bundle (-o) needs --target-share or --target-accuracy")
    trust = cal.trust_for(args.pubkey or [], key)
    with cal.tempdir() as tmp:
        edge = cal.open_bundle(args.bundle, trust, Path(tmp) / "edge")
        data = cal.load_eval(args.eval, edge.manifest)
        cloud_model = args.cloud_model or edge.manifest.fallback.cloud_model
        if args.cloud_bundle:
            cloud = cal.open_bundle(args.cloud_bundle, trust, Path(tmp) / "cloud")
            cloud_pred = cal.class_probabilities(cloud, data).argmax(axis=1)
            cloud_model = args.cloud_model or cloud.manifest.name
        elif args.cloud_predictions:
            cloud_pred = cal.predictions_from_file(args.cloud_predictions, len(data))
        else:
            if not cloud_model:
                raise _Fail("--cloud-url needs --cloud-model (the bundle names none)")
            post = edge.manifest.postprocessing
            output = getattr(post, "output", None)
            if output is None:
                raise _Fail(f"{edge.manifest.name} is not a classifier")
            token = args.cloud_token_file.read_text().strip() if args.cloud_token_file else None
            cloud_pred = cal.predictions_from_endpoint(
                args.cloud_url, cloud_model, data, output, token=token, ca_file=args.cloud_ca_file
            )
        result = cal.calibrate(edge, data, cloud_pred, args.rule)
        chosen = None
        target = None
        if args.target_share is not None:
            chosen = cal.choose(result.curve, max_share=args.target_share)
            target = f"cloud_share<={args.target_share}"
        elif args.target_accuracy is not None:
            chosen = cal.choose(result.curve, min_accuracy=args.target_accuracy)
            target = f"accuracy>={args.target_accuracy}"
        if args.json:
            print(json.dumps(cal.report_json(result, chosen), indent=2), flush=True)
        else:
            rows = result.curve if args.all else cal.summary(result, chosen)
            print(cal.format_table(result, rows, chosen), flush=True)
        if args.output:
            assert chosen is not None and target is not None and key is not None
            m = cal.write_calibrated(
                edge, args.output, result, chosen, target, key, args.version, cloud_model
            )
            log.info(
                "wrote %s: %s:%s with fallback threshold %.6g (%.1f%% to the cloud,"
                " joint accuracy %.4f on the validation set)",
                args.output,
                m.name,
                m.version,
                chosen.threshold,
                chosen.cloud_share * 100,
                chosen.joint_accuracy,
            )
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from edgefleet.converters.bundletools import format_inspection, inspect_bundle

    info = inspect_bundle(args.bundle)
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_inspection(info))
    return EXIT_OK


# --- parser ---------------------------------------------------------------------


class _Fail(Exception):
    """A user error found by the CLI itself (not by a library function)."""


def _load_key(path: Path) -> Ed25519PrivateKey:
    from edgefleet.core.bundle.signing import load_private_key

    try:
        return load_private_key(path)
    except ValueError as exc:  # cryptography's word for "not a usable PEM key"
        raise _Fail(f"{path}: not an Ed25519 private key in PEM form ({exc})") from exc


def _file(text: str) -> Path:
    """An input file that must exist: caught at parse time, before any slow step."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def _pair(text: str, option: str) -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not sep or not old or not new:
        raise _Fail(f"{option} takes OLD=NEW, got {text!r}")
    return old, new


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-convert",
        description="Turn trained models into quantized, signed, self-testing edgefleet bundles.",
        epilog="exit codes: 0 ok, 1 error, 2 bad usage, 3 quality gate refused the model",
    )
    # -q works before or after the subcommand; SUPPRESS keeps the subparser's
    # default from overwriting a -q given before it.
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="only warnings and errors",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        fn: Callable[[argparse.Namespace], int],
        help_: str,
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=description or help_, parents=[common])
        p.set_defaults(func=fn)
        return p

    p = add("keygen", cmd_keygen, "create an Ed25519 signing key pair (NAME.key 0600, NAME.pub)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--name", default="signing")
    p.add_argument("--force", action="store_true", help="overwrite an existing key pair")

    p = add(
        "sklearn",
        cmd_sklearn,
        "convert a scikit-learn estimator (.joblib) to ONNX",
        "Convert a fitted scikit-learn estimator saved with joblib to ONNX (skl2onnx,"
        " zipmap disabled: classifiers output plain 'label' and 'probabilities' tensors)."
        " WARNING: a .joblib file is a pickle and runs code when loaded; only convert"
        " files from a source you trust.",
    )
    p.add_argument(
        "--model",
        type=_file,
        required=True,
        metavar="MODEL.joblib",
        help="trusted pickle of a fitted estimator",
    )
    p.add_argument("--features", type=int, required=True, metavar="N", help="input width")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="MODEL.onnx")
    p.add_argument("--input-name", default="input")
    p.add_argument(
        "--rename-output",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="e.g. probabilities=scores (repeatable)",
    )
    p.add_argument("--opset", type=int, default=17)

    p = add(
        "quantize",
        cmd_quantize,
        "post-training int8 quantization with ONNX Runtime",
        "Quantize an ONNX model. Defaults (static QDQ, uint8 activations, int8 weights)"
        " are the only combination measured faster than fp32 on x86 VNNI CPUs;"
        " --format auto builds QDQ and QOperator and keeps the faster.",
    )
    p.add_argument("model", type=_file, metavar="MODEL.onnx")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="MODEL.int8.onnx")
    p.add_argument("--mode", choices=["static", "dynamic"], default="static")
    p.add_argument("--format", choices=["qdq", "qoperator", "auto"], default="qdq")
    p.add_argument("--activations", choices=["uint8", "int8"], default="uint8")
    p.add_argument("--weights", choices=["int8", "uint8"], default="int8")
    p.add_argument(
        "--calibration",
        type=_file,
        metavar="DATA.npz",
        help="representative inputs: 'x' or one array per input name",
    )
    p.add_argument("--calibration-samples", type=int, default=1000, metavar="N")
    p.add_argument("--per-channel", action="store_true", help="per-channel weight scales")
    p.add_argument(
        "--method",
        choices=["minmax", "entropy", "percentile"],
        default="minmax",
        help="calibration method",
    )

    p = add(
        "torch",
        cmd_torch,
        "export a PyTorch module to ONNX (needs the 'torch' extra)",
        "Export a PyTorch module to ONNX. Needs: pip install -c constraints.txt -e '.[torch]'.",
    )
    p.add_argument(
        "--module",
        required=True,
        metavar="PKG.MOD:FACTORY",
        help="callable returning the torch.nn.Module",
    )
    p.add_argument(
        "--weights", type=_file, metavar="FILE", help="state dict (loaded with weights_only=True)"
    )
    p.add_argument("--input-shape", required=True, metavar="1,3,224,224")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="MODEL.onnx")
    p.add_argument("--input-name", default="input")
    p.add_argument(
        "--output-name",
        action="append",
        metavar="NAME",
        help="output names in order (repeatable; default: output)",
    )
    p.add_argument(
        "--static-batch",
        action="store_true",
        help="keep the batch dimension fixed (default: dynamic)",
    )
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto")

    p = add(
        "bundle",
        cmd_bundle,
        "measure, gate and write a signed bundle",
        "Evaluate MODEL (and the fp32 --reference) on a labelled .npz, refuse when the"
        " accuracy drop exceeds --max-drop points (exit 3, nothing written), else write a"
        " signed bundle with the metrics and self-test vectors from the eval set.",
    )
    p.add_argument("model", type=_file, metavar="MODEL", help=".onnx or .tflite to ship")
    p.add_argument(
        "--spec",
        type=_file,
        required=True,
        metavar="SPEC.yaml",
        help="manifest fields: name, version, inputs, outputs, labels, ...",
    )
    p.add_argument(
        "--eval",
        type=_file,
        required=True,
        metavar="EVAL.npz",
        help="'x' (or one array per input) and integer labels 'y'",
    )
    p.add_argument("--key", type=_file, required=True, metavar="SIGNING.key")
    p.add_argument(
        "--reference",
        type=_file,
        metavar="FP32_MODEL",
        help="the unquantized model, for the accuracy gate",
    )
    p.add_argument(
        "-o", "--output", type=Path, metavar="OUT.bundle", help="default: NAME-VERSION.bundle"
    )
    p.add_argument(
        "--max-drop",
        type=float,
        default=1.0,
        metavar="POINTS",
        help="largest accepted accuracy drop in percentage points (default 1.0)",
    )
    p.add_argument("--version", help="override the spec's version")
    p.add_argument("--selftest-samples", type=int, default=32, metavar="N")
    p.add_argument("--latency-runs", type=int, default=200, metavar="N")
    p.add_argument(
        "--score-output",
        metavar="NAME",
        help="output with class scores (default: the classification postprocessing's)",
    )
    p.add_argument(
        "--skip-gate",
        action="store_true",
        help="allow a quantized model without --reference (no accuracy check)",
    )
    p.add_argument(
        "--profile-bins",
        type=int,
        default=10,
        metavar="N",
        help="bins per feature of the eval set's reference profile (profile.json in the"
        " bundle; the agent's drift score compares live inputs with it; default 10)",
    )
    p.add_argument(
        "--no-profile",
        action="store_true",
        help="write no reference profile (the agent then reports no drift score)",
    )

    p = add("sign", cmd_sign, "(re-)sign a bundle")
    p.add_argument("bundle", type=_file, metavar="BUNDLE")
    p.add_argument("--key", type=_file, required=True, metavar="SIGNING.key")
    p.add_argument("-o", "--output", type=Path, metavar="OUT", help="default: in place")

    p = add("verify", cmd_verify, "verify a bundle's signature and contents as an agent would")
    p.add_argument("bundle", type=_file, metavar="BUNDLE")
    p.add_argument(
        "--pubkey",
        type=_file,
        nargs="+",
        required=True,
        metavar="PUB",
        help="trusted public key file(s)",
    )
    p.add_argument(
        "--self-test", action="store_true", help="also load the model and run its test vectors here"
    )

    p = add(
        "calibrate",
        cmd_calibrate,
        "choose the cloud-fallback threshold from data; write it into a new bundle",
        "Run the edge BUNDLE on a labelled validation set, take the cloud model's answers"
        " (its bundle run here, a predictions file, or a live OIP endpoint), and print"
        " threshold -> share sent to the cloud -> joint accuracy. With a target and -o,"
        " write a new signed bundle version whose fallback.threshold meets it.",
    )
    p.add_argument("bundle", type=_file, metavar="BUNDLE", help="the edge model's bundle")
    p.add_argument(
        "--eval",
        type=_file,
        required=True,
        metavar="VAL.npz",
        help="'x' (or one array per input) and integer labels 'y'",
    )
    cloud = p.add_mutually_exclusive_group(required=True)
    cloud.add_argument(
        "--cloud-bundle",
        type=_file,
        metavar="CLOUD.bundle",
        help="the cloud model's bundle, run here",
    )
    cloud.add_argument(
        "--cloud-predictions",
        type=_file,
        metavar="PRED.npz",
        help="the cloud's answers: y_pred (class ids) or probabilities",
    )
    cloud.add_argument("--cloud-url", metavar="URL", help="a live OIP endpoint to ask")
    p.add_argument("--cloud-model", help="cloud model name (default: the bundle's cloud_model)")
    p.add_argument("--cloud-token-file", type=_file, metavar="FILE")
    p.add_argument("--cloud-ca-file", type=_file, metavar="CA.pem")
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--target-share",
        type=float,
        metavar="SHARE",
        help="at most this share of items to the cloud, e.g. 0.15",
    )
    target.add_argument(
        "--target-accuracy",
        type=float,
        metavar="ACC",
        help="the cheapest threshold reaching this joint accuracy",
    )
    p.add_argument(
        "--rule",
        choices=["top1", "margin", "entropy"],
        help="confidence rule (default: the bundle's)",
    )
    p.add_argument(
        "--pubkey",
        type=_file,
        nargs="+",
        metavar="PUB",
        help="trusted keys for the bundles (the --key's own is trusted too)",
    )
    p.add_argument("--key", type=_file, metavar="SIGNING.key", help="signs the new bundle")
    p.add_argument(
        "-o", "--output", type=Path, metavar="OUT.bundle", help="write the calibrated bundle here"
    )
    p.add_argument("--version", help="its version (default: the next integer)")
    p.add_argument("--all", action="store_true", help="print every threshold, not a summary")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("inspect", cmd_inspect, "show a bundle's manifest (no key needed, unverified)")
    p.add_argument("bundle", type=_file, metavar="BUNDLE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    from edgefleet.converters.calibrate import CalibrationError
    from edgefleet.converters.evaluate import EvaluationError
    from edgefleet.converters.gate import SpecError
    from edgefleet.converters.quantize import QuantizationError
    from edgefleet.converters.sklearn import SklearnConversionError
    from edgefleet.converters.torch_export import TorchExportError

    return (
        _Fail,
        CalibrationError,
        EdgeError,
        EvaluationError,
        SpecError,
        QuantizationError,
        SklearnConversionError,
        TorchExportError,
        OSError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from edgefleet.converters.gate import QualityGateError

    try:
        with cli_logging(args.quiet):
            return int(args.func(args))
    except QualityGateError as exc:
        print(f"edge-convert: refused: {exc}", file=sys.stderr)
        return EXIT_GATE
    except _expected_errors() as exc:
        message = getattr(exc, "message", None) or str(exc)
        if isinstance(exc, OSError) and exc.filename:
            message = f"{exc.filename}: {exc.strerror}"
        print(f"edge-convert: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

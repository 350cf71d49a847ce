"""Model bundles: one signed file per model version (see docs/bundle-format.md)."""

from edgefleet.core.bundle.archive import BundleContents, read_bundle, write_bundle
from edgefleet.core.bundle.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Manifest,
    SelfTestSpec,
    TensorSpec,
)
from edgefleet.core.bundle.signing import TrustStore, generate_keypair, sign_manifest

__all__ = [
    "MANIFEST_NAME",
    "SIGNATURE_NAME",
    "BundleContents",
    "Manifest",
    "SelfTestSpec",
    "TensorSpec",
    "TrustStore",
    "generate_keypair",
    "read_bundle",
    "sign_manifest",
    "write_bundle",
]

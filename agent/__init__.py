"""edgefleet edge agent: serves signed model bundles over the Open Inference Protocol."""

__version__ = "0.1.0"

"""edgefleet edge agent: serves signed model bundles over the Open Inference Protocol."""

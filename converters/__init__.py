"""Model converters: trained models to signed, quantized, self-testing bundles."""

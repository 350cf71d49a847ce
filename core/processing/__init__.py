"""What a model's inputs and outputs mean: ``image`` (JPEG/PNG to an input tensor),
``classification`` and ``detection`` (a task's outputs and its confidence rules) and
``scoring`` (the one entry, ``score``, that reads a model's outputs for everyone)."""

"""The analysis core: projected per-sample gradients, the eNTK, the learning-dynamics tracker, its
statistics and summary, and the Hugging Face callback. Generic: it takes a model, measurement functions
``fn(model, batch) -> Tensor[B]`` and batches, and knows nothing of ShapesWorld, adapters, the oracle or
the trainer (ARCHITECTURE.md)."""

"""Training data: readers, tokenization, packing, batching."""

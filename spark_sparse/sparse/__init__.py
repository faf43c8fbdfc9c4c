"""The sparse engine: visible pixels as MinkowskiEngine sparse tensors, per-batch index tables, and our operators on them."""

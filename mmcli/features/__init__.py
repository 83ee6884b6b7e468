"""Stage-1 building blocks: the feature store, readers, tiling, encoders and per-modality extractors."""

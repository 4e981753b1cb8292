"""Inference: per-view network outputs -> entity masks in the original image (Table 7 modes)."""

"""entityseg: CropFormer fine-grained entity segmentation (Lightning + Hydra)."""

__version__ = "0.1.0"

"""Interoperability with other codebases: the released CropFormer checkpoints."""

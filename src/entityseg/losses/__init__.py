"""CropFormer losses: Hungarian matching and the image-level + batch-level set criterion."""

"""Evaluation of entity predictions: class-agnostic COCO mask AP (AP^e) with pycocotools."""

"""MapSage DS: DeepSpeed fine-tuning of large vision models for remote-sensing segmentation."""

__version__ = "0.1.0"

"""Conversion between moejax exports and other libraries' checkpoints (``hf``: Hugging Face)."""

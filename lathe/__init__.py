"""lathe: PyTorch-native pretraining for Llama-family models."""

__version__ = "0.1.0"

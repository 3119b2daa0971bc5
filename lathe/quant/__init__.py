"""Model converters for low-precision training (float8), applied from outside the model."""

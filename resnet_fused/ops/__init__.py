"""The fused operators, one module each."""

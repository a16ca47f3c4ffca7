"""Triton kernels of the decoder (CUDA; Triton's interpreter runs them on a CPU in tests)."""

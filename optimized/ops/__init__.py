"""Launchers and launch planning of the Triton kernels in optimized/kernels/ (host code)."""

"""Optimized backends: xFormers prefill + Triton paged kernels, our Triton path, a torch path."""

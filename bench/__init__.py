"""Benchmarks: GPU kernels against peers and the hardware limit (bench/gpu.py), and the cost
of the reference and torch backend on the CPU (bench/test_cpu_bench.py, pytest-benchmark)."""

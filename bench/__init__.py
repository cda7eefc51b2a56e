"""Benchmarks: our kernels timed beside their peers and the card's measured limits, each row
judged first as the matrix judges it (`python -m bench`, bench/harness.py), and why a row falls
short, under Nsight Compute (`python -m bench limits`, bench/limits.py)."""

"""Benchmarks of onnxopt (not tests): ``python -m bench.<name>``; see bench/README.md."""

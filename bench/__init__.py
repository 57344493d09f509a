"""Load benchmarks for imagegw (``make bench``); see bench/README.md. Not part of ``make test``."""

"""Tianshu's benchmarks and the anchor workloads beside them; run through bench/run."""

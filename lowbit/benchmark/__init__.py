"""Benchmarks of a candidate against its baseline: latency, throughput and memory (`lowbit bench`)."""

from lowbit.benchmark.latency import BenchConfig, bench_pair, peak_rss_subprocess

__all__ = ["BenchConfig", "bench_pair", "peak_rss_subprocess"]

"""Measurement: routing traces, compute-free replay through the real cache and reader, the
decode benchmark, the disk's read ceiling, router-lookahead recall."""

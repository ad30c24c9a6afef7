"""The expert cache (bounded in bytes, pins, byte accounting) and its eviction policies."""

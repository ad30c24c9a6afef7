"""moestream: stream MoE experts from disk."""

"""The MLX runtime: a bundle (or a source checkpoint) loaded as an ordinary mlx-lm model whose
routed experts are read from disk on demand, inside one memory budget.

Sub-packages, each depending only on those above it (and on manifests/ and common/):
- io:        the I/O engine: the extent reader (O_DIRECT, coalescing, thread pool), GPU staging
             buffers, the expert stores (BundleStore, CheckpointStore), bundles by Hub repo id;
- cache:     the expert cache, bounded in bytes, and its eviction policies;
- model:     the wiring into mlx-lm: the streaming MoE layer, the memory budget, `load`;
- frontends: generate, chat and the OpenAI-compatible server;
- measure:   routing traces, compute-free replay, benchmarks, the disk's read ceiling.

Never imports Prefect or moestream.stages: a bundle consumer installs no pipeline.
"""

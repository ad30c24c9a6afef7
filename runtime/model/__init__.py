"""The wiring into mlx-lm: the streaming MoE layer that replaces SwitchGLU, the memory budget,
router lookahead, and `load`, which puts them together."""

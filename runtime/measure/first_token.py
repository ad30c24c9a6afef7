"""When a prompt's first token is known, as against when mlx-lm's generate_step hands it out.

generate_step builds the next token's step before it yields the current token (for a model whose
forward pass only builds a graph, the next step then computes while the caller handles this one).
A streaming model's forward pass cannot wait: each MoE layer syncs on its routing and reads the
experts it misses. So the first token reaches the caller only after the second token's step has
run, its reads included, and its TTFT holds one decode step that is not the prompt's.
"""

from __future__ import annotations

import time

import mlx.core as mx


class FirstTokenClock:
    """The model as generate_step calls it, noting when the first generated token is known: the
    moment the call after the prompt's last token is given it. Everything else is the model's."""

    def __init__(self, model, prompt_tokens: int):
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.seen = 0  # prompt tokens the model has been given so far
        self.known_at: float | None = None

    def __call__(self, inputs, *args, **kwargs):
        if self.seen >= self.prompt_tokens and self.known_at is None:
            mx.eval(inputs)  # the model's first routing sync would wait for the same value
            self.known_at = time.perf_counter()
        self.seen += inputs.shape[-1]
        return self.model(inputs, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)

"""The memory budget: one number covering resident weights, the KV cache, read buffers, the
activations of a prefill chunk and the expert cache, split up front so that the expert cache gets
what is left.

`MemoryNeeds` is what a model holds besides its expert cache, computed once from its sizes (the
same function whether the model is loaded or only planned: `plan_memory` does not build it);
`MemoryNeeds.plan(budget)` splits a budget, or refuses one too small with the minimum it needs.

A forward pass over many tokens allocates far more than a decode step: attention scores (every
head, chunk x context, where MLX does not fuse attention), the MoE intermediates of every token's
k experts, the stacked weights of every expert the chunk routes to. So the prompt is prefilled in
chunks (mlx-lm's `prefill_step_size`) and the plan picks the chunk: `Activations.transient_bytes`
sizes what a chunk allocates from the config, and `MemoryPlan.prefill_tokens` is the largest chunk
(up to mlx-lm's default) that fits what the budget leaves besides the expert cache, never taking
more than the cache gets.

The routed experts a forward pass holds outside the expert cache are counted as the streaming
layer holds them: a prefill chunk's pipeline holds PREFILL_GROUPS_HELD groups of its experts at once
(one stacked for the matmul, the next ones being read), each sized by `prefill_group_bytes` (the one
rule, which the streaming layer uses to cut its groups); any other pass (a decode step, a batch of
them, a few tokens) stacks its experts as the cache holds them (`MemoryNeeds._stacked`).

That room for a prefill chunk (its activations and stacked experts) sits idle while the model
decodes, so the expert cache borrows it: `MemoryPlan.cache_bytes_for(tokens)` is the cache a forward
pass of that many tokens leaves room for, `MemoryPlan.decode_cache_bytes` the one a decode step
leaves (about everything the budget has beyond its minimum), and `cache_bytes` the one the plan's
own prefill chunk leaves. The streaming layer resizes the cache before each forward pass computes
anything, evicting the least valuable experts where the pass needs their room.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import mlx.core as mx

from ...common.errors import OptionsError
from ...common.units import fmt_bytes

# KV cache kept in reserve by default: this many tokens of context (mlx-lm's --max-kv-size bounds
# the cache the same way; a longer context than the reserve would exceed the budget).
DEFAULT_KV_TOKENS = 4096
# The largest prefill chunk a plan picks: mlx-lm's own default prefill_step_size, so a budget with
# room prefills as mlx-lm does.
DEFAULT_PREFILL_TOKENS = 2048
# The smallest: what the minimum budget prefills with. On this CPU a 16-token chunk already costs
# no more per token than 1024-token chunks (62 vs 56 ms/token, `small` preset).
MIN_PREFILL_TOKENS = 16
# mlx-lm's KVCache grows in steps of this many tokens (its RotatingKVCache never past max_size).
KV_STEP = 256
# The streaming layer's prefill pipeline (streaming.py): a call is a prefill when a sequence gives it
# more than one token and it routes at least PREFILL_MIN_PAIRS (token, expert) pairs (where mlx-lm's
# SwitchGLU sorts the rows by expert, as the pipeline does); its experts are split into about
# PREFILL_GROUPS groups, of at least PREFILL_MIN_GROUP_BYTES each, so that reading one overlaps
# computing another (see prefill_group_bytes); it holds PREFILL_GROUPS_HELD of them at once: one
# stacked for its matmuls and the next two being read, so that the next read is queued before the
# one in flight ends and the disk never waits for a group's stacking or its last extents (with one
# read at a time, a 2,048-token prompt on the 397B's shapes left the disk idle ~0.1 s of 5).
PREFILL_MIN_PAIRS = 64
PREFILL_GROUPS = 12
PREFILL_GROUPS_HELD = 3
PREFILL_MIN_GROUP_BYTES = 64 << 20


def prefill_path(tokens: int, pairs: int) -> bool:
    """Whether a forward pass takes the streaming layer's prefill pipeline: `tokens` of one sequence
    (more than one), `pairs` (token, expert) pairs routed in all."""
    return tokens > 1 and pairs >= PREFILL_MIN_PAIRS


def prefill_group_bytes(total: int, min_bytes: int | None = None) -> int:
    """The most bytes (as the expert cache counts them) of one group of a prefill call whose distinct
    routed experts take `total` bytes: about 1/PREFILL_GROUPS of them, so that reading one group
    overlaps computing another; at least `min_bytes` (default PREFILL_MIN_GROUP_BYTES), so that reads
    stay large; at most 1/PREFILL_GROUPS_HELD of them, so that the groups the pipeline holds at once
    (one stacked, the next ones read; or one read, its stacked copy and the next one read) never
    take more than the call's experts. A group is larger only as a single expert larger than this.
    The streaming layer cuts its groups by this rule and the memory plan counts PREFILL_GROUPS_HELD
    of them (MemoryNeeds._stacked): one rule for both."""
    floor = PREFILL_MIN_GROUP_BYTES if min_bytes is None else min_bytes
    return min(max(-(-total // PREFILL_GROUPS), floor), total // PREFILL_GROUPS_HELD)


class BudgetError(OptionsError):
    """The memory budget cannot hold what the model needs; the message gives the minimum."""


@dataclass(frozen=True)
class Activations:
    """What one forward pass allocates besides the weights, from the model's config. An upper
    bound, checked against mx.get_peak_memory() on the CPU backend (bench/budget_prompts.py
    --check-formula; qwen3_moe `small` preset and the trained fixture, chunks of 16-1024 tokens over
    0-2048 cached ones): measured / formula 0.52-0.95, highest where attention scores dominate.
    Where it overcounts: MLX donates buffers (softmax in place) that it counts apart, and the
    routed experts' outputs take 3 k hidden only when the experts come in several groups."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int  # the larger of the query/key and the value head dims
    experts_per_token: int
    num_experts: int
    expert_intermediate: int
    shared_intermediate: int  # shared experts of an MoE layer, together
    dense_intermediate: int  # a dense MLP layer's (first_k_dense, mlp_only_layers)
    vocab: int
    itemsize: int  # of the compute dtype
    kv_bytes_per_token: int
    fused_attention: bool  # MLX's fused SDPA: no scores in memory (Metal, for these head dims)

    def transient_bytes(self, tokens: int, keys: int) -> int:
        """Bytes a forward pass of `tokens` new tokens allocates at its peak when attention sees
        `keys` keys, besides the weights, the expert cache, the routed experts' stacked weights and
        a KV cache of the reserve's size:

        - KV past the reserve: the chunk's own tokens (a RotatingKVCache holds max_size - 1 + chunk
          during a chunk) and KVCache's 256-token growth step; one layer's old cache while it is
          copied into a larger one;
        - attention (unless fused): scores of every head, tokens x keys, softmax in place, and the
          causal mask (1 byte each); per token: the normed input, q/k/v, their norms and rotations,
          the attention output and its projection;
        - the MoE block, per token: the input gathered once per routed expert, the k outputs and
          their unsorted copy (3 k hidden), up and gate (2 k intermediate), the router (2 experts),
          the shared experts (3 intermediate); a dense MLP layer (3 intermediate) if larger;
        - the residual stream held across both (6 hidden per token);
        - the logits of the last token (logits, log-softmax, sampling: 4 vocab).
        """
        b, c, s, h = self.itemsize, tokens, keys, self.hidden
        kv = self.kv_bytes_per_token * (c + KV_STEP) + self.kv_bytes_per_token // max(self.layers, 1) * (s + KV_STEP)
        scores = 0 if self.fused_attention else self.heads * c * s * b + c * s
        attention = scores + c * b * (3 * h + 6 * self.heads * self.head_dim + 4 * self.kv_heads * self.head_dim)
        k = self.experts_per_token
        moe = c * b * (3 * k * h + 2 * k * self.expert_intermediate + 2 * self.num_experts + 3 * self.shared_intermediate)
        mlp = max(moe, c * b * 3 * self.dense_intermediate)
        return kv + max(attention, mlp) + 6 * c * h * b + 4 * self.vocab * b


@dataclass(frozen=True)
class MemoryPlan:
    """How a budget is split. All in bytes; budget_bytes and cache_bytes are None when unbounded.
    budget >= resident + kv_reserve + buffer + activation + cache + held_extra."""

    budget_bytes: int | None
    resident_bytes: int
    kv_reserve_bytes: int
    kv_tokens: int
    # working memory the least budget needs besides the cache: one layer's routed experts in flight
    # (read, or stacked for the matmul), and the activations of a MIN_PREFILL_TOKENS chunk and of a
    # decode step at a full KV reserve
    buffer_bytes: int
    min_layer_bytes: int  # one layer's routed experts: the least the expert cache must hold
    cache_bytes: int | None  # what the expert cache gets (None: unbounded), as the cache counts experts
    expert_bytes: int  # every expert, in memory
    prefill_tokens: int  # the prefill chunk (mlx-lm's prefill_step_size) this budget holds at a full KV reserve
    activation_bytes: int  # what that chunk needs beyond buffer_bytes (activations, stacked experts)
    held_extra_bytes: int  # what cached experts hold beyond what the cache counts (see MemoryNeeds.held_ratio)
    needs: MemoryNeeds | None = field(default=None, repr=False)

    @property
    def minimum_bytes(self) -> int:
        """The smallest budget that runs: everything but the cache, and one layer's experts."""
        return self.resident_bytes + self.kv_reserve_bytes + self.buffer_bytes + self.min_layer_bytes

    @property
    def cache_share(self) -> float | None:
        """The share of all experts the expert cache holds (None: unbounded)."""
        if self.cache_bytes is None:
            return None
        return min(1.0, self.cache_bytes / self.expert_bytes) if self.expert_bytes else 1.0

    def prefill_tokens_for(self, prompt_tokens: int) -> int:
        """The prefill chunk for a prompt of this many tokens (cached ones included): at least
        prefill_tokens (or the whole prompt if shorter); larger where the prompt leaves part of
        the KV reserve unused, since a chunk then sees fewer keys and the unused reserve can hold
        its activations."""
        if self.needs is None or self.budget_bytes is None:
            return min(self.prefill_tokens, max(prompt_tokens, 1))
        return self.needs.prefill_tokens_for(prompt_tokens, self.prefill_tokens, self.cache_bytes)

    @property
    def decode_cache_bytes(self) -> int | None:
        """What the expert cache holds while no prefill runs (None: unbounded): cache_bytes plus the
        room the plan keeps for a prefill chunk's activations and stacked experts
        (activation_bytes), as the cache counts bytes (held_ratio); a prefill chunk takes its room
        back (cache_bytes_for)."""
        return self.cache_bytes_for(1)

    def cache_bytes_for(self, tokens: int | None, pipelined: bool | None = None) -> int | None:
        """The expert cache's capacity during a forward pass of `tokens` tokens (every sequence's,
        together; None: the plan's own chunk): the largest cache whose bytes, as held, fit beside
        that pass's activations and the routed experts it holds outside the cache, in what the
        budget has beyond its minimum. `pipelined`: whether the pass takes the streaming layer's
        prefill pipeline (None: as `tokens` tokens of one sequence do, MemoryNeeds.pipelined; a
        batch of decode steps, or a prefill with the pipeline off, does not). A decode step (1
        token) gets decode_cache_bytes; a pass of at least prefill_tokens tokens that holds its
        experts as the plan's chunk does gets cache_bytes (a larger chunk uses KV reserve a short
        prompt leaves unused, see prefill_tokens_for); one that holds them otherwise gets the cache
        whose cost, with what it holds, is what cache_bytes and the plan's way of holding them
        take. A pass that holds more experts than the plan's chunk (a few tokens stacked at once
        can) gets less than cache_bytes."""
        if self.cache_bytes is None or self.needs is None or self.budget_bytes is None:
            return self.cache_bytes
        needs = self.needs
        n = self.prefill_tokens if tokens is None else max(int(tokens), 1)
        if pipelined is None:
            pipelined = needs.pipelined(n)
        if n >= self.prefill_tokens:
            if pipelined == needs.pipelined(n):
                return self.cache_bytes
            room = needs._cache_cost(self.cache_bytes) + needs._stacked(n, self.cache_bytes)
            cache = needs.largest_cache(n, room, pipelined, activations=False)
        else:
            cache = needs.largest_cache(n, self.budget_bytes - self.minimum_bytes, pipelined)
        return min(max(cache or 0, self.min_layer_bytes), self.expert_bytes)  # never more than every expert

    def prefill_room_for(self, tokens: int | None, pipelined: bool | None = None) -> int | None:
        """prefill_room_bytes for a forward pass of `tokens` tokens, beside cache_bytes_for(tokens,
        pipelined) (None tokens: the plan's own chunk)."""
        if self.needs is None or self.cache_bytes is None:
            return None
        n = self.prefill_tokens if tokens is None else max(int(tokens), 1)
        return self.needs.prefill_room(n, self.cache_bytes_for(n, pipelined), pipelined)

    @property
    def prefill_room_bytes(self) -> int | None:
        """Bytes of routed experts (as the cache counts them) a prefill chunk may hold outside the
        expert cache at once (None: unbounded) during the plan's own chunk; see MemoryNeeds.prefill_room."""
        return self.prefill_room_for(None)

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "needs"}
        return {**d, "minimum_bytes": self.minimum_bytes, "cache_share": self.cache_share,
                "decode_cache_bytes": self.decode_cache_bytes}


@dataclass(frozen=True)
class MemoryNeeds:
    resident_bytes: int  # resident weights, in the compute dtype
    kv_bytes_per_token: int
    kv_tokens: int
    layer_bytes: int  # the most one MoE layer's k largest experts take
    expert_bytes: int  # every expert, in the compute dtype
    activations: Activations | None = None
    # the most bytes of one layer's n largest experts, n = 1..E (the weights a chunk routing to n
    # experts stacks for its matmul)
    routed_bytes: tuple[int, ...] = ()
    # memory an expert holds once read per byte the cache counts for it (>= 1): on the CPU in
    # float32 an extent read straight into MLX memory keeps its bf16 scales alive beside their
    # float32 copies, and each read carries 4 KB of alignment
    held_ratio: float = 1.0

    @property
    def kv_reserve_bytes(self) -> int:
        return self.kv_bytes_per_token * self.kv_tokens

    # ---- the parts of a plan

    def _held(self, nbytes: int) -> int:
        return math.ceil(nbytes * self.held_ratio)

    def _transient(self, tokens: int, keys: int | None = None) -> int:
        if self.activations is None:
            return 0
        return self.activations.transient_bytes(tokens, self.kv_tokens + tokens if keys is None else keys)

    def pipelined(self, tokens: int) -> bool:
        """Whether a forward pass of `tokens` tokens of one sequence takes the streaming layer's
        prefill pipeline (prefill_path)."""
        k = self.activations.experts_per_token if self.activations is not None else 1
        return prefill_path(tokens, tokens * k)

    def _stacked(self, tokens: int, cache: int | None, pipelined: bool | None = None) -> int:
        """The routed experts a pass of `tokens` tokens holds outside the expert cache beyond one
        layer's k (which the buffers hold), as held, at most as many as the cache holds (cache: its
        capacity). A prefill's pipeline (pipelined, default: as one sequence's tokens take it) holds
        PREFILL_GROUPS_HELD groups of prefill_group_bytes of the most its experts can take (or of one
        expert, if larger), and cuts them to that share of the room the plan gives it (prefill_room)
        where that is less; any other pass stacks every expert it routes to, in groups the cache holds."""
        if not self.routed_bytes or self.activations is None:
            return 0
        routed = self.routed_bytes[min(len(self.routed_bytes), tokens * self.activations.experts_per_token) - 1]
        if self.pipelined(tokens) if pipelined is None else pipelined:
            routed = PREFILL_GROUPS_HELD * max(prefill_group_bytes(routed), self.routed_bytes[0])
        group = routed if cache is None else min(routed, cache)
        return self._held(max(0, group - self.layer_bytes))

    @property
    def buffer_bytes(self) -> int:
        return (self._held(self.layer_bytes) + self._held(self.layer_bytes) - self.layer_bytes
                + self._transient(MIN_PREFILL_TOKENS))

    @property
    def minimum_bytes(self) -> int:
        return self.resident_bytes + self.kv_reserve_bytes + self.buffer_bytes + self.layer_bytes

    def _extra(self, tokens: int) -> int:
        """Activations of a chunk beyond those of the smallest one (which the buffers hold)."""
        return self._transient(tokens) - self._transient(MIN_PREFILL_TOKENS)

    def _cache_cost(self, cache: int) -> int:
        """Budget the cache takes beyond one layer's experts (which the minimum holds)."""
        return self._held(cache - self.layer_bytes)

    def largest_cache(self, tokens: int, spare: int, pipelined: bool | None = None,
                      activations: bool = True) -> int | None:
        """The largest cache whose cost and the experts a pass of `tokens` tokens holds outside it
        (_stacked, pipelined) fit `spare` (the budget beyond its minimum) beside that pass's
        activations (activations=False: spare has already left them out), None if not even the
        minimum cache does. A pass of fewer than MIN_PREFILL_TOKENS tokens takes no more
        activations than the buffers hold."""
        room = spare - (max(0, self._extra(tokens)) if activations else 0)
        if room < 0:
            return None
        lo, hi = self.layer_bytes, self.layer_bytes + room + 1  # costs are at least their bytes
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._cache_cost(mid) + self._stacked(tokens, mid, pipelined) <= room:
                lo = mid
            else:
                hi = mid
        return lo

    def _largest_chunk(self, fits) -> int:
        """The largest chunk in [MIN_PREFILL_TOKENS, DEFAULT_PREFILL_TOKENS] for which fits(chunk)
        (fits is monotone: true up to some chunk; the smallest always fits)."""
        lo, hi = MIN_PREFILL_TOKENS, DEFAULT_PREFILL_TOKENS + 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def chunk_bytes(self, tokens: int, keys: int, cache: int | None, pipelined: bool | None = None) -> int:
        """What one forward pass of `tokens` tokens over `keys` keys allocates at its peak beyond the
        resident weights, the expert cache's contents and the KV cache it started with: its
        activations, one layer's routed experts in flight and the routed experts the streaming
        layer holds beyond them (_stacked; what bench/budget_prompts.py --check-formula measures)."""
        return (self._transient(tokens, keys) + self._held(self.layer_bytes)
                + self._stacked(tokens, cache, pipelined))

    def prefill_room(self, tokens: int, cache: int, pipelined: bool | None = None) -> int:
        """Bytes of routed experts, as the cache counts them, that a pass of `tokens` may hold
        outside the expert cache at once: the room the plan keeps for what the streaming layer
        holds there (_stacked, beyond one layer's k) and for one layer's experts in flight. A
        prefill's pipeline holds there the experts it reads without caching them and the stacked
        copy of the group it computes (so that a long prompt need not evict the decode's experts
        to make room), and cuts its groups to 1/PREFILL_GROUPS_HELD of it."""
        return int((self._stacked(tokens, cache, pipelined) + self._held(self.layer_bytes)) / self.held_ratio)

    # ---- plans

    def budget_for_share(self, share: float) -> int:
        """The budget whose expert cache holds `share` of all experts (at least one layer's k),
        with the largest prefill chunk whose activations take no more than that cache."""
        if not 0 < share <= 1:
            raise OptionsError(f"an expert cache share must be in (0, 1], got {share}")
        cache = max(self.layer_bytes, int(share * self.expert_bytes))
        tokens = self._largest_chunk(lambda c: self._extra(c) <= cache)
        return self.minimum_bytes + self._extra(tokens) + self._stacked(tokens, cache) + self._cache_cost(cache)

    def plan(self, budget: int | None) -> MemoryPlan:
        parts = dict(budget_bytes=budget, resident_bytes=self.resident_bytes, kv_reserve_bytes=self.kv_reserve_bytes,
                     kv_tokens=self.kv_tokens, buffer_bytes=self.buffer_bytes, min_layer_bytes=self.layer_bytes,
                     expert_bytes=self.expert_bytes, needs=self)
        if budget is None:
            tokens = DEFAULT_PREFILL_TOKENS
            return MemoryPlan(cache_bytes=None, prefill_tokens=tokens,
                              activation_bytes=self._extra(tokens) + self._stacked(tokens, None), held_extra_bytes=0,
                              **parts)
        if budget < self.minimum_bytes:
            raise BudgetError(
                f"memory budget {fmt_bytes(budget)} is too small: resident weights {fmt_bytes(self.resident_bytes)} + "
                f"KV cache reserve {fmt_bytes(self.kv_reserve_bytes)} ({self.kv_tokens} tokens) + buffers "
                f"{fmt_bytes(self.buffer_bytes)} (one layer's routed experts in flight, the activations of a "
                f"{MIN_PREFILL_TOKENS}-token prefill chunk) + one layer's routed experts {fmt_bytes(self.layer_bytes)} "
                f"need at least {fmt_bytes(self.minimum_bytes)} ({self.minimum_bytes} bytes)"
            )
        spare = budget - self.minimum_bytes

        def fits(tokens: int) -> bool:
            cache = self.largest_cache(tokens, spare)
            return cache is not None and self._extra(tokens) <= cache

        tokens = self._largest_chunk(fits)
        cache = self.largest_cache(tokens, spare)
        return MemoryPlan(cache_bytes=cache, prefill_tokens=tokens,
                          activation_bytes=self._extra(tokens) + self._stacked(tokens, cache),
                          held_extra_bytes=self._cache_cost(cache) - (cache - self.layer_bytes), **parts)

    def prefill_tokens_for(self, prompt_tokens: int, planned: int, cache: int | None) -> int:
        """MemoryPlan.prefill_tokens_for: the largest chunk up to DEFAULT_PREFILL_TOKENS whose
        activations and stacked experts, with attention over at most the prompt's keys, fit what
        the plan keeps for its own chunk plus the KV reserve the prompt leaves unused."""
        prompt_tokens = max(int(prompt_tokens), 1)
        room = self._transient(planned) + self._stacked(planned, cache)
        unused = self.kv_bytes_per_token * max(0, self.kv_tokens - prompt_tokens)

        def holds(tokens: int) -> bool:
            keys = min(prompt_tokens, self.kv_tokens + tokens)
            return self._transient(tokens, keys) + self._stacked(tokens, cache) <= room + unused

        # a prompt's last chunk may be any chunk up to this one: what a chunk holds grows with it on
        # each path, but a few tokens that skip the pipeline (the most that do: `plain`) may hold
        # more than more tokens that take it
        k = self.activations.experts_per_token if self.activations is not None else 1
        plain = (PREFILL_MIN_PAIRS - 1) // max(k, 1)

        def fits(tokens: int) -> bool:
            return holds(tokens) and (not planned < plain < tokens or holds(plain))

        tokens = max(planned, self._largest_chunk(fits))
        return min(tokens, prompt_tokens)


def memory_needs(expert_sizes: dict[tuple[int, int], int], k: int, resident_bytes: int, config: dict,
                 itemsize: int, kv_tokens: int | None = None, held_ratio: float = 1.0) -> MemoryNeeds:
    """expert_sizes: (layer, expert) -> bytes in memory; k: experts per token; itemsize: of the
    compute dtype (the KV cache's); held_ratio: see MemoryNeeds."""
    kv_tokens = DEFAULT_KV_TOKENS if kv_tokens is None else kv_tokens
    if not isinstance(kv_tokens, int) or kv_tokens < 1:
        raise OptionsError(f"max_kv_size must be a positive number of tokens, got {kv_tokens!r}")
    per_token = kv_bytes_per_token(config, itemsize)
    num_experts = max((e + 1 for _, e in expert_sizes), default=0)
    return MemoryNeeds(resident_bytes, per_token, kv_tokens, layer_bytes(expert_sizes, k), sum(expert_sizes.values()),
                       activations(config, k, num_experts, itemsize, per_token), routed_bytes(expert_sizes),
                       max(1.0, float(held_ratio)))


def layer_bytes(expert_sizes: dict[tuple[int, int], int], k: int) -> int:
    """The most one MoE layer's k largest experts take: what one forward pass must hold at once."""
    by_layer: dict[int, list[int]] = {}
    for (layer, _), n in expert_sizes.items():
        by_layer.setdefault(layer, []).append(n)
    return max((sum(sorted(v, reverse=True)[:k]) for v in by_layer.values()), default=0)


def routed_bytes(expert_sizes: dict[tuple[int, int], int]) -> tuple[int, ...]:
    """For n = 1..E: the most bytes one layer's n largest experts take."""
    by_layer: dict[int, list[int]] = {}
    for (layer, _), n in expert_sizes.items():
        by_layer.setdefault(layer, []).append(n)
    out: list[int] = []
    for sizes in by_layer.values():
        total, sums = 0, []
        for n in sorted(sizes, reverse=True):
            total += n
            sums.append(total)
        out = [max(a, b) for a, b in zip(out, sums, strict=False)] + out[len(sums):] + sums[len(out):]
    return tuple(out)


def kv_bytes_per_token(config: dict, itemsize: int) -> int:
    """An estimate from the config: keys and values of every attention layer (MLA and linear
    attention layers keep less, so this errs on the safe side)."""
    cfg = config.get("text_config", config)
    layers = int(cfg.get("num_hidden_layers", 0))
    heads = int(cfg.get("num_key_value_heads") or cfg.get("num_attention_heads") or 0)
    head_dim = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // max(1, cfg.get("num_attention_heads", 1)))
    if cfg.get("kv_lora_rank"):  # MLA: mlx-lm caches the expanded keys and values per head
        head_dim = int(cfg.get("qk_nope_head_dim", 0)) + int(cfg.get("qk_rope_head_dim", 0))
        heads = int(cfg.get("num_attention_heads", 0))
    return 2 * layers * heads * int(head_dim) * itemsize


def _int(cfg: dict, *keys: str, default: int = 0) -> int:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def fused_attention(head_dim: int) -> bool:
    """Whether MLX's fast SDPA runs fused for a prefill (no scores in memory): on Metal, for head
    dims 64, 80 and 128 (mlx/backend/metal/scaled_dot_product_attention.cpp, use_fallback). The CPU
    backend always runs the unfused ops; the CUDA backend does for prefills in some versions, so it
    is counted as unfused (the safe side)."""
    return mx.default_device() == mx.gpu and mx.metal.is_available() and head_dim in (64, 80, 128)


def activations(config: dict, k: int, num_experts: int, itemsize: int, kv_per_token: int) -> Activations:
    """The sizes Activations needs, from the config (its text_config for multimodal models)."""
    cfg = config.get("text_config", config)
    hidden = _int(cfg, "hidden_size", "d_model", "n_embd")
    heads = _int(cfg, "num_attention_heads", "n_head", default=1)
    kv_heads = _int(cfg, "num_key_value_heads", default=heads)
    head_dim = _int(cfg, "head_dim", default=hidden // heads if heads else 0)
    if cfg.get("kv_lora_rank"):  # MLA: per head, keys of nope + rope dims, values of v_head_dim
        head_dim = max(_int(cfg, "qk_nope_head_dim") + _int(cfg, "qk_rope_head_dim"), _int(cfg, "v_head_dim"))
        kv_heads = heads
    head_dim = max(head_dim, _int(cfg, "v_head_dim"))
    expert = _int(cfg, "moe_intermediate_size", "expert_intermediate_size", "intermediate_size", default=4 * hidden)
    shared = _int(cfg, "shared_expert_intermediate_size")
    if not shared and _int(cfg, "n_shared_experts", "num_shared_experts"):
        shared = _int(cfg, "n_shared_experts", "num_shared_experts") * expert
    dense = _int(cfg, "intermediate_size", default=expert)
    vocab = _int(cfg, "vocab_size", default=_int(config, "vocab_size"))
    return Activations(_int(cfg, "num_hidden_layers", "num_layers", default=1), hidden, heads, kv_heads, head_dim, k,
                       num_experts, expert, shared, dense, vocab, itemsize, kv_per_token, fused_attention(head_dim))

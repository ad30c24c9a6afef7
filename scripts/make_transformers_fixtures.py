"""Generate the transformers-written MoE test fixtures (tests/fixtures/transformers/<model_type>/).

Each fixture is a tiny random model built by transformers itself and written by its own
`save_pretrained` (bf16, transformers' defaults: nothing converted or renamed), plus a synthetic
tokenizer and `reference.safetensors` holding `input_ids` [1, T] int32 and transformers' fp32
`logits` [1, T, vocab] computed on exactly the bf16-rounded weights that were saved.

    python scripts/make_transformers_fixtures.py [--out tests/fixtures/transformers] [--only fam1,fam2]

Needs torch (CPU wheel) and transformers; tests never import this script (CI has no torch).
Deterministic: fixed seeds, so re-running rewrites the same fixtures. Each family's folder is built
in a temporary folder, checked (finite logits, decisive routing, transformers reloads its own folder
and reproduces the logits), then swapped in.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import CONFIG_MAPPING

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing moestream

T = 24  # reference sequence length
VOCAB = 320  # the synthetic tokenizer's vocabulary
E, K = 8, 2  # routed experts, experts per token
WEIGHT_STD, NORM_STD = 0.2, 0.05
INIT_SEED, WEIGHT_SEED, IDS_SEED = 0, 1, 2

# Applied to a (text) config only where its class has the field: hidden 64, expert intermediate 16,
# dense intermediate 48, shared-expert intermediate 24, 4 heads / 2 KV heads of 16.
BASE = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
    num_experts_per_tok=K, num_experts=E, num_local_experts=E, n_routed_experts=E, moe_num_experts=E,
    n_shared_experts=1, num_shared_experts=1, moe_num_shared_experts=1,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
MLA = dict(q_lora_rank=40, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=16,
           num_key_value_heads=4)
QWEN_VISION = dict(depth=1, hidden_size=16, intermediate_size=40, num_heads=2, patch_size=2,
                   out_hidden_size=64, num_position_embeddings=16)
EXPERT_IN_INTERMEDIATE = dict(num_hidden_layers=2, intermediate_size=16)  # mixtral-style: all layers MoE

# Per family (transformers model_type): the transformers class and config overrides ("config"; for a
# VL wrapper "text" for its text_config, "vision", "top", and "text_type" where text_config is resolved
# through AutoConfig); "std" overrides the weight std by parameter-name regex.
FAMILIES: dict[str, dict] = {
    # ---- required ----
    "qwen3_moe": dict(cls="Qwen3MoeForCausalLM", config=dict(mlp_only_layers=[0], norm_topk_prob=True)),
    "qwen3_5_moe": dict(
        cls="Qwen3_5MoeForConditionalGeneration",
        text=dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                  linear_value_head_dim=16),
        vision=QWEN_VISION),
    "mixtral": dict(cls="MixtralForCausalLM", config=EXPERT_IN_INTERMEDIATE),
    "olmoe": dict(cls="OlmoeForCausalLM", config=EXPERT_IN_INTERMEDIATE),
    "deepseek_v3": dict(cls="DeepseekV3ForCausalLM",
                        config=dict(MLA, first_k_dense_replace=1, n_group=2, topk_group=1)),
    "gpt_oss": dict(
        cls="GptOssForCausalLM",
        config=dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                    intermediate_size=16, num_hidden_layers=2, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0,
                                         original_max_position_embeddings=4096, beta_fast=32.0,
                                         beta_slow=1.0, truncate=False))),
    "qwen3_next": dict(
        cls="Qwen3NextForCausalLM",
        config=dict(layer_types=["linear_attention", "full_attention", "linear_attention"], mlp_only_layers=[0],
                    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                    linear_value_head_dim=16)),
    "glm4_moe": dict(cls="Glm4MoeForCausalLM", config=dict(first_k_dense_replace=1, use_qk_norm=True)),
    "deepseek_v2": dict(
        cls="DeepseekV2ForCausalLM",
        config=dict(MLA, first_k_dense_replace=1, max_position_embeddings=512,
                    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                         original_max_position_embeddings=128, beta_fast=32, beta_slow=1,
                                         mscale=0.707, mscale_all_dim=0.707))),
    "llama4": dict(
        cls="Llama4ForConditionalGeneration",
        # 4 layers, MoE on 1 and 3 (interleaved like Maverick), NoPE on layer 3, chunked attention (16 < T)
        text=dict(num_hidden_layers=4, num_experts_per_tok=1, intermediate_size=16, intermediate_size_mlp=48,
                  interleave_moe_layer_step=2, attention_chunk_size=16, no_rope_layers=[1, 1, 1, 0]),
        vision=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40,
                    vision_output_dim=64, image_size=16, patch_size=4, projector_input_dim=64,
                    projector_output_dim=64)),
    "ernie4_5_moe": dict(cls="Ernie4_5_MoeForCausalLM", config=dict(moe_layer_start_index=1)),
    # ---- optional, committed ----
    "qwen3_vl_moe": dict(
        cls="Qwen3VLMoeForConditionalGeneration",
        text=dict(mlp_only_layers=[0], rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                             mrope_section=[4, 2, 2])),
        vision=dict(QWEN_VISION, deepstack_visual_indexes=[])),
    "granitemoe": dict(cls="GraniteMoeForCausalLM",
                       config=dict(EXPERT_IN_INTERMEDIATE, embedding_multiplier=4.0, attention_multiplier=0.125,
                                   residual_multiplier=0.5, logits_scaling=2.0)),
    "gemma4": dict(
        cls="Gemma4ForConditionalGeneration",
        text=dict(num_hidden_layers=2, enable_moe_block=True, top_k_experts=K, global_head_dim=16,
                  hidden_size_per_layer_input=0, vocab_size_per_layer_input=VOCAB,
                  layer_types=["sliding_attention", "full_attention"]),  # every layer: dense MLP + MoE
        vision=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=16, patch_size=2, position_embedding_size=16),
        top=dict(audio_config=None),
        # its router scales its input by 1/sqrt(hidden): x8 keeps its logits as spread as the others'
        std={r"router\.proj\.weight": WEIGHT_STD * 8}),
    "nemotron_h": dict(
        cls="NemotronHForCausalLM",
        config=dict(num_hidden_layers=4, layers_block_type=["mamba", "moe", "attention", "moe"],
                    mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=1, chunk_size=16,
                    moe_shared_expert_intermediate_size=24)),
    "mistral4": dict(cls="Mistral4ForCausalLM", config=dict(MLA, first_k_dense_replace=1)),
    "kimi_k25": dict(
        cls="Kimi_K25ForConditionalGeneration", text_type="deepseek_v3",
        text=dict(MLA, first_k_dense_replace=1, n_group=2, topk_group=1),
        vision=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, patch_size=2,
                    pos_emb_height=4, pos_emb_width=4, pos_emb_time=1),
        top=dict(projection_hidden_size=64)),
    "longcat_flash": dict(cls="LongcatFlashForCausalLM",
                          config=dict(MLA, head_dim=8, num_layers=2, moe_topk=K, zero_expert_num=2,
                                      expert_ffn_hidden_size=16, ffn_hidden_size=48)),
    "lfm2_moe": dict(cls="Lfm2MoeForCausalLM",
                     config=dict(num_dense_layers=1, layer_types=["conv", "full_attention", "conv"])),
    "minimax_m2": dict(cls="MiniMaxM2ForCausalLM", config=EXPERT_IN_INTERMEDIATE),
    "jamba": dict(cls="JambaForCausalLM",
                  config=dict(EXPERT_IN_INTERMEDIATE, attn_layer_period=2, attn_layer_offset=1,  # mamba, attention
                              expert_layer_period=1, expert_layer_offset=0, mamba_dt_rank=8)),
    "laguna": dict(cls="LagunaForCausalLM", config=dict(mlp_layer_types=["dense", "sparse", "sparse"])),
    # ---- optional, built and checked the same way but not committed (see EXTRA) ----
    "qwen2_moe": dict(cls="Qwen2MoeForCausalLM", config=dict(num_hidden_layers=2)),  # mlx-lm: all layers MoE
    "phimoe": dict(cls="PhimoeForCausalLM",
                   config=dict(EXPERT_IN_INTERMEDIATE, attention_bias=True, lm_head_bias=True)),
    "mellum": dict(cls="MellumForCausalLM", config=dict(num_hidden_layers=2)),
    "solar_open": dict(cls="SolarOpenForCausalLM", config=dict(num_hidden_layers=2)),  # every layer MoE
    "dots1": dict(cls="Dots1ForCausalLM", config=dict(first_k_dense_replace=1)),
    "afmoe": dict(cls="AfmoeForCausalLM", config=dict(num_dense_layers=1, global_attn_every_n_layers=3)),
    "exaone_moe": dict(cls="ExaoneMoeForCausalLM", config=dict(first_k_dense_replace=1)),
    "glm4_moe_lite": dict(cls="Glm4MoeLiteForCausalLM",
                          config=dict(MLA, mlp_layer_types=["dense", "sparse", "sparse"])),
    "granitemoehybrid": dict(
        cls="GraniteMoeHybridForCausalLM",
        config=dict(EXPERT_IN_INTERMEDIATE, layer_types=["mamba", "attention"], shared_intermediate_size=24,
                    mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16)),
    "deepseek_v32": dict(cls="DeepseekV32ForCausalLM",
                         config=dict(MLA, first_k_dense_replace=1, n_group=2, topk_group=1, index_n_heads=2,
                                     index_head_dim=16, index_topk=64)),  # index_topk > T: indexer keeps all
    "glm_moe_dsa": dict(cls="GlmMoeDsaForCausalLM",
                        config=dict(MLA, first_k_dense_replace=1, index_n_heads=2, index_head_dim=16,
                                    index_topk=64)),
}
# Left out of the default run, and so of the repo: the fixtures must stay under 8 MB in all, and these
# add the least (their checkpoint layouts mostly repeat a committed family's). Generate them with --only.
EXTRA = ("qwen2_moe", "phimoe", "mellum", "solar_open", "dots1", "afmoe", "exaone_moe", "glm4_moe_lite",
         "granitemoehybrid", "deepseek_v32", "glm_moe_dsa")
EXTRA_REASON = "builds and passes the same checks; not committed, to keep the fixtures under 8 MB"


def config_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} | set(getattr(cls, "attribute_map", {}))


def known(cls, *overrides: dict) -> dict:
    """BASE restricted to the fields `cls` has, then the overrides (never dropped)."""
    fields = config_fields(cls)
    out = {k: v for k, v in BASE.items() if k in fields}
    for o in overrides:
        out.update(o)
    return out


def build_config(name: str, spec: dict):
    cls = CONFIG_MAPPING[name]
    if "text" not in spec:
        return cls(**known(cls, spec.get("config", {})))
    text_type = spec.get("text_type")
    text_cls = CONFIG_MAPPING[text_type] if text_type else cls.sub_configs["text_config"]
    text = known(text_cls, spec["text"], {"model_type": text_type} if text_type else {})
    return cls(text_config=text, vision_config=spec["vision"], **spec.get("top", {}))


def build_model(name: str, spec: dict):
    config = build_config(name, spec)
    torch.manual_seed(INIT_SEED)
    return getattr(transformers, spec["cls"])(config).eval()


def is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower()


def randomize(model, spec: dict) -> None:
    """Every floating tensor of the saved state (parameters, and persistent buffers such as
    e_score_correction_bias) gets N(0, 0.2), except: norm scales/biases get init + N(0, 0.05) (so
    zero-centred norms stay zero-centred); other tensors initialised to all ones (Mamba D, linear-
    attention dt_bias, gemma4 router scales …) get 1 + N(0, 0.2); spec["std"] overrides by name."""
    g = torch.Generator().manual_seed(WEIGHT_SEED)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.dtype.is_floating_point:
                continue
            noise = torch.randn(t.shape, generator=g).to(t.dtype)
            std = next((v for k, v in spec.get("std", {}).items() if re.search(k, name)), None)
            if std is not None:
                t.copy_(std * noise)
            elif is_norm(modules[name.rsplit(".", 1)[0]]):
                t.add_(NORM_STD * noise)
            elif bool((t == 1).all()):
                t.copy_(1 + WEIGHT_STD * noise)
            else:
                t.copy_(WEIGHT_STD * noise)


def round_to_bf16(model) -> None:
    """Round the saved state (parameters, persistent buffers) through bf16, in place; non-persistent
    buffers such as rotary inv_freq stay as computed in fp32, as a loader recomputes them."""
    with torch.no_grad():
        for t in model.state_dict(keep_vars=True).values():
            if t.is_floating_point():
                t.copy_(t.to(torch.bfloat16).to(t.dtype))


def forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model, transformers.Llama4ForConditionalGeneration):
        # transformers 5.24 bug: its forward reads a missing `image_outputs` after computing the
        # logits; with text only, that forward is exactly its language model's
        model = model.language_model
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def text_config(config):
    return config.get_text_config()


def model_top_k(config) -> int:
    t = text_config(config)
    return int(next(getattr(t, k) for k in ("num_experts_per_tok", "top_k_experts") if getattr(t, k, None)))


def model_experts(config) -> int:
    t = text_config(config)
    keys = ("num_experts", "num_local_experts", "n_routed_experts")
    return int(next(getattr(t, k) for k in keys if getattr(t, k, None)))


def routing_stats(model, ids: torch.Tensor) -> dict:
    """Router decisiveness over every token and MoE layer: the smallest mean top-k probability mass
    (uniform routing gives k/E) and the smallest gap between the k-th and (k+1)-th router logits
    (a near-tie would let rounding noise pick another expert). Routers are the innermost modules
    named `gate`/`router` whose output carries an [*, E] tensor (logits, or probabilities)."""
    n_experts, k = model_experts(model.config), model_top_k(model.config)
    found, hooks = {}, []

    def hook(name):
        def fn(_module, _inputs, out):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if torch.is_tensor(t) and t.is_floating_point() and t.shape[-1] >= n_experts:
                    found[name] = t.detach().reshape(-1, t.shape[-1])[:, :n_experts].float()
                    return
        return fn

    for name, module in model.named_modules():
        if re.search(r"(^|\.)(gate|router)$", name):
            hooks.append(module.register_forward_hook(hook(name)))
    forward_logits(model, ids)
    for h in hooks:
        h.remove()
    masses, gaps = [], []
    for name, scores in found.items():
        if any(other.startswith(name + ".") for other in found):
            continue  # an outer block; its inner router is measured
        is_prob = bool((scores >= 0).all() and torch.allclose(scores.sum(-1), torch.ones(1), atol=1e-4))
        logits = scores.clamp_min(1e-30).log() if is_prob else scores
        top = logits.sort(dim=-1, descending=True).values
        masses.append(float(logits.softmax(-1).sort(dim=-1, descending=True).values[:, :k].sum(-1).mean()))
        gaps.append(float((top[:, k - 1] - top[:, k]).min()))
    return dict(routers=len(masses), uniform=k / n_experts, min_mass=min(masses), min_gap=min(gaps))


def truncate_effect(model, ids: torch.Tensor, logits: torch.Tensor) -> float:
    """How far transformers' logits move if YaRN truncated its correction range (truncate: true)."""
    config = copy.deepcopy(model.config)
    config.rope_parameters = dict(config.rope_parameters, truncate=True)
    other = type(model)(config).eval()
    other.load_state_dict(model.state_dict())
    return rel_l2(forward_logits(other, ids), logits)


def reference_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(IDS_SEED))


def make_fixture(name: str, spec: dict, out: Path) -> dict:
    from moestream.stages.synth_tokenizer import write_tokenizer

    model = build_model(name, spec)
    randomize(model, spec)
    round_to_bf16(model)  # the reference sees exactly the bf16 weights that are saved
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp)
    write_tokenizer(tmp)
    ids = reference_ids()
    logits = forward_logits(model, ids)
    assert torch.isfinite(logits).all(), f"{name}: non-finite logits"
    save_file({"input_ids": ids.to(torch.int32).contiguous(), "logits": logits.contiguous()},
              str(tmp / "reference.safetensors"))

    reloaded = type(model).from_pretrained(tmp, dtype=torch.float32).eval()
    reload_err = rel_l2(forward_logits(reloaded, ids), logits)
    assert reload_err < 1e-5, f"{name}: transformers' reload differs by {reload_err:.2e}"
    routing = routing_stats(model, ids)
    assert routing["min_mass"] > 1.5 * routing["uniform"] and routing["min_gap"] > 1e-4, f"{name}: {routing}"
    info = dict(cls=type(model).__name__, reload_rel_l2=reload_err, routing=routing)
    if name == "gpt_oss":
        info["truncate_rel_l2"] = truncate_effect(model, ids, logits)
        assert info["truncate_rel_l2"] > 1e-2, f"{name}: YaRN truncate hardly matters: {info}"
    swap_in(tmp, out / name)
    return info


def swap_in(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def moe_layers(folder: Path) -> list[int]:
    with open(folder / "model.safetensors", "rb") as f:
        keys = json.loads(f.read(int.from_bytes(f.read(8), "little"))).keys()
    pattern = r"\.(?:layers|blocks)\.(\d+)\..*(?:experts|input_linear)"
    return sorted({int(m.group(1)) for k in keys if (m := re.search(pattern, k))})


def write_readme(out: Path) -> None:
    rows, total = [], 0
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cfg = json.loads((folder / "config.json").read_text())
        conf = transformers.AutoConfig.from_pretrained(folder)
        # longcat counts num_layers of two sublayers each; nemotron_h derives its count from layer types
        n_layers = cfg.get("num_layers") or text_config(conf).num_hidden_layers
        size = sum(f.stat().st_size for f in folder.iterdir())
        total += size
        rows.append(f"| {folder.name} | {cfg['architectures'][0]} | {n_layers} | {len(moe_layers(folder))} "
                    f"| {model_experts(conf)} | {model_top_k(conf)} | {size / 1000:.0f} kB |")
    extra = "\n".join(f"- {n}: {EXTRA_REASON} (`--only {n}`)" for n in EXTRA)
    (out / "README.md").write_text(f"""# Transformers-written MoE fixtures

The correctness reference for every supported MoE family. Each folder holds what transformers' own
`save_pretrained` writes for a tiny random model (bf16, transformers' defaults: nothing converted or
renamed), the synthetic tokenizer (`moestream.stages.synth_tokenizer.write_tokenizer`, vocab {VOCAB}),
and `reference.safetensors`: `input_ids` int32 [1, {T}] and `logits` float32 [1, {T}, {VOCAB}], transformers'
fp32 forward pass (eval, no attention mask, no cache) on exactly the bf16 weights saved. Weights are
N(0, {WEIGHT_STD}), norm scales init + N(0, {NORM_STD}), tensors initialised to ones (Mamba D, dt_bias,
router scales) 1 + N(0, {WEIGHT_STD}); router/expert biases, attention sinks and correction biases are
randomised too, so a loader that drops one fails. No parameter was kept at its init. Each fixture was
checked: finite logits, decisive routing, and transformers reloads its own folder to the same logits.

Regenerate (needs torch, CPU wheel: `pip install torch=={torch.__version__.split('+')[0]}`):

    python scripts/make_transformers_fixtures.py --out tests/fixtures/transformers [--only fam1,fam2]

Generated with transformers {transformers.__version__}, torch {torch.__version__}.

| family | transformers class | layers | MoE layers | E | top-k | size |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Total: {total / 1000:.0f} kB.

Tried and not committed:
{extra}
""")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests/fixtures/transformers")
    ap.add_argument("--only", default="", help=f"comma-separated model_types (default: all but {', '.join(EXTRA)})")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or [n for n in FAMILIES if n not in EXTRA]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        ap.error(f"unknown families: {unknown}")
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        try:
            info = make_fixture(name, FAMILIES[name], args.out)
        except Exception as e:  # report it and go on with the other families
            failed.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            continue
        r = info["routing"]
        extra = f"; truncate:true moves logits by rel-L2 {info['truncate_rel_l2']:.2e}" if name == "gpt_oss" else ""
        print(f"OK {name} ({info['cls']}): reload rel-L2 {info['reload_rel_l2']:.1e}; {r['routers']} routers, "
              f"top-k mass >= {r['min_mass']:.2f} (uniform {r['uniform']:.2f}), "
              f"k-th/(k+1)-th logit gap >= {r['min_gap']:.1e}{extra}", flush=True)
    write_readme(args.out)
    if failed:
        sys.exit(f"failed: {failed}")


if __name__ == "__main__":
    main()

"""Write a random-weight MoE checkpoint in the Hugging Face layout (config, tokenizer, safetensors
shards), for tests and benchmarks: real architectures and shapes, no download."""

EXAMPLES = """examples:
  moestream synth qwen3_moe --out ck/q3-tiny
  moestream synth qwen3_5_moe --out ck/a397b --preset a397b --layers 2   # Qwen3.5-397B layer shapes"""


def add_arguments(p) -> None:
    from moestream.stages.synth import PRESETS, SUPPORTED_FAMILIES

    from .options import positive_int

    p.add_argument("family", choices=SUPPORTED_FAMILIES, help="the model family")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--preset", default="tiny", choices=tuple(PRESETS),
                   help="tiny (tests), small (CPU benchmarks), a397b (Qwen3.5-397B layer shapes)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    p.add_argument("--layers", type=positive_int, default=None, help="number of layers (default: the preset's; a397b: 2)")


def run(args) -> None:
    from moestream.stages.synth import synth_checkpoint

    r = synth_checkpoint(args.family, args.out, preset=args.preset, seed=args.seed, layers=args.layers)
    print(f"wrote {r.path}: {r.family} {args.preset}, {r.total_bytes / 1e6:.1f} MB ({r.expert_bytes / 1e6:.1f} MB experts)")

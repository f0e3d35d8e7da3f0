"""The ``finetune`` command. Training commands (fit/validate/test/predict) arrive with the training core."""

import argparse
import sys
import tempfile
import time


def demo(args: argparse.Namespace) -> int:
    """Converts a small random Hugging Face LLaMA into our from-scratch model and checks they agree."""
    import torch
    import transformers

    from finetune.generation import generate
    from finetune.models import from_hf, to_hf

    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # wider than HF's 0.02, so the random model's greedy output varies
        bos_token_id=1,
        eos_token_id=2,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(f"{tmp}/hf")
        ours = from_hf(f"{tmp}/hf")
        print(
            f"loaded {type(ours).__name__} from a Hugging Face folder: {sum(p.numel() for p in ours.parameters()):,} "
            "parameters"
        )
        prompts = torch.randint(3, config.vocab_size, (2, 12))
        mask = torch.ones_like(prompts)
        mask[1, :4] = 0  # the second prompt is shorter: left padding
        with torch.no_grad():
            diff = (ours(prompts) - hf(prompts).logits).abs().max().item()
        print(f"max |logits - transformers logits| = {diff:.2e}")
        t0 = time.perf_counter()
        out = generate(ours, prompts, mask, max_new_tokens=args.max_new_tokens)
        ours_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = hf.generate(
            prompts,
            attention_mask=mask,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            min_new_tokens=args.max_new_tokens,
            pad_token_id=0,
            eos_token_id=None,
        )
        hf_s = time.perf_counter() - t0
        same = torch.equal(out, ref)
        print(f"greedy tokens (ours):         {out[0, -args.max_new_tokens :].tolist()}")
        print(f"greedy tokens (transformers): {ref[0, -args.max_new_tokens :].tolist()}")
        print(f"identical: {same}; generation {ours_s:.2f}s (ours) vs {hf_s:.2f}s (transformers)")
        to_hf(ours, f"{tmp}/export")
        back = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/export")
        with torch.no_grad():
            rt = (back(prompts).logits - hf(prompts).logits).abs().max().item()
        print(f"round trip ours -> to_hf -> transformers: max |diff| = {rt:.2e}")
    return 0 if same and diff < 1e-4 and rt < 1e-4 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="convert a small random HF LLaMA, check parity, generate")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

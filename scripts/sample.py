"""
Sample text from a checkpoint.

    python scripts/sample.py --ckpt out/quickstart-kromhc-n4-s1337 --prompt "The list type" \\
        --num-samples 3 --max-new-tokens 100 --temperature 0.8 --top-k 200 --seed 1337
    python scripts/sample.py --ckpt out/run/ckpt.pt --prompt FILE:prompt.txt

An empty prompt starts from <|endoftext|>, i.e. a fresh document. --temperature 0 is greedy
decoding (the most likely token at every step; --top-k and --seed then play no part); a negative
temperature is refused. Sampling is reproducible for a given --seed on a given device. A prompt
longer than the model's block_size keeps its last block_size tokens (with a notice). A bar on stderr
counts the tokens generated.
"""

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import runtime  # noqa: E402
from checkpoint import load_model, load_tokenizer  # noqa: E402
from common import HelpFormatter, non_negative_int, positive_int, run_cli  # noqa: E402
from errors import ConfigError  # noqa: E402


def decode(enc, ids):
    """Text of ids; ids beyond the tokenizer's vocabulary (the padded rows of the embedding) are dropped."""
    return enc.decode([i for i in ids if i < enc.n_vocab])


@torch.no_grad()
def sample(model, enc, prompt, num_samples, max_new_tokens, temperature, top_k, seed, device, ctx=None):
    """-> list of num_samples generated texts (prompt excluded), with a progress bar on stderr."""
    ids = enc.encode_ordinary(prompt) if prompt else [enc.eot_token]
    block_size = model.config.block_size
    if len(ids) > block_size:
        print(f"note: the prompt has {len(ids)} tokens; keeping its last {block_size} (the model's block_size)",
              file=sys.stderr)
        ids = ids[-block_size:]
    x = torch.tensor(ids, dtype=torch.long, device=device)[None].repeat(num_samples, 1)
    torch.manual_seed(seed)  # every device's generator, CUDA's included
    with ctx or nullcontext():  # a token at a time, for the progress bar: the same draws as one generate() call
        for _ in tqdm(range(max_new_tokens), desc=f"sampling {num_samples} x {max_new_tokens} tokens", unit="tok",
                      file=sys.stderr):
            x = model.generate(x, 1, temperature=temperature, top_k=top_k)
    return [decode(enc, row[len(ids):].tolist()) for row in x]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint file, or the run directory holding ckpt.pt")
    ap.add_argument("--prompt", default="", help="text to continue, or FILE:path to read it from a file")
    ap.add_argument("--num-samples", type=positive_int, default=3, help="texts to generate (in one batch)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=100, help="tokens generated per text")
    ap.add_argument("--temperature", type=float, default=0.8, help="softmax temperature, >= 0 (0: greedy)")
    ap.add_argument("--top-k", type=non_negative_int, default=200, help="keep the k most likely tokens (0: all)")
    ap.add_argument("--seed", type=int, default=1337, help="sampling seed")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    args = ap.parse_args(argv)
    if not args.temperature >= 0:  # a negative one favours the least likely tokens; nan compares False
        ap.error(f"argument --temperature: must be >= 0 (0: greedy), got {args.temperature}")
    return run_cli(lambda: _main(args), "sample.py")


def _main(args):
    rt = runtime.for_script(args.device, args.dtype)
    prompt = args.prompt
    if prompt.startswith("FILE:"):
        try:
            prompt = Path(prompt[5:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--prompt {args.prompt}: cannot read the prompt file ({e}); pass a readable "
                             f"UTF-8 text file after FILE:") from None
    model, meta = load_model(args.ckpt, rt.device)
    cfg = meta["model_config"]
    print(f"# {cfg['scheme']} n={cfg['n_streams']}, step {meta.get('step')}, temperature {args.temperature}, "
          f"top-k {args.top_k or 'all'}, seed {args.seed}")
    texts = sample(model, load_tokenizer(meta), prompt, args.num_samples, args.max_new_tokens, args.temperature,
                   args.top_k or None, args.seed, rt.device, rt.autocast())
    for text in texts:
        print(prompt + text)
        print("-" * 80)
    return texts


if __name__ == "__main__":
    main()

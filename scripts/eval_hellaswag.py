"""
HellaSwag accuracy of a checkpoint, scored as nanoGPT / llm.c score it.

Every item has a context and 4 candidate endings. Each ending is appended to the context
(tokenized as " " + ending, the way GPT-2 sees running text) and scored by the model's
cross-entropy on the ending's tokens only:
    acc_norm   argmin over endings of the MEAN loss per ending token ("completion style",
               length-normalized): the number nanoGPT, llm.c and the KromHC paper report
    acc        argmin of the SUM of the ending's losses
Reference: OpenAI's GPT-2 124M scores acc 0.2859, acc_norm 0.2955 on the 10,042 validation
items this way (llm.c); KromHC reports 0.364 at 12 layers, C = 768.

    python scripts/eval_hellaswag.py --ckpt out/quickstart-kromhc-n4-s1337        # a run dir or ckpt.pt
    python scripts/eval_hellaswag.py --ckpt out/run/ckpt.pt --data-file hellaswag_val.jsonl
    torchrun --standalone --nproc_per_node=8 scripts/eval_hellaswag.py --ckpt out/run

Data: the official jsonl (github.com/rowanz/hellaswag), downloaded once into
$HCGPT_CACHE_DIR/hellaswag (default ~/.cache/hcgpt/hellaswag). On a node without network,
copy hellaswag_val.jsonl there or pass --data-file. Results go to <run dir>/hellaswag.json
(read by scripts/plot_runs.py for the results table) unless --out says otherwise.

The scoring is evals/hellaswag.py's (train.py's --hellaswag and final_hellaswag use the same):
    from evals.hellaswag import load_examples, evaluate_hellaswag
    res = evaluate_hellaswag(raw_model, load_examples(limit=1000), device, ctx=autocast_ctx)
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import runtime  # noqa: E402
from checkpoint import load_model, load_tokenizer, resolve as resolve_ckpt  # noqa: E402
from common import HelpFormatter, positive_int, run_cli  # noqa: E402
from evals.hellaswag import download, evaluate_hellaswag, load_examples  # noqa: E402
from evals.results import save_hellaswag  # noqa: E402
from rundir import check_output_arg  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint file, or the run directory holding ckpt.pt")
    ap.add_argument("--data-file", default=None, help="local HellaSwag jsonl (default: download once and cache)")
    ap.add_argument("--split", default="val", choices=["val", "train"])
    ap.add_argument("--limit", type=positive_int, default=None, help="only the first N >= 1 items (default: all)")
    ap.add_argument("--batch-size", type=positive_int, default=8, help="items per forward pass (4 rows each)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast dtype")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--out", default=None, help="results JSON (default: <run dir>/hellaswag.json; '-' for none)")
    args = ap.parse_args(argv)
    ckpt = resolve_ckpt(args.ckpt)
    if args.out is None and ckpt.is_file():  # a missing checkpoint is named later
        args.out = ckpt.parent / "hellaswag.json"
    check_output_arg(ap, "--out", args.out, "hellaswag.json")
    return run_cli(lambda: _main(args), "eval_hellaswag.py")


def _main(args):
    rt = runtime.for_script(args.device, args.dtype)
    device, rank, world_size = rt.device, rt.rank, rt.world_size
    try:
        if args.data_file is None and rank == 0:
            download(args.split)  # one process downloads, the others wait at the barrier
        rt.barrier()
        examples = load_examples(args.data_file, args.split, args.limit)
        model, meta = load_model(args.ckpt, device)
        if args.compile:
            model = torch.compile(model)
        t0 = time.time()
        res = evaluate_hellaswag(model, examples, device, enc=load_tokenizer(meta), batch_size=args.batch_size,
                                 ctx=rt.autocast(), rank=rank, world_size=world_size)
        if rank == 0:
            print(f"hellaswag {args.split}: {res['n']} items | acc_norm {res['acc_norm']:.4f} | acc {res['acc']:.4f} "
                  f"| step {meta.get('step')} | {time.time() - t0:.1f}s on {world_size} process(es)")
            if args.out != "-":
                save_hellaswag(args.out, res, args.split, args.data_file or download(args.split), meta.get("step"),
                               meta.get("tokens"), resolve_ckpt(args.ckpt))
        return res
    finally:
        rt.close()


if __name__ == "__main__":
    main()

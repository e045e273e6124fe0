"""
CORE score of a checkpoint: the 22 DCLM "core" in-context-learning tasks (arXiv 2406.11794),
evaluated the way nanochat evaluates them.

Each task is one of three types, all scored from the model's per-token cross-entropy:
    multiple_choice    context + each choice; the choice with the lowest mean loss over its
                       tokens (the tokens after the choices' common prefix) is the prediction
    schema             each context option + the same continuation; the option under which
                       the continuation (the common suffix) has the lowest mean loss wins
    language_modeling  context + continuation; correct when greedy decoding reproduces every
                       continuation token (argmax at each position)
Prompts: num_fewshot solved examples (drawn with random.Random(1234 + item index) from the
other items) each followed by a blank line, then the item; <|endoftext|> is prepended as BOS.
Items are shuffled with random.Random(1337) before --max-per-task crops them.
Per task, centred accuracy = (acc - b) / (1 - b) with b the random baseline from
eval_meta_data.csv (given in percent there); CORE = the mean centred accuracy over the 22 tasks.

The eval bundle (core.yaml, eval_meta_data.csv, eval_data/**.jsonl, from the MosaicML Eval
Gauntlet, as packaged for nanochat) is read from a local directory:

    python scripts/eval_core.py --ckpt out/run --bundle-dir /path/to/eval_bundle
    python scripts/eval_core.py --ckpt out/run --download          # fetch the bundle once (~160 MB unpacked)
    torchrun --standalone --nproc_per_node=8 scripts/eval_core.py --ckpt out/run --bundle-dir ...

Default bundle directory: $HCGPT_CACHE_DIR/eval_bundle (~/.cache/hcgpt/eval_bundle). Results go
to <run dir>/core.json unless --out says otherwise.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import runtime  # noqa: E402
from checkpoint import load_model, load_tokenizer, resolve as resolve_ckpt  # noqa: E402
from common import HelpFormatter, run_cli  # noqa: E402
from errors import ConfigError  # noqa: E402
from evals.core import (EVAL_BUNDLE_URL, core_line, default_bundle_dir, download_bundle, evaluate_core,  # noqa: E402
                        load_bundle, select_tasks)
from evals.results import save_core  # noqa: E402
from rundir import check_output_arg  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint file, or the run directory holding ckpt.pt")
    ap.add_argument("--bundle-dir", default=None, help=f"unpacked eval bundle (default: {default_bundle_dir()})")
    ap.add_argument("--download", action="store_true", help=f"fetch {EVAL_BUNDLE_URL} into the bundle dir if missing")
    ap.add_argument("--tasks", default=None, help="comma-separated task labels (default: all in core.yaml)")
    ap.add_argument("--max-per-task", type=int, default=-1,
                    help="crop every task to N >= 1 items (-1: all; a quick look)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--out", default=None, help="results JSON (default: <run dir>/core.json; '-' for none)")
    args = ap.parse_args(argv)
    ckpt = resolve_ckpt(args.ckpt)
    if args.out is None and ckpt.is_file():  # a missing checkpoint is named later
        args.out = ckpt.parent / "core.json"
    check_output_arg(ap, "--out", args.out, "core.json")
    if args.max_per_task == 0 or args.max_per_task < -1:
        ap.error(f"argument --max-per-task: must be >= 1, or -1 for all items, got {args.max_per_task}")
    return run_cli(lambda: _main(args), "eval_core.py")


def _main(args):
    rt = runtime.for_script(args.device, args.dtype)
    try:
        bundle = Path(args.bundle_dir) if args.bundle_dir else default_bundle_dir()
        if args.download and rt.master:
            download_bundle(bundle)
        rt.barrier()
        labels = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks is not None else None
        if labels == []:
            raise ConfigError("--tasks: no task labels given; pass e.g. --tasks hellaswag,piqa or leave it out for all")
        select_tasks(load_bundle(bundle)[0], labels, bundle)  # a bad bundle or label fails before the model loads
        model, meta = load_model(args.ckpt, rt.device)
        enc = load_tokenizer(meta)
        res = evaluate_core(model, enc, rt.device, bundle, args.max_per_task, labels, rt.autocast(),
                            log=print if rt.master else None)
        if rt.master:
            print(f"{core_line(res)} | step {meta.get('step')}")
            if args.out != "-":
                save_core(args.out, res, bundle, meta.get("step"), meta.get("tokens"), resolve_ckpt(args.ckpt))
        return res
    finally:
        rt.close()


if __name__ == "__main__":
    main()

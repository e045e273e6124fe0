"""
lm-eval's HellaSwag next to scripts/eval_hellaswag.py's (evals/hellaswag.py) on the same checkpoint and items.

    python scripts/crosscheck_hellaswag.py out/run --limit 1000
    python scripts/crosscheck_hellaswag.py out/run --task my_hellaswag --include-path my_tasks/

The items are lm-eval's (task hellaswag: the 10,042 validation items of Rowan/hellaswag, the same
items as hellaswag_val.jsonl); evals/hellaswag.py scores each item's raw "ctx", "endings" and "label".
The two differ in two ways, both printed:
    prompt     lm-eval: preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()) (its
               hellaswag/utils.py drops WikiHow's [title]-style brackets); evals: ctx as it is.
               Both append " " + ending.
    acc_norm   lm-eval: argmax of log-likelihood / len(ending) in characters (the bytes of ASCII
               text; the leading space is not counted); evals (llm.c, nanoGPT): argmin of the
               ending's summed loss / its number of tokens.
    acc        both: the largest summed log-likelihood of the ending.
Each side's numbers are recomputed here from its per-ending scores by its own definition; a
mismatch ends the script with status 1. --output writes every item's scores as JSON.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import runtime  # noqa: E402
from checkpoint import load_model, load_tokenizer  # noqa: E402
from common import HelpFormatter, positive_int, run_cli  # noqa: E402
from rundir import check_output  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("ckpt", help="checkpoint file, or the run directory holding ckpt.pt")
    ap.add_argument("--task", default="hellaswag", help="lm-eval task with HellaSwag's ctx/endings/label fields")
    ap.add_argument("--include-path", default=None, help="a directory of local lm-eval task YAML files")
    ap.add_argument("--limit", type=positive_int, default=None, help="only the first N items")
    ap.add_argument("--batch-size", type=positive_int, default=16)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--output", default=None, help="per-item scores as JSON (default: none)")
    args = ap.parse_args(argv)
    return run_cli(lambda: _main(args), "crosscheck_hellaswag.py")


def _main(args):
    from evals import harness, results
    check_output(args.output)   # now, not after the scoring; never over a run's own files
    rt = runtime.for_script(args.device, args.dtype)
    model, meta = load_model(args.ckpt, rt.device)
    lm = harness.HcgptLM(model, load_tokenizer(meta), rt.device, args.batch_size, rt.autocast())
    res = harness.crosscheck_hellaswag(lm, args.task, args.limit, args.include_path)
    print(f"{res['n']} items of lm-eval task {res['task']}, checkpoint step {meta.get('step')}")
    print(f"{'':28s} {'acc':>7s} {'acc_norm':>9s}")
    for side, how in (("lm_eval", "log-likelihood / characters"), ("evals", "mean loss per token")):
        got, ref = res[side], res[f"{side}_by_definition"]
        print(f"{side:28s} {got['acc']:7.4f} {got['acc_norm']:9.4f}   acc_norm: {how}")
        print(f"{'  recomputed by definition':28s} {ref['acc']:7.4f} {ref['acc_norm']:9.4f}")
    print(f"summed log-likelihoods of the endings: largest |lm-eval - evals| {res['max_ll_diff']:.2e} "
          f"(float noise only where both score the same prompt text; lm-eval's hellaswag adds the activity label)")
    print(f"same prediction on {res['same_pred']:.1%} of items (acc), {res['same_pred_norm']:.1%} (acc_norm)")
    if args.output:
        results.save(args.output, res)
        print(f"items: {args.output}")
    bad = [s for s in ("lm_eval", "evals")
           if any(abs(res[s][k] - res[f"{s}_by_definition"][k]) > 1e-9 for k in ("acc", "acc_norm"))]
    if bad:
        raise RuntimeError(f"{' and '.join(bad)}: the accuracy differs from its own definition recomputed from the "
                           f"per-ending scores (see above)")
    return res


if __name__ == "__main__":
    main()

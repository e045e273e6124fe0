"""
A checkpoint on any task of EleutherAI's lm-evaluation-harness (lm-eval 0.4.13), scored by the
harness's own evaluator (evals/harness.py wraps the model: loglikelihood, loglikelihood_rolling,
generate_until). Either architecture, any scheme, the run's own tokenizer.

    python scripts/eval_lm.py out/run --tasks commonsense                     # the KromHC Table 4 suite
    python scripts/eval_lm.py out/run/ckpt.pt --tasks hellaswag,lambada_openai --num-fewshot 0 --limit 500
    python scripts/eval_lm.py out/run --tasks my_task --include-path my_tasks/    # local task YAMLs
    python scripts/eval_lm.py --download-only --tasks commonsense             # fill the dataset cache

--tasks commonsense is HellaSwag, PIQA, ARC-easy, ARC-challenge, WinoGrande, OpenBookQA, BoolQ and
SIQA; it prints each task's metric (acc_norm for HellaSwag, ARC-challenge and OpenBookQA, acc for
the others: evals.harness.COMMONSENSE) and their average.

Results: lm-eval's results JSON beside the checkpoint (lm_eval_<tasks>_step<step>.json, or
--output: checked before anything is loaded, and never the run's log.jsonl, a checkpoint or another
tool's results), a "lm_eval" record in the run's log.jsonl with metrics named lm_eval/<task>/<metric>,
and the same metrics in the run's wandb run if it had one (--no-wandb to skip).
Datasets come from the Hugging Face hub into its cache; on a node without network fill the cache
elsewhere with --download-only and run with HF_DATASETS_OFFLINE=1 (docs/lm-eval.md).
Needs lm-eval 0.4.13 (in requirements.txt); training never imports it.
"""

import argparse
import hashlib
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import runtime  # noqa: E402
from common import HelpFormatter, non_negative_int, positive_int, run_cli  # noqa: E402
import checkpoint  # noqa: E402
import rundir  # noqa: E402
from errors import ConfigError  # noqa: E402
from rundir import check_output_arg  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("ckpt", nargs="?", help="checkpoint file, or the run directory holding ckpt.pt")
    ap.add_argument("--tasks", required=True, help="comma-separated lm-eval task names; 'commonsense' = the suite")
    ap.add_argument("--num-fewshot", type=non_negative_int, default=None,
                    help="few-shot examples (default: the task's)")
    ap.add_argument("--limit", type=positive_int, default=None, help="only the first N items of each task (testing)")
    ap.add_argument("--batch-size", type=positive_int, default=16, help="rows per forward pass (results do not change)")
    ap.add_argument("--include-path", default=None, help="a directory of local lm-eval task YAML files")
    ap.add_argument("--output", default=None, help="results JSON (default: beside the checkpoint; '-' for none)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--no-wandb", action="store_true", help="do not add the results to the run's wandb run")
    ap.add_argument("--download-only", action="store_true", help="only fetch the tasks' datasets (no checkpoint)")
    args = ap.parse_args(argv)
    if args.ckpt is None and not args.download_only:
        ap.error("the checkpoint is required (or pass --download-only to fetch the datasets)")
    if not args.download_only:  # the results file, before lm-eval, the checkpoint and the evaluation
        ckpt = checkpoint.resolve(args.ckpt)
        out = args.output
        if out is None and ckpt.is_file():  # its step is read with the checkpoint: here its folder is checked
            out = default_output(ckpt, args.tasks, "N", args.num_fewshot, args.limit)
        check_output_arg(ap, "--output", out, "lm_eval_*.json")
    return run_cli(lambda: _main(args), "eval_lm.py")


def default_output(ckpt, spec, step, num_fewshot, limit):
    """lm_eval_<tasks>[_<k>shot][_limit<N>]_step<step>.json beside the checkpoint: runs of other
    task lists, shots or limits on the same checkpoint do not overwrite each other."""
    slug = re.sub(r"[^A-Za-z0-9_.+-]", "_", spec.replace(",", "+"))
    if len(slug) > 60:
        slug = slug[:40] + "-" + hashlib.sha1(spec.encode()).hexdigest()[:8]
    parts = [slug] + ([f"{num_fewshot}shot"] if num_fewshot is not None else []) + ([f"limit{limit}"] if limit else [])
    return ckpt.parent / f"lm_eval_{'_'.join(parts)}_step{step}.json"


def _main(args):
    if int(os.environ.get("RANK", -1)) != -1:
        raise ConfigError("eval_lm.py runs in one process: start it with python, not torchrun")
    from evals import harness  # lm-eval is needed from here on (a one-line error with the pip command if it is missing)
    tasks = harness.expand_tasks(args.tasks)
    harness.check_tasks(tasks, args.include_path)  # before the checkpoint is read: a typo fails at once
    if args.download_only:
        for name, splits in harness.download(tasks, args.include_path).items():
            print(f"{name}: " + ", ".join(f"{split} {n}" for split, n in splits.items()))
        print("datasets are in the Hugging Face cache ($HF_HOME, default ~/.cache/huggingface): copy it to the "
              "node without network and run there with HF_DATASETS_OFFLINE=1")
        return None
    rt = runtime.for_script(args.device, args.dtype)
    ckpt = checkpoint.resolve(args.ckpt)
    model, meta = checkpoint.load_model(ckpt, rt.device)
    enc = checkpoint.load_tokenizer(meta)
    cfg = meta.get("config") or {}
    use_wandb = bool(meta.get("wandb_id")) and cfg.get("wandb_log") and not args.no_wandb
    if use_wandb:  # online without an API key: say so now, not after the evaluation
        from tracking import WandbConfig, check_wandb
        try:
            check_wandb(WandbConfig(wandb_log=True, wandb_mode=cfg.get("wandb_mode", "online")))
        except ConfigError as e:   # the fixes that work here: not train.py's --wandb_mode flag
            if "no wandb API key" not in str(e):   # a bad WANDB_INIT_TIMEOUT, WANDB_DIR, ...: wandb's own cause
                raise ConfigError(f"the checkpoint's run logs to wandb run {meta['wandb_id']}, but {e}; or pass "
                                  f"--no-wandb to evaluate without wandb") from None
            raise ConfigError(f"the checkpoint's run logs to wandb run {meta['wandb_id']} online, but no wandb API "
                              f"key was found: run `wandb login`, set WANDB_MODE=offline (sync later with `wandb "
                              f"sync`), or pass --no-wandb") from None
    mc = model.config
    info = {"hcgpt_ckpt": str(ckpt), "step": meta.get("step"), "tokens": meta.get("tokens"), "arch": mc.arch,
            "scheme": mc.scheme, "n_streams": mc.n_streams, "n_params": model.num_params(non_embedding=False),
            "block_size": mc.block_size, "tokenizer": enc.name, "dtype": rt.dtype}
    lm = harness.HcgptLM(model, enc, rt.device, args.batch_size, rt.autocast(), info)
    t0 = time.time()
    results = harness.evaluate(lm, tasks, args.num_fewshot, args.limit, args.include_path, model_args=f"ckpt={ckpt}")
    report(harness, results, tasks, meta, time.time() - t0)

    step = meta.get("step")
    out = default_output(ckpt, args.tasks, step, args.num_fewshot, args.limit) if args.output is None else args.output
    if out != "-":
        harness.save_results(results, out)
        print(f"results: {out}")
    metrics = harness.flat_metrics(results)
    record = {"type": "lm_eval", "step": step, "tokens": meta.get("tokens"), "ckpt": str(ckpt), "tasks": tasks,
              "num_fewshot": args.num_fewshot, "limit": args.limit, "lm_eval_version": harness.lm_eval.__version__,
              "results_file": None if out == "-" else str(out), **metrics}
    if (ckpt.parent / "log.jsonl").is_file():
        rundir.append_log(ckpt.parent, record)
        print(f"log: {ckpt.parent / 'log.jsonl'} (type lm_eval, step {step})")
    else:
        print(f"note: no log.jsonl beside {ckpt}: the results are only in the JSON file")
    if use_wandb:
        from tracking import log_to_run
        log_to_run(cfg.get("wandb_project", "hcgpt"), cfg.get("wandb_run_name"), cfg.get("wandb_mode", "online"),
                   meta["wandb_id"], {"lm_eval/step": step, **metrics}, "lm_eval/step", meta.get("wandb_group"))
        print(f"wandb: logged to run {meta['wandb_id']} ({os.environ.get('WANDB_MODE') or cfg.get('wandb_mode')})")
    return results


def report(harness, results, tasks, meta, seconds):
    """lm-eval's table, then each suite's metric per task and its average, as the paper prints them."""
    from lm_eval.utils import make_table
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    for suite in harness.SUITES:
        rows = harness.suite_rows(results, suite)
        if not rows:
            continue
        for task, metric, value in rows:
            print(f"{suite:12s} {task:15s} {metric:9s} {value:.4f}")
        avg = harness.suite_averages(results).get(suite)
        print(f"{suite:12s} {'average':15s} {'':9s} " + (f"{avg:.4f} ({len(rows)} tasks)" if avg is not None else
              f"n/a: {len(rows)} of {len(harness.SUITES[suite])} tasks were run"))
    print(f"step {meta.get('step')} | {', '.join(tasks)} | {seconds:.1f}s")


if __name__ == "__main__":
    main()

"""
Story grades of a checkpoint from an LLM judge, after the TinyStories paper's GPT-Eval (Eldan & Li 2023).

    python scripts/eval_stories.py out/tinystories-kromhc-n4-s1337                 # gpt-4.1-nano, OPENAI_API_KEY
    python scripts/eval_stories.py out/run --dry-run                               # completions, then the call count
    python scripts/eval_stories.py out/run --judge-model llama3 --judge-base-url http://localhost:8000/v1
    python scripts/eval_stories.py --completions out/run/stories_gpt-4.1-nano.json --judge-model gpt-4.1-mini
    python scripts/eval_stories.py --compare out/a/stories_gpt-4.1-nano.json out/b/stories_gpt-4.1-nano.json

The model completes each story beginning of --prompts (data/tinystories_prompts.jsonl: 56 beginnings
written for hcgpt, most cut mid-sentence as in the paper), greedy by default, stopping at <|endoftext|>
or after --max-new-tokens. The judge (any OpenAI-compatible chat API, through the `openai` client; key
from OPENAI_API_KEY) reads --rubric (data/tinystories_rubric.md) with the beginning, *** and the
completion, and answers one JSON object {"grammar", "creativity", "consistency", "plot"} of integers
1-10. A reply that is not exactly that is asked for again (--parse-retries), then the item counts as a
failure: it is reported, written out, and left out of the means; it is never a 0. Rate limits and
timeouts are retried with backoff (--retries). The grading stops, writes what was graded and names the
cause when the judge cannot be used: --judge-give-up requests in a row without a reply (a server that
accepts connections but does not answer), an HTML page instead of the API (a wrong --judge-base-url),
a refused key or model, or --judge-deadline passed. Grades are cached by (judge model, rubric, judge
temperature, beginning, completion) in --cache ($HCGPT_CACHE_DIR/story_grades.jsonl, i.e.
~/.cache/hcgpt/story_grades.jsonl): a rerun, or another checkpoint with the same completion, costs
nothing. Prints each criterion's mean with its 95 % Student-t interval and writes every prompt,
completion, raw judge reply and grade to --output (default <run dir>/stories_<judge model>.json).
--completions grades the completions of such a file again (another judge or rubric) without a model;
--compare prints the paired difference of two such files, prompt by prompt. Every path is checked
before the model or the judge is used (the output: never a run's log.jsonl, checkpoint or another
tool's results). Exit status 1 when any item failed (after the output is written).
"""

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py: spinning OpenMP threads starve a shared CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import runtime  # noqa: E402
from common import HelpFormatter, non_negative_int, positive_int, run_cli  # noqa: E402
from errors import ConfigError  # noqa: E402
from evals import cache_root, results, stories  # noqa: E402
from rundir import check_output_arg  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("ckpt", nargs="?", help="checkpoint file, or the run directory holding ckpt.pt")
    ap.add_argument("--prompts", default=str(stories.DEFAULT_PROMPTS),
                    help="story beginnings: .jsonl of {\"id\", \"beginning\"}, or text with one a line")
    ap.add_argument("--completions", default=None, metavar="FILE",
                    help="grade the completions of an earlier --output file instead of a checkpoint's")
    ap.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"),
                    help="two --output files: B - A per criterion, paired by prompt (no judge, no model)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=400)
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature, >= 0 (0: greedy)")
    ap.add_argument("--top-k", type=non_negative_int, default=0, help="keep the k most likely tokens (0: all)")
    ap.add_argument("--seed", type=int, default=1337, help="sampling seed (each beginning's: from it and the text)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--judge-model", default=stories.DEFAULT_JUDGE)
    ap.add_argument("--judge-base-url", default=None,
                    help="an OpenAI-compatible API, e.g. http://localhost:8000/v1 (default: OpenAI's)")
    ap.add_argument("--judge-temperature", type=float, default=0.0)
    ap.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per request")
    ap.add_argument("--judge-deadline", type=float, default=None, metavar="SECONDS",
                    help="for the whole grading, then it stops and writes what was graded (default: twice the "
                         "time of every call waiting --judge-timeout, --concurrency at a time; at least 600)")
    ap.add_argument("--judge-give-up", type=positive_int, default=3, metavar="N",
                    help="stop when N requests in a row get no reply within --judge-timeout")
    ap.add_argument("--rubric", default=str(stories.DEFAULT_RUBRIC),
                    help="the judge's instructions, with {beginning} and {completion}")
    ap.add_argument("--concurrency", type=positive_int, default=4, help="judge requests in flight")
    ap.add_argument("--retries", type=non_negative_int, default=6,
                    help="retries of a rate-limited or timed-out request")
    ap.add_argument("--parse-retries", type=non_negative_int, default=2,
                    help="requests again after a reply that is not the four grades")
    ap.add_argument("--cache", default=None,
                    help="grade cache file (default: $HCGPT_CACHE_DIR/story_grades.jsonl, ~/.cache/hcgpt/...)")
    ap.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    ap.add_argument("--output", default=None, help="results JSON (default: <run dir>/stories_<judge model>.json)")
    ap.add_argument("--dry-run", action="store_true", help="make the completions, print the judge calls, stop")
    args = ap.parse_args(argv)
    if args.compare:
        if args.ckpt or args.completions:
            ap.error("--compare takes two result files and nothing else")
    elif bool(args.ckpt) == bool(args.completions):
        ap.error("pass a checkpoint (CKPT) or --completions FILE (one of them)")
    if not args.temperature >= 0:
        ap.error(f"argument --temperature: must be >= 0 (0: greedy), got {args.temperature}")
    if not 0 < args.judge_timeout < float("inf"):   # an endless wait would defeat the give-up after timeouts
        ap.error(f"argument --judge-timeout: must be a finite number of seconds > 0, got {args.judge_timeout}")
    if args.judge_deadline is not None and not args.judge_deadline > 0:
        ap.error(f"argument --judge-deadline: must be > 0 seconds, got {args.judge_deadline}")
    if not args.compare:
        check_paths(ap, args)
    return run_cli(lambda: _main(args), "eval_stories.py")


def check_paths(ap, args):
    """The files this run writes, before any work: the results file (never a run's own file, nor one of this
    run's inputs) and the grade cache, which is appended to while the judge is paid."""
    source = Path(args.completions) if args.completions else Path(args.ckpt)
    if args.output is None and (source.is_file() or source.is_dir()):  # a missing source is named later
        args.output = default_output(args)
    args.cache = None if args.no_cache else Path(args.cache) if args.cache else cache_root() / "story_grades.jsonl"
    check_output_arg(ap, "--output", args.output, "stories_*.json")
    if args.output is not None:
        for flag, path in (("--cache", args.cache), ("--prompts", args.prompts), ("--rubric", args.rubric)):
            if path is not None and Path(path).resolve() == Path(args.output).resolve():
                ap.error(f"argument --output: {args.output} is the {flag} file, which the results would replace; "
                         f"pass another --output")
    if args.cache is None:
        return
    folder = args.cache.parent
    while not folder.exists():  # the cache's folder is made at its first grade
        folder = folder.parent
    if folder == args.cache.parent:
        check_output_arg(ap, "--cache", args.cache)
    elif not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        ap.error(f"argument --cache: cannot make {args.cache.parent}: {folder} is not a writable directory; pass "
                 f"another --cache, or --no-cache")
    if args.cache.is_file() and not os.access(args.cache, os.W_OK):
        ap.error(f"argument --cache: {args.cache} is read-only, and grades are appended to it; pass another "
                 f"--cache, or --no-cache")


def read_results(path):
    """An earlier --output file: its items need id, beginning and completion strings."""
    try:
        res = json.loads(Path(path).read_text(encoding="utf-8"))
        items = res["items"]
        if not items or not all(isinstance(it.get(k), str) for it in items for k in ("id", "beginning", "completion")):
            raise ValueError("an item without id, beginning or completion")
        return res
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: not a results file of eval_stories.py ({type(e).__name__}: {e}); pass the "
                          f"JSON that --output wrote") from None


def generate(args, prompts):
    import torch

    from checkpoint import load_model, load_tokenizer

    rt = runtime.for_script(args.device, args.dtype)
    device = rt.device
    model, meta = load_model(args.ckpt, device)
    enc = load_tokenizer(meta)
    ctx = rt.autocast()
    cfg = meta["model_config"]
    how = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, top-k {args.top_k or 'all'}"
    print(f"# {args.ckpt}: {cfg['scheme']} n={cfg['n_streams']}, step {meta.get('step')}; {len(prompts)} beginnings, "
          f"{how}, seed {args.seed}, at most {args.max_new_tokens} new tokens", flush=True)
    t0 = time.time()
    items = []
    for i, p in enumerate(prompts, 1):
        out = stories.complete(model, enc, p["beginning"], args.max_new_tokens, args.temperature, args.top_k or None,
                               args.seed, device, ctx)
        items.append({**p, **out})
        if i % 10 == 0 or i == len(prompts):
            print(f"completed {i}/{len(prompts)} ({time.time() - t0:.0f}s)", flush=True)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    source = {"checkpoint": str(args.ckpt), "step": meta.get("step"), "model_config": cfg,
              "prompts": str(args.prompts), "prompts_sha256": stories.sha256(Path(args.prompts).read_text("utf-8")),
              "generation": {"temperature": args.temperature, "top_k": args.top_k or None, "seed": args.seed,
                             "max_new_tokens": args.max_new_tokens, "device": device, "dtype": args.dtype}}
    return items, source


def default_output(args):
    from checkpoint import resolve
    source = Path(args.completions) if args.completions else resolve(args.ckpt)
    return source.parent / f"stories_{re.sub(r'[^A-Za-z0-9._-]+', '_', args.judge_model)}.json"


def _main(args):
    if args.compare:
        a, b = args.compare
        diff = stories.compare(read_results(a), read_results(b), (a, b))
        print(f"B - A over {diff['pairs']} prompts graded in both (A: {a}, B: {b})")
        for c in stories.CRITERIA:
            print(stories.format_row(c, diff[c]))
        return diff
    # every input and the cache are read before the model or the judge is used
    rubric = stories.load_rubric(args.rubric)
    if args.completions:
        res = read_results(args.completions)
        items = [{k: it[k] for k in ("id", "beginning", "completion", "new_tokens", "ended") if k in it}
                 for it in res["items"]]
        source = {k: res[k] for k in ("checkpoint", "step", "model_config", "prompts", "prompts_sha256", "generation")
                  if k in res}
        source["completions_from"] = str(args.completions)
    else:
        prompts = stories.load_prompts(args.prompts)
    cache = stories.GradeCache(args.cache)
    judge = None if args.dry_run else stories.Judge(
        args.judge_model, args.judge_base_url, temperature=args.judge_temperature, timeout=args.judge_timeout,
        retries=args.retries, parse_retries=args.parse_retries, give_up=args.judge_give_up)  # no key: said now
    if not args.completions:
        items, source = generate(args, prompts)
    output = Path(args.output) if args.output else default_output(args)
    keys = [stories.cache_key(args.judge_model, rubric, args.judge_temperature, it["beginning"], it["completion"])
            for it in items]
    cached = sum(k in cache.entries for k in keys)
    calls = len(items) - cached
    deadline = args.judge_deadline or stories.default_deadline(calls, args.concurrency, args.judge_timeout)
    where = judge.where if judge else args.judge_base_url or "the OpenAI API"
    print(f"judge {args.judge_model} at {where}: {calls} calls to make for {len(items)} completions "
          f"({cached} graded already in {args.cache or 'no cache'}; a reply that does not parse is asked for again "
          f"up to {args.parse_retries} times; the grading stops after {deadline:g} s, or when "
          f"{args.judge_give_up} requests in a row get no reply)", flush=True)
    if args.dry_run:
        return {"calls": calls, "cached": cached, "items": len(items)}

    stopped = None
    try:
        stories.grade_all(items, rubric, args.judge_model, args.judge_temperature, cache, judge, args.concurrency,
                          deadline=deadline)
    except stories.JudgeError as e:  # the judge cannot go on: what was graded is still written
        stopped = e
    counts = stories.counts(items)
    if stopped is not None and not counts["graded"]:
        raise stopped  # nothing to keep: an earlier results file at --output stays as it was
    summary = stories.summarize(items)
    counts["truncated"] = sum(1 for it in items if it.get("ended") is False)
    result = {**source,
              "judge": {"model": args.judge_model, "base_url": args.judge_base_url,
                        "temperature": args.judge_temperature, "rubric": str(args.rubric),
                        "rubric_sha256": stories.sha256(rubric)},
              "summary": summary, "counts": counts, "items": items}
    results.save(output, result)

    print(f"{counts['graded']}/{counts['items']} graded ({counts['cached']} from the cache, {counts['judged']} judged)"
          + (f"; {counts['truncated']} completions ran into --max-new-tokens" if counts["truncated"] else ""))
    for c in stories.CRITERIA:
        print(stories.format_row(c, summary[c]))
    print(f"wrote {output}")
    if stopped is not None:
        raise stories.JudgeError(f"{stopped} ({counts['graded']} of {counts['items']} items graded, written to "
                                 f"{output})")
    if counts["failed"]:
        for it in items:
            if it["scores"] is None:
                print(f"failed {it['id']}: {it['error']}", file=sys.stderr)
        print(f"eval_stories.py: {counts['failed']} of {counts['items']} items failed and are not in the means; "
              f"rerun the same command to ask again (the graded ones come from the cache)", file=sys.stderr)
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()

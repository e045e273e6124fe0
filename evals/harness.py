"""hcgpt checkpoints in EleutherAI's lm-evaluation-harness (lm-eval 0.4.13): every task of the
harness, scored by the harness's own evaluator; scripts/eval_lm.py is its command line. The model
is scored as lm-eval scores a Hugging Face model (lm_eval/models/huggingface.py), in the run's own
tokenizer: docs/lm-eval.md, "How the model is scored".

Training never imports this module (nor lm_eval): only the evaluation scripts do.
"""

import difflib
import functools
import importlib
import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from errors import ConfigError, NotFound
from evals import forward_logits
from evals.hellaswag import evaluate_hellaswag
from evals.results import save

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.task import ALL_OUTPUT_TYPES
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window
except ImportError as e:  # not installed, or another version whose modules moved
    raise ConfigError(f"lm-evaluation-harness is not installed or not the version hcgpt uses ({e}); install it "
                      f"with `pip install lm-eval==0.4.13` (it is in requirements.txt)") from None

# The suite averaged in the KromHC paper's Table 4 (commonsense reasoning): the paper's text at hand
# does not list its tasks or metrics, so this is the list the paper's column names suggest, scored
# as the harness-based pretraining papers score it (Mamba, GLA, DeltaNet): acc_norm where the
# answers' lengths differ a lot and raw log-likelihood favours short answers (HellaSwag, ARC-
# challenge, OpenBookQA), acc elsewhere. The results JSON holds acc and acc_norm of every task.
COMMONSENSE = {
    "hellaswag": "acc_norm",
    "piqa": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "winogrande": "acc",
    "openbookqa": "acc_norm",
    "boolq": "acc",
    "social_iqa": "acc",
}
SUITES = {"commonsense": COMMONSENSE}


class HcgptLM(TemplateLM):
    """A GPT (model.py, either arch, any scheme) and a tiktoken Encoding as an lm_eval model.

    model: anything whose forward(idx) returns (logits, ...) with config.block_size (put in eval mode).
    enc: checkpoint.load_tokenizer(meta). ctx: the autocast context of every forward (bf16 on CUDA).
    batch_size: rows per forward; results do not depend on it (rows are right-padded and the model
    is causal, so a row's logits never see its padding).
    """

    def __init__(self, model, enc, device, batch_size, ctx=None, info=None):
        super().__init__()
        self.model, self.enc, self._device = model.eval(), enc, torch.device(device)
        self.batch_size, self.ctx, self.info = int(batch_size), ctx or nullcontext(), dict(info or {})
        self.max_length = model.config.block_size
        self.max_gen_toks = 256  # lm-eval's default for Hugging Face models

    # -- tokens ---------------------------------------------------------------------------------
    @property
    def eot_token_id(self):
        return self.enc.eot_token

    @property
    def tokenizer_name(self):
        return self.enc.name

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.enc.encode(string, allowed_special="all")

    def tok_decode(self, tokens):
        return self.enc.decode(list(tokens))

    def get_model_info(self):
        return dict(self.info)

    # -- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        """[(cache key, context tokens, continuation tokens)] -> [(log P(continuation | context), greedy)].
        The model reads the last block_size + 1 tokens of context + continuation less the last one
        (lm-eval's left truncation); greedy: every continuation token is the argmax of its logits."""
        rows = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise ConfigError(f"a continuation of {len(continuation)} tokens is longer than the model's block_size "
                                  f"{self.max_length}: it cannot be scored in one window; shorten the task's targets")
            whole = (context + continuation)[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[-len(continuation):]))
        # longest first: the batches hold rows of similar length (little padding), and memory runs out at once if at all
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out = [None] * len(rows)
        for b in range(0, len(order), self.batch_size):
            chunk = order[b:b + self.batch_size]
            logits = forward_logits(self.model, [rows[i][0] for i in chunk], self._device, self.ctx)[0]
            for j, i in enumerate(chunk):
                inp, cont = rows[i]
                # logits at position t predict token t + 1: the continuation's are the last len(cont) of the row
                logp = logits[j, len(inp) - len(cont):len(inp)].float().log_softmax(-1)
                target = torch.tensor(cont, device=logp.device)
                ll = logp.gather(-1, target[:, None]).sum()
                out[i] = (float(ll), bool((logp.argmax(-1) == target).all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """log P(text) of each text: its tokens in disjoint windows of block_size, the first
        conditioned on <|endoftext|>, every later one on as much preceding text as fits."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            tokens = self.tok_encode(req.args[0])
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation -----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm=False):
        """Greedy continuations (temperature sampling where a task asks for it), each stopped at the
        first of the task's `until` strings or <|endoftext|> and cut there."""
        groups = {}  # requests with the same generation settings share batches
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out = [None] * len(requests)
        eos = self.tok_decode([self.eot_token_id])
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            do_sample, temperature = kwargs.pop("do_sample", False), float(kwargs.pop("temperature", 0.0))
            temperature = temperature if do_sample else 0.0
            top_k = kwargs.pop("top_k", None)
            if kwargs:
                raise ConfigError(f"generation_kwargs {sorted(kwargs)} are not supported by hcgpt's lm_eval model "
                                  f"(it supports until, max_gen_toks, do_sample, temperature, top_k); remove them "
                                  f"from the task's generation_kwargs")
            if max_gen >= self.max_length:
                raise ConfigError(f"the task asks for up to {max_gen} generated tokens, but the model's block_size is "
                                  f"{self.max_length}; set generation_kwargs max_gen_toks below {self.max_length}")
            max_ctx = self.max_length - max_gen  # the context is cut on the left to leave room for the generation
            contexts = [self.tok_encode(requests[i].args[0])[-max_ctx:] or [self.prefix_token_id] for i in members]
            order = sorted(range(len(members)), key=lambda j: -len(contexts[j]))
            for b in range(0, len(order), self.batch_size):
                chunk = order[b:b + self.batch_size]
                texts = self._generate([contexts[j] for j in chunk], max_gen, until, temperature, top_k)
                for j, text in zip(chunk, texts):
                    i = members[j]
                    out[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    @torch.no_grad()
    def _generate(self, contexts, max_gen, until, temperature=0.0, top_k=None):
        """Generated text of each context (rows of different lengths in one batch: each row's next token
        is read at its own last position, so the padding after it is never seen)."""
        seqs = [list(c) for c in contexts]
        live = list(range(len(seqs)))
        for _ in range(max_gen):
            if not live:
                break
            logits = forward_logits(self.model, [seqs[i] for i in live], self._device, self.ctx)[0]
            last = torch.stack([logits[j, len(seqs[i]) - 1] for j, i in enumerate(live)]).float()
            if temperature > 0:
                last = last / temperature
                if top_k is not None:
                    kth = torch.topk(last, min(int(top_k), last.size(-1))).values[:, -1:]
                    last = last.masked_fill(last < kth, -math.inf)
                nxt = torch.multinomial(last.softmax(-1), 1)[:, 0].tolist()
            else:
                nxt = last.argmax(-1).tolist()
            for i, t in zip(live, nxt):
                seqs[i].append(t)
            live = [i for i in live if not any(s and s in self.tok_decode(seqs[i][len(contexts[i]):]) for s in until)]
        return [self.tok_decode(s[len(c):]) for s, c in zip(seqs, contexts)]


# -----------------------------------------------------------------------------
# tasks

def expand_tasks(spec):
    """"a,b,commonsense" -> ["a", "b", <the commonsense tasks>] (in order, each once)."""
    names = []
    for name in (s.strip() for s in spec.split(",")):
        if name.endswith((".yaml", ".yml")):
            raise ConfigError(f"--tasks {name}: --tasks takes task names, not files; pass the file's folder and "
                              f"its task's name: --include-path {Path(name).parent} --tasks <its 'task:' value>")
        for task in SUITES.get(name, [name] if name else []):
            if task not in names:
                names.append(task)
    if not names:
        raise ConfigError(f"--tasks {spec!r} names no task; pass e.g. --tasks commonsense or --tasks hellaswag,piqa")
    return names


def check_task_dir(path):
    """Every *.yaml under a local task directory must be a task lm-eval can build: the harness skips a file
    that does not parse silently (the task then looks unknown), and imports a `!function` module only when
    it builds the task, after the checkpoint is read."""
    root = Path(path)
    if root.is_file():
        raise ConfigError(f"--include-path {path} is a file; pass its directory: --include-path {root.parent}")
    if not root.is_dir():
        raise NotFound(f"--include-path {path}: no such directory; pass a directory of lm-eval task YAML files")
    files = sorted(root.glob("**/*.yaml"))
    if not files:
        raise ConfigError(f"--include-path {path}: no *.yaml task files in it; pass a directory of lm-eval task YAMLs")
    for f in files:
        try:
            cfg = load_yaml(f, resolve_func=False, recursive=True)
        except Exception as e:
            why = " ".join(str(e).split())[:300]
            raise ConfigError(f"--include-path: {f} is not a task file lm-eval can read ({type(e).__name__}: "
                              f"{why}); fix the YAML (see lm-eval's docs/task_guide.md)") from None
        if not {"task", "group"} & set(cfg):
            raise ConfigError(f"--include-path: {f} is YAML but not an lm-eval task (no 'task:' or 'group:' key); "
                              f"fix it or move it out of {path}")
        if cfg.get("output_type") not in (None, *ALL_OUTPUT_TYPES):
            raise ConfigError(f"--include-path: {f}: output_type {cfg['output_type']!r} is not one of lm-eval's "
                              f"{', '.join(ALL_OUTPUT_TYPES)}; set one of them")
        check_functions(f)


def check_functions(task_file):
    """Each `!function module.fn` of a task file names a function lm-eval can import: from module.py beside
    the file, else from an importable module (lm-eval's order)."""
    refs = []

    class Loader(yaml.SafeLoader):  # collects the tags instead of importing them
        pass
    Loader.add_constructor("!function", lambda loader, node: refs.append(loader.construct_scalar(node)))
    yaml.load(task_file.read_bytes(), Loader)
    for ref in refs:
        module, _, fn = ref.rpartition(".")
        local = task_file.parent / f"{module.replace('.', '/')}.py"
        if not module:
            raise ConfigError(f"{task_file}: `!function {ref}` names no module; write `!function utils.{fn}` and "
                              f"define {fn} in {task_file.parent / 'utils.py'}")
        if local.is_file():
            continue
        try:
            found = importlib.import_module(module)
        except ImportError:
            found = None
        if not hasattr(found, fn):
            other = f" (the module {module!r} Python finds elsewhere has no {fn!r})" if found else ""
            raise ConfigError(f"{task_file}: `!function {ref}` needs {local}, which does not exist{other}; create "
                              f"it with a function {fn}, or correct the module name in the tag")


@functools.lru_cache(maxsize=4)
def task_manager(include_path=None):
    """lm-eval's task index (about 15,000 tasks: seconds to build, so kept for the process) plus the
    tasks of include_path, which take precedence over built-in tasks of the same name."""
    if include_path is not None:
        check_task_dir(include_path)
    return TaskManager(include_path=include_path)


def check_tasks(names, include_path=None):
    """Every name a task, group or tag of lm-eval or of include_path, else a ConfigError with close matches.
    -> the task manager that knows them."""
    tm = task_manager(str(include_path) if include_path is not None else None)
    known = set(tm.all_tasks)
    for name in names:
        if name not in known and not tm.match_tasks([name]):
            close = difflib.get_close_matches(name, known, n=3)
            where = f"lm-eval {lm_eval.__version__}'s tasks" + (f" or {include_path}" if include_path else "")
            raise ConfigError(f"unknown task {name!r}: not in {where}"
                              + (f" (did you mean {', '.join(close)}?)" if close else "")
                              + "; `lm-eval ls tasks` lists them, and --include-path DIR adds local task YAMLs")
    return tm


def evaluate(lm, tasks, num_fewshot=None, limit=None, include_path=None, log_samples=False, model_args=None):
    """lm_eval.simple_evaluate of lm on tasks (names; suites expanded by the caller) -> its results dict."""
    tm = check_tasks(tasks, include_path)
    try:
        return lm_eval.simple_evaluate(model=lm, model_args=model_args, tasks=list(tasks), num_fewshot=num_fewshot,
                                       limit=limit, batch_size=lm.batch_size, device=str(lm._device),
                                       log_samples=log_samples, task_manager=tm)
    except ConnectionError as e:  # datasets says "Couldn't reach 'Rowan/hellaswag' on the Hub (...)"
        raise NotFound(f"a task's dataset is not in the Hugging Face cache and cannot be downloaded here ({e}); on "
                       f"a machine with network run `python scripts/eval_lm.py --download-only --tasks "
                       f"{','.join(tasks)}`, copy its ~/.cache/huggingface (or $HF_HOME) to this machine and "
                       f"run again with HF_DATASETS_OFFLINE=1 (docs/lm-eval.md)") from None


def download(tasks, include_path=None):
    """Build the tasks without a model: lm-eval downloads their datasets into the Hugging Face cache."""
    loaded = check_tasks(tasks, include_path).load(list(tasks))
    return {name: {split: len(docs) for split, docs in (task.dataset or {}).items()}
            for name, task in loaded["tasks"].items()}


# -----------------------------------------------------------------------------
# results

def save_results(results, path):
    """lm-eval's results JSON (as `lm_eval --output_path` writes it, without the per-item samples)."""
    return save(path, {k: v for k, v in results.items() if k != "samples"}, indent=2, default=handle_non_serializable)


def flat_metrics(results):
    """{"lm_eval/<task>/<metric>": value} for every numeric result (stderr included): the names in
    log.jsonl and wandb. A metric under lm-eval's "none" filter keeps its bare name ("acc"), one
    under another filter gets it appended ("exact_match_strict-match")."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            flat[f"lm_eval/{task}/{metric if filt == 'none' else f'{metric}_{filt}'}"] = value
    for suite, avg in suite_averages(results).items():
        flat[f"lm_eval/{suite}/avg"] = avg
    return flat


def suite_rows(results, suite="commonsense"):
    """[(task, metric, value)] of a suite's tasks present in results."""
    res = results.get("results", {})
    return [(t, m, res[t][f"{m},none"]) for t, m in SUITES[suite].items() if f"{m},none" in res.get(t, {})]


def suite_averages(results):
    """The unweighted mean of each suite's metrics, for suites whose every task was run."""
    rows = {suite: suite_rows(results, suite) for suite in SUITES}
    return {suite: sum(v for _, _, v in r) / len(r) for suite, r in rows.items() if len(r) == len(SUITES[suite])}


# -----------------------------------------------------------------------------
# cross-check with evals/hellaswag.py

def crosscheck_hellaswag(lm, task="hellaswag", limit=None, include_path=None):
    """lm-eval's `task` (HellaSwag, or a local task with the same ctx/endings/label fields) and
    evals.hellaswag.evaluate_hellaswag on the same items and model. -> {"items": per-item records, and each
    side's acc / acc_norm, each recomputed from its own definition (scripts/crosscheck_hellaswag.py says how the
    two differ: the prompt, and acc_norm's division by characters or by tokens)}."""
    results = evaluate(lm, [task], limit=limit, include_path=include_path, log_samples=True)
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    docs = [{"ctx": s["doc"]["ctx"], "endings": list(s["doc"]["endings"]), "label": int(s["doc"]["label"])}
            for s in samples]
    preds = []
    mine = evaluate_hellaswag(lm.model, docs, lm._device, enc=lm.enc, batch_size=lm.batch_size, ctx=lm.ctx,
                              rank=0, world_size=1, predictions=preds)
    items = []
    for s, doc, p in zip(samples, docs, sorted(preds, key=lambda p: p["index"])):
        lls = [float(r[0][0]) for r in s["resps"]]
        chars = [len(a[1].removeprefix(" ")) for a in s["arguments"]]  # a[1]: the continuation, " " + ending
        ntok = [len(lm.enc.encode_ordinary(" " + e)) for e in doc["endings"]]  # render_example's ending tokens
        items.append({
            "doc_id": s["doc_id"], "label": doc["label"],
            "lm_eval": {"ll": lls, "chars": chars, "acc": s["acc"], "acc_norm": s["acc_norm"],
                        "pred": _argmax(lls), "pred_norm": _argmax([ll / n for ll, n in zip(lls, chars)])},
            "evals": {"sum_loss": p["sum_loss"], "ntokens": ntok, "pred": p["pred"], "pred_norm": p["pred_norm"],
                      "pred_by_definition": _argmax([-s_ for s_ in p["sum_loss"]]),
                      "pred_norm_by_definition": _argmax([-s_ / n for s_, n in zip(p["sum_loss"], ntok)])},
        })
    n = len(items)
    return {"task": task, "n": n, "items": items,
            "lm_eval": {k: results["results"][task][f"{k},none"] for k in ("acc", "acc_norm")},
            "lm_eval_by_definition": {"acc": sum(i["lm_eval"]["pred"] == i["label"] for i in items) / n,
                                      "acc_norm": sum(i["lm_eval"]["pred_norm"] == i["label"] for i in items) / n},
            "evals": {"acc": mine["acc"], "acc_norm": mine["acc_norm"]},
            "evals_by_definition": {"acc": sum(i["evals"]["pred_by_definition"] == i["label"] for i in items) / n,
                                    "acc_norm": sum(i["evals"]["pred_norm_by_definition"] == i["label"]
                                                    for i in items) / n},
            "max_ll_diff": max(max(abs(a + b) for a, b in zip(i["lm_eval"]["ll"], i["evals"]["sum_loss"]))
                               for i in items),
            "same_pred": sum(i["lm_eval"]["pred"] == i["evals"]["pred"] for i in items) / n,
            "same_pred_norm": sum(i["lm_eval"]["pred_norm"] == i["evals"]["pred_norm"] for i in items) / n}


def _argmax(xs):
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # the first of equal values, as np.argmax

"""What train.py evaluates every eval_interval steps (training_eval: val loss and BPB, HellaSwag if asked,
the residual diagnostics) and once at the end (plan, run_final_evals: HellaSwag and CORE when their data is
on this machine), and the config keys that choose it (EvalConfig). The functions take the values they
use, or their EvalConfig, never the run's config."""

import os
from dataclasses import dataclass

from checkpoint import kept
from errors import ConfigError, WriteError
from evals import results
from evals.core import core_line, default_bundle_dir, evaluate_core, load_bundle
from evals.hellaswag import evaluate_hellaswag, hellaswag_dir, load_examples
from evals.val import residual_diagnostics, val_loss_bpb
from keys import check, key

NOT_PLAIN = ("hc", "mhc", "mhc_lite", "kromhc", "mhc_v4")   # hc.NOT_PLAIN: the evaluations import no model


@dataclass
class EvalConfig:
    """What a training run evaluates, and when (config keys)."""
    SECTION = "evaluation during and at the end of a run (evals/training.py)"
    eval_interval: int = key(250, "steps between evals (also checkpoints); always at the end", above=0,
                             setting="when evals run, not what is trained or measured (compare.py checks the steps match)")
    eval_tokens: int = key(1_048_576, "fixed val tokens per eval (the same windows every time)", above=0)
    eval_batch_size: int = key(0, "sequences per rank per eval forward; 0 -> batch_size", at_least=0)
    diag_batch_size: int = key(4, "sequences of the fixed val batch for the residual diagnostics", above=0,
                               applies={"scheme": NOT_PLAIN})
    hellaswag: bool = key(False, "also HellaSwag acc_norm at every eval (scripts/eval_hellaswag.py)",
                          setting="whether an optional eval runs (compare.py names a run that lacks a metric)")
    hellaswag_file: str = key("", '"" -> the cached / downloaded validation jsonl', path=True,
                              applies={"hellaswag": (True,), "final_hellaswag": (True,)}, setting="a path")
    hellaswag_limit: int = key(0, "items scored per eval; 0 -> all 10,042", at_least=0, applies={"hellaswag": (True,)})
    final_hellaswag: bool = key(False, "HellaSwag on all items once at the end, if the jsonl is here (hellaswag_file "
                                "or the cache)", setting="whether an optional eval runs")
    final_core: bool = key(False, "CORE (scripts/eval_core.py) once at the end, if the eval bundle is here",
                           setting="whether an optional eval runs")
    core_bundle_dir: str = key("", '"" -> the cache ($HCGPT_CACHE_DIR/eval_bundle, ~/.cache/hcgpt/eval_bundle)',
                               path=True, applies={"final_core": (True,)}, setting="a path")
    core_max_per_task: int = key(-1, "items per CORE task at the end; -1 -> all (nanochat's base_eval), 500: "
                                 "base_train's", applies={"final_core": (True,)})

    def __post_init__(self):
        check(self)



def plan(ec):
    """What a run with EvalConfig ec evaluates beyond val loss: the HellaSwag items of every eval (hellaswag) or
    None, and plan_final_evals' plan for the end; a file the config names that cannot be read refuses the run."""
    examples = None
    if ec.hellaswag:
        try:
            examples = load_examples(ec.hellaswag_file or None, limit=ec.hellaswag_limit or None)
        except (OSError, ValueError, RuntimeError) as e:  # missing file, bad jsonl, failed download
            raise ConfigError(f"config key 'hellaswag': cannot read the HellaSwag items ({e}); set 'hellaswag_file' "
                              f"to a local hellaswag_val.jsonl, or --hellaswag=False") from None
    return examples, plan_final_evals(ec.final_hellaswag, ec.hellaswag_file, ec.final_core, ec.core_bundle_dir)

def training_eval(step, tokens, eval_model, raw_model, val_loader, token_bytes, hellaswag_examples, diag_x, ctx,
                  device, ddp, wandb_run, enc=None):
    """One eval: val loss and BPB, HellaSwag if asked (enc: the run's tokenizer), the residual
    diagnostics on the fixed batch. -> (log record, wandb items beyond the record's numbers (the H_res
    image), the console line's extra part)."""
    val_loss, val_bpb = val_loss_bpb(eval_model, val_loader, token_bytes, ctx, device, ddp)
    record = {"type": "eval", "step": step, "tokens": tokens, "val_loss": val_loss, "val_bpb": val_bpb}
    wandb_data, extra = {}, ""
    if hellaswag_examples is not None:  # every rank scores its share; counts are all-reduced
        hs = evaluate_hellaswag(raw_model, hellaswag_examples, device, enc=enc, ctx=ctx)
        record.update(hellaswag_acc_norm=hs["acc_norm"], hellaswag_acc=hs["acc"], hellaswag_n=hs["n"])
        extra = f" | hellaswag acc_norm {hs['acc_norm']:.4f}"
    if diag_x is not None:
        d = residual_diagnostics(raw_model, diag_x, ctx)
        s = d["scalars"]
        record.update(diag=s, hres=d["matrices"], hres_composite=d["composite"])
        if wandb_run is not None:
            from tracking import hres_image
            wandb_data["hres"] = hres_image(d)
        extra += (f" | composite H_res amax fwd {s['composite/amax_fwd']:.3f} bwd {s['composite/amax_bwd']:.3f}"
                  f" | max |H_res - I| {max(v for k, v in s.items() if k.endswith('/dist_identity')):.2e}")
        means = [v for k, v in s.items() if k.startswith("readout/w_mean/")]
        if means:
            extra += f" | readout w {' '.join(f'{v:.3f}' for v in means)}"
    return record, wandb_data, extra


def plan_final_evals(final_hellaswag, hellaswag_file, final_core, core_bundle_dir):
    """What the end of the run evaluates: {"hellaswag": (path, items) or None, "core": bundle dir or None,
    "skipped": [why]}. Only data on this machine is used (no download); a file or directory the config names must
    be readable (else a ConfigError naming the config key), the default cache may be empty (the eval is skipped)."""
    final = {"hellaswag": None, "core": None, "skipped": []}
    if final_hellaswag:
        path = hellaswag_file or str(hellaswag_dir() / "hellaswag_val.jsonl")
        if os.path.isfile(path):
            try:
                final["hellaswag"] = (path, load_examples(path))
            except (OSError, ValueError) as e:
                raise ConfigError(f"config key 'final_hellaswag': cannot read {path} ({e})") from None
        elif hellaswag_file:
            raise ConfigError(f"config key 'hellaswag_file': {path} does not exist; point it at a local "
                             f"hellaswag_val.jsonl, or leave it empty to use the cache when it is there")
        else:
            final["skipped"].append(f"final_hellaswag: no {path}, so no HellaSwag at the end; copy hellaswag_val.jsonl "
                                    f"there (or set hellaswag_file) and score the checkpoint with scripts/eval_hellaswag.py")
    if final_core:
        bundle = core_bundle_dir or str(default_bundle_dir())
        if os.path.isfile(os.path.join(bundle, "core.yaml")):
            try:
                load_bundle(bundle)
            except (OSError, ValueError) as e:
                raise ConfigError(f"config key 'final_core': {bundle} is not a usable eval bundle ({e})") from None
            final["core"] = bundle
        elif core_bundle_dir:
            raise ConfigError(f"config key 'core_bundle_dir': {bundle} holds no core.yaml; point it at an unpacked "
                             f"eval bundle, or leave it empty to use the cache when it is there")
        else:
            final["skipped"].append(f"final_core: no eval bundle in {bundle}, so no CORE at the end; fetch it with "
                                    f"`python scripts/eval_core.py --download ...` and score the checkpoint with it")
    return final


def run_final_evals(final, raw_model, step, tokens, device, ctx, rt, log, enc, out_dir, core_max_per_task):
    """HellaSwag and CORE (core_max_per_task items per task, -1: all) once, at the end of the run, on
    every rank of Runtime rt (the counts are all-reduced), with enc, the run's tokenizer.
    Logged as a "final" record and written to <out_dir>/hellaswag.json and core.json, as the eval
    scripts write them (plot_runs.py reads them)."""
    record = {"type": "final", "step": step, "tokens": tokens}
    if final["hellaswag"]:
        path, examples = final["hellaswag"]
        hs = evaluate_hellaswag(raw_model, examples, device, enc=enc, ctx=ctx)
        record.update(hellaswag_acc_norm=hs["acc_norm"], hellaswag_acc=hs["acc"], hellaswag_n=hs["n"])
    if final["core"]:
        res = evaluate_core(raw_model, enc, device, final["core"], core_max_per_task, ctx=ctx,
                            log=print if rt.master else None)
        record.update(core=res["core"], core_complete=res["complete"], core_centered=res["centered"])
    if final["skipped"]:
        record["skipped"] = final["skipped"]
    if rt.master:
        for msg in final["skipped"]:
            print(f"note: {msg}")
        parts = [f"hellaswag acc_norm {record['hellaswag_acc_norm']:.4f}" if "hellaswag_acc_norm" in record else "",
                 core_line(res) if "core" in record else ""]
        if any(parts):
            print(f"final step {step}: " + " | ".join(p for p in parts if p))

    def write():  # rank 0 writes; its WriteError stops every rank
        ckpt = os.path.join(out_dir, "ckpt.pt")
        try:
            if final["hellaswag"]:
                results.save_hellaswag(os.path.join(out_dir, "hellaswag.json"), hs, "val", path, step, tokens, ckpt)
            if final["core"]:
                results.save_core(os.path.join(out_dir, "core.json"), res, final["core"], step, tokens, ckpt)
        except OSError as e:
            raise WriteError(f"could not write {e.filename or out_dir} ({e.strerror or e}); {kept(out_dir)}") from None
    rt.on_rank0(write)
    log(record)  # wandb: the record's numbers as final/<key>, also in the run summary (tracking.log_record)
    return {k: record[k] for k in ("hellaswag_acc_norm", "core") if k in record}

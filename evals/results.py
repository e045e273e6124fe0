"""The one writer of every evaluation's results file: hellaswag.json and core.json next to the checkpoint (the eval
scripts, the end of train.py), lm-eval's results JSON, stories_<judge>.json, crosscheck_hellaswag.py's items."""

import json
import os
from pathlib import Path


def save(path, content, indent=1, default=None):
    """content as indented JSON (UTF-8, a final newline) at path, atomically: written to <path>.tmp, then
    renamed over path, so a reader never sees half a file and a failed write leaves the old one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")  # the text is made before the file is opened: a failure leaves none
    tmp.write_text(json.dumps(content, indent=indent, default=default, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def save_hellaswag(path, res, split, data_file, step, tokens, ckpt):
    """hellaswag.json: evaluate_hellaswag's result, the items scored and the checkpoint."""
    return save(path, {"task": "hellaswag", "split": split, **res, "step": step, "tokens": tokens, "ckpt": str(ckpt),
                       "data_file": str(data_file)})


def save_core(path, res, bundle_dir, step, tokens, ckpt):
    """core.json: evaluate_core's result, the bundle and the checkpoint."""
    return save(path, {"task": "core", **res, "step": step, "tokens": tokens, "ckpt": str(ckpt),
                       "bundle_dir": str(bundle_dir)})

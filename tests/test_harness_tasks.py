"""A user's own lm-eval tasks (scripts/eval_lm.py --include-path DIR) that cannot be built end in one line naming
the task file and the fix, before a checkpoint is read or a dataset fetched; following the fix makes the task
load. Offline and fast: lm-eval's index of its built-in tasks is built only where a test says so."""

import functools
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evals import harness  # noqa: E402
from scripts import eval_lm  # noqa: E402

TASK = """task: t_fn
dataset_path: json
dataset_kwargs:
  data_files:
    test: data.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: choices
doc_to_target: label
"""


def task_dir(tmp_path, extra="", name="t_fn.yaml"):
    d = tmp_path / "tasks"
    d.mkdir(exist_ok=True)
    (d / name).write_text(TASK + extra)
    return d


def fails(argv, capsys, *expected):
    """eval_lm.py ends in one line `eval_lm.py: error: ...` holding every expected text, exit status 1."""
    with pytest.raises(SystemExit) as e:
        eval_lm.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("eval_lm.py: error: ") and len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


def download_only(d, tasks="t_fn"):
    return ["--download-only", "--tasks", tasks, "--include-path", str(d)]


def test_a_function_whose_module_file_is_missing(tmp_path, capsys):
    d = task_dir(tmp_path, "process_docs: !function my_utils.process_docs\n")
    fails(download_only(d), capsys, f"{d / 't_fn.yaml'}: `!function my_utils.process_docs` needs "
                                    f"{d / 'my_utils.py'}, which does not exist", "with a function process_docs")
    # the fix: the module beside the YAML; lm-eval then resolves the tag to that function
    (d / "my_utils.py").write_text("def process_docs(dataset):\n    return dataset\n")
    harness.check_task_dir(d)
    assert harness.load_yaml(d / "t_fn.yaml", resolve_func=True)["process_docs"].__module__.endswith("my_utils")


def test_a_module_found_elsewhere_without_the_function_is_not_blamed(tmp_path, capsys):
    """`config` is importable (hcgpt's config.py), so lm-eval would say config has no process_docs; the cause
    is the config.py missing beside the task file."""
    d = task_dir(tmp_path, "process_docs: !function config.process_docs\n")
    fails(download_only(d), capsys, f"needs {d / 'config.py'}, which does not exist",
          "the module 'config' Python finds elsewhere has no 'process_docs'")


def test_a_function_tag_without_a_module(tmp_path, capsys):
    d = task_dir(tmp_path, "process_docs: !function process_docs\n")
    fails(download_only(d), capsys, "`!function process_docs` names no module",
          f"`!function utils.process_docs` and define process_docs in {d / 'utils.py'}")
    (d / "t_fn.yaml").write_text(TASK + "process_docs: !function utils.process_docs\n")  # the fix
    (d / "utils.py").write_text("def process_docs(dataset):\n    return dataset\n")
    harness.check_task_dir(d)


def test_a_function_from_an_importable_module_is_accepted(tmp_path):
    harness.check_task_dir(task_dir(tmp_path, "process_docs: !function json.loads\n"))


@pytest.mark.parametrize("yaml_text,needle", [
    ("task: t_fn\n  dataset_path: [unclosed\n", "t_fn.yaml is not a task file lm-eval can read (ScannerError"),
    ("dataset_path: json\n", "t_fn.yaml is YAML but not an lm-eval task (no 'task:' or 'group:' key)"),
    (TASK.replace("multiple_choice", "multiple_choise"), "output_type 'multiple_choise' is not one of lm-eval's"),
])
def test_a_task_file_lm_eval_cannot_read(yaml_text, needle, tmp_path, capsys):
    d = task_dir(tmp_path)
    (d / "t_fn.yaml").write_text(yaml_text)
    fails(download_only(d), capsys, needle)


def test_include_path_and_tasks_given_a_file(tmp_path, capsys):
    d = task_dir(tmp_path)
    fails(download_only(d / "t_fn.yaml"), capsys, f"--include-path {d / 't_fn.yaml'} is a file",
          f"--include-path {d}")
    fails(download_only(d, tasks=str(d / "t_fn.yaml")), capsys, "--tasks takes task names, not files",
          f"--include-path {d} --tasks <its 'task:' value>")
    fails(download_only(tmp_path / "nowhere"), capsys, "nowhere: no such directory")
    (tmp_path / "empty").mkdir()
    fails(download_only(tmp_path / "empty"), capsys, "no *.yaml task files in it")


def test_an_unknown_task_names_the_close_one(tmp_path, capsys, monkeypatch):
    # only the local tasks in the index: lm-eval's 15,000 built-in ones take seconds to read
    monkeypatch.setattr(harness, "TaskManager", functools.partial(harness.TaskManager, include_defaults=False))
    d = task_dir(tmp_path)
    fails(download_only(d, tasks="t_fnn"), capsys, "unknown task 't_fnn'", "(did you mean t_fn?)",
          "`lm-eval ls tasks`")
    assert "t_fn" in harness.check_tasks(["t_fn"], d).all_tasks  # the name it suggests

"""What the evaluation scripts write, and when they give up: a results path is checked before any model load or
judge call (never a run's log.jsonl, checkpoint or another tool's results: those stay byte-identical), the
grade cache too; the judge of eval_stories.py is stopped by a deadline, by requests in a row without a reply,
and by an HTML page instead of the API, and what was graded is written. Against tests/judge_server.py with
short timeouts; CPU only, no network."""

import importlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import checkpoint  # noqa: E402
from evals import stories  # noqa: E402
from judge_server import JudgeServer, hang, html, reply  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from scripts import eval_core, eval_hellaswag, eval_lm, eval_stories  # noqa: E402

for _lazy in ("openai", "scipy.stats"):  # imported by the scripts on first use: here, so the timings are the judge's
    importlib.import_module(_lazy)
GOOD = '{"grammar": 7, "creativity": 5, "consistency": 8, "plot": 6}'
HELLASWAG = REPO / "tests" / "fixtures" / "hellaswag" / "hellaswag_val_sample.jsonl"
BUNDLE = REPO / "tests" / "fixtures" / "core" / "eval_bundle"
RUN_FILES = ("log.jsonl", "ckpt.pt", "hellaswag.json", "core.json")
OWN = {"eval_hellaswag": "hellaswag.json", "eval_core": "core.json"}


@pytest.fixture(autouse=True)
def own_cache_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HCGPT_CACHE_DIR", str(tmp_path / "hcgpt_cache"))  # never the user's grade cache
    monkeypatch.setenv("OPENAI_API_KEY", "test")


class Loaded(Exception):
    """The script got as far as loading the model."""


@pytest.fixture
def no_load(monkeypatch):
    def load_model(*args, **kwargs):
        raise Loaded
    for module in (checkpoint, eval_hellaswag, eval_core):
        monkeypatch.setattr(module, "load_model", load_model)


@pytest.fixture(scope="module")
def ckpt_bytes(tmp_path_factory):
    torch.manual_seed(1)
    cfg = GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=16, scheme="mhc", n_streams=2)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.save({"model": GPT(cfg).state_dict(), "model_config": asdict(cfg), "step": 7, "config": {}}, path)
    return path.read_bytes()


@pytest.fixture
def run(tmp_path, ckpt_bytes):
    """A run directory as train.py and the eval scripts leave it."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "ckpt.pt").write_bytes(ckpt_bytes)
    (d / "log.jsonl").write_text('{"type": "config", "n_layer": 1}\n{"type": "eval", "step": 7, "val_loss": 9.1}\n')
    (d / "hellaswag.json").write_text('{"task": "hellaswag", "acc_norm": 0.25}\n')
    (d / "core.json").write_text('{"task": "core", "core": 0.01}\n')
    return d


def files(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}


def argv(tool, run, out, url):
    return {"eval_lm": [str(run), "--tasks", "hellaswag", "--device", "cpu", "--output", str(out)],
            "eval_hellaswag": ["--ckpt", str(run), "--data-file", str(HELLASWAG), "--device", "cpu", "--out", str(out)],
            "eval_core": ["--ckpt", str(run), "--bundle-dir", str(BUNDLE), "--device", "cpu", "--out", str(out)],
            "eval_stories": [str(run), "--judge-base-url", url, "--no-cache", "--device", "cpu", "--output",
                             str(out)]}[tool]


MAINS = {"eval_lm": eval_lm.main, "eval_hellaswag": eval_hellaswag.main, "eval_core": eval_core.main,
         "eval_stories": eval_stories.main}


def refused(main, args, capsys, code=2):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == code, err
    return err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- results paths

@pytest.mark.parametrize("tool,name", [(t, n) for t in MAINS for n in RUN_FILES if n != OWN.get(t)])
def test_a_runs_own_files_are_refused_before_any_work(tool, name, run, no_load, capsys):
    before = files(run)
    with JudgeServer(lambda body, n: reply(GOOD)) as srv:
        err = refused(MAINS[tool], argv(tool, run, run / name, srv.url), capsys)
    assert f"{run / name} is a file of the run in {run}" in err and "pass another output path" in err
    assert not srv.requests and files(run) == before  # no judge call, no model load (Loaded), nothing written


@pytest.mark.parametrize("tool", sorted(OWN))
def test_a_tools_own_results_file_is_its_to_rewrite(tool, run, no_load):
    with pytest.raises(Loaded):  # past the output check, into the evaluation
        MAINS[tool](argv(tool, run, run / OWN[tool], "-"))


@pytest.mark.parametrize("tool", sorted(MAINS))
def test_an_output_in_a_missing_folder_is_refused_before_any_work(tool, run, no_load, capsys, tmp_path):
    with JudgeServer(lambda body, n: reply(GOOD)) as srv:
        err = refused(MAINS[tool], argv(tool, run, tmp_path / "missing" / "r.json", srv.url), capsys)
    assert f"the folder {tmp_path / 'missing'} does not exist" in err and not srv.requests


def test_the_default_output_beside_a_checkpoint_is_checked_first(run, no_load, capsys):
    (run / "stories_j.json").mkdir()  # where the default results file would go
    with JudgeServer(lambda body, n: reply(GOOD)) as srv:
        err = refused(eval_stories.main, [str(run), "--judge-base-url", srv.url, "--judge-model", "j", "--no-cache"],
                      capsys)
    assert "argument --output" in err and "stories_j.json is a directory" in err and not srv.requests


def test_an_input_is_never_the_output(run, no_load, capsys, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "beginning": "Once"}\n')
    before = prompts.read_bytes()
    err = refused(eval_stories.main, [str(run), "--prompts", str(prompts), "--output", str(prompts)], capsys)
    assert "is the --prompts file" in err and prompts.read_bytes() == before
    cache = tmp_path / "grades.jsonl"
    err = refused(eval_stories.main, [str(run), "--cache", str(cache), "--output", str(cache)], capsys)
    assert "is the --cache file" in err


# ----------------------------------------------------------------------------- the grade cache

def test_a_runs_log_is_refused_as_the_cache(run, no_load, capsys):
    before = files(run)
    with JudgeServer(lambda body, n: reply(GOOD)) as srv:
        err = refused(eval_stories.main, [str(run), "--judge-base-url", srv.url, "--cache", str(run / "log.jsonl")],
                      capsys)
    assert "error: argument --cache:" in err and "is a file of the run" in err
    assert not srv.requests and files(run) == before


def test_a_file_that_is_not_a_grade_cache_is_refused_before_any_work(run, no_load, capsys, tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"a": 1, "b": [2, 3]}, indent=1))  # several lines, none a grade
    before = notes.read_bytes()
    with JudgeServer(lambda body, n: reply(GOOD)) as srv:
        err = refused(eval_stories.main, [str(run), "--judge-base-url", srv.url, "--cache", str(notes)], capsys,
                      code=1)
    assert f"--cache {notes} is not a grade cache of eval_stories.py" in err and "--no-cache" in err
    assert not srv.requests and notes.read_bytes() == before
    (tmp_path / "dir.jsonl").mkdir()
    err = refused(eval_stories.main, [str(run), "--cache", str(tmp_path / "dir.jsonl")], capsys)
    assert "argument --cache" in err and "is a directory" in err


# ----------------------------------------------------------------------------- a judge that stalls or is not the API

def completions(path, n):
    items = [{"id": f"q{i}", "beginning": f"Tom had {i} red balls and", "completion": f" he gave one to Sam. {i}"}
             for i in range(n)]
    path.write_text(json.dumps({"items": items}))
    return path


def grade_cli(srv, src, out, *extra):
    return ["--completions", str(src), "--judge-base-url", srv.url, "--judge-model", "j", "--no-cache",
            "--output", str(out), *extra]


def test_a_judge_that_never_answers_is_given_up_and_what_was_graded_is_written(tmp_path, capsys):
    src, out = completions(tmp_path / "c.json", 6), tmp_path / "r.json"
    with JudgeServer(lambda body, n: reply(GOOD) if n < 2 else hang()) as srv:
        t0 = time.perf_counter()
        err = refused(eval_stories.main, grade_cli(srv, src, out, "--judge-timeout", "0.3", "--concurrency", "4"),
                      capsys, code=1)
        took = time.perf_counter() - t0
        asked = len(srv.requests)
    assert f"the judge at {srv.url} does not answer: 3 requests in a row got no reply" in err
    assert "2 of 6 items graded, written to" in err
    assert asked == 2 + 4  # the two answers, then one hung request per worker: no retries of a silent judge
    # one item alone would wait its 7 attempts (--retries 6) x 0.3 s before failing, without the backoff
    assert took < 7 * 0.3
    res = json.loads(out.read_text())
    assert res["counts"]["graded"] == 2 and res["counts"]["failed"] == 4
    assert all(it["error"].startswith(f"not graded: the judge at {srv.url} does not answer")
               for it in res["items"] if it["scores"] is None)


def test_requests_in_a_row_means_in_a_row():
    def respond(body, n):  # every other request hangs: each item times out once, then gets its grades
        return hang() if n % 2 == 0 else reply(GOOD)
    its = [{"id": f"p{i}", "beginning": f"b{i}", "completion": "c"} for i in range(3)]
    with JudgeServer(respond) as srv:
        judge = stories.Judge("j", srv.url, api_key="test", timeout=0.2, retries=2, backoff=0.01, give_up=2)
        counts = stories.grade_all(its, "{beginning}***{completion}", "j", 0.0, stories.GradeCache(None), judge,
                                   concurrency=1, log=lambda *a: None)
    assert counts["graded"] == 3 and len(srv.requests) == 6
    with JudgeServer(lambda body, n: hang()) as srv:
        judge = stories.Judge("j", srv.url, api_key="test", timeout=0.2, retries=5, backoff=0.01, give_up=2)
        with pytest.raises(stories.JudgeError, match="does not answer: 2 requests in a row"):
            stories.grade_all(its, "{beginning}***{completion}", "j", 0.0, stories.GradeCache(None), judge,
                              concurrency=1, log=lambda *a: None)
        assert len(srv.requests) == 2


def test_the_deadline_stops_the_grading_and_cuts_the_request_in_flight(tmp_path, capsys):
    src, out = completions(tmp_path / "c.json", 5), tmp_path / "r.json"
    with JudgeServer(lambda body, n: reply(GOOD) if n < 2 else hang()) as srv:
        t0 = time.perf_counter()
        err = refused(eval_stories.main, grade_cli(srv, src, out, "--judge-timeout", "5", "--judge-deadline", "1",
                                                   "--concurrency", "1"), capsys, code=1)
        took = time.perf_counter() - t0
    assert "the grading ran out of time: --judge-deadline 1 s passed; raise --judge-deadline" in err
    assert 1.0 <= took < 5.0  # the request in flight at the deadline did not wait its own 5 s timeout
    res = json.loads(out.read_text())
    assert res["counts"]["graded"] == 2 and res["counts"]["failed"] == 3
    assert all("not graded: the grading ran out of time" in it["error"] for it in res["items"] if it["scores"] is None)


def test_the_deadline_is_printed_before_the_work(tmp_path, capsys):
    src = completions(tmp_path / "c.json", 3)
    eval_stories.main(["--completions", str(src), "--dry-run", "--output", str(tmp_path / "r.json")])
    assert f"stops after {stories.default_deadline(3, 4, 60.0):g} s" in capsys.readouterr().out
    eval_stories.main(["--completions", str(src), "--dry-run", "--judge-deadline", "90", "--output",
                       str(tmp_path / "r.json")])
    assert "stops after 90 s" in capsys.readouterr().out


@pytest.mark.parametrize("status", [200, 404])
def test_an_html_page_is_named(status, tmp_path, capsys):
    src, out = completions(tmp_path / "c.json", 4), tmp_path / "r.json"
    out.write_text("an earlier results file\n")
    with JudgeServer(lambda body, n: html(status=status)) as srv:
        err = refused(eval_stories.main, grade_cli(srv, src, out, "--concurrency", "2"), capsys, code=1)
        asked = len(srv.requests)
    assert err == (f"eval_stories.py: error: the judge at {srv.url} answered HTML, not JSON (HTTP {status}); is "
                   f"--judge-base-url the API base, e.g. http://localhost:8000/v1?")
    assert asked <= 2  # one request per worker, no retry of a page
    assert out.read_text() == "an earlier results file\n"  # nothing was graded: nothing replaced


# ----------------------------------------------------------------------------- --compare

def test_compare_names_why_a_file_has_no_grades(tmp_path, capsys):
    src = completions(tmp_path / "c.json", 3)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    with JudgeServer(lambda body, n: reply("I cannot grade this.")) as srv:
        refused(eval_stories.main, grade_cli(srv, src, a, "--parse-retries", "0"), capsys, code=1)
    with JudgeServer(lambda body, n: reply(GOOD)) as srv:
        eval_stories.main(grade_cli(srv, src, b))
    capsys.readouterr()
    for pair in ((a, b), (b, a)):
        err = refused(eval_stories.main, ["--compare", str(pair[0]), str(pair[1])], capsys, code=1)
        assert f"every item of {a} failed (the first error, on q0: no valid grades in 1 replies" in err
        assert f"--completions {a}" in err


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_judge_timeout_must_be_finite_and_positive(value, capsys):
    """An endless (or nonsensical) per-request timeout would let a judge that never answers hold the grading."""
    from scripts import eval_stories
    with pytest.raises(SystemExit) as e:
        eval_stories.main(["--completions", "x.json", "--judge-timeout", value])
    assert e.value.code == 2 and "--judge-timeout: must be a finite number of seconds > 0" in capsys.readouterr().err

"""Story grades (evals/stories.py, scripts/eval_stories.py) against a real HTTP server on 127.0.0.1 that speaks the
chat-completions protocol to the `openai` client with scripted replies: valid grades, malformed JSON, a 429
with Retry-After, a timeout, a refused key, no server at all. Also seeded generation, the cache, the
intervals and the shipped prompts. CPU only, no network."""

import json
import math
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from conftest import ByteEnc  # noqa: E402
from evals import stories  # noqa: E402
from judge_server import JudgeServer, heuristic_judge, reply  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from scripts import eval_stories  # noqa: E402

GOOD = '{"grammar": 7, "creativity": 5, "consistency": 8, "plot": 6}'


@pytest.fixture(autouse=True)
def own_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HCGPT_CACHE_DIR", str(tmp_path / "hcgpt_cache"))  # never the user's grade cache
RUBRIC = stories.load_rubric(stories.DEFAULT_RUBRIC)


def items(n=4):
    return [{"id": f"p{i}", "beginning": f"Tom had {i} red balls and", "completion": f" he gave one to Sam. {i}"}
            for i in range(n)]


def judge(server, **kw):
    kw = {"api_key": "test", "timeout": 2.0, "retries": 2, "parse_retries": 2, "backoff": 0.01, **kw}
    return stories.Judge("judge-a", server.url if server else "http://127.0.0.1:9/v1", **kw)


def grade(its, server, cache=None, model="judge-a", rubric=RUBRIC, **kw):
    cache = cache or stories.GradeCache(None)
    return stories.grade_all(its, rubric, model, 0.0, cache, judge(server, **kw), concurrency=2, log=lambda *a: None)


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text,ok", [
    (GOOD, True), ("  \n" + GOOD + "\n", True), ("```json\n" + GOOD + "\n```", True),
    ('{"grammar": 7, "creativity": 5, "consistency": 8}', False),                       # a criterion missing
    ('{"grammar": 7, "creativity": 5, "consistency": 8, "plot": 6, "age": 4}', False),  # an extra key
    ('{"grammar": 7.0, "creativity": 5, "consistency": 8, "plot": 6}', False),          # a float
    ('{"grammar": "7", "creativity": 5, "consistency": 8, "plot": 6}', False),          # a string
    ('{"grammar": true, "creativity": 5, "consistency": 8, "plot": 6}', False),         # a bool
    ('{"grammar": 0, "creativity": 5, "consistency": 8, "plot": 6}', False),            # out of 1..10
    ('{"grammar": 11, "creativity": 5, "consistency": 8, "plot": 6}', False),
    ("Grammar: 7/10, creativity 5, consistency 8, plot 6", False),                      # prose
    (GOOD + " I hope this helps!", False), (GOOD + GOOD, False), ("", False), (None, False), ("[7, 5, 8, 6]", False),
])
def test_parse_grades_is_strict(text, ok):
    got = stories.parse_grades(text)
    assert (got == {"grammar": 7, "creativity": 5, "consistency": 8, "plot": 6}) if ok else got is None


def test_render_puts_the_texts_in_once():
    msg = stories.render(RUBRIC, "A {completion} in the beginning", " and the end.")
    assert "A {completion} in the beginning*** and the end." in msg
    assert '{"grammar": g, "creativity": c, "consistency": s, "plot": p}' in msg


# ----------------------------------------------------------------------------- the judge over HTTP

def test_scripted_server_grades_every_item():
    with JudgeServer(lambda body, n: reply(GOOD)) as srv:
        its = items(5)
        counts = grade(its, srv)
    assert counts == {"items": 5, "graded": 5, "failed": 0, "cached": 0, "judged": 5}
    assert all(it["scores"]["consistency"] == 8 and it["replies"] == [GOOD] for it in its)
    body = srv.requests[0]
    assert body["model"] == "judge-a" and body["temperature"] == 0.0
    msgs = [r["messages"][0]["content"] for r in srv.requests]
    assert any("Tom had 0 red balls and*** he gave one to Sam. 0" in m for m in msgs)


def test_malformed_reply_is_asked_again():
    replies = iter(["Sure! Here are my grades: grammar 7", '{"grammar": 7, "creativity": 5', GOOD])
    with JudgeServer(lambda body, n: reply(next(replies))) as srv:
        its = items(1)
        counts = grade(its, srv)
    assert counts["graded"] == 1 and len(srv.requests) == 3
    assert its[0]["replies"][0].startswith("Sure!") and its[0]["scores"]["plot"] == 6


def test_a_judge_that_never_answers_in_json_is_a_counted_failure_not_a_zero():
    with JudgeServer(lambda body, n: reply("7, 5, 8, 6" if "Tom had 1 " in body["messages"][0]["content"]
                                           else GOOD)) as srv:
        its = items(3)
        counts = grade(its, srv, parse_retries=1)
    assert counts == {"items": 3, "graded": 2, "failed": 1, "cached": 0, "judged": 3}
    bad = its[1]
    assert bad["scores"] is None and bad["replies"] == ["7, 5, 8, 6"] * 2
    assert "no valid grades in 2 replies" in bad["error"]
    summary = stories.summarize(its)
    assert summary["grammar"]["n"] == 2 and summary["grammar"]["mean"] == 7.0  # the failure is not a 0 in the mean


def test_rate_limit_waits_for_retry_after():
    def respond(body, n):
        return reply("slow down", status=429, headers={"retry-after-ms": "400"}) if n == 0 else reply(GOOD)

    with JudgeServer(respond) as srv:
        its = items(1)
        t0 = time.perf_counter()
        counts = grade(its, srv, backoff=0.0)
        waited = time.perf_counter() - t0
    assert counts["graded"] == 1 and len(srv.requests) == 2 and waited >= 0.4


def test_rate_limits_past_the_retries_fail_the_item():
    with JudgeServer(lambda body, n: reply("no", status=429, headers={"retry-after": "0"})) as srv:
        its = items(1)
        counts = grade(its, srv, retries=2)
    assert counts["failed"] == 1 and len(srv.requests) == 3 and "RateLimitError after 3 attempts" in its[0]["error"]


def test_timeout_is_retried():
    with JudgeServer(lambda body, n: reply(GOOD, delay=1.5 if n == 0 else 0.0)) as srv:
        its = items(1)
        counts = grade(its, srv, timeout=0.3)
    assert counts["graded"] == 1 and len(srv.requests) == 2


def test_server_errors_are_retried_and_refusals_stop_the_run():
    with JudgeServer(lambda body, n: reply("boom", status=500) if n == 0 else reply(GOOD)) as srv:
        assert grade(items(1), srv)["graded"] == 1 and len(srv.requests) == 2
    with JudgeServer(lambda body, n: reply("invalid api key", status=401)) as srv:
        with pytest.raises(stories.JudgeError, match=r"refused the request with HTTP 401.*OPENAI_API_KEY"):
            grade(items(6), srv)
        assert len(srv.requests) <= 2  # the other worker stops too: no request per item


def test_unreachable_judge_is_an_error():
    with pytest.raises(stories.JudgeError, match=r"cannot reach the judge at http://127.0.0.1:9/v1.*--judge-base-url"):
        grade(items(2), None, retries=1)


def test_no_key_is_an_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(stories.JudgeError, match=r"OPENAI_API_KEY is not set.*--dry-run"):
        stories.Judge("judge-a", "http://127.0.0.1:9/v1")


def test_concurrency_keeps_requests_in_flight():
    live, peak, lock = [0], [0], threading.Lock()

    def respond(body, n):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.15)
        with lock:
            live[0] -= 1
        return reply(GOOD)

    with JudgeServer(respond) as srv:
        its = items(8)
        stories.grade_all(its, RUBRIC, "judge-a", 0.0, stories.GradeCache(None), judge(srv), concurrency=4,
                          log=lambda *a: None)
    assert peak[0] == 4 and all(it["scores"] for it in its)


# ----------------------------------------------------------------------------- cache

def test_cache_makes_reruns_free_and_keys_on_model_rubric_and_texts(tmp_path):
    path = tmp_path / "grades.jsonl"
    with JudgeServer(lambda body, n: reply(GOOD)) as srv:
        grade(items(3), srv, stories.GradeCache(path))
        assert len(srv.requests) == 3
        again = items(3)
        counts = grade(again, srv, stories.GradeCache(path))  # a new process: read back from the file
        assert len(srv.requests) == 3 and counts["cached"] == 3 and again[2]["replies"] == [GOOD]
        grade(items(3), srv, stories.GradeCache(path), model="judge-b")       # another judge: asked again
        assert len(srv.requests) == 6
        grade(items(3), srv, stories.GradeCache(path), rubric=RUBRIC + " ")   # another rubric: asked again
        assert len(srv.requests) == 9
        changed = items(3)
        changed[0]["completion"] += "!"
        grade(changed, srv, stories.GradeCache(path))                         # another completion: asked again
        assert len(srv.requests) == 10
    with open(path, "a") as f:
        f.write('{"key": "torn')  # a run killed mid-write
    assert len(stories.GradeCache(path).entries) == 10


def test_failures_are_not_cached(tmp_path):
    path = tmp_path / "grades.jsonl"
    with JudgeServer(lambda body, n: reply("not json" if n < 2 else GOOD)) as srv:
        its = items(1)
        grade(its, srv, stories.GradeCache(path), parse_retries=1)
        assert its[0]["scores"] is None
        assert grade(items(1), srv, stories.GradeCache(path))["graded"] == 1 and len(srv.requests) == 3


# ----------------------------------------------------------------------------- statistics

def test_mean_ci_is_the_student_t_interval():
    from scipy import stats
    vals = [7, 5, 8, 6, 9, 7]
    s = stories.mean_ci(vals)
    half = stats.t.ppf(0.975, 5) * stats.tstd(vals) / math.sqrt(6)
    assert s["mean"] == pytest.approx(7.0) and s["ci95"] == pytest.approx([7.0 - half, 7.0 + half]) and s["n"] == 6
    assert stories.mean_ci([4])["ci95"] is None and stories.mean_ci([]) == {"mean": None, "ci95": None, "n": 0}
    assert stories.mean_ci([6, 6, 6])["ci95"] == [6, 6]


def test_compare_pairs_by_prompt():
    def res(grades):
        return {"items": [{"id": f"p{i}", "beginning": "b", "completion": "c",
                           "scores": None if g is None else dict.fromkeys(stories.CRITERIA, g)}
                          for i, g in enumerate(grades)]}
    d = stories.compare(res([5, 6, 7, None]), res([6, 8, 7, 9]))
    assert d["pairs"] == 3 and d["plot"]["mean"] == pytest.approx(1.0)  # (1 + 2 + 0) / 3; p3 failed in A
    with pytest.raises(ValueError, match="no graded prompt in common"):
        stories.compare(res([5]), {"items": []})


# ----------------------------------------------------------------------------- generation

class ScriptedLM:
    """Stands in for GPT in GPT.generate: logits put all mass on the next token of `script`."""

    def __init__(self, script, vocab=257, block_size=64):
        self.script, self.vocab = script, vocab
        self.config = type("C", (), {"block_size": block_size})()
        self.calls = 0

    def __call__(self, idx):
        logits = torch.full((idx.size(0), idx.size(1), self.vocab), -10.0)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits, None

    generate = GPT.generate


def test_completion_stops_at_end_of_text():
    enc = ByteEnc()
    lm = ScriptedLM([ord("H"), ord("i"), enc.eot_token, ord("X")])
    out = stories.complete(lm, enc, "Say", max_new_tokens=10)
    assert out == {"completion": "Hi", "new_tokens": 2, "ended": True} and lm.calls == 3
    out = stories.complete(ScriptedLM([ord("a")]), enc, "Say", max_new_tokens=5)
    assert out == {"completion": "aaaaa", "new_tokens": 5, "ended": False}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1, n_head=2, n_embd=16, scheme="kromhc",
                         n_streams=4)).eval()


def test_seeded_generation_is_deterministic(tiny_model):
    enc = ByteEnc()

    def gen(beginning, seed, temperature=1.0):
        return stories.complete(tiny_model, enc, beginning, 12, temperature, None, seed)["completion"]

    a = gen("Once upon a time", 1)
    gen("Another story first", 1)  # what ran before does not matter: each beginning has its own generator
    assert gen("Once upon a time", 1) == a
    assert len({gen("Once upon a time", s) for s in range(5)}) > 1  # the seed matters when sampling
    assert gen("Once upon a time", 1, 0.0) == gen("Once upon a time", 2, 0.0)  # greedy: no seed plays a part


# ----------------------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(1)
    cfg = GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=16, scheme="mhc", n_streams=2)
    torch.save({"model": GPT(cfg).state_dict(), "model_config": asdict(cfg), "step": 7, "config": {}}, d / "ckpt.pt")
    return d


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    beginnings = ["Lily had a red ball and", "The dog ran to the", "Sam was sad because"]
    p.write_text("".join(json.dumps({"id": f"q{i}", "beginning": b}) + "\n" for i, b in enumerate(beginnings)))
    return p


def test_eval_stories_end_to_end(ckpt, prompts, tmp_path, monkeypatch, capsys, enc):
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    args = [str(ckpt), "--prompts", str(prompts), "--max-new-tokens", "4", "--device", "cpu",
            "--cache", str(tmp_path / "c.jsonl"), "--judge-model", "stand-in"]
    with JudgeServer(heuristic_judge(RUBRIC)) as srv:
        args += ["--judge-base-url", srv.url]
        assert eval_stories.main(args + ["--dry-run"])["calls"] == 3 and not srv.requests
        assert "3 calls to make for 3 completions" in capsys.readouterr().out
        res = eval_stories.main(args)
        assert len(srv.requests) == 3
        out = json.loads((ckpt / "stories_stand-in.json").read_text())
        assert out["counts"]["graded"] == 3 and out["step"] == 7 and out["generation"]["temperature"] == 0.0
        for it, want in zip(out["items"], ["Lily had a red ball and", "The dog ran to the", "Sam was sad because"]):
            assert it["beginning"] == want and it["replies"] and set(it["scores"]) == set(stories.CRITERIA)
            assert any("***" + it["completion"] in r["messages"][0]["content"] for r in srv.requests)
        for c in stories.CRITERIA:
            assert out["summary"][c]["mean"] == pytest.approx(sum(it["scores"][c] for it in out["items"]) / 3)
        printed = capsys.readouterr().out
        assert "3/3 graded" in printed and "grammar" in printed and "95% CI" in printed
        # a rerun costs nothing; re-grading the written completions with another judge asks again
        eval_stories.main(args + ["--output", str(tmp_path / "again.json")])
        assert len(srv.requests) == 3
        again = json.loads((tmp_path / "again.json").read_text())
        assert [it["completion"] for it in again["items"]] == [it["completion"] for it in out["items"]]
        eval_stories.main(["--completions", str(tmp_path / "again.json"), "--judge-base-url", srv.url,
                           "--judge-model", "other", "--cache", str(tmp_path / "c.jsonl"), "--output",
                           str(tmp_path / "regraded.json")])
        assert len(srv.requests) == 6
        assert json.loads((tmp_path / "regraded.json").read_text())["checkpoint"] == str(ckpt)
        capsys.readouterr()
        diff = eval_stories.main(["--compare", str(ckpt / "stories_stand-in.json"), str(tmp_path / "again.json")])
        assert diff["pairs"] == 3 and all(diff[c]["mean"] == 0 for c in stories.CRITERIA)
        assert "B - A over 3 prompts" in capsys.readouterr().out
    assert res["counts"]["items"] == 3


def test_eval_stories_reports_failures_and_exits_1(ckpt, prompts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    with JudgeServer(lambda body, n: reply("I cannot grade this.")) as srv:
        with pytest.raises(SystemExit) as e:
            eval_stories.main([str(ckpt), "--prompts", str(prompts), "--max-new-tokens", "2", "--device", "cpu",
                               "--no-cache", "--judge-base-url", srv.url, "--parse-retries", "0",
                               "--output", str(tmp_path / "r.json")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "3 of 3 items failed and are not in the means" in err and "failed q0: no valid grades" in err
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["counts"]["failed"] == 3 and out["summary"]["plot"]["mean"] is None
    assert all(it["scores"] is None and it["replies"] == ["I cannot grade this."] for it in out["items"])


@pytest.mark.parametrize("content,match", [
    ('{"id": "a", "beginning": "x"}\n{"id": "b", "beginning": \n', r"prompts.jsonl:2: not a JSON line"),
    ('{"id": "a", "text": "x"}\n', r"prompts.jsonl:1: no non-empty string 'beginning'"),
    ('{"id": "a", "beginning": "x"}\n{"id": "a", "beginning": "y"}\n', r"id 'a' appears twice"),
    ("\n\n", r"no story beginnings"),
])
def test_bad_prompts_file(tmp_path, content, match, ckpt, monkeypatch, capsys):
    p = tmp_path / "prompts.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        stories.load_prompts(p)
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    with pytest.raises(SystemExit) as e:
        eval_stories.main([str(ckpt), "--prompts", str(p), "--dry-run", "--device", "cpu"])
    assert e.value.code == 1 and "eval_stories.py: error:" in capsys.readouterr().err


def test_cli_errors_before_any_work(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SystemExit) as e:
        eval_stories.main([str(ckpt), "--device", "cpu"])
    assert e.value.code == 1 and "OPENAI_API_KEY is not set" in capsys.readouterr().err
    rubric = tmp_path / "r.md"
    rubric.write_text("Grade this: {beginning}")
    with pytest.raises(SystemExit):
        eval_stories.main([str(ckpt), "--rubric", str(rubric), "--dry-run"])
    assert "needs {completion} exactly once" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        eval_stories.main([])
    assert e.value.code == 2
    notes = tmp_path / "notes.json"
    notes.write_text('{"items": [{"id": "a", "beginning": "x"}]}')
    with pytest.raises(SystemExit):
        eval_stories.main(["--completions", str(notes), "--dry-run"])
    assert "notes.json: not a results file of eval_stories.py" in capsys.readouterr().err


def test_dry_run_needs_no_key_and_makes_no_call(ckpt, prompts, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    got = eval_stories.main([str(ckpt), "--prompts", str(prompts), "--max-new-tokens", "2", "--device", "cpu",
                             "--dry-run", "--judge-base-url", "http://127.0.0.1:9/v1"])
    assert got == {"calls": 3, "cached": 0, "items": 3}
    assert "story_grades.jsonl" in capsys.readouterr().out and not (tmp_path / "hcgpt_cache").exists()


def test_shipped_prompts_and_rubric():
    ps = stories.load_prompts(stories.DEFAULT_PROMPTS)
    assert len(ps) >= 50 and len({p["beginning"] for p in ps}) == len(ps)
    assert sum(not p["beginning"].rstrip().endswith((".", "!", "?", '"')) for p in ps) >= 40  # cut mid-sentence
    assert all(k in RUBRIC for k in ("grammar", "creativity", "consistency", "plot", "***"))

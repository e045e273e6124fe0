"""Story grades from an LLM judge, after the TinyStories paper's GPT-Eval (Eldan & Li 2023, arXiv
2305.07759, Sec. 3): a model completes the beginning of a story; the judge reads the beginning, a ***
separator and the completion, and grades the completion's grammar, creativity, consistency with the
beginning and plot, each an integer from 1 to 10.

scripts/eval_stories.py is the command line; docs/tinystories.md the page.
"""

import hashlib
import json
import math
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch

from errors import ConfigError
from setting import mean_interval

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = REPO / "data" / "tinystories_prompts.jsonl"
DEFAULT_RUBRIC = REPO / "data" / "tinystories_rubric.md"
DEFAULT_JUDGE = "gpt-4.1-nano"
CRITERIA = ("grammar", "creativity", "consistency", "plot")
_FIELD = re.compile(r"\{(beginning|completion)\}")
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.S)


class JudgeError(ConfigError):
    """The judge cannot be used (no key, unreachable, refused, silent, a web page instead of the API, past the
    deadline): the grading stops, naming the fix."""


# ----------------------------------------------------------------------------- inputs

def read_text(path, flag, fix) -> str:
    """A UTF-8 input file's text; ConfigError naming the flag, the cause and `fix` when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag} {path}: cannot read it ({e}); {fix}") from None


def load_prompts(path) -> list[dict]:
    """[{'id', 'beginning'}] from a .jsonl file (one {"id": ..., "beginning": ...} object a line; id optional)
    or any other text file (one beginning a line, its line number as id). ConfigError naming the line."""
    path = Path(path)
    text = read_text(path, "--prompts", "pass a UTF-8 .jsonl or text file")
    fix = 'each line one JSON object {"id": "...", "beginning": "..."}'
    items, seen = [], set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{path}:{lineno}: not a JSON line ({e}); {fix}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("beginning"), str) or not obj["beginning"].strip():
                raise ConfigError(f"{path}:{lineno}: no non-empty string 'beginning'; {fix}")
            pid, beginning = str(obj.get("id", lineno)), obj["beginning"]
        else:
            pid, beginning = str(lineno), line
        if pid in seen:
            raise ConfigError(f"{path}:{lineno}: id {pid!r} appears twice; give every prompt its own id")
        seen.add(pid)
        items.append({"id": pid, "beginning": beginning})
    if not items:
        raise ConfigError(f"--prompts {path}: no story beginnings in it; {fix}")
    return items


def load_rubric(path) -> str:
    rubric = read_text(path, "--rubric", "pass a UTF-8 text file")
    for name in ("beginning", "completion"):
        if rubric.count("{" + name + "}") != 1:
            raise ConfigError(f"--rubric {path}: needs {{{name}}} exactly once (where the judge reads the "
                              f"{name}), found {rubric.count('{' + name + '}')}")
    return rubric


def render(rubric: str, beginning: str, completion: str) -> str:
    """The judge's message: the rubric with the beginning and the completion in place (one pass, so text
    that happens to contain '{completion}' stays as it is)."""
    return _FIELD.sub(lambda m: beginning if m.group(1) == "beginning" else completion, rubric)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- completions

def prompt_seed(seed: int, beginning: str) -> int:
    """The sampling seed of one beginning: fixed by (seed, text), so a completion does not depend on the
    order of the prompts file or on which other prompts are in it."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{beginning}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def complete(model, enc, beginning: str, max_new_tokens=400, temperature=0.0, top_k=None, seed=0,
             device="cpu", ctx=None) -> dict:
    """One completion of a beginning: {'completion', 'new_tokens', 'ended'} (ended: the model produced the
    end-of-text token, which is not part of the text; otherwise it ran into max_new_tokens). The context is
    <|endoftext|> + beginning, as every training document starts after one. temperature 0 is greedy."""
    ids = ([enc.eot_token] + enc.encode_ordinary(beginning))[-model.config.block_size:]
    x = torch.tensor(ids, dtype=torch.long, device=device)[None]
    gen = torch.Generator(device=device).manual_seed(prompt_seed(seed, beginning))
    with ctx or nullcontext():
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, stop_token=enc.eot_token,
                           generator=gen)
    new = y[0, len(ids):].tolist()
    ended = enc.eot_token in new
    if ended:
        new = new[:new.index(enc.eot_token)]
    text = enc.decode([i for i in new if i < enc.n_vocab])  # ids past the vocabulary: the embedding's padding
    return {"completion": text, "new_tokens": len(new), "ended": ended}


# ----------------------------------------------------------------------------- the judge

def parse_grades(reply) -> dict | None:
    """{criterion: int} from a reply that is one JSON object with exactly the four criteria as integers in
    1..10 (surrounding whitespace and one ``` fence allowed); None for anything else: no number is guessed."""
    if not isinstance(reply, str):
        return None
    text = reply.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if isinstance(obj, dict) and set(obj) == set(CRITERIA) and \
            all(type(obj[c]) is int and 1 <= obj[c] <= 10 for c in CRITERIA):  # bool, float, "7": refused
        return {c: obj[c] for c in CRITERIA}
    return None


class Judge:
    """Grades through an OpenAI-compatible chat-completions API with the `openai` client.

    Rate limits (429), timeouts, dropped connections and server errors (5xx) are retried up to `retries` times,
    waiting the server's Retry-After or backoff * 2^k (jittered, at most max_wait s); a reply that does not parse
    is asked for again up to `parse_retries` times; then the item fails. Errors every request would repeat (a bad
    key or model, a refused request, a judge unreachable after the retries, an HTML page instead of the API's
    JSON), `give_up` requests in a row without a reply (a server that accepts connections but never answers
    would otherwise cost (retries + 1) x timeout per item) and the passing of `until` (grade_all's
    time.monotonic() deadline, which also cuts requests and waits short) raise JudgeError and stop the run."""

    def __init__(self, model=DEFAULT_JUDGE, base_url=None, api_key=None, temperature=0.0, timeout=60.0,
                 retries=6, parse_retries=2, backoff=1.0, max_wait=60.0, max_tokens=100, give_up=3):
        import openai

        api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise JudgeError("OPENAI_API_KEY is not set; export the judge's API key (a local server that takes "
                             "none accepts any value, e.g. OPENAI_API_KEY=none), or use --dry-run to count the calls")
        self.model, self.base_url, self.temperature, self.timeout = model, base_url, temperature, timeout
        self.retries, self.parse_retries, self.backoff, self.max_wait = retries, parse_retries, backoff, max_wait
        self.max_tokens, self.give_up = max_tokens, give_up
        self.stop = threading.Event()  # set when the run is stopping: no new request, no more waiting
        self.until, self.deadline = None, None  # grade_all's deadline: monotonic time, and its seconds
        self.silent, self.lock = 0, threading.Lock()  # requests in a row that timed out, over all workers
        self.openai = openai
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self.where = str(self.client.base_url).rstrip("/")  # also OPENAI_BASE_URL's, which the client reads

    def _left(self):
        """Seconds to the deadline (None: no deadline); JudgeError once it has passed."""
        if self.until is None:
            return None
        left = self.until - time.monotonic()
        if left <= 0:
            raise JudgeError(f"the grading ran out of time: --judge-deadline {self.deadline:g} s passed; raise "
                             f"--judge-deadline, or rerun the same command to grade the rest")
        return left

    def _wait(self, attempt, error):
        headers = getattr(getattr(error, "response", None), "headers", None) or {}
        for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
            try:
                wait = float(headers[name]) * scale
                break
            except (KeyError, TypeError, ValueError):
                pass
        else:  # no usable Retry-After
            wait = self.backoff * 2 ** attempt * (0.5 + random.random())
        left = self._left()
        self.stop.wait(min(max(wait, 0.0), self.max_wait, math.inf if left is None else left))

    def _answered(self, timed_out=False):
        """Count the requests in a row that got no reply; JudgeError at give_up of them (any reply resets it)."""
        with self.lock:
            self.silent = self.silent + 1 if timed_out else 0
            silent = self.silent
        if timed_out:
            self._left()  # a request cut short by the deadline is the deadline's failure
            if self.give_up and silent >= self.give_up:
                raise JudgeError(f"the judge at {self.where} does not answer: {silent} requests in a row got no "
                                 f"reply within --judge-timeout {self.timeout:g} s; check that the server behind "
                                 f"--judge-base-url is serving (it accepts connections), or raise --judge-timeout "
                                 f"for a slow judge")

    def _not_the_api(self, text, status=200):
        """JudgeError for a reply that is not the API's JSON (a proxy's or a login page: a wrong URL)."""
        text = (text or "").strip()
        what = "HTML" if text.startswith("<") else f"text ({text[:60]!r})"
        return JudgeError(f"the judge at {self.where} answered {what}, not JSON (HTTP {status}); is --judge-base-url "
                          f"the API base, e.g. http://localhost:8000/v1?")

    def ask(self, message: str) -> str:
        """The judge's raw reply to one message (transient errors retried); JudgeError when it cannot answer."""
        oa = self.openai
        transient = (oa.RateLimitError, oa.APITimeoutError, oa.APIConnectionError, oa.InternalServerError)
        for attempt in range(self.retries + 1):
            if self.stop.is_set():
                raise JudgeError("stopped")
            left = self._left()
            try:
                resp = self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": message}],
                    temperature=self.temperature, max_tokens=self.max_tokens,
                    timeout=self.timeout if left is None else min(self.timeout, left))
            except transient as e:
                self._answered(timed_out=isinstance(e, oa.APITimeoutError))
                if attempt == self.retries:
                    if isinstance(e, oa.APIConnectionError) and not isinstance(e, oa.APITimeoutError):
                        raise JudgeError(f"cannot reach the judge at {self.where} ({e}); check --judge-base-url "
                                         f"and that the server is up (grades so far are in the cache: a rerun "
                                         f"does not pay for them again)") from None
                    raise TransientFailure(f"{type(e).__name__} after {self.retries + 1} attempts: {e}") from None
                self._wait(attempt, e)
            except oa.APIStatusError as e:  # 400, 401, 403, 404, ...: every request would get the same answer
                self._answered()
                if "html" in e.response.headers.get("content-type", "") or e.response.text.lstrip().startswith("<"):
                    raise self._not_the_api(e.response.text, e.status_code) from None
                raise JudgeError(f"the judge at {self.where} refused the request with HTTP {e.status_code} "
                                 f"({str(e)[:300]}); check OPENAI_API_KEY, --judge-model and --judge-base-url"
                                 ) from None
            else:
                self._answered()
                if isinstance(resp, str):  # the client hands back a 200 reply that is not JSON as its text
                    raise self._not_the_api(resp)
                return resp.choices[0].message.content if resp.choices else None

    def grade(self, beginning: str, completion: str, rubric: str) -> dict:
        """{'scores': {criterion: int} or None, 'replies': [raw replies in order], 'error': None or why}."""
        message = render(rubric, beginning, completion)
        replies = []
        for _ in range(self.parse_retries + 1):
            try:
                reply = self.ask(message)
            except TransientFailure as e:
                return {"scores": None, "replies": replies, "error": str(e)}
            replies.append(reply)
            scores = parse_grades(reply)
            if scores is not None:
                return {"scores": scores, "replies": replies, "error": None}
        return {"scores": None, "replies": replies,
                "error": f"no valid grades in {len(replies)} replies (one JSON object with four integers 1-10 "
                         f"was asked for)"}


class TransientFailure(Exception):
    """Rate limits or timeouts outlasted the retries: this item fails, the run goes on."""


# ----------------------------------------------------------------------------- cache

def cache_key(judge_model: str, rubric: str, temperature: float, beginning: str, completion: str) -> str:
    """What a grade depends on. The server's URL is not in it: a model name means the same judge anywhere."""
    return sha256(json.dumps([judge_model, sha256(rubric), float(temperature), beginning, completion]))


class GradeCache:
    """Valid grades already paid for, one JSON object a line in a file that only grows (a torn last line, from
    a killed run, is skipped). Failures are not cached: a rerun asks again. A file that cannot be read, or
    that holds lines but no grade (another file passed as the cache, which the grades would be appended
    to), is a ConfigError when the cache is opened: before the work."""

    def __init__(self, path):
        self.path = Path(path) if path else None
        self.entries, self.lock = {}, threading.Lock()
        if self.path is None or not self.path.exists():
            return
        fix = "pass another --cache, or --no-cache"
        lines = [line for line in read_text(self.path, "--cache", fix).splitlines() if line.strip()]
        for line in lines:
            try:
                e = json.loads(line)
                if parse_grades(json.dumps(e["scores"])) is not None:
                    self.entries[e["key"]] = e
            except (ValueError, KeyError, TypeError):
                continue
        if lines[:-1] and not self.entries:  # a lone line may be the torn first write of a killed run
            raise ConfigError(f"--cache {self.path} is not a grade cache of eval_stories.py (none of its "
                              f"{len(lines)} lines is a grade, and grades would be appended to it); {fix}")

    def put(self, key, entry):
        entry = {"key": key, **entry}
        with self.lock:
            self.entries[key] = entry
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry, ensure_ascii=False) + "\n")


def default_deadline(calls, concurrency, timeout) -> float:
    """Seconds for grading `calls` requests: twice what they take when every one waits the whole timeout, at
    least 10 minutes (a judge that answers takes a small part of it; one that stalls is stopped by it)."""
    return max(600.0, 2.0 * timeout * math.ceil(calls / max(1, concurrency)))


def grade_all(items, rubric, judge_model, temperature, cache, judge, concurrency=4, log=print, deadline=None) -> dict:
    """Grade every item ({'beginning', 'completion', ...}) in place: adds 'scores', 'replies', 'error', 'cached'.
    Cached items first; the rest through `judge`, within `deadline` seconds (None: no limit). -> counts. When the
    judge stops the run (JudgeError), every item it did not grade gets the cause as its error, then the
    JudgeError is raised: the caller can still write what was graded."""
    todo = []
    for item in items:
        key = cache_key(judge_model, rubric, temperature, item["beginning"], item["completion"])
        hit = cache.entries.get(key)
        if hit is not None:
            item.update(scores=hit["scores"], replies=hit["replies"], error=None, cached=True)
        else:
            todo.append((key, item))
    if todo and deadline is not None:
        judge.until, judge.deadline = time.monotonic() + deadline, deadline
    done, causes, lock = [0], [], threading.Lock()

    def one(job):
        key, item = job
        try:
            result = judge.grade(item["beginning"], item["completion"], rubric)
        except JudgeError as e:
            judge.stop.set()  # the other workers stop instead of retrying a judge that cannot answer
            with lock:
                causes.append(e)  # in the order they happened: the first is the cause
            raise
        item.update(result, cached=False)
        if result["scores"] is not None:
            cache.put(key, {"judge_model": judge_model, "scores": result["scores"], "replies": result["replies"]})
        with lock:
            done[0] += 1
            if done[0] % 10 == 0 or done[0] == len(todo):
                log(f"graded {done[0]}/{len(todo)}")

    if todo:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            futures = [pool.submit(one, job) for job in todo]
            errors = [f.exception() for f in futures]  # waits for all
        first = next((e for e in causes if str(e) != "stopped"), None)
        first = first or next((e for e in errors if e is not None), None)
        if first is not None:
            for _, item in todo:
                if "scores" not in item:
                    item.update(scores=None, replies=[], error=f"not graded: {first}", cached=False)
            raise first
    return counts(items)


def counts(items) -> dict:
    """{'items', 'graded', 'failed', 'cached', 'judged' (not from the cache)} of items that grade_all went through."""
    failed = sum(item.get("scores") is None for item in items)
    cached = sum(bool(item.get("cached")) for item in items)
    return {"items": len(items), "graded": len(items) - failed, "failed": failed, "cached": cached,
            "judged": len(items) - cached}


# ----------------------------------------------------------------------------- statistics

def mean_ci(values) -> dict:
    """{'mean', 'ci95': [lo, hi], 'n'}: the mean and its Student-t interval (setting.mean_interval); no interval
    from fewer than 2 values, a zero-width one when they are all equal."""
    if not values:
        return {"mean": None, "ci95": None, "n": 0}
    mean, _, n, ci = mean_interval(values)
    return {"mean": mean, "ci95": [float(ci[0]), float(ci[1])] if ci else None, "n": n}


def summarize(items) -> dict:
    """{criterion: mean_ci over the graded items}; failed items are left out (and counted elsewhere)."""
    graded = [item["scores"] for item in items if item.get("scores")]
    return {c: mean_ci([s[c] for s in graded]) for c in CRITERIA}


def compare(a: dict, b: dict, names=("A", "B")) -> dict:
    """Two result files (the --output JSON; names: their paths), paired by (id, beginning): {criterion: mean_ci
    of b - a over the prompts graded in both}, plus 'pairs'. A file with no graded item is named with its first
    error: that, not the pairing, is what to fix."""
    def by_prompt(res):
        return {(it["id"], it["beginning"]): it["scores"] for it in res["items"] if it.get("scores")}

    sa, sb = by_prompt(a), by_prompt(b)
    for res, graded, name in ((a, sa, names[0]), (b, sb, names[1])):
        if res["items"] and not graded:
            first = next((it for it in res["items"] if it.get("error")), None)
            why = f"the first error, on {first['id']}: {first['error']}" if first else "no item has grades"
            raise ConfigError(f"every item of {name} failed ({why}); fix that, grade its completions again with "
                              f"`python scripts/eval_stories.py --completions {name}`, and compare the new file")
    common = [k for k in sa if k in sb]
    if not common:
        raise ConfigError("the two result files have no graded prompt in common (same id and beginning); "
                          "compare runs made on the same prompts file")
    out = {c: mean_ci([sb[k][c] - sa[k][c] for k in common]) for c in CRITERIA}
    out["pairs"] = len(common)
    return out


def format_row(name, s) -> str:
    if s["mean"] is None:
        return f"{name:12s}    -   (no graded items)"
    ci = f"[{s['ci95'][0]:5.2f}, {s['ci95'][1]:5.2f}]" if s["ci95"] else "[  n/a       ]"
    return f"{name:12s} {s['mean']:6.2f}  95% CI {ci}  n={s['n']}"

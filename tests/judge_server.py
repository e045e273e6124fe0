"""A scripted stand-in for an LLM judge: an HTTP server on 127.0.0.1 that speaks the OpenAI
chat-completions protocol (POST /v1/chat/completions), for the tests of scripts/eval_stories.py and
for trying the grading end to end without an API key. It is not a language model.

    python tests/judge_server.py --port 8011       # then: --judge-base-url http://127.0.0.1:8011/v1

Run as a script it answers every request with grades computed from surface features of the completion
(heuristic_grades: sentence punctuation, distinct words, words shared with the beginning, whether it
ends on a full stop); such grades only show that the pipeline works, not how good a story is. The tests
give JudgeServer their own `respond(body, n)`, which scripts each reply: text, malformed JSON, a 429
with Retry-After, a delay past the client's timeout, any status, no answer at all (hang), an HTML page
(html). --mode hang / html runs the last two by hand.
"""

import argparse
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evals import stories  # noqa: E402


def reply(content, status=200, headers=None, delay=0.0):
    """One scripted answer: a chat completion whose message is `content` (status 200), or an error body."""
    return {"content": content, "status": status, "headers": headers or {}, "delay": delay}


def hang():
    """No answer: the request is read and the connection held open until the server closes (a judge that
    accepts connections but is stuck)."""
    return {"hang": True}


LOGIN_PAGE = "<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body><form>Password</form></body></html>\n"


def html(page=LOGIN_PAGE, status=200):
    """An HTML page instead of the API's JSON: what a proxy or a login page answers at a wrong URL."""
    return {"raw": page, "status": status, "headers": {}, "delay": 0.0}


class JudgeServer:
    """ThreadingHTTPServer on a free port of 127.0.0.1 in a daemon thread. respond(body, n) -> reply(...)
    for the n-th request (0-based, in arrival order); `requests` holds every request body."""

    def __init__(self, respond, port=0):
        self.respond, self.requests, self.lock = respond, [], threading.Lock()
        self.closed = threading.Event()  # releases the requests that hang()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    n = len(server.requests)
                    server.requests.append(body)
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}}, {})
                r = server.respond(body, n)
                if r.get("hang"):
                    server.closed.wait()
                    return
                if "raw" in r:
                    return self._send(r["status"], r["raw"], r["headers"], "text/html; charset=utf-8")
                time.sleep(r["delay"])
                if r["status"] != 200:
                    return self._send(r["status"], {"error": {"message": str(r["content"]), "type": "scripted"}},
                                      r["headers"])
                self._send(200, {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0,
                                 "model": body.get("model", ""),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": r["content"]}}],
                                 "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}},
                           r["headers"])

            def _send(self, status, obj, headers, content_type="application/json"):
                data = (obj if isinstance(obj, str) else json.dumps(obj)).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and hung up
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.closed.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def split_message(message, rubric):
    """(beginning, completion) out of a message that stories.render made from `rubric`."""
    head, rest = rubric.split("{beginning}")
    middle, tail = rest.split("{completion}") if "{completion}" in rest else (None, None)
    if middle is None:  # {completion} before {beginning}
        raise ValueError("this stand-in reads rubrics with {beginning} before {completion}")
    pattern = re.escape(head) + "(.*?)" + re.escape(middle) + "(.*)" + re.escape(tail)
    m = re.fullmatch(pattern, message, re.S)
    if not m:
        raise ValueError("the message does not follow the rubric")
    return m.group(1), m.group(2)


def heuristic_grades(beginning, completion):
    """Grades from surface features only (see the module docstring): a stand-in, not a judgement."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", completion.strip()) if s.strip()]
    well_formed = sum(bool(re.match(r'^["A-Z]', s)) and s.rstrip('"').endswith((".", "!", "?")) for s in sentences)
    words = re.findall(r"[a-z']+", completion.lower())
    begin_words = {w for w in re.findall(r"[a-z']+", beginning.lower()) if len(w) >= 4}
    shared = len(begin_words & set(words)) / max(1, len(begin_words))
    ends = completion.rstrip().rstrip('"').endswith((".", "!", "?"))

    def grade(x):
        return int(min(10, max(1, round(x))))
    return {"grammar": grade(1 + 9 * well_formed / max(1, len(sentences))),
            "creativity": grade(1 + len(set(words)) / 8),
            "consistency": grade(1 + 9 * shared),
            "plot": grade(2 + 2 * min(len(sentences), 3) if ends else 2)}


def heuristic_judge(rubric):
    def respond(body, n):
        beginning, completion = split_message(body["messages"][-1]["content"], rubric)
        return reply(json.dumps(heuristic_grades(beginning, completion)))
    return respond


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--rubric", default=str(stories.DEFAULT_RUBRIC), help="the rubric eval_stories.py sends")
    ap.add_argument("--mode", default="grades", choices=["grades", "hang", "html"],
                    help="grades: heuristic grades; hang: never answer; html: answer a login page")
    args = ap.parse_args(argv)
    respond = {"grades": heuristic_judge(stories.load_rubric(args.rubric)), "hang": lambda body, n: hang(),
               "html": lambda body, n: html()}[args.mode]
    server = JudgeServer(respond, port=args.port)
    print(f"scripted stand-in judge ({args.mode}; not an LLM) at {server.url}; Ctrl-C stops it", flush=True)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()

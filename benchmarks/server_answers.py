"""A fixed set of requests against the server of whichever logitfusion is on PYTHONPATH, on the
bundled zoo; each response printed with ids and timestamps blanked. Run it for two checkouts and
diff, to check that a change leaves the server's answers byte-identical:

    git worktree add /tmp/old REV
    PYTHONPATH=/tmp/old/src python benchmarks/server_answers.py src/logitfusion/bench/bundled > old.txt
    python benchmarks/server_answers.py src/logitfusion/bench/bundled > new.txt
    diff old.txt new.txt
"""
import json, socket, sys, threading, time, re
import httpx, uvicorn
from logitfusion import Fuser
from logitfusion.serve import create_app
root = sys.argv[1]
recipe = {"large": {"path": f"{root}/models/large"}, "small": {"path": f"{root}/models/small"},
          "experts": [{"name": "math", "path": f"{root}/experts/math"}, {"name": "qa", "path": f"{root}/experts/qa"}],
          "solver": {"kind": "dynamic"}, "generation": {"max_new_tokens": 12}}
app = create_app({"fusion": Fuser.from_recipe(recipe)})
sock = socket.socket(); sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]
server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
while not server.started: time.sleep(0.05)
P = "Question: Where was Vil Keson born?\nAnswer:"
M = "Problem: Ruk has 27 shells. Ruk gets 25 more shells. How many shells does Ruk have now?\nSolution:"
reqs = [
  ("/v1/completions", {"model": "fusion", "prompt": P}),
  ("/v1/completions", {"model": "fusion", "prompt": M, "max_tokens": 20, "fusion": {"return_weights": True}}),
  ("/v1/completions", {"model": "fusion", "prompt": P, "logprobs": 3, "max_tokens": 6}),
  ("/v1/completions", {"model": "fusion", "prompt": P, "stop": ["."], "fusion": {"solver": "static:1.0"}}),
  ("/v1/completions", {"model": "fusion", "prompt": P, "fusion": {"solver": "dynamic", "experts": ["qa"], "return_weights": True}}),
  ("/v1/completions", {"model": "fusion", "prompt": M, "temperature": 0.8, "seed": 3, "max_tokens": 10}),
  ("/v1/completions", {"model": "fusion", "prompt": P, "fusion": {"solver": "expert:qa"}}),
  ("/v1/completions", {"model": "fusion", "prompt": P, "fusion": {"solver": "large"}}),
  ("/v1/completions", {"model": "fusion", "prompt": P, "stream": True, "max_tokens": 6}),
  ("/v1/chat/completions", {"model": "fusion", "messages": [{"role": "user", "content": "Where was Vil Keson born?"}], "max_tokens": 8}),
  ("/v1/completions", {"model": "fusion", "prompt": P, "max_tokens": 0}),
  ("/v1/completions", {"model": "fusion", "prompt": P, "fusion": {"solver": "magic"}}),
  ("/v1/completions", {"model": "fusion", "prompt": ""}),
  ("/v1/completions", {"model": "nope", "prompt": P}),
  ("/v1/models", None),
]
with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
    for path, body in reqs:
        r = c.get(path) if body is None else c.post(path, json=body)
        text = re.sub(r'"(id|created)":\s*"?[\w-]+"?', r'"\1":X', r.text)
        print(r.status_code, path, json.dumps(body)[:80]); print(text[:3000]); print()
server.should_exit = True

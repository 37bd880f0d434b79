"""The server's Prometheus metrics: request counts and latencies, time to first token, tokens,
finished sequences and decoding steps, rendered in the Prometheus text format."""

from __future__ import annotations

import bisect
import threading
from collections import Counter, defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, running = [], 0
        for le, c in zip(self.buckets, self.counts):
            running += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {self.count}"]
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters and histograms, updated from the event loop and the scheduler thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (route, status) -> n
        self.latency: dict[str, Histogram] = defaultdict(Histogram)  # route -> request seconds
        self.ttft = Histogram()  # seconds from submission to the first generated token
        self.tokens: Counter = Counter()  # model -> generated tokens
        self.prompt_tokens: Counter = Counter()  # model -> prompt tokens (first model's tokenisation)
        self.finished: Counter = Counter()  # (model, finish_reason) -> sequences
        self.steps = 0  # decoding steps (one per Batch.step)
        self.rows = 0  # sum over steps of the rows stepped (rows / steps = mean batch size)

    def request(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(route, status)] += 1
            self.latency[route].observe(seconds)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        with self.lock:
            out = ["# HELP logitfusion_requests_total HTTP requests by route and status code.",
                   "# TYPE logitfusion_requests_total counter"]
            out += [f'logitfusion_requests_total{{route="{_label(r)}",status="{s}"}} {n}'
                    for (r, s), n in sorted(self.requests.items())]
            out += ["# HELP logitfusion_request_duration_seconds Request latency, to the last byte of the "
                    "response (streams included).", "# TYPE logitfusion_request_duration_seconds histogram"]
            for route, h in sorted(self.latency.items()):
                out += h.lines("logitfusion_request_duration_seconds", f'route="{_label(route)}"')
            out += ["# HELP logitfusion_time_to_first_token_seconds From admission to the queue to the first "
                    "generated token.", "# TYPE logitfusion_time_to_first_token_seconds histogram"]
            out += self.ttft.lines("logitfusion_time_to_first_token_seconds")
            out += ["# HELP logitfusion_generated_tokens_total Tokens generated, by model.",
                    "# TYPE logitfusion_generated_tokens_total counter"]
            out += [f'logitfusion_generated_tokens_total{{model="{_label(m)}"}} {n}'
                    for m, n in sorted(self.tokens.items())]
            out += ["# HELP logitfusion_prompt_tokens_total Prompt tokens prefilled, by model.",
                    "# TYPE logitfusion_prompt_tokens_total counter"]
            out += [f'logitfusion_prompt_tokens_total{{model="{_label(m)}"}} {n}'
                    for m, n in sorted(self.prompt_tokens.items())]
            out += ["# HELP logitfusion_sequences_finished_total Sequences finished, by model and reason.",
                    "# TYPE logitfusion_sequences_finished_total counter"]
            out += [f'logitfusion_sequences_finished_total{{model="{_label(m)}",reason="{r}"}} {n}'
                    for (m, r), n in sorted(self.finished.items())]
            out += ["# HELP logitfusion_decode_steps_total Batch decoding steps.",
                    "# TYPE logitfusion_decode_steps_total counter", f"logitfusion_decode_steps_total {self.steps}",
                    "# HELP logitfusion_decode_rows_total Rows over all decoding steps (divide by steps for "
                    "the mean batch size).", "# TYPE logitfusion_decode_rows_total counter",
                    f"logitfusion_decode_rows_total {self.rows}"]
        for name, (help_text, value) in gauges.items():
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(out) + "\n"

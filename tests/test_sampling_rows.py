"""Per-row sampling parameters (sampling.Rows): built when rows join or leave, not per step; one
draw of noise for the whole batch that still gives each sequence its own seeded stream."""

import torch

from logitfusion.engine.decoding import Batch, Seq
from logitfusion.engine.sampling import Rows, SamplingParams, sample, warp

PROMPTS = ["the cat", "a dog ran", "three plus four is", "once upon"]


def seqs_with(params):
    out = []
    for p in params:
        seq = Seq("p", p)
        if p.temperature > 0:
            seq.generator = torch.Generator().manual_seed(p.seed)
        out.append(seq)
    return out


def test_a_row_samples_the_same_tokens_alone_or_in_a_batch():
    vocab, params = 50, [SamplingParams(temperature=1.0, seed=1), SamplingParams(),
                         SamplingParams(temperature=0.7, top_k=5, seed=2), SamplingParams(temperature=2.0, top_p=0.5, seed=3)]
    logits = torch.randn(6, len(params), vocab, generator=torch.Generator().manual_seed(0)) * 3
    together, alone = seqs_with(params), [seqs_with([p]) for p in params]
    rows = Rows.of(together, "cpu")
    for z in logits:  # six steps: every generator keeps its own stream
        batched = sample(warp(z, rows), rows)
        for i, seq in enumerate(alone):
            one = Rows.of(seq, "cpu")
            assert int(sample(warp(z[i: i + 1], one), one)) == int(batched[i])
    assert int(batched[1]) == int(logits[-1, 1].argmax())  # the greedy row


def test_rows_are_rebuilt_when_rows_join_or_leave_and_kept_between(fuser1):
    batch = Batch(fuser1.models, fuser1.method("dynamic"))
    batch.add(PROMPTS[:2], [SamplingParams(max_new_tokens=2), SamplingParams(max_new_tokens=6, temperature=1.0, seed=4)])
    rows = batch.sampling
    assert len(rows) == 2 and rows.greedy.tolist() == [True, False] and [i for i, _ in rows.generators] == [1]
    batch.step()
    assert batch.sampling is rows  # a plain step reuses them
    batch.add(PROMPTS[2:3], [SamplingParams(max_new_tokens=6, temperature=0.5, top_k=3, seed=5)])
    assert len(batch.sampling) == 3 and batch.sampling.top_k[2] == 3 and batch.sampling.min_top_k == 3
    while len(batch) == 3:
        batch.step()
    assert len(batch.sampling) == len(batch) == 2 and not batch.sampling.any_greedy  # the greedy row left

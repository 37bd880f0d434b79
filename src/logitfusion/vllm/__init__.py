"""The large model inside vLLM: fusion as a vLLM (V1) logits processor.

vLLM runs the large model (paged attention, continuous batching, tensor parallelism); at every
step its logits processors get each running request's full-vocabulary logits. The processor
here (`processor.FusionLogitsProcessor`) runs the recipe's small base and experts for those rows,
batched, through the engine's `rows.FusionRows`, and hands back the fused logits.

    from logitfusion.vllm.offline import fused_llm, sampling
    llm = fused_llm("fusion.yaml", max_model_len=2048)
    llm.generate(prompts, sampling(max_tokens=64, solver="static:1.0"))

A recipe's `backend: {kind: vllm, ...}` section makes every front end use it: `backend.load(recipe)`
gives a `fuser.VLLMFuser` (Fuser.generate's shape) for such a recipe and a `Fuser` otherwise, and
`logitfusion generate / eval / serve` call it.

This package imports vLLM; nothing outside it does, so the rest of logitfusion works (and its
tests run) without vLLM installed. `settings` and `backend` are the vLLM-free part: where the
recipe comes from, how a request's method is read, the backend section as vLLM's arguments, and
the choice of engine.
"""

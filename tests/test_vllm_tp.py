"""Tensor parallelism: every rank runs the fusion processor on the same rows, and vLLM samples from
each rank's logits, so the fused logits must be bit-identical on every rank. Two ranks on vLLM's CPU
build (recipe `backend: {kind: vllm, tensor_parallel_size: 2}`): a processor that also writes a
digest of each step's fused logits per rank; the digests of the two ranks must be equal step by
step, and the fused greedy tokens those of the HF engine.

Needs vLLM and 2 CPUs (LOGITFUSION_TEST_DEVICE=cuda: 2 GPUs, the models on them, the GPU check). vLLM's automatic thread binding puts one rank per NUMA node and refuses two
ranks on one node, so the ranks are bound by hand, one core each (VLLM_CPU_OMP_THREADS_BIND="0|1").
One engine (about 20-40 s to start here)."""

import hashlib
import os

import pytest

from logitfusion.testing.serving import require_vllm

require_vllm()  # skips the module without vLLM (a failure under `make test-vllm`)

from logitfusion.engine.fuser import Fuser  # noqa: E402
from logitfusion.testing import toy  # noqa: E402
from logitfusion.vllm import backend  # noqa: E402
from logitfusion.vllm.processor import FusionLogitsProcessor  # noqa: E402

CORES = sorted(os.sched_getaffinity(0))
DEVICE = os.environ.get("LOGITFUSION_TEST_DEVICE", "cpu")  # cuda: the same check on 2 GPUs


def _devices() -> int:
    import torch
    return torch.cuda.device_count() if DEVICE == "cuda" else len(CORES)


pytestmark = pytest.mark.skipif(_devices() < 2, reason=f"two tensor-parallel ranks need 2 {DEVICE} devices")
PROMPTS = ["Question: 3 plus 4? Answer:", "the cat sells", "a", "two dogs and three birds go to the river", "one bird"]
DIGESTS = "LOGITFUSION_TEST_DIGESTS"


class DigestProcessor(FusionLogitsProcessor):
    """The fusion processor, writing per step a digest of the fused logits to DIGESTS/<pid>.txt."""

    def __init__(self, vllm_config, device, is_pin_memory):
        super().__init__(vllm_config, device, is_pin_memory)
        self.out = open(os.path.join(os.environ[DIGESTS], f"{os.getpid()}.txt"), "a")

    def apply(self, logits):
        logits = super().apply(logits)
        self.out.write(f"{logits.shape[0]} {hashlib.sha256(logits.float().cpu().numpy().tobytes()).hexdigest()}\n")
        self.out.flush()
        return logits


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_tp")
    toy.vllm_family(root)
    body = ("large: {path: large}\nsmall: {path: small}\nexperts: [{name: e1, path: expert1}, {name: e2, path: expert2}]\n"
            f"load: {{device: {DEVICE}}}\n")
    (root / "hf.yaml").write_text(body)
    (root / "tp2.yaml").write_text(body + "backend: {kind: vllm, tensor_parallel_size: 2, enforce_eager: true, "
                                          "max_model_len: 128, max_num_seqs: 4}\n")
    (root / "digests").mkdir()
    return root


def test_two_ranks_fuse_bit_identical_logits_and_the_engines_tokens(family, monkeypatch):
    monkeypatch.setenv(DIGESTS, str(family / "digests"))
    if DEVICE == "cpu":  # one core per rank, bound by hand (vLLM's auto binding wants a NUMA node per rank)
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND",
                                                                       f"{CORES[0]}|{CORES[1]}"))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    hf = Fuser.from_recipe(family / "hf.yaml")
    with backend.load(family / "tp2.yaml", logits_processors=[DigestProcessor]) as vf:
        for method in ("static:1.0", "dynamic"):
            got = [g.token_ids for g in vf.generate(PROMPTS, solver=method, max_new_tokens=8, ignore_eos=True)]
            assert got == [g.token_ids for g in hf.generate(PROMPTS, solver=method, max_new_tokens=8,
                                                            ignore_eos=True)], method
    ranks = sorted((family / "digests").glob("*.txt"))
    assert len(ranks) == 2, "one digest file per tensor-parallel rank"
    steps = [r.read_text().splitlines() for r in ranks]
    assert len(steps[0]) >= 16 and steps[0] == steps[1]

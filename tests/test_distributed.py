"""DDP, FSDP2 (fully_shard, DTensor params), ZeroRedundancyOptimizer and torch.distributed.checkpoint, with two
processes on the gloo backend on CPU.

One module fixture starts tests/distributed/worker.py twice (ranks 0 and 1), which runs every scenario once
and saves the full parameters of each run; the tests below compare them. The whole file takes about 30-55 s (two
Python processes importing torch, then a few tiny 8-step runs per scenario; the HSDP, empty-shard and
Triton-with-master-weights scenarios add ~7 s of CPU time per rank, mostly the Triton interpreter). It is marked `slow`, which
`make test` does not deselect: it runs in CI.

Tolerances. fusedopt vs the reference (torch.optim.AdamW / SGD, lion-pytorch's Lion, single-tensor form,
driven by Hugging Face's get_cosine_schedule_with_warmup, the schedule the table mirrors): both compute the same float32 operations in the same
order; the kernels differ from torch's CPU eager ops by about one ulp in a few of them (lerp, addcmul), and
from the second step on those ulps flow back through forward and backward into the grads. Over 8 steps that
stays under 1e-7 of each tensor's scale (measured: 6e-8); the bound is the parity suite's float32 bound, 1e-6
normwise (max|a - b| / max|b|). Lion's sign() can turn such an ulp into a full +-lr step for an element whose
momentum mix is ~0, so Lion counts differing elements instead (at most 2), as tests/test_parity.py does.
The checkpoint test requires bitwise equality: the resumed run executes the same kernels on the same shards
with the same grads as the uninterrupted one. Every rank's full parameters must be bitwise equal across ranks.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed", "worker.py")
WORLD = 2
TOL = 1e-6
LION_MAX_FLIPS = 2

if not torch.distributed.is_available():
    pytest.skip("torch was built without torch.distributed", allow_module_level=True)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # TRITON_INTERPRET=1: the fsdp2_triton_master scenario runs the Triton kernels on the ranks' CPU tensors
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    init_file = os.path.join(out, "store")
    procs, logs = [], []
    start = time.monotonic()
    for rank in range(WORLD):
        log = open(os.path.join(out, f"log{rank}.txt"), "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, "--rank", str(rank), "--world-size", str(WORLD), "--init-file", init_file,
             "--out", str(out)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=400) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        codes = ["timeout"] * WORLD
    for log in logs:
        log.close()
    text = "\n".join(f"--- rank {r} ---\n" + open(os.path.join(out, f"log{r}.txt")).read()[-6000:]
                     for r in range(WORLD))
    if codes != [0] * WORLD:
        pytest.fail(f"distributed worker exit codes {codes} after {time.monotonic() - start:.0f} s\n{text}")
    loaded = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(loaded):
        for name, value in res.items():
            if "error" in value:
                pytest.fail(f"scenario {name} failed on rank {r}:\n{value['error']}")
    return loaded


def normwise(a: torch.Tensor, b: torch.Tensor) -> float:
    if b.numel() == 0:
        return 0.0
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def check_run(results, scenario: str, case: str, *, lion: bool = False, exact: bool = False,
              same_on_ranks: bool = True):
    for rank in range(WORLD):
        run = results[rank][scenario][case]
        assert len(run["fused"]) == len(run["ref"]) > 0
        if lion and not exact:
            flips = sum(int(((a - b).abs() > TOL * b.abs().max()).sum()) for a, b in zip(run["fused"], run["ref"])
                        if b.numel())
            assert flips <= LION_MAX_FLIPS, f"{scenario}/{case} rank {rank}: {flips} Lion elements differ"
        for i, (a, b) in enumerate(zip(run["fused"], run["ref"])):
            assert a.shape == b.shape
            if exact:
                assert torch.equal(a, b), f"{scenario}/{case} rank {rank} param {i}: normwise {normwise(a, b):.2e}"
            elif not lion:
                err = normwise(a, b)
                assert err <= TOL, f"{scenario}/{case} rank {rank} param {i}: normwise error {err:.2e} > {TOL}"
    # the same parameters on every rank (full tensors; a comparison of local shards has none)
    if not same_on_ranks:
        return
    for i, (a, b) in enumerate(zip(results[0][scenario][case]["fused"], results[1][scenario][case]["fused"])):
        assert torch.equal(a, b), f"{scenario}/{case}: param {i} differs between rank 0 and rank 1"


RULES = ["adamw", "sgd", "lion"]


@pytest.mark.parametrize("rule", RULES)
def test_ddp_matches_torch_optim(results, rule):
    check_run(results, "ddp", rule, lion=rule == "lion")


@pytest.mark.parametrize("rule", RULES)
def test_fsdp2_matches_torch_optim(results, rule):
    check_run(results, "fsdp2", rule, lion=rule == "lion")
    for rank in range(WORLD):
        run = results[rank]["fsdp2"][rule]
        # the states are DTensors (sharded like the params), as torch.distributed.checkpoint expects
        assert run["state_types"] == ["DTensor"]
    # uneven sharding: rank 1 holds empty shards of the (1, 9) weight and (1,) bias, and still steps
    assert results[1]["fsdp2"][rule]["local_shapes"][-2:] == [(0, 9), (0,)]
    assert results[0]["fsdp2"][rule]["local_shapes"][0] == (3, 7)


@pytest.mark.parametrize("case", ["adamw_l2", "sgd_inf", "lion_l1"])
def test_fsdp2_clipping_uses_the_global_norm(results, case):
    """max_grad_norm under FSDP2: the norm of the full grads (norm^p all-reduced over the mesh), the same as
    torch.nn.utils.clip_grad_norm_ on the FSDP2 model; every step clips (max norm 0.05, norms ~0.1-8)."""
    check_run(results, "fsdp2_clip", case, lion=case.startswith("lion"))
    for rank in range(WORLD):
        run = results[rank]["fsdp2_clip"][case]
        assert min(run["ref_norms"]) > 0.05  # clipping is active at every step
        assert run["fused_norms"] == pytest.approx(run["ref_norms"], rel=1e-6)
    assert results[0]["fsdp2_clip"][case]["fused_norms"] == results[1]["fsdp2_clip"][case]["fused_norms"]


@pytest.mark.parametrize("rule", RULES)
def test_zero_redundancy_optimizer(results, rule):
    """ZeroRedundancyOptimizer(optimizer_class=Fused*) + DDP gives the same parameters as DDP + the reference
    on all params; each rank's fused optimizer holds only its partition; TableScheduler reports the table."""
    check_run(results, "zero", rule, lion=rule == "lion")
    for rank in range(WORLD):
        run = results[rank]["zero"][rule]
        assert 0 < run["local_numel"] < run["total_numel"]
        # after step t, the lr of step t + 1 under transformers' get_cosine_schedule_with_warmup
        assert len(run["logged_lr"]) == len(run["expected_lr"]) == 8
        assert run["logged_lr"] == pytest.approx(run["expected_lr"], rel=1e-12)
    assert results[0]["zero"][rule]["local_numel"] + results[1]["zero"][rule]["local_numel"] == \
        results[0]["zero"][rule]["total_numel"]


def test_zero_redundancy_optimizer_with_8bit_states(results):
    """ZeroRedundancyOptimizer(optimizer_class=FusedAdamW, state_precision="8bit"): ZeRO copies the keyword into
    every param group; each rank quantizes whole tensors of its partition, so the run is bitwise DDP + the same
    optimizer on all params. The (80, 64) weight (5,120 elements) is the one with 8-bit states."""
    check_run(results, "zero", "adamw_8bit", exact=True)
    assert any("torch.uint8" in results[rank]["zero"]["adamw_8bit"]["state_dtypes"] for rank in range(WORLD))


@pytest.mark.parametrize("rule", RULES)
def test_distributed_checkpoint_resume(results, rule):
    """get_optimizer_state_dict / dcp.save at step 3, dcp.load / set_optimizer_state_dict into a fresh FSDP2
    model + optimizer: the schedule step comes back (host mirror and device counters) and the resumed run ends
    bitwise equal to the uninterrupted one."""
    for rank in range(WORLD):
        restored = results[rank]["dcp"][rule]["restored"]
        assert restored["host_step"] == 3
        assert restored["device_steps"] == [3]
        assert restored["last_lr"] == pytest.approx(restored["expected_lr"], rel=1e-12)  # HF's lr of step 3
        assert restored["state_types"] == ["DTensor"]
    check_run(results, "dcp", rule, exact=True)



@pytest.mark.parametrize("case", ["adamw_l2", "sgd_l1"])
def test_hsdp_clipping_does_not_sum_over_the_replicated_dimension(results, case):
    """HSDP (a 2 x 1 replicate x shard mesh, placements (Replicate(), Shard(0))): the fused norm is the norm of
    the full grads, equal to clip_grad_norm_ on the HSDP model (summing the 2 replicas would give sqrt(2) x the
    L2 norm, 2 x the L1 norm), and the run matches torch.optim clipped that way."""
    check_run(results, "hsdp_clip", case)
    for rank in range(WORLD):
        run = results[rank]["hsdp_clip"][case]
        assert run["placements"] == ["(Replicate(), Shard(dim=0))"]
        assert min(run["ref_norms"]) > 0.05  # clipping is active at every step
        assert run["fused_norms"] == pytest.approx(run["ref_norms"], rel=1e-6)


def test_inf_norm_clipping_with_an_empty_local_shard(results):
    """Rank 1 holds empty shards of the (1, 9) weight and (1,) bias: fusedopt clips by the inf-norm of the full
    grads (= get_total_norm of their full_tensor()), where torch's clip_grad_norm_ raises on that rank."""
    check_run(results, "fsdp2_inf_empty", "adamw_inf")
    assert results[1]["fsdp2_inf_empty"]["adamw_inf"]["local_shapes"][-2:] == [(0, 9), (0,)]
    assert "infinity norm on an empty tensor" in results[1]["fsdp2_inf_empty"]["adamw_inf"]["torch_error"]
    for rank in range(WORLD):
        run = results[rank]["fsdp2_inf_empty"]["adamw_inf"]
        assert min(run["ref_norms"]) > 0.05
        assert run["fused_norms"] == pytest.approx(run["ref_norms"], rel=1e-6)


@pytest.mark.parametrize("rule", RULES)
def test_fsdp2_with_triton_and_master_weights(results, rule):
    """bfloat16 FSDP2 params on the Triton backend with master_weights=True: the float32 master copies (DTensor
    state) follow torch.optim run in float32 on the same grads, and every param is its master copy rounded."""
    check_run(results, "fsdp2_triton_master", rule, lion=rule == "lion")
    for rank in range(WORLD):
        run = results[rank]["fsdp2_triton_master"][rule]
        assert run["param_is_master_rounded"]
        assert run["dtypes"] == ["torch.bfloat16", "torch.float32"]
        assert run["state_types"] == ["DTensor"]


@pytest.mark.parametrize("rule", RULES)
def test_fsdp2_8bit_states_are_per_shard(results, rule):
    """8-bit states of FSDP2 (DTensor) params: every rank quantizes its own shard in blocks of 256 starting at the
    shard's first element (a block never straddles two ranks), bitwise as the same optimizer on plain tensors
    holding that rank's shards and grads. The uneven shards (6305 and 6208 elements; 4100 and 4099) are not
    multiples of 256. Codes and absmax are DTensors."""
    check_run(results, "fsdp2_small_state", rule, exact=True, same_on_ranks=False)
    for rank in range(WORLD):
        run = results[rank]["fsdp2_small_state"][rule]
        assert run["state_types"] == ["DTensor"]
        for numel, st, ref in zip(run["local_numels"], run["states"], run["ref_states"]):
            assert st.keys() == ref.keys()
            for key in st:
                assert torch.equal(st[key][: ref[key].numel()] if key.endswith("_absmax") else st[key], ref[key]), key
            if numel >= 4096:
                assert any(v.dtype == torch.uint8 for v in st.values())


def test_fsdp2_stochastic_rounding_equals_unsharded(results):
    """Stochastic rounding's bits are keyed on the element's index in the full tensor: the FSDP2 run of bf16 params
    is bitwise the unsharded run."""
    check_run(results, "fsdp2_small_state", "sr", exact=True)


def test_distributed_checkpoint_of_8bit_states(results):
    """dcp.save / dcp.load of 8-bit states (codes and the padded per-shard absmax, both DTensors): the resumed run
    is bitwise the uninterrupted one."""
    check_run(results, "fsdp2_small_state", "dcp", exact=True)

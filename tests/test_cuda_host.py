"""The CUDA backend's kernel code, executed on the host: runs in CI, no GPU needed.

tests/cuda_host/hostsim.cpp is compiled with g++ (torch.utils.cpp_extension.load) from the CUDA backend's own
sources: csrc/cuda/ops_host.h (argument checks, dtype switch, step counters, address tables),
csrc/cuda/launch_plan.h (the multi-tensor launch plan) and csrc/cuda/block_bodies.h (the __host__ __device__
bodies of the kernels, calling fusedopt/rules.h). Its launcher runs every block and every thread of every
launch one after another on the CPU tensors' memory, with a small chunk size, small address / block tables
and a small block, so that chunk boundaries, half-done tensors carried over to the next launch and many
launches all happen with small tensors. Only the __global__ wrappers (blockIdx / threadIdx -> the bodies)
and the 128-bit load instructions are left for tests/test_cuda_gpu.py.

The simulated ops are compared with
  - the CPU backend (torch.ops.fusedopt.*, fusedopt._C): bit for bit, every dtype, since both run the same
    rules on the same scalars (both compiled without FMA contraction; the rules' explicit fused
    multiply-adds are std::fma in both);
  - torch.optim.AdamW / torch.optim.SGD (foreach=False) and lion_pytorch.Lion, with the lr (and beta1 /
    momentum) of each step read from a float64 table, including steps past the end of the table.

The compiled harness is cached in ~/.cache/fusedopt_hostsim/<hash of sources and flags> (override the root
with FUSEDOPT_HOSTSIM_CACHE).
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import math
import os
import pathlib
import random

import pytest
import torch
from conftest import missing

ROOT = pathlib.Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "cuda_host" / "hostsim.cpp"
# No FMA contraction, like the CPU backend (setup.py builds _C with -ffp-contract=off), so the two agree bitwise.
CFLAGS = ["-O1", "-std=c++20", "-ffp-contract=off", "-fno-math-errno"]

# Simulation parameters: 16-element chunks, 3 tensors and 5 blocks per launch, 4 threads per block, 3 step
# counters per step-kernel launch. A 97-element tensor is then 7 chunks, spread over 2-3 launches.
SIM = dict(chunk_size=16, max_tensors=3, max_blocks=5, block_dim=4, steps_per_launch=3, reverse=False)
SIM_ARGS = ("chunk_size", "max_tensors", "max_blocks", "block_dim", "steps_per_launch", "reverse")


def sim_args(state_absmaxes=None, rounding=(), rounding_step=None, **overrides):
    """The simulated ops' trailing arguments: the small-state arguments of the real ops (none by default), then
    the simulation parameters."""
    kw = {**SIM, **overrides}
    return (state_absmaxes, list(rounding), rounding_step, *(kw[k] for k in SIM_ARGS))


# ------------------------------------------------------------------------------------------------------------
# Building and loading
# ------------------------------------------------------------------------------------------------------------
def _digest() -> str:
    h = hashlib.sha256()
    h.update(torch.__version__.encode())
    h.update(" ".join(CFLAGS).encode())
    files = [HARNESS, *sorted((ROOT / "csrc" / "cuda").glob("*.h")), *sorted((ROOT / "csrc" / "fusedopt").glob("*.h"))]
    for path in files:
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


_SIM_OPS = None


def load_sim():
    global _SIM_OPS
    if _SIM_OPS is None:
        if not hasattr(torch.ops.fusedopt_hostsim, "plan"):  # not already loaded in this process
            from torch.utils import cpp_extension

            root = os.environ.get("FUSEDOPT_HOSTSIM_CACHE") or os.path.join(
                os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fusedopt_hostsim")
            build_dir = os.path.join(root, _digest())
            os.makedirs(build_dir, exist_ok=True)
            cpp_extension.load(name="fusedopt_hostsim", sources=[str(HARNESS)],
                               extra_include_paths=[str(ROOT / "csrc")], extra_cflags=CFLAGS,
                               build_directory=build_dir, is_python_module=False, verbose=False)
        _SIM_OPS = torch.ops.fusedopt_hostsim
    return _SIM_OPS


@pytest.fixture(scope="module")
def sim():
    return load_sim()


@pytest.fixture(scope="module")
def cpu_ops():
    """torch.ops.fusedopt with the CPU kernels (fusedopt._C)."""
    try:
        importlib.import_module("fusedopt._C")
    except ImportError as e:
        built = sorted(glob.glob(str(ROOT / "fusedopt" / "_C*.so")))
        if not built:  # a skip where _C must exist (CI, a GPU) would hide a broken build: conftest fails it
            missing("cpu", f"fusedopt._C is not built ({e}); run `python setup.py build_ext --inplace`")
        torch.ops.load_library(built[0])
    return torch.ops.fusedopt


# ------------------------------------------------------------------------------------------------------------
# Tensors
# ------------------------------------------------------------------------------------------------------------
LOW = (torch.bfloat16, torch.float16)


def contiguous_strides(size):
    strides, acc = [], 1
    for s in reversed(size):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def placed(size, stride, dtype, offset):
    """A zero tensor with the given size and strides whose first element is `offset` elements into its
    storage (offset 1 makes every float32 / float64 / bf16 / fp16 pointer miss 16-byte alignment)."""
    n = math.prod(size)
    return torch.zeros(n + offset, dtype=dtype).as_strided(size, stride, offset)


class Spec:
    """One param's shape: size, strides (dense, maybe not contiguous), and storage offsets per list."""

    def __init__(self, size, stride=None, offsets=None):
        self.size = tuple(size)
        self.stride = tuple(stride) if stride is not None else contiguous_strides(self.size)
        self.offsets = offsets or {}

    def new(self, list_name, dtype):
        return placed(self.size, self.stride, dtype, self.offsets.get(list_name, 0))

    @property
    def numel(self):
        return math.prod(self.size)


# Shapes of the standard group: empty tensors, 1, 3, 97, 1025 elements, sizes spanning many chunks at odd
# lengths, a transposed (dense, non-contiguous) param, and misaligned tensors: a whole tensor starting at
# element 1 of its buffer, and tensors where only the grad, only a state or only the master copy is
# misaligned (each of those takes the scalar path while its aligned neighbours are vectorized).
def standard_specs():
    return [
        Spec((0,)),
        Spec((1,)),
        Spec((3,)),
        Spec((97,)),
        Spec((2, 0, 3)),
        Spec((1025,)),
        Spec((7, 9)),
        Spec((6, 4), stride=(1, 6)),  # transposed
        Spec((101,), offsets={"params": 1, "grads": 1, "state0": 1, "state1": 1, "state2": 1, "master": 1}),
        Spec((64,), offsets={"grads": 1}),
        Spec((33,), offsets={"state0": 3}),
        Spec((48,), offsets={"master": 2}),
        Spec((263,)),
    ]


RULE_STATES = {"adamw": 3, "sgd": 1, "lion": 1}


class Group:
    """The tensors of one op call (one param group) for a rule, built deterministically from a seed."""

    def __init__(self, rule, specs, dtype, *, master=False, amsgrad=False, momentum=True, seed=0):
        self.rule, self.specs, self.dtype, self.master = rule, specs, dtype, master
        self.state_dtype = torch.float32 if master else dtype
        gen = torch.Generator().manual_seed(seed)
        self.params = []
        for s in specs:
            p = s.new("params", dtype)
            p.copy_(torch.randn(s.size, generator=gen, dtype=torch.float64))
            self.params.append(p)
        self.grads = [s.new("grads", dtype) for s in specs]
        self.master_params = []
        if master:
            for s, p in zip(specs, self.params):
                self.master_params.append(s.new("master", torch.float32).copy_(p))
        n_states = RULE_STATES[rule]
        if rule == "adamw" and not amsgrad:
            n_states = 2
        if rule == "sgd" and not momentum:
            n_states = 0
        self.states = [[s.new(f"state{k}", self.state_dtype) for s in specs] for k in range(n_states)]
        self.steps = [torch.zeros((), dtype=torch.int64) for _ in specs] if rule == "adamw" else []

    def clone(self):
        """A deep copy with every tensor's strides and storage offset kept (the kernels see the same layout)."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)

        def cp(t):
            c = t.new_zeros(t.numel() + t.storage_offset()).as_strided(t.size(), t.stride(), t.storage_offset())
            return c.copy_(t)

        other.params = [cp(t) for t in self.params]
        other.grads = [cp(t) for t in self.grads]
        other.master_params = [cp(t) for t in self.master_params]
        other.states = [[cp(t) for t in st] for st in self.states]
        other.steps = [t.clone() for t in self.steps]
        return other

    def set_grads(self, grads):
        for dst, g in zip(self.grads, grads):
            dst.copy_(g)


def grad_sequence(specs, steps, dtype, seed=1, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [[(torch.randn(s.size, generator=gen, dtype=torch.float64) * scale).to(dtype) for s in specs]
            for _ in range(steps)]


# ------------------------------------------------------------------------------------------------------------
# Calling the ops (simulated or CPU) with one set of hyperparameters
# ------------------------------------------------------------------------------------------------------------
LR_TABLE = [1e-2, 3e-2, 2e-2, 5e-3]  # 4 entries; steps 4, 5, ... read the last one
MOM_TABLE = [0.9, 0.85, 0.8, 0.95]
WD_TABLE = [0.0, 0.05, 0.2, 0.1, 0.3]  # absolute weight decays (0 at step 0: the decay is skipped there)
STEPS = 6


def controls(step, *, lr_table=True, mom_table=True, wd_table=False, grad_scale=None, found_inf=None,
             clip_coef=None):
    f32 = lambda v: None if v is None else torch.tensor([v], dtype=torch.float32)  # noqa: E731
    use_table = lr_table or mom_table or wd_table
    return dict(
        lr_table=torch.tensor(LR_TABLE, dtype=torch.float64) if lr_table else None,
        mom_table=torch.tensor(MOM_TABLE, dtype=torch.float64) if mom_table else None,
        wd_table=torch.tensor(WD_TABLE, dtype=torch.float64) if wd_table else None,
        schedule_step=torch.tensor(step, dtype=torch.int64) if use_table else None,
        grad_scale=f32(grad_scale), found_inf=f32(found_inf), clip_coef=f32(clip_coef))


def table_at(table, step):
    return table[min(step, len(table) - 1)]


def call(op_ns, g: Group, hp, ctl, *, first_step=False, extra=()):
    if g.rule == "adamw":
        return op_ns.adamw_(g.params, g.grads, g.states[0], g.states[1], g.states[2] if hp["amsgrad"] else [],
                            g.steps, g.master_params, hp["lr"], hp["beta1"], hp["beta2"], hp["eps"],
                            hp["weight_decay"], hp["amsgrad"], hp["maximize"], ctl["lr_table"], ctl["mom_table"],
                            ctl["schedule_step"], ctl["grad_scale"], ctl["found_inf"], ctl["clip_coef"],
                            ctl["wd_table"], hp.get("decoupled", True), *extra)
    if g.rule == "sgd":
        return op_ns.sgd_(g.params, g.grads, g.states[0] if g.states else [], g.master_params, hp["lr"],
                          hp["momentum"], hp["dampening"], hp["weight_decay"], hp["nesterov"], hp["maximize"],
                          first_step, ctl["lr_table"], ctl["mom_table"], ctl["schedule_step"], ctl["grad_scale"],
                          ctl["found_inf"], ctl["clip_coef"], ctl["wd_table"], *extra)
    return op_ns.lion_(g.params, g.grads, g.states[0], g.master_params, hp["lr"], hp["beta1"], hp["beta2"],
                       hp["weight_decay"], ctl["lr_table"], ctl["mom_table"], ctl["schedule_step"],
                       ctl["grad_scale"], ctl["found_inf"], ctl["clip_coef"], ctl["wd_table"], *extra)


def run(op_ns, g: Group, hp, grads_seq, *, extra=(), ctl_kw=None, start=0):
    """Steps start, start+1, ... with the given grads; returns the simulator's statistics (summed)."""
    totals = None
    for i, grads in enumerate(grads_seq):
        step = start + i
        g.set_grads(grads)
        out = call(op_ns, g, hp, controls(step, **(ctl_kw or {})), first_step=(step == 0), extra=extra)
        if out is not None:
            totals = list(out) if totals is None else [a + b for a, b in zip(totals, out)]
    return totals


ADAMW = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False)
SGD = dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
LION = dict(lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.1)

# (rule, hyperparameter overrides, Group kwargs)
VARIANTS = {
    "adamw": ("adamw", {}, {}),
    "adamw-amsgrad-maximize": ("adamw", dict(amsgrad=True, maximize=True, weight_decay=0.1), dict(amsgrad=True)),
    "adamw-no-wd": ("adamw", dict(weight_decay=0.0, eps=1e-6), {}),
    # torch.optim.Adam: the same op with decoupled_weight_decay=False (L2 decay added to the gradient)
    "adam-l2": ("adamw", dict(decoupled=False, weight_decay=0.1), {}),
    "adam-l2-amsgrad-maximize": ("adamw", dict(decoupled=False, amsgrad=True, maximize=True, weight_decay=0.05),
                                 dict(amsgrad=True)),
    "sgd-momentum-dampening-wd": ("sgd", dict(dampening=0.3, weight_decay=1e-2), {}),
    "sgd-nesterov-maximize": ("sgd", dict(nesterov=True, maximize=True, weight_decay=1e-3), {}),
    "sgd-plain": ("sgd", dict(momentum=0.0), dict(momentum=False)),
    "lion": ("lion", {}, {}),
    "lion-no-wd": ("lion", dict(weight_decay=0.0, beta2=0.98), {}),
}
BASE_HP = {"adamw": ADAMW, "sgd": SGD, "lion": LION}


def variant(name):
    rule, hp_over, group_kw = VARIANTS[name]
    return rule, {**BASE_HP[rule], **hp_over}, group_kw


def assert_same(a_list, b_list, what):
    """Bit for bit (NaN == NaN)."""
    assert len(a_list) == len(b_list)
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        assert a.dtype == b.dtype and a.shape == b.shape
        if not torch.equal(a, b):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}[{i}]: {m}")


def assert_groups_equal(a: Group, b: Group):
    assert_same(a.params, b.params, "params")
    assert_same(a.master_params, b.master_params, "master_params")
    for k, (sa, sb) in enumerate(zip(a.states, b.states)):
        assert_same(sa, sb, f"state{k}")
    assert [int(s) for s in a.steps] == [int(s) for s in b.steps]


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# ------------------------------------------------------------------------------------------------------------
# The launch plan
# ------------------------------------------------------------------------------------------------------------
def decode_plan(flat):
    launches, i = [], 0
    while i < len(flat):
        nt, nb = flat[i], flat[i + 1]
        i += 2
        tensors = flat[i:i + nt]
        i += nt
        slots = flat[i:i + nb]
        i += nb
        chunks = flat[i:i + nb]
        i += nb
        launches.append((list(tensors), list(zip(slots, chunks))))
    return launches


def check_plan(launches, numels, chunk, max_t, max_b):
    """Properties every plan must have, independent of how it is built."""
    seen = []
    for li, (tensors, blocks) in enumerate(launches):
        assert 0 < len(blocks) <= max_b
        assert 0 < len(tensors) <= max_t
        assert all(numels[t] > 0 for t in tensors), "empty tensors take no slot"
        assert {s for s, _ in blocks} == set(range(len(tensors))), "every slot is used by some block"
        for s, c in blocks:
            seen.append((tensors[s], c))
        if li > 0:
            prev_tensors, prev_blocks = launches[li - 1]
            last_t, last_c = prev_tensors[prev_blocks[-1][0]], prev_blocks[-1][1]
            if last_c < -(-numels[last_t] // chunk) - 1:  # the previous launch ended inside a tensor
                assert tensors[0] == last_t and blocks[0] == (0, last_c + 1), "carry-over continues in slot 0"
    expected = [(t, c) for t, n in enumerate(numels) for c in range(-(-n // chunk))]
    assert seen == expected, "every chunk of every tensor exactly once, in order"


def test_constants(sim):
    (chunk, block, ilp, max_blocks, adamw_t, sgd_t, lion_t, steps_per_launch, adamw_bytes, sgd_bytes, lion_bytes,
     step_bytes, *small) = sim.capacities()
    assert (chunk, block, ilp, max_blocks) == (65536, 512, 4, 320)
    # Every launch's whole description is one kernel parameter, within the portable 4 KB limit.
    assert max(adamw_bytes, sgd_bytes, lion_bytes, step_bytes) <= 4096
    assert min(adamw_t, sgd_t, lion_t) >= 32 and steps_per_launch >= 256
    # Small-state launches carry an absmax list per state and two stream words per tensor: fewer tensors per launch.
    small_tensors, small_bytes = small[:3], small[3:]
    assert max(small_bytes) <= 4096 and min(small_tensors) >= 16


@pytest.mark.parametrize("seed", range(6))
def test_plan_properties(sim, seed):
    rnd = random.Random(seed)
    numels = [rnd.choice([0, 1, 2, 15, 16, 17, 31, 64, 100, 1000]) for _ in range(rnd.randint(1, 60))]
    chunk, max_t, max_b = rnd.choice([1, 4, 16, 50]), rnd.randint(1, 9), rnd.randint(1, 12)
    launches = decode_plan(sim.plan(numels, chunk, max_t, max_b))
    check_plan(launches, numels, chunk, max_t, max_b)


def test_plan_launch_boundaries(sim):
    # The block table fills inside tensor 0 (10 chunks, 4 blocks per launch): it is carried over twice.
    launches = decode_plan(sim.plan([160, 5], 16, 3, 4))
    assert launches == [([0], [(0, 0), (0, 1), (0, 2), (0, 3)]),
                        ([0], [(0, 4), (0, 5), (0, 6), (0, 7)]),
                        ([0, 1], [(0, 8), (0, 9), (1, 0)])]
    # The address table fills (2 slots) when a tensor is done: the next launch starts empty.
    launches = decode_plan(sim.plan([1, 0, 1, 1, 0, 40], 16, 2, 10))
    assert launches == [([0, 2], [(0, 0), (1, 0)]), ([3, 5], [(0, 0), (1, 0), (1, 1), (1, 2)])]
    # A full address table with an unfinished last tensor keeps adding that tensor's chunks.
    launches = decode_plan(sim.plan([1, 50], 16, 2, 10))
    assert launches == [([0, 1], [(0, 0), (1, 0), (1, 1), (1, 2), (1, 3)])]
    assert decode_plan(sim.plan([0, 0], 16, 2, 10)) == []
    assert decode_plan(sim.plan([], 16, 2, 10)) == []


def test_plan_tensor_beyond_int32(sim):
    # 2^31 + 5 elements: chunk offsets beyond 2^31 (int64 arithmetic); planned without allocating anything.
    numels = [3, 2**31 + 5, 7]
    launches = decode_plan(sim.plan(numels, 65536, 36, 320))
    check_plan(launches, numels, 65536, 36, 320)
    last_chunk = max(c for tensors, blocks in launches for s, c in blocks if tensors[s] == 1)
    assert last_chunk == 2**15 and last_chunk * 65536 == 2**31  # the 5-element tail chunk starts at 2^31
    assert len(launches) == -(-(1 + 2**15 + 1 + 1) // 320)


def test_plan_rejects_bad_limits(sim):
    with pytest.raises((ValueError, RuntimeError)):
        sim.plan([10], 0, 3, 5)
    with pytest.raises((ValueError, RuntimeError)):
        sim.plan([10], 16, 0, 5)
    with pytest.raises((ValueError, RuntimeError)):
        sim.plan([10], 16, 3, 321)


# ------------------------------------------------------------------------------------------------------------
# Bit-for-bit agreement with the CPU backend
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_cpu_backend(sim, cpu_ops, name, dtype):
    rule, hp, gkw = variant(name)
    specs = standard_specs()
    for master in ([False, True] if dtype in LOW else [False]):
        ref = Group(rule, specs, dtype, master=master, **gkw)
        ours = ref.clone()
        grads = grad_sequence(specs, STEPS, dtype)
        stats = run(sim, ours, hp, grads, extra=sim_args())
        run(cpu_ops, ref, hp, grads)
        assert_groups_equal(ours, ref)
        launches, step_launches, vector_blocks, scalar_blocks, skipped = stats[:5]
        per_step = len(decode_plan(sim.plan([s.numel for s in specs], SIM["chunk_size"], SIM["max_tensors"],
                                            SIM["max_blocks"])))
        assert per_step >= 8 and launches == per_step * STEPS
        # Both memory paths are taken, nothing is skipped; 13 step counters at 3 per step-kernel launch.
        assert vector_blocks > 0 and scalar_blocks > 0 and skipped == 0
        assert step_launches == (math.ceil(len(specs) / 3) * STEPS if rule == "adamw" else 0)
        if rule == "adamw":
            assert all(int(s) == STEPS for s in ours.steps)


@pytest.mark.parametrize("name", ["adamw-amsgrad-maximize", "sgd-momentum-dampening-wd", "lion"])
def test_master_weights_on_full_precision_params(sim, cpu_ops, name):
    # Master params are accepted for float32 / float64 params too (float32 masters and states): same as CPU.
    rule, hp, gkw = variant(name)
    specs = [Spec((37,)), Spec((64,)), Spec((5,), offsets={"master": 1})]
    for dtype in (torch.float32, torch.float64):
        ref = Group(rule, specs, dtype, master=True, **gkw)
        ours = ref.clone()
        grads = grad_sequence(specs, 3, dtype)
        run(sim, ours, hp, grads, extra=sim_args())
        run(cpu_ops, ref, hp, grads)
        assert_groups_equal(ours, ref)


@pytest.mark.parametrize("name", ["adamw-amsgrad-maximize", "sgd-momentum-dampening-wd", "lion"])
def test_simulation_parameters_do_not_matter(sim, name):
    """Any chunk size (also not a multiple of the ILP width, which forces the scalar path), table sizes,
    block size and block / thread order give the same bits: blocks and threads are independent."""
    rule, hp, gkw = variant(name)
    specs = standard_specs()
    base = Group(rule, specs, torch.float32, **gkw)
    grads = grad_sequence(specs, 3, torch.float32)
    results = []
    settings = [dict(), dict(reverse=True), dict(chunk_size=7, block_dim=3), dict(chunk_size=1, max_blocks=1),
                dict(chunk_size=4, max_tensors=1, block_dim=1), dict(chunk_size=128, block_dim=32),
                dict(chunk_size=0, max_tensors=0, max_blocks=0, block_dim=0, steps_per_launch=0)]  # real sizes
    for kw in settings:
        g = base.clone()
        stats = run(sim, g, hp, grads, extra=sim_args(**kw))
        if kw.get("chunk_size") in (7, 1):
            assert stats[2] == 0, "chunk sizes that are not a multiple of 4 take the scalar path"
        results.append(g)
    for g in results[1:]:
        assert_groups_equal(g, results[0])


def test_many_tensors_many_launches(sim, cpu_ops):
    # A few hundred tensors of random sizes, 4 tensors / 6 blocks per launch.
    rnd = random.Random(0)
    specs = [Spec((rnd.choice([0, 1, 2, 5, 16, 17, 40, 100, 257]),),
                  offsets={"grads": rnd.choice([0, 0, 0, 1])}) for _ in range(300)]
    for name in ("adamw", "sgd-nesterov-maximize", "lion"):
        rule, hp, gkw = variant(name)
        ref = Group(rule, specs, torch.float32, **gkw)
        ours = ref.clone()
        grads = grad_sequence(specs, 2, torch.float32)
        stats = run(sim, ours, hp, grads, extra=sim_args(max_tensors=4, max_blocks=6, chunk_size=16))
        run(cpu_ops, ref, hp, grads)
        assert_groups_equal(ours, ref)
        numels = [s.numel for s in specs]
        per_step = len(decode_plan(sim.plan(numels, 16, 4, 6)))
        assert per_step > 50 and stats[0] == 2 * per_step


def test_real_chunk_size(sim, cpu_ops):
    # The device's sizes (64 Ki-element chunks, 512 threads): a tensor of 3 chunks + a tail, and small ones.
    specs = [Spec((3 * 65536 + 5,)), Spec((1,)), Spec((65536,), offsets={"params": 1, "grads": 1, "state0": 1,
                                                                       "state1": 1})]
    rule, hp, gkw = variant("adamw")
    ref = Group(rule, specs, torch.bfloat16, master=True, **gkw)
    ours = ref.clone()
    grads = grad_sequence(specs, 2, torch.bfloat16)
    stats = run(sim, ours, hp, grads, extra=sim_args(chunk_size=0, max_tensors=0, max_blocks=0, block_dim=0,
                                                      steps_per_launch=0))
    run(cpu_ops, ref, hp, grads)
    assert_groups_equal(ours, ref)
    # Per step: one launch, one step-kernel launch, 4 + 1 aligned chunks, 1 misaligned chunk.
    assert stats[:4] == [2, 2, 2 * 5, 2 * 1]


# ------------------------------------------------------------------------------------------------------------
# Controls: found_inf, grad_scale, clip_coef, no tables
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adamw-amsgrad-maximize", "sgd-momentum-dampening-wd", "lion"])
def test_found_inf_skips_everything(sim, cpu_ops, name):
    rule, hp, gkw = variant(name)
    specs = standard_specs()
    g = Group(rule, specs, torch.bfloat16, master=True, **gkw)
    run(sim, g, hp, grad_sequence(specs, 2, torch.bfloat16), extra=sim_args())  # some state first
    before = g.clone()
    bad = grad_sequence(specs, 1, torch.bfloat16, seed=5, scale=1e30)
    stats = run(sim, g, hp, bad, extra=sim_args(), ctl_kw=dict(found_inf=1.0, grad_scale=2.0), start=2)
    assert_groups_equal(g, before)  # params, master params, states and steps untouched
    assert stats[2] == stats[3] == 0 and stats[4] > 0  # every block skipped
    # The CPU backend agrees, and a following clean step continues identically on both.
    ref = before.clone()
    run(cpu_ops, ref, hp, bad, ctl_kw=dict(found_inf=1.0, grad_scale=2.0), start=2)
    assert_groups_equal(ref, before)
    nxt = grad_sequence(specs, 1, torch.bfloat16, seed=6)
    run(sim, g, hp, nxt, extra=sim_args(), ctl_kw=dict(found_inf=0.0), start=2)
    run(cpu_ops, ref, hp, nxt, ctl_kw=dict(found_inf=0.0), start=2)
    assert_groups_equal(g, ref)
    assert not torch.equal(g.params[3], before.params[3])


@pytest.mark.parametrize("name", ["adamw", "sgd-nesterov-maximize", "lion"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grad_scale_and_clip_coef(sim, cpu_ops, name, dtype):
    rule, hp, gkw = variant(name)
    specs = standard_specs()
    ref = Group(rule, specs, dtype, **gkw)
    ours = ref.clone()
    grads = grad_sequence(specs, 4, dtype, scale=0.5)
    ctl = dict(grad_scale=3.0, clip_coef=0.37)  # 1/3 is inexact: the float32 reciprocal must match
    run(sim, ours, hp, grads, extra=sim_args(), ctl_kw=ctl)
    run(cpu_ops, ref, hp, grads, ctl_kw=ctl)
    assert_groups_equal(ours, ref)


@pytest.mark.parametrize("name", ["adamw", "sgd-momentum-dampening-wd", "lion"])
def test_without_tables(sim, cpu_ops, name):
    # schedule=None: the scalar lr / beta1 / momentum arguments are used, and no schedule_step is passed.
    rule, hp, gkw = variant(name)
    specs = standard_specs()
    ref = Group(rule, specs, torch.float32, **gkw)
    ours = ref.clone()
    grads = grad_sequence(specs, 3, torch.float32)
    ctl = dict(lr_table=False, mom_table=False)
    run(sim, ours, hp, grads, extra=sim_args(), ctl_kw=ctl)
    run(cpu_ops, ref, hp, grads, ctl_kw=ctl)
    assert_groups_equal(ours, ref)
    oracle = run_oracle(rule, hp, ref_params(specs, torch.float32), grads,
                        use_tables=False)
    assert_close_fp32(ours.params, oracle[0])


@pytest.mark.parametrize("name", ["adamw", "adam-l2-amsgrad-maximize", "sgd-momentum-dampening-wd", "lion"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_decay_table(sim, cpu_ops, name, dtype):
    """weight_decay_table: absolute weight decays read at the schedule step like lr_table (past its end the
    last entry holds; entry 0 is 0, which skips the decay), replacing the weight_decay argument: bitwise
    equal to the CPU op, and equal to the oracle with group["weight_decay"] set from the table every step."""
    rule, hp, gkw = variant(name)
    hp = {**hp, "weight_decay": 123.0}  # ignored: the table replaces it
    specs = standard_specs()
    ref = Group(rule, specs, dtype, **gkw)
    ours = ref.clone()
    n_steps = len(WD_TABLE) + 2
    grads = grad_sequence(specs, n_steps, dtype)
    run(sim, ours, hp, grads, extra=sim_args(), ctl_kw=dict(wd_table=True))
    run(cpu_ops, ref, hp, grads, ctl_kw=dict(wd_table=True))
    assert_groups_equal(ours, ref)
    params, _ = run_oracle(rule, hp, ref_params(specs, dtype), grads, wd_table=True)
    if dtype == torch.float32:
        assert_close_fp32(ours.params, params)
    else:
        for a, b in zip(ours.params, params):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_argument_checks(sim):
    """Each rejected call leaves the tensors it was given (params, grads, states, steps) as they were: checked
    on the very lists passed to the call, after a step that made the states non-zero."""
    rule, hp, gkw = variant("adamw")
    specs = [Spec((5,)), Spec((6,))]
    g = Group(rule, specs, torch.float32, **gkw)
    run(sim, g, hp, grad_sequence(specs, 1, torch.float32), extra=sim_args())  # non-zero states, steps == 1
    cases = []
    bad = g.clone()
    bad.states[0] = [bad.states[0][0], torch.zeros(7)]
    cases.append((bad, "exp_avgs\\[1\\] has shape"))
    bad = g.clone()
    bad.steps = [torch.ones((), dtype=torch.float32), bad.steps[1]]
    cases.append((bad, "steps\\[0\\] must be a one-element int64 tensor"))
    bad = g.clone()
    bad.grads = [t.to(torch.float64) for t in bad.grads]
    cases.append((bad, "grads\\[0\\] has dtype"))
    for bad, message in cases:
        bad.set_grads(grad_sequence(specs, 1, torch.float32, seed=7)[0])
        before = bad.clone()
        with pytest.raises(RuntimeError, match=message):
            call(sim, bad, hp, controls(1), extra=sim_args())
        assert_groups_equal(bad, before)
        assert_same(bad.grads, before.grads, "grads")
        assert [float(s) for s in bad.steps] == [1.0, 1.0]
    # A bad weight_decay_table is rejected like a bad lr_table, before anything changes.
    float_table = controls(1, lr_table=False, mom_table=False, wd_table=True)
    float_table["wd_table"] = float_table["wd_table"].float()
    no_counter = controls(1, lr_table=False, mom_table=False, wd_table=True)
    no_counter["schedule_step"] = None
    for ctl, message in ((float_table, "weight_decay_table must be float64, got Float"),
                         (no_counter, "a schedule table of more than one entry needs schedule_step")):
        target = g.clone()
        target.set_grads(grad_sequence(specs, 1, torch.float32, seed=7)[0])
        before = target.clone()
        with pytest.raises(RuntimeError, match=message):
            call(sim, target, hp, ctl, extra=sim_args())
        assert_groups_equal(target, before)
        assert [float(s) for s in target.steps] == [1.0, 1.0]


# ------------------------------------------------------------------------------------------------------------
# Agreement with torch.optim and lion-pytorch
# ------------------------------------------------------------------------------------------------------------
def ref_params(specs, dtype):
    gen = torch.Generator().manual_seed(0)  # the same initial values as Group(..., seed=0)
    return [torch.randn(s.size, generator=gen, dtype=torch.float64).to(dtype) for s in specs]


def run_oracle(rule, hp, params, grads_seq, *, use_tables=True, wd_table=False):
    """torch.optim.AdamW / Adam / SGD (single-tensor) or lion_pytorch.Lion, lr / beta1 / momentum (and, with
    wd_table, weight_decay) set per step from the tables. Returns (params, states per state slot)."""
    ps = [p.clone() for p in params]
    if rule == "adamw":
        cls = torch.optim.AdamW if hp.get("decoupled", True) else torch.optim.Adam
        opt = cls(ps, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"], weight_decay=hp["weight_decay"],
                  amsgrad=hp["amsgrad"], maximize=hp["maximize"], foreach=False)
    elif rule == "sgd":
        opt = torch.optim.SGD(ps, lr=hp["lr"], momentum=hp["momentum"], dampening=hp["dampening"],
                              weight_decay=hp["weight_decay"], nesterov=hp["nesterov"], maximize=hp["maximize"],
                              foreach=False)
    else:
        from lion_pytorch import Lion

        opt = Lion(ps, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), weight_decay=hp["weight_decay"])
    for step, grads in enumerate(grads_seq):
        for group in opt.param_groups:
            if use_tables:
                group["lr"] = table_at(LR_TABLE, step)
                if rule == "sgd":
                    if hp["momentum"] != 0:
                        group["momentum"] = table_at(MOM_TABLE, step)
                else:
                    group["betas"] = (table_at(MOM_TABLE, step), hp["beta2"])
            if wd_table:
                group["weight_decay"] = table_at(WD_TABLE, step)
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    keys = {"adamw": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"], "sgd": ["momentum_buffer"], "lion": ["exp_avg"]}
    states = [[opt.state[p].get(k) for p in ps] for k in keys[rule]]
    return ps, states


def assert_close_fp32(ours, oracle, rtol=1e-6, atol=5e-7):
    # float32: rules.h follows torch.optim's single-tensor operations (and lion-pytorch's) with their
    # roundings (explicit fused multiply-adds where torch's CPU add(alpha=), lerp and addcmul fuse), with the
    # scalars torch computes in double on the host also computed in double and rounded once. What differs is
    # torch's CPU sqrt (one ulp off the correctly rounded result for ~20% of float32 inputs) in AdamW's
    # denominator: ~1 ulp per step, a few ulps after a few steps: rtol 1e-6 is ~8 float32 ulps. The atol (~4 ulps at magnitude 1, the scale of the
    # params and grads here) covers elements that cancel to near zero, where one ulp of the O(1) inputs is a
    # large relative error of the result.
    for i, (a, b) in enumerate(zip(ours, oracle)):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=rtol, atol=atol, msg=lambda m: f"tensor {i}: {m}")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_float32_matches_torch(sim, name):
    rule, hp, gkw = variant(name)
    specs = standard_specs()
    g = Group(rule, specs, torch.float32, **gkw)
    grads = grad_sequence(specs, STEPS, torch.float32)
    run(sim, g, hp, grads, extra=sim_args())
    params, states = run_oracle(rule, hp, ref_params(specs, torch.float32), grads)
    assert_close_fp32(g.params, params)
    for ours, theirs in zip(g.states, states):
        assert_close_fp32(ours, theirs)
    if rule == "adamw":
        assert [int(s) for s in g.steps] == [STEPS] * len(specs)


@pytest.mark.parametrize("name", ["adamw-amsgrad-maximize", "adam-l2-amsgrad-maximize", "sgd-momentum-dampening-wd",
                                  "sgd-nesterov-maximize", "lion"])
def test_float64_matches_torch(sim, name):
    rule, hp, gkw = variant(name)
    specs = standard_specs()
    g = Group(rule, specs, torch.float64, **gkw)
    grads = grad_sequence(specs, STEPS, torch.float64)
    run(sim, g, hp, grads, extra=sim_args())
    params, states = run_oracle(rule, hp, ref_params(specs, torch.float64), grads)
    for ours, theirs in zip([g.params, *g.states], [params, *states]):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


# bfloat16 / float16 params without master weights (and with them): tests/test_low_precision.py runs these block
# bodies step by step against a float64 oracle fed each step's inputs.


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", ["adamw-amsgrad-maximize", "sgd-momentum-dampening-wd", "lion"])
def test_master_weights_match_float32_torch(sim, name, dtype):
    """bf16 / fp16 params with float32 master params and states: the master copy follows torch.optim run in
    float32 on the (exactly representable) low-precision grads, and the params are the master rounded."""
    rule, hp, gkw = variant(name)
    specs = standard_specs()
    g = Group(rule, specs, dtype, master=True, **gkw)
    grads = grad_sequence(specs, STEPS, dtype)
    run(sim, g, hp, grads, extra=sim_args())
    params, states = run_oracle(rule, hp, [p.float() for p in ref_params(specs, dtype)],
                                [[x.float() for x in gs] for gs in grads])
    assert_close_fp32(g.master_params, params)
    for ours, theirs in zip(g.states, states):
        assert_close_fp32(ours, theirs)
    for p, m in zip(g.params, g.master_params):
        assert torch.equal(p, m.to(dtype))


@pytest.mark.parametrize("name", ["adamw", "sgd-momentum-dampening-wd", "lion"])
def test_grad_scale_and_clip_match_torch(sim, name):
    """grad_scale / clip_coef give the update torch.optim makes after GradScaler.unscale_ (multiply by the
    float32 reciprocal) and clip_grad_norm_ (multiply by the float32 coefficient)."""
    rule, hp, gkw = variant(name)
    specs = standard_specs()
    g = Group(rule, specs, torch.float32, **gkw)
    grads = grad_sequence(specs, 4, torch.float32)
    scale, coef = 1024.0, 0.37
    scaled = [[x * scale for x in gs] for gs in grads]  # exact: a power of two
    run(sim, g, hp, scaled, extra=sim_args(), ctl_kw=dict(grad_scale=scale, clip_coef=coef))
    inv = torch.tensor(1.0 / scale, dtype=torch.float32)
    coef32 = torch.tensor(coef, dtype=torch.float32)
    unscaled = [[(x * inv) * coef32 for x in gs] for gs in scaled]
    params, _ = run_oracle(rule, hp, ref_params(specs, torch.float32), unscaled)
    assert_close_fp32(g.params, params)


@pytest.mark.parametrize("name", ["adamw", "sgd-nesterov-maximize", "lion"])
def test_real_grad_scaler_and_clip_grad_norm(sim, name):
    """The same through torch's own code instead of (g * inv) * coef: the oracle steps with a real
    torch.amp.GradScaler (scale, unscale_, step, update; the scale doubles every 2 steps) and clip_grad_norm_ in
    between; the simulated op gets the scaled grads with the scale and the coefficient clip_grad_norm_ applied.
    The grads grow over the steps, so some steps are clipped and some are not."""
    from oracles import torch_amp_clip_step

    rule, hp, gkw = variant(name)
    specs = standard_specs()
    g = Group(rule, specs, torch.float32, **gkw)
    grads = [[x * (0.5 + 0.3 * t) for x in gs] for t, gs in enumerate(grad_sequence(specs, STEPS, torch.float32))]
    ps = [p.clone().requires_grad_() for p in ref_params(specs, torch.float32)]
    oracle = {"adamw": lambda: torch.optim.AdamW(ps, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                                                 weight_decay=hp["weight_decay"], foreach=False),
              "sgd": lambda: torch.optim.SGD(ps, lr=hp["lr"], momentum=hp["momentum"], nesterov=hp["nesterov"],
                                             weight_decay=hp["weight_decay"], maximize=hp["maximize"], foreach=False),
              "lion": lambda: __import__("lion_pytorch").Lion(ps, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]),
                                                              weight_decay=hp["weight_decay"])}[rule]()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    clipped = []
    for step, gs in enumerate(grads):
        for group in oracle.param_groups:  # the lr / momentum the simulated op reads from its tables
            group["lr"] = table_at(LR_TABLE, step)
            if rule == "sgd":
                group["momentum"] = table_at(MOM_TABLE, step)
            else:
                group["betas"] = (table_at(MOM_TABLE, step), hp["beta2"])
        scaled, scale, coef, total = torch_amp_clip_step(scaler, oracle, ps, gs, max_norm=40.0)
        clipped.append(total > 40.0)
        g.set_grads(scaled)
        call(sim, g, hp, dict(controls(step), grad_scale=scale, clip_coef=coef), first_step=step == 0,
             extra=sim_args())
    assert any(clipped) and not all(clipped), clipped
    assert scaler.get_scale() == 2.0 ** 13
    assert_close_fp32(g.params, [p.detach() for p in ps])


# ------------------------------------------------------------------------------------------------------------
# Small states (8-bit / bfloat16 states, stochastic rounding): the small-state block body against the CPU kernel
# ------------------------------------------------------------------------------------------------------------
# The host run executes csrc/cuda/block_bodies.h small_rule_block phase by phase, every thread of a phase before
# the barrier that ends it (the per-quantization-block absmax is reduced through the shared slots between two
# barriers), with a shared memory that starts as garbage. The CPU kernel (csrc/cpu/state_io.h over the same codec)
# is the reference: both must give the same bits for params, master params, states and absmaxes, every step.
# Sizes: 4,096 (just quantized), 5,000 and a 2-D 70 x 73 (not multiples of 256: partial last blocks), 4,100 with
# misaligned param / grad (the element-wise access path), and 1,000 / 3 / 0 (float32 states under 8-bit: another
# format in the same call, launched as its own group).
SMALL_SPECS = [Spec((4096,)), Spec((5000,)), Spec((70, 73)), Spec((4100,), offsets={"params": 1, "grads": 1}),
               Spec((1000,)), Spec((3,)), Spec((0,))]
# Chunks of 1,536 elements, blocks of 128 threads: rounds of 512 elements (2 quantization blocks), 3 per chunk.
SMALL_SIM = dict(chunk_size=1536, block_dim=128, max_tensors=3, max_blocks=5)
SEED = 0x5EED_1234_5678


class SmallGroup:
    """The tensors of one small-state op call: params of `dtype` (float32 / bfloat16), with a float32 master copy
    or not, states in `precision` ("8bit": codes + absmax for tensors of >= 4,096 elements, float32 below; "bf16"),
    and the op's small-state arguments (state_absmaxes in the op's order, rounding, rounding_step)."""

    def __init__(self, rule, specs, dtype, precision, *, master=False, stochastic=False, amsgrad=False,
                 momentum=True, seed=0):
        from fusedopt import quantization as Q

        self.rule, self.dtype = rule, dtype
        gen = torch.Generator().manual_seed(seed)
        self.params = [s.new("params", dtype).copy_(torch.randn(s.size, generator=gen)) for s in specs]
        self.grads = [s.new("grads", dtype) for s in specs]
        self.master_params = ([s.new("master", torch.float32).copy_(p) for s, p in zip(specs, self.params)]
                              if master else [])
        lists = {"adamw": 3, "sgd": 1, "lion": 1}[rule]
        present = {"adamw": 3 if amsgrad else 2, "sgd": 1 if momentum else 0, "lion": 1}[rule]
        signed = {"adamw": [True, False, False], "sgd": [True], "lion": [True]}[rule]
        self.states, self.absmaxes = [], []
        for k in range(lists):
            row, absmax_row = [], []
            for s in specs:
                quantized = precision == "8bit" and Q.is_quantized_size(s.numel)
                absmax = torch.empty(0)
                if k < present:
                    if quantized:
                        t = s.new(f"state{k}", torch.uint8).fill_(127 if signed[k] else 0)
                        absmax = torch.zeros(Q.num_blocks(s.numel))
                    else:
                        t = s.new(f"state{k}", torch.bfloat16 if precision == "bf16" else torch.float32)
                    row.append(t)
                absmax_row.append(absmax)
            if k < present:
                self.states.append(row)
            self.absmaxes.extend(absmax_row)
        self.steps = [torch.zeros((), dtype=torch.int64) for _ in specs] if rule == "adamw" else []
        # stochastic rounding: param i is param 2 * i + 1 of its optimizer, and tensor 1 a shard at element 7,000
        self.rounding = [SEED] + [v for i in range(len(specs)) for v in (2 * i + 1, 7000 if i == 1 else 0)] \
            if stochastic else []
        self.rounding_step = torch.tensor(3, dtype=torch.int64) if stochastic else None

    def clone(self):
        other = Group.clone(self)  # params, grads, master params, states, steps
        other.absmaxes = [t.clone() for t in self.absmaxes]
        other.rounding_step = None if self.rounding_step is None else self.rounding_step.clone()
        return other

    set_grads = Group.set_grads

    def small_args(self):
        return (self.absmaxes, self.rounding, self.rounding_step)


def small_step(op_ns, g: SmallGroup, hp, step, grads, *, skipped=False, sim_kw=None):
    """One op call at `step` (lr / momentum tables; found_inf = 1 when `skipped`, as after a GradScaler overflow).
    The rounding counter then advances unless the step was skipped, as the optimizers advance it (on the device,
    after the op: fusedopt/optim/_small_state.py _advance_rounding_counters). With sim_kw: the simulated op, whose
    statistics are returned."""
    g.set_grads(grads)
    ctl = controls(step, found_inf=1.0 if skipped else 0.0)
    extra = sim_args(*g.small_args(), **sim_kw) if sim_kw is not None else g.small_args()
    out = call(op_ns, g, hp, ctl, first_step=(step == 0), extra=extra)
    if g.rounding_step is not None and not skipped:
        g.rounding_step += 1
    return out


def assert_small_equal(a: SmallGroup, b: SmallGroup):
    assert_same(a.params, b.params, "params")
    assert_same(a.master_params, b.master_params, "master_params")
    for k, (sa, sb) in enumerate(zip(a.states, b.states)):
        assert_same(sa, sb, f"state{k}")
    assert_same(a.absmaxes, b.absmaxes, "absmaxes")
    assert [int(s) for s in a.steps] == [int(s) for s in b.steps]


SMALL_VARIANTS = ["adamw", "adamw-amsgrad-maximize", "adam-l2-amsgrad-maximize", "sgd-momentum-dampening-wd",
                  "sgd-nesterov-maximize", "lion"]
# (param dtype, master copy, stochastic rounding)
PARAM_MODES = {"fp32": (torch.float32, False, False), "bf16-sr": (torch.bfloat16, False, True),
               "bf16-master-sr": (torch.bfloat16, True, True)}


@pytest.mark.parametrize("mode", list(PARAM_MODES))
@pytest.mark.parametrize("precision", ["8bit", "bf16"])
@pytest.mark.parametrize("name", SMALL_VARIANTS)
def test_small_state_matches_cpu_backend(sim, cpu_ops, name, precision, mode):
    """Five steps with lr / momentum tables, the third one GradScaler-skipped: params, master params, states,
    absmaxes and step counters bitwise equal to the CPU kernel after every step."""
    rule, hp, gkw = variant(name)
    dtype, master, stochastic = PARAM_MODES[mode]
    ref = SmallGroup(rule, SMALL_SPECS, dtype, precision, master=master, stochastic=stochastic,
                     amsgrad=gkw.get("amsgrad", False))
    ours = ref.clone()
    grads = grad_sequence(SMALL_SPECS, 5, dtype)
    stats = None
    for t, gs in enumerate(grads):  # compared after every step, so a difference is caught where it starts
        out = small_step(sim, ours, hp, t, gs, skipped=t == 2, sim_kw=SMALL_SIM)
        small_step(cpu_ops, ref, hp, t, gs, skipped=t == 2)
        stats = list(out) if stats is None else [a + b for a, b in zip(stats, out)]
        assert_small_equal(ours, ref)
    # the small-state body ran (and nothing else did); the skipped step skipped every block
    assert stats[5] > 0 and stats[2] == stats[3] == 0 and stats[4] > 0
    if precision == "8bit":
        # every 8-bit block passed its barriers: 1 after zeroing the shared absmax slots, 2 per round (after the
        # updates, after the encoding); the float32-state blocks of the same call none (4 steps were not skipped)
        chunk, rnd = SMALL_SIM["chunk_size"], SMALL_SIM["block_dim"] * 4
        per_step = sum(1 + 2 * -(-min(chunk, s.numel - c) // rnd)
                       for s in SMALL_SPECS if s.numel >= 4096 for c in range(0, s.numel, chunk))
        assert stats[6] == 4 * per_step
        assert all(bool((a != 0).all()) for a in ours.absmaxes)  # every block was encoded (the empty ones: none)
        assert ours.states[0][0].dtype == torch.uint8 and ours.states[0][4].dtype == torch.float32
    if stochastic and dtype == torch.bfloat16 and not master:
        # stochastic rounding did something: rounding the same run to nearest gives other params
        nearest = SmallGroup(rule, SMALL_SPECS, dtype, precision, amsgrad=gkw.get("amsgrad", False))
        for t, gs in enumerate(grads):
            small_step(cpu_ops, nearest, hp, t, gs, skipped=t == 2)
        assert not all(torch.equal(a, b) for a, b in zip(nearest.params, ours.params))


@pytest.mark.parametrize("name", ["adamw-amsgrad-maximize", "sgd-nesterov-maximize", "lion"])
def test_small_state_launch_shapes_do_not_matter(sim, cpu_ops, name):
    """8-bit states with stochastically rounded bf16 params under other launch shapes: blocks and threads in
    reverse order, 4 rounds per chunk (the double-buffered absmax slots are reused), rounds longer than the chunk
    (idle threads), one tensor per launch, and the device's own sizes (64 Ki-element chunks, 512 threads: 8
    quantization blocks per round, 32 rounds per chunk) with a tensor of 2 chunks + a partial block. Bitwise equal
    to the CPU kernel every time."""
    rule, hp, gkw = variant(name)
    specs = SMALL_SPECS + [Spec((65536 + 4096 + 77,))]
    base = SmallGroup(rule, specs, torch.bfloat16, "8bit", stochastic=True, amsgrad=gkw.get("amsgrad", False))
    grads = grad_sequence(specs, 2, torch.bfloat16)
    ref = base.clone()
    for t, gs in enumerate(grads):
        small_step(cpu_ops, ref, hp, t, gs)
    settings = [dict(SMALL_SIM, reverse=True), dict(chunk_size=1024, block_dim=64),
                dict(chunk_size=256, block_dim=128, max_tensors=1, max_blocks=2),
                dict(chunk_size=0, max_tensors=0, max_blocks=0, block_dim=0)]  # the device's sizes
    for kw in settings:
        g = base.clone()
        for t, gs in enumerate(grads):
            small_step(sim, g, hp, t, gs, sim_kw=kw)
        assert_small_equal(g, ref)


def test_small_state_argument_checks(sim):
    """Rejected before anything is modified: float16 params with 8-bit states (they take the staged path, as on
    the CPU), a state_absmaxes list of the wrong length, an absmax with too few blocks, rounding without its
    counter, and (simulation only) chunks that are not whole quantization blocks."""
    rule, hp, _ = variant("adamw")
    specs = [Spec((4096,)), Spec((10,))]
    g = SmallGroup(rule, specs, torch.float32, "8bit")
    small_step(sim, g, hp, 0, grad_sequence(specs, 1, torch.float32)[0], sim_kw=SMALL_SIM)
    cases = []
    half = g.clone()
    half.params = [p.half() for p in half.params]
    half.grads = [p.half() for p in half.grads]
    half.states[1][1] = half.states[1][1].half()
    half.states[0][1] = half.states[0][1].half()
    cases.append((half, SMALL_SIM, "Half params take states of their own dtype"))
    short = g.clone()
    short.absmaxes = short.absmaxes[:-1]
    cases.append((short, SMALL_SIM, "state_absmaxes has 5 entries, expected 6"))
    few = g.clone()
    few.absmaxes[0] = few.absmaxes[0][:-1].clone()
    cases.append((few, SMALL_SIM, "needs a contiguous float32 absmax of at least 16 entries"))
    counterless = g.clone()
    counterless.rounding = [SEED, 0, 0, 1, 0]
    cases.append((counterless, SMALL_SIM, "stochastic rounding needs rounding_step"))
    cases.append((g.clone(), dict(SMALL_SIM, chunk_size=100), "chunks of a multiple of 256 elements"))
    for bad, kw, message in cases:
        bad.set_grads([x.to(bad.params[0].dtype) for x in grad_sequence(specs, 1, torch.float32, seed=7)[0]])
        before = bad.clone()
        with pytest.raises(RuntimeError, match=message):
            call(sim, bad, hp, controls(1), extra=sim_args(*bad.small_args(), **kw))
        assert_small_equal(bad, before)
        assert [int(s) for s in bad.steps] == [1, 1]

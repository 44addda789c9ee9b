"""Small, deterministic training runs for tests/test_training_quality.py: a digits MLP and a character-level
transformer LM, each trained with one optimizer configuration and seed, returning the final loss.

Data ships with installed packages (no downloads): scikit-learn's digits (1,797 8x8 images), and for the LM the
Python sources of torch itself (a fixed list of files; the text differs between torch releases, which is why
every test compares configurations trained in the same run, never with a figure written down).

A configuration (CONFIGS) names the param dtype and the optimizer with its options; "fp32" AdamW / Lion use the
independent oracles (torch.optim.AdamW single-tensor, lion-pytorch), the rest fusedopt. The final loss is the
cross-entropy of the trained weights, evaluated in float32 (a float32 copy of the model) on fixed data: for the
MLP the whole digits set, for the LM fixed held-out windows of the text. It measures the weights the optimizer
reached, not the rounding of a bf16 forward pass.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

import fusedopt


# ----------------------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    rule: str  # "adamw" or "lion"
    param_dtype: torch.dtype
    impl: str  # "torch" (torch.optim.AdamW, foreach=False), "lion-pytorch" or "fusedopt"
    options: tuple = ()  # fusedopt keyword arguments, as (name, value) pairs

    def kwargs(self) -> dict:
        return dict(self.options)


CONFIGS = {
    # the float32 baselines (independent oracles)
    "adamw fp32": Config("adamw", torch.float32, "torch"),
    "lion fp32": Config("lion", torch.float32, "lion-pytorch"),
    # fusedopt today
    "adamw fp32 fusedopt": Config("adamw", torch.float32, "fusedopt"),
    "adamw bf16 master": Config("adamw", torch.bfloat16, "fusedopt", (("master_weights", True),)),
    "adamw bf16": Config("adamw", torch.bfloat16, "fusedopt"),  # bf16 params and states, round-to-nearest
    # issue 13
    "adamw 8bit": Config("adamw", torch.float32, "fusedopt", (("state_precision", "8bit"),)),
    "lion 8bit": Config("lion", torch.float32, "fusedopt", (("state_precision", "8bit"),)),
    "adamw bf16 sr": Config("adamw", torch.bfloat16, "fusedopt", (("stochastic_rounding", True),)),
    # the peers' implementations of the same schemes: not used by the tests (not installed in CI); measured with
    # `python tests/training_runs.py` where they are, to size the tests' margins
    "adamw 8bit bnb": Config("adamw", torch.float32, "bnb"),
    "lion 8bit bnb": Config("lion", torch.float32, "bnb"),
    "adamw 8bit torchao": Config("adamw", torch.float32, "torchao"),
    "adamw bf16 sr torchao": Config("adamw", torch.bfloat16, "torchao", (("bf16_stochastic_round", True),)),
}


def make_optimizer(cfg: Config, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if cfg.impl == "bnb":
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if cfg.rule == "adamw" else bnb.optim.Lion8bit
        return cls(params, lr=lr, weight_decay=weight_decay)
    if cfg.impl == "torchao":
        import torchao.optim as ao

        cls = ao._AdamW if cfg.kwargs().get("bf16_stochastic_round") else ao.AdamW8bit
        return cls(params, lr=lr, weight_decay=weight_decay, **cfg.kwargs())
    if cfg.rule == "adamw":
        if cfg.impl == "torch":
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)
        return fusedopt.FusedAdamW(params, lr=lr, weight_decay=weight_decay, backend="cpu", **cfg.kwargs())
    if cfg.impl == "lion-pytorch":
        from lion_pytorch import Lion

        return Lion(params, lr=lr, weight_decay=weight_decay)
    return fusedopt.FusedLion(params, lr=lr, weight_decay=weight_decay, backend="cpu", **cfg.kwargs())


@dataclass(frozen=True)
class Run:
    """What one training run gives: the final float32 loss, and the dtypes the run actually held (so a test can
    check that a configuration trained what it names: uint8 codes for "8bit", bfloat16 params and states for
    "bf16", ...)."""

    loss: float
    param_dtypes: Tuple[str, ...]  # sorted names of the params' dtypes at the end
    state_dtypes: Tuple[str, ...]  # sorted names of the dtypes of every optimizer state tensor but "step"


def _run(model: nn.Module, opt: torch.optim.Optimizer, loss: float) -> Run:
    states = {str(v.dtype) for st in opt.state.values() for k, v in st.items()
              if k != "step" and isinstance(v, torch.Tensor)}
    return Run(loss, tuple(sorted({str(p.dtype) for p in model.parameters()})), tuple(sorted(states)))


# ----------------------------------------------------------------------------------------------------------
# Digits MLP
# ----------------------------------------------------------------------------------------------------------

DIGITS_STEPS = 300
DIGITS_BATCH = 128
DIGITS_HIDDEN = 128
# Lion's lr is 3-10x smaller than AdamW's (its update has norm ~1 per element: Chen et al. 2023, sec. 3)
DIGITS_LR = {"adamw": 3e-3, "lion": 1e-3}


def cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr decayed from its value to 0 along a half cosine over ``steps`` (torch's LambdaLR, the same for every
    implementation): the end of the run is then a converged point, not one step of an oscillation at the
    peak lr, so runs whose arithmetic differs slightly end at comparable losses (Lion's sign update moves every
    weight by the full lr each step: at a constant lr its final loss jumps from seed to seed)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))


def forward_fp32(model: nn.Module, *args) -> torch.Tensor:
    """The model's forward in float32 whatever its params' dtype: bf16 params are read through float32 copies
    (their grads flow back, rounded to bf16, into the bf16 params). The optimizer, which is what is tested, sees
    bf16 params and grads; the forward and backward arithmetic is the float32 one of every configuration (bf16
    GEMMs on a CPU without bf16 instructions are ~7x slower, and their rounding is not what is measured)."""
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return model(*args)
    params = {name: p.float() for name, p in model.named_parameters()}
    return torch.func.functional_call(model, params, args)


@functools.lru_cache(maxsize=None)
def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y, dtype=torch.long)


def digits_run(cfg: Config, seed: int, steps: int = DIGITS_STEPS) -> Run:
    """Train a 64-128-128-10 MLP (layers of 8,192 and 16,384 weights: large enough to be 8-bit quantized; the
    1,280-weight output layer and the biases keep float32 states) for ``steps`` minibatch steps; return the
    float32 cross-entropy of the final weights on all 1,797 digits."""
    x, y = _digits()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    h = DIGITS_HIDDEN
    model = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
    model = model.to(cfg.param_dtype)
    opt = make_optimizer(cfg, model.parameters(), DIGITS_LR[cfg.rule], weight_decay=1e-2)
    sched = cosine(opt, steps)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (DIGITS_BATCH,), generator=gen)
        loss = F.cross_entropy(forward_fp32(model, x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return _run(model, opt, F.cross_entropy(copy.deepcopy(model).float()(x), y).item())


# ----------------------------------------------------------------------------------------------------------
# Character-level transformer LM on torch's own sources
# ----------------------------------------------------------------------------------------------------------

# fixed files of the installed torch (relative to its package folder)
LM_FILES = ("optim/adamw.py", "optim/sgd.py", "optim/optimizer.py", "nn/modules/linear.py",
            "nn/modules/activation.py")
LM_CHARS = 120_000  # the first characters of their concatenation; the last 10% are held out
LM_VOCAB = 128  # ASCII; other characters become "?"
LM_CTX = 32
LM_BATCH = 8
LM_STEPS = 200
# small enough that a late bf16 update (cosine-decayed) is under half an ulp of many weights
LM_LR = {"adamw": 1e-3, "lion": 3e-4}
LM_EVAL_WINDOWS = 64


@functools.lru_cache(maxsize=None)
def lm_text() -> torch.Tensor:
    """The token ids (ASCII codes) of the fixed torch source files; needs at least LM_CHARS characters."""
    root = os.path.dirname(torch.__file__)
    text = ""
    for name in LM_FILES:
        with open(os.path.join(root, name), encoding="utf-8") as f:
            text += f.read()
    if len(text) < LM_CHARS:
        raise RuntimeError(f"torch's sources {LM_FILES} have {len(text)} characters, fewer than {LM_CHARS}")
    codes = [ord(c) if ord(c) < LM_VOCAB else ord("?") for c in text[:LM_CHARS]]
    return torch.tensor(codes, dtype=torch.long)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return h + self.out(F.gelu(self.fc(self.ln2(h))))


class TinyLM(nn.Module):
    """A GPT-style decoder: token + learned position embeddings, pre-LN blocks, a linear head (untied)."""

    def __init__(self, vocab: int = LM_VOCAB, d: int = 64, layers: int = 2, heads: int = 4, ctx: int = LM_CTX):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(ctx, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def lm_run(cfg: Config, seed: int, steps: int = LM_STEPS) -> Run:
    """Train TinyLM (2 blocks, d=64: 0.12M params, every weight matrix >= 4,096 elements) on LM_BATCH random
    windows of LM_CTX + 1 characters of the first 90% of the text per step for ``steps`` steps; return the
    float32 next-character cross-entropy of the final weights on LM_EVAL_WINDOWS fixed windows of the held-out
    10%."""
    data = lm_text()
    split = int(len(data) * 0.9)
    train, held = data[:split], data[split:]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyLM().to(cfg.param_dtype)
    opt = make_optimizer(cfg, model.parameters(), LM_LR[cfg.rule], weight_decay=1e-2)
    sched = cosine(opt, steps)
    for _ in range(steps):
        start = torch.randint(0, len(train) - LM_CTX - 1, (LM_BATCH,), generator=gen)
        win = torch.stack([train[s: s + LM_CTX + 1] for s in start.tolist()])
        logits = forward_fp32(model, win[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, LM_VOCAB), win[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    starts = torch.linspace(0, len(held) - LM_CTX - 2, LM_EVAL_WINDOWS).long().tolist()
    win = torch.stack([held[s: s + LM_CTX + 1] for s in starts])
    with torch.no_grad():
        logits = copy.deepcopy(model).float()(win[:, :-1])
        return _run(model, opt, F.cross_entropy(logits.reshape(-1, LM_VOCAB), win[:, 1:].reshape(-1)).item())


TASKS = {"digits": digits_run, "lm": lm_run}


def main() -> None:
    """Print the final losses of every configuration that can run here (the peers' where installed), per seed,
    with CPU seconds: the measurements behind test_training_quality.py's margins.
    Usage, from the repository root:
        PYTHONPATH=. python tests/training_runs.py [digits|lm|all] [seeds, e.g. 0,1,2] [configs: substrings, e.g. bnb,fp32]
    (the peers' rows with an interpreter that has bitsandbytes / torchao and the same torch)."""
    import sys
    import time

    torch.set_num_threads(1)
    tasks = [sys.argv[1]] if len(sys.argv) > 1 and sys.argv[1] != "all" else list(TASKS)
    seeds = [int(s) for s in sys.argv[2].split(",")] if len(sys.argv) > 2 else [0, 1, 2]
    wanted = sys.argv[3].split(",") if len(sys.argv) > 3 else None
    for task in tasks:
        base = {}
        for name, cfg in CONFIGS.items():
            if name == "adamw fp32 fusedopt" or (wanted and not any(w in name for w in wanted)):
                continue
            t = time.process_time()
            try:
                losses = [TASKS[task](cfg, s).loss for s in seeds]
            except (TypeError, ImportError) as e:
                print(f"{task:6s} {name:22s} not run: {type(e).__name__}: {str(e)[:80]}", flush=True)
                continue
            mean = sum(losses) / len(losses)
            base[name] = mean
            ref = {"lion": "lion fp32"}.get(cfg.rule, "adamw fp32")
            if cfg.param_dtype == torch.bfloat16:
                ref = "adamw bf16 master"
            rel = f"{mean / base[ref]:.4f}x {ref}" if ref in base and ref != name else ""
            print(f"{task:6s} {name:22s} {' '.join(f'{x:.4f}' for x in losses)}  mean {mean:.4f}  {rel:28s} "
                  f"{(time.process_time() - t) / len(seeds):.1f} CPU s/run", flush=True)


if __name__ == "__main__":
    main()

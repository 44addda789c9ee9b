"""fusedopt.TableScheduler, and short CPU training runs with Hugging Face transformers.Trainer and PyTorch
Lightning that log the scheduled lr.

The lr a step uses comes from the schedule table on the device; the scheduler object only mirrors it on the
host for code that expects one. So the logged lrs must be the values of the schedule the table mirrors, taken
from Hugging Face's own get_cosine_schedule_with_warmup on a torch optimizer (rel 1e-12: both sides are float64
products of the same base lr and factor formula, which may differ in the last bit), and the runs must advance
the optimizer's counter once per optimizer step. No hub downloads: the models are defined here and
HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fusedopt
from fusedopt import schedules
from oracles import schedule_trace
from fusedopt.table_scheduler import TableScheduler

STEPS = 10
WARMUP = 3
BASE_LR = 1e-2


def table():
    return schedules.warmup_cosine(STEPS, WARMUP)


def expected_lrs(base=BASE_LR, n=STEPS + 1):
    """The oracle: the lr of optimizer steps 0..n-1 under transformers.get_cosine_schedule_with_warmup (what
    table() mirrors), read from a torch optimizer's param group as a training loop sees it."""
    from transformers import get_cosine_schedule_with_warmup

    return schedule_trace(lambda opt: get_cosine_schedule_with_warmup(opt, WARMUP, STEPS), n, lr=base)[0]


def approx(values):
    return pytest.approx(values, rel=1e-12, abs=0)


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=g).requires_grad_(), torch.randn(4, generator=g).requires_grad_()]


def set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


# ----------------------------------------------------------------------------------------------------------
# TableScheduler on its own
# ----------------------------------------------------------------------------------------------------------


def test_exported_from_package():
    assert fusedopt.TableScheduler is TableScheduler
    assert "TableScheduler" in fusedopt.__all__


@pytest.mark.parametrize("cls", [fusedopt.FusedAdamW, fusedopt.FusedSGD, fusedopt.FusedLion])
def test_follows_the_table_and_never_advances_it(cls):
    params = make_params()
    opt = cls([{"params": params[:1]}, {"params": params[1:], "lr": 2 * BASE_LR}], lr=BASE_LR, schedule=table())
    sched = TableScheduler(opt)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    exp, exp2 = expected_lrs(), expected_lrs(2 * BASE_LR)
    assert sched.get_last_lr() == approx([exp[0], exp2[0]])
    for t in range(STEPS):
        set_grads(params, t)
        opt.step()
        for _ in range(3):  # idempotent: repeated calls (accelerate steps it once per process) do not skip ahead
            sched.step()
        assert sched.last_epoch == t + 1
        # the table has one entry per step of the run (the length rule); after the run's last step the
        # scheduler shows the held last entry, not HF's never-used value at step STEPS
        k = min(t + 1, STEPS - 1)
        assert sched.get_last_lr() == approx([exp[k], exp2[k]])
        assert [g["lr"] for g in opt.param_groups] == sched.get_last_lr()  # what loggers read
        assert [g["initial_lr"] for g in opt.param_groups] == [BASE_LR, 2 * BASE_LR]  # the table's base
        assert [int(g["schedule_step"]) for g in opt.param_groups] == [t + 1, t + 1]  # advanced by the optimizer only
    assert opt.get_last_lr() == sched.get_last_lr()


def test_does_not_change_the_update():
    """The kernels read the table, not group["lr"]: a run with the scheduler attached is bitwise the run
    without it."""
    runs = []
    for with_sched in (False, True):
        params = make_params()
        opt = fusedopt.FusedAdamW(params, lr=BASE_LR, schedule=table(), weight_decay=0.1)
        sched = TableScheduler(opt) if with_sched else None
        for t in range(STEPS):
            set_grads(params, t)
            opt.step()
            if sched:
                sched.step()
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_rejects_what_it_cannot_mirror():
    p = make_params()
    with pytest.raises(TypeError, match="fusedopt optimizer"):
        TableScheduler(torch.optim.AdamW(p))
    with pytest.raises(ValueError, match="schedule"):
        TableScheduler(fusedopt.FusedAdamW(p))
    sched = TableScheduler(fusedopt.FusedAdamW(p, schedule=table()))
    with pytest.raises(ValueError, match="epoch"):
        sched.step(3)


def test_checkpoint_round_trip():
    params = make_params()
    opt = fusedopt.FusedSGD(params, lr=BASE_LR, momentum=0.9, schedule=table())
    sched = TableScheduler(opt)
    for t in range(4):
        set_grads(params, t)
        opt.step()
        sched.step()
    opt_sd, sched_sd = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    assert "optimizer" not in sched_sd and "_fused" not in sched_sd

    params2 = make_params()
    opt2 = fusedopt.FusedSGD(params2, lr=BASE_LR, momentum=0.9, schedule=table())
    sched2 = TableScheduler(opt2)
    sched2.load_state_dict(sched_sd)  # either order works: the scheduler re-reads the optimizer's counter
    opt2.load_state_dict(opt_sd)
    sched2.step()  # the usual refresh after a resume (HF / Lightning call step() after the next opt step)
    assert sched2.get_last_lr() == approx([expected_lrs()[4]])
    assert opt2.param_groups[0]["initial_lr"] == BASE_LR
    assert sched2.last_epoch == 4


# ----------------------------------------------------------------------------------------------------------
# Hugging Face transformers.Trainer
# ----------------------------------------------------------------------------------------------------------


class TinyRegressor(nn.Module):
    """A model in the shape Trainer expects (forward(**batch) -> {"loss", "logits"}); nothing from the hub."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x, labels=None):
        out = self.net(x)
        loss = None if labels is None else ((out.squeeze(-1) - labels) ** 2).mean()
        return {"loss": loss, "logits": out}


class RegressionData(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(-1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def test_hf_trainer_logs_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    from transformers import Trainer, TrainingArguments

    model = TinyRegressor()
    opt = fusedopt.FusedAdamW(model.parameters(), lr=BASE_LR, schedule=table())
    sched = TableScheduler(opt)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=RegressionData(), optimizers=(opt, sched))
    trainer.train()

    logged = [(h["step"], h["learning_rate"]) for h in trainer.state.log_history if "learning_rate" in h]
    assert [s for s, _ in logged] == list(range(1, STEPS + 1))
    # Trainer logs, at global step N, the lr that optimizer step N used: table entry N - 1
    assert [lr for _, lr in logged] == approx(expected_lrs()[:STEPS])
    assert all("loss" in h for h in trainer.state.log_history[:STEPS])
    # the optimizer advanced its counter once per step (neither Trainer nor the scheduler moved it further)
    assert opt.schedule_step == STEPS and int(opt.param_groups[0]["schedule_step"]) == STEPS
    assert sched.get_last_lr() == approx([expected_lrs()[STEPS - 1]])  # past the end: the last entry held


# ----------------------------------------------------------------------------------------------------------
# PyTorch Lightning
# ----------------------------------------------------------------------------------------------------------


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl
    return pl


def test_lightning_logs_the_table():
    pl = _lightning()
    from_logger = __import__(pl.__name__ + ".loggers.logger", fromlist=["Logger", "rank_zero_experiment"])
    LearningRateMonitor = __import__(pl.__name__ + ".callbacks", fromlist=["LearningRateMonitor"]).LearningRateMonitor

    class MemoryLogger(from_logger.Logger):
        def __init__(self):
            super().__init__()
            self.records = []

        @property
        def name(self):
            return "memory"

        @property
        def version(self):
            return 0

        @property
        @from_logger.rank_zero_experiment
        def experiment(self):
            return None

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.records.append((step, dict(metrics)))

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.log("scheduler_lr", self.lr_schedulers().get_last_lr()[0], on_step=True)
            return ((self.net(x).squeeze(-1) - y) ** 2).mean()

        def configure_optimizers(self):
            opt = fusedopt.FusedAdamW(self.parameters(), lr=BASE_LR, schedule=table())
            return {"optimizer": opt, "lr_scheduler": {"scheduler": TableScheduler(opt), "interval": "step"}}

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x.sum(-1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    logger = MemoryLogger()
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
                         callbacks=[LearningRateMonitor(logging_interval="step")], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    module = Module()
    trainer.fit(module, loader)

    # LearningRateMonitor logs param_groups[0]["lr"] before each step: the lr that step uses, table entry t
    monitored = [(s, m["lr-FusedAdamW"]) for s, m in logger.records if "lr-FusedAdamW" in m]
    assert [s for s, _ in monitored] == list(range(STEPS))
    assert [lr for _, lr in monitored] == approx(expected_lrs()[:STEPS])
    # self.log() of get_last_lr() inside training_step: the same values (Lightning logs them as float32)
    from_module = [m["scheduler_lr"] for _, m in logger.records if "scheduler_lr" in m]
    assert from_module == pytest.approx(expected_lrs()[:STEPS], rel=1e-6, abs=1e-12)
    opt = trainer.optimizers[0]
    assert opt.schedule_step == STEPS and int(opt.param_groups[0]["schedule_step"]) == STEPS

    # and the training itself is the plain loop's: same data, same optimizer, bitwise the same params
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    ref = fusedopt.FusedAdamW(net.parameters(), lr=BASE_LR, schedule=table())
    batches = list(loader)  # 8 batches an epoch: steps 9 and 10 start the second epoch
    for t in range(STEPS):
        xb, yb = batches[t % len(batches)]
        ref.zero_grad()
        ((net(xb).squeeze(-1) - yb) ** 2).mean().backward()
        ref.step()
    for a, b in zip(module.net.parameters(), net.parameters()):
        assert torch.equal(a.detach(), b.detach())

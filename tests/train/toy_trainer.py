"""A Trainer around a bigram softmax regression (logits = W[x]) on i.i.d. token pairs: milliseconds per step, and
its per-token gradient statistics have a closed form (used as the GNS oracle)."""

from __future__ import annotations

import torch
from torch import nn

from midtrain.plan import StagePlan
from midtrain.schedule import LRSchedule, horizon_tokens_for
from midtrain.train.distributed import DistInfo
from midtrain.train.trainer import Callback, Trainer

V, T = 8, 16  # vocabulary, row length (T - 1 predicted tokens per row)


class Bigram(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.w[input_ids]


def transition(seed: int = 1) -> torch.Tensor:
    """P[x, y]: the data's next-token distribution (rows sum to 1)."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2.0 * torch.randn(V, V, generator=g, dtype=torch.float64), dim=1)


class PairSource:
    """Every step: `micro` micro-batches of `rows` rows; x uniform, label at t+1 drawn from P[x_t] (i.i.d. pairs)."""

    def __init__(self, p: torch.Tensor, micro: int, rows: int, seed: int = 2):
        self.p, self.micro, self.rows = p, micro, rows
        self.g = torch.Generator().manual_seed(seed)

    def next_step(self) -> list[dict]:
        out = []
        for _ in range(self.micro):
            x = torch.randint(0, V, (self.rows, T), generator=self.g)
            y = torch.multinomial(self.p[x[:, :-1].reshape(-1)].float(), 1, generator=self.g).view(self.rows, T - 1)
            labels = torch.cat([torch.full((self.rows, 1), -100), y], dim=1)
            out.append({"input_ids": x, "labels": labels, "source_ids": torch.zeros_like(x)})
        return out


def plan(steps: int, batch_tokens: int, schedule: LRSchedule) -> StagePlan:
    return StagePlan(index=0, name="toy", init="scratch", steps=steps, tokens=steps * batch_tokens, seq_len=T,
                     batch_tokens=batch_tokens, seqs_per_step=batch_tokens // T, first_step=0, first_tokens=0,
                     schedule=schedule, mixture={}, fingerprint="")


def make_trainer(steps: int, lr: float, callbacks: list[Callback], *, micro: int = 4, rows: int = 2,
                 schedule: LRSchedule | None = None, model: Bigram | None = None,
                 optimizer: str = "sgd") -> Trainer:
    model = model or Bigram()
    batch_tokens = micro * rows * T
    schedule = schedule or LRSchedule(kind="constant", peak_lr=lr,
                                      horizon_tokens=horizon_tokens_for(steps, batch_tokens))
    opt = (torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0))
    return Trainer(model=model, optimizer=opt, loader=PairSource(transition(), micro, rows),
                   stage=plan(steps, batch_tokens, schedule), forward=lambda m, b: m(b["input_ids"]),
                   dist=DistInfo(), domains=["all"], precision="fp32", grad_clip=None, callbacks=callbacks)


class Record(Callback):
    """Keeps every step's weights and row."""

    def __init__(self):
        self.weights: list[torch.Tensor] = []
        self.rows: list[dict] = []

    def on_step_end(self, trainer: Trainer, row: dict) -> None:
        self.weights.append(trainer.model.w.detach().double().clone())
        self.rows.append(dict(row))

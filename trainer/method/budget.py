"""The forgetting budget: learn the new domain subject to "original-domain degradation <= EPS".

The constrained problem is solved by primal-dual training. The optimizer minimises the
Lagrangian over the weights; this module holds the dual side, one Lagrange multiplier
lambda >= 0, raised while the constraint is violated and lowered while it has slack:

    d       = bits per byte of the trained model - bits per byte of the backbone, on the same
              original-domain tokens (summed over ranks and micro batches, so every rank sees
              the same figure and holds the same lambda)
    d_hat   = running estimate of d: an EMA of the summed nats and bytes, then their ratio
    lambda <- max(0, lambda + dual_lr * (d_hat - EPS) / EPS)          once per optimizer step

The violation is measured as a fraction of the budget, so one dual step size fits every EPS
and every scale of bits per byte: `dual_lr` is how much lambda moves in one step when the
model forgets twice what it may.

What lambda weights depends on the method (`lever`):
  - "l1" (neutral_residues, sigmoid_gate): lambda is the l1 weight alpha, the lever that
    closes the gates on original-domain tokens;
  - "replay" (adapters, lora, finetune): lambda weights the LM loss of the step's
    original-domain tokens on top of the plain mixture loss,
        loss = CE(all tokens) + lambda * CE(original tokens),
    which is exactly the Lagrangian of "minimise the mixture loss s.t. CE(original) - ref <= EPS"
    (the constant terms -lambda * (ref + EPS) have no gradient). With lambda = 0 both levers
    give back the unconstrained method.

EPS is either absolute (bits per byte) or relative to the backbone's bits per byte on the
same tokens ("2%"), whose estimate is the reference part of the same EMA.
"""
from __future__ import annotations

import math
from typing import Optional

from ..config import MethodConfig

LN2 = math.log(2)

DEFAULT_DUAL_LR = {"l1": 0.5, "replay": 0.1}
"""Per-step change of lambda at a 100% violation; l1 weights are larger numbers than replay weights."""


def lever(method: MethodConfig) -> str:
    return "l1" if method.uses_l1 else "replay"


class ForgettingBudget:
    """The multiplier and its running estimate. Plain floats: identical on every rank, exact on resume."""

    def __init__(self, eps: float, relative: bool, lever: str, dual_lr: float, ema: float,
                 dual_lr_given: bool = True):
        if lever not in ("l1", "replay"):
            raise ValueError(f"lever must be l1 or replay, got {lever!r}")
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        self.eps, self.relative, self.lever, self.dual_lr, self.ema = eps, relative, lever, dual_lr, ema
        self.dual_lr_given = dual_lr_given
        self.multiplier = 0.0
        self.model_nats = self.ref_nats = self.nbytes = 0.0
        """EMAs of the summed NLL of the trained model and of the backbone, and of the bytes behind them."""
        self.measurements = 0
        """Measurements folded into the EMA."""
        self.updates = 0
        """Dual steps taken."""
        self.last: Optional[float] = None
        """The degradation of the last measurement alone (bits per byte), before smoothing."""
        self.reference: Optional[list[list[float]]] = None
        """[nats, bytes] of the backbone on each chunk of a fixed held-out probe, for the method that cannot
        switch back to its backbone (finetune): measured once, before the first step, and kept with the
        multiplier."""

    @classmethod
    def from_config(cls, method: MethodConfig, ema: float) -> Optional["ForgettingBudget"]:
        if method.budget is None:
            return None
        eps, relative = method.budget
        kind = lever(method)
        return cls(eps, relative, kind, method.dual_lr or DEFAULT_DUAL_LR[kind], ema,
                   dual_lr_given=method.dual_lr is not None)

    # ------------------------------------------------------------------ estimate

    def measure(self, model_nats: float, ref_nats: float, nbytes: float) -> None:
        """Fold one measurement (sums over the same original-domain tokens, all ranks) into the estimate."""
        if nbytes <= 0:
            return  # a step without original-domain tokens says nothing about forgetting
        self.last = (model_nats - ref_nats) / LN2 / nbytes
        b = self.ema if self.measurements else 0.0  # the first measurement is the estimate
        self.model_nats = b * self.model_nats + (1 - b) * model_nats
        self.ref_nats = b * self.ref_nats + (1 - b) * ref_nats
        self.nbytes = b * self.nbytes + (1 - b) * nbytes
        self.measurements += 1

    @property
    def degradation(self) -> Optional[float]:
        """d_hat in bits per byte, or None before any measurement."""
        if not self.measurements:
            return None
        return (self.model_nats - self.ref_nats) / LN2 / self.nbytes

    @property
    def backbone_bpb(self) -> Optional[float]:
        return self.ref_nats / LN2 / self.nbytes if self.measurements else None

    @property
    def eps_bpb(self) -> Optional[float]:
        """The budget in bits per byte (a relative budget needs the backbone's estimate first)."""
        if not self.relative:
            return self.eps
        base = self.backbone_bpb
        return None if base is None else self.eps * base

    @property
    def slack(self) -> Optional[float]:
        d, eps = self.degradation, self.eps_bpb
        return None if d is None or eps is None else eps - d

    # ------------------------------------------------------------------ dual step

    def step(self) -> None:
        """One dual ascent step from the current estimate (none before the first measurement)."""
        d, eps = self.degradation, self.eps_bpb
        if d is None or eps is None or eps <= 0:
            return
        self.multiplier = max(0.0, self.multiplier + self.dual_lr * (d - eps) / eps)
        self.updates += 1

    @property
    def l1_weight(self) -> Optional[float]:
        """alpha for the local loss (None: the method's own alpha)."""
        return self.multiplier if self.lever == "l1" else None

    @property
    def replay_weight(self) -> float:
        """Weight of the original tokens' LM loss added to the mixture loss (0 for the l1 lever)."""
        return self.multiplier if self.lever == "replay" else 0.0

    # ------------------------------------------------------------------ logging and checkpoints

    def record(self) -> dict:
        """The metrics.jsonl / tensorboard fields of a step (`budget/...`)."""
        out = {"lambda": self.multiplier, "eps_bpb": self.eps_bpb, "degradation": self.degradation,
               "slack": self.slack, "degradation_last": self.last}
        return {k: v for k, v in out.items() if v is not None}

    _STATE = ("multiplier", "model_nats", "ref_nats", "nbytes", "measurements", "updates", "last", "reference",
              "dual_lr", "ema", "eps", "relative", "lever")

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state: dict) -> None:
        """Restore the multiplier, its estimates and the dual step size, exactly.

        EPS stays the config's (a user may resume with another budget: the multiplier then moves on
        from where it was), and so does dual_lr when the config sets it explicitly.
        """
        if state["lever"] != self.lever:
            raise ValueError(f"budget state is for the {state['lever']} lever, this run uses {self.lever}")
        keys = ["multiplier", "model_nats", "ref_nats", "nbytes", "measurements", "updates", "last", "reference",
                "ema"]
        for k in keys + ([] if self.dual_lr_given else ["dual_lr"]):
            setattr(self, k, state[k])

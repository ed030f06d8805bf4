"""The forgetting budget: learn the new domain subject to "original-domain degradation <= EPS".

The constrained problem is solved by primal-dual training. The optimizer minimises the
Lagrangian over the weights; this module holds the dual side, one Lagrange multiplier
lambda >= 0, raised while the constraint is violated and lowered while it has slack:

    d       = bits per byte of the trained model - bits per byte of the backbone, on the same
              original-domain tokens (summed over ranks and micro batches, so every rank sees
              the same figure and holds the same lambda)
    d_hat   = running estimate of d: an EMA of the summed nats and bytes, then their ratio
    e       = (d_hat - AIM * EPS) / EPS                              the violation, in budgets
    I      <- max(0, I + dual_lr * e)                                once per optimizer step,
                                                                     unless d_hat is already returning
    lambda  = max(0, I + P_STEPS * dual_lr * e)

I is plain dual ascent. Alone, it lags: forgetting answers a change of lambda only over tens
of steps (the gates close and reopen slowly), so by the time the estimate is back under the
budget, I has overshot, and it swings. The proportional term (a PI controller on the multiplier,
Sohrabi et al., "On PI controllers for updating Lagrange multipliers", ICML 2024) acts on the
current violation at once and damps the swing; with P_STEPS = 0 it is dual ascent again.

I holds while the estimate is already moving back to the setpoint: above it and lower than
TREND_STEPS steps ago, or below it and higher (conditional integration, the textbook guard
against integral windup). Without it, the forgetting of the first steps (the learning rate warms
up while lambda is still small) went on feeding I for as long as the lagging estimate stayed
above the setpoint, although the lever was already repairing; the model then ended under the
setpoint (adapters) or, with the replay lever's shorter steps, repaired too slowly (finetune).

The setpoint is AIM * EPS, not EPS: the estimate is noisy (a step holds a few original-domain
rows), and a controller that aims at EPS ends above it about half of the time.

The violation is measured as a fraction of the budget, so one dual step size fits every EPS
and every scale of bits per byte: `dual_lr` is how much I moves in one step when the model
forgets AIM + 1 budgets.

What lambda weights depends on the method (`lever`):
  - "l1" (neutral_residues, sigmoid_gate): lambda is the l1 weight alpha, the lever that
    closes the gates on original-domain tokens;
  - "replay" (adapters, lora, finetune): lambda weights the LM loss of the step's
    original-domain tokens on top of the plain mixture loss,
        loss = CE(all tokens) + lambda * CE(original tokens),
    which is exactly the Lagrangian of "minimise the mixture loss s.t. CE(original) - ref <= EPS"
    (the constant terms -lambda * (ref + EPS) have no gradient); and the learning rate is divided
    by 1 + lambda. Adam normalises the gradient, so a loss weight turns the steps but does not
    shorten them, and at a learning rate meant to learn a domain the size of the steps is what
    forgets: on the quickstart, a replay weight of 60 left finetune's forgetting where it was, and
    adapters with a replay weight in the hundreds still forgot 6 budgets of held-out English in
    their first 50 steps (fitting the step's one or two English rows is no protection either).
    The weight says which way to go back; the shorter steps keep the model from straying.
    With lambda = 0 both levers give back the unconstrained method.

EPS is either absolute (bits per byte) or relative to the backbone's bits per byte on the
same tokens ("2%"), whose estimate is the reference part of the same EMA.
"""
from __future__ import annotations

import math
from typing import Optional

from ..config import MethodConfig

LN2 = math.log(2)

AIM = 0.8
"""The controller's setpoint, as a fraction of EPS (module docstring)."""

P_STEPS = 30.0
"""The proportional term's gain, in steps of the integral: a violation moves lambda at once by what
P_STEPS dual steps would. With the integral held while the estimate returns, the proportional term
carries the response to the first steps' forgetting: on the quickstart at 0.01, over 3 seeds, finetune
ended at 0.97-1.38 EPS with 20 and at 0.37-0.90 with 40; 30 gives 0.54-1.08."""

TREND_STEPS = 25
"""How far back the estimate is compared to tell whether it is returning to the setpoint: about its lag
(the held-out probe's smoothing spans the last 25 steps)."""

DEFAULT_DUAL_LR = {"l1": 0.1, "replay": 0.025}
"""Per-step change of I at a violation of one budget, per lever. The proportional term carries the fast
response (plain dual ascent needed 0.5 for the l1 weight, and swung with it). The replay lever acts twice,
through the loss weight and the step size, and the estimate lags the model by about 25 steps: with 0.1 its
integral wound up on the first steps' overshoot and went on repairing the original domain well past the
setpoint (the quickstart at 0.01, before the integral held while returning: adapters ended at 0.08 EPS,
finetune at -0.29; 0.05 gave 0.20 and 0.30; 0.025 gave 0.46 and 1.00)."""


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
        self.integral = 0.0
        """I, the dual-ascent part of the multiplier."""
        self.model_nats = self.ref_nats = self.nbytes = 0.0
        """EMAs of the summed NLL of the trained model and of the backbone, and of the bytes behind them."""
        self.measurements = 0
        """Measurements folded into the EMA."""
        self.updates = 0
        """Dual steps taken."""
        self.history: list[float] = []
        """d_hat at the last TREND_STEPS dual steps, oldest first."""
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
        """One step of the multiplier from the current estimate (none before the first measurement)."""
        d, eps = self.degradation, self.eps_bpb
        if d is None or eps is None or eps <= 0:
            return
        violation = (d - AIM * eps) / eps
        returning = len(self.history) == TREND_STEPS and (d - self.history[0]) * violation < 0
        self.history = (self.history + [d])[-TREND_STEPS:]
        if not returning:
            self.integral = max(0.0, self.integral + self.dual_lr * violation)
        self.multiplier = max(0.0, self.integral + P_STEPS * self.dual_lr * violation)
        self.updates += 1

    @property
    def l1_weight(self) -> Optional[float]:
        """alpha for the local loss (None: the method's own alpha)."""
        return self.multiplier if self.lever == "l1" else None

    @property
    def replay_weight(self) -> float:
        """Weight of the original tokens' LM loss added to the mixture loss (0 for the l1 lever)."""
        return self.multiplier if self.lever == "replay" else 0.0

    @property
    def lr_scale(self) -> float:
        """Factor on the scheduled learning rate (1 for the l1 lever)."""
        return 1 / (1 + self.multiplier) if self.lever == "replay" else 1.0

    # ------------------------------------------------------------------ logging and checkpoints

    def record(self) -> dict:
        """The metrics.jsonl / tensorboard fields of a step (`budget/...`)."""
        out = {"lambda": self.multiplier, "eps_bpb": self.eps_bpb, "degradation": self.degradation,
               "slack": self.slack, "degradation_last": self.last}
        return {k: v for k, v in out.items() if v is not None}

    _STATE = ("multiplier", "integral", "history", "model_nats", "ref_nats", "nbytes", "measurements", "updates", "last", "reference",
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
        self.integral = state.get("integral", self.multiplier)  # checkpoints of the pure dual ascent
        self.history = list(state.get("history", []))  # checkpoints of the plain PI controller

"""Typed run configuration: YAML file + dotted overrides -> dataclasses.

Every section is a dataclass with defaults, so the YAML only states what differs.
Unknown keys and wrong types are rejected with the dotted key and, when the key
came from a file, its file and line: a typo must never silently train the wrong
experiment for three days.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

METHODS = ("neutral_residues", "sigmoid_gate", "adapters", "lora", "finetune")
ADAPTER_METHODS = ("neutral_residues", "sigmoid_gate", "adapters")


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is meant to be printed as is."""


INF = float("inf")


def _check(section: str, obj, rules: list[tuple[str, bool, str]]) -> None:
    """Raise for the first (field, ok, rule) that is not ok, naming the key and its value.

    Rules are written as what must hold (`0 < x < INF`), so a nan (YAML .nan), which fails
    every comparison, is refused too."""
    for key, ok, rule in rules:
        if not ok:
            raise ConfigError(f"{section}.{key}: {getattr(obj, key)} {rule}")


@dataclass
class ModelConfig:
    path: Optional[str] = None
    """Local Hugging Face model directory (or hub name) loaded with `from_pretrained`."""
    config: Optional[dict] = None
    """An HF config as a dict (needs `model_type`): builds a randomly initialised model instead."""
    dtype: str = "auto"
    """auto / float32 / bfloat16 / float16. auto = bfloat16 on GPUs with native bf16 (Ampere and newer), else float32 (CPU, V100)."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint (needed for exports of adapter methods)."""

    def __post_init__(self):
        if (self.path is None) == (self.config is None):
            raise ConfigError("model: set exactly one of model.path (pretrained) or model.config (random init)")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype: {self.dtype!r} is not one of auto, float32, bfloat16, float16")


@dataclass
class MethodConfig:
    name: str = "neutral_residues"
    """neutral_residues / sigmoid_gate / adapters / lora / finetune."""
    extra_params: float = 0.20
    """Trainable parameters added, as a fraction of the backbone's (sets adapter width or LoRA rank)."""
    hidden_size: Optional[int] = None
    """Adapter hidden size; overrides the size derived from extra_params."""
    gate: Optional[str] = None
    """relu / sigmoid / none. Default follows the method (relu, sigmoid, none)."""
    init: Optional[str] = None
    """low_variance / he. Default: low_variance for gated methods, he for adapters."""
    alpha: float = 100.0
    """Weight of the l1 local loss on original-domain tokens (neutral_residues; sigmoid_gate if l1_with_sigmoid)."""
    bce_weight: float = 1.0
    """Weight of the per-token gate BCE (sigmoid_gate)."""
    l1_with_sigmoid: bool = False
    """sigmoid_gate only: add the l1 loss on top of the BCE."""
    lora_rank: Optional[int] = None
    """LoRA rank; overrides the rank derived from extra_params."""
    lora_alpha: Optional[float] = None
    """LoRA scaling numerator; default = rank (scaling 1)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch input."""
    forgetting_budget: Optional[float | str] = None
    """Allowed rise of the original domain's loss over the backbone's, in bits per byte (0.01) or relative to the backbone's (2%). Set, a multiplier found by dual ascent holds it: it is alpha for gated methods; for the others it weights the original tokens' LM loss and divides the learning rate by 1 + itself (README: Choosing a forgetting budget)."""
    dual_lr: Optional[float] = None
    """Dual step size of the forgetting budget: change of the multiplier's integral part per step at a violation of one budget; the proportional part moves 20 times that at once. Default: 0.1 for the l1 weight (neutral_residues, sigmoid_gate), 0.025 for the replay lever (adapters, lora, finetune)."""
    budget_measure: Optional[str] = None
    """Where the budget measures forgetting: heldout (a fixed probe of the original domain's val set) or train (the step's original-domain rows, against the adapters switched off; not finetune). Default: heldout if the original stream has a val set, else train."""

    def __post_init__(self):
        if self.name not in METHODS:
            raise ConfigError(f"method.name: {self.name!r} is not one of {', '.join(METHODS)}")
        default_gate = {"neutral_residues": "relu", "sigmoid_gate": "sigmoid", "adapters": "none"}
        default_init = {"neutral_residues": "low_variance", "sigmoid_gate": "low_variance", "adapters": "he"}
        if self.gate is None:
            self.gate = default_gate.get(self.name)
        if self.init is None:
            self.init = default_init.get(self.name)
        if self.name in ADAPTER_METHODS:
            if self.gate not in ("relu", "sigmoid", "none"):
                raise ConfigError(f"method.gate: {self.gate!r} is not one of relu, sigmoid, none")
            if self.init not in ("low_variance", "he"):
                raise ConfigError(f"method.init: {self.init!r} is not one of low_variance, he")
        if not 0 < self.extra_params <= 10:
            raise ConfigError(f"method.extra_params: {self.extra_params} must be in (0, 10]")
        if self.alpha < 0 or self.bce_weight < 0:
            raise ConfigError("method.alpha and method.bce_weight must be >= 0")
        if self.forgetting_budget is not None:
            self.budget  # validates the value
        if self.dual_lr is not None and self.dual_lr <= 0:
            raise ConfigError(f"method.dual_lr: {self.dual_lr} must be > 0")
        if self.budget_measure is not None and self.budget_measure not in ("train", "heldout"):
            raise ConfigError(f"method.budget_measure: {self.budget_measure!r} is not train or heldout")
        if self.budget_measure == "train" and self.name == "finetune":
            raise ConfigError("method.budget_measure: finetune trains the backbone itself, so it has no backbone "
                              "to compare its training rows with: use heldout")

    @property
    def budget(self) -> Optional[tuple[float, bool]]:
        """(EPS, relative) of forgetting_budget: (0.01, False) for 0.01 bits per byte, (0.02, True) for 2%."""
        raw = self.forgetting_budget
        if raw is None:
            return None
        text = str(raw).strip()
        relative = text.endswith("%")
        try:
            value = float(text[:-1] if relative else text)
        except ValueError:
            raise ConfigError(f"method.forgetting_budget: {raw!r} is not a number of bits per byte (0.01) "
                              "or a percentage of the backbone's (2%)") from None
        if not 0 < value < float("inf"):
            raise ConfigError(f"method.forgetting_budget: {raw} must be > 0 (a zero budget has no finite multiplier)")
        return (value / 100 if relative else value), relative

    @property
    def uses_l1(self) -> bool:
        # With a budget, the multiplier is sigmoid_gate's l1 weight too (trainer/method/budget.py).
        return self.name == "neutral_residues" or (self.name == "sigmoid_gate" and (
            self.l1_with_sigmoid or self.forgetting_budget is not None))

    @property
    def uses_bce(self) -> bool:
        return self.name == "sigmoid_gate"


@dataclass
class StreamConfig:
    domain: str = ""
    """Domain name, as written in the MDS `domain` column (e.g. en, fr, code)."""
    train: Optional[str] = None
    """MDS directory with this domain's training samples (local path or remote URI)."""
    val: Optional[str] = None
    """MDS directory with this domain's held-out samples."""
    role: str = "new"
    """original (must stay neutral, mixed in at proportion p) / new."""
    weight: float = 1.0
    """Relative weight among streams of the same role."""

    def __post_init__(self):
        if not self.domain:
            raise ConfigError("data.streams[].domain is required")
        if self.role not in ("original", "new"):
            raise ConfigError(f"data.streams[{self.domain}].role: {self.role!r} is not original or new")
        if not 0 <= self.weight < INF:
            raise ConfigError(f"data.streams[{self.domain}].weight: {self.weight} must be >= 0")


@dataclass
class DataConfig:
    streams: list[StreamConfig] = field(default_factory=list)
    p: float = 0.1
    """Fraction of training sequences drawn from original-role streams."""
    cache_dir: Optional[str] = None
    """Local cache for streaming shards. Default: $TMPDIR/<job>/streaming (job-local)."""
    num_canonical_nodes: int = 1
    """Fixed so the sample order is the same whatever the number of ranks (elastic resume)."""
    shuffle: bool = True
    """Shuffle samples (deterministically, from train.seed)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: load in the training process)."""

    def __post_init__(self):
        if not self.streams:
            raise ConfigError("data.streams: at least one stream is required")
        if not 0 <= self.p <= 1:
            raise ConfigError(f"data.p: {self.p} must be in [0, 1]")
        roles = {s.role for s in self.streams}
        if "new" not in roles and self.p < 1:
            raise ConfigError("data.streams: no stream has role: new, but data.p < 1")
        if self.p > 0 and "original" not in roles:
            raise ConfigError(f"data.p = {self.p} but no stream has role: original")
        # Samples are told apart by their `domain` column alone: two streams of one domain cannot be.
        seen: dict[str, int] = {}
        for i, s in enumerate(self.streams):
            if s.domain in seen:
                raise ConfigError(f"data.streams.{i}.domain: {s.domain!r} is already the domain of "
                                  f"data.streams.{seen[s.domain]} (one stream per domain)")
            seen[s.domain] = i
        _check("data", self, [("num_canonical_nodes", self.num_canonical_nodes >= 1, "must be >= 1"),
                              ("num_workers", self.num_workers >= 0, "must be >= 0")])


@dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps for the whole run (a resumed run continues up to it)."""
    global_batch_size: int = 8
    """Sequences per optimizer step, over all ranks."""
    micro_batch_size: int = 1
    """Sequences per rank per forward pass; grad accumulation is derived."""
    lr: Optional[float] = None
    """Default: 5e-5 for adapter methods and LoRA, 2e-4 for finetune (docs/method.md)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: str = "cosine"
    """cosine / constant (both after linear warmup)."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Cosine floor, as a fraction of lr."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (DeepSpeed gradient_clipping)."""
    activation_checkpointing: bool = False
    """Recompute layer activations in backward (non-reentrant; saves memory, costs ~1 forward)."""
    seed: int = 0
    """Seeds init, dropout and the data shuffle."""

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"train.schedule: {self.schedule!r} is not cosine or constant")
        for key in ("max_steps", "global_batch_size", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1")
        if len(self.betas) != 2:
            raise ConfigError("train.betas: must be two numbers")
        _check("train", self, [
            ("lr", self.lr is None or 0 < self.lr < INF, "must be > 0"),
            ("betas", all(0 <= b < 1 for b in self.betas), "must be in [0, 1)"),
            ("weight_decay", 0 <= self.weight_decay < INF, "must be >= 0"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("grad_clip", 0 <= self.grad_clip < INF, "must be >= 0 (0: no clipping)"),
            ("seed", 0 <= self.seed < 2**32, "must be in [0, 2**32)"),  # numpy's seed range
        ])


@dataclass
class DeepSpeedConfig:
    config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON; "auto" values are filled from this YAML. Relative paths resolve from the repo root."""


@dataclass
class CheckpointConfig:
    every: int = 100
    """Save every N optimizer steps (and always at the end and on SIGTERM/SIGUSR1)."""
    keep_last: int = 2
    """Checkpoints kept in run_dir/checkpoints (older ones are deleted after a new one is complete)."""
    resume: bool = True
    """Resume from the newest checkpoint in run_dir/checkpoints that verifies. false starts over; the existing
    checkpoints are then renamed `<tag>.superseded`, not deleted."""
    resume_from: Optional[str] = None
    """Resume from this tag (e.g. step_00000100) instead of the newest; newer ones are renamed `<tag>.superseded`."""
    allow_other_weights: bool = False
    """Resume even if the backbone's weights differ from the checkpoint's (same architecture, other weights fingerprint)."""


@dataclass
class LogConfig:
    every: int = 1
    """Write a metrics.jsonl line every N steps."""
    tensorboard: bool = True
    """Write tensorboard events to run_dir/tensorboard."""
    wandb: bool = False
    """Also log to Weights & Biases (if installed)."""
    progress: bool = True
    """Show a progress bar on rank 0 (turn off in batch jobs to keep logs small)."""
    frozen_checksum: bool = False
    """Log a hash of all frozen weights at start and end (proves the backbone is untouched; costs a full read)."""

    def __post_init__(self):
        _check("log", self, [("every", self.every >= 1, "must be >= 1")])


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    max_batches: Optional[int] = None
    """Cap on val batches per domain, counted as on one rank: max_batches x batch_size samples
    spread evenly over the val set, split over the ranks (None: the whole val set)."""
    batch_size: int = 4
    """Per-rank eval batch size."""
    at_start: bool = True
    """Evaluate before the first step of a fresh run (the backbone's own numbers, since adapters start at zero)."""

    def __post_init__(self):
        _check("eval", self, [("every", self.every >= 0, "must be >= 0"),
                              ("max_batches", self.max_batches is None or self.max_batches >= 1, "must be >= 1"),
                              ("batch_size", self.batch_size >= 1, "must be >= 1")])


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    model: Optional[ModelConfig] = None
    method: MethodConfig = field(default_factory=MethodConfig)
    data: Optional[DataConfig] = None
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        for section in ("model", "data"):
            if getattr(self, section) is None:
                raise ConfigError(f"{section}: required section is missing")
        if self.method.forgetting_budget is not None:
            self._check_budget()

    def _check_budget(self) -> None:
        """The budget is measured on original-domain tokens: training must see some."""
        original = [s for s in self.data.streams if s.role == "original" and s.train]
        if not original:
            raise ConfigError("method.forgetting_budget: no stream has role: original with a train set, "
                              "so there are no original-domain tokens to measure forgetting on")
        if self.data.p == 0:
            raise ConfigError("method.forgetting_budget: data.p = 0, so training sees no original-domain tokens "
                              "to measure forgetting on")
        if self.method.budget_measure is None:
            # Held out where there is a val set: it measures what the report checks, and the same way for
            # every method (the training rows can be text the backbone was trained on, and forget otherwise).
            held_out = any(s.val for s in original) or self.method.name == "finetune"
            self.method.budget_measure = "heldout" if held_out else "train"
        if self.method.budget_measure == "heldout" and not any(s.val for s in original):
            raise ConfigError(f"method.forgetting_budget: {self.method.name} measures forgetting on held-out data "
                              f"(method.budget_measure), but data.streams[{original[0].domain}].val is not set")

    @property
    def lr(self) -> float:
        if self.train.lr is not None:
            return self.train.lr
        return 2e-4 if self.method.name == "finetune" else 5e-5


# ----------------------------------------------------------------------------- loading


def _key_lines(text: str) -> dict[str, int]:
    """Map each dotted key of a YAML document to its 1-based line, for error messages."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[f"{prefix}{i}"] = v.start_mark.line + 1
                walk(v, f"{prefix}{i}.")

    root = yaml.compose(text)
    if root is not None:
        walk(root, "")
    return lines


def _where(key: str, source: Optional[str], lines: dict[str, int]) -> str:
    if key in lines and source:
        return f"{source}:{lines[key]}: "
    return f"{source}: " if source else ""


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check (and lightly coerce int->float) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) > 1 and type(value) in args:  # e.g. float | str: keep what the YAML gave
            return value
        return _convert(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `1e-4` (no dot) as a string; users write it that way all the time.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (valid keys: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw != "" else None))
    return out


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                data: Optional[dict] = None) -> RunConfig:
    """Load a RunConfig from a YAML file (or a dict) plus `key.sub=value` overrides."""
    source, lines, tree = None, {}, dict(data or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        text = path.read_text()
        try:
            lines = _key_lines(text)
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        source = str(path)
    overridden = []
    try:
        for key, value in parse_overrides(overrides or []):
            overridden.append(key)
            try:
                _set_dotted(tree, key, value)
            except (KeyError, IndexError, ValueError, TypeError):
                raise ConfigError(f"override {key}: no such entry") from None
        return _build(RunConfig, tree)
    except ConfigError as e:
        msg = str(e)
        key = msg.split(":", 1)[0]
        if key in overridden:
            raise ConfigError(f"override {msg}") from None
        raise ConfigError(_where(key, source, lines) + msg) from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- reference docs


def reference_markdown() -> str:
    """The README's config reference, generated from the dataclasses and their attribute docstrings."""
    import ast
    import inspect

    hints = {"model": ModelConfig, "method": MethodConfig, "data": DataConfig, "train": TrainConfig,
             "deepspeed": DeepSpeedConfig, "checkpoint": CheckpointConfig, "log": LogConfig, "eval": EvalConfig}
    rows = ["| key | default | meaning |", "|---|---|---|",
            "| `run_dir` | `runs/default` | where config.yaml, metrics.jsonl, tensorboard/ and checkpoints/ go |"]

    def docs(cls) -> dict[str, str]:
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        out = {}
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                out[a.target.id] = " ".join(b.value.value.split())
        return out

    def walk(prefix: str, cls) -> None:
        d = docs(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            if f.name == "streams":
                rows.append(f"| `{prefix}streams` | `[]` | list of streams, each with the keys below |")
                walk(f"{prefix}streams[].", StreamConfig)
                continue
            shown = "null" if default is None else json_like(default)
            rows.append(f"| `{prefix}{f.name}` | `{shown}` | {d.get(f.name, '')} |")

    for name, cls in hints.items():
        walk(f"{name}.", cls)
    return "\n".join(rows)


def json_like(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)

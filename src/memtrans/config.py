"""Configuration: nested dataclasses, loaded from YAML with dotted command-line overrides.

Every ablation axis is a field here; unknown keys and bad values fail with a ValueError that
names the field and what is allowed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

# auto: memtrans.device decides per machine; the device policy owns these names
from memtrans.device import DTYPE_NAMES, PRECISIONS

# The enumerated values of every config field, checked when a config is built (so a plan with a bad value fails
# before any run starts). The modules that act on them take them from here.
GATES = ("learned_scalar", "fixed", "weighted_sum", "concat", "token_gate", "joint_softmax")
BACKENDS = ("exact", "faiss_flat", "faiss_ivf")
DTYPES = DTYPE_NAMES
LAYER_WORDS = ("bottom", "middle", "near_top", "top", "multiple")
OPTIMIZERS = ("adamw", "adafactor")  # memtrans.train.optim
SCHEDULES = ("cosine", "rsqrt", "constant")
TOKENIZERS = ("byte", "bpe")  # memtrans.data.tokenizer
RECALL_LAYOUTS = ("text", "fused")  # memtrans.data.recall
BUILTIN_CORPORA = ("recall", "stdlib-code", "shakespeare")  # installed with the project (memtrans.data.corpus)
FETCHED_CORPORA = ("austen", "metamath", "code", "tex")  # downloaded once by `memtrans fetch`
CORPORA = BUILTIN_CORPORA + FETCHED_CORPORA
CORPUS_PREFIXES = ("textdir", "dirdocs", "jsonl", "parquet")  # "<prefix>:PATH"
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "meta")
SPLITS = ("train", "val", "test")


def memory_layer_indices(word: str, depth: int) -> tuple[int, ...]:
    """Map the plan's layer-position words to 0-based layer indices for a model of `depth` layers.

    For depth 12 these are the paper's positions (1-based layers 3, 6, 9, 12):
    bottom=2, middle=5, near_top=8 (the paper's default, meliad's index -4), top=11,
    multiple=(5, 8) (the baseline layer plus the middle one).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    bottom = max(0, depth // 4 - 1)
    middle = max(0, depth // 2 - 1)
    near_top = max(0, depth - 1 - depth // 4)
    top = depth - 1
    table = {
        "bottom": (bottom,),
        "middle": (middle,),
        "near_top": (near_top,),
        "top": (top,),
        "multiple": tuple(sorted({middle, near_top})),
    }
    if word not in table:
        raise ValueError(f"memory_layers: unknown word {word!r}; allowed: {', '.join(LAYER_WORDS)} or a list of layer indices")
    return table[word]


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


@dataclass
class ModelConfig:
    vocab_size: int = 256
    dim: int = 256
    depth: int = 6
    heads: int = 8
    head_dim: int = 32
    ffn_dim: int | None = None  # default 4 * dim (ReLU FFN, as in the paper)
    segment_len: int = 512
    # 0-based layer indices, or one of LAYER_WORDS resolved against depth; () = no memory.
    memory_layers: Any = "near_top"
    memory_size: int = 65536  # FIFO entries per (document slot, head)
    knn_k: int = 32
    gate: str = "learned_scalar"
    fixed_gate: float = 0.5  # g for gate="fixed"
    qk_norm: bool = True
    xl_cache: bool = True
    memory_backend: str = "exact"
    memory_dtype: str = "auto"  # dtype of stored keys/values (auto: bf16 where native, else fp32; memtrans.device)
    score_dtype: str = "auto"  # dtype of the exact engine's retrieval scores (auto: memtrans.device)
    rel_pos_buckets: int = 32
    rel_pos_max_distance: int = 128
    ivf_nlist: int = 64  # faiss_ivf: inverted lists per (slot, head)
    ivf_nprobe: int = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.memory_layers, str):
            self.memory_layers = memory_layer_indices(self.memory_layers, self.depth)
        elif isinstance(self.memory_layers, int):
            self.memory_layers = (self.memory_layers,)
        else:
            self.memory_layers = tuple(sorted(set(int(i) for i in self.memory_layers)))
        self.validate()

    @property
    def has_memory(self) -> bool:
        return len(self.memory_layers) > 0

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "depth", "heads", "head_dim", "segment_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.heads * self.head_dim != self.dim:
            raise ValueError(
                f"heads * head_dim must equal dim: {self.heads} * {self.head_dim} != {self.dim}; "
                f"set head_dim={self.dim // self.heads} or change dim/heads")
        _check_choice("gate", self.gate, GATES)
        _check_choice("memory_backend", self.memory_backend, BACKENDS)
        _check_choice("memory_dtype", self.memory_dtype, DTYPES)
        _check_choice("score_dtype", self.score_dtype, DTYPES)
        for i in self.memory_layers:
            if not 0 <= i < self.depth:
                raise ValueError(f"memory_layers: index {i} is out of range for depth {self.depth}; "
                                 f"allowed 0..{self.depth - 1} or one of {', '.join(LAYER_WORDS)}")
        if self.memory_size < 1:
            raise ValueError(f"memory_size must be positive, got {self.memory_size}")
        if self.knn_k < 1:
            raise ValueError(f"knn_k must be positive, got {self.knn_k}")
        if self.has_memory and self.knn_k > self.memory_size:
            raise ValueError(f"knn_k ({self.knn_k}) must not exceed memory_size ({self.memory_size})")
        if not 0.0 <= self.fixed_gate <= 1.0:
            raise ValueError(f"fixed_gate must lie in [0, 1], got {self.fixed_gate}")
        if self.ivf_nlist < 1 or self.ivf_nprobe < 1:
            raise ValueError("ivf_nlist and ivf_nprobe must be positive")


@dataclass
class DataConfig:
    # builtin name (recall, stdlib-code, shakespeare, austen, metamath, ...) or "textdir:PATH",
    # "jsonl:PATH", "parquet:PATH"
    corpus: str = "recall"
    text_field: str = "text"
    tokenizer: str = "byte"  # byte | bpe
    bpe_vocab_size: int = 8192
    batch_size: int = 4  # document slots
    max_doc_tokens: int | None = None  # split documents longer than this into several (None = whole)
    min_doc_tokens: int = 0  # documents shorter than this are skipped (and counted)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    cache_dir: str | None = None  # default: ~/.cache/memtrans
    # recall: synthetic long-range key->value recall (see memtrans.data.recall)
    recall_docs: int = 64
    recall_doc_len: int = 8192
    recall_pairs: int = 16
    recall_key_len: int = 4
    recall_value_len: int = 4
    recall_min_distance: int = 2048
    recall_seed: int = 0  # the recall documents depend on this (not on the training seed)
    recall_layout: str = "text"  # text: "key K = V ." ... "K ? V ."; fused: one token per binding (memtrans.data.recall)

    def __post_init__(self) -> None:
        c = self.corpus
        prefix, _, path = c.partition(":") if isinstance(c, str) else ("", "", "")
        if not isinstance(c, str) or not (c in CORPORA or (prefix in CORPUS_PREFIXES and path)):
            raise ValueError(f"corpus: {c!r} is not allowed (unknown corpus); choose one of {', '.join(CORPORA)} or "
                             f"{', '.join(p + ':PATH' for p in CORPUS_PREFIXES)}")
        _check_choice("tokenizer", self.tokenizer, TOKENIZERS)
        _check_choice("recall_layout", self.recall_layout, RECALL_LAYOUTS)


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | adafactor
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | rsqrt | constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # lr multiplier for the memory gates' parameters: under Adam a parameter moves at most about the summed lr
    # (0.08 over the `small` preset's 150-step fine-tune), so a fresh gate bias cannot leave g = 0.5 +- 0.02
    gate_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        if not (isinstance(self.gate_lr_scale, (int, float)) and self.gate_lr_scale > 0):
            raise ValueError(f"optim.gate_lr_scale: must be a positive number (1 = the model's lr), got {self.gate_lr_scale!r}")


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | bf16 (autocast) | fp16 (autocast + grad scaler, GPUs) | fp32; see memtrans.device
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    compile: bool = False
    log_every: int = 10
    checkpoint_every: int = 200
    tensorboard: bool = False
    init_from: str | None = None  # checkpoint or run dir to start from (fine-tuning recipe)
    budget_minutes: float | None = None
    budget_tokens: int | None = None
    # stability: a spike is a value above spike_factor x the running median of the last spike_window
    spike_window: int = 50
    spike_factor: float = 2.0
    divergence_factor: float = 4.0  # loss > factor x initial loss (after warm-up) counts as divergence
    # weight in the training loss of tokens scored by a recall corpus (batch.tags >= 0); 1.0 = plain LM loss
    tagged_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("precision", self.precision, PRECISIONS)
        if self.device not in ("auto", "cpu", "cuda", "meta") and not (
                isinstance(self.device, str) and self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise ValueError(f"device: {self.device!r} is not allowed; choose one of {', '.join(DEVICES)}")


@dataclass
class EvalConfig:
    split: str = "test"
    max_docs: int | None = None
    max_tokens_per_doc: int | None = None
    position_buckets: tuple[int, ...] = (2048, 8192, 32768, 131072)
    batch_size: int = 4

    def __post_init__(self) -> None:
        _check_choice("split", self.split, SPLITS)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size}")
        for name in ("max_docs", "max_tokens_per_doc"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer or null (no limit), got {getattr(self, name)}")
        edges = list(self.position_buckets)
        if not all(isinstance(e, int) and not isinstance(e, bool) and e > 0 for e in edges) or any(
                b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"position_buckets: expected increasing positive integers, got {edges}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return to_plain(dataclasses.asdict(self))

    def hash(self) -> str:
        """Content hash of the resolved config (12 hex digits); names run directories.

        Fields added after results were published (HASH_NEW_FIELDS) are left out while they hold their
        default, so adding a field does not rename, and so re-run, every finished run."""
        d = self.to_dict()
        for dotted, default in HASH_NEW_FIELDS.items():
            section, key = dotted.split(".")
            if d[section].get(key) == default:
                del d[section][key]
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# field -> its default; see Config.hash. Append here when adding a field to any config section.
HASH_NEW_FIELDS = {"data.recall_layout": "text", "optim.gate_lr_scale": 1.0}


def to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def _coerce(path: str, value: Any, f: dataclasses.Field, current: Any) -> Any:
    """Coerce a YAML/CLI value to the field's type, using the field's default as the type guide."""
    typ = str(f.type)
    if value is None:
        if "None" in typ or f.name in ("memory_layers",):
            return None
        raise ValueError(f"{path}: null is not allowed")
    if isinstance(current, bool) or typ == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{path}: expected true/false, got {value!r}")
    if typ.startswith("tuple") or isinstance(current, tuple):
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ValueError(f"{path}: expected a list, got {value!r}")
    if typ.startswith("int") or isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if typ.startswith("float") or isinstance(current, float):
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: expected a number, got {value!r}")
        return float(value)
    return value


def build(cls: type, data: dict | None, path: str = "") -> Any:
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys."""
    data = dict(data or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = path or "config"
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
    kwargs = {}
    defaults = cls()
    for name, value in data.items():
        f = known[name]
        sub = f"{path}.{name}" if path else name
        current = getattr(defaults, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{sub}: expected a mapping, got {value!r}")
            kwargs[name] = build(type(current), value, sub)
        elif name == "memory_layers":
            kwargs[name] = value if value is not None else ()
        else:
            kwargs[name] = _coerce(sub, value, f, current)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{path + ': ' if path else ''}{e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.gate=fixed' -> (['model', 'gate'], 'fixed'); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value, e.g. model.gate=fixed")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict, overrides: list[str] | dict) -> dict:
    """Apply dotted overrides to a nested dict (returns a new dict)."""
    out = json.loads(json.dumps(data))
    items = overrides.items() if isinstance(overrides, dict) else [
        (".".join(k), v) for k, v in map(parse_override, overrides)]
    for dotted, value in items:
        keys = dotted.split(".")
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {dotted}: {k} is not a section")
        node[keys[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Load a Config from YAML (or defaults when path is None) and apply dotted overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {p}: top level must be a mapping of sections")
    if overrides:
        data = apply_overrides(data, overrides)
    return build(Config, data)


def config_from_dict(data: dict) -> Config:
    return build(Config, data)


def save_config(cfg: Config, path: str | Path) -> None:
    from memtrans.utils import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

"""Config: bad values fail with a ValueError naming the field and the allowed values; YAML + overrides."""
import pytest
import yaml

from memtrans.config import Config, ModelConfig, config_from_dict, load_config, memory_layer_indices


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(gate="sigmoid"), r"gate: 'sigmoid' is not allowed; choose one of learned_scalar, fixed"),
    (dict(memory_backend="annoy"), r"memory_backend: 'annoy' is not allowed; choose one of exact, faiss_flat"),
    (dict(memory_layers=(9,)), r"memory_layers: index 9 is out of range for depth 6"),
    (dict(memory_layers="penthouse"), r"memory_layers: unknown word 'penthouse'; allowed: bottom"),
    (dict(heads=8, head_dim=16), r"heads \* head_dim must equal dim: 8 \* 16 != 256"),
    (dict(memory_size=0), r"memory_size must be positive"),
    (dict(memory_size=16, knn_k=32), r"knn_k \(32\) must not exceed memory_size \(16\)"),
    (dict(memory_dtype="int8"), r"memory_dtype: 'int8' is not allowed"),
    (dict(fixed_gate=1.5), r"fixed_gate must lie in \[0, 1\]"),
])
def test_bad_model_config_names_field(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ModelConfig(**kwargs)


def test_no_memory_model_ignores_k_vs_size():
    assert ModelConfig(memory_layers=(), memory_size=8, knn_k=32).has_memory is False


@pytest.mark.parametrize("depth, expected", [
    (12, {"bottom": (2,), "middle": (5,), "near_top": (8,), "top": (11,), "multiple": (5, 8)}),
    (6, {"bottom": (0,), "middle": (2,), "near_top": (4,), "top": (5,), "multiple": (2, 4)}),
    (1, {"bottom": (0,), "middle": (0,), "near_top": (0,), "top": (0,), "multiple": (0,)}),
])
def test_layer_words(depth, expected):
    assert {w: memory_layer_indices(w, depth) for w in expected} == expected


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"gate": "fixed", "depth": 12, "dim": 256}, "train": {"steps": 5}}))
    cfg = load_config(path, ["model.memory_layers=top", "optim.lr=3e-4", "train.precision=fp32"])
    assert cfg.model.gate == "fixed" and cfg.model.memory_layers == (11,)
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 5 and cfg.train.precision == "fp32"
    again = load_config(path, ["model.memory_layers=[11]", "optim.lr=0.0003", "train.precision=fp32"])
    assert again.hash() == cfg.hash()  # words and indices resolve to the same run
    assert load_config(path, ["model.memory_size=1024"]).hash() != cfg.hash()


@pytest.mark.parametrize("overrides, pattern", [
    (["model.gatee=fixed"], r"model: unknown key\(s\) gatee; allowed: vocab_size"),
    (["trian.steps=3"], r"config: unknown key\(s\) trian"),
    (["train.steps=many"], r"train.steps: expected an integer"),
    (["model.qk_norm=maybe"], r"model.qk_norm: expected true/false"),
    (["model.gate=nope"], r"model: gate: 'nope' is not allowed"),
    (["steps"], r"must look like section.key=value"),
])
def test_bad_overrides(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(None, overrides)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)


def test_round_trip_through_dict():
    from memtrans.config import config_from_dict
    cfg = load_config(None, ["model.memory_layers=multiple", "model.gate=concat"])
    assert config_from_dict(cfg.to_dict()) == cfg
    assert isinstance(Config().hash(), str) and len(Config().hash()) == 12


# Every config field that existed when the first results were published (2026-11-28). A field added since
# must go into HASH_NEW_FIELDS, or every finished run would get a new hash and be re-run.
FIELDS_OF_PUBLISHED_RESULTS = [
    'data.batch_size', 'data.bpe_vocab_size', 'data.cache_dir', 'data.corpus', 'data.max_doc_tokens',
    'data.min_doc_tokens', 'data.recall_doc_len', 'data.recall_docs', 'data.recall_key_len',
    'data.recall_min_distance', 'data.recall_pairs', 'data.recall_seed', 'data.recall_value_len',
    'data.test_fraction', 'data.text_field', 'data.tokenizer', 'data.val_fraction', 'eval.batch_size',
    'eval.max_docs', 'eval.max_tokens_per_doc', 'eval.position_buckets', 'eval.split', 'model.depth',
    'model.dim', 'model.dropout', 'model.ffn_dim', 'model.fixed_gate', 'model.gate', 'model.head_dim',
    'model.heads', 'model.ivf_nlist', 'model.ivf_nprobe', 'model.knn_k', 'model.memory_backend',
    'model.memory_dtype', 'model.memory_layers', 'model.memory_size', 'model.qk_norm',
    'model.rel_pos_buckets', 'model.rel_pos_max_distance', 'model.score_dtype', 'model.segment_len',
    'model.vocab_size', 'model.xl_cache', 'optim.betas', 'optim.grad_clip', 'optim.lr',
    'optim.min_lr_ratio', 'optim.optimizer', 'optim.schedule', 'optim.warmup_steps', 'optim.weight_decay',
    'train.budget_minutes', 'train.budget_tokens', 'train.checkpoint_every', 'train.compile',
    'train.device', 'train.divergence_factor', 'train.init_from', 'train.log_every', 'train.precision',
    'train.seed', 'train.spike_factor', 'train.spike_window', 'train.steps', 'train.tagged_loss_weight',
    'train.tensorboard', 'train.threads',
]


def test_new_fields_at_default_keep_run_hashes(monkeypatch):
    from memtrans.config import HASH_NEW_FIELDS
    from memtrans.device import resolve_config
    # published runs were bf16 (the old defaults); `auto` resolved where bf16 is native names the same runs
    monkeypatch.setenv("MEMTRANS_BF16", "1")
    cfg = resolve_config(Config(), "cpu")
    fields = {f"{s}.{k}" for s, v in cfg.to_dict().items() for k in v}
    added = fields - set(FIELDS_OF_PUBLISHED_RESULTS)
    assert added <= set(HASH_NEW_FIELDS), f"new config fields {sorted(added - set(HASH_NEW_FIELDS))}: add them to HASH_NEW_FIELDS"
    assert cfg.hash() == "6d1ed7772c47"  # the default config's hash before recall_layout existed
    fused = resolve_config(config_from_dict({"data": {"recall_layout": "fused"}}), "cpu")
    assert fused.hash() != cfg.hash()  # a new field that is set still changes the hash


# Every enumerated field: a bad value fails when the config is built, naming the path and every allowed value.
ENUMERATED = [
    ("model.gate", "sigmoid", "learned_scalar, fixed, weighted_sum, concat, token_gate, joint_softmax"),
    ("model.memory_backend", "annoy", "exact, faiss_flat, faiss_ivf"),
    ("model.memory_dtype", "int8", "auto, float32, bfloat16, float16"),
    ("model.score_dtype", "fp8", "auto, float32, bfloat16, float16"),
    ("model.memory_layers", "penthouse", "bottom, middle, near_top, top, multiple"),
    ("data.corpus", "wikipedia", "recall, stdlib-code, shakespeare, austen, metamath, code, tex or textdir:PATH"),
    ("data.corpus", "ftp:/data", "jsonl:PATH, parquet:PATH"),
    ("data.tokenizer", "sentencepiece", "byte, bpe"),
    ("data.recall_layout", "scattered", "text, fused"),
    ("optim.optimizer", "sgd", "adamw, adafactor"),
    ("optim.schedule", "linear", "cosine, rsqrt, constant"),
    ("train.precision", "fp99", "auto, bf16, fp16, fp32"),
    ("train.device", "tpu", "auto, cpu, cuda, cuda:N, meta"),
    ("eval.split", "dev", "train, val, test"),
]


@pytest.mark.parametrize("dotted, bad, allowed", ENUMERATED, ids=[f"{e[0]}={e[1]}" for e in ENUMERATED])
def test_every_enumerated_value_is_checked_when_built(dotted, bad, allowed):
    section, key = dotted.split(".")
    with pytest.raises(ValueError) as e:
        load_config(None, [f"{dotted}={bad}"])
    msg = str(e.value)
    assert msg.startswith(f"{section}: {key}: {bad!r} is not allowed" if key != "memory_layers"
                          else f"{section}: {key}: unknown word"), msg
    assert allowed in msg, msg


def test_eval_position_buckets_are_checked():
    with pytest.raises(ValueError, match=r"eval: position_buckets: expected increasing positive integers"):
        load_config(None, ["eval.position_buckets=[256, 128]"])


def test_config_choices_are_the_ones_the_code_acts_on():
    """The config layer's lists are the ones the consumers use (they may import them from memtrans.config)."""
    from memtrans import config, device
    from memtrans.data import corpus, recall
    from memtrans.train import optim

    assert config.PRECISIONS is device.PRECISIONS and config.DTYPES is device.DTYPE_NAMES
    assert config.OPTIMIZERS == optim.OPTIMIZERS and config.SCHEDULES == optim.SCHEDULES
    assert config.CORPORA == corpus.BUILTIN + corpus.FETCHED and config.CORPUS_PREFIXES is corpus.PREFIXES
    assert config.SPLITS is corpus.SPLITS and recall.LAYOUTS == config.RECALL_LAYOUTS


@pytest.mark.parametrize("override,field", [("eval.batch_size=0", "batch_size"), ("eval.max_docs=0", "max_docs"),
                                            ("eval.max_tokens_per_doc=-1", "max_tokens_per_doc")])
def test_eval_sizes_must_be_positive(override, field):
    with pytest.raises(ValueError, match=f"eval: {field} must be a positive integer"):
        load_config(None, [override])

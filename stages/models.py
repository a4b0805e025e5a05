"""Tokenizers and models: load from the hub / a directory, or build a tiny random-init model and train its
byte-level BPE tokenizer on the training texts (offline runs)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from stages.checkpoint import sync_tree
from stages.config import ModelConfig, could_be_hub_id
from stages.distributed import DistInfo, barrier, seed_everything
from stages.engine import model_dtype
from stages.errors import CheckpointError, ConfigError
from stages.model_paths import resolve_model_dir

PAD, EOS = "<|pad|>", "<|endoftext|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

#: Used when a tokenizer has no chat template. Each turn: `<|role|>` newline content EOS; the generation
#: prompt is `<|assistant|>` newline. Example: [user "hi", assistant "yo"] ->
#: "<|user|>\nhi<|endoftext|><|assistant|>\nyo<|endoftext|>"
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>{{ '\\n' }}{{ message['content'] }}{{ eos_token }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{{ '\\n' }}{%- endif -%}"
)

# HfDeepSpeedConfig objects must stay alive while ZeRO-3 models are built (transformers keeps a weak ref).
_LIVE_DS_CONFIGS: list[Any] = []


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Any:
    """A byte-level BPE tokenizer trained on `texts` (deterministic for the same texts in the same order).

    Special tokens: pad `<|pad|>`, eos `<|endoftext|>` and the role markers of DEFAULT_CHAT_TEMPLATE.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, additional_special_tokens=list(ROLE_TOKENS)
    )
    hf.chat_template = DEFAULT_CHAT_TEMPLATE
    return hf


def attention_error(cfg: ModelConfig, exc: Exception) -> ConfigError:
    """A model build that failed on its attention implementation (flash-attn not installed, not supported by
    the architecture): a config error naming the setting."""
    return ConfigError(f"attn_implementation {cfg.attn_implementation!r} cannot be used here (set the model's "
                       f"attn_implementation to sdpa or eager): {type(exc).__name__}: {exc}")


def not_local_hint(source: str) -> str:
    """What to add to a failed load of `source` that is no local path: it was taken for a hub id ("" when the
    path exists).

    >>> not_local_hint("runs/nowhere").startswith(" (no folder runs/nowhere here: it was tried as a Hugging Face")
    True
    """
    if Path(source).expanduser().exists():
        return ""
    offline = " with HF_HUB_OFFLINE=1" if hub_offline() else ""
    return f" (no folder {source} here: it was tried as a Hugging Face hub id{offline})"


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set (as huggingface_hub reads it: 1 / on / yes / true): nothing is downloaded."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def uncached_hub_model(name_or_path: str, key: str) -> str | None:
    """Offline (`hub_offline`), a model that is no local folder must be in the hub cache: what to say of one that
    is not (`key` named), before any launch, rather than every rank failing to load it (a path typo such as
    `outputs/sft` reads as a hub id); None when it is there, when it is no hub id, or online (the hub answers
    when the model loads)."""
    if not hub_offline() or Path(name_or_path).expanduser().exists() or not could_be_hub_id(name_or_path):
        return None  # (a path that is no hub id: resolve_model_dir's error)
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
            return None
    except ValueError:  # huggingface_hub's HFValidationError: a name it takes for no repo id (`a--b`, `x/y.`)
        pass
    return (f"{key} {name_or_path}: no such local folder, and no hub model of that name in the local cache "
            "(HF_HUB_OFFLINE=1: nothing is downloaded); check the path, or download the model first")


def uncached_stage_models(stage: str, cfg: Any) -> list[str]:
    """`uncached_hub_model` of each model `stage` loads."""
    found = [uncached_hub_model(path, f"{section}.name_or_path") for section, _, _, path in loaded_models(stage, cfg)]
    return [text for text in found if text]


def loaded_models(stage: str, cfg: Any) -> list[tuple[str, str, bool, str]]:
    """(config section, head, trained head, name_or_path) of each model `stage` loads from a path or hub id
    (`STAGE_MODEL_KINDS`; a `from_config` model is built, not loaded)."""
    return [(section, head, trained, model.name_or_path) for section, head, trained in STAGE_MODEL_KINDS.get(stage, [])
            if (model := getattr(cfg, section)).from_config is None and model.name_or_path]


#: tokenizer classes that mean "exactly the tokenizer.json beside me" (what train_tokenizer saves)
PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def names_plain_tokenizer(source: str | Path) -> bool:
    """Whether the folder holds a tokenizer.json and a tokenizer_config.json naming a plain tokenizers backend
    (`PLAIN_TOKENIZER_CLASSES`): a tokenizer that is exactly its tokenizer.json."""
    config = Path(source) / "tokenizer_config.json"
    if not (config.is_file() and (Path(source) / "tokenizer.json").is_file()):
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class") in PLAIN_TOKENIZER_CLASSES
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def load_tokenizer(source: str, trust_remote_code: bool = False) -> Any:
    """AutoTokenizer.from_pretrained, except that a directory whose tokenizer_config.json names a plain
    tokenizers backend is loaded as exactly that: transformers 5 otherwise substitutes the model type's own
    class when config.json is beside it (a qwen2 model's trained BPE or word-level tokenizer would be rebuilt as
    Qwen2Tokenizer with Qwen's pre-tokenizer, and encode text to nothing or to other ids)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if names_plain_tokenizer(source):
        return PreTrainedTokenizerFast.from_pretrained(source)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


#: texts whose token ids tell whether two tokenizers split text alike: digits, spaces, punctuation, accents, tabs,
#: newlines, an emoji
PROBE_TEXTS = ("The year 1917: 3 apples, 42 pears!", "  indented\n\ttabbed caf\u00e9, na\u00efve \U0001F600",
               "x = y+1; print(f'{x}')")


def auto_tokenizer_difference(folder: str | Path) -> str | None:
    """How `AutoTokenizer.from_pretrained(folder)` — what plain transformers and most tools call — encodes text
    otherwise than the tokenizer rlhf loads from the folder (`load_tokenizer`), or None when they agree. They
    can differ only when the folder names a plain tokenizer beside a config.json whose model type transformers 5
    gives a tokenizer class of its own (qwen2, phi3, ...: rebuilt from the vocabulary and merges with that
    model family's pre-tokenizer). None too when AutoTokenizer fails to load the folder at all."""
    from transformers import AutoTokenizer

    if not (names_plain_tokenizer(folder) and (Path(folder) / "config.json").is_file()):
        return None
    ours = load_tokenizer(str(folder))
    try:
        auto = AutoTokenizer.from_pretrained(str(folder))
    except Exception:  # noqa: BLE001 - e.g. a remote-code model type without trust_remote_code: not ours to judge
        return None
    for text in PROBE_TEXTS:
        mine, theirs = (tok(text, add_special_tokens=False)["input_ids"] for tok in (ours, auto))
        if mine != theirs:
            at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            return (f"AutoTokenizer.from_pretrained loads it as {type(auto).__name__}, which encodes {text!r} "
                    f"into {len(theirs)} tokens, not the {len(mine)} of the tokenizer rlhf trained with (the first "
                    f"difference at token {at}: {theirs[at:at + 3]} against {mine[at:at + 3]})")
    return None


def prepare_tokenizer(
    cfg: ModelConfig, out_dir: Path, dist: DistInfo, texts: Callable[[], Iterable[str]], chat_template: str | None,
    save: bool = True,
) -> Any:
    """Load the tokenizer, or (from_config without `tokenizer`) train one once on rank 0 and save it in
    `out_dir/tokenizer` so that every rank, and a resumed run, uses the same one. With `save=False` (one
    process, `--check-data`) nothing is read from or written to `out_dir`: the tokenizer is trained in memory, as a
    fresh run would train it (a resumed run's saved one is the same: same texts, and --resume refuses changed data).

    A tokenizer without a pad token gets pad = eos; one without a chat template gets DEFAULT_CHAT_TEMPLATE
    (or `chat_template` when given, which always wins)."""
    if cfg.from_config is not None and cfg.tokenizer is None:
        path = out_dir / "tokenizer"
        if not save:
            trained = train_tokenizer(texts(), cfg.tokenizer_train.vocab_size, cfg.tokenizer_train.min_frequency)
            return _finish_tokenizer(trained, "the tokenizer trained on the data", chat_template)
        if dist.is_main and not (path / "tokenizer.json").exists():
            tmp = out_dir / ".tmp-tokenizer"
            shutil.rmtree(tmp, ignore_errors=True)
            tok = train_tokenizer(texts(), cfg.tokenizer_train.vocab_size, cfg.tokenizer_train.min_frequency)
            tok.save_pretrained(str(tmp))
            sync_tree(tmp)  # on disk before the rename: a crash cannot leave a tokenizer/ with missing data
            os.replace(tmp, path)
            sync_tree(out_dir, only=())
        barrier()
        source = str(path)
    else:
        source = resolve_model_dir(cfg.tokenizer or cfg.name_or_path or "")
    try:
        tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - a user's file: OSError, ValueError, tokenizers' own errors, ...
        raise CheckpointError(f"cannot load tokenizer from {source}{not_local_hint(source)}: "
                              f"{type(exc).__name__}: {exc}") from None
    return _finish_tokenizer(tokenizer, source, chat_template)


def _finish_tokenizer(tokenizer: Any, source: str, chat_template: str | None) -> Any:
    """`prepare_tokenizer`'s defaults: an EOS is required, pad = EOS when missing, the chat template set."""
    if tokenizer.eos_token is None:
        raise CheckpointError(f"tokenizer {source} has no EOS token; set one in its tokenizer_config.json")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        tokenizer.rlhf_defaulted_template = source  # (said by `default_template_caution` if rows render with it)
    return tokenizer


def default_template_caution(tokenizer: Any, styles: Iterable[str]) -> str | None:
    """A warning when rows were rendered through the chat template (`styles` holds "chat") of a tokenizer that
    had none, so that DEFAULT_CHAT_TEMPLATE rendered them (and is saved with the model); None otherwise."""
    from stages.rendering import CHAT

    source = getattr(tokenizer, "rlhf_defaulted_template", None)
    if source is None or CHAT not in set(styles):
        return None
    return (f"tokenizer {source} has no chat template: rows were rendered with the built-in default "
            "(<|user|>, <|assistant|>, ...; saved with the model); set data.chat_template to the template the "
            "model was trained with, if it has one")


def ensure_distinct_pad(tokenizer: Any) -> bool:
    """Give a tokenizer whose pad token is its EOS a pad token of its own (`<|pad|>`), so that padding can never
    be mistaken for the EOS a reward model reads (transformers' sequence-classification heads find the last
    token by looking for the last non-pad id). True when this grew the vocabulary."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    before = len(tokenizer)
    tokenizer.add_special_tokens({"pad_token": PAD})
    return len(tokenizer) > before


def build_model(
    cfg: ModelConfig,
    tokenizer: Any,
    precision: str,
    ds_config: dict[str, Any],
    seed: int,
    head: str = "causal_lm",
    resize: bool = False,
    trained_head: bool = False,
) -> torch.nn.Module:
    """The trainable model, in the load dtype, with pad/eos ids taken from the tokenizer.

    head: "causal_lm" (AutoModelForCausalLM) or "reward" (AutoModelForSequenceClassification with num_labels=1:
    the backbone plus a bias-free linear `score` head; loading a causal-LM checkpoint initialises the head).
    from_config: random init seeded with `seed` (same weights on every rank), vocab = len(tokenizer).
    resize: grow the embedding when the tokenizer has more tokens (a pad token added by ensure_distinct_pad);
    otherwise that is an error. trained_head: the checkpoint must already be a one-label sequence classifier
    (a reward model), not a causal LM whose score head would be initialised at random. With ZeRO-3 loaded weights
    are created partitioned (transformers' DeepSpeed integration); a from_config model is built whole on every rank
    and partitioned by DeepSpeed at its engine's start, so that a seed gives the same init at every ZeRO stage. A
    checkpoint that does not load (missing or truncated files) or is of the wrong kind is a CheckpointError
    naming it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto_cls = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    head_args: dict[str, Any] = {} if head == "causal_lm" else {"num_labels": 1}
    dtype = model_dtype(cfg.dtype, precision)
    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        _LIVE_DS_CONFIGS.append(HfDeepSpeedConfig(ds_config))
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    seed_everything(seed)
    # a model whose own config is not ZeRO-3 is built whole even while another model's ZeRO-3 set-up is alive;
    # so is a from_config one (DeepSpeed partitions it at its engine's start): built partitioned, its random init
    # would differ from the other stages' for the same seed
    with contextlib.nullcontext() if zero3 and cfg.from_config is None else zero3_init_off():
        if cfg.from_config is not None:
            arch = {**cfg.from_config, "vocab_size": len(tokenizer), **ids, **head_args}
            model_type = arch.pop("model_type")
            try:
                config = AutoConfig.for_model(model_type, **arch)
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"model.from_config: {exc}") from None
            try:
                model = auto_cls.from_config(config, dtype=dtype, attn_implementation=cfg.attn_implementation)
            except (ValueError, ImportError) as exc:  # the attention implementation is the only user input left
                raise attention_error(cfg, exc) from None
        else:
            source = resolve_model_dir(cfg.name_or_path or "")
            # a trained head is always PPO's reward model (or the critic made from it)
            check_architecture(source, head, trained_head, "reward_model.name_or_path" if trained_head else
                               "model.name_or_path")
            try:
                model = auto_cls.from_pretrained(
                    source,
                    dtype=dtype,
                    attn_implementation=cfg.attn_implementation,
                    trust_remote_code=cfg.trust_remote_code,
                    **head_args,
                )
            except Exception as exc:  # noqa: BLE001 - OSError, ValueError, SafetensorError (truncated file), ...
                about_attention = any(w in str(exc).lower() for w in ("attn", "attention"))
                if cfg.attn_implementation not in ("sdpa", "eager") and about_attention:
                    raise attention_error(cfg, exc) from None
                raise CheckpointError(f"cannot load model from {source}{not_local_hint(source)}: "
                                      f"{type(exc).__name__}: {exc}") from None
            model.config.pad_token_id = tokenizer.pad_token_id
        vocab = model.get_input_embeddings().weight
        rows = getattr(vocab, "ds_shape", vocab.shape)[0]
        if len(tokenizer) > rows:
            if not resize:
                raise CheckpointError(
                    f"tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows; "
                    "use the tokenizer that belongs to the model"
                )
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    gen = getattr(model, "generation_config", None)
    if head == "causal_lm" and gen is not None:
        gen.pad_token_id = tokenizer.pad_token_id
        gen.eos_token_id = with_eos(gen.eos_token_id, tokenizer.eos_token_id)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def with_eos(ids: int | list[int] | None, eos: int) -> int | list[int]:
    """A generation config's EOS id(s) with the tokenizer's EOS among them (what the stages append to the
    training data and stop a response at), so that plain `generate()` on a saved model stops where rlhf does:
    None -> eos; 5 -> [5, eos] unless 5 is eos; a list keeps its order, eos appended when absent."""
    if ids is None:
        return eos
    listed = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    if eos in listed:
        return ids if isinstance(ids, int) else listed
    return [*listed, eos]


def check_architecture(source: str, head: str, trained_head: bool, key: str = "model.name_or_path") -> Any:
    """Refuse a local checkpoint of the wrong kind before loading it: a sequence classifier (reward model) where
    a causal LM is wanted, or (trained_head) anything but a one-label sequence classifier; and a local
    directory without config.json (not a model: from_pretrained would complain about its tokenizer or weights
    instead). Hub ids are left to from_pretrained. Returns its config.json parsed (None for a hub id)."""
    import json

    config = Path(source) / "config.json"
    if Path(source).is_dir() and not config.exists():
        raise CheckpointError(f"{key} {source} is not a model directory (no config.json, nor a finished stage run "
                              "with final/config.json)")
    if not config.is_file():
        return
    try:
        body = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config} is not valid JSON: {exc}") from None
    arch = (body.get("architectures") or ["?"])[0]
    labels = len(body.get("id2label") or {}) or body.get("num_labels", 2)
    is_classifier = arch.endswith("ForSequenceClassification")
    if head == "causal_lm" and is_classifier:
        raise CheckpointError(f"{source} is a {arch} (a reward model), not a causal LM; point {key} "
                              "at an SFT output or a base model")
    if head == "reward" and trained_head and not (is_classifier and labels == 1):
        raise CheckpointError(f"{source} is a {arch}, not a one-label sequence classifier: point {key} at a "
                              "reward model written by rlhf train-rm (its score head would be random otherwise)")
    return body


#: per stage, the models it loads that have a kind to check: (config section, head, trained head)
STAGE_MODEL_KINDS = {"sft": [("model", "causal_lm", False)], "train-rm": [("model", "reward", False)],
                     "ppo": [("model", "causal_lm", False), ("reward_model", "reward", True)]}


#: model types whose attention mask ignores the position ids that separate packed examples (their mask is plain
#: causal over the whole row, so packed examples would attend to each other), with transformers 5.4 to 5.25:
#: tests/test_data.py packs two examples into one row on a tiny model of each, and of common types that pass
PACKING_UNSAFE = frozenset({"opt", "bloom", "mpt", "biogpt"})


def check_packing(model_type: str | None, packing: bool) -> None:
    """data.packing on a model type in PACKING_UNSAFE is a ConfigError."""
    if packing and model_type in PACKING_UNSAFE:
        raise ConfigError(f"data.packing: true is not supported for {model_type} models: they build their attention "
                          "mask without the position ids that separate packed examples, so each packed example "
                          "would attend to the ones before it; set data.packing: false")


#: model types whose positions are a learned table of a fixed size (n_positions / max_position_embeddings): a
#: longer sequence indexes past it (an IndexError on a CPU, a device-side assert on a GPU). Rotary and ALiBi
#: models run past their nominal length (with a quality cost) and are not checked.
LEARNED_POSITIONS = frozenset({"gpt2", "gpt_bigcode", "gpt_neo", "opt", "biogpt"})


def position_limit(config: dict[str, Any]) -> int | None:
    """The position-table size of a LEARNED_POSITIONS model's config dict (its config class's default when the
    dict leaves it out); None for other model types."""
    model_type = config.get("model_type")
    if model_type not in LEARNED_POSITIONS:
        return None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    known = config.get("n_positions", config.get("max_position_embeddings"))
    return int(known) if isinstance(known, int) else CONFIG_MAPPING[model_type]().max_position_embeddings


def stage_lengths(stage: str, cfg: Any) -> dict[str, list[tuple[str, int]]]:
    """Per model section, the longest sequences the stage feeds it: (what sets it, tokens)."""
    if stage in ("sft", "train-rm"):
        return {"model": [("data.max_length", cfg.data.max_length)]}
    if stage != "ppo":
        return {}
    rollout = cfg.data.max_prompt_length + cfg.generation.max_new_tokens
    policy = [("data.max_prompt_length + generation.max_new_tokens", rollout)]
    if cfg.data.ptx is not None:
        policy.append(("data.ptx_max_length", cfg.data.ptx_max_length))
    return {"model": policy,
            "reward_model": [("data.max_prompt_length + generation.max_new_tokens + 1 (an EOS appended)", rollout + 1)]}


def check_positions(stage: str, configs: dict[str, dict[str, Any] | None], cfg: Any) -> None:
    """A model with learned positions (LEARNED_POSITIONS) fed sequences longer than its position table is a
    ConfigError naming both numbers, before any launch (`configs`: each model's config.json or from_config)."""
    for section, lengths in stage_lengths(stage, cfg).items():
        config = configs.get(section)
        limit = position_limit(config) if config is not None else None
        for what, tokens in lengths:
            if limit is not None and tokens > limit:
                raise ConfigError(f"{what} = {tokens} tokens, but {section} ({config['model_type']}) has "
                                  f"learned positions for {limit} only; shorten the sequences or use a model "
                                  "with more positions")


def check_stage_models(stage: str, cfg: Any) -> None:
    """The kind checks a stage makes before loading its models (`check_architecture` on each local folder's
    config.json; a stage folder stands for its final/), SFT's packing check (`check_packing`) and the position
    check (`check_positions`), without loading any weights: what --dry-run can tell."""
    configs = {section: getattr(cfg, section).from_config for section in stage_lengths(stage, cfg)}
    for section, head, trained, path in loaded_models(stage, cfg):
        configs[section] = check_architecture(resolve_model_dir(path), head, trained, f"{section}.name_or_path")
    if stage == "sft":
        check_packing((configs["model"] or {}).get("model_type"), cfg.data.packing)
    check_positions(stage, configs, cfg)


@contextlib.contextmanager
def zero3_init_off() -> Iterator[None]:
    """Build models as plain (unpartitioned) modules even while a ZeRO-3 HfDeepSpeedConfig is alive."""
    import transformers.integrations.deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def build_causal_lm(
    cfg: ModelConfig, tokenizer: Any, precision: str, ds_config: dict[str, Any], seed: int
) -> torch.nn.Module:
    """The trainable causal LM (see build_model)."""
    return build_model(cfg, tokenizer, precision, ds_config, seed, head="causal_lm")


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute layer activations in the backward pass (non-reentrant). transformers >= 5.2x calls this
    activation checkpointing; earlier 5.x releases gradient checkpointing."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_activation_checkpointing(model: torch.nn.Module) -> bool:
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return bool(model.is_activation_checkpointing if flag is not None else model.is_gradient_checkpointing)

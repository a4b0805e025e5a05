"""Config schemas (pydantic): the sections every stage shares and each stage's own schema.

Every section forbids unknown keys, so a typo is an error rather than a silently ignored setting. Fields that
hold file-system paths are marked with `InputPath`, `OutputPath` or `HubOrPath`; `resolve_paths` turns the
relative ones into absolute paths (against the config file's folder, or the working directory for values given
on the command line) and checks that inputs exist.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from stages.errors import ConfigError


# --------------------------------------------------------------------------------------------- path fields
@dataclass(frozen=True)
class PathKind:
    """Marks a `str` field as a path. kind: "input" (must exist), "output" (may not exist yet) or
    "hub_or_path" (a local path when it looks like one or exists, otherwise a Hugging Face Hub id)."""

    kind: str


InputPath = Annotated[str, PathKind("input")]
OutputPath = Annotated[str, PathKind("output")]
HubOrPath = Annotated[str, PathKind("hub_or_path")]
#: a random seed: what torch, numpy (0 .. 2**32 - 1) and Python's random all take, with room for the per-rank and
#: per-iteration seeds derived from it (a `date +%s%N` value overflowed at the first PPO update)
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
#: data.content_special_tokens of every stage (SFT, RM, PPO prompts and PTX read messages alike)
ContentSpecialTokens = Annotated[Literal["text", "control"], Field(
    description="a special-token string inside a chat-template message's content: read as text, or as the "
    "control token (data that means them: tool-call tags)")]

#: the local data files rlhf reads (stages.data.read_rows)
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
#: Extensions that make a value unmistakably a local file (so a missing one is an error, not a hub id).
FILE_SUFFIXES = LOCAL_SUFFIXES + (".yaml", ".yml", ".txt", ".safetensors", ".bin")


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are re-validated on assignment, and a float
    must be finite (`.inf` / `.nan` are refused)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """true/false (YAML also reads yes/no/on/off so) where a number is wanted is an error, for a value or an
        item of a list of numbers: pydantic would take it as 1 or 0 (`lr: yes` trained at lr 1.0,
        `adam_betas: [no, 0.95]` at beta1 0)."""
        annotation = cls.model_fields[info.field_name].annotation if info.field_name else None
        if (isinstance(value, bool) and _wants_a_number(annotation)) or (
                isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value)
                and _wants_a_number(annotation, items=True)):
            raise ValueError("a number is needed, not a boolean (YAML reads yes/no/on/off/true/false as booleans)")
        return value


def _wants_a_number(annotation: Any, items: bool = False) -> bool:
    """Whether a field's type takes an int or float (a Literal of them included) and no bool; with `items`,
    whether the items of its list or tuple do."""
    found: set[type] = set()

    def walk(tp: Any, inside: bool) -> None:
        origin = get_origin(tp)
        if tp in (bool, int, float) and inside == items:
            found.add(tp)
        elif origin is Literal and inside == items:
            found.update(type(arg) for arg in get_args(tp))
        elif origin in (list, tuple) and not inside:
            for arg in get_args(tp):
                walk(arg, True)
        elif origin is not None and origin not in (list, tuple, dict, Literal):
            for arg in get_args(tp):
                walk(arg, inside)

    walk(annotation, False)
    return bool(found & {int, float}) and bool not in found


# --------------------------------------------------------------------------------------------- model
class TokenizerTrainConfig(Section):
    """A byte-level BPE tokenizer trained on the training texts (only with `model.from_config`)."""

    vocab_size: int = Field(512, ge=300, description="target vocabulary size, special tokens included")
    min_frequency: int = Field(2, ge=1, description="minimum pair frequency for a merge")


class ModelConfig(Section):
    """Which model to train and how to load it. Exactly one of `name_or_path` / `from_config`."""

    name_or_path: HubOrPath | None = Field(None, description="hub id or local directory of a HF model")
    from_config: dict[str, Any] | None = Field(
        None, description="architecture dict for a random-init model (needs model_type), e.g. tiny llama"
    )
    tokenizer: HubOrPath | None = Field(None, description="tokenizer location; default: name_or_path")
    tokenizer_train: TokenizerTrainConfig = TokenizerTrainConfig()
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the weights are loaded in; auto = the dtype of deepspeed.precision"
    )
    attn_implementation: str = Field("sdpa", description="sdpa | eager | flash_attention_2 | ...")
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False

    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, value: str) -> str:
        """eager, sdpa or an attention function transformers registers (flash_attention_2, flex_attention, ...);
        a hub kernel ("org/repo") or a paged variant ("paged|...") is left to transformers. eager and sdpa are
        accepted without importing transformers' model code (seconds a dry run or --help need not spend)."""
        if value in ("eager", "sdpa"):
            return value
        try:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        except ImportError:  # a transformers without the registry: leave the value to it
            return value
        known = list(dict.fromkeys(["eager", "sdpa", *(k for k in ALL_ATTENTION_FUNCTIONS.keys() if "|" not in k)]))
        if value in known or "/" in value or value.startswith("paged|"):
            return value
        raise ValueError(f"not one of {', '.join(known)} (or a hub kernel 'org/repo')")

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> "ModelConfig":
        if self.name_or_path is None and self.from_config is None:
            raise ValueError("set exactly one of name_or_path (a hub id or directory) and from_config")
        if self.name_or_path is not None and self.from_config is not None:
            raise ValueError("set exactly one of name_or_path (a hub id or directory) and from_config: both are "
                             "set (to load a checkpoint in a config that builds its model, also give "
                             "--set model.from_config=null)")
        if self.from_config is not None:
            given = [key for key in TOKENIZER_KEYS if key in self.from_config]
            if given:  # (the memory estimate priced a 151,936-row vocabulary the 512-token tokenizer replaced)
                raise ValueError(f"from_config.{given[0]}: set from the tokenizer when the model is built (its length, "
                                 "its pad/eos/bos ids), so a value here would be replaced; remove it (the vocabulary "
                                 "is model.tokenizer's, or model.tokenizer_train.vocab_size for one trained on the "
                                 "data)")
            if not structure_only(info):
                check_architecture(self.from_config)
        if self.tokenizer_train != TokenizerTrainConfig() and (self.from_config is None or self.tokenizer is not None):
            raise ValueError("tokenizer_train: a tokenizer is trained only for a from_config model without "
                             "model.tokenizer; this model's tokenizer is loaded (drop tokenizer_train)")
        return self


def as_bool(value: Any) -> bool:
    """A JSON flag as DeepSpeed's pydantic reads it: true/false, 1/0, or such a string ("true", "off", ...)."""
    if isinstance(value, str):
        if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off", "t", "f", "y", "n"):
            raise ValueError(f"not a boolean: {value!r}")
        return value.strip().lower() in ("true", "1", "yes", "on", "t", "y")
    return bool(value)


def set_key(item: str) -> str:
    """The dotted key a `set:` item (`key=value`, as --set takes it) sets."""
    return item.partition("=")[0].strip()


#: from_config keys a model is built with from its tokenizer (stages.models.build_model)
TOKENIZER_KEYS = ("vocab_size", "pad_token_id", "eos_token_id", "bos_token_id")


#: a validation context (`model_validate(data, context=STRUCTURE_ONLY)`) that leaves out the one check which imports
#: transformers (and with it torch: seconds), `check_architecture`: rlhf_cli.config_loader validates with it first,
#: so that a typo elsewhere in a config is said at once, and the architecture is checked once the rest is valid
STRUCTURE_ONLY = {"structure_only": True}


def structure_only(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("structure_only"))


def check_architecture(arch: dict[str, Any]) -> None:
    """Reject a from_config dict with an unknown model_type or a key its config class does not know (a typo
    would otherwise silently build a default-sized model), naming the closest valid key."""
    import difflib

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = arch.get("model_type")
    if model_type is None:
        raise ValueError("from_config needs a model_type (e.g. llama)")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=1, cutoff=0.0)
        raise ValueError(f"from_config.model_type: unknown model type {model_type!r}; closest: {close[0]!r}")
    import inspect

    cls = CONFIG_MAPPING[model_type]
    valid = set(cls().to_dict()) | set(inspect.signature(cls.__init__).parameters) | set(cls.attribute_map)
    if "rope_parameters" in valid:  # a RoPE model: the legacy spellings transformers still converts into it
        valid |= {"rope_theta", "rope_scaling"}
    for key in arch:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.0)
            raise ValueError(
                f"from_config.{key}: not a {model_type} config key; closest valid key: from_config.{close[0]}"
            )
    try:  # the config class's own checks (types, hidden size a multiple of the heads, ...), now rather than at build
        cls(**{k: copy.deepcopy(v) for k, v in arch.items() if k != "model_type"})  # (it may fill nested dicts in)
    except Exception as exc:  # noqa: BLE001 - transformers raises TypeError, ValueError and its own validation errors
        # huggingface_hub's strict dataclasses wrap the reason: "Class validation error for validator 'x':\n
        # ValueError: <reason>" (or "Validation error for field 'x':"): the reason alone is said
        lines = [re.sub(r"^\w+Error: ", "", line.strip()) for line in str(exc).splitlines() if line.strip()
                 and not re.fullmatch(r"(Class v|V)alidation error for (validator|field) '\w+':", line.strip())]
        reason = " ".join(lines[-2:])
        raise ValueError(f"from_config: {model_type} rejects it: {reason or type(exc).__name__}") from None


# --------------------------------------------------------------------------------------------- data
class DataSource(Section):
    """Where examples come from: local .json/.jsonl/.parquet/.csv file(s) or a hub dataset name."""

    path: HubOrPath | Annotated[list[HubOrPath], Field(min_length=1)]
    split: str = Field("train", description="split name (hub datasets)")
    subset: str | None = Field(None, description="configuration name (hub datasets)")

    @model_validator(mode="before")
    @classmethod
    def _from_plain_path(cls, value: Any) -> Any:
        """Accept `train: file.jsonl` and `train: [a.jsonl, b.jsonl]` as shorthands for `{path: ...}`."""
        if isinstance(value, (str, list)):
            return {"path": value}
        return value

    @model_validator(mode="after")
    def _split_of_a_hub_dataset(self) -> "DataSource":
        """split and subset choose a part of a hub dataset; a local data file is read whole, so giving them for one
        (`split: test` on data.jsonl) would be ignored."""
        local = [p for p in self.paths() if p.lower().endswith(LOCAL_SUFFIXES)]
        if local and (self.split != "train" or self.subset is not None):
            raise ValueError(f"split/subset select a part of a hub dataset; {local[0]} is a local file, read whole "
                             "(drop them, or point at the file of that split)")
        return self

    def paths(self) -> list[str]:
        return self.path if isinstance(self.path, list) else [self.path]


class PromptPartColumns(Section):
    """The prompt column and the optional columns that add to it (stages/data.py `with_input`, `with_system`)."""

    prompt: str = "prompt"
    input: str | None = Field(
        None, description="column joined to the prompt column's text after a blank line when not empty (alpaca's "
        "input); read with the prompt column only")
    system: str | None = Field(
        None, description="column of a system prompt, given as a first system turn when not empty (orca's system); "
        "needs the chat template")

    @model_validator(mode="after")
    def _parts_apart(self) -> "PromptPartColumns":
        """input and system name columns of their own: one also read as the prompt would be read twice."""
        named = [(key, getattr(self, key)) for key in ("prompt", "input", "system") if getattr(self, key) is not None]
        for i, (key, column) in enumerate(named):
            for other, same in named[:i]:
                if same == column:
                    raise ValueError(f"{other} and {key} both name column {column!r}: each part of the prompt is a "
                                     "column of its own")
        return self


class PromptColumns(PromptPartColumns):
    """Column names of prompt data (PPO); SFT's Columns add the response."""

    messages: str = "messages"
    text: str = Field("chosen", description="HH-RLHF dialogue text column")


class Columns(PromptColumns):
    """Column names in the data. Which ones are read depends on the format."""

    response: str = "response"
    document: str = Field("text", description="plain-text column of data.format text (its whole text trained)")


class DataConfigBase(Section):
    """What every stage's data section shares: sources, holdout, rendering, lengths, bad rows."""

    train: DataSource
    eval: DataSource | None = Field(None, description="held-out eval data; default: a fraction of train")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of train held out when eval is unset")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's")
    use_chat_template: bool = Field(
        False, description="render plain-text rows (prompt strings, hh) through the chat template"
    )
    max_length: int = Field(512, ge=2, description="tokens per example (prompt + response)")
    max_prompt_length: int | None = Field(
        None, ge=1, description="prompt tokens kept when an example is too long; default max_length // 2"
    )
    add_eos: bool = Field(True, description="end the last response with EOS unless the template already does")
    on_bad_row: Literal["error", "skip"] = "error"
    content_special_tokens: ContentSpecialTokens = "text"

    @model_validator(mode="after")
    def _lengths(self) -> "DataConfigBase":
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length})"
            )
        return self

    @property
    def prompt_budget(self) -> int:
        return self.max_prompt_length if self.max_prompt_length is not None else self.max_length // 2


class SFTDataConfig(DataConfigBase):
    """Data for supervised fine-tuning (see stages/data.py for formats and truncation)."""

    format: Literal["auto", "prompt_response", "messages", "hh", "text"] = Field(
        "auto", description="text (plain text trained whole: pretraining-style data) is never chosen by auto")
    columns: Columns = Columns()
    train_on: Literal["all_turns", "last_turn"] = Field(
        "all_turns", description="which assistant turns of a multi-turn dialogue carry the loss"
    )
    packing: bool = Field(False, description="pack several examples per row (attention kept per example)")


class PairColumns(PromptPartColumns):
    """Column names of preference data."""

    chosen: str = "chosen"
    rejected: str = "rejected"
    margin: str | None = Field(None, description="optional numeric column: required reward margin of the pair")


class RMDataConfig(DataConfigBase):
    """Preference pairs for reward-model training (see stages/pairs.py for formats)."""

    format: Literal["auto", "pairs", "messages", "hh"] = "auto"
    columns: PairColumns = PairColumns()
    duplicates: Literal["drop", "error", "keep"] = Field(
        "drop", description="a pair repeating an earlier one: drop and count it, stop naming both rows, or keep it"
    )


# --------------------------------------------------------------------------------------------- training
SKIP_WITH_ZERO3 = (
    "train.on_nonfinite: skip drops a bad micro-batch by back-propagating an exact zero through every parameter, "
    "which ZeRO-3's partitioned parameters do not allow; use deepspeed.zero_stage <= 2, or on_nonfinite: stop"
)

class TrainConfig(Section):
    """Optimisation and schedule. Global batch = micro_batch_size x gradient_accumulation_steps x ranks."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    micro_batch_size: int = Field(4, ge=1, description="examples per rank per forward pass")
    eval_micro_batch_size: int | None = Field(None, ge=1, description="default: micro_batch_size")
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.95), description="Adam's beta1, beta2, each in [0, 1)")
    adam_eps: float = Field(1e-8, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="share of steps with linear warm-up")
    warmup_steps: int | None = Field(None, ge=0, description="overrides warmup_ratio")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr / peak lr for cosine and linear")
    gradient_clipping: float = Field(1.0, ge=0, description="global grad-norm clip; 0 = off")
    eval_every: int = Field(0, ge=0, description="steps between evals; 0 = only at the end")
    save_every: int = Field(0, ge=0, description="steps between resumable checkpoints; 0 = only at the end")
    save_total_limit: int = Field(2, ge=1, description="resumable checkpoints kept (oldest removed)")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf micro-batch loss: stop the run before the update, or skip that micro-batch"
    )


#: deepspeed.precision -> the name of the torch dtype it computes in
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class DeepSpeedConfig(Section):
    """DeepSpeed settings; `config` (a JSON file or inline dict) is merged last for anything else."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = Field(False, description="optimizer states on CPU (ZeRO 1-3)")
    offload_param: bool = Field(False, description="parameters on CPU (ZeRO-3 only)")
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    config: InputPath | dict[str, Any] | None = Field(None, description="raw DeepSpeed JSON merged on top")

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "DeepSpeedConfig":
        if self.offload_param and self.zero_stage != 3:
            raise ValueError(f"offload_param needs zero_stage: 3 (got {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (got 0)")
        return self


class LoggingConfig(Section):
    log_every: int = Field(1, ge=1, description="steps between metric rows")
    tensorboard: bool = True
    profile_step: int = Field(
        0, ge=0, description="profile this step (PPO: iteration), 1-based, with torch.profiler: its Chrome trace "
        "(profile-step-N.json.gz) and a table of ops and kernels by time (profile-step-N.txt) in output_dir; 0 = off"
    )


class StageConfig(Section):
    """Keys every training stage has."""

    seed: Seed = 42
    output_dir: OutputPath
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _skip_needs_unpartitioned_params(self) -> "StageConfig":
        if self.train.on_nonfinite == "skip" and self.deepspeed.zero_stage == 3:
            raise ValueError(SKIP_WITH_ZERO3)
        return self


class SFTConfig(StageConfig):
    """`rlhf sft` config."""

    data: SFTDataConfig


class RMLossConfig(Section):
    """Reward-model loss: -log sigmoid(r_chosen - r_rejected - margin) + lm_coef * LM + center_coef * centring."""

    lm_coef: float = Field(0.0, ge=0, description="weight of the LM loss on the chosen response (paper: 1.0)")
    center_coef: float = Field(
        0.0, ge=0, description="weight of the centring term mean((r_chosen + r_rejected)^2) (e.g. 0.01)"
    )


class RMConfig(StageConfig):
    """`rlhf train-rm` config."""

    data: RMDataConfig
    loss: RMLossConfig = RMLossConfig()


# --------------------------------------------------------------------------------------------- PPO
class PPODataConfig(Section):
    """Prompts for rollouts (and optional PTX data). See stages/ppo/prompts.py for the formats."""

    train: DataSource
    eval: DataSource | None = Field(None, description="held-out validation prompts; default: a fraction of train")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of train held out when eval is unset")
    format: Literal["auto", "prompt", "messages", "hh"] = "auto"
    columns: PromptColumns = PromptColumns()
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's")
    use_chat_template: bool = Field(False, description="render plain-text prompts (prompt strings, hh) as chat")
    content_special_tokens: ContentSpecialTokens = "text"
    max_prompt_length: int = Field(256, ge=1, description="prompt tokens kept (longer prompts lose the left part)")
    on_bad_row: Literal["error", "skip"] = "error"
    ptx: DataSource | None = Field(None, description="SFT-format data for the PTX loss (needs ppo.ptx_coef > 0)")
    ptx_format: Literal["auto", "prompt_response", "messages", "hh", "text"] = Field(
        "auto", description="as SFT's data.format; text: a pretraining corpus, each row's whole text trained")
    ptx_columns: Columns = Field(Columns(), description="column names of data.ptx, as SFT's data.columns")
    ptx_max_length: int = Field(512, ge=2, description="tokens per PTX example")
    rendering_check: Literal["error", "warn", "off"] = Field(
        "error", description="prompts rendered in a style (chat template / plain text / HH text) or with a chat "
        "template the policy (SFT) or reward model was not trained on: stop (error), warn, or off"
    )

    @field_validator("rendering_check", mode="before")
    @classmethod
    def _off_as_yaml_reads_it(cls, value: Any) -> Any:
        """`rendering_check: off` unquoted: YAML 1.1 reads off as false; it means "off"."""
        return "off" if value is False else value
    rm_add_eos: bool | None = Field(
        None, description="whether the reward model's training rows ended with EOS (its data.add_eos), which "
        "decides how a response is read; null = as the RM's rlhf_checkpoint.json records it (true without a record)"
    )
    gold_reward: Literal["toy"] | None = Field(
        None, description="a known 'human' judge logged next to the RM score (objective/gold, eval/gold); "
        "never trained on. toy = the built-in toy task's (stages/toydata.py)"
    )


class GenerationConfig(Section):
    """Rollout sampling. The repetition penalty applies to tokens the response already contains (not the prompt)."""

    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling; 1 = off")
    top_k: int = Field(0, ge=0, description="0 = off")
    repetition_penalty: float = Field(1.1, gt=0, description="on generated tokens; 1 = off")
    on_truncation: Literal["eos", "penalty"] = Field(
        "eos", description="a response that hits max_new_tokens: eos = score it with EOS appended (or as it is, for "
        "a reward model trained without EOS); penalty = score it as is and subtract truncation_penalty"
    )
    truncation_penalty: float = Field(
        1.0, ge=0, description="subtracted from a truncated response's raw RM score (penalty), before the running reward "
        "statistics, normalisation and reward_clip: in the RM's score units"
    )
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, description="extra ids that end a response (besides EOS and the generation config's); "
        "a response ending on one is scored by the reward model with what its training data has after the "
        "token appended (EOS when the chat template never writes it; see data.rm_add_eos for an RM without EOS)"
    )
    min_new_tokens: int = Field(0, ge=0, description="stop tokens are not sampled before this many new tokens")
    logprobs_at_temperature: bool = Field(
        False, description="log-probs of the policy (old and new), the reference and the entropy from logits / "
        "temperature: the sampler's distribution without the repetition penalty, top-k and top-p (as TRL does); "
        "off: at temperature 1, the model's own distribution (as the paper's code and DeepSpeed-Chat do)"
    )
    cache: Literal["static", "dynamic"] = Field(
        "static", description="KV cache: static = preallocated, reused, compilable (fast path); dynamic = grown "
        "per token (reference path)"
    )
    compile: bool = Field(
        False, description="torch.compile each decoding step (static cache only; CUDA graphs on a GPU); the "
        "first rollout pays the compilation"
    )
    compile_sampling: bool = Field(
        False, description="with compile: the compiled decoding step also does the next token's sampling work "
        "(penalty, temperature, top-k/top-p, the draw), one graph per step (experimental: same tokens on CPU, "
        "not yet timed on a GPU)"
    )

    @property
    def greedy(self) -> bool:
        """Whether this decodes greedily: top-k 1 keeps only the most likely token (after the repetition
        penalty; tokens tied for it are drawn among)."""
        return self.top_k == 1

    @model_validator(mode="after")
    def _token_counts(self) -> "GenerationConfig":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        if self.compile and self.cache != "static":
            raise ValueError("compile needs cache: static")
        if self.compile_sampling and not self.compile:
            raise ValueError("compile_sampling needs compile: true")
        return self


class PPOAlgoConfig(Section):
    """The PPO-max tricks (PPO-MAX.md). A preset fills every key the config does not set."""

    preset: Literal["vanilla", "moss-release", "ppo-max"] = "vanilla"
    kl_coef: float = Field(0.0, ge=0, description="beta of the token-level KL penalty R_t = -beta KL_t")
    kl_estimator: Literal["k1", "k3"] = "k1"
    reward_scaling: bool = Field(False, description="divide the score by the running std")
    reward_norm: bool = Field(False, description="subtract the running mean, divide by the running std")
    reward_clip: float = Field(0.0, ge=0, description="clip the transformed score to [-delta, delta]; 0 = off")
    adv_norm: bool = Field(False, description="whiten advantages over the mini-batch's response tokens")
    adv_clip: float = Field(0.0, ge=0, description="clip advantages to [-c, c] (after whitening); 0 = off")
    policy_clip: float = Field(0.2, gt=0, lt=1, description="PPO clip epsilon (the ratio is clipped to [1 - eps, 1 + eps])")
    value_clip: float = Field(0.0, ge=0, description="value-loss clipping c around the old values; 0 = off")
    critic_init: Literal["reward_model", "policy"] = Field(
        "reward_model", description="critic weights: the reward model's, or the policy's with a new zero head"
    )
    critic_pretrain_steps: int = Field(0, ge=0, description="iterations training only the critic, before PPO")
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip of policy and critic; 0 = off")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus: loss -= coef * H")
    ptx_coef: float = Field(0.0, ge=0, description="weight of the LM loss on data.ptx")
    ref_importance_sampling: bool = Field(
        False, description="PPO ratio against the reference policy instead of the rollout policy"
    )
    ppo_epochs: int = Field(1, ge=1, description="passes over each rollout batch")

    @model_validator(mode="after")
    def _one_reward_transform(self) -> "PPOAlgoConfig":
        if self.reward_scaling and self.reward_norm:
            raise ValueError("reward_scaling and reward_norm are alternatives; turn one off")
        return self


class PPOTrainConfig(Section):
    """Batch sizes (per rank), schedule and optimisers of policy and critic."""

    iterations: int = Field(100, ge=1, description="PPO iterations (rollout + update), after critic pre-training")
    rollout_batch_size: int = Field(8, ge=1, description="prompts per rank per iteration")
    mini_batch_size: int = Field(8, ge=1, description="rollouts per rank per optimizer step")
    micro_batch_size: int = Field(4, ge=1, description="rollouts per rank per forward/backward")
    forward_batch_size: int | None = Field(None, ge=1, description="rows per scoring forward; default micro")
    logprob_chunk: int = Field(
        4096, ge=0, description="response tokens per LM-head block when computing log-probs (checkpointed, so "
        "no full-vocabulary logits of the whole batch exist); 0 = full logits (reference path)"
    )
    policy_lr: float = Field(5e-7, gt=0)
    critic_lr: float = Field(1.5e-6, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "constant"
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="share of optimizer steps with linear warm-up")
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.95), description="Adam's beta1, beta2, each in [0, 1)")
    adam_eps: float = Field(1e-8, gt=0)
    eval_every: int = Field(0, ge=0, description="iterations between validations; 0 = only at the end")
    save_every: int = Field(0, ge=0, description="iterations between resumable checkpoints; 0 = only at the end")
    save_total_limit: int = Field(2, ge=1)
    checkpoints: bool = Field(True, description="false: no resumable checkpoint and no final/ at all (rlhf bench, "
                              "whose W1 checkpoint would be 16 GB; a stop signal then ends the run unsaved)")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf reward, log-prob, value or loss: stop the run before the update, or skip "
        "that rollout batch / micro-batch"
    )
    sample_every: int = Field(10, ge=0, description="iterations between sample tables; 0 = never")
    samples_shown: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _divisible(self) -> "PPOTrainConfig":
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of mini_batch_size "
                f"({self.mini_batch_size})"
            )
        if self.mini_batch_size % self.micro_batch_size:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )
        return self


class MonitorConfig(Section):
    """Pattern-collapse monitor (PPO-MAX.md "What to monitor"); a threshold of 0 turns its check off."""

    action: Literal["warn", "stop"] = "warn"
    max_cap_share: float = Field(0.5, ge=0, le=1, description="share of responses hitting max_new_tokens")
    max_length_ratio: float = Field(2.0, ge=0, description="mean response length / its first-iteration value")
    max_kl: float = Field(0.1, ge=0, description="mean per-token KL (monitor.kl_estimator) to the reference")
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1", description="the KL check's estimator: k1 (log p - log p_ref), or k3 (never negative; k1 can read "
                          "negative when responses are sampled away from the log-probs' distribution)")
    max_repetition: float = Field(0.5, ge=0, le=1, description="share of repeated n-grams in a response")
    ngram: int = Field(3, ge=1, description="n of the repetition rate")


class PPODeepSpeedConfig(DeepSpeedConfig):
    """DeepSpeed for the trained policy and critic, and how the frozen reference and reward model run."""

    frozen_zero_stage: Literal[0, 3] | None = Field(
        None, description="0 = plain inference copy per rank, 3 = partitioned; default: 3 when zero_stage is 3"
    )
    frozen_offload_param: bool = Field(False, description="frozen models' parameters on CPU (frozen ZeRO-3)")

    @model_validator(mode="after")
    def _frozen_offload(self) -> "PPODeepSpeedConfig":
        if self.frozen_offload_param and self.frozen_stage != 3:
            raise ValueError("frozen_offload_param needs frozen_zero_stage: 3")
        return self

    @property
    def frozen_stage(self) -> int:
        if self.frozen_zero_stage is not None:
            return self.frozen_zero_stage
        return 3 if self.zero_stage == 3 else 0


class PPOConfig(Section):
    """`rlhf ppo` config: policy (and reference) from `model`, critic and frozen scorer from `reward_model`."""

    seed: Seed = 42
    output_dir: OutputPath
    model: ModelConfig = Field(description="the policy's start (an SFT checkpoint); the reference is a frozen copy")
    reward_model: ModelConfig = Field(description="the frozen reward model (a train-rm checkpoint)")
    data: PPODataConfig
    generation: GenerationConfig = GenerationConfig()
    ppo: PPOAlgoConfig = PPOAlgoConfig()
    train: PPOTrainConfig = PPOTrainConfig()
    monitor: MonitorConfig = MonitorConfig()
    deepspeed: PPODeepSpeedConfig = PPODeepSpeedConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _checkpoints(self) -> "PPOConfig":
        for key in ("model", "reward_model"):
            if getattr(self, key).name_or_path is None:
                raise ValueError(f"{key}.name_or_path: PPO starts from a trained checkpoint (from_config is not allowed)")
        if self.ppo.ptx_coef > 0 and self.data.ptx is None:
            raise ValueError("ppo.ptx_coef > 0 needs data.ptx (SFT-format data for the PTX loss)")
        if self.train.on_nonfinite == "skip" and self.deepspeed.zero_stage == 3:
            raise ValueError(SKIP_WITH_ZERO3)
        return self


# --------------------------------------------------------------------------------------------- pipeline
class PipelineStage(Section):
    """One stage of `rlhf pipeline`: its own config file and `--set` overrides (the pipeline wires the model
    paths and output_dir itself)."""

    config: InputPath = Field(description="the stage's YAML config")
    set: list[str] = Field(default_factory=list, description="key=value overrides, as with --set")


class PPORun(Section):
    """A PPO run of the pipeline from the same SFT and RM checkpoints: a preset, overrides, seeds."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="output folder name (output_dir/NAME)")
    preset: Literal["vanilla", "moss-release", "ppo-max"] | None = Field(
        None, description="trick preset; default: the PPO config's ppo.preset"
    )
    set: list[str] = Field(default_factory=list, description="overrides on top of the PPO stage's")
    seeds: list[Seed] = Field(
        default_factory=list, description="one run per seed, in output_dir/NAME-seedS; empty: the config's seed"
    )


class PipelineEvalConfig(Section):
    """`rlhf eval` of every PPO policy against the SFT model, after training."""

    enabled: bool = True
    num_prompts: int | None = Field(None, ge=1, description="first N prompts of the PPO config's data.eval")
    seed: Seed = Field(0, description="sampling seed, the same for every policy")
    batch_size: int = Field(32, ge=1)
    greedy: bool = Field(False, description="greedy decoding (rlhf eval --greedy): deterministic, but no KL")
    policy: Literal["final", "best"] = Field(
        "final", description="each PPO run's policy to evaluate: final/, or best/ (its best validation reward "
        "while the collapse monitor was quiet; final/ for a run that wrote none)")


#: the files `rlhf pipeline` writes at the top of its output_dir when it ends (no run folder may take their names)
PIPELINE_SUMMARY_FILES = ("summary.json", "summary.md")

#: the keys `rlhf pipeline` sets in its stages' configs (no stage's `set` may), and what it sets them to
PIPELINE_WIRING = {"output_dir": "the stage's folder under the pipeline's output_dir",
                   "model.name_or_path": "the SFT stage's output",
                   "reward_model.name_or_path": "the RM stage's output"}


class PipelineConfig(Section):
    """`rlhf pipeline` config: SFT -> reward model -> PPO (one or several runs) -> eval -> report."""

    output_dir: OutputPath = Field(description="stage outputs: output_dir/sft, output_dir/rm, output_dir/<run>")
    sft: PipelineStage
    rm: PipelineStage
    ppo: PipelineStage
    ppo_runs: list[PPORun] = Field(
        default_factory=list, description="PPO runs from the same SFT/RM; empty: one run named ppo"
    )
    eval: PipelineEvalConfig = PipelineEvalConfig()
    report: bool = Field(True, description="write output_dir/report (rlhf report over the PPO runs)")

    @model_validator(mode="after")
    def _unique_runs(self) -> "PipelineConfig":
        """Every run's folder (NAME, or NAME-seedS per seed) is its own: unique, not a stage's, the report's or
        the summary files' (written at the end: a folder of that name would fail the finished pipeline), and not
        output_dir itself or above it."""
        labels = [r.name if not r.seeds else f"{r.name}-seed{s}" for r in self.ppo_runs for s in (r.seeds or [0])]
        taken = ("sft", "rm", "report", *PIPELINE_SUMMARY_FILES, ".", "..")
        dupes = sorted({n for n in labels if labels.count(n) > 1} | {n for n in labels if n in taken})
        if dupes:
            raise ValueError(f"ppo_runs: each run's folder (NAME, or NAME-seedS per seed) must be unique and not "
                             f"{'/'.join(taken)}: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _wiring_not_set(self) -> "PipelineConfig":
        """A stage's `set:` may not change what the pipeline wires (each output_dir, the RM's and PPO's model
        paths): the pipeline would check, skip and hand on other folders than the stage wrote or read."""
        wired = PIPELINE_WIRING
        where = [("sft", self.sft.set, ["output_dir"]), ("rm", self.rm.set, ["output_dir", "model.name_or_path"])]
        where += [(name, items, list(wired)) for name, items in
                  [("ppo", self.ppo.set)] + [(f"ppo_runs[{i}]", r.set) for i, r in enumerate(self.ppo_runs)]]
        for i, r in enumerate(self.ppo_runs):  # a key the run's own field sets
            for key, field_name, value in (("seed", "seeds", r.seeds), ("ppo.preset", "preset", r.preset)):
                if value and any(set_key(item) == key for item in r.set):
                    raise ValueError(f"ppo_runs[{i}].set: {key} is set by the run's {field_name} ({value}); drop one "
                                     "of them")
        for section, items, keys in where:
            for item in items:
                key = set_key(item)
                hit = next((k for k in keys if k == key or k.startswith(key + ".")), None)  # or a mapping above it
                if hit is not None:
                    raise ValueError(f"{section}.set: {key} sets {hit}, which the pipeline wires ({wired[hit]}); "
                                     "run the stage by itself to set it")
        return self


# --------------------------------------------------------------------------------------------- bench
class BenchWorkloadConfig(Section):
    """A synthetic PPO workload: random-init models of `architecture`, random prompts, fixed-length responses."""

    architecture: dict[str, Any] = Field(description="architecture dict of policy, reference, critic and RM "
                                         "(model_type and its config keys), as model.from_config")
    prompts: int = Field(64, ge=1, description="prompts per iteration (the rollout batch)")
    prompt_length: int = Field(128, ge=1, description="tokens per prompt")
    new_tokens: int = Field(128, ge=1, description="tokens generated per prompt, exactly (no early stop)")
    words: int = Field(1000, ge=2, description="distinct words (tokens) the random prompts draw from (the "
                       "tokenizer names every row of the vocabulary, so responses draw from all of them)")

    @model_validator(mode="after")
    def _architecture(self, info: ValidationInfo) -> "BenchWorkloadConfig":
        if not structure_only(info):
            check_architecture(self.architecture)
        return self


class BenchConfig(Section):
    """`rlhf bench` config: a workload, how many iterations to time, and `rlhf ppo` keys on top."""

    name: str = Field(description="workload name, written into the result")
    seed: Seed = 0
    output_dir: OutputPath = Field(description="workload/ (built once), ppo.yaml (the generated rlhf ppo config), "
                                   "ppo/ (the run), bench-*.json")
    workload: BenchWorkloadConfig
    iterations: int = Field(5, ge=1, description="timed iterations (the result is their median)")
    warmup: int = Field(2, ge=0, description="iterations run first and not timed (compilation, allocator)")
    peak_tflops: float | None = Field(None, gt=0, description="device peak for MFU and the roofline floors; default: "
                                      "a known GPU's dense peak for the trained models' dtype (bf16/fp16 tensor "
                                      "cores; float32: the plain float32 peak, no TF32)")
    peak_bandwidth_tbs: float | None = Field(None, gt=0, description="device memory bandwidth in TB/s for the roofline "
                                             "floors; default: a known GPU's")
    profile: bool = Field(True, description="bench ppo: one more iteration after the timed ones, under torch.profiler "
                          "(logging.profile_step; not timed): its Chrome trace and op/kernel table beside the result")
    ppo: dict[str, Any] = Field(default_factory=dict, description="rlhf ppo config keys (nested) merged over the "
                                "generated config, e.g. {train: {micro_batch_size: 8}, generation: {compile: true}}")


STAGE_SCHEMAS: dict[str, type[Section]] = {"sft": SFTConfig, "train-rm": RMConfig, "ppo": PPOConfig}
#: `rlhf pipeline` and `rlhf bench` read schemas of their own (not a stage's); listed here so config checks cover them
CONFIG_SCHEMAS: dict[str, type[Section]] = {**STAGE_SCHEMAS, "pipeline": PipelineConfig, "bench": BenchConfig}


# --------------------------------------------------------------------------------------------- paths
def _path_kind(field_info: Any) -> str | None:
    for meta in getattr(field_info, "metadata", ()):
        if isinstance(meta, PathKind):
            return meta.kind
    # Optional[...] / unions keep the marker on the inner Annotated type
    annotation = getattr(field_info, "annotation", None)
    for arg in getattr(annotation, "__args__", ()) or ():
        for meta in getattr(arg, "__metadata__", ()):
            if isinstance(meta, PathKind):
                return meta.kind
        for inner in getattr(arg, "__args__", ()) or ():  # list[HubOrPath]
            for meta in getattr(inner, "__metadata__", ()):
                if isinstance(meta, PathKind):
                    return meta.kind
    return None


#: what a Hugging Face hub id looks like: NAME or OWNER/NAME, each of letters, digits, `_`, `.` and `-`, starting
#: with a letter, digit or `_`
HUB_ID = re.compile(r"\w[\w.-]*(/\w[\w.-]*)?")


def could_be_hub_id(value: str) -> bool:
    """Whether a model/tokenizer value may name a hub repository (`HUB_ID`, without one of FILE_SUFFIXES); any
    other value can only be a local path: `./x`, `../x`, `/x`, `~/x`, `.`, a trailing `/`, more than one `/`, a
    space, `x.jsonl`.

    >>> [could_be_hub_id(v) for v in ("gpt2", "Qwen/Qwen2.5-0.5B", "outputs/sft", "runs/demo/sft", "./sft", "sft/")]
    [True, True, True, False, False, False]
    """
    return HUB_ID.fullmatch(value) is not None and not value.endswith(FILE_SUFFIXES)


def resolve_one(value: str, kind: str, base: Path, key: str) -> str:
    """Resolve one path value. Relative paths are taken against `base`; inputs must exist.

    hub_or_path: a name that exists under `base`, or that can be no hub id (`could_be_hub_id`: `./x`, `/x`, more
    than one `/`, a file suffix, ...) is a local path (and must exist); anything else (e.g. `Qwen/Qwen2.5-0.5B`)
    is returned unchanged as a hub id.
    """
    if not value.strip():  # `--set output_dir=$DIR` with DIR unset would otherwise mean the current folder
        raise ConfigError(f"{key}: empty path")
    if kind == "hub_or_path":
        candidate = (base / Path(value).expanduser()).resolve()
        if could_be_hub_id(value) and not candidate.exists():
            return value  # a hub id
        if not candidate.exists():
            raise ConfigError(f"{key}: path does not exist: {candidate}")
        return str(candidate)
    resolved = (base / Path(value).expanduser()).resolve()
    if kind == "input" and not resolved.exists():
        raise ConfigError(f"{key}: file does not exist: {resolved}")
    return str(resolved)


def file_in_the_way(path: Path) -> Path | None:
    """The file that keeps folder `path` from being made or used: `path` itself or the nearest existing folder
    above it, when that is no directory; None when nothing is in the way."""
    found = next((folder for folder in (path, *path.parents) if folder.exists()), None)
    return found if found is not None and not found.is_dir() else None


def refuse_file(path: Path, what: str = "output_dir") -> None:
    """A file where a folder must go — at `path`, or at a folder above it, which would make it impossible to
    create (`file_in_the_way`) — is a ConfigError naming it."""
    blocked = file_in_the_way(path)
    if blocked is not None:
        raise ConfigError(f"{what} {path} is a file, not a directory" if blocked == path else
                          f"{what} {path}: {blocked} is a file, not a directory")


def output_file(given: str | None, example: str) -> Path | None:
    """The file an `--out` option names (None: not given), checked before any work: a path naming a folder is a
    ConfigError — an existing folder, or one written with a trailing "/" (pathlib drops it, so a file named like
    the folder would be written) — as is a file where a folder above it must go. `example`: the file name
    suggested in the folder."""
    if given is None:
        return None
    path = Path(given).expanduser()
    if path.is_dir() or given.endswith(("/", os.sep)):
        kind = "is" if path.is_dir() else "names"
        raise ConfigError(f"--out {given} {kind} a directory; give the file to write (e.g. {path / example})")
    blocked = file_in_the_way(path.parent)
    if blocked is not None:
        raise ConfigError(f"--out {given}: {blocked} is a file, not a directory")
    return path


def refuse_unreadable_data(value: str, key: str) -> None:
    """A data source that is a local path (one that exists) must be a file of a type the run reads
    (LOCAL_SUFFIXES, any case): a folder, a .gz or a file without a suffix is a ConfigError naming the key, as a
    missing file is, rather than a data error once the run is under way."""
    path = Path(value)
    if not path.is_absolute() or not path.exists():
        return  # a hub dataset name (resolve_one leaves it as given)
    if path.is_file() and path.suffix.lower() in LOCAL_SUFFIXES:
        return
    what = "a folder" if path.is_dir() else f"a {path.suffix} file" if path.suffix else "a file without a suffix"
    raise ConfigError(f"{key}: {path} is {what}; local data must be {', '.join(LOCAL_SUFFIXES)} file(s) (a list of "
                      "them for several), or give a hub dataset name")


def _walk(model: BaseModel, prefix: str) -> Iterator[tuple[BaseModel, str, str, str]]:
    """Yield (owner, field name, dotted key, kind) for every path field in a config tree."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from _walk(value, key + ".")
            continue
        kind = _path_kind(info)
        if kind is not None and value is not None and not isinstance(value, dict):
            yield model, name, key, kind


def _section(info: Any) -> type[BaseModel] | None:
    """The section class a field holds (through Optional / unions), or None for a leaf."""
    annotation = getattr(info, "annotation", None)
    inner = [a for a in (annotation, *getattr(annotation, "__args__", ()))
             if isinstance(a, type) and issubclass(a, BaseModel)]
    return inner[0] if inner else None


def field_at(schema: type[BaseModel], dotted: str) -> Any:
    """The pydantic FieldInfo at `dotted` in `schema` (through nested sections), or None."""
    *parents, last = dotted.split(".")
    for name in parents:
        schema = _section(schema.model_fields.get(name))  # type: ignore[assignment]
        if schema is None:
            return None
    return schema.model_fields.get(last)


def path_kind_at(schema: type[BaseModel], dotted: str) -> str | None:
    """The PathKind of the field at `dotted` in `schema` (through nested sections), or None. A section given
    in its short form, a path (`data.train=FILE` for a DataSource), has the kind of its `path` field."""
    info = field_at(schema, dotted)
    if info is None:
        return None
    short = _section(info)
    return _path_kind(short.model_fields["path"]) if short is not None and "path" in short.model_fields else _path_kind(info)


def is_default_at(schema: type[BaseModel], dotted: str, value: Any) -> bool:
    """Whether `value` is the default of the leaf field at `dotted` (a key a newer rlhf added is "unset" in an
    older run's resolved config; at its default it changes nothing)."""
    info = field_at(schema, dotted)
    if info is None or info.is_required():
        return False
    default = info.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        default = default.model_dump(mode="json")
    elif isinstance(default, tuple):  # YAML (a resolved config) holds a tuple as a list
        default = list(default)
    return (list(value) if isinstance(value, tuple) else value) == default


def _absolute_path(value: str, kind: str | None, base: Path) -> str:
    """A relative path value of a path key (`kind`) made absolute against `base`; a hub id (hub_or_path, not
    path-like, not under `base`) and anything else as it is."""
    path = Path(value.strip()).expanduser()
    if kind is not None and value.strip() and not path.is_absolute() and (
            kind != "hub_or_path" or not could_be_hub_id(value.strip()) or (base / path).exists()):
        return str((base / path).resolve())
    return value


def _absolute_paths_in(value: Any, key: str, schema: type[BaseModel], base: Path) -> Any:
    """A parsed YAML value given at `key` with `_absolute_path` applied to each string in it: a list item by
    item (at the list's key), a mapping key by key (`key.name`)."""
    if isinstance(value, str):
        return _absolute_path(value, path_kind_at(schema, key), base)
    if isinstance(value, list):
        return [_absolute_paths_in(v, key, schema, base) for v in value]
    if isinstance(value, dict):
        return {k: _absolute_paths_in(v, f"{key}.{k}", schema, base) for k, v in value.items()}
    return value


def absolute_set_items(items: list[str], schema: type[BaseModel], base: Path) -> list[str]:
    """`key=value` overrides (a pipeline stage's `set:`) with each relative path value of a path key of `schema`
    made absolute against `base` (the pipeline file's folder), so the stage resolves it as the pipeline file
    meant rather than against the current directory; also inside a YAML list or mapping value
    (`data.train=[a.jsonl, b.jsonl]`, `data.train={path: a.jsonl, split: train}`). A hub id (hub_or_path, not
    path-like, not under `base`) and everything else are left as they are."""
    import yaml

    from stages.yamlio import dump_yaml, load_yaml

    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            out.append(item)
            continue
        parsed: Any = None
        if value.strip()[:1] in ("[", "{"):
            try:
                parsed = load_yaml(value)
            except yaml.YAMLError:
                parsed = None  # the stage's own parsing names it
        if isinstance(parsed, (list, dict)):
            made = _absolute_paths_in(parsed, key.strip(), schema, base)
            if made != parsed:
                item = f"{key}={dump_yaml(made, default_flow_style=True, width=2**31).strip()}"
        else:
            item = f"{key}={_absolute_path(value, path_kind_at(schema, key.strip()), base)}"
        out.append(item)
    return out


def cli_marker(key: str, flags: dict[str, str] | None) -> str:
    """How a key given on the command line was given: its flag ("--kl-coef") or --set.

    >>> cli_marker("ppo.kl_coef", {"ppo.kl_coef": "--kl-coef"}), cli_marker("train.lr", None)
    ('--kl-coef', '--set')
    """
    return (flags or {}).get(key, "--set")


def resolve_paths(config: BaseModel, base_dir: Path, cli_keys: set[str], cwd: Path,
                  not_yet: set[str] = frozenset(),  # type: ignore[assignment]
                  flags: dict[str, str] | None = None) -> None:
    """Make every relative path in `config` absolute, in place, and check that input paths exist.

    Values given in the YAML file resolve against `base_dir` (the file's folder); values given with
    `--set` (their dotted keys are in `cli_keys`) resolve against `cwd`, and their errors end in
    "[given with --set]". Keys in `not_yet` are outputs of an earlier stage that does not exist yet
    (`rlhf pipeline --dry-run`): resolved, not checked.
    """
    for owner, name, key, kind in list(_walk(config, "")):
        given = [k for k in cli_keys if key == k or key.startswith(k + ".")]
        from_cli = bool(given)
        base = cwd if from_cli else base_dir
        # an earlier stage's output not made yet is resolved as an output: not checked to exist
        as_kind = "output" if key in not_yet or any(key.startswith(k + ".") for k in not_yet) else kind
        value = getattr(owner, name)
        try:
            if isinstance(value, list):
                resolved: Any = [resolve_one(v, as_kind, base, f"{key}[{i}]") for i, v in enumerate(value)]
            else:
                resolved = resolve_one(value, as_kind, base, key)
            if kind == "output":  # (an output_dir: a folder to be made)
                refuse_file(Path(resolved), key)
            if isinstance(owner, DataSource):
                for i, one in enumerate(resolved if isinstance(resolved, list) else [resolved]):
                    refuse_unreadable_data(one, f"{key}[{i}]" if isinstance(resolved, list) else key)
        except ConfigError as exc:  # marked like a validation error at a key given on the command line
            if not from_cli:
                raise
            raise ConfigError(f"{exc} [given with {cli_marker(max(given, key=len), flags)}]") from None
        # bypass validate_assignment: the value type is unchanged
        object.__setattr__(owner, name, resolved)

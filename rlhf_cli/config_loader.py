"""YAML loading, `--set key.path=value` overrides, validation against the stage's schema, and error messages.

Precedence: schema defaults < YAML file < `--set` overrides (applied left to right).
Any problem raises `ConfigError` (exit code 2) with one message naming the key path.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
from pathlib import Path
from typing import Any, Iterable, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from stages.config import (CONFIG_SCHEMAS, STAGE_SCHEMAS, STRUCTURE_ONLY, DataSource, Section, absolute_set_items,
                           cli_marker, resolve_paths)
from stages.errors import ConfigError
from stages.yamlio import dump_yaml, load_yaml


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; a syntax error names `source`, the line and column, and what was being read (PyYAML's
    own text says `in "<unicode string>"`, naming nothing)."""
    try:
        return load_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        context = exc.context_mark
        during = f" ({exc.context} from line {context.line + 1})" if exc.context and context is not None else ""
        raise ConfigError(f"{source}{where}: invalid YAML: {exc.problem}{during}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None


def read_user_text(path: Path, what: str) -> str:
    """A text file the user names, UTF-8; unreadable, or in another encoding (a file saved as cp1252, say), is
    a ConfigError naming it rather than a traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start:exc.start + 1]
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {bad!r}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None


def load_yaml_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory (give the YAML file in it)")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = parse_yaml(read_user_text(path, "config file"), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003). The value is parsed as YAML (`null`, `[1, 2]`, `{a: 1}`)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key.path=value, got {item!r}")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"--set {item!r}: empty component in key path {key!r}")
    if not raw.strip():
        return parts, ""
    try:
        return parts, parse_yaml(raw, f"--set {key}")
    except ConfigError as exc:  # a text value with YAML syntax in it: `{{ messages }}`, `a: b: c`
        raise ConfigError(f"{exc}\n(a --set value is read as YAML; quote a text value: --set '{key}=\"...\"')") from None


def replaced_stage_sets(config_path: Path, overrides: list[str]) -> list[str]:
    """A pipeline `--set sft.set=[...]` (rm, ppo) replaces the file's whole list, like every --set of a list:
    a line for each that drops items the file gave, naming them (so a run does not lose `train.max_steps=60`
    unseen)."""
    data = load_yaml_file(Path(config_path).expanduser())
    notes = []
    for item in overrides:
        parts, value = parse_override(item)
        section = data.get(parts[0]) if len(parts) == 2 and parts[1] == "set" else None
        before = section.get("set") if isinstance(section, dict) else None
        if not isinstance(before, list):
            continue
        dropped = [x for x in before if x not in (value if isinstance(value, list) else [value])]
        if dropped:
            notes.append(f"--set {parts[0]}.set replaces the file's {parts[0]}.set, dropping {', '.join(map(str, dropped))} "
                         "(list them too to keep them)")
    return notes


def _is_data_source(key: str) -> bool:
    """Whether a dotted key names a data source (data.train, data.eval, data.ptx) in some stage's schema."""
    section, _, name = key.partition(".")
    return section == "data" and name in ("train", "eval", "ptx")


def apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set `data[parts[0]][parts[1]]... = value`, creating mappings on the way. A data source given in its
    short form (`train: file.jsonl`) is expanded to `{path: file.jsonl}` when a sub-key is set."""
    node = data
    for i, part in enumerate(parts[:-1]):
        child, where = node.get(part), ".".join(parts[: i + 1])
        short_source = isinstance(child, (str, list)) and _is_data_source(where)
        if child is None:
            child = node[part] = {}
        elif short_source and parts[i + 1] in DataSource.model_fields:
            child = node[part] = {"path": child}
        elif not isinstance(child, dict):
            source = f" (a data source's keys: {', '.join(DataSource.model_fields)})" if short_source else ""
            raise ConfigError(f"--set {'.'.join(parts)}: {where} is a {type(child).__name__}, not a mapping{source}")
        node = child
    node[parts[-1]] = value


def _schema_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the location `loc` (to suggest sibling keys)."""
    current: Any = schema
    for part in loc:
        if isinstance(part, int):  # an item of a list of sections (ppo_runs[0])
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(str(part))
        if info is None:
            return None
        current = _unwrap_model(info.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


_TYPE_LABELS = {"str", "int", "float", "bool", "list", "dict", "tuple", "none", "list[str]", "dict[str,any]"}


def _clean_loc(schema: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """pydantic's error location without the labels it adds for union members (`str`, `list[str]`,
    `function-after[...]`, a section class name, ...): field names, unknown keys and list indexes remain. Labels
    follow only a field whose type is a union of two or more types (`deepspeed.config`: a file or a mapping; an
    optional section or a list of sections gets none); a key right under a section is a field or an unknown
    key, whatever its name (`none`, `list`, `x[0]`)."""
    out: list[Any] = []
    current: Any = schema
    labelled = False  # whether union labels may come next
    for part in loc:
        if isinstance(part, int):
            out.append(part)
            continue
        is_model = isinstance(current, type) and issubclass(current, BaseModel)
        is_label = "[" in part or part.startswith("function-") or part in _TYPE_LABELS or (
            is_model and part == current.__name__)
        if is_model and part in current.model_fields:
            out.append(part)
            annotation = current.model_fields[part].annotation
            current = _unwrap_model(annotation)
            labelled = get_origin(annotation) in (Union, types.UnionType) and \
                len([a for a in get_args(annotation) if a is not type(None)]) > 1
        elif labelled and is_label:
            continue  # a union member's label
        else:
            out.append(part)  # an unknown key, or a key of a free-form mapping
            current, labelled = None, False
    return tuple(out)


def _keys_named(schema: type[BaseModel], name: str, prefix: str = "") -> list[str]:
    """Dotted keys of every field called `name` in `schema` and its sections, in schema order."""
    found = []
    for field, info in schema.model_fields.items():
        key = f"{prefix}{field}"
        if field == name:
            found.append(key)
        if _is_section(info):
            found += _keys_named(_unwrap_model(info.annotation), name, f"{key}.")
    return found


def _is_section(info: Any) -> bool:
    """Whether a field (pydantic FieldInfo) holds a section: a model of its own keys."""
    inner = _unwrap_model(info.annotation)
    return isinstance(inner, type) and issubclass(inner, BaseModel)


#: keys as other RLHF tools name them (HF Trainer / TRL, OpenRLHF, DeepSpeed-Chat) -> ours: a leaf name (looked
#: for in the key's own section first, then anywhere), a dotted key, or a dotted key=value. Every one the
#: config's schema has is suggested: `train.learning_rate` is 'train.lr' for SFT and RM, 'train.policy_lr' or
#: 'train.critic_lr' for PPO (TRL's one learning rate is both). TRL's num_train_epochs (passes over the prompts)
#: has no PPO counterpart (train.iterations counts rollouts); OpenRLHF's max_epochs is PPO's ppo_epochs.
OTHER_TOOLS_NAMES: dict[str, tuple[str, ...]] = {
    "learning_rate": ("lr", "policy_lr", "critic_lr"),
    **dict.fromkeys(("actor_learning_rate", "actor_lr"), ("policy_lr",)),
    "critic_learning_rate": ("critic_lr",),
    "lr": ("policy_lr", "critic_lr"),
    "num_train_epochs": ("epochs",),
    "max_epochs": ("epochs", "ppo_epochs"),
    "num_ppo_epochs": ("ppo_epochs",),
    **dict.fromkeys(("per_device_train_batch_size", "micro_train_batch_size", "train_micro_batch_size_per_gpu"),
                    ("micro_batch_size",)),
    "per_device_eval_batch_size": ("eval_micro_batch_size",),
    **dict.fromkeys(("max_grad_norm", "max_norm", "gradient_clip_val"), ("gradient_clipping", "grad_clip")),
    "lr_scheduler_type": ("lr_scheduler",),
    "lr_warmup_ratio": ("warmup_ratio",),
    "num_warmup_steps": ("warmup_steps",),
    "l2": ("weight_decay",),
    "logging_steps": ("log_every",),
    "save_steps": ("save_every",),
    "eval_steps": ("eval_every",),
    **dict.fromkeys(("init_kl_coef", "kl_ctl"), ("kl_coef",)),
    **dict.fromkeys(("cliprange", "clip_range", "eps_clip"), ("policy_clip",)),
    **dict.fromkeys(("cliprange_value", "clip_range_vf"), ("value_clip",)),
    **dict.fromkeys(("clip_reward_value", "cliprange_reward"), ("reward_clip",)),
    "normalize_reward": ("reward_norm",),
    **dict.fromkeys(("gae_lambda", "lambda"), ("lam",)),
    "ent_coef": ("entropy_coef",),
    **dict.fromkeys(("response_length", "generate_max_len", "max_answer_seq_len"), ("max_new_tokens", "new_tokens")),
    **dict.fromkeys(("prompt_max_len", "max_prompt_seq_len"), ("max_prompt_length", "prompt_length")),
    **dict.fromkeys(("max_seq_length", "max_seq_len", "max_len"), ("max_length",)),
    "bf16": ("deepspeed.precision=bf16",),
    "fp16": ("deepspeed.precision=fp16",),
    **dict.fromkeys(("pretrain", "model_name_or_path", "actor_model_name_or_path"), ("model.name_or_path",)),
    **dict.fromkeys(("reward_pretrain", "reward_model_path", "reward_model_name_or_path"),
                    ("reward_model.name_or_path",)),
}


def _our_name_for(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys of `schema` that OTHER_TOOLS_NAMES gives for the unknown key at `loc`: for a leaf name, those in
    the key's own section when it has one, else every section's; [] when the name is not one of that table's."""
    found: list[str] = []
    for ours in OTHER_TOOLS_NAMES.get(str(loc[-1]), ()):
        if "." in ours:  # a dotted key, maybe with the value that means the same ("deepspeed.precision: bf16")
            key, _, value = ours.partition("=")
            found += [f"{key}: {value}" if value else key] if _field_at(schema, tuple(key.split("."))) is not None else []
        else:
            named = _keys_named(schema, ours)
            found += [k for k in named if k == _key((*loc[:-1], ours))] or named
    return list(dict.fromkeys(found))


def _closest_key(name: str, valid: list[str], sections: Iterable[str] = ()) -> str | None:
    """A valid key near `name` (a typo), or None when none is near (a far one would be noise beside the listing
    of valid keys): a key spelt almost alike (difflib's ratio >= 0.8: `prompt` -> prompts); else the nearest of
    the keys made of a subset or superset of its `_`-separated words, sharing at least half of them, with a ratio
    >= 0.4, not `sections` (`lr_rate` -> lr, not the longer look-alike min_lr_ratio; `reward_model_path` is not
    `model`, nor `eval_steps` the pipeline's `eval`); else the nearest with a ratio >= 0.6."""
    alike = difflib.get_close_matches(name, valid, n=1, cutoff=0.8)
    words = set(name.split("_"))

    def related(key: str) -> bool:
        theirs = set(key.split("_"))
        return key not in sections and (theirs <= words or words <= theirs) and 2 * len(words & theirs) >= len(words)

    close = alike or difflib.get_close_matches(name, [v for v in valid if related(v)], n=1, cutoff=0.4) or \
        difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return close[0] if close else None


def _spelt_out(name: str) -> str:
    """A regex for a key's name as a message may write it: its words joined by `_` or a space, a leading `num`
    also as "number of" (transformers: num_attention_heads -> "the number of attention heads").

    >>> bool(re.search(_spelt_out("num_attention_heads"), "the number of attention heads (7)"))
    True
    """
    words = [re.escape(w) for w in name.split("_")]
    if words[0] == "num":
        words[0] = "(?:num|number[_ ]of)"
    return r"\b" + r"[_ ]".join(words) + r"\b"


def _field_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """pydantic's FieldInfo of the key at `loc`, None when it names none (a list index, a free-form mapping)."""
    owner = _schema_at(schema, loc[:-1]) if loc else None
    return owner.model_fields.get(str(loc[-1])) if owner is not None else None


def _key(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _format_error(schema: type[BaseModel], err: dict[str, Any], set_below: str | None = None) -> str:
    """One problem's line. `set_below`: a --set key under this one (`model.name_or_path.split`), which made a
    mapping of the value a text was expected for: said so, instead of the hint to quote a YAML-looking text."""
    loc = _clean_loc(schema, tuple(err["loc"]))
    key = _key(loc)
    if err["type"] == "extra_forbidden":
        owner = _schema_at(schema, loc[:-1])
        valid = list(owner.model_fields) if owner is not None else []
        # the same name in another section (`train.log_every`: logging's); else a close valid key (a typo); a
        # far one would be noise beside the listing of valid keys
        elsewhere = [k for k in _keys_named(schema, str(loc[-1])) if k != key]
        ours = _our_name_for(schema, loc)
        sections = [k for k in valid if _is_section(owner.model_fields[k])] if owner is not None else []
        close = _closest_key(str(loc[-1]), valid, sections)
        hint = (f"; it is a key of another section: {', '.join(repr(k) for k in elsewhere)}" if elsewhere else
                f"; rlhf calls it {' or '.join(repr(k) for k in ours)}" if ours else
                f"; closest valid key: '{_key((*loc[:-1], close))}'" if close else "")
        listing = f" (valid here: {', '.join(valid)})" if valid else ""
        if "[" in str(loc[-1]):  # `--set 'ppo_runs[0].seed=1'`: a list is given whole
            listing += "; a list item cannot be set on its own: give the whole list (--set 'key=[...]')"
        return f"unknown key '{key}'{hint}{listing}"
    if err["type"] == "missing":
        if loc and isinstance(loc[-1], int):
            return f"{_key(loc[:-1])}: too few items (nothing at index {loc[-1]})"
        return f"missing required key '{key}'"
    msg = re.sub(r"a valid dictionary or instance of \w+", "a mapping of its keys", err["msg"].removeprefix("Value error, "))
    got = err.get("input")
    shown = "" if isinstance(got, (dict, BaseModel)) or got is None else f" (got {got!r})"
    field = _field_at(schema, loc)
    if got is None and "input" in err and field is not None:  # `key:` with no value, or `key: null`
        shown = " (got null: give it a value)" if field.is_required() else " (got null: leave the key out for its default)"
    if got is False and field is not None and type(None) in (getattr(field.annotation, "__args__", ()) or ()):
        shown += "; null turns it off"  # `gold_reward: no` meant "off"
    if err["type"] == "string_type" and isinstance(got, (dict, list)):  # `a: b`, `[x]` read as YAML
        kind = "a mapping" if isinstance(got, dict) else "a list"
        shown = f" (got {kind}: a text with ': ', braces or brackets is read as YAML; quote it)"
        if set_below is not None and isinstance(got, dict):
            shown = f" (got a mapping: --set {set_below}=... gives it a sub-key; set the text itself: --set {key}=...)"
    return f"{msg}{shown}" if not loc else f"{key}: {msg}{shown}"  # (a check across sections names its keys)


def format_validation_error(schema: type[BaseModel], exc: ValidationError, source: str,
                            cli_keys: Iterable[str] = frozenset(), flags: dict[str, str] | None = None) -> str:
    """One line per problem. A union field reports one error per alternative; those are joined into one line
    ("deepspeed.config: Input should be a valid string, or a valid dictionary (got 5)"). A problem at a key set
    (or under a section set) on the command line says so: "[given with --set]", or with the flag that set it
    (`flags`: key -> "--kl-coef"); the file does not hold that value."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for e in exc.errors():
        by_key.setdefault(_key(_clean_loc(schema, tuple(e["loc"]))), []).append(e)
    # a value that fits none of a union's members: when one member got further (a deeper key, or a message
    # other than a plain type mismatch), its error is the informative one
    for key in list(by_key):
        errs = by_key[key]
        plain = [e for e in errs if e["msg"].startswith("Input should be a valid")]
        deeper = any(k != key and (k.startswith(key + "[") or k.startswith(key + ".")) for k in by_key)
        if plain and (deeper or len(plain) < len(errs)):
            by_key[key] = [e for e in errs if e not in plain]
            if not by_key[key]:
                del by_key[key]
    def marker(key: str, line: str, kind: str) -> str:
        """[given with ...] for a key at or above `key` given on the command line, or below it for a wrong type
        or an unknown key (`--set trian.lr=1` makes the mapping `trian`); for a check across keys (a section's
        or the whole config's), one its message names: in full, or by its own name inside the section, as
        prose may spell it (`_spelt_out`: "The hidden size (130) ..." for --set model.from_config.hidden_size). Not for a key the
        listing of valid keys names: that it was given does not make an unknown key a command-line one. Every
        option that gave one of them is named ("[given with --max-new-tokens, --set]"), a key's rather than its
        section's when both were given."""
        given = [k for k in cli_keys if key == k or key.startswith((k + ".", k + "["))
                 or (kind.endswith("_type") and k.startswith(key + "."))  # its sub-key made `key` a mapping
                 or (kind == "extra_forbidden" and k.startswith(key + "."))]  # `trian.lr=1` made `trian`
        if not given and kind not in ("extra_forbidden", "missing"):
            given = [k for k in cli_keys if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", line)
                     or (k.startswith(key + ".") and re.search(_spelt_out(k.rsplit(".", 1)[-1]), line))]
        # a section given whole beside a key inside it: the key's option (the more specific) is named
        given = [k for k in given if not any(o.startswith((k + ".", k + "[")) for o in given)]
        named = dict.fromkeys(cli_marker(k, flags) for k in given)
        return f" [given with {', '.join(named)}]" if given else ""

    unique: list[str] = []
    for key, errs in by_key.items():
        below = min((k for k in cli_keys if k.startswith(key + ".")), default=None, key=len)
        if len(errs) > 1 and all(e["msg"].startswith("Input should be ") for e in errs):
            expected = dict.fromkeys(e["msg"].removeprefix("Input should be ") for e in errs)
            merged = {**errs[0], "msg": "Input should be " + ", or ".join(expected)}
            lines = [_format_error(schema, merged, below)]
        else:
            lines = list(dict.fromkeys(_format_error(schema, e, below) for e in errs))
        unique.extend(line + marker(key, line, errs[0]["type"]) for line in lines)
    head = f"invalid config {source}:"
    return head + ("\n  " + "\n  ".join(unique) if len(unique) > 1 else " " + unique[0])


def other_command_hint(stage: str, data: Any) -> str:
    """A line saying which other command's config `data` is, when it validates as one (`rlhf sft -c rm.yaml`:
    its loss section and data.duplicates are unknown to SFT); "" otherwise."""
    for other in (*STAGE_SCHEMAS, "pipeline"):
        if other == stage:
            continue
        try:
            CONFIG_SCHEMAS[other].model_validate(data, context=STRUCTURE_ONLY)
        except ValidationError:
            continue
        return f"\n  (the file is a valid `rlhf {other}` config: is that the command you meant?)"
    return ""


def load_config(
    stage: str,
    config_path: Path,
    overrides: list[str] | None = None,
    cwd: Path | None = None,
    preset: str | None = None,
    not_yet: set[str] = frozenset(),  # type: ignore[assignment]
    flags: dict[str, str] | None = None,
    architecture: bool = True,
) -> Section:
    """Read, override, validate and path-resolve the config for `stage`. For `ppo`, the preset (the command
    line's `preset`, else the file's `ppo.preset`) then fills the trick keys left unset.

    `not_yet`: path keys that name an earlier stage's output still to be produced (not checked to exist).
    `flags`: the override keys a command-line flag gave (key -> "--kl-coef"), named in their errors.
    `architecture`: False leaves a from_config architecture unchecked (it imports transformers: seconds), for a
    caller that checks it later (the pipeline's first pass over all its stages, `rlhf bench`'s ppo: section).
    Returns the validated pydantic model; raises ConfigError with a one-line (or one-per-problem) message.
    """
    schema = CONFIG_SCHEMAS[stage]
    config_path = Path(config_path).expanduser().resolve()
    data = load_yaml_file(config_path)
    cli_keys: set[str] = set()
    for item in overrides or []:
        parts, value = parse_override(item)
        apply_override(data, parts, value)
        cli_keys.add(".".join(parts))
    given = data  # as the file and the overrides give it (for other_command_hint)
    if stage == "ppo" and preset is not None and "ppo.preset" in cli_keys and data["ppo"]["preset"] != preset:
        # (the preset option wins over the file's ppo.preset; over a --set beside it, it would win unseen)
        raise ConfigError(f"--set ppo.preset={data['ppo']['preset']} contradicts --preset {preset} (or --ppo-max); "
                          "give one of them")
    if stage == "ppo":
        from stages.ppo.presets import fill_preset

        given = copy.deepcopy(data)

        try:
            fill_preset(data, preset)
        except ValueError as exc:
            raise ConfigError(f"invalid config {config_path}: ppo.preset: {exc}") from None
    here = (cwd or Path.cwd()).resolve()
    try:  # every other problem first, its paths included (`STRUCTURE_ONLY`), then from_config's architecture
        structure = schema.model_validate(data, context=STRUCTURE_ONLY)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(schema, exc, str(config_path), cli_keys, flags)
                          + other_command_hint(stage, given)) from None
    resolve_paths(structure, config_path.parent, cli_keys, here, not_yet, flags)
    config = structure
    if architecture:
        try:
            config = schema.model_validate(data)
        except ValidationError as exc:  # (no other command's config takes an architecture its class refuses)
            raise ConfigError(format_validation_error(schema, exc, str(config_path), cli_keys, flags)) from None
        resolve_paths(config, config_path.parent, cli_keys, here, not_yet, flags)
    if stage == "pipeline":  # the stages' set: paths, relative to the pipeline file like its other paths (to the
        # current directory when that set: was given with --set, like every other --set path)
        stages = [(config.sft, "sft", "sft"), (config.rm, "train-rm", "rm"), (config.ppo, "ppo", "ppo")] + [
            (r, "ppo", f"ppo_runs[{i}]") for i, r in enumerate(config.ppo_runs)]
        for section, name, key in stages:
            given = any(k in (key, f"{key}.set", key.split("[")[0]) or k.startswith(f"{key}.set[") for k in cli_keys)
            base = here if given else config_path.parent
            object.__setattr__(section, "set", absolute_set_items(section.set, CONFIG_SCHEMAS[name], base))
    return config


def derived_values(config: BaseModel) -> list[str]:
    """The keys a stage config leaves null (`dump_config` writes them so) whose value the run derives from
    other keys, each with that value: SFT/RM data.max_prompt_length (max_length // 2) and
    train.eval_micro_batch_size, PPO train.forward_batch_size (micro_batch_size)."""
    data, train = getattr(config, "data", None), getattr(config, "train", None)
    found = []
    if data is not None and "max_prompt_length" in type(data).model_fields and data.max_prompt_length is None:
        found.append(f"data.max_prompt_length {data.prompt_budget} (max_length // 2)")
    for key in ("eval_micro_batch_size", "forward_batch_size"):
        if train is not None and key in type(train).model_fields and getattr(train, key) is None:
            found.append(f"train.{key} {train.micro_batch_size} (micro_batch_size)")
    return found


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML (what is printed at start and saved as resolved_config.yaml)."""
    body = config.model_dump(mode="json")
    first = [k for k in ("seed", "output_dir", "model", "reward_model", "data", "loss", "ppo") if k in body]  # then the schema's own order
    ordered = {k: body[k] for k in first} | {k: v for k, v in body.items() if k not in first}
    return dump_yaml(ordered, sort_keys=False, default_flow_style=False, width=110)

"""How each stage turned its rows into text, and the check that PPO renders prompts as SFT and the RM were trained.

Rows become text in one of three styles:

    chat    through the tokenizer's chat template (messages rows; prompt/hh rows with data.use_chat_template)
    raw_pr  a plain prompt string followed directly by the response (prompt/response rows, prompt rows)
    raw_hh  HH-RLHF text: "\\n\\nHuman: ...\\n\\nAssistant:" turns as written

SFT and the reward model record the styles of their training rows and a sha256 of the chat template they
rendered with in their checkpoints' rlhf_checkpoint.json (`rendering_record`). PPO compares its prompts' styles
and its chat template with both records (`rendering_mismatches`): a policy fine-tuned on chat-template
conversations but given raw prompts (or the reverse), or a reward model that read another template, is a
silent failure peers' users report often (the policy answers off-distribution, the RM scores text it never saw).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable

from stages.errors import CheckpointError, ConfigError

#: the rendering styles (Conversation.style, PreferencePair.style, PPO prompts)
CHAT, RAW_PR, RAW_HH = "chat", "raw_pr", "raw_hh"

#: style -> how a message describes it
STYLE_NAMES = {
    CHAT: "chat-template conversations",
    RAW_PR: "plain prompt text",
    RAW_HH: "HH-RLHF 'Human:/Assistant:' text",
}


def template_digest(tokenizer: Any) -> str | None:
    """sha256 of the tokenizer's chat template; None without one. Of named templates (a dict) the "default" one
    alone is hashed when it is the only one (transformers saves a lone template as {"default": X} and may load
    it back as X), else all of them as sorted JSON."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict) and set(template) == {"default"}:
        template = template["default"]
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def rendering_record(styles: Iterable[str], tokenizer: Any, add_eos: bool | None = None,
                     content_special_tokens: str | None = None) -> dict[str, Any]:
    """{"styles": sorted styles used, "chat_template_sha256": digest when chat was used, else None}, and
    "add_eos" (data.add_eos: did each training row end with EOS) and, when chat was used,
    "content_special_tokens" (data.content_special_tokens: how a message's special-token strings were read)
    when given."""
    used = sorted(set(styles))
    record = {"styles": used, "chat_template_sha256": template_digest(tokenizer) if CHAT in used else None}
    record |= {"add_eos": add_eos} if add_eos is not None else {}
    return record | ({"content_special_tokens": content_special_tokens}
                     if content_special_tokens is not None and CHAT in used else {})


def data_rendering(styles: Iterable[str], tokenizer: Any, data: Any) -> dict[str, Any]:
    """The rendering record of SFT or RM rows read in `styles` with `data` (their data section): its add_eos and
    content_special_tokens go with it."""
    return rendering_record(styles, tokenizer, data.add_eos, data.content_special_tokens)


def read_rendering(model_dir: str) -> dict[str, Any] | None:
    """The rendering record in `model_dir/rlhf_checkpoint.json`; None for a model no rlhf stage wrote (a hub
    model, no such file) or one from before records existed (no "rendering"). A file that is there but cannot be
    read or parsed is a CheckpointError, not a silently skipped check."""
    path = Path(model_dir) / "rlhf_checkpoint.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    record = meta.get("rendering") if isinstance(meta, dict) else None
    return record if isinstance(record, dict) and isinstance(record.get("styles"), list) else None


def trained_with_eos(model_dir: str | None, setting: bool | None = None,
                     warn: Callable[[str], None] | None = None) -> bool:
    """Whether the reward model's training rows ended with EOS: `setting` (data.rm_add_eos) when given, else its
    record's "add_eos"; True for a model without a record or one from before the record kept it (data.add_eos
    defaults to true). A setting its record contradicts is kept, with a warning through `warn`."""
    record = read_rendering(model_dir) if model_dir else None
    recorded = record.get("add_eos") if record is not None else None
    if setting is None:
        return recorded is not False
    if recorded is not None and recorded != setting and warn is not None:
        warn(f"warning: data.rm_add_eos: {str(setting).lower()}, but {model_dir} records that the reward model was "
             f"trained with data.add_eos: {str(recorded).lower()}; reading responses as data.rm_add_eos says")
    return setting


def _styles(styles: Iterable[str]) -> str:
    return " and ".join(STYLE_NAMES.get(s, s) for s in sorted(set(styles)))


def rendering_mismatches(styles: Iterable[str], tokenizer: Any, records: dict[str, dict[str, Any] | None],
                         reader: str = "PPO", content_special_tokens: str | None = None) -> list[str]:
    """One line per model whose record disagrees with the prompts `reader` (PPO, rlhf eval) renders in `styles`
    with `tokenizer`'s chat template; `records` maps a description ("policy (SFT) DIR") to its rendering record
    or None (not checked). A style the prompts use that the model was never trained on is a mismatch, and so is
    a chat template other than the one the model was trained with (when both use chat), and another reading of
    a message's special-token strings (`content_special_tokens`, when both use chat and both say).

    >>> class Tok: chat_template = "{{ messages }}"
    >>> rendering_mismatches({"raw_pr"}, Tok(), {"policy": {"styles": ["chat"], "chat_template_sha256": "x"}})
    ['policy was trained on chat-template conversations; PPO renders its prompts as plain prompt text']
    >>> rendering_mismatches({"chat"}, Tok(), {"rm": {"styles": ["chat"], "chat_template_sha256": "x"}, "p": None})
    ['rm was trained with another chat template than the one PPO renders its prompts with']
    """
    used = set(styles)
    digest = template_digest(tokenizer) if CHAT in used else None
    out = []
    for who, record in records.items():
        if record is None:
            continue
        trained = set(record["styles"])
        if not used <= trained:
            out.append(f"{who} was trained on {_styles(trained)}; {reader} renders its prompts as {_styles(used)}")
        elif CHAT in used and record.get("chat_template_sha256") not in (None, digest):
            out.append(f"{who} was trained with another chat template than the one {reader} renders its prompts with")
        elif CHAT in used and record.get("content_special_tokens") not in (None, content_special_tokens) and \
                content_special_tokens is not None:
            out.append(f"{who} was trained with data.content_special_tokens: {record['content_special_tokens']}; "
                       f"{reader} reads its prompts with {content_special_tokens}")
    return out


def check_rendering(mode: str, styles: set[str], tokenizer: Any, models: dict[str, str],
                    warn: Callable[[str], None], reader: str = "PPO", content_special_tokens: str | None = None
                    ) -> None:
    """`data.rendering_check` for prompts rendered in `styles` with `tokenizer`: `models` maps a description
    ("the policy (SFT)") to its resolved folder. error raises a ConfigError naming each difference, warn calls
    `warn` with them, off reads nothing."""
    if mode == "off":
        return
    records = {f"{what} {folder}": read_rendering(folder) for what, folder in models.items()}
    problems = rendering_mismatches(styles, tokenizer, records, reader, content_special_tokens)
    if not problems:
        return
    fix = ("render the prompts as the models were trained: data.use_chat_template (plain/HH prompts through the "
           "chat template), data.format, data.chat_template, or data.content_special_tokens")
    if RAW_PR in styles and any(RAW_HH in (r or {}).get("styles", ()) for r in records.values()):
        fix += ("; HH-RLHF text in a prompt column is read as HH with data.format: hh and data.columns.text naming "
                "that column")
    if mode == "error":
        raise ConfigError("data: " + "; ".join(problems) + f" ({fix}; data.rendering_check: warn to go on)")
    warn("warning: " + "; ".join(problems) + f" ({fix})")

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
from typing import Any, Iterable

#: style -> how a message describes it
STYLE_NAMES = {
    "chat": "chat-template conversations",
    "raw_pr": "plain prompt text",
    "raw_hh": "HH-RLHF 'Human:/Assistant:' text",
}


def template_digest(tokenizer: Any) -> str | None:
    """sha256 of the tokenizer's chat template (a dict of named templates as sorted JSON); None without one."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def rendering_record(styles: Iterable[str], tokenizer: Any) -> dict[str, Any]:
    """{"styles": sorted styles used, "chat_template_sha256": digest when chat was used, else None}."""
    used = sorted(set(styles))
    return {"styles": used, "chat_template_sha256": template_digest(tokenizer) if "chat" in used else None}


def read_rendering(model_dir: str) -> dict[str, Any] | None:
    """The rendering record in `model_dir/rlhf_checkpoint.json`; None for a model no rlhf stage wrote (a hub
    model, a checkpoint from before records existed) or an unreadable file."""
    try:
        meta = json.loads((Path(model_dir) / "rlhf_checkpoint.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    record = meta.get("rendering") if isinstance(meta, dict) else None
    return record if isinstance(record, dict) and isinstance(record.get("styles"), list) else None


def _styles(styles: Iterable[str]) -> str:
    return " and ".join(STYLE_NAMES.get(s, s) for s in sorted(set(styles)))


def rendering_mismatches(styles: Iterable[str], tokenizer: Any, records: dict[str, dict[str, Any] | None]) -> list[str]:
    """One line per model whose record disagrees with PPO's prompts: PPO renders in `styles` with `tokenizer`'s
    chat template; `records` maps a description ("policy (SFT) DIR") to its rendering record or None (not
    checked). A style PPO uses that the model was never trained on is a mismatch, and so is a chat template
    other than the one the model was trained with (when both use chat).

    >>> class Tok: chat_template = "{{ messages }}"
    >>> rendering_mismatches({"raw_pr"}, Tok(), {"policy": {"styles": ["chat"], "chat_template_sha256": "x"}})
    ['policy was trained on chat-template conversations; PPO renders its prompts as plain prompt text']
    >>> rendering_mismatches({"chat"}, Tok(), {"rm": {"styles": ["chat"], "chat_template_sha256": "x"}, "p": None})
    ['rm was trained with another chat template than the one PPO renders its prompts with']
    """
    used = set(styles)
    digest = template_digest(tokenizer) if "chat" in used else None
    out = []
    for who, record in records.items():
        if record is None:
            continue
        trained = set(record["styles"])
        if not used <= trained:
            out.append(f"{who} was trained on {_styles(trained)}; PPO renders its prompts as {_styles(used)}")
        elif "chat" in used and record.get("chat_template_sha256") not in (None, digest):
            out.append(f"{who} was trained with another chat template than the one PPO renders its prompts with")
    return out

"""Unit checks of stages/models.py: path resolution, the offline hub check, tokenizer defaults, what a loaded
model takes from its tokenizer, the kind / position checks (tiny models, CPU, no download)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from stages.config import ModelConfig
from stages.distributed import DistInfo
from stages.errors import CheckpointError, ConfigError
from stages.model_paths import resolve_model_dir
from stages.models import (
    PAD,
    auto_tokenizer_difference,
    build_causal_lm,
    check_architecture,
    check_positions,
    ensure_distinct_pad,
    hub_offline,
    load_tokenizer,
    not_local_hint,
    position_limit,
    prepare_tokenizer,
    stage_lengths,
    train_tokenizer,
    uncached_hub_model,
    with_eos,
    zero3_init_off,
)

from test_models import ARCH, TEXTS

DIST = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tok() -> Any:
    return train_tokenizer(TEXTS, vocab_size=320, min_frequency=2)


def _fresh_tok() -> Any:
    return train_tokenizer(TEXTS, vocab_size=320, min_frequency=2)


def _saved_model(tok: Any, path: Path, rows: int | None = None, **gen: Any) -> Path:
    model = build_causal_lm(ModelConfig(from_config=ARCH), tok, "fp32", {}, 7)
    if rows is not None:
        model.resize_token_embeddings(rows, mean_resizing=False)
    for key, value in gen.items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(path)
    return path


# --- resolve_model_dir / hints / offline hub check ---------------------------------------------------------------

def test_a_run_folder_with_only_its_resolved_config_is_an_unfinished_run(tmp_path) -> None:
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "resolved_config.yaml").write_text("")
    with pytest.raises(CheckpointError, match="a stage run without final/ \\(not finished"):
        resolve_model_dir(str(tmp_path / "cut"))


def test_a_home_relative_model_path_is_expanded_and_an_existing_local_path_is_kept(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model_dir("~/m") == str(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c").mkdir()
    (tmp_path / "a" / "b" / "c" / "config.json").write_text("{}")
    assert resolve_model_dir("a/b/c") == "a/b/c"  # no hub id, but it exists: a local folder


def test_the_hub_hint_is_only_for_a_name_that_is_no_local_path(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not_local_hint(str(tmp_path)) == ""
    assert not_local_hint("someone/model") == \
        " (no folder someone/model here: it was tried as a Hugging Face hub id with HF_HUB_OFFLINE=1)"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not_local_hint("someone/model") == " (no folder someone/model here: it was tried as a Hugging Face hub id)"


@pytest.mark.parametrize("value,offline", [("1", True), ("true", True), (" On ", True), ("yes", True),
                                           ("TRUE", True), ("0", False), ("", False), ("off", False)])
def test_hf_hub_offline_is_read_as_huggingface_hub_reads_it(monkeypatch, value: str, offline: bool) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is offline


def test_the_offline_cache_check_names_a_name_the_hub_rejects_and_is_silent_online(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert uncached_hub_model("a--b", "model.name_or_path") == (
        "model.name_or_path a--b: no such local folder, and no hub model of that name in the local cache "
        "(HF_HUB_OFFLINE=1: nothing is downloaded); check the path, or download the model first")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert uncached_hub_model("someone/not-cached", "model.name_or_path") is None
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert uncached_hub_model("someone/not-cached", "model.name_or_path") is None


# --- tokenizers --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", ["PreTrainedTokenizerFast", "TokenizersBackend"])
def test_a_plain_tokenizer_class_beside_a_qwen2_config_loads_as_itself(tmp_path, tok, cls: str) -> None:
    from transformers import AutoConfig

    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": cls}))
    AutoConfig.for_model("qwen2", vocab_size=len(tok), hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                         intermediate_size=32).save_pretrained(tmp_path)
    text = "reverse: red fox"
    loaded = load_tokenizer(str(tmp_path))
    assert "Qwen2" not in type(loaded).__name__  # (PreTrainedTokenizerFast is TokenizersBackend in transformers 5)
    assert loaded(text)["input_ids"] == tok(text)["input_ids"] != []


def _tokenizer_beside(path: Path, model_type: str | None) -> Any:
    """A BPE tokenizer that merges digits (trained on years) saved with a tiny config.json of `model_type`."""
    from transformers import AutoConfig

    tok = train_tokenizer(["the year 1917 was long ago, 1917 and 42 and 1917"] * 20, vocab_size=300, min_frequency=2)
    tok.save_pretrained(path)
    if model_type:
        AutoConfig.for_model(model_type, vocab_size=300, hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                             num_key_value_heads=1, intermediate_size=32).save_pretrained(path)
    return tok


def test_a_qwen2_folder_whose_tokenizer_autotokenizer_rebuilds_is_named_with_both_encodings(tmp_path) -> None:
    tok = _tokenizer_beside(tmp_path, "qwen2")
    ours = tok("The year 1917: 3 apples, 42 pears!", add_special_tokens=False)["input_ids"]
    difference = auto_tokenizer_difference(tmp_path)
    # Qwen's pre-tokenizer splits 1917 into four digits: 3 tokens more than the trained BPE's
    assert difference.startswith("AutoTokenizer.from_pretrained loads it as Qwen2Tokenizer, which encodes "
                                 "'The year 1917: 3 apples, 42 pears!' into ")
    theirs, mine, at = re.search(r"into (\d+) tokens, not the (\d+) .* difference at token (\d+)", difference).groups()
    assert int(mine) == len(ours) and int(theirs) > len(ours)
    assert difference.endswith(f"against {ours[int(at):int(at) + 3]})")
    assert load_tokenizer(str(tmp_path))("1917")["input_ids"] == tok("1917")["input_ids"]


@pytest.mark.parametrize("model_type", ["llama", None])
def test_a_tokenizer_autotokenizer_loads_as_it_is_or_with_no_config_beside_it_has_no_difference(tmp_path,
                                                                                                model_type) -> None:
    _tokenizer_beside(tmp_path, model_type)
    assert auto_tokenizer_difference(tmp_path) is None


def test_a_folder_autotokenizer_cannot_load_is_not_called_different(tmp_path, monkeypatch) -> None:
    from transformers import AutoTokenizer

    _tokenizer_beside(tmp_path, "qwen2")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ValueError("needs trust_remote_code")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    assert auto_tokenizer_difference(tmp_path) is None


def test_the_end_of_a_run_warns_when_autotokenizer_would_load_another_tokenizer(tmp_path, capsys) -> None:
    from stages.trainer import warn_if_auto_tokenizer_differs

    _tokenizer_beside(tmp_path, "qwen2")
    warn_if_auto_tokenizer_differs(tmp_path, DistInfo(rank=1, local_rank=1, world_size=2, device=torch.device("cpu")))
    assert capsys.readouterr().out == ""  # rank 1 says nothing
    warn_if_auto_tokenizer_differs(tmp_path, DIST)
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith(f"warning: {tmp_path}: AutoTokenizer.from_pretrained loads it as Qwen2Tokenizer")
    assert "Load its tokenizer with PreTrainedTokenizerFast.from_pretrained, as rlhf does" in out


def test_check_data_trains_the_tokenizer_in_memory_and_writes_nothing(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    cfg = ModelConfig(from_config=ARCH, tokenizer_train={"vocab_size": 320, "min_frequency": 2})
    made = prepare_tokenizer(cfg, out, DIST, lambda: TEXTS, chat_template=None, save=False)
    assert list(out.iterdir()) == [] and made.get_vocab() == _fresh_tok().get_vocab()


def test_a_tokenizer_that_cannot_load_names_the_source_and_the_hub_id_it_was_taken_for(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(name_or_path="nobody/nothing")
    with pytest.raises(CheckpointError, match=r"cannot load tokenizer from nobody/nothing \(no folder nobody/nothing "
                                              r"here: it was tried as a Hugging Face hub id with HF_HUB_OFFLINE=1\): "):
        prepare_tokenizer(cfg, tmp_path / "out", DIST, lambda: [], chat_template=None)


def test_a_tokenizer_without_eos_is_refused_and_one_without_pad_pads_with_eos(tmp_path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"a": 0, "b": 1, "</s>": 2}
    raw = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="a")))
    raw.save_pretrained(tmp_path / "noeos")
    cfg = ModelConfig(name_or_path=str(tmp_path / "noeos"))
    with pytest.raises(CheckpointError, match=f"tokenizer {tmp_path / 'noeos'} has no EOS token; set one"):
        prepare_tokenizer(cfg, tmp_path / "out", DIST, lambda: [], chat_template=None)
    raw = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="a")), eos_token="</s>")
    raw.save_pretrained(tmp_path / "nopad")
    loaded = prepare_tokenizer(ModelConfig(name_or_path=str(tmp_path / "nopad")), tmp_path / "out", DIST, lambda: [],
                               chat_template=None)
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == 2


def test_ensure_distinct_pad_for_a_pad_less_tokenizer_and_one_whose_pad_token_exists_already() -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a")),
                                   eos_token="</s>")
    assert bare.pad_token_id is None
    assert ensure_distinct_pad(bare) is True and bare.pad_token == PAD and bare.pad_token_id == 2 and len(bare) == 3
    ours = _fresh_tok()  # <|pad|> is in its vocabulary already
    ours.pad_token = ours.eos_token
    before = len(ours)
    assert ensure_distinct_pad(ours) is False  # the pad is distinct now, but the vocabulary did not grow
    assert ours.pad_token == PAD and len(ours) == before


# --- build_model -------------------------------------------------------------------------------------------------

def test_a_loaded_model_takes_pad_ids_from_the_tokenizer_and_keeps_its_own_eos(tmp_path, tok) -> None:
    path = _saved_model(tok, tmp_path / "m", eos_token_id=[1, 3])
    other = _fresh_tok()
    other.pad_token = other.eos_token  # pad id 1, not the saved model's 0
    model = build_causal_lm(ModelConfig(name_or_path=str(path)), other, "fp32", {}, 0)
    assert model.config.pad_token_id == 1 and model.generation_config.pad_token_id == 1
    assert model.generation_config.eos_token_id == [1, 3]  # an instruct model's several EOS ids stay
    # a model whose own EOS is not the tokenizer's (model.tokenizer from another folder): the tokenizer's EOS,
    # which training appends, is added, so that plain generate() on the saved model stops at it too
    path = _saved_model(tok, tmp_path / "m2", eos_token_id=3)
    model = build_causal_lm(ModelConfig(name_or_path=str(path)), other, "fp32", {}, 0)
    assert model.generation_config.eos_token_id == [3, 1]


@pytest.mark.parametrize("ids, expected", [(None, 7), (7, 7), (5, [5, 7]), ([7, 5], [7, 5]), ([5], [5, 7]),
                                           ((5, 6), [5, 6, 7])])
def test_with_eos_puts_the_tokenizers_eos_among_the_generation_configs(ids, expected) -> None:
    assert with_eos(ids, 7) == expected


def test_an_embedding_larger_than_the_tokenizer_loads_as_it_is(tmp_path, tok) -> None:
    path = _saved_model(tok, tmp_path / "m", rows=len(tok) + 8)  # a vocabulary padded to a multiple, as Qwen's
    model = build_causal_lm(ModelConfig(name_or_path=str(path)), tok, "fp32", {}, 0)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) + 8


def test_a_bad_checkpoint_config_mentioning_attention_is_a_checkpoint_error_under_sdpa(tmp_path, tok) -> None:
    path = _saved_model(tok, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_size": 33}))
    with pytest.raises(CheckpointError, match=f"cannot load model from {path}: "):
        build_causal_lm(ModelConfig(name_or_path=str(path)), tok, "fp32", {}, 0)


def test_zero3_init_off_puts_the_live_deepspeed_config_back() -> None:
    import transformers.integrations.deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    marker = object()
    hf_ds._hf_deepspeed_config_weak_ref = marker
    try:
        with zero3_init_off():
            assert hf_ds._hf_deepspeed_config_weak_ref is None
        assert hf_ds._hf_deepspeed_config_weak_ref is marker
        with pytest.raises(RuntimeError), zero3_init_off():
            raise RuntimeError("build failed")
        assert hf_ds._hf_deepspeed_config_weak_ref is marker
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def test_a_load_error_naming_attn_is_blamed_on_a_non_default_attention_implementation(tmp_path, tok,
                                                                                    monkeypatch) -> None:
    import transformers

    path = _saved_model(tok, tmp_path / "m")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise ImportError("this model needs the flash_attn package")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    with pytest.raises(ConfigError, match="attn_implementation 'flex_attention' cannot be used here .*: ImportError: "
                                          "this model needs the flash_attn package"):
        build_causal_lm(ModelConfig(name_or_path=str(path), attn_implementation="flex_attention"), tok, "fp32", {}, 0)
    with pytest.raises(CheckpointError, match=f"cannot load model from {path}: ImportError: this model needs"):
        build_causal_lm(ModelConfig(name_or_path=str(path)), tok, "fp32", {}, 0)  # sdpa: not the attention's fault


def test_activation_checkpointing_is_non_reentrant(tok) -> None:
    """Non-reentrant checkpointing works with torch.autograd.grad (the reentrant kind raises there)."""
    model = build_causal_lm(ModelConfig(from_config=ARCH, gradient_checkpointing=True), tok, "fp32", {}, 7)
    model.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    weight = model.get_input_embeddings().weight
    (grad,) = torch.autograd.grad(model(input_ids=ids, labels=ids, use_cache=False).loss, [weight])
    assert grad.shape == weight.shape and grad.abs().sum() > 0


# --- check_architecture ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [{"architectures": ["LlamaForSequenceClassification"]},
                                  {"architectures": ["LlamaForSequenceClassification"], "num_labels": 2},
                                  {"architectures": ["LlamaForSequenceClassification"],
                                   "id2label": {"0": "bad", "1": "good"}}])
def test_a_classifier_with_other_than_one_label_is_no_reward_model(tmp_path, body: dict[str, Any]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match=f"{tmp_path} is a LlamaForSequenceClassification, not a one-label "
                                              "sequence classifier"):
        check_architecture(str(tmp_path), "reward", True, "reward_model.name_or_path")
    check_architecture(str(tmp_path), "reward", False)  # train-rm from a classifier: its head is retrained
    (tmp_path / "config.json").write_text(json.dumps({**body, "id2label": {"0": "LABEL_0"}}))
    check_architecture(str(tmp_path), "reward", True)


# --- positions -----------------------------------------------------------------------------------------------------

def test_position_limits_of_learned_position_models() -> None:
    assert position_limit({"model_type": "gpt_neo"}) == 2048  # the class default
    assert position_limit({"model_type": "gpt_neo", "max_position_embeddings": 128}) == 128
    assert position_limit({"model_type": "opt", "max_position_embeddings": 512}) == 512
    assert position_limit({"model_type": "gpt2", "n_positions": 96}) == 96
    assert position_limit({"model_type": "llama", "max_position_embeddings": 64}) is None  # rotary


def _ppo_cfg(ptx: str | None) -> Any:
    return SimpleNamespace(data=SimpleNamespace(max_prompt_length=64, ptx=ptx, ptx_max_length=200),
                           generation=SimpleNamespace(max_new_tokens=24))


def test_stage_lengths_of_each_stage() -> None:
    rm = SimpleNamespace(data=SimpleNamespace(max_length=300))
    assert stage_lengths("train-rm", rm) == {"model": [("data.max_length", 300)]}
    assert stage_lengths("sft", rm) == {"model": [("data.max_length", 300)]}
    assert stage_lengths("ppo", _ppo_cfg("ptx.jsonl")) == {
        "model": [("data.max_prompt_length + generation.max_new_tokens", 88), ("data.ptx_max_length", 200)],
        "reward_model": [("data.max_prompt_length + generation.max_new_tokens + 1 (an EOS appended)", 89)]}
    assert stage_lengths("ppo", _ppo_cfg(None))["model"] == [("data.max_prompt_length + generation.max_new_tokens", 88)]
    assert stage_lengths("eval", rm) == {}


def test_a_sequence_as_long_as_the_position_table_fits_and_one_token_more_does_not() -> None:
    gpt2 = {"model_type": "gpt2", "n_positions": 88}
    check_positions("ppo", {"model": gpt2, "reward_model": {"model_type": "gpt2", "n_positions": 89}}, _ppo_cfg(None))
    with pytest.raises(ConfigError, match=r"^data.max_prompt_length \+ generation.max_new_tokens \+ 1 \(an EOS "
                                          r"appended\) = 89 tokens, but reward_model \(gpt2\) has learned positions "
                                          r"for 88 only"):
        check_positions("ppo", {"model": gpt2, "reward_model": gpt2}, _ppo_cfg(None))
    with pytest.raises(ConfigError, match=r"^data.ptx_max_length = 200 tokens, but model \(gpt2\) has learned "
                                          r"positions for 88 only"):
        check_positions("ppo", {"model": gpt2, "reward_model": None}, _ppo_cfg("ptx.jsonl"))
    with pytest.raises(ConfigError, match=r"^data.max_length = 300 tokens, but model \(opt\) has learned positions "
                                          r"for 299 only"):
        check_positions("train-rm", {"model": {"model_type": "opt", "max_position_embeddings": 299}},
                        SimpleNamespace(data=SimpleNamespace(max_length=300)))

"""Tokenizer training and model construction options."""

from __future__ import annotations

import pytest
import torch

from stages.config import ModelConfig
from stages.errors import CheckpointError
from stages.model_paths import resolve_model_dir
from stages.models import (
    DEFAULT_CHAT_TEMPLATE,
    EOS,
    PAD,
    build_causal_lm,
    is_activation_checkpointing,
    train_tokenizer,
)

TEXTS = ["count from 1 to 4: 1 2 3 4", "reverse: red fox -> fox red", "spell cat: c a t"] * 20
ARCH = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=320, min_frequency=2)


def test_trained_tokenizer_is_deterministic_and_round_trips(tok):
    again = train_tokenizer(TEXTS, vocab_size=320, min_frequency=2)
    assert again.get_vocab() == tok.get_vocab()
    assert tok.pad_token == PAD and tok.eos_token == EOS and tok.pad_token_id != tok.eos_token_id
    text = "reverse: cat fox"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tok("count from 1 to 4", add_special_tokens=False)["input_ids"]) < len("count from 1 to 4")  # merges
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE


def _model(tok, **kw):
    cfg = ModelConfig(from_config=ARCH, **kw)
    return build_causal_lm(cfg, tok, precision="fp32", ds_config={}, seed=7)


def test_from_config_is_seeded_and_takes_ids_from_the_tokenizer(tok):
    a, b = _model(tok), _model(tok)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    assert a.config.vocab_size == len(tok)
    assert a.config.pad_token_id == tok.pad_token_id and a.config.eos_token_id == tok.eos_token_id
    assert a.config.bos_token_id is None  # the trained tokenizer has no BOS
    assert a.generation_config.eos_token_id == tok.eos_token_id
    c = build_causal_lm(ModelConfig(from_config=ARCH), tok, precision="fp32", ds_config={}, seed=8)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_model_options_change_the_model(tok):
    assert _model(tok).dtype == torch.float32
    assert _model(tok, dtype="bfloat16").dtype == torch.bfloat16
    bf16_auto = build_causal_lm(ModelConfig(from_config=ARCH), tok, precision="bf16", ds_config={}, seed=7)
    assert bf16_auto.dtype == torch.bfloat16  # auto follows deepspeed.precision
    assert _model(tok).config._attn_implementation == "sdpa"
    assert _model(tok, attn_implementation="eager").config._attn_implementation == "eager"
    assert not is_activation_checkpointing(_model(tok))
    ckpt = _model(tok, gradient_checkpointing=True)
    assert is_activation_checkpointing(ckpt)
    # checkpointing recomputes activations but yields the same gradients
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    grads = []
    for m in (_model(tok), ckpt):
        m.train()
        m(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append(m.model.embed_tokens.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bad_architecture_and_vocab_mismatch_are_clear_errors(tok, tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown model type 'no-such-arch'"):
        ModelConfig(from_config={"model_type": "no-such-arch"})
    with pytest.raises(ValidationError, match="from_config.hiden_size: not a llama config key; closest valid key: "
                                               "from_config.hidden_size"):
        ModelConfig(from_config={**ARCH, "hiden_size": 64})  # would otherwise build a 4096-wide default Llama
    # the config class's own checks, at validation (--dry-run) rather than a traceback at model build
    with pytest.raises(ValidationError, match=r"from_config: llama rejects it: The hidden size \(33\) is not a "
                                              r"multiple of the number of attention heads \(4\)"):
        ModelConfig(from_config={**ARCH, "hidden_size": 33})
    with pytest.raises(ValidationError, match="from_config: llama rejects it: Field 'hidden_size' expected int, got str"):
        ModelConfig(from_config={**ARCH, "hidden_size": "big"})
    small = _model(tok)
    small.resize_token_embeddings(10)
    small.save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"tokenizer has \d+ tokens but the model's embedding has 10 rows"):
        build_causal_lm(ModelConfig(name_or_path=str(tmp_path / "m")), tok, "fp32", {}, 0)


def test_a_run_directory_stands_for_its_final_checkpoint(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "config.json").write_text("{}")
    assert resolve_model_dir(str(tmp_path / "run")) == str(tmp_path / "run" / "final")
    assert resolve_model_dir("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    # an interrupted run: said so, not a tokenizer library's complaint about the folder
    (tmp_path / "cut" / "tokenizer").mkdir(parents=True)
    (tmp_path / "cut" / "metrics.jsonl").write_text("")
    with pytest.raises(CheckpointError, match="a stage run without final/ \\(not finished"):
        resolve_model_dir(str(tmp_path / "cut"))
    # ... whose checkpoint folder stands for its model (hf/), as the run folder stands for its final/
    (tmp_path / "cut" / "checkpoint-00000004" / "hf").mkdir(parents=True)
    (tmp_path / "cut" / "checkpoint-00000004" / "hf" / "config.json").write_text("{}")
    (tmp_path / "cut" / "checkpoint-00000004" / "resolved_config.yaml").write_text("")
    assert resolve_model_dir(str(tmp_path / "cut" / "checkpoint-00000004")) == \
        str(tmp_path / "cut" / "checkpoint-00000004" / "hf")


def test_tokenizer_options(tok, tmp_path):
    """model.tokenizer_train.vocab_size sizes the trained tokenizer; model.tokenizer points at a separate
    tokenizer; data.chat_template replaces the tokenizer's template."""
    from stages.distributed import DistInfo
    from stages.models import prepare_tokenizer

    from stages.toydata import sft_rows

    corpus = [m["content"] for row in sft_rows(300) for m in row["messages"]]
    small = train_tokenizer(corpus, vocab_size=300, min_frequency=2)
    large = train_tokenizer(corpus, vocab_size=340, min_frequency=2)
    assert len(small) == 300 and len(large) == 340
    assert len(train_tokenizer(corpus, vocab_size=340, min_frequency=10**6)) < 300  # min_frequency blocks merges

    model_dir, tok_dir = tmp_path / "model", tmp_path / "tok"
    _model(tok).save_pretrained(model_dir)
    large.save_pretrained(tok_dir)
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    cfg = ModelConfig(name_or_path=str(model_dir), tokenizer=str(tok_dir))
    loaded = prepare_tokenizer(cfg, tmp_path / "out", dist, lambda: [], chat_template=None)
    assert len(loaded) == 340
    custom = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    loaded = prepare_tokenizer(cfg, tmp_path / "out", dist, lambda: [], chat_template=custom)
    assert loaded.chat_template == custom


def test_a_trained_tokenizer_is_on_disk_before_its_rename(tmp_path, fsynced, process_group):
    """from_config without model.tokenizer: rank 0 trains the tokenizer into .tmp-tokenizer, fsyncs its files,
    renames it to tokenizer/ and fsyncs output_dir (the rename), so a crash cannot leave a tokenizer/ that
    resumed ranks load with missing data. A second call loads it without training."""
    from stages.models import prepare_tokenizer

    synced = fsynced
    out = tmp_path / "out"
    out.mkdir()
    cfg = ModelConfig(from_config=ARCH, tokenizer_train={"vocab_size": 300, "min_frequency": 2})
    first = prepare_tokenizer(cfg, out, process_group, lambda: TEXTS, chat_template=None)
    files = {p.name for p in (out / "tokenizer").iterdir()}
    tmp = str(out / ".tmp-tokenizer")
    assert "tokenizer.json" in files and files <= {s[len(tmp) + 1:] for s in synced if s.startswith(tmp + "/")}
    assert synced[-1] == str(out) and not (out / ".tmp-tokenizer").exists()
    synced.clear()
    again = prepare_tokenizer(cfg, out, process_group, lambda: pytest.fail("trained again"), chat_template=None)
    assert again.get_vocab() == first.get_vocab() and synced == []


def test_weight_decay_only_on_matrices(tok):
    from stages.engine import param_groups

    groups = param_groups(_model(tok), weight_decay=0.1)
    assert groups[0]["weight_decay"] == 0.1 and all(p.ndim >= 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.ndim == 1 for p in groups[1]["params"])
    assert len(groups[1]["params"]) == 5  # 2 layers x 2 norms + final norm


def test_an_attention_implementation_that_cannot_run_here_is_a_config_error_naming_it(tok, tmp_path):
    """flash_attention_2 is a valid name (the config accepts it) but needs the flash-attn package: building a
    model with it (from_config or a saved checkpoint) is a ConfigError naming attn_implementation, not
    transformers' traceback or a checkpoint error."""
    from transformers.utils import is_flash_attn_2_available

    from stages.errors import ConfigError

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match="attn_implementation 'flash_attention_2' cannot be used here .* ImportError"):
        _model(tok, attn_implementation="flash_attention_2")
    saved = tmp_path / "m"
    _model(tok).save_pretrained(saved)
    tok.save_pretrained(saved)
    with pytest.raises(ConfigError, match="attn_implementation 'flash_attention_2' cannot be used here"):
        build_causal_lm(ModelConfig(name_or_path=str(saved), attn_implementation="flash_attention_2"), tok,
                        precision="fp32", ds_config={}, seed=7)
    with pytest.raises(ValueError, match="attn_implementation"):
        ModelConfig(from_config=ARCH, attn_implementation="sdpaa")


def test_the_architecture_check_leaves_the_config_as_it_was():
    """transformers' config class fills a rope_scaling mapping in (rope_theta): the check ran it on the config's
    own dict, so the resolved config gained a key the user never wrote."""
    from stages.config import check_architecture

    arch = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    check_architecture(arch)
    assert arch["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}

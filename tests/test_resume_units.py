"""Checkpoint, resume, lock and input-fingerprint units (stages/checkpoint.py, stages/fingerprint.py), each pinned
after a mutant of it survived the suite (2026-12-05): the process-count refusal under ZeRO, the inputs record
compared, moved inputs, fingerprint limits, names, places and times, the lock file's holder line, a resume with
nothing to resume, the newest loadable checkpoint and what is set aside, same_tree, a lost peer during a save,
an empty metrics file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_engine


def _checkpoint(out: Path, step: int, world_size: int | None = None, config: dict | None = None,
                inputs: dict | None = None) -> Path:
    ck = out / f"checkpoint-{step:08d}"
    ck.mkdir(parents=True)
    if world_size is not None:
        (ck / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": world_size}))
    if config is not None:
        (ck / "resolved_config.yaml").write_text(yaml.safe_dump(config))
    if inputs is not None:
        (ck / "inputs.json").write_text(json.dumps(inputs))
    (ck / "COMPLETE").write_text("ok\n")
    return ck


@pytest.mark.parametrize("before_zero, now_zero", [(1, 1), (2, 0), (0, 3)])
def test_another_process_count_is_refused_at_zero_1_and_when_either_run_used_zero(tmp_path, before_zero, now_zero):
    """ZeRO-1 partitions the optimizer state as ZeRO-2/3 do; the checkpoint's ZeRO stage counts as much as the
    resuming run's (the larger of the two decides)."""
    from stages.checkpoint import resume_changes
    from stages.errors import ConfigError

    ck = _checkpoint(tmp_path, 10, world_size=2, config={"deepspeed": {"zero_stage": before_zero}})
    now = yaml.safe_dump({"deepspeed": {"zero_stage": now_zero}})
    with pytest.raises(ConfigError, match=rf"written by 2 process\(es\) under ZeRO-{max(before_zero, now_zero)}"):
        resume_changes(tmp_path, now, 1)
    if before_zero == now_zero:
        assert resume_changes(tmp_path, now, 2) == (ck, [])
        return
    with pytest.raises(ConfigError, match=rf"cannot be continued with deepspeed.zero_stage: {before_zero} -> "):
        resume_changes(tmp_path, now, 2)  # (on the same count: another ZeRO stage, which DeepSpeed cannot load)


def test_resume_compares_inputs_with_the_checkpoints_own_record(tmp_path):
    """The checkpoint's inputs.json is what it was trained on; output_dir/inputs.json is rewritten by every start
    (a resume with --allow-config-change that died before its first save leaves the new fingerprints there)."""
    from stages.checkpoint import resume_changes

    old = {"data.train.path": {"path": "/d/train.jsonl", "sha256": "old"}}
    now = {"data.train.path": {"path": "/d/train.jsonl", "sha256": "new"}}
    ck = _checkpoint(tmp_path, 10, inputs=old)
    (tmp_path / "inputs.json").write_text(json.dumps(now))
    assert resume_changes(tmp_path, "seed: 1\n", None, now) == (ck, ["data.train.path (/d/train.jsonl): contents changed"])


def test_a_list_of_inputs_counts_as_moved_only_when_every_item_moved_or_stayed():
    from stages.checkpoint import config_changes

    before, after = {"data": {"paths": ["/a/x.jsonl", "/a/y.jsonl"]}}, {"data": {"paths": ["/b/x.jsonl", "/b/z.jsonl"]}}
    assert config_changes(before, after, None, {"data.paths[0]", "data.paths[1]"}) == []
    assert config_changes(before, after, None, {"data.paths[0]"}) == [
        "data.paths: ['/a/x.jsonl', '/a/y.jsonl'] -> ['/b/x.jsonl', '/b/z.jsonl']"]


def test_a_file_of_exactly_whole_file_bytes_is_hashed_whole(tmp_path, monkeypatch):
    import hashlib

    from stages import fingerprint

    monkeypatch.setattr(fingerprint, "WHOLE_FILE", 3000)
    monkeypatch.setattr(fingerprint, "EDGE", 10)
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc" * 1000)
    assert fingerprint.file_fingerprint(f) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_a_folders_fingerprint_covers_names_places_and_times_and_skips_hidden_entries(tmp_path, monkeypatch):
    """A model retrained under the same path keeps its file names and sizes (the same shapes): only the times
    tell. Hidden entries (.rlhf.lock rewritten by every start, a hub download's .cache/) change nothing."""
    from stages import fingerprint
    from stages.fingerprint import folder_fingerprint

    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "w.bin").write_bytes(b"aaaa")
    os.utime(model / "w.bin", ns=(1, 1))
    before = folder_fingerprint(model)
    (model / ".rlhf.lock").write_text("pid 1")
    (model / ".cache" / "huggingface").mkdir(parents=True)
    (model / ".cache" / "huggingface" / "w.bin.metadata").write_text("m")
    assert folder_fingerprint(model) == before
    (model / "w.bin").write_bytes(b"bbbb")  # retrained: the same size, another time
    os.utime(model / "w.bin", ns=(2, 2))
    assert folder_fingerprint(model) != before
    os.utime(model / "w.bin", ns=(1, 1))
    assert folder_fingerprint(model) == before  # (the bytes are not read)
    os.replace(model / "w.bin", model / "sub" / "w.bin")  # the same name, size and time in another folder
    assert folder_fingerprint(model) != before
    os.replace(model / "sub" / "w.bin", model / "w.bin")
    # a model folder of its own (config.json at its top) is fingerprinted whole, not through a final/ inside it
    (model / "final").mkdir()
    (model / "final" / "config.json").write_text("{}")
    before = folder_fingerprint(model)
    os.utime(model / "w.bin", ns=(3, 3))
    assert folder_fingerprint(model) != before
    # the walk stops at FOLDER_ENTRIES files in name order: the last of those still counts, the next does not
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a", "b", "c"):
        (flat / name).write_bytes(b"x")
        os.utime(flat / name, ns=(1, 1))
    monkeypatch.setattr(fingerprint, "FOLDER_ENTRIES", 2)
    before = folder_fingerprint(flat)
    os.utime(flat / "c", ns=(2, 2))
    assert folder_fingerprint(flat) == before
    os.utime(flat / "b", ns=(2, 2))
    assert folder_fingerprint(flat) != before


def test_input_paths_key_each_list_item_and_pass_over_hub_ids():
    from stages.fingerprint import input_paths

    tree = {"data": {"train": {"path": ["/d/a.jsonl", "/d/b.jsonl"]}}, "model": {"name_or_path": "gpt2"},
            "output_dir": "/o"}
    assert input_paths(tree, lambda key: key != "output_dir") == {"data.train.path[0]": "/d/a.jsonl",
                                                                  "data.train.path[1]": "/d/b.jsonl"}


def test_fingerprint_changes_only_for_the_same_path_and_moved_inputs_only_for_the_same_contents():
    from stages.fingerprint import fingerprint_changes, moved_inputs

    before = {"a": {"path": "/x/a", "sha256": "1"}, "b": {"path": "/x/b", "sha256": "2"}}
    after = {"a": {"path": "/y/a", "sha256": "9"}, "b": {"path": "/x/b", "sha256": "3"}}
    assert fingerprint_changes(before, after) == ["b (/x/b): contents changed"]  # a's new path: a config change
    assert moved_inputs(before, after) == set()
    assert moved_inputs(before, {"a": {"path": "/y/a", "sha256": "1"}}) == {"a"}


def test_the_lock_file_names_only_its_current_holder(tmp_path):
    """A refused run names the holder from .rlhf.lock: an earlier holder's line must not stay in front of it."""
    from stages.checkpoint import LOCK_NAME, run_lock

    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text("pid 1 on elsewhere, since 2020-01-01 00:00:00\n")
    with run_lock(out):
        text = (out / LOCK_NAME).read_text()
    assert text.startswith(f"pid {os.getpid()} on ") and text.count("\n") == 1, text


def test_a_resume_with_nothing_to_resume_keeps_a_finished_runs_final(tmp_path):
    """--resume where final/ stands but no complete checkpoint does (set aside as damaged, or deleted by hand)
    must not clear the run: only a resume with neither starts fresh."""
    from stages.checkpoint import prepare_output_dir

    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "final" / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert prepare_output_dir(out, "seed: 1\n", resume=True, overwrite=False) == []
    assert (out / "final" / "config.json").is_file() and (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_resume_loads_the_newest_loadable_checkpoint_and_sets_a_damaged_one_aside(tmp_path, process_group):
    """Two checkpoints: the newest is loaded (its trainer state, its RNG). Its engine state truncated: the older
    one is loaded, the damaged one renamed .damaged and reported; with every checkpoint damaged, the newest's
    error is raised."""
    from stages.checkpoint import load_latest_checkpoint, save_checkpoint
    from stages.errors import CheckpointError

    engine, tokenizer = tiny_engine()
    out = tmp_path / "out"
    out.mkdir()
    for step in (1, 2):
        torch.manual_seed(100 + step)
        save_checkpoint(engine, tokenizer, out, step, {"done": step}, process_group, 5, {"stage": "sft"})
    torch.manual_seed(0)
    assert load_latest_checkpoint(engine, out, process_group) == {"step": 2, "done": 2}
    torch.manual_seed(102)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_latest_checkpoint(engine, out, process_group)
    assert torch.equal(torch.rand(3), expected)  # the RNG state saved with step 2 is back
    def truncate(step: int) -> None:
        (state,) = (out / f"checkpoint-{step:08d}" / "ds" / "state").glob("*model_states.pt")
        state.write_bytes(state.read_bytes()[:1000])

    truncate(2)
    said: list[str] = []
    assert load_latest_checkpoint(engine, out, process_group, say=said.append) == {"step": 1, "done": 1}
    assert (out / "checkpoint-00000002.damaged" / "COMPLETE").is_file()
    assert not (out / "checkpoint-00000001.damaged").exists()
    assert any("checkpoint-00000002" in s and "trying the previous checkpoint" in s for s in said), said
    assert any("kept as checkpoint-00000002.damaged" in s for s in said), said
    truncate(1)
    (out / "checkpoint-00000002.damaged").rename(out / "checkpoint-00000002")
    with pytest.raises(CheckpointError, match="checkpoint-00000002"):
        load_latest_checkpoint(engine, out, process_group)


def test_a_fallback_to_a_checkpoint_of_another_config_says_how_this_run_differs_from_it(tmp_path, process_group):
    """--resume compares this run's config with the newest checkpoint's only; when that one is damaged and the
    load falls back to an older one written under another config (a resume with --allow-config-change between
    them), the difference is said; with the same config nothing is."""
    from stages.checkpoint import load_latest_checkpoint, save_checkpoint

    engine, tokenizer = tiny_engine()
    out = tmp_path / "out"
    out.mkdir()
    for step, lr in ((1, 0.5), (2, 0.25)):
        (out / "resolved_config.yaml").write_text(f"seed: 1\ntrain:\n  lr: {lr}\n")  # what each checkpoint keeps
        save_checkpoint(engine, tokenizer, out, step, {"done": step}, process_group, 5, {"stage": "sft"})
    said: list[str] = []
    assert load_latest_checkpoint(engine, out, process_group, say=said.append) == {"step": 2, "done": 2}
    assert not any("differs" in s for s in said), said
    (state,) = (out / "checkpoint-00000002" / "ds" / "state").glob("*model_states.pt")
    state.write_bytes(state.read_bytes()[:1000])
    assert load_latest_checkpoint(engine, out, process_group, say=said.append) == {"step": 1, "done": 1}
    assert any("checkpoint-00000001 is not the checkpoint --resume compared" in s and "train.lr: 0.5 -> 0.25" in s
               for s in said), said


def test_only_a_damaged_checkpoint_is_set_aside_and_it_is_never_handed_to_deepspeed(tmp_path, process_group,
                                                                                     monkeypatch):
    """A checkpoint whose files open but whose loading fails (another model's state, no trainer counters) is
    passed over but kept as it is; a damaged one (a truncated file) never reaches DeepSpeed's loading (under
    ZeRO-3 a rank failing inside it would hang the others)."""
    from stages.checkpoint import load_latest_checkpoint, save_checkpoint

    engine, tokenizer = tiny_engine()
    out = tmp_path / "out"
    out.mkdir()
    for step in (1, 2, 3, 4):
        save_checkpoint(engine, tokenizer, out, step, {"done": step}, process_group, 5, {"stage": "sft"})
    (state,) = (out / "checkpoint-00000004" / "ds" / "state").glob("*model_states.pt")
    state.write_bytes(state.read_bytes()[:1000])
    real, loaded = engine.load_checkpoint, []

    def load(path, **kw):
        loaded.append(Path(path).parent.name)
        if "checkpoint-00000003" in path:
            return path, {}  # no trainer state for this run
        if "checkpoint-00000002" in path:
            raise RuntimeError("size mismatch for transformer.wte.weight")
        return real(path, **kw)

    monkeypatch.setattr(engine, "load_checkpoint", load)
    said: list[str] = []
    assert load_latest_checkpoint(engine, out, process_group, say=said.append) == {"step": 1, "done": 1}
    assert loaded == ["checkpoint-00000003", "checkpoint-00000002", "checkpoint-00000001"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-00000001", "checkpoint-00000002", "checkpoint-00000003", "checkpoint-00000004.damaged"]
    assert any("has no trainer state" in s for s in said) and any("size mismatch" in s for s in said), said


def test_same_tree_needs_the_same_file_names_on_both_sides(tmp_path):
    """A final/ holding a stale extra file (or lacking one) is not the checkpoint's hf/: publish_final replaces it."""
    from stages.checkpoint import same_tree

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "w.bin").write_bytes(b"w")
    assert same_tree(a, b)
    (b / "stale.json").write_text("{}")
    assert not same_tree(a, b)
    (b / "stale.json").unlink()
    (a / "new.json").write_text("{}")
    assert not same_tree(a, b)


def test_a_checkpoint_damaged_again_replaces_its_earlier_damaged_copy(tmp_path):
    from stages.checkpoint import complete_checkpoints, set_aside

    for name in ("checkpoint-00000004", "checkpoint-00000004.damaged"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "COMPLETE").write_text("ok\n")
    (tmp_path / "checkpoint-00000004.damaged" / "old").write_text("x")
    said: list[str] = []
    set_aside([tmp_path / "checkpoint-00000004"], said.append)
    assert complete_checkpoints(tmp_path) == [] and not (tmp_path / "checkpoint-00000004.damaged" / "old").exists()
    assert said == ["[yellow]the damaged checkpoint is kept as checkpoint-00000004.damaged (never loaded)[/]"]


def test_a_save_failed_by_a_lost_peer_is_raised_as_it_is_and_removes_the_partial_copy(tmp_path, monkeypatch):
    """Any rank that lost a peer removes the partial copy and re-raises the collective's error (the dead rank's
    own error says why); another failure on a non-zero local rank leaves the removal to local rank 0."""
    from stages.checkpoint import _save_failure
    from stages.distributed import PEER_LOST, DistInfo
    from stages.errors import CheckpointError

    monkeypatch.setenv("WORLD_SIZE", "2")
    rank1 = DistInfo(rank=1, local_rank=1, world_size=2, device=torch.device("cpu"))
    tmp = tmp_path / ".tmp-checkpoint-00000005"
    tmp.mkdir()
    lost = RuntimeError(f"... {PEER_LOST[0]} ...")
    assert _save_failure(lost, tmp, "checkpoint-00000005", tmp_path, rank1) is lost and not tmp.exists()
    tmp.mkdir()
    full = _save_failure(OSError(28, "No space left on device"), tmp, "checkpoint-00000005", tmp_path, rank1)
    assert isinstance(full, CheckpointError) and "No space left on device" in str(full) and tmp.is_dir()


def test_an_empty_metrics_file_is_no_earlier_run(tmp_path):
    """An attempt that failed before its first step leaves an empty metrics.jsonl: a fresh start goes ahead."""
    from stages.checkpoint import prepare_output_dir, previous_run_contents

    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    assert previous_run_contents(out) == []
    prepare_output_dir(out, "seed: 1\n", resume=False, overwrite=False)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert previous_run_contents(out) == ["metrics.jsonl"]


def test_a_failed_resume_puts_back_the_record_its_newest_checkpoint_keeps(tmp_path):
    """restore_run_record: output_dir's resolved_config.yaml and inputs.json, rewritten by an attempt that then
    failed, become the newest complete checkpoint's copies again (an older or incomplete checkpoint's do not
    count); once they match, nothing is written; no checkpoint, nothing to put back."""
    from stages.checkpoint import restore_run_record

    assert restore_run_record(tmp_path) == []
    _checkpoint(tmp_path, 2, config={"train": {"max_steps": 1}}, inputs={"a": {"path": "/o", "sha256": "0"}})
    _checkpoint(tmp_path, 3, config={"train": {"max_steps": 3}}, inputs={"a": {"path": "/x", "sha256": "1"}})
    (tmp_path / "checkpoint-00000004").mkdir()  # a half-written one: no COMPLETE
    (tmp_path / "checkpoint-00000004" / "resolved_config.yaml").write_text("train: {max_steps: 9}\n")
    (tmp_path / "resolved_config.yaml").write_text("train: {max_steps: 2}\n")  # the failed attempt's
    assert restore_run_record(tmp_path) == ["resolved_config.yaml", "inputs.json"]  # (inputs.json was missing)
    assert yaml.safe_load((tmp_path / "resolved_config.yaml").read_text()) == {"train": {"max_steps": 3}}
    assert json.loads((tmp_path / "inputs.json").read_text()) == {"a": {"path": "/x", "sha256": "1"}}
    stamp = (tmp_path / "resolved_config.yaml").stat().st_mtime_ns
    assert restore_run_record(tmp_path) == [] and (tmp_path / "resolved_config.yaml").stat().st_mtime_ns == stamp


def test_out_of_gpu_memory_in_a_checkpoints_save_or_load_is_raised_as_it_is_marked_with_what_failed(tmp_path):
    """Running out of GPU memory while writing (ZeRO-3 gathers whole parameters) or loading a checkpoint is no
    checkpoint damage: the error itself is raised (the CLI says what fits), marked with what the rank was doing,
    and a failed write's partial copy is removed as for any other failure."""
    from stages.checkpoint import _load_engine, _save_failure
    from stages.distributed import DistInfo
    from stages.errors import WHILE_ATTR, CheckpointError

    rank0 = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    tmp = tmp_path / ".tmp-checkpoint-00000005"
    tmp.mkdir()
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
    assert _save_failure(oom, tmp, "checkpoint-00000005", tmp_path, rank0) is oom and not tmp.exists()
    assert getattr(oom, WHILE_ATTR) == "writing checkpoint-00000005"

    class Engine:
        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        def load_checkpoint(self, *args, **kwargs):
            raise self.exc

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    with pytest.raises(torch.OutOfMemoryError) as raised:
        _load_engine(Engine(oom), tmp_path / "ds", tmp_path / "checkpoint-00000004")
    assert raised.value is oom and getattr(oom, WHILE_ATTR) == f"loading {tmp_path / 'checkpoint-00000004'}"
    with pytest.raises(CheckpointError, match="^cannot load checkpoint .*: bad shard"):
        _load_engine(Engine(RuntimeError("bad shard")), tmp_path / "ds", tmp_path / "checkpoint-00000004")


def test_out_of_memory_is_torchs_error_or_a_cuda_librarys_saying_so():
    """torch's OutOfMemoryError; a RuntimeError of torch's allocator, the CUDA runtime or NCCL (a DistBackendError)
    saying an allocation failed; not a CPU allocation, another CUDA error, or an OSError."""
    import torch.distributed as torch_dist

    from stages.errors import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("anything"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously"))
    assert is_out_of_memory(torch_dist.DistBackendError(
        "NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error, NCCL version 2.27.3\nLast error:\n"
        "Cuda failure 'out of memory'"))
    assert is_out_of_memory(RuntimeError("compiled graph failed: CUDA out of memory. Tried to allocate 2.00 GiB"))
    for other in (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
                  RuntimeError("CUDA error: an illegal memory access was encountered"), OSError("out of memory")):
        assert not is_out_of_memory(other), other

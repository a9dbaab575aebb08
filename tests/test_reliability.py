"""Reproducible LoRA init, a real SIGTERM in the middle of a step, checkpoint manifests and the fall-back on resume."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch
from conftest import doc_examples, tiny_model, train_config, trainable_model

import qlowrank as ql
from qlowrank.atomic import staged_dir, staging_tag
from qlowrank.train import CheckpointError, Trainer, TrainingInterrupted, list_checkpoints, verify_checkpoint


def _factors(model) -> dict[str, torch.Tensor]:
    return {name: layer.lora_A.weight.detach().clone() for name, layer in ql.lora_layers(model)}


def test_add_lora_seed_makes_init_reproducible_per_layer_and_independent_of_global_rng():
    first = _factors(ql.add_lora(tiny_model("llama"), ql.LoraConfig(r=4), seed=7))
    torch.manual_seed(123)   # the global generator must not matter
    again = _factors(ql.add_lora(tiny_model("llama"), ql.LoraConfig(r=4), seed=7))
    other = _factors(ql.add_lora(tiny_model("llama"), ql.LoraConfig(r=4), seed=8))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert all(not torch.equal(first[k], other[k]) for k in first)
    # A layer's init is a function of (seed, its name): targeting fewer layers does not shift it.
    some = _factors(ql.add_lora(tiny_model("llama"), ql.LoraConfig(r=4, target_modules=["v_proj"]), seed=7))
    assert all(torch.equal(some[k], first[k]) for k in some) and len(some) == 2
    # Two layers with the same shape still get different factors.
    q0, q1 = first["model.layers.0.self_attn.q_proj"], first["model.layers.1.self_attn.q_proj"]
    assert not torch.equal(q0, q1)
    # Without a seed the global generator decides, as before.
    torch.manual_seed(0)
    a = _factors(ql.add_lora(tiny_model("llama"), ql.LoraConfig(r=4, init="gaussian")))
    torch.manual_seed(0)
    b = _factors(ql.add_lora(tiny_model("llama"), ql.LoraConfig(r=4, init="gaussian")))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_model_seed_reaches_the_lora_init(checkpoints):
    kw = dict(quant=ql.QuantConfig(bits=4), lora=ql.LoraConfig(r=4), device="cpu", progress=False)
    a = _factors(ql.load_model(checkpoints["llama"], seed=3, **kw))
    b = _factors(ql.load_model(checkpoints["llama"], seed=3, **kw))
    c = _factors(ql.load_model(checkpoints["llama"], seed=4, **kw))
    assert all(torch.equal(a[k], b[k]) and not torch.equal(a[k], c[k]) for k in a)


def _signal_on_forward(model, signum, at_call):
    """Send `signum` to this process from inside the `at_call`-th forward of the first LoRA layer."""
    _, layer = next(iter(ql.lora_layers(model)))
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if calls[0] == at_call:
            os.kill(os.getpid(), signum)   # a real signal; the trainer's handler runs right away

    layer.register_forward_pre_hook(hook)


def test_sigterm_mid_step_checkpoints_the_last_completed_step_and_resume_is_exact(tmp_path, tok):
    # grad_accum 2 and dropout: the signal arrives in the first micro-batch of step 4, after
    # it drew dropout masks. The partial step must be dropped, and the RNG states saved as
    # they were after step 3, or the resumed losses would differ from the uninterrupted run.
    examples = doc_examples(tok, 14)
    kw = dict(steps=5, grad_accum=2, batch_size=3)
    straight = Trainer(trainable_model(tok, dropout=0.1), train_config(tmp_path / "a", **kw), examples,
                       pad_token_id=tok.pad_token_id).train()
    model = trainable_model(tok, dropout=0.1)
    # Each micro-batch is one forward of the layer (no checkpointing, no eval set): 3 steps x 2 + 1.
    _signal_on_forward(model, signal.SIGTERM, at_call=7)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stopped:
        Trainer(model, train_config(tmp_path / "b", **kw), examples, pad_token_id=tok.pad_token_id).train()
    assert (stopped.value.exit_code, stopped.value.step) == (143, 3)
    assert signal.getsignal(signal.SIGTERM) is previous   # the handler is removed again
    saved = list_checkpoints(tmp_path / "b" / "out" / "checkpoints")
    assert [p.name for p in saved] == ["step-000003"] and verify_checkpoint(saved[0]) is None
    resumed = Trainer(trainable_model(tok, dropout=0.1), train_config(tmp_path / "b", **kw), examples,
                      pad_token_id=tok.pad_token_id).train(resume=True)
    assert resumed.losses == straight.losses[3:]   # bit for bit on the CPU (test_train.py)


def _run_with_checkpoints(tmp_path, tok, steps=6):
    config = train_config(tmp_path, steps=steps, save_every=2, keep_checkpoints=None)
    Trainer(trainable_model(tok), config, doc_examples(tok, 8), pad_token_id=tok.pad_token_id).train()
    return tmp_path / "out" / "checkpoints", config


def test_damaged_newest_checkpoint_is_detected_and_resume_falls_back_with_a_warning(tmp_path, tok, capsys):
    root, config = _run_with_checkpoints(tmp_path, tok)
    assert [p.name for p in list_checkpoints(root)] == ["step-000002", "step-000004", "step-000006"]
    assert all(verify_checkpoint(p) is None for p in list_checkpoints(root))
    # step 6: optimizer state truncated; step 4: one byte of the adapter flipped (same size).
    optimizer = root / "step-000006" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    weights = root / "step-000004" / "adapter" / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x01
    weights.write_bytes(bytes(raw))
    assert "optimizer.pt is 100 bytes" in verify_checkpoint(root / "step-000006")
    assert "adapter/adapter_model.safetensors does not match its SHA-256" in verify_checkpoint(root / "step-000004")

    trainer = Trainer(trainable_model(tok), config, doc_examples(tok, 8), pad_token_id=tok.pad_token_id)
    assert trainer.resume() == root / "step-000002"
    err = capsys.readouterr().err
    assert f"checkpoint {root / 'step-000006'} is damaged (optimizer.pt is 100 bytes" in err
    assert f"checkpoint {root / 'step-000004'} is damaged (adapter/adapter_model.safetensors" in err
    assert trainer.step == 2
    # The damaged ones are kept for inspection under names that are never resumed from.
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004.damaged", "step-000006.damaged"]


def test_no_intact_checkpoint_is_a_clear_error(tmp_path, tok):
    root, config = _run_with_checkpoints(tmp_path, tok, steps=2)
    (root / "step-000002" / "rng.pt").unlink()
    trainer = Trainer(trainable_model(tok), config, doc_examples(tok, 8), pad_token_id=tok.pad_token_id)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*step-000002: rng.pt is missing"):
        trainer.resume()
    # An explicit path is verified too, before anything is loaded into the model.
    with pytest.raises(CheckpointError, match="step-000002 is damaged: rng.pt is missing"):
        trainer.resume(root / "step-000002")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        Trainer(trainable_model(tok), train_config(tmp_path / "empty", steps=2), doc_examples(tok, 8)).resume()


def test_train_config_seed_decides_dropout_and_data_order(tmp_path, tok):
    def run(seed, name):
        config = train_config(tmp_path / name, steps=3, seed=seed)
        return Trainer(trainable_model(tok, dropout=0.1), config, doc_examples(tok, 12), pad_token_id=tok.pad_token_id).train().losses

    torch.manual_seed(99)       # the global state before the run does not matter: the trainer seeds it
    first = run(1, "a")
    assert run(1, "b") == first
    assert run(2, "c")[1:] != first[1:]


def test_seeded_lora_init_is_the_same_on_every_device(device):
    # A is drawn on the CPU and copied over, so a GPU run starts from the CPU run's factors.
    cpu = _factors(ql.add_lora(tiny_model("llama"), ql.LoraConfig(r=4), seed=5))
    there = _factors(ql.add_lora(tiny_model("llama").to(device), ql.LoraConfig(r=4), seed=5))
    assert all(there[k].device.type == device and torch.equal(there[k].cpu(), cpu[k]) for k in cpu)


def test_staging_folders_of_dead_processes_are_removed_and_others_kept(tmp_path):
    dead = _dead_pid()
    host = staging_tag().split("-")[0]
    names = {f".adapter.partial-{host}-{dead}-abc": False,             # ours, its process is gone: removed
             f".adapter.partial-{host}-{os.getpid()}-abc": True,       # ours, still running: kept
             f".adapter.partial-0badc0de-{dead}-abc": True,            # another machine's: kept
             f".merged.partial-{host}-{dead}-abc": True}               # another target: kept
    for name in names:
        (tmp_path / name).mkdir()
    with staged_dir(tmp_path / "adapter") as staging:
        (staging / "file").write_text("x")
    assert {name: (tmp_path / name).exists() for name in names} == names
    assert (tmp_path / "adapter" / "file").read_text() == "x"


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid

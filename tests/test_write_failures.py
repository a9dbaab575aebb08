"""A full disk or a read-only folder while saving a checkpoint, an adapter or an export: a clear error, nothing partial, the old files intact.

Three ways to make a write fail, none of which fakes the writers themselves:
- `file_size_limit`: RLIMIT_FSIZE makes the kernel refuse any write past N bytes (EFBIG),
  the closest a test can get to a full disk without a separate filesystem;
- `enospc_on_write`: the Python-level write of one named file raises OSError(ENOSPC), the
  error a full disk gives, at a chosen point in the middle of a save;
- `read_only`: the folder is made read-only (chmod; as root, which ignores modes, the
  immutable attribute).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import resource
import shutil
import signal
import subprocess

import pytest
import torch
from conftest import doc_examples, train_config, trainable_model

import qlowrank as ql
from qlowrank.cli.main import main
from qlowrank.train import Trainer, list_checkpoints, verify_checkpoint


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Files in this process cannot grow past `limit` bytes while the block runs (kernel: EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@contextlib.contextmanager
def enospc_on_write(monkeypatch, name: str):
    """Writing a file called `name` (through pathlib) fails as on a full disk."""
    original = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if self.name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return original(self, data)

    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "write_bytes", write_bytes)
        yield


@contextlib.contextmanager
def read_only(folder: pathlib.Path):
    """Nothing can be created in `folder` while the block runs."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = lambda: folder.chmod(0o755)  # noqa: E731
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        undo = lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)  # noqa: E731
    else:
        pytest.skip("running as root without chattr: cannot make a folder read-only")
    try:
        with pytest.raises(OSError):
            (folder / "probe").mkdir()
        yield
    finally:
        undo()


def _leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tok):  # noqa: F811
    """A trainer after 2 steps, with checkpoints step-000001 and step-000002 and an adapter."""
    folder = tmp_path_factory.mktemp("run")
    trainer = Trainer(trainable_model(tok), train_config(folder, steps=2, save_every=1, keep_checkpoints=None), doc_examples(tok, 8),
                      pad_token_id=tok.pad_token_id)
    trainer.train()
    return trainer, folder / "out"


@pytest.fixture
def trained(run, tmp_path):
    """The module's trainer writing into a fresh copy of its output folder; its factors restored afterwards."""
    trainer, out = run
    shutil.copytree(out, tmp_path / "out")
    trainer.out_dir, trainer.step = tmp_path / "out", 2
    factors = [p.detach().clone() for p in ql.lora_parameters(trainer.model)]
    yield trainer, tmp_path / "out" / "checkpoints"
    with torch.no_grad():
        for p, saved in zip(ql.lora_parameters(trainer.model), factors):
            p.copy_(saved)


@pytest.mark.parametrize("fault", ["enospc-optimizer", "enospc-adapter", "efbig", "read-only"])
def test_failed_checkpoint_write_is_clear_and_leaves_the_previous_checkpoint_intact(trained, monkeypatch, fault):
    trainer, root = trained
    before = {p.name: (p / "manifest.json").read_bytes() for p in list_checkpoints(root)}
    trainer.step = 3
    faults = {
        "enospc-optimizer": lambda: enospc_on_write(monkeypatch, "optimizer.pt"),
        "enospc-adapter": lambda: enospc_on_write(monkeypatch, "adapter_model.safetensors"),
        "efbig": lambda: file_size_limit(4096),   # the adapter and optimizer files are larger
        "read-only": lambda: read_only(root),
    }
    with faults[fault]():
        with pytest.raises(OSError) as failed:
            trainer.save()
    message = str(failed.value)
    assert f"cannot write checkpoint {root / 'step-000003'}" in message
    assert "no partial folder was left behind and the previous checkpoint step-000002 is intact" in message
    expected = {"efbig": errno.EFBIG, "read-only": (errno.EPERM, errno.EACCES)}.get(fault, errno.ENOSPC)
    assert failed.value.errno in (expected if isinstance(expected, tuple) else (expected,))
    assert "\n" not in message
    assert {p.name: (p / "manifest.json").read_bytes() for p in list_checkpoints(root)} == before
    assert all(verify_checkpoint(p) is None for p in list_checkpoints(root))
    assert _leftovers(root) == []


@pytest.mark.parametrize("fault", ["efbig", "read-only"])
def test_failed_adapter_save_keeps_the_old_adapter(trained, fault):
    trainer, _ = trained
    adapter = trainer.out_dir / "adapter"
    old = (adapter / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        for p in ql.lora_parameters(trainer.model):
            p.add_(1.0)   # the adapter that fails to be written differs from the one on disk
    with (file_size_limit(4096) if fault == "efbig" else read_only(trainer.out_dir)):
        with pytest.raises(OSError, match=f"cannot write adapter {adapter}: .*the existing adapter is unchanged"):
            ql.save_adapter(trainer.model, adapter)
    assert (adapter / "adapter_model.safetensors").read_bytes() == old
    assert _leftovers(trainer.out_dir) == []


def test_failed_export_leaves_no_partial_folder_and_the_old_export_intact(trained, tmp_path, capsys):
    trainer, _ = trained
    out = tmp_path / "exports"
    out.mkdir()
    ql.export_merged(trainer.model, out / "merged", dtype="fp32", probe=False, progress=False)
    shard = out / "merged" / "model-00001-of-00001.safetensors"
    old = shard.read_bytes()
    with file_size_limit(64 * 1024):   # the fp32 shard is ~1 MB
        with pytest.raises(OSError, match=r"cannot write export .*File too large.*existing merged is unchanged"):
            ql.export_merged(trainer.model, out / "merged", dtype="fp32", probe=False, progress=False, overwrite=True)
    assert shard.read_bytes() == old and _leftovers(out) == []


def test_failed_gguf_export_leaves_no_partial_file_and_the_old_file_intact(tmp_path, tok):
    model = trainable_model(tok)
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")
    with file_size_limit(64 * 1024):   # the f32 file is ~0.5 MB
        # The gguf package writes with numpy's tofile, whose error names the short write, not its cause.
        with pytest.raises(OSError, match=r"cannot write GGUF export .*: \d+ requested and \d+ written; no partial "
                                          r"file was left behind and the existing model.gguf is unchanged"):
            ql.export_merged(model, out, format="gguf", gguf_type="f32", tokenizer=tok, overwrite=True, probe=False)
    assert out.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_cli_export_to_a_read_only_folder_is_one_line_exit_1(workdir, tmp_path, capsys):  # noqa: F811
    model = ql.load_model(workdir / "model", quant=ql.QuantConfig(bits=4), lora=ql.LoraConfig(r=4), device="cpu",
                          progress=False, seed=0)
    ql.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "exports"
    out.mkdir()
    with read_only(out):
        code = main(["export", "--model", str(workdir / "model"), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(out / "merged"), "--no-probe"])
    err = capsys.readouterr().err
    assert code == 1, err   # a write failure, not bad input
    lines = [line for line in err.splitlines() if "error" in line]   # the rest is the loading progress bar
    assert len(lines) == 1 and lines[0].startswith(f"qlowrank export: error: cannot write export {out / 'merged'}"), err
    assert "Traceback" not in err
    assert list(out.iterdir()) == []

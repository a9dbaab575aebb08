"""Real processes, real signals: the same seed gives the same run; SIGTERM / SIGINT checkpoint and exit 143 / 130.

Processes start concurrently (each spends ~5 s importing torch and transformers), so the
whole module costs about two process start-ups of wall time on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from qlowrank.cli.main import main
from qlowrank.train import list_checkpoints, verify_checkpoint

QLOWRANK = [sys.executable, "-m", "qlowrank"]
# A child that runs `qlowrank train` and, the first time a checkpoint manifest is written
# (only the interrupt checkpoint: --save-every is 0), sends itself a second signal in the
# middle of that write, then lets the write go on.
SECOND_SIGNAL = textwrap.dedent("""
    import os, signal, sys, time
    import qlowrank.train.checkpoint as checkpoint
    from qlowrank.cli.main import main
    write_manifest = checkpoint.write_manifest
    def interrupted_write(folder):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)   # the handler runs during this write
        return write_manifest(folder)
    checkpoint.write_manifest = interrupted_write
    sys.exit(main(sys.argv[1:]))
""")


def _train_args(workdir, out, *extra):
    return ["train", "--model", workdir / "model", "--data", workdir / "data.jsonl", "--out", out, "--seq", "64",
            "--batch", "2", "--r", "4", "--lr", "5e-3", "--dropout", "0.1", "--no-progress", *extra]


def _start(args, cwd, program=()):
    # A suite started in the background (`cmd &`, nohup) inherits SIGINT as ignored, which
    # qlowrank deliberately keeps; these children must see SIGINT as a terminal would.
    return subprocess.Popen([*(program or QLOWRANK), *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _losses(out):
    return [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


@pytest.fixture(scope="module")
def processes(workdir):
    """Three `qlowrank train` processes started together: two with the same seed, and one
    that runs until a SIGTERM stops it (started with a hook that sends it a SIGINT while the
    interrupt checkpoint is being written)."""
    same = [_start(_train_args(workdir, workdir / name, "--steps", "4", "--seed", "5"), workdir) for name in "ab"]
    term = _start(_train_args(workdir, workdir / "term", "--steps", "100000", "--eval-fraction", "0"), workdir,
                  program=[sys.executable, "-c", SECOND_SIGNAL])
    yield {"a": same[0], "b": same[1], "term": term}
    for process in (*same, term):
        if process.poll() is None:
            process.kill()
            process.communicate()


def _wait_for_steps(out, process, n, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.communicate()[1][-3000:]}")
        if (out / "metrics.jsonl").is_file() and len(_losses(out)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


def test_real_sigterm_checkpoints_the_last_completed_step_and_a_second_signal_does_not_corrupt_it(workdir, processes):
    process, out = processes["term"], workdir / "term"
    _wait_for_steps(out, process, 2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "SIGINT received again: already stopping" in stderr   # it arrived during the write
    last = len(_losses(out))                  # every completed step was logged before the signal was seen
    saved = list_checkpoints(out / "checkpoints")
    assert [p.name for p in saved] == [f"step-{last:06d}"]
    assert verify_checkpoint(saved[0]) is None   # complete and matching its manifest
    assert f"checkpoint of step {last} written" in stdout
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]   # no staging folder left


def test_two_processes_with_the_same_seed_train_identically(workdir, processes):
    for name in "ab":
        _, err = processes[name].communicate(timeout=300)
        assert processes[name].returncode == 0, err[-3000:]
    a, b = _losses(workdir / "a"), _losses(workdir / "b")
    assert len(a) == 4 and a == b            # bit-identical per-step losses (LoRA init, dropout, data order)
    weights = "adapter/adapter_model.safetensors"
    wa, wb = load_file(workdir / "a" / weights), load_file(workdir / "b" / weights)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_real_sigint_through_the_cli_exits_130_after_checkpointing(workdir, capsys):
    # In this process (no start-up cost): a thread sends SIGINT once two steps are logged.
    out = workdir / "sigint"

    def interrupt_when_training():
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(_losses(out)) >= 2):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=interrupt_when_training, daemon=True)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)   # see _start: not ignored here
    sender.start()
    try:
        code = main([str(a) for a in _train_args(workdir, out, "--steps", "100000", "--eval-fraction", "0")])
    finally:
        signal.signal(signal.SIGINT, previous)
    sender.join()
    assert code == 130
    last = len(_losses(out))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step-{last:06d}"]
    assert f"checkpoint of step {last} written" in capsys.readouterr().out

"""`estimate --calibrate`: the model cut to 1 and 2 blocks, trained in fresh processes, extrapolated by depth."""

from __future__ import annotations

import json

from conftest import tiny_config

from qlowrank.cli.main import main
from qlowrank.memory.meta_model import layer_count, with_depth

# A CPU process's runtime alone (torch, transformers, bitsandbytes imported) is ~300 MiB
# (process.py's CPU_RUNTIME_BYTES: 327 MiB measured); a stand-in that measured less did not run.
MIN_RUNTIME_BYTES = 200 * 2**20


def test_a_stand_in_keeps_everything_but_the_depth():
    config = tiny_config("llama")
    config.num_hidden_layers = 6
    cut = with_depth(config, 2)
    assert layer_count(cut) == 2 and layer_count(config) == 6
    assert (cut.vocab_size, cut.hidden_size, cut.intermediate_size) == (config.vocab_size, config.hidden_size,
                                                                         config.intermediate_size)


def test_calibrate_measures_two_stand_ins_and_extrapolates_by_depth(tmp_path, capsys):
    config = tiny_config("llama")
    config.num_hidden_layers = 5
    config.save_pretrained(tmp_path)
    flags = ["estimate", "--model", str(tmp_path), "--device", "cpu", "--bits", "4", "--r", "4", "--batch", "2",
             "--seq", "64"]
    assert main([*flags, "--calibrate", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    anon = {int(k): v for k, v in result["stand_in_anon_peaks"].items()}
    tensors = {int(k): v for k, v in result["stand_in_tensor_peaks"].items()}
    assert sorted(anon) == [1, 2] and all(v > MIN_RUNTIME_BYTES for v in anon.values())
    assert tensors[1] < tensors[2] < result["total_bytes"]   # deeper models hold more tensors
    per_block = max(0, (anon[2] - tensors[2]) - (anon[1] - tensors[1]))
    assert result["per_block_bytes"] == per_block
    assert result["calibrated_training_bytes"] == result["total_bytes"] + anon[2] - tensors[2] + 3 * per_block
    assert result["calibrated_process_bytes"] == max(result["calibrated_training_bytes"], result["load_peak"])


def test_calibrate_refuses_what_its_stand_ins_do_not_reproduce(tmp_path, capsys):
    tiny_config("llama").save_pretrained(tmp_path)
    code = main(["estimate", "--model", str(tmp_path), "--device", "cpu", "--seq", "64", "--packing", "--calibrate"])
    assert code == 2
    assert "--calibrate does not reproduce --packing" in capsys.readouterr().err


def test_calibrate_is_a_cpu_measurement(tmp_path, capsys):
    tiny_config("llama").save_pretrained(tmp_path)
    assert main(["estimate", "--model", str(tmp_path), "--seq", "64", "--device", "cuda", "--calibrate"]) == 2
    assert "--device cuda (the stand-ins measure this machine's CPU process: give --device cpu)" in capsys.readouterr().err

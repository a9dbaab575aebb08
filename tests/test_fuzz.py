"""Seeded fuzzing of every file the CLI reads: data files, adapters, config files.

Each generated case is a broken input run through the real command line (`qlowrank.cli.main`
in this process: the same argv handling without a 5 s interpreter start-up per case; a
sample also runs as real `python -m qlowrank` processes). Every case must end with exit
code 2 and exactly one error line that names the file (and the line or key where there is
one): never a traceback, a hang or growing memory.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlowrank as ql
from qlowrank.cli.main import main
from qlowrank.cli.train import add_train_arguments

SEED = 10
N_DATA, N_ADAPTER, N_CONFIG = 190, 80, 40
HANG_SECONDS = 30              # one case: a tokenizer load and at most one tiny model load (~0.3 s)
# RSS may grow by what the allocator keeps after the 50 MB case and by caches filled once
# (tokenizer files, torch kernels); measured growth from the 40th case to the end: ~4 MiB.
# A leak of one decoded data file per case would add 300 x (>= 1 KiB); a leaked 50 MB
# line alone would break the bound.
MEMORY_GROWTH_LIMIT = 40 * 2**20
BIG_LINE_BYTES = 50 * 2**20

VALID_ROWS = [
    {"text": "The pass statement does nothing."},
    {"prompt": "What is a tuple?\n", "completion": " An immutable sequence."},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]},
    {"text": "raw separators that are not line ends in JSONL: \u2028 \x85 \x0c \r end"},
]
NON_STRINGS = [0, -1, 2.5, True, None, [], ["a"], {}, {"a": 1}]


@dataclass
class Case:
    name: str
    argv: list[str]
    names: list[str]   # substrings the error line must hold: the file, and the line or key


def _garbage(rng: random.Random, depth: int = 0):
    """A random JSON value (nested lists / objects / scalars) with keys that are no row field."""
    kind = rng.randrange(6 if depth < 5 else 4)
    if kind == 0:
        return rng.randint(-10**6, 10**6)
    if kind == 1:
        return rng.random() * 1e6
    if kind == 2:
        return "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(0, 12)))
    if kind == 3:
        return rng.choice([None, True, False])
    if kind == 4:
        return [_garbage(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {f"k{rng.randint(0, 999)}": _garbage(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _bad_row(rng: random.Random) -> tuple[str, bytes]:
    """(kind, one broken row as a JSON line's bytes)."""
    kind = rng.choice(["type", "role", "garbage", "non-object", "syntax", "deep", "bigint", "surrogate",
                       "no-assistant", "utf8"])
    value = rng.choice(NON_STRINGS)
    if kind == "type":
        row = rng.choice([{"text": value}, {"prompt": value, "completion": "c"}, {"prompt": "p", "completion": value},
                          {"messages": value}, {"messages": [value]},
                          {"messages": [{"role": "user", "content": value}, {"role": "assistant", "content": "a"}]}])
        return kind, json.dumps(row).encode()
    if kind == "role":
        role = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_ ") for _ in range(rng.randint(1, 12)))
        row = {"messages": [{"role": role, "content": "x"}, {"role": "assistant", "content": "y"}]}
        return kind, json.dumps(row).encode()
    if kind == "garbage":
        return kind, json.dumps({f"x{rng.randint(0, 99)}": _garbage(rng)}).encode()
    if kind == "non-object":
        return kind, json.dumps(rng.choice([1, "text", None, True, [1, 2], [{"text": "a"}]])).encode()
    if kind == "syntax":
        line = json.dumps(rng.choice(VALID_ROWS))
        return kind, (line[:rng.randint(1, len(line) - 1)] if rng.random() < 0.7 else line + ",}").encode()
    if kind == "deep":
        depth = rng.choice([1000, 10**5])
        return kind, ("[" * depth + "]" * depth).encode() if rng.random() < 0.5 else (
            '{"text": ' + "[" * depth + "]" * depth + "}").encode()
    if kind == "bigint":
        return kind, ('{"text": ' + "7" * rng.randint(4400, 6000) + "}").encode()
    if kind == "surrogate":
        return kind, b'{"text": "abc\\ud800 def"}'
    if kind == "no-assistant":
        return kind, json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode()
    good = json.dumps(rng.choice(VALID_ROWS)).encode()   # invalid UTF-8 bytes inside a valid-looking row
    cut = rng.randint(1, len(good) - 1)
    return kind, good[:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]) + good[cut:]


def data_cases(rng: random.Random, folder: Path, model: Path) -> list[Case]:
    def train(*paths: Path) -> list[str]:
        return ["train", "--model", str(model), "--data", *map(str, paths), "--out", str(folder / "out")]

    cases = []
    for i in range(N_DATA):
        style = rng.choice(["jsonl"] * 6 + ["json", "random-bytes", "empty", "suffix", "missing", "second-file"])
        path = folder / f"d{i}.jsonl"
        if style in ("jsonl", "json"):
            crlf, bom = rng.random() < 0.3, rng.random() < 0.3
            rows = [json.dumps(rng.choice(VALID_ROWS), ensure_ascii=False).encode() for _ in range(rng.randint(0, 5))]
            kind, bad = _bad_row(rng)
            at = len(rows)
            rows += [bad] + [json.dumps(rng.choice(VALID_ROWS)).encode() for _ in range(rng.randint(0, 3))]
            newline = b"\r\n" if crlf else b"\n"
            if style == "json" and kind not in ("syntax", "utf8", "deep"):   # those may end past their line in an array
                path = path.with_suffix(".json")
                body, line = b"[" + newline + (b"," + newline).join(rows) + newline + b"]", at + 2
            else:
                body, line = newline.join(rows) + newline, at + 1
            path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body)
            cases.append(Case(f"{style}-{kind}{'-crlf' if crlf else ''}{'-bom' if bom else ''}", train(path),
                              [f"{path}:{line}:"]))
        elif style == "random-bytes":
            path = path.with_suffix(rng.choice([".jsonl", ".json", ".txt"]))
            raw = bytearray(rng.randbytes(rng.randint(1, 4096)))
            raw[rng.randrange(len(raw))] = 0xFF            # never valid UTF-8
            path.write_bytes(bytes(raw))
            try:
                bytes(raw).decode("utf-8")
            except UnicodeDecodeError as err:   # the line of the first byte that is not UTF-8
                cases.append(Case("random-bytes", train(path), [f"{path}:{raw[:err.start].count(10) + 1}:"]))
        elif style == "empty":
            path = path.with_suffix(rng.choice([".jsonl", ".json", ".txt"]))
            path.write_bytes(rng.choice([b"", b"\n\n", b"   \r\n", b"\xef\xbb\xbf"]) if path.suffix != ".json"
                             else rng.choice([b"[]", b"\xef\xbb\xbf[ ]\r\n"]))
            cases.append(Case("empty", train(path), [str(path), "no usable rows"]))
        elif style == "suffix":
            path = path.with_suffix(rng.choice([".csv", ".parquet", ".bin", ".xml", ""]))
            path.write_bytes(rng.randbytes(64))
            known = path.suffix in (".csv", ".parquet")   # table formats: read, and found broken
            cases.append(Case("suffix", train(path), [str(path)] + ([] if known else ["unknown data format"])))
        elif style == "missing":
            cases.append(Case("missing", train(path), [str(path), "no such data file"]))
        else:
            good = folder / f"good{i}.jsonl"
            good.write_text(json.dumps(VALID_ROWS[0]) + "\n")
            path.write_bytes(_bad_row(rng)[1].replace(b"\n", b" ") + b"\n")
            cases.append(Case("second-file", train(good, path), [f"{path}:1:"]))
    big = folder / "big.jsonl"   # one 50 MB line that never closes its string
    with open(big, "wb") as handle:
        handle.write(b'{"text": "')
        handle.write(b"a" * BIG_LINE_BYTES)
    cases.insert(len(cases) // 2, Case("50MB-line", train(big), [f"{big}:1:"]))
    return cases


def adapter_cases(rng: random.Random, folder: Path, model: Path, adapter: Path) -> list[Case]:
    weights = load_file(adapter / "adapter_model.safetensors")
    keys = sorted(weights)
    config = json.loads((adapter / "adapter_config.json").read_text())
    cases = []
    for i in range(N_ADAPTER):
        case = folder / f"a{i}"
        shutil.copytree(adapter, case)
        st, cfg, side = case / "adapter_model.safetensors", case / "adapter_config.json", case / "qlowrank_adapter.json"
        kind = rng.choice(["truncate", "header-length", "header-garbage", "dtype", "nan", "shape", "rank",
                           "missing-key", "unexpected-key", "config-garbage", "config-value", "sidecar", "no-weights"])
        key = rng.choice(keys)
        module = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
        names = [str(st)]
        if kind == "truncate":
            raw = st.read_bytes()
            st.write_bytes(raw[:rng.randrange(len(raw))])
        elif kind == "header-length":
            raw = st.read_bytes()
            st.write_bytes(struct.pack("<Q", len(raw) + rng.randint(1, 2**40)) + raw[8:])
        elif kind == "header-garbage":
            raw = bytearray(st.read_bytes())
            start = rng.randrange(8, 8 + struct.unpack("<Q", raw[:8])[0])
            raw[start:start + 1] = rng.choice([b"\xff", b"\x00", b"\xc3\x28"])   # never valid in a JSON header
            st.write_bytes(bytes(raw))
        elif kind in ("dtype", "nan", "shape"):
            tensors = dict(weights)
            if kind == "dtype":
                tensors[key] = tensors[key].to(rng.choice([torch.int32, torch.int64, torch.uint8, torch.bool, torch.int8]))
                names.append(key)
            elif kind == "nan":
                bad = tensors[key].clone()
                bad.view(-1)[rng.randrange(bad.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
                tensors[key] = bad
                names.append(key)
            else:
                shape = list(tensors[key].shape)
                new = rng.choice([[shape[0] + 1, shape[1]], [shape[0], shape[1] + 3], shape[::-1] if shape[0] != shape[1]
                                  else [shape[0] + 2, shape[1]], [shape[0] * shape[1]], [1, *shape]])
                tensors[key] = torch.zeros(new)
                names.append(key if len(new) != 2 else module)
            save_file(tensors, str(st))
        elif kind == "rank":
            cfg.write_text(json.dumps({**config, "r": config["r"] + rng.randint(1, 8)}))
            names = [str(st), module.split(".")[0]]   # every layer's shapes are named
        elif kind == "missing-key":
            save_file({k: v for k, v in weights.items() if k != key}, str(st))
            names.append(module)
        elif kind == "unexpected-key":
            extra = rng.choice(["base_model.model.model.layers.0.mlp.nowhere.lora_A.weight", "base_model.model.lm_head.weight",
                                "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"])
            save_file({**weights, extra: torch.zeros(4, 64)}, str(st))
            names.append(extra.removeprefix("base_model.model.").rsplit(".", 2)[0] if "lora_" in extra else extra)
        elif kind == "config-garbage":
            cfg.write_bytes(rng.choice([rng.randbytes(rng.randint(0, 200)), b"[1, 2]", b'"LORA"',
                                        json.dumps(config).encode()[:rng.randint(0, 50)], b"\xff\xfe{}"]))
            names = [str(cfg)]
        elif kind == "config-value":
            field = rng.choice(["r", "r", "lora_alpha", "lora_dropout", "use_rslora", "peft_type"])
            value = rng.choice({"r": ["8", 0, -4, 2.5, True, None, [], {"r": 4}],
                                "lora_alpha": ["16", 0, -1, None, True, [], float("inf")],
                                "lora_dropout": [1.0, -0.1, "0.1", True, []], "use_rslora": ["yes", 1, None, []],
                                "peft_type": ["PREFIX_TUNING", None, 5]}[field])
            changed = {**config, field: value}
            if rng.random() < 0.2 and field == "r":
                del changed["r"]
            cfg.write_text(json.dumps(changed))
            names = [str(cfg), field]
        elif kind == "sidecar":
            choice = rng.randrange(4)
            side.write_bytes([b"{not json", b"[]", json.dumps({"base_quant": {"bits": 3}}).encode(),
                              json.dumps({"base_quant": {"quant_type": "int2", "bits": 4}}).encode()][choice])
            names = [str(side)] + (["base_quant"] if choice >= 2 else [])
        else:
            st.unlink()
            names = [str(st), "not found"]
        argv = ["export", "--model", str(model), "--adapter", str(case), "--out", str(folder / f"x{i}"), "--no-probe"]
        cases.append(Case(f"adapter-{kind}", argv, names))
    return cases


def _train_option_kinds() -> dict[str, tuple[type, object, bool]]:
    """Each `qlowrank train` option (what a config file may set) -> (value type, nargs, is an on/off flag),
    read from the public parser builder (cli/train.py keeps its own table private)."""
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return {a.dest: (a.type or str, a.nargs, a.nargs == 0 and a.const is True)
            for a in parser._actions if a.dest != "help"}


def config_cases(rng: random.Random, folder: Path, model: Path, data: Path) -> list[Case]:
    kinds = _train_option_kinds()
    options = sorted(k for k in kinds if k != "config")
    cases = []
    for i in range(N_CONFIG):
        kind = rng.choice(["garbage", "utf8", "non-object", "toml", "unknown", "type", "nan", "range"])
        path, names = folder / f"c{i}.json", []
        if kind == "garbage":
            path.write_bytes(rng.choice([rng.randbytes(rng.randint(1, 300)).replace(b"\xff", b"") + b"\xff",
                                         b'{"steps": 3', b"steps = 3", b"{'r': 4}"]))
        elif kind == "utf8":
            path.write_bytes(b'{"out": "\xc3\x28"}')
        elif kind == "non-object":
            path.write_text(rng.choice(["[]", "3", '"text"', "null"]))
        elif kind == "toml":
            path = path.with_suffix(".toml")
            path.write_text(rng.choice(["r = ", "[[[", 'r = "eight"', "steps = 1.5", "r = 4\nr = 5"]))
            names = ["r"] if "eight" in path.read_text() else ["steps"] if "1.5" in path.read_text() else []
        elif kind == "unknown":
            name = rng.choice(["learning_rate", "rank", "epochz", "lora-r", "model_path"])
            path.write_text(json.dumps({name: 1}))
            names = [name.replace("-", "_")]
        elif kind == "type":
            option = rng.choice(options)
            kind_of, nargs, flag = kinds[option]
            # (a string for a plain string option would be valid: only lists and objects are wrong there)
            wrong = {int: [3.5, "3", True], float: ["fast", True]}.get(kind_of, []) + [[1], {"a": 1}]
            # (null is not wrong anywhere: a config file's null means "this option's default")
            value = rng.choice(wrong) if not flag else rng.choice(["yes", 1, 0])
            if nargs == "+":
                value = rng.choice([3, [], [1], {"a": 1}])
            path.write_text(json.dumps({option: value}))
            names = [option]
        elif kind == "nan":
            option = rng.choice(["lr", "dropout", "weight_decay", "eval_fraction", "min_lr_ratio", "alpha"])
            path.write_text('{"%s": %s}' % (option, rng.choice(["NaN", "Infinity", "-Infinity"])))
            names = [option]
        else:
            option, value = rng.choice([("r", 0), ("steps", -3), ("batch", 0), ("dropout", 1.5), ("grad_accum", 0)])
            path.write_text(json.dumps({option: value}))
            names = [option]
        argv = ["train", "--config", str(path), "--model", str(model), "--data", str(data), "--out", str(folder / "o")]
        cases.append(Case(f"config-{kind}", argv, [str(path), *names]))
    return cases


@contextlib.contextmanager
def _deadline(seconds: int):
    def hung(signum, frame):
        raise TimeoutError(f"a fuzz case ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with _deadline(HANG_SECONDS), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:   # argparse usage errors
            code = exit_.code
    return code, err.getvalue()


def _check(case: Case, code, stderr: str) -> str | None:
    errors = [line for line in stderr.splitlines() if line.startswith("qlowrank ")]
    if code != 2 or len(errors) != 1 or "Traceback" in stderr:
        return f"{case.name}: exit {code}, stderr {stderr[-600:]!r}"
    missing = [name for name in case.names if name not in errors[0]]
    if missing:
        return f"{case.name}: the error line lacks {missing}: {errors[0][:400]!r}"
    return None


@pytest.fixture(scope="module")
def cases(workdir, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("fuzz")
    model = ql.load_model(workdir / "model", quant=ql.QuantConfig(bits=None, compute_dtype=torch.float32),
                          lora=ql.LoraConfig(r=4), device="cpu", progress=False, seed=0)
    ql.save_adapter(model, folder / "adapter")
    rng = random.Random(SEED)
    return (data_cases(rng, folder, workdir / "model")
            + adapter_cases(rng, folder, workdir / "model", folder / "adapter")
            + config_cases(rng, folder, workdir / "model", workdir / "data.jsonl"))


def test_every_fuzzed_file_gets_exit_2_and_one_line_naming_it(cases):
    assert len(cases) >= 300
    failures, warm_rss = [], None
    for number, case in enumerate(cases):
        if number == 40:
            warm_rss = _rss()
        problem = _check(case, *_run(case.argv))
        if problem:
            failures.append(problem)
    growth = _rss() - warm_rss
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:30])
    print(f"{len(cases)} cases; RSS growth from case 40 to the end: {growth / 2**20:.1f} MiB")
    assert growth < MEMORY_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB over {len(cases) - 40} cases"
    kinds = {case.name.split("-")[0] for case in cases}
    assert {"jsonl", "json", "random", "empty", "50MB", "adapter", "config"} <= kinds


def test_a_sample_as_real_processes(cases):
    rng = random.Random(SEED)
    sample = [rng.choice([c for c in cases if c.name.startswith(prefix)]) for prefix in ("jsonl", "adapter")]
    processes = [subprocess.Popen([sys.executable, "-m", "qlowrank", *case.argv], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for case in sample]
    for case, process in zip(sample, processes):
        _, stderr = process.communicate(timeout=120)
        assert _check(case, process.returncode, stderr) is None

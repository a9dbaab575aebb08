"""The figures README and RESULTS.md quote are the ones the benchmark JSONs hold.

benchmarks/summary.py renders each page's generated block from the JSONs; these tests fail when a
block differs from that rendering (a hand-edited number, or a JSON rewritten without
`python benchmarks/summary.py --write`), and check that the one-GPU script and its pieces stop
cleanly on a machine without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import py_compile
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# Without a GPU, gpu_all.sh stops before it imports anything: nvidia-smi's absence takes milliseconds,
# so 10 s only allows for a loaded machine.
NO_GPU_EXIT_SECONDS = 10
GPU_PIECES = ("gpu_memory.py", "gpu_vs_peft.py", "gpu_collect.py", "demo.py", "summary.py")


def _summary():
    spec = importlib.util.spec_from_file_location("bench_summary", BENCH / "summary.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


summary = _summary()


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def test_generated_blocks_equal_what_the_jsons_render_now():
    problems = summary.differences(summary.read_pages())
    assert not problems, "run `python benchmarks/summary.py --write`:\n" + "\n".join(problems)


@pytest.mark.parametrize("page, block", [(page, name) for page, blocks in summary.BLOCKS.items() for name in blocks])
def test_a_number_edited_by_hand_is_reported(page, block):
    pages = summary.read_pages()
    text = summary.block_text(pages[page], block)
    figures_from = text.rfind("---|") + 1   # a figure of the table's first row, or README's first figure
    digit = re.compile(r"\d").search(text, figures_from)
    edited = text[:digit.start()] + str((int(digit.group()) + 1) % 10) + text[digit.end():]
    pages[page] = pages[page].replace(text, edited, 1)
    problems = summary.differences(pages)
    assert len(problems) == 1 and problems[0].startswith(f"{page}: summary:{block} differs"), problems


def test_a_removed_block_is_reported():
    pages = summary.read_pages()
    start, end = summary.markers("readme")
    pages["README.md"] = re.sub(re.escape(start) + ".*?" + re.escape(end), "", pages["README.md"], flags=re.S)
    assert summary.differences(pages) == ["README.md: the summary:readme block is missing"]


def test_every_figure_links_its_json_and_says_when_and_how():
    rows = summary.figures()
    assert len(rows) >= 10
    for row in rows:
        assert row.source.endswith(".json") and row.command and row.date, row
        if row.topic != "GPU":   # the GPU row exists before its JSON does
            assert (BENCH / row.source).is_file(), row


def test_the_gpu_row_says_not_measured_exactly_while_gpu_all_json_is_absent():
    table = summary.render_table("")
    assert ("not measured on a GPU yet" in table) == (not (BENCH / "gpu_all.json").is_file())


def test_a_json_with_headline_entries_is_rendered_and_absent_ones_are_left_out(tmp_path, monkeypatch):
    figure = {"topic": "Preference tuning", "figure": "held-out pair accuracy 0.69", "command": "python x.py"}
    (tmp_path / "preference.json").write_text(json.dumps({"date": "2026-12-07", "headline": [figure]}))
    monkeypatch.setattr(summary, "HERE", tmp_path)   # a benchmarks folder holding this one JSON only
    rows = summary.figures()
    assert [r.topic for r in rows] == ["Preference tuning", "GPU"]
    assert rows[0].figure == figure["figure"] and rows[0].date == "2026-12-07"
    assert "not measured on a GPU yet" in rows[1].figure


def test_gpu_pieces_compile(tmp_path):
    for name in GPU_PIECES:
        py_compile.compile(str(BENCH / name), cfile=str(tmp_path / (name + "c")), doraise=True)
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_all.sh")]).returncode == 0


@pytest.mark.skipif(_has_gpu(), reason="with a GPU the script measures for minutes")
def test_gpu_all_says_there_is_no_gpu_and_stops_at_once():
    started = time.perf_counter()
    done = subprocess.run(["bash", str(BENCH / "gpu_all.sh")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "no NVIDIA GPU" in done.stderr and "nothing measured" in done.stderr
    assert time.perf_counter() - started < NO_GPU_EXIT_SECONDS
    assert not (BENCH / "gpu_all.json").is_file()


@pytest.mark.skipif(_has_gpu(), reason="with a GPU the scripts measure")
@pytest.mark.parametrize("command", [["gpu_memory.py"], ["gpu_vs_peft.py"], ["demo.py", "--device", "cuda"]])
def test_gpu_scripts_refuse_to_run_without_cuda(command):
    done = subprocess.run([sys.executable, str(BENCH / command[0]), *command[1:]], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 1 and "needs an NVIDIA GPU" in done.stderr, done.stderr[-2000:]

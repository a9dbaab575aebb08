"""Benchmark: memory of a preference step (DPO, ORPO) on the real SmolLM2-135M, 4-bit, CPU: measured vs estimated,
and DPO with its reference as the same base with LoRA off vs with a second loaded copy of the model.

    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/preference_memory.py [--steps 3] [--seq 256 --batch 2]

Each run is `qlowrank train --objective ...` in a fresh process, sampled through /proc every 10 ms (RssAnon: what
has to fit), beside what `qlowrank train --dry-run` predicts for the same flags. "DPO + a second copy" loads the model
once more in the same process before training, as a trainer that holds a separate reference model does (the
second copy is only held: its forward would add the same transient the LoRA-off forward adds). Pairs: pydoc_data
topics, the right text against another topic's, both sides cut to --seq. Results: benchmarks/preference_memory.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "preference_memory.json"
MIB = 2**20

CHILD = r"""
import sys
from qlowrank.memory.sampler import StatusSampler

with StatusSampler() as sampler:
    extra = None
    if sys.argv[1] == "--second-copy":   # a reference model held beside the policy, as without LoRA's free one
        import qlowrank as ql
        model_path = sys.argv[sys.argv.index("--model") + 1]
        extra = ql.load_model(model_path, quant=ql.QuantConfig(), device="cpu", progress=False)
        sys.argv.pop(1)
    from qlowrank.cli.main import main
    code = main(sys.argv[1:])
print(f"ANON_PEAK {sampler.anon_peak}", flush=True)
sys.exit(code)
"""


def write_pairs(path: Path, chars: int = 3000) -> int:
    from pydoc_data.topics import topics

    keys = [k for k in sorted(topics) if len(topics[k]) >= chars]
    with open(path, "w") as handle:
        for i, key in enumerate(keys):
            other = keys[(i + 7) % len(keys)]
            handle.write(json.dumps({"prompt": f"Topic {key}:\n", "chosen": topics[key][:chars],
                                     "rejected": topics[other][:chars]}) + "\n")
    return len(keys)


def run(flags: list[str], second_copy: bool = False) -> int:
    """The anonymous peak of one `qlowrank train` in a fresh process."""
    done = subprocess.run([sys.executable, "-c", CHILD, *(["--second-copy"] if second_copy else []), "train", *flags],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return int(re.search(r"ANON_PEAK (\d+)", done.stdout)[1])


def predicted(flags: list[str]) -> int:
    from qlowrank.cli.main import build_parser
    from qlowrank.cli.sizing import estimate_for_args
    from qlowrank.cli.train import resolve_options

    return estimate_for_args(resolve_options(build_parser().parse_args(["train", *flags]))).process_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    from qlowrank.model.embedded import smollm2_gguf

    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        pairs = write_pairs(work / "pairs.jsonl")
        for name, objective, second in (("DPO (reference: LoRA off)", "dpo", False), ("ORPO (no reference)", "orpo", False),
                                        ("DPO + a second copy of the model", "dpo", True)):
            flags = ["--model", str(smollm2_gguf()), "--data", str(work / "pairs.jsonl"), "--objective", objective,
                     "--bits", "4", "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                     "--eval-fraction", "0", "--no-progress", "--device", "cpu", "--out", str(work / f"out-{len(rows)}")]
            anon = run(flags, second)
            estimate = predicted(flags) if not second else None
            rows.append({"name": name, "objective": objective, "second_copy": second, "anon_peak_bytes": anon,
                         "predicted_bytes": estimate, "error": estimate / anon - 1 if estimate else None})
            print(f"{name:<34} measured {anon / MIB:7.1f} MiB" + (f"  predicted {estimate / MIB:7.1f} MiB "
                  f"({estimate / anon - 1:+.1%})" if estimate else ""), flush=True)
    saving = rows[2]["anon_peak_bytes"] - rows[0]["anon_peak_bytes"]
    print(f"a second copy of the model would add {saving / MIB:.1f} MiB to the DPO process")
    result = {"command": "benchmarks/preference_memory.py " + " ".join(sys.argv[1:]), "model": "SmolLM2-135M-Instruct "
              "(bundled GGUF), 4-bit NF4, LoRA r=16 all-linear, checkpointing, CPU", "pairs": pairs,
              "seq": args.seq, "batch": args.batch, "steps": args.steps, "rows": rows, "second_copy_adds_bytes": saving}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

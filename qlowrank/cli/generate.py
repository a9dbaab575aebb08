"""`qlowrank generate`: see what a fine-tune does without writing code; streams replies as they are generated.

    qlowrank generate --model BASE --adapter RUN/adapter --prompt "Explain the assert statement."
    qlowrank generate --model RUN/merged                     # a chat session on stdin (empty line or EOF ends it)

With --adapter the base is rebuilt as it was trained (4-bit, 8-bit or float, read from the
adapter's qlowrank_adapter.json; --bits overrides) and the adapter is loaded on top; a merged
export loads as a plain float model (--bits 4 quantizes it on the way in). When the tokenizer
has a chat template, the prompt is sent as a user message (--raw sends it as plain text).
Greedy by default; --sample draws with --temperature / --top-p / --top-k (seeded by --seed).
The reply goes to stdout; everything else to stderr.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..config import QuantConfig, parse_dtype
from .errors import exit_2_on_bad_input


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="stream a reply (or a chat session) from a model, with an adapter",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="model directory, merged export or .gguf file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--adapter", default=None, help="adapter directory to load on the base (qlowrank's or PEFT's)")
    parser.add_argument("--bits", choices=["4", "8", "none"], default=None,
                        help="store the base in 4/8 bits (default: as the adapter was trained; none without adapter)")
    parser.add_argument("--prompt", default=None, help="one prompt; without it, a chat session reads lines from stdin")
    parser.add_argument("--system", default=None, help="system message (chat template only)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as plain text, not through the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest reply in tokens [default: 128]")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7, help="with --sample [default: 0.7]")
    parser.add_argument("--top-p", type=float, default=0.9, help="with --sample [default: 0.9]")
    parser.add_argument("--top-k", type=int, default=50, help="with --sample [default: 50]")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats [default: 1.0]")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed [default: 0]")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                        help="compute dtype (bf16 is fast on CPUs and GPUs; fp16 is refused on CPUs) [default: bf16]")
    parser.add_argument("--device", default=None, help="cpu or cuda [default: cuda if present]")
    parser.set_defaults(func=exit_2_on_bad_input("generate", run))


def load_for_generation(args: argparse.Namespace):
    """(model, tokenizer) as the options describe: the base (quantized as trained) + adapter, or a merged export."""
    from ..adapter import load_adapter, read_adapter_config
    from ..model.load import load_model
    from .estimate import default_model
    from .export import base_quant
    from .train import load_tokenizer

    dtype = parse_dtype(args.dtype, "--dtype")
    path = default_model(args.model)
    if args.adapter:
        _, sidecar = read_adapter_config(args.adapter)
        quant = base_quant(sidecar, args.bits, args.dtype)
    else:
        quant = QuantConfig(bits=None if args.bits in (None, "none") else int(args.bits), compute_dtype=dtype)
    model = load_model(path, quant=quant, device=args.device, dtype=dtype, progress=False)
    if args.adapter:
        load_adapter(model, args.adapter)
    return model.eval(), load_tokenizer(path)


def _prompt_ids(tokenizer, history: list[dict], raw: bool) -> torch.Tensor:
    if raw or not getattr(tokenizer, "chat_template", None):
        return tokenizer("\n".join(m["content"] for m in history), return_tensors="pt")["input_ids"]
    return tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def reply(model, tokenizer, history: list[dict], args: argparse.Namespace, out=None) -> str:
    """Generate the next reply to `history`, streaming its text to `out` (stdout) as it comes."""
    from transformers import TextStreamer

    out = out or sys.stdout
    ids = _prompt_ids(tokenizer, history, args.raw).to(model.device)   # (1, T)

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text)
            out.flush()

    options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                   repetition_penalty=args.repetition_penalty,
                   pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if args.sample:
        torch.manual_seed(args.seed)
        options.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    else:   # a model's generation_config may ask for sampling; greedy means greedy
        options.update(temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=_Streamer(
            tokenizer, skip_prompt=True, skip_special_tokens=True), **options)
    out.write("\n")
    out.flush()
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    model, tokenizer = load_for_generation(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        reply(model, tokenizer, system + [{"role": "user", "content": args.prompt}], args)
        return 0
    chat = bool(getattr(tokenizer, "chat_template", None)) and not args.raw
    print("chat session: type a message, an empty line or Ctrl-D ends it"
          + ("" if chat else " (no chat template: each line is a plain prompt)"), file=sys.stderr)
    history = list(system)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        history.append({"role": "user", "content": line.rstrip("\n")})
        text = reply(model, tokenizer, history if chat else history[-1:], args)
        history.append({"role": "assistant", "content": text})

"""Translation between qlowrank's adapters and PEFT's adapter_config.json, both ways.

What PEFT's LoRA format can express: r / lora_alpha with `rank_pattern` / `alpha_pattern`
overrides, rsLoRA, DoRA (`use_dora`, saved as `<path>.lora_magnitude_vector`),
`modules_to_save` (saved as `<path>.<param>`), and `init_lora_weights` True / "gaussian" /
"pissa". What it cannot express, because PEFT would build a different frozen base from the
original checkpoint than the one qlowrank trained on:

- LoftQ with more than one iteration (the base becomes quant(W - s B0 A0));
- PiSSA on a quantized base (the quantized residual; PEFT refuses PiSSA on quantized weights);
- PiSSA computed with the randomized SVD (PEFT recomputes a full SVD, or its own random one).

Those adapters are saved with `format="qlowrank"`: the same files, with the initialisation
(init, iterations, SVD, seed) in the `qlowrank_adapter.json` sidecar, from which
`adapter_lora_config` rebuilds the LoraConfig that `load_model` needs to recreate the base.
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from ..config import LoraConfig
from ..state import state_of

PEFT_INITS = {True: "kaiming", "gaussian": "gaussian", "pissa": "pissa", "loftq": "loftq"}


def peft_inexpressible(layers: dict, quantized: bool) -> list[str]:
    """Why PEFT could not rebuild this model from the original base plus the adapter (empty: it can)."""
    reasons = []
    inits = {(layer.init, getattr(layer, "loftq_iters", 1), layer.svd) for layer in layers.values()}
    for init, iters, svd in sorted(inits, key=str):
        if init == "loftq" and iters > 1:
            reasons.append(f"LoftQ with {iters} iterations trains on the base quant(W - s*B0*A0), which PEFT cannot "
                           "rebuild from the original weights")
        if init == "pissa" and quantized:
            reasons.append("PiSSA on a quantized base trains on the quantized residual of W, which PEFT cannot "
                           "rebuild (it refuses PiSSA on quantized weights)")
        elif init == "pissa" and svd != "full":
            reasons.append("PiSSA with the randomized SVD: PEFT would recompute the principal components with a full "
                           "SVD and get a slightly different residual base (use LoraConfig(svd='full'))")
    return reasons


def _most_common(values: list):
    return Counter(values).most_common(1)[0][0]


def peft_lora_fields(model: nn.Module, layers: dict, targets: list[str],
                     parameter_ranks: dict[str, tuple[int, float]]) -> dict:
    """r, lora_alpha, rank/alpha patterns, DoRA, modules_to_save and init of an adapter_config.json.

    `parameter_ranks`: {expert / router parameter path: (r, alpha)} (`experts.parameter_ranks`).
    """
    lora_cfg = state_of(model).lora
    # Linear layers by module path; expert stacks and routers by the parameter path PEFT matches
    # patterns against (its all-linear gives gate_up_proj twice the rank).
    ranks = {name: (layer.r, layer.alpha) for name, layer in layers.items()} | parameter_ranks
    r = _most_common([rank for rank, _ in ranks.values()])
    alpha = _most_common([value for _, value in ranks.values()])
    # Full paths as keys: PEFT reads a key as a regex anchored at a "." boundary, so a full
    # path picks out exactly one layer.
    rank_pattern = {name: rank for name, (rank, _) in ranks.items() if rank != r}
    alpha_pattern = {name: value for name, (_, value) in ranks.items() if value != alpha}
    first = next(iter(layers.values()))
    init = {v: k for k, v in PEFT_INITS.items()}.get(first.init, True)
    if not rebuilds_base(first.init, first.loftq_iters):
        init = True   # one LoftQ iteration: the base is plain quant(W), the factors are in the file
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": first.use_rslora,
        "use_dora": bool(first.use_dora),
        "modules_to_save": list(state_of(model).modules_to_save) or None,
        "init_lora_weights": init,
        "lora_dropout": float(getattr(lora_cfg, "dropout", 0.0)),
        "target_modules": targets,
        "trainable_token_indices": {name.rsplit(".", 1)[-1]: ids for name, ids in  # PEFT's short names
                                    state_of(model).trainable_tokens.items()} or None,
    }


def rebuilds_base(init: str, loftq_iters: int) -> bool:
    """Whether this init changes the frozen base (LoftQ > 1 iteration, PiSSA) rather than only A and B."""
    return init == "pissa" or (init == "loftq" and loftq_iters > 1)


def check_peft_config(config: dict, path) -> None:
    """Refuse the PEFT LoRA features qlowrank does not load, naming them."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type={config.get('peft_type')!r}; qlowrank reads LoRA adapters only")
    init = config.get("init_lora_weights", True)
    unsupported = {
        "bias": config.get("bias", "none") != "none", "lora_bias": bool(config.get("lora_bias")),
        "layers_to_transform": config.get("layers_to_transform") is not None,
        "layer_replication": bool(config.get("layer_replication")),
        "init_lora_weights": init not in PEFT_INITS and init is not False,
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(f"{path} uses PEFT features qlowrank does not load: {bad} (values: "
                         f"{ {k: config.get(k) for k in bad} })")


def adapter_lora_config(config: dict, sidecar: dict | None, target_modules: list[str]) -> tuple[LoraConfig, int]:
    """(LoraConfig, seed) that rebuilds an adapter's layers (and, for LoftQ / PiSSA, its base)."""
    sidecar = sidecar or {}
    init = config.get("init_lora_weights", True)
    init = sidecar.get("init") or PEFT_INITS.get(init if init is not False else True, "kaiming")
    # A PEFT PiSSA adapter means PEFT's full SVD of the float base.
    svd = sidecar.get("svd", "full" if init == "pissa" else "randomized")
    r = int(config["r"])
    lora = LoraConfig(
        r=r, alpha=config.get("lora_alpha", r), dropout=float(config.get("lora_dropout") or 0.0),
        target_modules=target_modules, exclude_modules=[], use_rslora=bool(config.get("use_rslora")),
        init=init, loftq_iters=int(sidecar.get("loftq_iters", 1)), svd=svd, use_dora=bool(config.get("use_dora")),
        rank_pattern=dict(config.get("rank_pattern") or {}), alpha_pattern=dict(config.get("alpha_pattern") or {}),
        modules_to_save=list(config.get("modules_to_save") or []),
        target_parameters=list(config.get("target_parameters") or []),
    )
    return lora, int(sidecar.get("seed", 0))

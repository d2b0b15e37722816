"""Write one merged model to disk as a loadable HF directory (the only time mergelab writes merged
weights), and the mergekit config that expresses the same merge where mergekit has one."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

from mergelab.errors import HyperparameterError, MergelabError
from mergelab.io.family import SizeSpec
from mergelab.engine.methods import get_method
from mergelab.paths import OWNER_FILE, make_staging, remove_stale_staging, write_failure

logger = logging.getLogger(__name__)
CARD_FILE = "README.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja")


def check_experts(size: SizeSpec, experts: Sequence[str]) -> None:
    unknown = [e for e in experts if e not in size.experts]
    if unknown or not experts:
        raise MergelabError(f"--experts: {', '.join(unknown) or '(none)'} not among {', '.join(size.expert_names)}")
    if len(set(experts)) != len(experts):
        raise MergelabError(f"--experts: {','.join(experts)} names an expert twice")


def export_plan(size: SizeSpec, experts: Sequence[str]):
    """The memory plan of exporting a merge of `experts` of `size` on the CPU (`memory.export_bytes`: the
    base, one fp32 task vector per chosen expert, the merged model and one tensor's temporaries; the pool
    is dropped before the model is written, so safetensors' copy of it while saving fits in its place).
    Reads the base's safetensors header; raises ManifestError for a manifest n_params that is not its count."""
    import math

    from mergelab.engine.memory import MemoryPlan, available_bytes, export_bytes
    from mergelab.io.checkpoints import Checkpoint

    largest = max((math.prod(shape) for shape in Checkpoint(size.base).shapes.values()), default=0)
    return MemoryPlan(size.name, "cpu", export_bytes(size.n_params, largest, len(experts)), available_bytes("cpu"))


def require_export_fit(size: SizeSpec, experts: Sequence[str]) -> None:
    """Refuse (MergelabError, with the bytes needed and available) an export that does not fit in memory
    (MERGELAB_MEMORY_LIMIT_GB, else MemAvailable), before anything is read."""
    from mergelab.engine.memory import LIMIT_ENV

    plan = export_plan(size, experts)
    held = f"base, {len(experts)} task vectors, the merged model and one tensor's temporaries, in fp32"
    logger.debug("memory plan: %s (%s)", plan.describe(), held)
    if not plan.fits:
        raise MergelabError(f"not exporting: the merge of {len(experts)} experts of {plan.describe()} ({held}). Use a "
                            f"machine with more memory, merge fewer experts, or raise {LIMIT_ENV} if the estimate is "
                            "too cautious")


def export_model(size: SizeSpec, method_name: str, hp: dict, experts: Sequence[str], out: Path,
                 card: str | None = None, memory_checked: bool = False) -> Path:
    """Merge `experts` of `size` with the method and save config, safetensors, tokenizer and (when given)
    the model card `card` as README.md to `out` (written beside it first and renamed into place, so a
    crash never leaves half a model). Reads the base and the chosen experts only, after checking that
    they fit in memory (`require_export_fit`, unless the caller did: `memory_checked`). Raises
    MergelabError (unknown experts, a non-empty `out`, a plan that does not fit, a failed write),
    HyperparameterError and CheckpointError."""
    from mergelab.engine.session import ExpertPool, MergeSession, ResidentModel
    from mergelab.bars import asked_bar as progress_bar

    check_experts(size, experts)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise MergelabError(f"{out}: already exists and is not empty")
    method = get_method(method_name)
    resolved = method.resolve(hp)
    if not memory_checked:
        require_export_fit(size, experts)
    with progress_bar(total=len(experts) + 2, desc="read experts", unit="step", leave=False) as bar:
        logger.info("reading the base and %d of the %d experts of size %s", len(experts), len(size.experts), size.name)
        pool = ExpertPool.load(size, progress=bar, experts=experts)
        resident = ResidentModel(pool.base_checkpoint, "cpu")
        bar.set_description("merge")
        MergeSession(pool, resident).merge_formula(method, resolved, tuple(experts))
        del pool  # the merged weights live in the resident model; freed before safetensors copies them to write
        bar.update(1)
        bar.set_description("write")
        logger.info("writing the %s merge to %s", method_name, out)
        _write(size, resident, out, card)
        bar.update(1)
    return out


def _write(size: SizeSpec, resident, out: Path, card: str | None) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)  # left by an export that was killed
        partial = make_staging(out)
    except OSError as exc:
        raise MergelabError(f"{out}: cannot create the model folder ({exc.strerror or exc})") from exc
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its per-shard bar would print into non-TTY logs; ours covers the export
    try:
        _with_base_parts(size, resident.model).save_pretrained(str(partial))
        for name in TOKENIZER_FILES:
            if (size.base / name).is_file():
                shutil.copy2(size.base / name, partial / name)
        if card is not None:
            (partial / CARD_FILE).write_text(card, encoding="utf-8")
        (partial / OWNER_FILE).unlink()
        if out.exists():
            out.rmdir()  # empty, checked above
        partial.rename(out)
    except Exception as exc:  # OSError, or safetensors' own IO error on a full disk
        if write_failure(exc) is None:
            raise
        raise MergelabError(f"{out}: cannot write the merged model ({write_failure(exc)})") from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        if bars:
            hf_logging.enable_progress_bar()


def _with_base_parts(size: SizeSpec, model):
    """The model to write: the merged resident model, or for a base read text-only (a multimodal wrapper,
    `Checkpoint.layout`) the base's whole wrapper loaded by transformers with the merged text weights put in
    its language model and head, so the export keeps the base's vision tower and projector."""
    import torch
    from transformers import AutoModelForCausalLM

    from mergelab.io.checkpoints import Checkpoint

    layout = Checkpoint(size.base).layout
    if layout is None or layout.text_config is None:
        return model
    logger.info("keeping the base's %s (%d tensors) in the export", layout.left_out_what, len(layout.left_out))
    wrapper = AutoModelForCausalLM.from_pretrained(str(size.base), dtype=model.dtype, trust_remote_code=False)
    with torch.no_grad():
        wrapper.get_decoder().load_state_dict(model.get_decoder().state_dict())
        if wrapper.lm_head.weight is not wrapper.get_input_embeddings().weight:
            wrapper.lm_head.load_state_dict(model.lm_head.state_dict())
    return wrapper


def mergekit_yaml(size: SizeSpec, method_name: str, hp: dict, experts: Sequence[str], shown=str) -> str:
    """The equivalent mergekit config. average → linear with equal weights; task_arithmetic → weights c/k
    (or c); ties → ties with weight 1, normalize and λ (mergekit keeps int(density·n) entries, mergelab
    ceil(density·n) ≥ 1); dare → dare_linear with weights 1/k (its masks come from its own RNG); the
    issue-17 methods → mergekit's method of the same name (each module's `mergekit` note says how they
    differ). Per-expert weights multiply the weights of linear methods. Raises HyperparameterError for
    tsv_m (no mergekit equivalent), tensor filters, and weights on a non-linear method.
    `shown` turns a checkpoint path into the text written (default: the absolute path, to run here;
    the model card passes `family_relative`)."""
    from mergelab.engine.methods.options import expert_weights

    method = get_method(method_name)
    hp = method.resolve(hp)
    k = len(experts)
    base = shown(size.base)
    linear = method.linear_scale is not None  # mergekit's per-model weight carries w_i only for these
    if method_name == "tsv_m" or hp.get("include") or hp.get("exclude") or (hp.get("weights") and not linear):
        what = ("TSV-M has no mergekit 0.1.5 equivalent" if method_name == "tsv_m" else
                "tensor filters (include/exclude) have no mergekit form here" if hp.get("include") or hp.get("exclude")
                else f"per-expert weights of {method_name} mean another formula in mergekit (it divides by Σ w_i)")
        raise HyperparameterError(f"--mergekit-yaml: {what}; export the merged model (--out) without --mergekit-yaml")
    tensor_params = ""
    if method_name == "average" and hp.get("weights"):  # θ0 + (1/k)·Σ w_i·v_i: mergekit's linear would divide by Σ w_i
        body, params, weights = f"merge_method: task_arithmetic\nbase_model: {base}", "", [1.0 / k] * k
    elif method_name == "average":
        body, params, weights = "merge_method: linear", "parameters: {normalize: true}", [1.0] * k
    elif method_name == "task_arithmetic":
        scale = hp["c"] / k if hp["normalize"] else hp["c"]
        body, params, weights = f"merge_method: task_arithmetic\nbase_model: {base}", "", [scale] * k
    elif method_name == "ties":
        body = f"merge_method: ties\nbase_model: {base}"
        params, weights = f"parameters: {{normalize: true, lambda: {hp['lambda']}}}", [1.0] * k
    elif method_name in ("dare", "dare_ties"):
        rescale = "" if hp["rescale"] else ", rescale: false"
        if method_name == "dare":
            body = f"merge_method: dare_linear\nbase_model: {base}"
            params, weights = f"parameters: {{normalize: false{rescale}}}", [1.0 / k] * k
        else:
            body = f"merge_method: dare_ties\nbase_model: {base}"
            params, weights = f"parameters: {{normalize: true, lambda: {hp['lambda']}{rescale}}}", [1.0] * k
        tensor_params = f", density: {1 - hp['p']}"
    elif method_name in ("breadcrumbs", "breadcrumbs_ties"):
        body = f"merge_method: {method_name}\nbase_model: {base}"
        tensor_params = f", density: {hp['density']}, gamma: {hp['gamma']}"
        params, weights = (("parameters: {normalize: false, rescale: false}", [hp["lambda"] / k] * k)
                           if method_name == "breadcrumbs" else
                           (f"parameters: {{normalize: true, lambda: {hp['lambda']}}}", [1.0] * k))
    elif method_name in ("della", "della_linear"):
        body = f"merge_method: {method_name}\nbase_model: {base}"
        tensor_params = f", density: {hp['density']}, epsilon: {hp['epsilon']}, lambda: {hp['lambda']}"
        params, weights = ((f"parameters: {{normalize: true, rescale: {str(hp['rescale']).lower()}}}", [1.0] * k)
                           if method_name == "della" else
                           (f"parameters: {{normalize: false, rescale: {str(hp['rescale']).lower()}}}", [1.0 / k] * k))
    elif method_name == "model_stock":
        body, params, weights = f"merge_method: model_stock\nbase_model: {base}", "parameters: {filter_wise: false}", None
    else:
        raise HyperparameterError(f"--mergekit-yaml: no mergekit equivalent is known for method {method_name!r}")
    if weights is not None and hp.get("weights"):
        weights = [w * x for w, x in zip(weights, expert_weights(hp, experts))]
    if method_name == "ties":
        tensor_params = f", density: {hp.get('density')}"
    models = "\n".join(f"  - model: {shown(size.experts[e])}" + (
                        "" if weights is None else f"\n    parameters: {{weight: {w!r}{tensor_params}}}")
                        for e, w in zip(experts, weights or [None] * k))
    return "\n".join(x for x in (body, "models:", models, params, "dtype: float32") if x) + "\n"


def family_relative(path: Path, root: Path | None) -> str:
    """`path` as the model card shows it: relative to the family's folder `root` (POSIX separators), or,
    for a checkpoint outside it, only its folder name: a card is shared, the user's directories are not."""
    path = Path(path)
    if root is not None:
        try:
            return path.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
    return f".../{path.name}"


def _cell(text: str) -> str:
    """`text` as one Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _hub_id(config: dict) -> str | None:
    """The Hub repository a checkpoint was saved from (config.json's _name_or_path, e.g. 'Qwen/Qwen2-0.5B'),
    or None when that names a local folder (it is a path then, never shown)."""
    import re

    name = config.get("_name_or_path")
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and not os.path.exists(name) \
            and not name.startswith((".", "/")):
        return name
    return None


def model_card(family, size: SizeSpec, method_name: str, hp: dict, experts: Sequence[str],
               measured: dict | None, version: str, not_measured: str = "not measured") -> str:
    """The model card (README.md) of an exported merge, through huggingface_hub's ModelCard: metadata
    (library, tags, base_model when the base names a Hub repository, and a `mergelab` block with the
    family, size, method, canonical hyperparameters, experts, mergelab `version` and the measured CE)
    and a body with the same and the equivalent mergekit config. `family`: the `Family` (its manifest's
    folder is what paths are shown relative to). `measured`: {"domains": {domain: CE}, "macro": CE or
    None, "metric": text} from the results cache, or None, then the card says `not_measured`. Paths are
    never absolute (`family_relative`)."""
    import json

    from huggingface_hub import ModelCard, ModelCardData

    from mergelab.engine.methods import canonical_hparams
    from mergelab.io.checkpoints import Checkpoint

    method = get_method(method_name)
    resolved = method.resolve(hp)
    root = family.manifest.parent if family.manifest is not None else None
    shown = lambda p: family_relative(p, root)  # noqa: E731
    base = shown(size.base)
    canonical = canonical_hparams(resolved)
    ce: dict | str = not_measured
    if measured is not None:
        ce = {d: float(v) for d, v in measured["domains"].items()}
        if measured.get("macro") is not None:
            ce["macro"] = float(measured["macro"])
    hub_base = _hub_id(Checkpoint(size.base).config)
    data = ModelCardData(
        library_name="transformers", tags=["merge", "mergelab", method_name],
        **({"base_model": hub_base, "base_model_relation": "merge"} if hub_base else {}),
        mergelab={"version": version, "family": family.name, "size": size.name, "n_params": size.n_params,
                  "base": base, "method": method_name, "hparams": canonical, "experts": list(experts),
                  "experts_paths": {e: shown(size.experts[e]) for e in experts}, "measured_ce": ce})
    hp_text = ", ".join(f"{k} = {json.dumps(v)}" for k, v in resolved.items()) or "none"
    lines = [
        f"# {family.name} · {size.name} · {method_name} merge of {' + '.join(experts)}", "",
        f"Merged with mergelab {version} from the base model `{base}` ({size.n_params:,} parameters) of family "
        f"`{family.name}`, size `{size.name}`. Paths are relative to the family's folder.", "",
        "## Merge", "",
        "| | |", "|---|---|",
        f"| method | `{method_name}` ({_cell(method.doc)}) |",
        f"| hyperparameters | {hp_text} (canonical: `{canonical}`) |",
        f"| experts (k = {len(experts)}) | " + ", ".join(f"`{e}` (`{shown(size.experts[e])}`)" for e in experts) + " |",
        f"| base model | `{base}`" + (f" (Hub: `{hub_base}`)" if hub_base else "") + " |",
        f"| mergelab version | {version} |", "",
        "## Measured cross-entropy", "",
    ]
    if measured is None:
        lines += [f"{not_measured[:1].upper()}{not_measured[1:]}.", ""]
    else:
        lines += [measured.get("metric", "Cross-entropy in nats per token on the family's eval sets."), "",
                  "| domain | CE (nats/token) |", "|---|---|"]
        lines += [f"| {d} | {v:.4f} |" for d, v in measured["domains"].items()]
        if measured.get("macro") is not None:
            lines += [f"| macro (mean over domains) | {measured['macro']:.4f} |"]
        lines += [""]
    options = "".join(f" --hp {method_name}.{k}={json.dumps(v)}" for k, v in resolved.items())
    try:
        config = ["```yaml", mergekit_yaml(size, method_name, resolved, experts, shown).rstrip("\n"), "```"]
    except HyperparameterError as exc:  # TSV-M, tensor filters, weights of a non-linear method
        config = [str(exc).removeprefix("--mergekit-yaml: ").split(";")[0] + "."]
    lines += ["## Equivalent mergekit config", "", f"{method.mergekit}." if method.mergekit else "", "",
              *config, "",
              "## Reproduce", "", "```",
              f"mergelab export-model --family family.toml --size {size.name} --method {method_name} "
              f"--experts {','.join(experts)}{options} --out OUT", "```", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))

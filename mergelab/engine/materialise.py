"""Write one merged model to disk as a loadable HF directory (the only time mergelab writes merged
weights), and the mergekit config that expresses the same merge where mergekit has one."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from mergelab.errors import MergelabError
from mergelab.io.family import SizeSpec
from mergelab.engine.methods import get_method
from mergelab.paths import OWNER_FILE, make_staging, remove_stale_staging, write_failure

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja")


def check_experts(size: SizeSpec, experts: Sequence[str]) -> None:
    unknown = [e for e in experts if e not in size.experts]
    if unknown or not experts:
        raise MergelabError(f"--experts: {', '.join(unknown) or '(none)'} not among {', '.join(size.expert_names)}")
    if len(set(experts)) != len(experts):
        raise MergelabError(f"--experts: {','.join(experts)} names an expert twice")


def export_model(size: SizeSpec, method_name: str, hp: dict, experts: Sequence[str], out: Path) -> Path:
    """Merge `experts` of `size` with the method and save config, safetensors and tokenizer to `out`
    (written beside it first and renamed into place, so a crash never leaves half a model)."""
    from mergelab.engine.session import ExpertPool, MergeSession, ResidentModel

    check_experts(size, experts)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise MergelabError(f"{out}: already exists and is not empty")
    method = get_method(method_name)
    resolved = method.resolve(hp)
    pool = ExpertPool.load(size)
    resident = ResidentModel(pool.base_checkpoint, "cpu")
    MergeSession(pool, resident).merge_formula(method, resolved, tuple(experts))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)  # left by an export that was killed
        partial = make_staging(out)
    except OSError as exc:
        raise MergelabError(f"{out}: cannot create the model folder ({exc.strerror or exc})") from exc
    try:
        resident.model.save_pretrained(str(partial))
        for name in TOKENIZER_FILES:
            if (size.base / name).is_file():
                shutil.copy2(size.base / name, partial / name)
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
    return out


def mergekit_yaml(size: SizeSpec, method_name: str, hp: dict, experts: Sequence[str]) -> str:
    """The equivalent mergekit config. average → linear with equal weights; task_arithmetic → weights c/k
    (or c); ties → ties with weight 1, normalize and λ (mergekit keeps int(density·n) entries, mergelab
    ceil(density·n) ≥ 1); dare → dare_linear with weights 1/k (its masks come from its own RNG)."""
    method = get_method(method_name)
    hp = method.resolve(hp)
    k = len(experts)
    if method_name == "average":
        body, params, weights = "merge_method: linear", "parameters: {normalize: true}", [1.0] * k
    elif method_name == "task_arithmetic":
        scale = hp["c"] / k if hp["normalize"] else hp["c"]
        body, params, weights = f"merge_method: task_arithmetic\nbase_model: {size.base}", "", [scale] * k
    elif method_name == "ties":
        body = f"merge_method: ties\nbase_model: {size.base}"
        params, weights = f"parameters: {{normalize: true, lambda: {hp['lambda']}}}", [1.0] * k
    else:
        body = f"merge_method: dare_linear\nbase_model: {size.base}"
        params, weights = "parameters: {normalize: false}", [1.0 / k] * k
    extra = {"ties": f", density: {hp.get('density')}", "dare": f", density: {1 - hp.get('p', 0)}"}.get(method_name, "")
    models = "\n".join(f"  - model: {size.experts[e]}\n    parameters: {{weight: {w!r}{extra}}}" for e, w in zip(experts, weights))
    return "\n".join(x for x in (body, "models:", models, params, "dtype: float32") if x) + "\n"

"""Running a recipe end to end, estimating it without weights, inspecting and reproducing its checkpoint.

The runner only wires library pieces together, in the order of the architecture's flow: load (transformers +
accelerate) -> evaluate the base model -> prune (:class:`~diep_hub.pruner.DiEPPruner`) -> skipping -> evaluate the
pruned model -> card -> atomic save -> push. Every check that can fail (recipe, output folder, Hub token, model
family) runs before the model is loaded, so a bad run fails in seconds rather than after an hour of search.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, CorruptFileError, DiEPError, UnsupportedModelError
from .families import get_family
from .families.registry import unsupported_model_error
from .files import read_json_object, read_yaml
from .recipe import Recipe, load_recipe, shipped_recipes

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "pruning_report.json"
EVAL_FILE = "evaluation.json"
CARD_FILE = "README.md"

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Effective throughput used for the search-time estimate of a dry run: a stated assumption, not a measurement.
_ASSUMED_FLOPS = {"cuda": 200e12, "cpu": 0.3e12}


# ----------------------------------------------------------------------------------------------------- loading
def default_output_dir(recipe: Recipe) -> Path:
    """``out/<model name>-<method>-<sparsity %>`` in the working directory, when neither CLI nor recipe sets one."""
    name = recipe.model.id.rsplit("/", 1)[-1]
    return Path("out") / f"{name}-{recipe.pruning.method}-{round(100 * recipe.pruning.sparsity)}"


def resolve_output_dir(recipe: Recipe, output_dir: str | os.PathLike | None) -> Path:
    """The CLI's ``--output`` wins over ``output.dir``; relative paths are relative to the working directory."""
    chosen = output_dir if output_dir is not None else recipe.output.dir
    return Path(os.path.expanduser(str(chosen))) if chosen is not None else default_output_dir(recipe)


def _torch_dtype(name: str):
    return "auto" if name == "auto" else getattr(torch, name)


def _local_model_folder(model_id: str) -> Path | None:
    """The folder ``model.id`` names on this machine, or None for a Hub id."""
    path = Path(os.path.expanduser(model_id))
    return path if path.is_dir() else None


def model_source(model_id: str) -> str:
    """How messages name a model: ``folder PATH`` or ``Hub repo ID``."""
    return f"folder {model_id}" if _local_model_folder(model_id) is not None else f"Hub repo {model_id}"


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")


def _read_local_config(model_id: str) -> dict[str, Any] | None:
    """A local folder's config.json, parsed by diep_hub first: a damaged file is named with its line and column
    (transformers only says "not a valid JSON file"); None for a Hub id.

    Raises:
        ConfigError: a folder without config.json, or a path that names no folder and cannot be a Hub id
            (transformers would call it an invalid repo id).
    """
    folder = _local_model_folder(model_id)
    if folder is None:
        if not _HUB_ID.fullmatch(model_id) or Path(os.path.expanduser(model_id)).exists():
            raise ConfigError(
                f"model.id: {model_id!r} is not a folder on this machine, nor a Hub repo id -> a checkpoint folder "
                "(with config.json) or namespace/name"
            )
        return None
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.id: folder {model_id} has no config.json, so it is not a model checkpoint -> a folder written "
            "by save_pretrained or `diep-hub run`, or a Hub repo id"
        )
    return read_json_object(folder / "config.json", "model config")


_UNKNOWN_TYPE = re.compile(r"model type [`'\"]([^`'\"]+)[`'\"] but Transformers does not recognize")


def _transformers_value_error(model_id: str, local_config: dict | None, exc: ValueError) -> DiEPError:
    """transformers' ValueError while reading a config or weights, as a DiEPError naming the model.

    An unknown ``model_type`` (a family newer than the installed transformers, or a typo) is an
    UnsupportedModelError listing the families diep_hub supports; anything else about the config is a ConfigError.
    """
    text = str(exc)
    match = _UNKNOWN_TYPE.search(text)
    if match is not None or "does not recognize this architecture" in text:
        import transformers

        model_type = (local_config or {}).get("model_type") or (match.group(1) if match else None)
        error = unsupported_model_error(model_type, model_source(model_id))
        return UnsupportedModelError(
            f"{error} transformers {transformers.__version__} does not know this model_type either: check config.json "
            "for a typo, or use a transformers version that has the family"
        )
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return ConfigError(f"model.id: cannot load {model_source(model_id)}: {first}")


def load_config(recipe: Recipe):
    """The model's config only (no weights): an offline model's, or the Hub's/local folder's via AutoConfig."""
    if recipe.is_offline:
        from .tiny import offline_config

        return offline_config(recipe.model.id)
    from transformers import AutoConfig

    local_config = _read_local_config(recipe.model.id)
    try:
        return AutoConfig.from_pretrained(
            recipe.model.id, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
        )
    except OSError as exc:
        raise DiEPError(
            f"model.id: cannot load the config of {recipe.model.id!r} (revision {recipe.model.revision}): {exc}"
        ) from None
    except ValueError as exc:
        raise _transformers_value_error(recipe.model.id, local_config, exc) from None


def _weight_files(model_id: str, suffix: str) -> list[Path]:
    folder = _local_model_folder(model_id)
    return sorted(folder.glob(f"*{suffix}")) if folder is not None else []


def _unreadable_safetensors(files: list[Path]) -> list[Path]:
    """The safetensors files whose header or size is wrong (``safe_open`` checks both without reading tensors)."""
    from safetensors import SafetensorError, safe_open

    broken = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError):
            broken.append(file)
    return broken


def _names(files: list[Path], fallback: str) -> str:
    return ", ".join(str(f) for f in files) if files else fallback


def _torch_load_file(exc: BaseException) -> str | None:
    """The file ``torch.load`` was reading when ``exc`` was raised, or None when it was not raised inside it.

    A damaged pickle fails in many ways (UnpicklingError, EOFError, IndexError, RuntimeError from the zip
    reader...); what they share is where they were raised.
    """
    found = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "load" and frame.f_globals.get("__name__") == "torch.serialization":
            source = frame.f_locals.get("f")
            found = os.fspath(source) if isinstance(source, str | os.PathLike) else "a pickle weight file"
        tb = tb.tb_next
    return found


def _weights_error(model_id: str, exc: BaseException) -> CorruptFileError | None:
    """A CorruptFileError naming the weight file transformers could not read; None when ``exc`` is about
    something else. transformers' own messages name no file (safetensors) or blame the user's torch (pickles)."""
    from safetensors import SafetensorError

    text = str(exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    if isinstance(exc, SafetensorError):
        files = _weight_files(model_id, ".safetensors")
        broken = _unreadable_safetensors(files) or files
        return CorruptFileError(
            f"{_names(broken, model_source(model_id))}: the safetensors weights cannot be read ({first}); the file "
            "is truncated or corrupt -> download or save the checkpoint again"
        )
    pickle_file = _torch_load_file(exc)
    if pickle_file is None:
        return None
    if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in text:
        detail = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), "")
        detail = detail.removeprefix("WeightsUnpickler error: ").split(" was not an allowed global")[0]
        return CorruptFileError(
            f"{pickle_file}: the pickle checkpoint holds Python objects besides tensors ({detail}), and diep_hub "
            "loads pickles with torch.load(weights_only=True) only -> use a safetensors checkpoint, or convert "
            "this one to safetensors where you trust its origin"
        )
    sentence = first.split(". ")[0][:200]
    return CorruptFileError(
        f"{pickle_file}: the pickle weights cannot be read ({type(exc).__name__}: {sentence}); the file is "
        "truncated or corrupt -> download or save the checkpoint again"
    )


def _load_error(recipe: Recipe, local_config: dict | None, exc: Exception) -> DiEPError | None:
    """What went wrong loading the model, as a DiEPError naming the model or file; None when it is not the
    checkpoint's fault (then it is a bug, and keeps its own traceback)."""
    m = recipe.model
    error = _weights_error(m.id, exc)
    if error is not None:
        return error
    if isinstance(exc, ValueError):
        error = _transformers_value_error(m.id, local_config, exc)
        return error if isinstance(error, UnsupportedModelError) else None
    if isinstance(exc, OSError):  # a Hub repo that cannot be reached, or a folder missing a file
        return DiEPError(f"model.id: cannot load {model_source(m.id)} (revision {m.revision}): {exc}")
    return None


def load_model(recipe: Recipe):
    """Load the recipe's model and tokenizer (offline models are built locally, deterministically).

    Raises:
        CorruptFileError: a damaged config.json or weight file, named.
        UnsupportedModelError: a model_type transformers does not know.
    """
    if recipe.is_offline:
        from .tiny import build_offline_model

        dtype = torch.float32 if recipe.model.dtype == "auto" else getattr(torch, recipe.model.dtype)
        return build_offline_model(recipe.model.id, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = recipe.model
    local_config = _read_local_config(m.id)
    logger.info("loading %s (revision %s, dtype %s, device_map %s)", m.id, m.revision, m.dtype, m.device_map)
    try:
        tokenizer = AutoTokenizer.from_pretrained(m.id, revision=m.revision, trust_remote_code=m.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            m.id,
            revision=m.revision,
            dtype=_torch_dtype(m.dtype),
            device_map=m.device_map,
            trust_remote_code=m.trust_remote_code,
        )
    except Exception as exc:
        error = _load_error(recipe, local_config, exc)
        if error is None:
            raise  # anything else (a bug in a model's own code...) keeps its own traceback
        raise error from exc
    model.eval()
    return model, tokenizer


def _cache_dir() -> Path:
    root = os.environ.get("DIEP_HUB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "diep_hub")
    return Path(root) / "offline-text"


def _text_source(dataset: str | None, path: str | None, split: str, recipe: Recipe) -> tuple[str, bool]:
    """(source for the loader, is_local): a local path, an offline corpus written as JSONL, or a Hub name."""
    if path is not None:
        return str(recipe.resolve_path(path)), True
    from .tiny import offline_text_file

    local = offline_text_file(str(dataset), split, _cache_dir())
    return (str(local), True) if local is not None else (str(dataset), False)


# ---------------------------------------------------------------------------------------------------- dry run
def estimate(recipe: Recipe) -> dict[str, Any]:
    """Parameter counts, weight bytes and a search-time estimate from the config alone (no weights loaded).

    The model is instantiated under accelerate's ``init_empty_weights`` (meta tensors), so even Mixtral-8x22B
    costs nothing; the family adapter finds the experts exactly as the real run will, and the selection runs on
    placeholder scores with the run's floors and caps, so a sparsity the real run would refuse is refused here.

    Raises:
        ConfigError: the sparsity cannot be reached (the message is the one ``prune`` gives).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_config(recipe)
    family = get_family(config, source=model_source(recipe.model.id))
    from .preflight import check_run_inputs

    check_run_inputs(recipe, model_config=config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    layers = family.moe_layers(model)
    selection = _feasible_selection(recipe, model, family, layers)
    total = sum(p.numel() for p in model.parameters())
    hidden = int(config.hidden_size)
    per_layer = []
    for layer in layers:
        expert_params = sum(p.numel() for p in layer.experts.parameters())
        per_layer.append(
            {
                "layer": layer.index,
                "num_experts": layer.num_experts,
                "top_k": layer.top_k,
                "params_per_expert": expert_params // layer.num_experts,
                # Router rows go with their experts.
                "router_params_per_expert": layer.router.weight.shape[1],
            }
        )
    num_experts = sum(x["num_experts"] for x in per_layer)
    expert_params = sum(x["num_experts"] * x["params_per_expert"] for x in per_layer)
    to_remove = selection.num_removed
    mean_expert = sum(x["num_experts"] * (x["params_per_expert"] + x["router_params_per_expert"]) for x in per_layer)
    mean_expert = mean_expert / max(num_experts, 1)
    removed_params = round(to_remove * mean_expert)
    after = total - removed_params

    dtype = recipe.model.dtype
    if dtype == "auto":
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        dtype = dtype.removeprefix("torch.")
    bytes_per = _DTYPE_BYTES.get(dtype, 2)

    # Search cost: one reference pass, then epochs x (forward + backward ~ 3 forwards) over the calibration tokens.
    cal = recipe.pruning.calibration
    tokens = cal.num_samples * cal.seq_len
    inactive = sum((x["num_experts"] - x["top_k"]) * x["params_per_expert"] for x in per_layer)
    active = total - inactive
    search_active = total if recipe.pruning.search.mode == "dense" else active
    passes = 1 + (3 * recipe.pruning.search.epochs if recipe.pruning.method == "diep" else 0)
    flops = 2 * search_active * tokens * passes
    device = "cuda" if recipe.model.device_map not in (None, "cpu") else "cpu"
    seconds = flops / _ASSUMED_FLOPS[device]
    batch = recipe.pruning.search.batch_size
    activations = batch * cal.seq_len * hidden * int(config.num_hidden_layers) * 2 * 4
    result = {
        "model": recipe.model.id,
        "family": family.model_type,
        "dtype": dtype,
        "num_moe_layers": len(per_layer),
        "experts_per_layer": sorted({x["num_experts"] for x in per_layer}),
        "top_k": sorted({x["top_k"] for x in per_layer}),
        "params_total": total,
        "params_experts": expert_params,
        "params_active_per_token": active,
        "experts_total": num_experts,
        "experts_removed": to_remove,
        "experts_kept": num_experts - to_remove,
        "params_after_pruning": after,
        "weight_bytes": total * bytes_per,
        "weight_bytes_after_pruning": after * bytes_per,
        "search_flops": flops,
        "search_seconds_estimate": seconds,
        "search_peak_bytes_estimate": int(total * bytes_per * 1.2 + activations),
        "assumptions": (
            f"{_ASSUMED_FLOPS[device] / 1e12:.1f} TFLOP/s effective on {device}; search = 1 reference pass + "
            f"{recipe.pruning.search.epochs} epochs x 3 passes over {tokens} tokens "
            f"({'all experts' if recipe.pruning.search.mode == 'dense' else 'top-k experts'} active); removal "
            "assumes the mean expert size; peak = 1.2 x weights + one batch of activations"
        ),
    }
    return result


def _feasible_selection(recipe: Recipe, model, family, layers):
    """The selection ``DiEPPruner.check_feasible`` makes before a real run (placeholder scores, the recipe's
    floors and caps), with its error message; the dry run's model is on the meta device, which check_feasible
    itself refuses, so the same call is made here."""
    from .selection import select_experts

    p = recipe.pruning
    if not layers:
        raise UnsupportedModelError(f"{model_source(recipe.model.id)} ({family.model_type}) has no MoE layers to prune")
    placeholder = {layer.index: torch.linspace(1.0, 2.0, layer.num_experts) for layer in layers}
    try:
        return select_experts(
            placeholder, model, sparsity=p.sparsity, mode=p.selection, max_layer_sparsity=p.floors.max_layer_sparsity,
            min_experts_per_layer=p.floors.min_experts_per_layer, regroup=p.floors.regroup,
        )
    except DiEPError as exc:
        total = sum(layer.num_experts for layer in layers)
        raise ConfigError(
            f"sparsity={p.sparsity} cannot be reached on this {family.model_type} model "
            f"({len(layers)} MoE layers, {total} routed experts): {exc}"
        ) from exc


# ------------------------------------------------------------------------------------------------------- run
def run_inputs(recipe: Recipe, recipe_path: str | os.PathLike | None) -> list[Path]:
    """The local files and folders a run reads: the recipe file, the model folder, the calibration and perplexity
    files and the task folder (absolute). An output folder must not hold any of them, or saving would replace them.
    """
    ev = recipe.evaluation
    candidates: list[str | os.PathLike | None] = [
        recipe_path,
        recipe.model.id if _local_model_folder(recipe.model.id) is not None else None,
        recipe.resolve_path(recipe.pruning.calibration.path),
        recipe.resolve_path(ev.perplexity.path) if ev.perplexity is not None else None,
        recipe.resolve_path(ev.include_path),
    ]
    inputs: list[Path] = []
    for candidate in candidates:
        if candidate is None:
            continue
        path = Path(os.path.expanduser(str(candidate))).resolve()
        if path not in inputs:
            inputs.append(path)
    return inputs


def _check_output_writable(out: Path) -> None:
    """The output folder can be made: no file on its path, and its nearest existing folder takes a new file."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != out and not existing.is_dir():
        raise ConfigError(
            f"output {out}: {existing} is a file, so the folder cannot be created there -> give a folder path whose "
            "parents are folders (--output DIR)"
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".diep-hub-write-probe-", dir=existing)
    except OSError as exc:
        raise ConfigError(
            f"output {out}: cannot write in {existing} ({exc.strerror or exc}) -> choose a folder you can write to "
            "(--output DIR)"
        ) from None
    os.close(handle)
    os.unlink(probe)


def _check_before_work(
    recipe: Recipe,
    out: Path,
    push: bool,
    repo_id: str | None,
    overwrite: bool,
    recipe_path: str | os.PathLike | None = None,
) -> None:
    """Everything that can be refused without loading the model."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file -> give a folder path (--output DIR)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output {out} exists and is not empty -> choose another --output or pass --overwrite")
    _check_output_writable(out)
    if push:
        if not repo_id:
            raise ConfigError("push requested but no repo id -> set publish.repo_id in the recipe or pass --repo-id")
        from huggingface_hub import get_token

        if not get_token():
            raise ConfigError(
                "push requested but no Hugging Face token found -> set HF_TOKEN or run `hf auth login` "
                "(a token with write access)"
            )
        from .hub import check_write_token

        user = check_write_token()  # an invalid or read-only token fails now, not after the search
        logger.info("pushing as %s once the checkpoint is ready", user)
    cal = recipe.pruning.calibration
    if cal.path is not None and not Path(recipe.calibration_source()).exists():
        raise ConfigError(f"pruning.calibration.path: {cal.path!r} -> no such file (relative to the recipe folder)")
    include = recipe.resolve_path(recipe.evaluation.include_path)
    if include is not None and not Path(include).exists():
        raise ConfigError(f"evaluation.include_path: {recipe.evaluation.include_path!r} -> no such folder")
    from .saving import check_output_folder

    # Refuses, even with --overwrite, an output folder that is or holds the working directory, a git checkout or
    # one of the run's own inputs: saving replaces the whole folder.
    check_output_folder(out, overwrite=overwrite, inputs=run_inputs(recipe, recipe_path))


def build_pruner(recipe: Recipe):
    """The :class:`~diep_hub.pruner.DiEPPruner` a recipe describes, its calibration source resolved to local data.

    An offline corpus (``diep-hub/tiny-text``) becomes a JSONL file; a local file is a single "train" split with no
    dataset config, as the calibration loader reads it.
    """
    from .pruner import DiEPPruner

    cal = recipe.pruning.calibration
    source, local = _text_source(cal.dataset, cal.path, cal.split, recipe)
    kwargs = recipe.to_pruner_kwargs()
    kwargs["dataset"] = source
    if local:
        kwargs.update(split="train", dataset_config=None)
    return DiEPPruner(**kwargs)


def evaluation_tasks(recipe: Recipe, work: Path) -> tuple[list[str], str | None]:
    """Task names and include path; offline tasks (diep_tiny_arith, zoo_*) are written on the fly."""
    from .tiny import write_offline_tasks

    tasks = list(recipe.evaluation.tasks)
    include = recipe.resolve_path(recipe.evaluation.include_path)
    if include is None:
        written = write_offline_tasks(tasks, work / "tasks")
        include = str(written) if written is not None else None
    return tasks, include


def evaluate(model, tokenizer, recipe: Recipe, *, tasks: list[str], include_path: str | None) -> dict[str, Any]:
    """Evaluate one model as the recipe says (lm-eval tasks, perplexity, speed, memory)."""
    from .evaluation import evaluate_model

    ev = recipe.evaluation
    ppl = None
    if ev.perplexity is not None:
        p = ev.perplexity
        source, local = _text_source(p.dataset, p.path, p.split, recipe)
        ppl = {"source": source, "config_name": None if local else p.config, "split": "train" if local else p.split,
               "text_field": p.text_field, "num_samples": p.num_samples, "seq_len": p.seq_len}
    return evaluate_model(
        model,
        tokenizer,
        tasks=tasks,
        include_path=include_path,
        limit=ev.limit,
        batch_size=ev.batch_size,
        num_fewshot=ev.num_fewshot,
        seed=recipe.pruning.seed,
        perplexity=ppl,
        speed=ev.speed,
        memory=ev.memory,
    )


def run_recipe(
    recipe: Recipe | str | os.PathLike,
    *,
    dry_run: bool = False,
    push: bool | None = None,
    output_dir: str | os.PathLike | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run a recipe: load, evaluate base, prune, skipping, evaluate pruned, card, save, push.

    Args:
        recipe: a :class:`Recipe` or a path to a recipe file.
        dry_run: only resolve the recipe and estimate memory and time from the config (no weights).
        push: override ``publish.push``.
        output_dir: override ``output.dir``.
        repo_id: override ``publish.repo_id``.
        overwrite: replace a non-empty output folder.

    Returns:
        A JSON-able summary (output folder, kept experts per layer, evaluation, timings, push URL).
    """
    recipe_path = None if isinstance(recipe, Recipe) else _recipe_file(recipe)
    recipe = load_recipe(recipe) if not isinstance(recipe, Recipe) else recipe.model_copy(deep=True)
    if repo_id is not None:
        recipe.publish.repo_id = repo_id
    do_push = recipe.publish.push if push is None else push
    out = resolve_output_dir(recipe, output_dir)
    if dry_run:
        return {"dry_run": True, "output_dir": str(out), "push": do_push, "recipe": recipe.to_dict(),
                "estimate": estimate(recipe)}
    _check_before_work(recipe, out, do_push, recipe.publish.repo_id, overwrite, recipe_path)
    config = load_config(recipe)  # the config only: every refusal below comes before any download of weights
    if not recipe.is_offline:
        get_family(config, source=model_source(recipe.model.id))
    from .preflight import check_run_inputs

    check_run_inputs(recipe, model_config=config)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="diep-hub-run-") as tmp:
        work = Path(tmp)
        model, tokenizer = load_model(recipe)
        pruner = build_pruner(recipe)
        tasks, include = evaluation_tasks(recipe, work)
        ev = recipe.evaluation
        results: dict[str, Any] = {}
        if ev.enabled and ev.base:
            logger.info("evaluating the base model")
            results["base"] = evaluate(model, tokenizer, recipe, tasks=tasks, include_path=include)
        model = pruner.prune_model(model, tokenizer)
        cal = recipe.pruning.calibration
        # The card names the calibration data as the recipe does (a Hub name, the offline corpus's name, the path
        # as written), not the cache file an offline corpus was written to.
        pruner.report["calibration"] = {
            "dataset": cal.path if cal.path is not None else cal.dataset,
            "loaded_from": pruner.to_dict()["dataset"],
            "num_samples": cal.num_samples,
            "seq_len": cal.seq_len,
        }
        skipping = _calibrate_skipping(model, tokenizer, recipe) if recipe.skipping.enabled else None
        if ev.enabled:
            logger.info("evaluating the pruned model")
            results["pruned"] = evaluate(model, tokenizer, recipe, tasks=tasks, include_path=include)
        if skipping is not None:
            from .skipping import skip_counts

            # Measured while the pruned model was evaluated; left out where no token went through a layer
            # (no evaluation ran), rather than reported as a rate of 0.
            for index, (skipped, seen) in skip_counts(model).items():
                if seen:
                    skipping["layers"][index]["measured_skip_rate"] = skipped / seen
                    skipping["layers"][index]["measured_slots"] = seen
            if ev.enabled:
                skipping["measured_on"] = "the pruned model's evaluation"
            pruner.report["skipping"] = skipping
        if "base" in results and "pruned" in results:
            from .evaluation import compare

            results["comparison"] = compare(results["base"], results["pruned"])
        from .card import card_files

        card = _build_card(model, pruner, recipe, results)
        extra = {RECIPE_FILE: recipe.to_yaml(resolve_paths=True), **card_files(card)}
        if results:
            extra[EVAL_FILE] = results
        saved = _save(model, pruner, out, tokenizer=tokenizer, stock_format=recipe.output.stock_format,
                      overwrite=overwrite, extra_files=extra)
    summary: dict[str, Any] = {
        "output_dir": str(Path(saved) if saved is not None else out),
        "model": recipe.model.id,
        "method": recipe.pruning.method,
        "sparsity": recipe.pruning.sparsity,
        "experts": experts_table(model.config),
        "evaluation": results,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    if do_push:
        from .hub import push as hub_push

        p = recipe.publish
        info = hub_push(out, p.repo_id, private=p.private, create_pr=p.create_pr, commit_message=p.commit_message)
        summary["pushed"] = {"repo_id": p.repo_id, "commit_url": getattr(info, "commit_url", str(info)),
                             "pr_url": getattr(info, "pr_url", None)}
    return summary


def _recipe_file(path: str | os.PathLike) -> Path | None:
    """The file ``load_recipe`` reads for ``path``: the path itself, or the shipped recipe it names."""
    file = Path(path)
    if file.is_file():
        return file.resolve()
    return shipped_recipes().get(str(path).removesuffix(".yaml"))


def _save(model, pruner, out: Path, *, tokenizer, stock_format: bool, overwrite: bool, extra_files: dict) -> Path:
    """``pruner.save``; for the stock architecture, the same files through ``save_pruned(stock_format=True)``."""
    if not stock_format:
        return pruner.save(model, out, tokenizer=tokenizer, overwrite=overwrite, extra_files=extra_files)
    from .pruner import RECIPE_FILE as PRUNER_CONFIG_FILE
    from .saving import save_pruned

    files = {REPORT_FILE: json.loads(json.dumps(pruner.report, default=_json_default)),
             PRUNER_CONFIG_FILE: pruner.to_dict(), **extra_files}
    return save_pruned(model, out, tokenizer=tokenizer, stock_format=True, overwrite=overwrite, extra_files=files)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _calibrate_skipping(model, tokenizer, recipe: Recipe) -> dict[str, Any]:
    """Calibrate and switch on adaptive expert skipping on the pruned model (paper section 3.3)."""
    from .calibration import load_calibration_data, vocab_size_of
    from .skipping import calibrate_skipping, enable_skipping, reset_skip_counters

    cal = recipe.pruning.calibration
    source, local = _text_source(cal.dataset, cal.path, cal.split, recipe)
    ids = load_calibration_data(
        source, tokenizer, num_samples=recipe.skipping.num_samples, seq_len=cal.seq_len, seed=recipe.pruning.seed,
        config_name=None if local else cal.config, split="train" if local else cal.split, text_field=cal.text_field,
        vocab_size=vocab_size_of(model),
    )
    calibration = calibrate_skipping(
        model, ids, kernel=recipe.skipping.kernel, batch_size=recipe.pruning.search.batch_size,
        seed=recipe.pruning.seed,
    )
    enable_skipping(model, calibration)
    reset_skip_counters(model)
    return calibration.summary()


def _build_card(model, pruner, recipe: Recipe, results: dict[str, Any]):
    from .card import build_model_card

    c = recipe.publish.card
    return build_model_card(
        model,
        report=pruner.report,
        evaluation=results or None,
        base_model=None if recipe.is_offline else recipe.model.id,
        recipe_yaml=recipe.to_yaml(resolve_paths=True),
        license=c.license,
        tags=c.tags,
        extra_markdown=c.extra_markdown,
        repo_id=recipe.publish.repo_id,
        command=f"diep-hub run {RECIPE_FILE}",
        stock_format=recipe.output.stock_format,
    )


def rebuild_card(folder: str | os.PathLike, *, write: bool = True) -> str:
    """(Re)build the model card of a checkpoint folder from its report, evaluation and recipe files.

    The card extras (license, tags, markdown, repo id) come from the folder's ``recipe.yaml`` when there is one.
    Returns the card text; with ``write`` also writes README.md, its figures and ``.eval_results/`` files.
    """
    from .card import build_model_card, write_card

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{folder}: no config.json -> give a checkpoint folder written by `diep-hub run` or `prune`")
    kwargs: dict[str, Any] = {}
    if (path / RECIPE_FILE).is_file():
        recipe = load_recipe(path / RECIPE_FILE)
        c = recipe.publish.card
        kwargs.update(base_model=None if recipe.is_offline else recipe.model.id, license=c.license, tags=c.tags,
                      extra_markdown=c.extra_markdown, repo_id=recipe.publish.repo_id,
                      command=f"diep-hub run {RECIPE_FILE}")
    card = build_model_card(path, **kwargs)
    if write:
        write_card(path, card)
    return str(card)


# ----------------------------------------------------------------------------------------------- inspection
def experts_table(config) -> list[dict[str, Any]]:
    """Per MoE layer: experts kept, originally, and the kept original ids (dense layers are left out)."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    kept = cfg.get("num_experts_per_layer") or []
    original = cfg.get("original_num_experts") or []
    ids = cfg.get("kept_expert_ids") or []
    rows = []
    for i, n in enumerate(kept):
        if n is None:
            continue
        rows.append({"layer": i, "kept": n, "original": original[i] if i < len(original) else None,
                     "kept_ids": ids[i] if i < len(ids) else None})
    return rows


def local_folder(repo_or_dir: str | os.PathLike, *, revision: str | None = None, weights: bool = False) -> Path:
    """A local folder for a checkpoint: the folder itself, or a Hub snapshot (metadata only unless ``weights``)."""
    path = Path(os.path.expanduser(str(repo_or_dir)))
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"{repo_or_dir} is a file -> give a checkpoint folder or a Hub repo id (namespace/name)")
    if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", str(repo_or_dir)):
        raise ConfigError(f"{repo_or_dir!r} is neither a folder nor a Hub repo id -> give DIR or namespace/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = None if weights else ["*.json", "*.md", "*.yaml", "*.py"]
    try:
        return Path(snapshot_download(str(repo_or_dir), revision=revision, allow_patterns=patterns))
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError) as exc:
        raise DiEPError(f"cannot fetch {repo_or_dir!r} from the Hub: {type(exc).__name__}: {exc}") from None


def read_checkpoint_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The small files of a checkpoint folder, parsed: ``config`` (config.json), ``report`` (pruning_report.json),
    ``evaluation`` (evaluation.json) and ``recipe`` (recipe.yaml, as plain data); None for a file that is absent.

    Raises:
        CorruptFileError: a file that is not UTF-8, not valid JSON/YAML (file, line and column named), or whose top
            level is not a mapping.
    """
    folder = Path(folder)
    data: dict[str, Any] = {}
    for key, name in (("config", "config.json"), ("report", REPORT_FILE), ("evaluation", EVAL_FILE)):
        path = folder / name
        data[key] = read_json_object(path, name) if path.is_file() else None
    recipe_path = folder / RECIPE_FILE
    recipe = read_yaml(recipe_path, RECIPE_FILE) if recipe_path.is_file() else None
    if recipe_path.is_file() and not isinstance(recipe, dict):
        raise CorruptFileError(
            f"{RECIPE_FILE} {recipe_path} holds a YAML {type(recipe).__name__}, expected a mapping with a 'model' "
            "section (the recipe `diep-hub run` saved)"
        )
    data["recipe"] = recipe
    return data


def inspect_checkpoint(repo_or_dir: str | os.PathLike, *, revision: str | None = None) -> dict[str, Any]:
    """What a pruned checkpoint holds: experts per layer, how it was made, and its evaluation results."""
    folder = local_folder(repo_or_dir, revision=revision)
    if not (folder / "config.json").exists():
        raise DiEPError(f"{repo_or_dir}: no config.json -> not a model checkpoint")
    metadata = read_checkpoint_metadata(folder)
    config, report = metadata["config"], metadata["report"]
    rows = experts_table(config) or _experts_from_report(report)
    if not rows:
        raise DiEPError(
            f"{repo_or_dir}: neither config.json (num_experts_per_layer) nor {REPORT_FILE} lists experts per layer "
            "-> not a diep_hub pruned checkpoint"
        )
    kept = sum(r["kept"] for r in rows)
    original = sum(r["original"] or r["kept"] for r in rows)
    pruning = config.get("diep_pruning") or {}
    info: dict[str, Any] = {
        "source": str(repo_or_dir),
        "model_type": config.get("model_type"),
        "base_model": pruning.get("base_model") or (report or {}).get("base_model"),
        "method": pruning.get("method") or (report or {}).get("method"),
        "selection": pruning.get("selection") or (report or {}).get("selection"),
        "target_sparsity": pruning.get("sparsity") or (report or {}).get("sparsity"),
        "experts_kept": kept,
        "experts_original": original,
        "sparsity": round(1 - kept / original, 6) if original else None,
        "layers": rows,
        "skipping": bool(config.get("diep_skipping")),
        "has_recipe": (folder / RECIPE_FILE).exists(),
        "results": [],
    }
    card_file = folder / CARD_FILE
    if card_file.exists():
        from huggingface_hub import ModelCard

        card = ModelCard.load(card_file)
        for r in card.data.eval_results or []:
            info["results"].append({"task": r.task_type, "dataset": r.dataset_name or r.dataset_type,
                                    "metric": r.metric_name or r.metric_type, "value": r.metric_value})
        info["base_model"] = info["base_model"] or card.data.base_model
    if not info["base_model"] and info["has_recipe"]:
        model = metadata["recipe"].get("model")
        info["base_model"] = model.get("id") if isinstance(model, dict) else None
    return info


def _experts_from_report(report: dict | None) -> list[dict[str, Any]]:
    """Experts per layer from the pruning report (stock-format checkpoints carry no per-layer config fields)."""
    if not report or not report.get("kept_original_ids"):
        return []
    before = report.get("experts_before", {})
    return [{"layer": int(i), "kept": len(ids), "original": before.get(i), "kept_ids": ids}
            for i, ids in sorted(report["kept_original_ids"].items(), key=lambda kv: int(kv[0]))]


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON beside ``path`` and rename it into place: a failure never leaves a half-written file."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        staging.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_checkpoint` (the CLI's default output)."""
    lines = [
        f"checkpoint:  {info['source']}",
        f"model type:  {info['model_type']}   base model: {info['base_model'] or 'unknown'}",
        f"method:      {info['method'] or 'unknown'} ({info['selection'] or '?'} selection), "
        f"target sparsity {info['target_sparsity']}",
        f"experts:     {info['experts_kept']} of {info['experts_original']} kept "
        f"(sparsity {info['sparsity']:.1%}); skipping {'on' if info['skipping'] else 'off'}",
        "",
        "layer  kept/orig  kept ids",
    ]
    for r in info["layers"]:
        lines.append(f"{r['layer']:>5}  {r['kept']:>4}/{r['original']:<4}  {r['kept_ids']}")
    if info["results"]:
        lines += ["", "results:"]
        for r in info["results"]:
            lines.append(f"  {r['dataset']} {r['metric']}: {r['value']}")
    else:
        lines += ["", "results: none recorded in the card"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- reproduction
def reproduce(
    repo_or_dir: str | os.PathLike, *, revision: str | None = None, atol: float = 1e-5, evaluate_scores: bool = True
) -> dict[str, Any]:
    """Re-run the recipe recorded in a checkpoint and compare: kept experts, weights, importance and eval scores.

    Returns a dict with ``match`` (bool) and one entry per check, each with ``match`` and what differed.
    """
    folder = local_folder(repo_or_dir, revision=revision, weights=True)
    recipe_file = folder / RECIPE_FILE
    if not recipe_file.exists():
        raise DiEPError(f"{repo_or_dir}: no {RECIPE_FILE} -> only checkpoints made by `diep-hub run` can be reproduced")
    if not (folder / "config.json").is_file():
        raise DiEPError(f"{repo_or_dir}: no config.json -> not a model checkpoint")
    recorded = read_checkpoint_metadata(folder)  # a damaged file is named before the hour-long re-run, not after
    recipe = load_recipe(recipe_file)
    recorded_config = recorded["config"]
    recorded_report = recorded["report"] or {}
    recorded_eval = recorded["evaluation"] or {}
    if not evaluate_scores:
        recipe.evaluation.enabled = False
    recipe.publish.push = False

    with tempfile.TemporaryDirectory(prefix="diep-hub-reproduce-") as tmp:
        rerun_dir = Path(tmp) / "rerun"
        summary = run_recipe(recipe, output_dir=rerun_dir, push=False)
        rerun = read_checkpoint_metadata(rerun_dir)
        new_config, new_report = rerun["config"], rerun["report"] or {}
        checks = {
            "kept_experts": _compare_kept(recorded_config, new_config, recorded_report, new_report),
            "weights": _compare_weights(folder, rerun_dir, atol=atol),
            "expert_scores": _compare_numbers(recorded_report.get("scores"), new_report.get("scores"), atol=1e-4),
        }
        if recorded_config.get("diep_skipping") or new_config.get("diep_skipping"):
            checks["skipping_tables"] = _compare_numbers(
                recorded_config.get("diep_skipping") or {}, new_config.get("diep_skipping") or {}, atol=1e-4
            )
        if evaluate_scores and recorded_eval:
            checks["evaluation"] = _compare_numbers(
                _eval_numbers(recorded_eval), _eval_numbers(summary["evaluation"]), atol=1e-4
            )
    return {"source": str(repo_or_dir), "match": all(c["match"] for c in checks.values()), "checks": checks}


def _kept_ids(config: dict, report: dict) -> list | None:
    """Kept original ids per decoder layer: from config.json, or (stock-format checkpoints, whose config has no
    per-layer fields) from pruning_report.json's ``kept_original_ids``."""
    if config.get("kept_expert_ids") is not None:
        return config["kept_expert_ids"]
    by_layer = report.get("kept_original_ids")
    if not by_layer:
        return None
    layers = int(config.get("num_hidden_layers") or 1 + max(int(i) for i in by_layer))
    return [by_layer.get(str(i)) for i in range(layers)]


def _compare_kept(old: dict, new: dict, old_report: dict | None = None, new_report: dict | None = None):
    a, b = _kept_ids(old, old_report or {}), _kept_ids(new, new_report or {})
    diffs = [
        {"layer": i, "recorded": x, "reproduced": y}
        for i, (x, y) in enumerate(zip(a or [], b or []))
        if x != y
    ]
    if len(a or []) != len(b or []):
        diffs.append({"layer": "count", "recorded": len(a or []), "reproduced": len(b or [])})
    return {"match": not diffs and a is not None, "differences": diffs}


def _load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _compare_weights(old: Path, new: Path, *, atol: float) -> dict[str, Any]:
    a, b = _load_tensors(old), _load_tensors(new)
    if not a:
        return {"match": False, "differences": [f"no safetensors weights in {old}"]}
    diffs = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            diffs.append({"tensor": name, "problem": "missing in " + ("recorded" if name not in a else "reproduced")})
        elif a[name].shape != b[name].shape:
            diffs.append({"tensor": name, "problem": f"shape {list(a[name].shape)} vs {list(b[name].shape)}"})
        else:
            delta = (a[name].float() - b[name].float()).abs().max().item() if a[name].numel() else 0.0
            if delta > atol:
                diffs.append({"tensor": name, "max_abs_diff": delta})
    return {"match": not diffs, "tensors": len(a), "differences": diffs[:20], "num_differences": len(diffs)}


def _flatten(value: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}{i}."))
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int | float):
        out[prefix.rstrip(".")] = float(value)
    return out


# Keys whose values are measurements of the machine, not of the model: never compared.
_VOLATILE = re.compile(
    r"(time|seconds|tokens_per_s|throughput|speed|peak|memory|date|version|environment)", re.IGNORECASE
)


def _eval_numbers(results: dict) -> dict[str, float]:
    return {k: v for k, v in _flatten(results).items() if not _VOLATILE.search(k)}


def _compare_numbers(old: Any, new: Any, *, atol: float) -> dict[str, Any]:
    if old is None:
        return {"match": True, "note": "nothing recorded to compare"}
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        same = x is not None and y is not None and (
            math.isclose(x, y, abs_tol=atol, rel_tol=1e-4) or (math.isnan(x) and math.isnan(y))
        )
        if not same:
            diffs.append({"key": key, "recorded": x, "reproduced": y})
    return {"match": not diffs, "compared": len(a), "differences": diffs[:20], "num_differences": len(diffs)}

"""Loading a run's model, config, tokenizer and text sources, with loader failures turned into DiEPErrors.

transformers reports a damaged checkpoint in its own terms: "not a valid JSON file", a safetensors error naming no
file, a pickle error blaming the installed torch, an unknown ``model_type`` as a bare ValueError. This module is the
one place that reads what a recipe's ``model.id`` names and says what went wrong in diep_hub's terms (the file, the
field, what is allowed), so the run, the dry run and ``diep-hub eval`` all refuse a bad model with the same words.
Its functions take the load stage's :class:`~diep_hub.pipeline.plan.LoadConfig`, not the recipe.

``load_model`` is looked up here at call time by the load stage and by ``diep-hub eval``: tests that must prove no
weights load patch ``diep_hub.model_loading.load_model``.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError, CorruptFileError, DiEPError, UnsupportedModelError
from .families.registry import unsupported_model_error
from .files import read_json_object

if TYPE_CHECKING:
    from .pipeline.plan import LoadConfig

logger = logging.getLogger(__name__)


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


def load_config(m: LoadConfig):
    """The model's config only (no weights): an offline model's, or the Hub's/local folder's via AutoConfig."""
    if m.offline:
        from .tiny import offline_config

        return offline_config(m.model_id)
    from transformers import AutoConfig

    local_config = _read_local_config(m.model_id)
    try:
        return AutoConfig.from_pretrained(m.model_id, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except OSError as exc:
        raise DiEPError(f"model.id: cannot load the config of {m.model_id!r} (revision {m.revision}): {exc}") from None
    except ValueError as exc:
        raise _transformers_value_error(m.model_id, local_config, exc) from None


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


def _load_error(m: LoadConfig, local_config: dict | None, exc: Exception) -> DiEPError | None:
    """What went wrong loading the model, as a DiEPError naming the model or file; None when it is not the
    checkpoint's fault (then it is a bug, and keeps its own traceback)."""
    error = _weights_error(m.model_id, exc)
    if error is not None:
        return error
    if isinstance(exc, ValueError):
        error = _transformers_value_error(m.model_id, local_config, exc)
        return error if isinstance(error, UnsupportedModelError) else None
    if isinstance(exc, OSError):  # a Hub repo that cannot be reached, or a folder missing a file
        return DiEPError(f"model.id: cannot load {model_source(m.model_id)} (revision {m.revision}): {exc}")
    return None


def load_model(m: LoadConfig):
    """Load the recipe's model and tokenizer (offline models are built locally, deterministically).

    Raises:
        CorruptFileError: a damaged config.json or weight file, named.
        UnsupportedModelError: a model_type transformers does not know.
    """
    if m.offline:
        from .tiny import build_offline_model

        dtype = torch.float32 if m.dtype == "auto" else getattr(torch, m.dtype)
        return build_offline_model(m.model_id, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local_config = _read_local_config(m.model_id)
    logger.info("loading %s (revision %s, dtype %s, device_map %s)", m.model_id, m.revision, m.dtype, m.device_map)
    try:
        tokenizer = AutoTokenizer.from_pretrained(m.model_id, revision=m.revision,
                                                  trust_remote_code=m.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            m.model_id,
            revision=m.revision,
            dtype=_torch_dtype(m.dtype),
            device_map=m.device_map,
            trust_remote_code=m.trust_remote_code,
        )
    except Exception as exc:
        error = _load_error(m, local_config, exc)
        if error is None:
            raise  # anything else (a bug in a model's own code...) keeps its own traceback
        raise error from exc
    model.eval()
    return model, tokenizer


# A snapshot folder of the Hugging Face cache: ``.../models--<namespace>--<name>/snapshots/<revision>[/...]``.
_HF_CACHE_SNAPSHOT = re.compile(r"(?:^|[/\\])(?:models|datasets|spaces)--(?P<repo>[^/\\]+)[/\\]snapshots[/\\]")


def source_name(name: str | os.PathLike | None) -> str | None:
    """How checkpoint files record a model or data source: the Hub id or the name as the user gave it.

    A snapshot folder of the Hugging Face cache is recorded as its repo id (``models--org--name`` -> ``org/name``;
    the Hub forbids ``--`` in names, so the mapping is exact). Any other absolute or home-relative path is None:
    it names a folder of this machine (often the user's home), which says nothing on another one. A relative path
    is kept as given.
    """
    if name is None:
        return None
    text = os.fspath(name)
    if not text:
        return None
    match = _HF_CACHE_SNAPSHOT.search(text)
    if match is not None:
        return match["repo"].replace("--", "/")
    if os.path.isabs(text) or text.startswith("~"):
        return None
    return text


def base_model_name(model: Any) -> str | None:
    """The pruned model as its files record it: the Hub id (or name) it was loaded from, never a local path
    (:func:`diep_hub.model_loading.source_name`); None for a model built in memory."""
    return source_name(getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None))


def _cache_dir() -> Path:
    """Where offline corpora are written: ``$DIEP_HUB_CACHE``, else beside huggingface_hub's caches (HF_HOME)."""
    from .hub import cache_folder

    return cache_folder("offline-text")


def text_source(dataset: str | None, path: str | None, split: str) -> tuple[str, bool]:
    """(source for the loader, is_local): a local path (already absolute), an offline corpus written as JSONL, or
    a Hub name."""
    if path is not None:
        return str(path), True
    from .tiny import offline_text_file

    local = offline_text_file(str(dataset), split, _cache_dir())
    return (str(local), True) if local is not None else (str(dataset), False)

"""A recipe resolved once into the typed configs of the run's stages: :class:`RunPlan`.

:func:`resolve_plan` is the only function of the pipeline that reads a :class:`~diep_hub.recipe.Recipe`. It applies
the CLI's overrides (``--output``, ``--push``, ``--repo-id``, ``--overwrite``), makes every local path absolute
against the recipe's folder, and hands each stage a frozen config holding exactly what that stage uses. The configs
import nothing heavy (no torch), so resolving a plan is as cheap as validating the recipe.

Text sources (calibration, perplexity) stay unresolved in the plan (:class:`TextSource`): turning the offline
corpus ``diep-hub/tiny-text`` into a file writes to the cache, which a dry run or a refused run must not do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint.layout import RECIPE_FILE

if TYPE_CHECKING:
    from ..pruner import DiEPPruner
    from ..recipe import Recipe


@dataclass(frozen=True)
class TextSource:
    """Text read by a stage: a Hub dataset (``dataset``/``config``/``split``) or a local file (``path``, absolute)."""

    dataset: str | None
    config: str | None
    split: str
    text_field: str
    path: str | None

    def loader_args(self) -> tuple[str, str | None, str]:
        """(source, dataset config, split) for the text loaders: a local file is one "train" split with no config;
        an offline corpus is written as a JSONL file (in the diep_hub cache) and read as such."""
        from ..model_loading import text_source

        source, local = text_source(self.dataset, self.path, self.split)
        return (source, None, "train") if local else (source, self.config, self.split)

    @property
    def named(self) -> str:
        """How the card and report name the data: the path as given or the Hub/offline name, never a cache file."""
        return self.path if self.path is not None else str(self.dataset)


@dataclass(frozen=True)
class LoadConfig:
    """Which checkpoint to load and how (``model`` section). ``offline``: a model diep_hub builds itself."""

    model_id: str
    revision: str | None = None
    dtype: str = "auto"
    device_map: str | dict[str, int | str] | None = None
    trust_remote_code: bool = False
    offline: bool = False

    @property
    def source(self) -> str:
        """How messages name the model: ``folder PATH`` or ``Hub repo ID``."""
        from ..model_loading import model_source

        return model_source(self.model_id)


@dataclass(frozen=True)
class PruneConfig:
    """The :class:`~diep_hub.pruner.DiEPPruner` settings (its keywords, the calibration data still unresolved) and
    what the report records about the run's inputs."""

    pruner_kwargs: dict[str, Any]
    calibration: TextSource
    calibration_named: str  # the calibration data as the recipe names it (card and report)
    base_model: str | None  # ``model.id`` of the pruned model (a Hub id or a folder); None for an offline model

    @property
    def method(self) -> str:
        return self.pruner_kwargs["method"]

    @property
    def sparsity(self) -> float:
        return self.pruner_kwargs["sparsity"]

    def build_pruner(self) -> DiEPPruner:
        """The pruner, given the calibration data by name (a Hub dataset, an offline corpus it resolves itself when
        it loads) or as a local file, so that its settings never record a cache path of this machine."""
        from ..pruner import DiEPPruner

        cal = self.calibration
        data = ({"dataset": cal.path, "dataset_config": None, "split": "train"} if cal.path is not None
                else {"dataset": cal.dataset, "dataset_config": cal.config, "split": cal.split})
        return DiEPPruner(**{**self.pruner_kwargs, **data})


@dataclass(frozen=True)
class SkippingConfig:
    """Adaptive expert skipping, calibrated on the pruned model (paper section 3.3)."""

    enabled: bool
    kernel: str
    num_samples: int
    calibration: TextSource
    seq_len: int
    batch_size: int
    seed: int


@dataclass(frozen=True)
class EvaluationConfig:
    """How the base and the pruned model are evaluated (lm-eval tasks, perplexity, speed, memory)."""

    enabled: bool
    base: bool
    tasks: tuple[str, ...]
    include_path: str | None  # absolute; None: diep_hub's offline tasks are written into the run's work folder
    limit: int | float | None
    batch_size: int
    num_fewshot: int
    seed: int
    perplexity: TextSource | None = None
    perplexity_samples: int = 64
    perplexity_seq_len: int = 2048
    speed: bool = False
    memory: bool = False


@dataclass(frozen=True)
class CardConfig:
    """Model card inputs that come from the recipe rather than from the model."""

    base_model: str | None
    recipe_yaml: str
    license: str | None
    tags: tuple[str, ...]
    extra_markdown: str | None
    repo_id: str | None
    stock_format: bool
    command: str = f"diep-hub run {RECIPE_FILE}"


@dataclass(frozen=True)
class SaveConfig:
    """Where and how the checkpoint is written; ``inputs``: local files the run reads (never inside ``out``)."""

    out: Path
    overwrite: bool
    stock_format: bool
    recipe_yaml: str
    inputs: tuple[Path, ...] = ()


@dataclass(frozen=True)
class PushConfig:
    """Whether and where the saved folder is pushed (``publish`` section, ``--push``/``--repo-id``)."""

    enabled: bool
    repo_id: str | None
    private: bool = False
    create_pr: bool = False
    commit_message: str | None = None


@dataclass(frozen=True)
class RunPlan:
    """Every stage's config, resolved once from a recipe (:func:`resolve_plan`)."""

    load: LoadConfig
    prune: PruneConfig
    skipping: SkippingConfig
    evaluation: EvaluationConfig
    card: CardConfig
    save: SaveConfig
    push: PushConfig


def default_output_dir(recipe: Recipe) -> Path:
    """``out/<model name>-<method>-<sparsity %>`` in the working directory, when neither CLI nor recipe sets one."""
    name = recipe.model.id.rsplit("/", 1)[-1]
    return Path("out") / f"{name}-{recipe.pruning.method}-{round(100 * recipe.pruning.sparsity)}"


def resolve_output_dir(recipe: Recipe, output_dir: str | os.PathLike | None) -> Path:
    """The CLI's ``--output`` wins over ``output.dir``; relative paths are relative to the working directory."""
    chosen = output_dir if output_dir is not None else recipe.output.dir
    return Path(os.path.expanduser(str(chosen))) if chosen is not None else default_output_dir(recipe)


def run_inputs(recipe: Recipe, recipe_path: str | os.PathLike | None) -> list[Path]:
    """The local files and folders a run reads: the recipe file, the model folder, the calibration and perplexity
    files and the task folder (absolute). An output folder must not hold any of them, or saving would replace them.
    """
    from ..model_loading import _local_model_folder

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


def _text(section, recipe: Recipe) -> TextSource:
    return TextSource(dataset=section.dataset, config=section.config, split=section.split,
                      text_field=section.text_field, path=recipe.resolve_path(section.path))


def load_settings(recipe: Recipe) -> LoadConfig:
    """The ``model`` section as the load stage's config (also what ``diep-hub eval`` loads with)."""
    m = recipe.model
    return LoadConfig(model_id=m.id, revision=m.revision, dtype=m.dtype, device_map=m.device_map,
                      trust_remote_code=m.trust_remote_code, offline=recipe.is_offline)


def evaluation_settings(recipe: Recipe) -> EvaluationConfig:
    """The ``evaluation`` section as the evaluation stages' config (also what ``diep-hub eval`` evaluates with)."""
    ev = recipe.evaluation
    ppl = ev.perplexity
    return EvaluationConfig(
        enabled=ev.enabled, base=ev.base, tasks=tuple(ev.tasks), include_path=recipe.resolve_path(ev.include_path),
        limit=ev.limit, batch_size=ev.batch_size, num_fewshot=ev.num_fewshot, seed=recipe.pruning.seed,
        perplexity=_text(ppl, recipe) if ppl is not None else None,
        perplexity_samples=ppl.num_samples if ppl is not None else 64,
        perplexity_seq_len=ppl.seq_len if ppl is not None else 2048,
        speed=ev.speed, memory=ev.memory,
    )


def resolve_plan(
    recipe: Recipe,
    *,
    output_dir: str | os.PathLike | None = None,
    push: bool | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
    recipe_path: str | os.PathLike | None = None,
) -> RunPlan:
    """Every stage's config from ``recipe`` and the command line's overrides (``None``: the recipe's value)."""
    if repo_id is not None or output_dir is not None:
        # the saved recipe.yaml names the repo the checkpoint is pushed to and the folder it is written to (as the
        # command line gave them), not the ones the file said
        recipe = recipe.model_copy(deep=True)
        if repo_id is not None:
            recipe.publish.repo_id = repo_id
        if output_dir is not None:
            recipe.output.dir = os.fspath(output_dir)
    p, cal, pub = recipe.pruning, recipe.pruning.calibration, recipe.publish
    repo = pub.repo_id
    recipe_yaml = recipe.to_yaml(resolve_paths=True)
    kwargs = recipe.to_pruner_kwargs()
    kwargs.pop("dataset"), kwargs.pop("dataset_config"), kwargs.pop("split")  # the TextSource resolves them
    calibration = _text(cal, recipe)
    from ..model_loading import source_name

    base_model = source_name(recipe.model.id)  # the id as given, never a local path; recorded in the report
    card_base_model = None if recipe.is_offline else base_model  # the card's front matter: Hub repos only
    return RunPlan(
        load=load_settings(recipe),
        prune=PruneConfig(pruner_kwargs=kwargs, calibration=calibration, calibration_named=cal.source,
                          base_model=base_model),
        skipping=SkippingConfig(enabled=recipe.skipping.enabled, kernel=recipe.skipping.kernel,
                                num_samples=recipe.skipping.num_samples, calibration=calibration,
                                seq_len=cal.seq_len, batch_size=p.search.batch_size, seed=p.seed),
        evaluation=evaluation_settings(recipe),
        card=CardConfig(base_model=card_base_model, recipe_yaml=recipe_yaml, license=pub.card.license,
                        tags=tuple(pub.card.tags), extra_markdown=pub.card.extra_markdown, repo_id=repo,
                        stock_format=recipe.output.stock_format),
        save=SaveConfig(out=resolve_output_dir(recipe, output_dir), overwrite=overwrite,
                        stock_format=recipe.output.stock_format, recipe_yaml=recipe_yaml,
                        inputs=tuple(run_inputs(recipe, recipe_path))),
        push=PushConfig(enabled=pub.push if push is None else push, repo_id=repo, private=pub.private,
                        create_pr=pub.create_pr, commit_message=pub.commit_message),
    )


__all__ = [
    "CardConfig",
    "EvaluationConfig",
    "LoadConfig",
    "PruneConfig",
    "PushConfig",
    "RunPlan",
    "SaveConfig",
    "SkippingConfig",
    "TextSource",
    "default_output_dir",
    "evaluation_settings",
    "load_settings",
    "resolve_output_dir",
    "resolve_plan",
    "run_inputs",
]

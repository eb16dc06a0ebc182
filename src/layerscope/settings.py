"""Typed, frozen settings: one dataclass per config section, built once from the validated config.

The config schema (``workflow/schemas/config.schema.yaml``) is the one place defaults live. A
section
built with :meth:`Section.of` from a mapping (a job's params, or a partial mapping in a library
call such as ``{"source": "gpt2"}``) gets every key it leaves out from the schema, is validated like
the config (a wrong value raises ConfigError naming the key), and is then immutable. Lists become
tuples, nested sections become their dataclasses.

Each field's docstring says what it means; the schema's descriptions say the same for users.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from layerscope.config import check_schema, load_schema

S = TypeVar("S", bound="Section")


# A section's field types, resolved once per class (not once per field of every section built).
_type_hints = functools.cache(typing.get_type_hints)


def section_schema(path: tuple[str, ...]) -> dict[str, Any]:
    """The schema of one section (``path`` of keys into the schema), able to resolve ``#/$defs``.
    Validation only reads it (defaults are copied out), so the loaded schema is shared."""
    schema = load_schema()
    node = schema
    for key in path:
        node = node[key]
    return {**node, "$defs": schema["$defs"]}


def _frozen(value: Any) -> Any:
    """Lists as tuples, so a section cannot be changed in place."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def _thawed(value: Any) -> Any:
    """The JSON form of a field value (tuples as lists, sections as dicts)."""
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class Section:
    """Base of every settings section: build with :meth:`of`, write with :meth:`to_json`."""

    SCHEMA: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def of(cls: type[S], value: S | Mapping[str, Any] | str | None = None) -> S:
        """``value`` as this section: itself, or a mapping / JSON text completed from the schema."""
        if isinstance(value, cls):
            return value
        # The schema's defaults are filled in place: into a copy, never the caller's mapping.
        filled = json.loads(value) if isinstance(value, str) else copy.deepcopy(dict(value or {}))
        check_schema(filled, section_schema(cls.SCHEMA))
        # Workflow-only keys of the section (experiments, shards, generalization) are not fields.
        return cls(**{f.name: cls._field(f.name, filled[f.name]) for f in dataclasses.fields(cls)})

    @classmethod
    def _field(cls, name: str, value: Any) -> Any:
        hint = _type_hints(cls)[name]
        if isinstance(hint, type) and issubclass(hint, Section):
            return hint.of(value)
        return _frozen(value)

    def to_dict(self) -> dict[str, Any]:
        """The section as plain JSON values (the form it has in the config)."""
        return {f.name: _thawed(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): equal settings give equal text, so Snakemake params built
        from it rerun a job only when a value changes."""
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class ModelSettings(Section):
    """How to load and run one model (config ``models.<name>``)."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("$defs", "model")

    source: str
    """A model hub id or a local directory written by ``save_pretrained``."""
    revision: str | None
    """Hub revision (branch, tag or commit); None = the default branch."""
    layers: str | tuple[int, ...]
    """Layers to cache and probe, or "all"."""
    n_layers: int | None
    """Number of layers, needed only for a hub id with layers "all" (local models are read)."""
    dtype: str
    """float32, bfloat16 or float16: the dtype the model runs in."""
    device: str
    """auto, cpu or cuda."""
    compatibility_mode: bool
    """TransformerLens compatibility mode (folded LayerNorm, centred weights); changes values."""
    bos: bool | str
    """Prepend the tokenizer's BOS token: True, False or "auto" (when the tokenizer has one)."""
    batch_size: int
    """Prompts per forward pass (float noise only)."""
    max_tokens_per_batch: int | None
    """Padded tokens per forward pass; None = no token budget (float noise only)."""
    engine: str
    """native (transformers modules with hooks), bridge (TransformerLens) or auto."""
    self_check: int
    """Prompts each caching job recomputes with plain transformers; 0 = off."""

    IDENTITY: ClassVar[tuple[str, ...]] = (
        "source",
        "revision",
        "dtype",
        "compatibility_mode",
        "bos",
    )

    def identity(self) -> dict[str, Any]:
        """The settings cached numbers depend on (not batch size, device or engine: float noise)."""
        return {k: getattr(self, k) for k in self.IDENTITY}


@dataclasses.dataclass(frozen=True)
class ActivationSettings(Section):
    """What each caching job stores per layer (config ``activations``, less ``shards``)."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("properties", "activations")

    components: tuple[str, ...]
    """Hook points cached at every layer (resid_pre, resid_mid, resid_post, attn_out, mlp_out)."""
    poolings: tuple[str, ...]
    """How a prompt's tokens become one vector: mean, last, max."""
    exclude_bos_from_pooling: bool
    """Leave the BOS token out of mean/max pooling."""
    token_level_layers: tuple[int, ...]
    """Layers whose every real token is also stored."""
    compression: str | None
    """HDF5 compression of the stored arrays (None, gzip, lzf)."""
    out_dtype: str
    """float32 or float16: the dtype of the stored arrays."""


@dataclasses.dataclass(frozen=True)
class ProbeSettings(Section):
    """Linear probes per layer (config ``probes``, less ``generalization``)."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("properties", "probes")

    n_splits: int
    """Outer cross-validation folds (stratified by label, groups kept whole)."""
    n_repeats: int
    """Repeats of the outer cross-validation."""
    inner_splits: int
    """Folds of the inner cross-validation that picks C."""
    Cs: tuple[float, ...]
    """Inverse regularisation strengths the inner cross-validation chooses from."""
    n_permutations: int
    """Most label permutations drawn for the p-value (drawn sequentially)."""
    n_random_directions: int
    """Random directions of the control probe."""
    seed: int
    """Seed of folds, permutations and random directions."""
    thresholds: tuple[float, float]
    """Interval bounds for "weak" and "direction exists" (shifted to each metric's baseline)."""
    families: tuple[str, ...]
    """Probe families fitted on the same folds (always including logistic)."""
    shrinkages: tuple[float, ...]
    """Covariance shrinkage grid of the lda probe, chosen by the inner cross-validation."""
    control_task: bool
    """Also fit every family on a control labelling and report selectivity."""
    n_boot: int
    """Bootstrap resamples of the selectivity and calibration intervals."""
    calibration_bins: int
    """Equal-mass bins of the expected calibration error."""
    fprs: tuple[float, ...]
    """False-positive rates at which recall is reported."""
    alpha: float
    """Level of the Holm-corrected permutation p-value in the probe card and the layer checks."""


@dataclasses.dataclass(frozen=True)
class ProbeCausalSettings(Section):
    """Causal test of the probe directions (config ``probes.causal``)."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("properties", "probes", "properties", "causal")

    enabled: bool
    """Run the causal test for every steering experiment whose direction is a probe."""
    layers: tuple[int, ...]
    """Layers tested besides the best probe layer."""
    alpha: float
    """Step added (+alpha and -alpha) in units of the layer's mean residual norm."""
    n_random: int
    """Random directions of the null band."""
    seed: int
    """Seed of the random directions."""


@dataclasses.dataclass(frozen=True)
class GenerationSettings(Section):
    """Generation-time patching (config ``patching.generation``)."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("properties", "patching", "properties", "generation")

    enabled: bool
    """Run generation patching for every experiment."""
    max_new_tokens: int
    """Tokens generated per run."""
    answer_regex: str
    """The answer is the first match in the generated text (its first group if it has one)."""
    positions: Any
    """Single-position cells: "all", the last k prompt positions, or a list (ints, "diff",
    "genK")."""
    ranges: tuple[str, ...]
    """Positions patched as one intervention: "prompt" or "genA-B"."""
    components: tuple[str, ...] | None
    """Components to patch; None = patching.components."""
    layers: str | tuple[int, ...]
    """Layers to patch, or "all"."""


@dataclasses.dataclass(frozen=True)
class AttributionSettings(Section):
    """Attribution patching and the screen (config ``patching.attribution``)."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("properties", "patching", "properties", "attribution")

    qk_fix: bool
    """AtP* QK fix: also estimate query and key cells with the softmax recomputed exactly."""
    grad_drop: bool
    """AtP* GradDrop: one more backward pass per layer, adds the atp_graddrop magnitude."""
    top_k: int
    """Screen: the top k cells by |atp| are patched exactly."""
    n_random: int
    """Screen: a seeded uniform sample of this many other cells is patched exactly."""
    max_tokens_per_batch: int
    """Tokens per side in one attribution batch."""


@dataclasses.dataclass(frozen=True)
class PatchingSettings(Section):
    """Activation patching (config ``patching``, less ``experiments``)."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("properties", "patching")

    components: tuple[str, ...]
    """Components patched at every (layer, position)."""
    positions: Any
    """"all", the last k positions (an integer), or a list of positions."""
    heads: bool
    """Also patch each attention head's output (hook_z) at the last position."""
    n_boot: int
    """Bootstrap resamples of the pairs for the summary intervals."""
    seed: int
    """Seed of the bootstrap."""
    method: str
    """exact, attribution or screen (an experiment's own method overrides it)."""
    attribution: AttributionSettings
    """Attribution patching and the screen."""
    generation: GenerationSettings
    """Generation-time patching."""


@dataclasses.dataclass(frozen=True)
class PrecisionSettings(Section):
    """Goals every intervention summary measures itself against (config ``precision``)."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("properties", "precision")

    confidence: float
    """Confidence of every interval."""
    half_width: float
    """Target interval half-width (a share for rates, the metric's units for means)."""
    rate_effect: float
    """Change of a rate to detect with the given power."""
    effect_size: float
    """Standardized mean change (Cohen's d) to detect with the given power."""
    power: float
    """Power wanted for the effects above."""


@dataclasses.dataclass(frozen=True)
class TaskVectorSettings(Section):
    """Task-vector geometry of task-grid datasets (config ``task_vectors``)."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("properties", "task_vectors")

    component: str | None
    """Cached component; None = the first of activations.components."""
    pooling: str
    """Cached pooling."""
    n_boot: int
    """Bootstrap resamples of the number pairs."""
    seed: int
    """Seed of the bootstrap."""
    layer: int | None
    """Layer of the prompt-cosine heatmap besides the best layer; None = the middle cached layer."""


@dataclasses.dataclass(frozen=True)
class FigureSettings(Section):
    """Figures (config ``figures``)."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("properties", "figures")

    formats: tuple[str, ...]
    """File formats of every figure (png, svg, pdf)."""
    tsne: bool
    """Also draw t-SNE embeddings per layer."""
    metric: str
    """Probe metric of the figures (auroc, accuracy, balanced_accuracy, f1)."""
    component: str | None
    """Component of the geometry figures; None = the first of activations.components."""
    pooling: str | None
    """Pooling of the geometry figures; None = the first of activations.poolings."""


@dataclasses.dataclass(frozen=True)
class TunedLensSettings(Section):
    """The tuned lens's affine translators (config ``cot.tuned_lens``)."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("properties", "cot", "properties", "tuned_lens")

    train_fraction: float
    """Share of the dataset's groups the translators are trained on; the rest is held out."""
    steps: int
    """Optimizer steps per layer."""
    lr: float
    """Adam learning rate."""
    batch_tokens: int
    """Token positions per step."""
    max_tokens: int
    """Training token positions kept (a seeded sample when there are more)."""


@dataclasses.dataclass(frozen=True)
class EarlyAnsweringSettings(Section):
    """Early answering (config ``cot.early_answering``)."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("properties", "cot", "properties", "early_answering")

    enabled: bool
    """Run early answering for every chain-of-thought dataset."""
    fractions: tuple[float, ...]
    """Shares of the reasoning tokens kept (1 is always added)."""
    max_new_tokens: int
    """Tokens generated per variant."""
    filler: str
    """Text whose tokens replace the reasoning in the filler control."""
    answer_regex: str
    """The answer is the first match after the marker in the generated text."""


@dataclasses.dataclass(frozen=True)
class CotSettings(Section):
    """Chain-of-thought readouts (config ``cot``, less ``datasets``)."""

    SCHEMA: ClassVar[tuple[str, ...]] = ("properties", "cot")

    answer_marker: str
    """Regex that marks the answer in a response (the last match)."""
    lens: tuple[str, ...]
    """Lenses applied at every layer and position: logit, tuned."""
    top_k: int
    """Top tokens kept per (layer, position)."""
    chunk: int
    """Positions read out at once (vocabulary-sized logits exist for these only)."""
    bins: int
    """Relative-position bins over the reasoning in the lens summary."""
    probes: tuple[Any, ...]
    """Trained probes ({dataset, layer, component, pooling}) applied at every position."""
    n_boot: int
    """Bootstrap resamples of the prompts for the lead-time medians."""
    seed: int
    """Seed of the bootstrap and of the tuned-lens split."""
    check_atol: float
    """Largest allowed gap between the last layer's logit lens and the model's own log-probs."""
    tuned_lens: TunedLensSettings
    """The tuned lens's translators."""
    early_answering: EarlyAnsweringSettings
    """Early answering."""

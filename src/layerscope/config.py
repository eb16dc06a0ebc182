"""Config helpers shared by the Snakefile and the library: model layers, input files, checks.

The JSON schema (workflow/schemas/config.schema.yaml) checks shapes and types; this module checks
what the schema cannot: files exist, a local model directory is complete, layers are in range.
:func:`validate_config` runs everything (duplicate YAML keys, the schema with its defaults, the
checks here) and reports the first mistake as one :class:`ConfigError` naming its key path.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from layerscope.errors import ConfigError, InputError, LayerscopeError

# The workflow's schema (the package is installed from its checkout: pip install -e).
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
DATASET_FILE_KEYS = {
    "phase2": ("scores", "responses"),
    "facts": ("path",),
    "labelled": ("path",),
    "task_grid": (),
}
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "special_tokens_map.json",
)
# Names of models, datasets, generalization groups and experiments become parts of output paths.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")
NAMED_SECTIONS = (
    ("models",),
    ("datasets",),
    ("probes", "generalization"),
    ("patching", "experiments"),
)
_UNSAFE_NAME = (
    "not safe as a path part: use letters, digits, '_', '.', '-', "
    "starting with a letter or digit (at most 80)"
)


def stop_run(exc: BaseException) -> NoReturn:
    """End the parse of the workflow with the message alone and exit status 1. Snakemake prints a
    WorkflowError raised in a .smk file with a ``File ".../common.smk", line 36, in <module>``
    line, which points at the workflow's code rather than at the user's key or file."""
    print(f"WorkflowError:\n{exc}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def key_path(parts: Iterable[Any]) -> str:
    """``["models", "demo", "layers", 2]`` -> ``models.demo.layers[2]``."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) and not isinstance(part, bool) else f".{part}"
    return out.lstrip(".") or "(top level)"


# --------------------------------------------------------------------------------------------------
# duplicate keys: YAML loaders keep the last of two equal keys without a word


def check_duplicate_keys(paths: Iterable[str | os.PathLike]) -> None:
    """Raise ConfigError for a mapping key given twice within one config file (e.g. two datasets
    of the same name). The same key in two different files is an override, not a mistake."""
    import yaml

    for path in paths:
        try:
            root = yaml.compose(
                Path(path).read_text(encoding="utf-8"),
                Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader),
            )
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # Snakemake has already loaded it or said what is wrong with it
        _duplicate_keys(root, [], os.fspath(path), set())


def _duplicate_keys(node: Any, parts: list[Any], file: str, seen: set[int]) -> None:
    import yaml

    if node is None or id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                _duplicate_keys(value, [*parts, "?"], file, seen)
                continue
            if (
                key.tag != "tag:yaml.org,2002:merge"
            ):  # '<<: *anchor' then explicit keys is an override
                line = key.start_mark.line + 1
                ident = (key.tag, key.value)
                if ident in first_line:
                    lines = (
                        f"line {line}"
                        if first_line[ident] == line
                        else f"lines {first_line[ident]} and {line}"
                    )
                    raise ConfigError(
                        key_path([*parts, key.value]),
                        f"defined twice in {file} ({lines}); "
                        "YAML would silently keep only the last",
                    )
                first_line[ident] = line
            _duplicate_keys(value, [*parts, key.value], file, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, [*parts, i], file, seen)


# --------------------------------------------------------------------------------------------------
# YAML syntax: Snakemake says only "not valid JSON or YAML"; this names the file, line and column


def check_yaml_syntax(path: str | os.PathLike) -> None:
    """Raise InputError naming ``path``, the line and the column of a YAML syntax error."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text (byte {exc.start})", file=path) from None
    except OSError as exc:
        raise InputError(f"cannot be read ({exc.strerror})", file=path) from None
    try:
        yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        column = f" (column {mark.column + 1})" if mark is not None else ""
        what = " ".join(
            str(p) for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p
        )
        raise InputError(
            f"invalid YAML{column}: {what or exc}; check the indentation (spaces only, no tabs) "
            "of this line and the one before",
            file=path,
            line=mark.line + 1 if mark is not None else None,
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m layerscope.config my.yaml [more.yaml ...]``: check config files as the workflow
    would (YAML syntax with file and line, then schema and files), merged in order."""
    import sys

    import yaml

    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m layerscope.config CONFIG.yaml [MORE.yaml ...]", file=sys.stderr)
        return 2
    schema = SCHEMA_PATH
    try:
        merged: dict[str, Any] = {}
        for path in paths:
            check_yaml_syntax(path)
            _merge(merged, yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {})
        validate_config(merged, schema, configfiles=paths, base_dir=".")
    except LayerscopeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"ok: {', '.join(paths)}")
    return 0


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    """Snakemake's merge of several config files: mappings recursively, anything else replaced."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


# --------------------------------------------------------------------------------------------------
# the JSON schema, with defaults filled in and errors as one line naming the key path


def check_schema(config: dict[str, Any], schema: str | os.PathLike | dict[str, Any]) -> None:
    """Validate ``config`` against the JSON schema (a path or the loaded schema), filling in the
    schema's defaults in place like ``snakemake.utils.validate(set_default=True)``.
    Raises ConfigError for the most relevant violation."""
    import jsonschema

    if not isinstance(schema, dict):
        schema = load_schema(schema)
    validator = _defaulting_validator(jsonschema.Draft202012Validator)(schema)
    errors = list(validator.iter_errors(config))
    if errors:
        raise _config_error(max(errors, key=_relevance))


def load_schema(path: str | os.PathLike = SCHEMA_PATH) -> dict[str, Any]:
    """The parsed schema file, read once per version of it (callers must not modify it)."""
    return _load_schema(os.path.abspath(path), os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_schema(path: str, mtime_ns: int) -> dict[str, Any]:
    """The schema file, parsed once per version (never modified: defaults are copied out of it)."""
    import yaml

    return yaml.load(
        Path(path).read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    )


def _defaulting_validator(cls: Any) -> Any:
    from jsonschema import validators

    check_properties = cls.VALIDATORS["properties"]

    def properties(
        validator: Any, props: dict[str, Any], instance: Any, schema: dict[str, Any]
    ) -> Any:
        if isinstance(instance, dict):
            for key, sub in props.items():
                if isinstance(sub, dict) and "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, props, instance, schema)

    return validators.extend(cls, {"properties": properties})


def _relevance(error: Any) -> Any:
    from jsonschema.exceptions import by_relevance

    return by_relevance(strong=frozenset({"additionalProperties"}))(error)


_TYPE_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true/false",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}
_PLURALS = {
    "integer": "integers",
    "number": "numbers",
    "string": "strings",
    "boolean": "booleans",
    "array": "lists",
    "object": "mappings",
    "null": "nulls",
}
_MISFITS = {
    "type",
    "const",
    "enum",
}  # a oneOf branch failing on these at its top is the wrong branch


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, default=str)
        return text if len(text) <= 60 else text[:57] + "..."
    return repr(value)


def _kind_of(value: Any) -> str:
    for name, kind in (
        (bool, "boolean"),
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        (list, "list"),
        (dict, "mapping"),
        (type(None), "null"),
    ):
        if isinstance(value, name):
            return kind
    return type(value).__name__


def _describe(schema: Any) -> str:
    """A few words for what a (sub)schema accepts: e.g. "an integer >= 1", "a list of integers"."""
    if not isinstance(schema, dict):
        return "a valid value"
    if "const" in schema:
        return _show(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(_show(v) for v in schema["enum"])
    types = schema.get("type")
    if types is None:
        return "a valid value"
    words = []
    for name in [types] if isinstance(types, str) else types:
        word = _TYPE_NAMES.get(name, name)
        if name == "array" and isinstance(schema.get("items"), dict) and "type" in schema["items"]:
            items = schema["items"]["type"]
            word = "a list of " + "/".join(
                _PLURALS.get(i, i) for i in ([items] if isinstance(items, str) else items)
            )
            if "minimum" in schema["items"]:
                word += f" >= {schema['items']['minimum']}"
        elif name in ("integer", "number") and "minimum" in schema:
            word += f" >= {schema['minimum']}"
        words.append(word)
    return _or(words)


def _or(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _suggest(word: Any, choices: Iterable[Any]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(
        word, [c for c in choices if isinstance(c, str)], n=1, cutoff=0.6
    )
    return f"; did you mean '{close[0]}'?" if close else ""


def _config_error(error: Any) -> ConfigError:
    parts = list(error.absolute_path)
    value, rule, schema = error.instance, error.validator, error.schema
    if "propertyNames" in error.absolute_schema_path:
        return ConfigError(key_path([*parts, str(value)]), f"name {_UNSAFE_NAME}")
    if rule in ("oneOf", "anyOf"):
        branches: dict[Any, list[Any]] = {}
        for sub in error.context or ():
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        fitting = [
            errs
            for errs in branches.values()
            if not any(not e.relative_path and e.validator in _MISFITS for e in errs)
        ]
        if len(fitting) == 1:
            return _config_error(max(fitting[0], key=_relevance))
        expected = _or([_describe(branch) for branch in error.validator_value])
        return ConfigError(key_path(parts), f"expected {expected}, got {_show(value)}")
    if rule == "additionalProperties" and isinstance(value, dict):
        known = schema.get("properties", {})
        patterns = list(schema.get("patternProperties", {}))
        extra = [
            k for k in value if k not in known and not any(re.search(p, str(k)) for p in patterns)
        ]
        if extra:
            hint = _suggest(extra[0], known) or f"; valid keys: {', '.join(sorted(known))}"
            more = f" (also unknown: {', '.join(map(str, extra[1:]))})" if extra[1:] else ""
            return ConfigError(key_path([*parts, extra[0]]), f"unknown key{hint}{more}")
    if rule == "required" and isinstance(value, dict):
        missing = [k for k in error.validator_value if k not in value]
        if missing:
            return ConfigError(key_path([*parts, missing[0]]), "required key is missing")
    if rule == "type":
        got = _show(value) if value is None else f"{_show(value)} ({_kind_of(value)})"
        return ConfigError(key_path(parts), f"expected {_describe(schema)}, got {got}")
    if rule in ("minItems", "maxItems", "minProperties") and isinstance(value, (list, dict)):
        bound = "at least" if rule.startswith("min") else "at most"
        what = "entry" if isinstance(value, dict) else "item"
        n = error.validator_value
        return ConfigError(
            key_path(parts),
            f"expected {bound} {n} {what}{'s' if n != 1 else ''}, got {_show(value)}",
        )
    if rule == "enum":
        choices = ", ".join(_show(v) for v in error.validator_value)
        return ConfigError(
            key_path(parts),
            f"{_show(value)} is not one of {choices}{_suggest(value, error.validator_value)}",
        )
    if rule == "const":
        return ConfigError(
            key_path(parts), f"expected {_show(error.validator_value)}, got {_show(value)}"
        )
    return ConfigError(key_path(parts), error.message)


def validate_config(
    config: dict[str, Any],
    schema: str | os.PathLike | dict[str, Any],
    *,
    configfiles: Sequence[str | os.PathLike] = (),
    base_dir: str | Path = ".",
) -> dict[str, list[int]]:
    """Everything a config must pass before any job runs: no key twice in one of ``configfiles``,
    the schema (defaults filled into ``config``), then :func:`check_config`. Returns
    {model name: resolved layers}; raises ConfigError naming the key path and the reason."""
    check_duplicate_keys(configfiles)
    check_schema(config, schema)
    return check_config(config, base_dir)


def is_local_model(source: str, base_dir: str | Path = ".") -> bool:
    """A source is a local directory if it exists or looks like a path; otherwise a hub id."""
    path = Path(base_dir) / source
    return path.is_dir() or source.startswith((".", "/", "~")) or source.count("/") > 1


def model_files(source: str, base_dir: str | Path = ".") -> list[str]:
    """Files of a local model directory that the cached activations depend on (sorted)."""
    if not is_local_model(source, base_dir):
        return []
    root = Path(base_dir) / source
    files = {root / "config.json"}
    for pattern in _WEIGHT_GLOBS:
        files.update(root.glob(pattern))
    files.update(p for p in (root / name for name in _TOKENIZER_FILES) if p.exists())
    return sorted(str(Path(source) / p.relative_to(root)) for p in files)


def read_n_layers(source: str, base_dir: str | Path = ".") -> int | None:
    """Number of transformer blocks from a local model's config.json (None for hub ids)."""
    if not is_local_model(source, base_dir):
        return None
    cfg_path = Path(base_dir) / source / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    text_cfg = cfg.get("text_config") or {}
    return text_cfg.get("num_hidden_layers")


def _local_config_json(source: str, base_dir: str | Path) -> dict | None:
    """A local model's config.json as a dict; None for hub ids or an unreadable file (the model
    loader reports those when the job starts)."""
    if not is_local_model(source, base_dir):
        return None
    try:
        return json.loads((Path(base_dir) / source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_d_model(source: str, base_dir: str | Path = ".") -> int | None:
    """Residual width from a local model's config.json (None for hub ids or when not given)."""
    cfg = _local_config_json(source, base_dir)
    if cfg is None:
        return None
    cfg = cfg if "text_config" not in cfg else {**cfg, **cfg["text_config"]}
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def resolve_layers(name: str, model: dict[str, Any], base_dir: str | Path = ".") -> list[int]:
    """The sorted layer list of a model, with "all" expanded and every index range-checked."""
    n_layers = model.get("n_layers") or read_n_layers(model["source"], base_dir)
    layers = model.get("layers", "all")
    if layers == "all":
        if n_layers is None:
            raise ConfigError(
                f"models.{name}.layers",
                f"'all' needs the layer count of hub model '{model['source']}': "
                "give a list of layers or set n_layers",
            )
        return list(range(n_layers))
    layers = sorted(int(layer) for layer in layers)
    if n_layers is not None:
        bad = [layer for layer in layers if layer >= n_layers]
        if bad:
            raise ConfigError(
                f"models.{name}.layers",
                f"layer(s) {bad} out of range: model '{model['source']}' has {n_layers} layers "
                f"(0-{n_layers - 1})",
            )
    return layers


_MAX_HEADER = (
    100 << 20
)  # a safetensors header is JSON of tensor names and offsets: megabytes at most


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with the framing of a safetensors file, or None. Reads only its header, so a
    dry run stays fast: the 8-byte header length, the JSON header, and whether the file is as long
    as the tensors the header lists (a truncated download is shorter)."""
    size = os.path.getsize(path)
    if size < 8:
        return f"{size} bytes: too short for a safetensors file"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, _MAX_HEADER):
            return (
                f"its header claims {n} bytes but the file has {size}: "
                "truncated or not a safetensors file"
            )
        try:
            header = json.loads(f.read(n))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not valid safetensors JSON: the file is corrupt"
    if 8 + n + end != size:
        return (
            f"{size} bytes, but its header lists tensors up to byte {8 + n + end}: "
            "truncated or corrupt"
        )
    return None


def check_model_dir(root: Path, key: str) -> None:
    """A local model directory must have a readable config.json and complete weights files."""
    try:
        json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(
            key, f"{root / 'config.json'} is not valid JSON ({exc}): save the model again"
        ) from None
    weights = [p for pattern in _WEIGHT_GLOBS for p in sorted(root.glob(pattern))]
    if not weights:
        raise ConfigError(
            key,
            f"{root} has no weights (*.safetensors or *.bin): save the model with save_pretrained",
        )
    for path in weights:
        problem = safetensors_problem(path) if path.suffix == ".safetensors" else None
        if problem:
            raise ConfigError(
                key,
                f"{path}: {problem}; download the model again (or save it again with "
                "save_pretrained) and rerun",
            )


def context_length(source: str, base_dir: str | Path = ".") -> int | None:
    """The longest input a local model takes (config.json), or None (hub id, or no limit given)."""
    cfg = _local_config_json(source, base_dir)
    if cfg is None:
        return None
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def fast_tokenizer_file(source: str, base_dir: str | Path = ".") -> str | None:
    """A local model's tokenizer.json if the ``tokenizers`` package can read it here, else None."""
    path = Path(base_dir) / source / "tokenizer.json"
    if not is_local_model(source, base_dir) or not path.is_file():
        return None
    try:
        import tokenizers  # noqa: F401  (only with the model extra)
    except ImportError:
        return None
    return str(path)


def check_prompt_lengths(
    dataset: str, longest: dict[str, list], models: dict[str, Any], base_dir: str | Path = "."
) -> None:
    """ConfigError when a dataset's longest prompt (plus BOS) exceeds a local model's context."""
    for name, (n_tokens, prompt_id) in sorted(longest.items()):
        limit = context_length(models[name]["source"], base_dir)
        total = n_tokens + (0 if models[name].get("bos") is False else 1)
        if limit is not None and total > limit:
            raise ConfigError(
                f"datasets.{dataset}",
                f"prompt '{prompt_id}' is {total} tokens long (with BOS), longer than the "
                f"{limit}-token context of model '{name}' ({models[name]['source']}): "
                "shorten or drop the long prompts",
            )


def dataset_files(spec: dict[str, Any]) -> list[str]:
    return [spec[key] for key in DATASET_FILE_KEYS.get(spec.get("kind"), ()) if key in spec]


def check_config(config: dict[str, Any], base_dir: str | Path = ".") -> dict[str, list[int]]:
    """Checks beyond the schema; returns {model name: resolved layers}. Raises ConfigError."""
    base = Path(base_dir)
    _check_names(config)
    for name, spec in config["datasets"].items():
        for key in DATASET_FILE_KEYS.get(spec["kind"], ()):
            if key in spec and not (base / spec[key]).is_file():
                raise ConfigError(f"datasets.{name}.{key}", f"file not found: {spec[key]}")
    layers = {}
    for name, model in config["models"].items():
        _check_model_source(name, model["source"], base)
        layers[name] = resolve_layers(name, model, base)
        for layer in config.get("activations", {}).get("token_level_layers", []):
            if layer not in layers[name]:
                raise ConfigError(
                    "activations.token_level_layers",
                    f"layer {layer} is not among the layers of model '{name}' ({layers[name]})",
                )
    for name, exp in config.get("patching", {}).get("experiments", {}).items():
        if not (base / exp["pairs"]).is_file():
            raise ConfigError(
                f"patching.experiments.{name}.pairs", f"file not found: {exp['pairs']}"
            )
    _check_pairs_files(config, base)
    _check_cached_views(config, layers)
    _check_generation(config, base)
    for group, members in config.get("probes", {}).get("generalization", {}).items():
        unknown = [d for d in members if d not in config["datasets"]]
        if unknown:
            raise ConfigError(f"probes.generalization.{group}", f"unknown dataset(s) {unknown}")
    return layers


_GEN_STEP = re.compile(r"^gen(\d+)(?:-(\d+))?$")


def _check_generation(config: dict[str, Any], base: Path) -> None:
    """Generation patching settings that used to fail only after the logit sweep: the answer
    rule compiles, every genK / genA-B step is a generated step (A <= B), the layers exist, and
    every pairs file has the columns generation patching reads."""
    gen = config.get("patching", {}).get("generation", {})
    if not gen.get("enabled") or not config["patching"].get("experiments"):
        return
    key = "patching.generation"
    try:
        re.compile(gen["answer_regex"])
    except re.error as exc:
        raise ConfigError(f"{key}.answer_regex", f"not a regular expression: {exc}") from None
    n = int(gen["max_new_tokens"])
    labels = [("positions", p) for p in gen["positions"] if isinstance(gen["positions"], list)]
    for sub, label in labels + [("ranges", r) for r in gen["ranges"]]:
        m = _GEN_STEP.match(str(label).strip())
        if not m:
            continue
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if a > b:
            raise ConfigError(f"{key}.{sub}", f"{label!r} is reversed: write gen{b}-{a}")
        if a < 1 or b > n - 1:
            raise ConfigError(
                f"{key}.{sub}",
                f"{label!r}: generation steps run from 1 to max_new_tokens - 1 = {n - 1} (step K "
                f"is read when token K + 1 is generated); raise {key}.max_new_tokens to {b + 1}",
            )
    if gen["layers"] != "all":
        for name, model in config["models"].items():
            n_layers = model.get("n_layers") or read_n_layers(model["source"], base)
            bad = [L for L in gen["layers"] if n_layers is not None and not 0 <= L < n_layers]
            if bad:
                raise ConfigError(
                    f"{key}.layers", f"{bad} are not layers of model '{name}' (0-{n_layers - 1})"
                )


def _check_pairs_files(config: dict[str, Any], base: Path) -> None:
    """Every pairs file reads as a pairs table (columns, empty cells), errors naming the key."""
    from layerscope.interventions.patching import load_pairs

    for name, exp in config.get("patching", {}).get("experiments", {}).items():
        try:
            load_pairs(base / exp["pairs"])
        except LayerscopeError as exc:
            raise ConfigError(f"patching.experiments.{name}.pairs", str(exc)) from None


def check_pair_tokens(config: dict[str, Any], tokenizers: dict[str, str | None]) -> None:
    """Dry-run checks of every pairs file under each local model's fast tokenizer: clean and
    corrupted prompts of equal token length, and every listed patching position inside every
    prompt. Counts leave out special tokens; a BOS the model may prepend only adds room, so these
    checks never refuse what the job would accept (the job checks again with the model's BOS)."""
    if not any(tokenizers.values()):
        return  # hub models only, or no tokenizers package: the job checks
    from tokenizers import Tokenizer

    from layerscope.interventions.patching import load_pairs

    patching = config.get("patching", {})
    for model, path in sorted((m, t) for m, t in tokenizers.items() if t):
        tok = Tokenizer.from_file(os.fspath(path))
        bos = 0 if config["models"][model].get("bos") is False else 1
        for name, exp in sorted(patching.get("experiments", {}).items()):
            pairs = load_pairs(exp["pairs"])
            for rec in pairs.itertuples(index=False):
                where = f"{pairs.attrs['source']}, line {rec.source_line}"
                n_clean, n_corr = (
                    len(e.ids)
                    for e in tok.encode_batch([rec.clean, rec.corrupted], add_special_tokens=False)
                )
                if n_clean != n_corr:
                    raise ConfigError(
                        f"patching.experiments.{name}.pairs",
                        f"{where}: field 'corrupted': pair {rec.pair_id!r}: clean and corrupted "
                        f"prompts tokenize to different lengths under model '{model}' "
                        f"({n_clean} and {n_corr} tokens); patching needs position-aligned prompts",
                    )
                _check_positions(patching, n_clean + bos, rec.pair_id, where)


def _check_positions(patching: dict[str, Any], n: int, pair_id: str, where: str) -> None:
    """Listed prompt positions (negative: from the end) exist in an ``n``-token prompt."""
    gen = patching.get("generation", {})
    lists = [("patching.positions", patching.get("positions"))]
    if gen.get("enabled"):
        lists.append(("patching.generation.positions", gen.get("positions")))
    for key, positions in lists:
        if not isinstance(positions, list):
            continue
        for p in positions:
            if isinstance(p, int) and not isinstance(p, bool) and not -n <= p < n:
                raise ConfigError(
                    key,
                    f"position {p} does not exist in pair {pair_id!r} ({where}; {n} tokens "
                    "counting a BOS)",
                )


def _check_names(config: dict[str, Any]) -> None:
    """Every name of a named section (datasets, models, ...) is safe as a path part."""
    for section in NAMED_SECTIONS:
        names: Any = config
        for part in section:
            names = names.get(part, {}) if isinstance(names, dict) else {}
        for name in names:
            if not (isinstance(name, str) and SAFE_NAME.fullmatch(name)):
                raise ConfigError(key_path([*section, name]), f"name {_UNSAFE_NAME}")


def _check_model_source(name: str, source: str, base: Path) -> None:
    """A local model source is a complete save_pretrained directory; a hub id is no local path."""
    if is_local_model(source, base):
        root = base / source
        if not root.is_dir():
            raise ConfigError(f"models.{name}.source", f"model directory not found: {source}")
        if not (root / "config.json").is_file():
            raise ConfigError(
                f"models.{name}.source",
                f"{source} has no config.json (not a save_pretrained directory)",
            )
        if not any(
            (root / f).is_file()
            for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        ):
            raise ConfigError(
                f"models.{name}.source",
                f"{source} has no tokenizer files (tokenizer.json/tokenizer_config.json)",
            )
        check_model_dir(root, f"models.{name}.source")
    elif "/" in source and (base / source.split("/")[0]).is_dir():
        raise ConfigError(
            f"models.{name}.source",
            f"model directory not found: {source} (not taken for a hub id: "
            f"'{source.split('/')[0]}/' is a local directory)",
        )


def _check_cached_views(config: dict[str, Any], layers: dict[str, list[int]]) -> None:
    """The figures' and task vectors' component, pooling and layer are among those cached."""
    act = config.get("activations", {})
    components = act.get("components", ["resid_post"])
    poolings = act.get("poolings", ["mean", "last"])
    figures = config.get("figures", {})
    if figures.get("component") and figures["component"] not in components:
        raise ConfigError(
            "figures.component",
            f"'{figures['component']}' is not cached: add it to activations.components "
            f"{components}",
        )
    if figures.get("pooling") and figures["pooling"] not in poolings:
        raise ConfigError(
            "figures.pooling",
            f"'{figures['pooling']}' is not cached: add it to activations.poolings {poolings}",
        )
    has_grid = any(spec["kind"] == "task_grid" for spec in config["datasets"].values())
    tv = config.get("task_vectors", {})
    if has_grid and tv.get("pooling", "last") not in poolings:
        raise ConfigError(
            "task_vectors.pooling",
            f"'{tv.get('pooling', 'last')}' is not cached: add it to activations.poolings",
        )
    if has_grid and tv.get("component") and tv["component"] not in components:
        raise ConfigError(
            "task_vectors.component",
            f"'{tv['component']}' is not cached: add it to activations.components",
        )
    if has_grid and tv.get("layer") is not None:
        for name, model_layers in layers.items():
            if tv["layer"] not in model_layers:
                raise ConfigError(
                    "task_vectors.layer",
                    f"layer {tv['layer']} is not among the layers of model '{name}' "
                    f"({model_layers})",
                )


if __name__ == "__main__":
    raise SystemExit(main())

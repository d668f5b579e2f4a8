"""The study's configuration: a TOML file (``mechprobe study --config study.toml``), command-line
flags for simple cases, and the prompt files of published defense wordings.

    model = "llava-hf/llava-1.5-7b-hf"      # or "toy", "tiny-random", a local folder
    out = "runs/study"
    defenses = ["sr_self_reminder", "qr_caption_no_image", "ni_image_gaussian", "mo_finetune"]
    ensembles = ["sr_self_reminder+mo_finetune", "qr_caption_no_image|sr_self_reminder"]
    [[datasets]]
    name = "mossbench"
    root = "/data/MOSSBench"
    limit = 50

Every key is checked: an unknown one is one error naming the key, the file and the closest known
key. Flags given on the command line override the file's keys. Relative paths (``out``, dataset
roots and files, ``prompts``) are relative to the current directory, as on the command line.
This module is light (no torch) and computes nothing.
"""

from __future__ import annotations

import difflib
import json
import logging
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from probing.errors import InputError

from .options import IMAGE_ASPECT_RATIOS

logger = logging.getLogger(__name__)

#: Top-level keys of a study file and their defaults.
DEFAULTS = {
    "model": "toy",
    "out": "runs/study",
    "defenses": ["sr_self_reminder", "qr_caption_no_image", "ni_image_gaussian", "mo_finetune"],
    "ensembles": ["sr_self_reminder+mo_finetune", "qr_caption_no_image|sr_self_reminder"],
    "datasets": [{"name": "toy"}],
    "prompt_format": "hf",
    "prompts": None,
    "defense_params": {},
    "device": "cpu",
    "dtype": None,
    "compile": False,
    "image_aspect_ratio": "pad",
    "readout": "first_token",
    "batch_size": 16,
    "keep_hidden": False,
    "n_boot": 1000,
    "seed": 0,
    "weight": 0.5,
    "layer_scores": ["lens"],
    "folds": 5,
    "generation_check": 16,
    "max_new_tokens": 24,
    "title": "Study: how jailbreak defenses work and ensemble",
    "intro": [],
}
#: Keys that change only the analysis or the report, never a score (a run resumes across them).
ANALYSIS_KEYS = ("out", "defenses", "ensembles", "n_boot", "seed", "weight", "layer_scores", "folds",
                 "generation_check", "max_new_tokens", "title", "intro")
#: Dataset kinds and the keys each takes (besides name, tag and limit).
DATASET_KEYS = {
    "toy": ("split",),
    "mossbench": ("root", "splits", "skip_missing"),
    "mmsafetybench": ("root", "images", "kinds", "scenarios", "subset", "own_criteria", "skip_missing"),
    "jsonl": ("path", "skip_missing"),
}
COMMON_DATASET_KEYS = ("name", "tag", "limit")
#: Per-layer scores (`probing.analysis.layer_profile`).
LAYER_SCORES = ("lens", "diffmean", "probe")
PROMPT_KEYS = {"sr": ("system_prompt", "text_before", "text_after"),
               "qr": ("question", "style", "keep_image", "max_new_tokens")}


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


#: `StudyConfig.source` of a study made from command-line flags only (`from_args`, the demo)
FLAG_SOURCES = ("<flags>", "mechprobe demo")


def key_where(source: str, key: str) -> str:
    """How an error names a study key: its flag for a study made from flags, else the file and the
    key (a flag given beside ``--config`` overrides it, so the flag is named too)."""
    flag = "--" + key.replace("_", "-")
    return flag if source in FLAG_SOURCES else f"{source}: {key!r} (or {flag})"


def _check_keys(found, allowed, where: str) -> None:
    for key in found:
        if key not in allowed:
            raise InputError(f"{where}: unknown key {key!r}{did_you_mean(key, allowed)} "
                             f"(known: {', '.join(sorted(allowed))})")


def _list(value, key: str, where: str) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where}: {key!r} must be a list of strings, got {value!r}")
    return [v.strip() for v in value if v.strip()]


@dataclass
class StudyConfig:
    """A resolved study: every key of `DEFAULTS`, datasets checked and paths made absolute."""

    model: str = DEFAULTS["model"]
    out: str = DEFAULTS["out"]
    defenses: list[str] = field(default_factory=lambda: list(DEFAULTS["defenses"]))
    ensembles: list[str] = field(default_factory=lambda: list(DEFAULTS["ensembles"]))
    datasets: list[dict] = field(default_factory=lambda: [dict(d) for d in DEFAULTS["datasets"]])
    prompt_format: str = "hf"
    prompts: str | None = None
    defense_params: dict = field(default_factory=dict)
    device: str = "cpu"
    dtype: str | None = None
    compile: bool = False
    image_aspect_ratio: str = "pad"
    readout: str = "first_token"
    batch_size: int = 16
    keep_hidden: bool = False
    n_boot: int = 1000
    seed: int = 0
    weight: float = 0.5
    layer_scores: list[str] = field(default_factory=lambda: ["lens"])
    folds: int = 5
    generation_check: int = 16
    max_new_tokens: int = 24
    title: str = DEFAULTS["title"]
    intro: list[str] = field(default_factory=list)
    overwrite: bool = False
    source: str = "<flags>"

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("overwrite")
        out.pop("source")
        return out


def read_file(path: str | Path, what: str = "config file (--config)") -> dict:
    """A TOML (or JSON, by suffix) file as a dict; a missing file is named with ``what`` it is, a
    syntax error names the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {exc}") from None


def check_dataset(entry, where: str) -> dict:
    """One ``[[datasets]]`` entry checked (name known, keys known, types plausible), paths absolute."""
    if not isinstance(entry, dict):
        raise InputError(f"{where}: each [[datasets]] entry must be a table, got {entry!r}")
    name = entry.get("name")
    if name not in DATASET_KEYS:
        raise InputError(f"{where}: dataset name {name!r}{did_you_mean(str(name), DATASET_KEYS)} "
                         f"(choose from {', '.join(DATASET_KEYS)})")
    _check_keys(entry, COMMON_DATASET_KEYS + DATASET_KEYS[name], f"{where} [[datasets]] {name!r}")
    out = dict(entry)
    limit = out.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise InputError(f"{where} [[datasets]] {name!r}: 'limit' must be an integer >= 1, got {limit!r}")
    for key in ("skip_missing", "own_criteria"):  # "false" as a string would count as true
        if key in out and not isinstance(out[key], bool):
            raise InputError(f"{where} [[datasets]] {name!r}: {key!r} must be true or false, got {out[key]!r}")
    for key in ("root", "images", "path"):
        if out.get(key) is not None:
            out[key] = str(Path(out[key]).expanduser().resolve())
    need = {"mossbench": "root", "mmsafetybench": "root", "jsonl": "path"}.get(name)
    if need and not out.get(need):
        raise InputError(f"{where} [[datasets]] {name!r}: give {need!r}")
    out.setdefault("tag", name)
    return out


def parse_dataset_flag(spec: str) -> dict:
    """``--dataset`` values: toy | mossbench:<dir> | mmsafetybench:<dir> | jsonl:<file>."""
    kind, _, arg = spec.partition(":")
    if kind == "toy":
        return {"name": "toy"}
    if kind in ("mossbench", "mmsafetybench") and arg:
        entry = {"name": kind, "root": arg, "skip_missing": True}
        if kind == "mmsafetybench":
            entry["subset"] = "tiny"
        return entry
    if kind == "jsonl" and arg:
        return {"name": "jsonl", "path": arg}
    raise InputError(f"--dataset {spec!r}: use toy, mossbench:<dir>, mmsafetybench:<dir> or jsonl:<file>")


def parse_dataset_flags(specs: list[str]) -> list[dict]:
    """Several ``--dataset`` values (`parse_dataset_flag` each). Flags cannot give a 'tag', so
    datasets of one kind are told apart by their file or folder name (``jsonl-a``, ``jsonl-b``)."""
    entries = [parse_dataset_flag(s) for s in specs]
    names = [e["name"] for e in entries]
    for e in entries:
        where = e.get("root") or e.get("path")
        if names.count(e["name"]) > 1 and where:
            e["tag"] = f"{e['name']}-{Path(where).stem}"
    return entries


def build(raw: dict, source: str = "<flags>", overwrite: bool = False) -> StudyConfig:
    """A `StudyConfig` from a dict of top-level keys (a parsed file merged with flags)."""
    _check_keys(raw, DEFAULTS, source)
    values = {**{k: v for k, v in DEFAULTS.items()}, **raw}
    for key in ("defenses", "ensembles", "layer_scores"):
        values[key] = _list(values[key], key, source)
    if "ensembles" not in raw and "defenses" in raw:
        # The default ensembles are for the default defenses: with defenses of one's own, keep those
        # whose members are all among them (as `demo` does), rather than score (and fine-tune for)
        # defenses that were not asked for.
        from defenses.registry import split_expression

        chosen = set(values["defenses"])
        dropped = [e for e in values["ensembles"] if not set(split_expression(e)) <= chosen]
        if dropped:
            logger.info("%s: default ensembles %s left out: their members are not all among 'defenses'", source,
                        dropped)
        values["ensembles"] = [e for e in values["ensembles"] if e not in dropped]
    if isinstance(values["intro"], str):
        values["intro"] = [values["intro"]]
    datasets = values["datasets"]
    if isinstance(datasets, dict):
        datasets = [datasets]
    if not isinstance(datasets, list) or not datasets:
        raise InputError(f"{source}: 'datasets' must be a non-empty list of [[datasets]] tables")
    values["datasets"] = [check_dataset(d, source) for d in datasets]
    tags = [d["tag"] for d in values["datasets"]]
    dup = sorted({t for t in tags if tags.count(t) > 1})
    if dup:
        raise InputError(f"{source}: several datasets are tagged {dup}; give each a distinct 'tag'")
    if values["prompt_format"] not in ("hf", "llava_v1"):
        raise InputError(f"{source}: prompt_format must be 'hf' or 'llava_v1', got {values['prompt_format']!r}")
    if values["image_aspect_ratio"] not in IMAGE_ASPECT_RATIOS:
        raise InputError(f"{source}: image_aspect_ratio must be 'pad' or 'crop', got {values['image_aspect_ratio']!r}")
    if values["prompts"] is not None:
        values["prompts"] = str(Path(values["prompts"]).expanduser().resolve())
    if not isinstance(values["defense_params"], dict) or not all(isinstance(v, dict)
                                                                 for v in values["defense_params"].values()):
        raise InputError(f"{source}: 'defense_params' must be a table of tables: [defense_params.<name>]")
    for key in ("compile", "keep_hidden"):
        if not isinstance(values[key], bool):
            raise InputError(f"{source}: {key!r} must be true or false, got {values[key]!r}")
    for key in ("batch_size", "n_boot", "seed", "folds", "generation_check", "max_new_tokens"):
        if not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] < 0:
            raise InputError(f"{source}: {key!r} must be a non-negative integer, got {values[key]!r}")
    for key in ("batch_size", "n_boot"):  # no shards; no intervals (every label would be "neither")
        if values[key] < 1:
            raise InputError(f"{source}: {key!r} must be >= 1, got {values[key]}")
    if values["generation_check"] and values["max_new_tokens"] < 1:
        raise InputError(f"{source}: 'max_new_tokens' must be >= 1 while 'generation_check' is on "
                         f"(got {values['max_new_tokens']}; generation_check = 0 turns the check off)")
    weight = values["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
        raise InputError(f"{source}: 'weight' (of safety against helpfulness) must be a number in [0, 1], "
                         f"got {weight!r}")
    values["weight"] = float(weight)
    for score in values["layer_scores"]:
        if score not in LAYER_SCORES:
            raise InputError(f"{source}: 'layer_scores': unknown score {score!r}{did_you_mean(score, LAYER_SCORES)} "
                             f"(choose from {', '.join(LAYER_SCORES)})")
    if values["folds"] < 2 and any(s != "lens" for s in values["layer_scores"]):
        raise InputError(f"{source}: 'folds' must be >= 2 for the diffmean / probe layer scores (cross-fitted), "
                         f"got {values['folds']}")
    values["model"] = str(values["model"])
    values["out"] = str(values["out"])
    return StudyConfig(**values, overwrite=overwrite, source=source)


# Flags of `mechprobe study` -> config keys (flags left at None keep the file's value).
FLAG_KEYS = ("model", "out", "defenses", "ensembles", "prompt_format", "prompts", "device", "dtype", "compile",
             "image_aspect_ratio", "readout", "batch_size", "n_boot", "seed", "weight", "generation_check", "max_new_tokens")


def from_args(args) -> StudyConfig:
    """The config file (``--config``), overridden by every flag given."""
    raw = read_file(args.config) if getattr(args, "config", None) else {}
    source = str(args.config) if getattr(args, "config", None) else "<flags>"
    for key in FLAG_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            raw[key] = value
    if getattr(args, "dataset", None):
        raw["datasets"] = parse_dataset_flags(args.dataset)
    if getattr(args, "limit", None) is not None:
        if "datasets" not in raw:
            raw["datasets"] = [dict(d) for d in DEFAULTS["datasets"]]
        raw["datasets"] = [{**d, "limit": args.limit} for d in raw["datasets"]]
    return build(raw, source, overwrite=bool(getattr(args, "overwrite", False)))


def read_prompts(path: str | Path) -> dict[str, dict]:
    """A prompt file: ``name -> {system_prompt, text_before, text_after}`` (SR style) or
    ``name -> {question, style, keep_image, max_new_tokens}`` (QR style; style "caption" or
    "intention"). Checked key by key; returns ``name -> {"kind": "sr"|"qr", **fields}``."""
    raw = read_file(path, "prompt file (--prompts, or the config's 'prompts')")
    out = {}
    for name, entry in raw.items():
        where = f"{path}: [{name}]"
        if not isinstance(entry, dict):
            raise InputError(f"{where} must be a table of wordings")
        kind = "qr" if "question" in entry else "sr"
        _check_keys(entry, PROMPT_KEYS[kind], where)
        for key, value in entry.items():
            if key in ("keep_image",):
                if not isinstance(value, bool):
                    raise InputError(f"{where}: {key!r} must be true or false")
            elif key == "max_new_tokens":
                if not isinstance(value, int) or value < 1:
                    raise InputError(f"{where}: 'max_new_tokens' must be an integer >= 1")
            elif not isinstance(value, str):
                raise InputError(f"{where}: {key!r} must be a string, got {value!r}")
        if kind == "sr" and not any(entry.get(k) for k in PROMPT_KEYS["sr"]):
            raise InputError(f"{where}: give system_prompt, text_before and/or text_after (or a QR 'question')")
        if kind == "qr" and entry.get("style", "caption") not in ("caption", "intention"):
            raise InputError(f"{where}: style must be 'caption' or 'intention', got {entry['style']!r}")
        if kind == "qr" and entry.get("style") == "intention" and "{text}" not in entry["question"]:
            raise InputError(f"{where}: an intention question must contain {{text}} (where the request goes)")
        out[name] = {"kind": kind, **entry}
    return out

"""`mechprobe study` end to end on tiny-random (the real processor) over the shared MOSSBench and
MM-SafetyBench copies; its config checks, the llava_v1 prompt format, prompt files, the saved
fine-tune and ScoreTable.to_pandas."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.cli import main
from probing import Query, ScoreTable
from probing.analysis import refusal_rate
from probing.errors import InputError
from probing.plan import combine_tables

from .synthetic import lm_tokens

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_MOSS = SHARED / "mossbench"
SHARED_MMSB = SHARED / "mm-safetybench"


def _needs_shared():
    if not (SHARED_MOSS / "data").is_dir() or not (SHARED_MMSB / "data").is_dir():
        pytest.skip(f"needs the shared benchmark copies in {SHARED}")


def write_config(path: Path, out: Path, **extra) -> Path:
    lines = [f'model = "tiny-random"', f'out = "{out}"',
             'defenses = ["sr_self_reminder", "qr_caption_no_image"]',
             'ensembles = ["sr_self_reminder+qr_caption_no_image", "qr_caption_no_image|sr_self_reminder"]',
             "n_boot = 50", "generation_check = 4", "max_new_tokens = 4", "batch_size = 6"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    lines += ["[[datasets]]", 'name = "mmsafetybench"', f'root = "{SHARED_MMSB}"', 'kinds = ["SD_TYPO"]',
              'subset = "tiny"', "skip_missing = true", "limit = 6",
              "[[datasets]]", 'name = "mossbench"', f'root = "{SHARED_MOSS}"', "skip_missing = true", "limit = 6"]
    path.write_text("\n".join(lines) + "\n")
    return path


def rates(table: ScoreTable) -> tuple[float, float]:
    p = table.p_refuse.numpy()
    lab = np.array(table.labels)
    return float(refusal_rate(p[lab == "harmful"])), float(refusal_rate(p[lab == "benign"]))


def test_study_end_to_end_on_the_shared_benchmarks(llava_assets, tmp_path, monkeypatch, capsys):
    _needs_shared()
    out = tmp_path / "study"
    cfg = write_config(tmp_path / "study.toml", out)
    assert main(["study", "--config", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert "Per defense and ensemble" in printed and "random weights" in printed

    conditions = ["baseline", "sr_self_reminder", "qr_caption_no_image", "sr_self_reminder+qr_caption_no_image",
                  "qr_caption_no_image|sr_self_reminder"]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["condition"] for r in summary] == conditions
    tables = {c: ScoreTable.load(out / "scores" / c.replace("|", "_or_")) for c in conditions}

    # the combined benchmark: 6 + 6 queries, unique ids that say where they came from, row_meta
    base = tables["baseline"]
    assert len(base) == 12 and len(set(base.ids)) == 12
    assert all(i.startswith(("mmsb-", "moss-")) for i in base.ids)
    assert {m["dataset"] for m in base.row_meta} == {"mossbench", "mmsafetybench"}
    assert all(m["kind"] == "SD_TYPO" and m["scenario"] for m in base.row_meta if m["dataset"] == "mmsafetybench")
    datasets = {r["dataset"]: r for r in json.loads((out / "tables" / "datasets.json").read_text())}
    assert (datasets["mossbench"]["harmful"], datasets["mossbench"]["benign"]) == (3, 3)  # stratified limit
    assert (datasets["mmsafetybench"]["harmful"], datasets["mmsafetybench"]["used"]) == (6, 6)

    # the report's tables equal what the saved ScoreTables give
    for row in summary:
        h, b = rates(tables[row["condition"]])
        assert row["refusal_harmful"] == pytest.approx(h) and row["refusal_benign"] == pytest.approx(b)
        assert row["refusal_harmful_lo"] <= row["refusal_harmful"] <= row["refusal_harmful_hi"]
    rows = {r["condition"]: r for r in json.loads((out / "tables" / "conditions.json").read_text())}
    assert {r["condition"]: r["label"] for r in summary if r["kind"] != "baseline"} == \
        {c: rows[c]["label"] for c in conditions[1:]}

    # a|b is the combination of its members' finished tables, never scored again; a+b was scored
    either = combine_tables([tables["qr_caption_no_image"], tables["sr_self_reminder"]], "max")
    assert torch.allclose(tables["qr_caption_no_image|sr_self_reminder"].margin, either.margin)
    assert torch.allclose(tables["qr_caption_no_image|sr_self_reminder"].lens_margin, either.lens_margin)
    assert not (out / "shards" / "qr_caption_no_image_or_sr_self_reminder").exists()
    assert (out / "shards" / "sr_self_reminder+qr_caption_no_image").is_dir()
    assert list((out / "generations").glob("qr_caption_no_image@*.json"))  # captions kept for reuse

    # the trade-off: measured and predicted points told apart; the measured a|b equals its prediction
    trade = json.loads((out / "tables" / "tradeoff.json").read_text())
    pred = next(r for r in trade if r["kind"] == "|" and r["predicted"])
    assert pred["measured_run"] == "qr_caption_no_image|sr_self_reminder"
    assert pred["measured_safety"] == pytest.approx(pred["safety"]) and pred["margin_rmse"] < 1e-4

    # per query: one row per query and condition, from row_meta
    import pandas as pd

    per_query = pd.read_csv(out / "tables" / "per_query.csv")
    assert list(per_query.columns) == ["id", "dataset", "kind", "scenario", "label", "text", "condition", "margin",
                                       "p_refuse"]
    assert len(per_query) == 12 * len(conditions)
    sr = per_query[per_query.condition == "sr_self_reminder"]
    assert np.allclose(sr.margin.to_numpy(), tables["sr_self_reminder"].margin.numpy(), atol=1e-6)

    # per layer and the generation cross-check
    layers = json.loads((out / "tables" / "layers.json").read_text())
    assert {r["defense"] for r in layers} == set(conditions[1:]) and {r["layer"] for r in layers} == {0, 1, 2, 3}
    gen = json.loads((out / "tables" / "generation_check_summary.json").read_text())[0]
    assert gen["n"] == 4 and 0 <= gen["agreement"] <= 1

    # one report, markdown and self-contained HTML, saying which prompt format ran
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "prompt format: `hf`" in md and "qr_caption_no_image\\|sr_self_reminder" in md
    for png in ("distributions.png", "mechanism_map.png", "tradeoff.png", "layers.png"):
        assert f"({png})" in md and (out / png).stat().st_size > 10_000
    assert html.count("data:image/png;base64,") == 4 and 'src="distributions.png"' not in html

    # a second run resumes: nothing is scored or generated again, the tables are the same
    from probing import generation as generation_mod
    from probing import scorer as scorer_mod

    monkeypatch.setattr(scorer_mod.RefusalScorer, "score", lambda *a, **k: pytest.fail("scored again"))
    monkeypatch.setattr(generation_mod, "generate", lambda *a, **k: pytest.fail("generated again"))
    assert main(["study", "--config", str(cfg)]) == 0
    assert json.loads((out / "summary.json").read_text()) == summary


def test_unknown_keys_are_one_error_naming_key_and_file(tmp_path, capsys):
    cfg = tmp_path / "s.toml"
    cfg.write_text('model = "toy"\ndefences = ["sr_self_reminder"]\n')
    assert main(["study", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'defences'" in err and "did you mean 'defenses'" in err and str(cfg) in err
    cfg.write_text('[[datasets]]\nname = "mossbench"\nroot = "x"\nskip_mising = true\n')
    assert main(["study", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "'skip_mising'" in err and "did you mean 'skip_missing'" in err and "s.toml" in err
    cfg.write_text('[[datasets]]\nname = "mossbenc"\n')
    assert main(["study", "--config", str(cfg)]) == 2
    assert "did you mean 'mossbench'" in capsys.readouterr().err
    cfg.write_text('defenses = ["sr_self_remindr"]\n')
    assert main(["study", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "did you mean 'sr_self_reminder'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # checked before any run directory or model


TOY_STUDY = ['model = "toy"', 'defenses = ["sr_self_reminder", "qr_caption_no_image"]', "ensembles = []",
             "n_boot = 20", "generation_check = 0"]


@pytest.mark.parametrize("lines,names", [
    (["weight = -1.0"], ["'weight'", "[0, 1]"]),
    (['layer_scores = ["lens", "difmean"]'], ["'layer_scores'", "did you mean 'diffmean'"]),
    (['layer_scores = ["lens", "diffmean"]', "folds = 1"], ["'folds'", ">= 2"]),
    (['layer_scores = ["probe"]', "folds = 6"], ["'folds' = 6", "only 2 request group(s) hold harmful"]),
    # 4 harmful queries, but 2 requests (steal cars x3, rob banks): folds deal whole requests
    (['layer_scores = ["diffmean"]', "folds = 3"], ["'folds' = 3", "only 2 request group(s) hold harmful"]),
    (["n_boot = 0"], ["'n_boot'", ">= 1"]),
    (["generation_check = 4", "max_new_tokens = 0"], ["'max_new_tokens'", "generation_check"]),
    (["[defense_params.qr_caption]", "max_new_tokens = 1"],
     ["[defense_params.qr_caption]", "did you mean 'qr_caption_no_image'"]),
    (['[defense_params."qr_caption_no_image+sr_self_reminder"]', "max_new_tokens = 1"],
     ['[defense_params."qr_caption_no_image+sr_self_reminder"]', "ensemble expression"]),
    (['defenses = ["sr_self_reminder", "mo_finetune"]', "[defense_params.mo_finetune]", "steps = 0"],
     ["[defense_params.mo_finetune]", "'steps'"]),
], ids=["weight", "layer_scores", "folds", "folds_above_class", "folds_above_groups", "n_boot", "max_new_tokens", "unused_params",
        "ensemble_params", "bad_param_value"])
def test_bad_study_options_are_one_error_before_any_compute(tmp_path, capsys, lines, names):
    """Options that would fail only after every condition is scored, or change results silently
    (no intervals, parameters never used), are one error naming the key and the file, before
    any run directory or model."""
    out, cfg = tmp_path / "o", tmp_path / "s.toml"
    split = next((i for i, line in enumerate(lines) if line.startswith("[")), len(lines))
    top, tables = lines[:split], lines[split:]  # top-level keys (replacing TOY_STUDY's), then tables
    keys = {line.split("=")[0].strip() for line in top}
    head = [line for line in TOY_STUDY if line.split("=")[0].strip() not in keys] + top
    cfg.write_text("\n".join([f'out = "{out}"', *head, "[[datasets]]", 'name = "toy"', "limit = 8", *tables]) + "\n")
    assert main(["study", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(cfg) in err, err
    for name in names:
        assert name in err, err
    assert not out.exists()  # before any run directory or model


def test_study_limit_must_be_at_least_one(capsys):
    from experiments.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["study", "--limit", "0"])
    assert e.value.code == 2 and "--limit" in capsys.readouterr().err


def test_stratified_limit_and_spread_sample():
    from experiments.study import spread_sample, stratified_head

    qs = [Query(f"h{i}", "x", label="harmful") for i in range(6)] + [Query(f"b{i}", "x", label="benign")
                                                                     for i in range(3)]
    assert [q.id for q in stratified_head(qs, 3)] == ["h0", "h1", "b0"]
    assert [q.id for q in stratified_head(qs, 6)] == ["h0", "h1", "h2", "h3", "b0", "b1"]
    only_h = qs[:6]
    assert [q.id for q in stratified_head(only_h, 2)] == ["h0", "h1"]
    sample = spread_sample(qs, 4)
    assert sum(q.label == "harmful" for q in sample) == 2 and len(sample) == 4


def test_llava_v1_prompt_format(processor):
    from probing import render_prompt
    from probing.render import LLAVA_V1_SYSTEM, PromptSpec, format_spec

    q = Query("a", "How do I bake bread?")
    v1 = format_spec("llava_v1")
    assert render_prompt(processor, q, v1) == f"{LLAVA_V1_SYSTEM} USER: How do I bake bread? ASSISTANT:"
    assert render_prompt(processor, q, format_spec("hf")) == "USER: How do I bake bread? ASSISTANT:"
    # a defense's system prompt replaces the default; text around the request is kept
    defended = v1.merged(PromptSpec(system_prompt="Be safe.", text_after="Think first."))
    assert render_prompt(processor, q, defended) == "Be safe. USER: How do I bake bread?\nThink first. ASSISTANT:"
    assert render_prompt(processor, q, v1.merged(PromptSpec(text_after="Think first."))).startswith(LLAVA_V1_SYSTEM)
    with pytest.raises(InputError, match="prompt format"):
        format_spec("vicuna")


def test_prompt_file_registers_published_wordings(tmp_path):
    from defenses import get_defense
    from experiments.study import register_prompts

    f = tmp_path / "wordings.toml"
    f.write_text('[sr_paper_reminder]\nsystem_prompt = "S."\ntext_after = "Remember: be safe."\n'
                 '[qr_paper_caption]\nquestion = "Describe the image."\nkeep_image = false\n')
    assert set(register_prompts(f)) == {"sr_paper_reminder", "qr_paper_caption"}
    register_prompts(f)  # the same wordings again: fine
    sr = get_defense("sr_paper_reminder")
    assert sr.spec.system_prompt == "S." and sr.spec.text_after == "Remember: be safe." and sr.category == "SR"
    qr = get_defense("qr_paper_caption")
    assert qr.question == "Describe the image." and not qr.keep_image and qr.category == "QR"
    assert get_defense("sr_paper_reminder|qr_paper_caption").name == "sr_paper_reminder|qr_paper_caption"
    f.write_text('[sr_self_reminder]\ntext_after = "x"\n')
    with pytest.raises(InputError, match="already a defense name"):
        register_prompts(f)
    f.write_text('[sr_x]\ntext_aftr = "x"\n')
    with pytest.raises(InputError, match="did you mean 'text_after'"):
        register_prompts(f)


def test_finetuned_model_is_trained_once_and_saved(llava_assets, tmp_path, monkeypatch):
    from defenses.finetune import FineTune

    out = tmp_path / "mo"
    cfg = tmp_path / "mo.toml"
    cfg.write_text(f'model = "tiny-random"\nout = "{out}"\ndefenses = ["mo_finetune", "act_steer"]\n'
                   'ensembles = ["sr_self_reminder+mo_finetune"]\nn_boot = 20\ngeneration_check = 0\n'
                   'batch_size = 8\nlayer_scores = []\nprompt_format = "llava_v1"\n'
                   '[defense_params.mo_finetune]\nsteps = 2\nbatch_size = 2\nlr = 0.05\n'
                   '[[datasets]]\nname = "toy"\nlimit = 8\n')
    from experiments import study as study_mod

    real, calls = FineTune._tune, []
    monkeypatch.setattr(FineTune, "_tune", lambda self, bundle: calls.append(1) or real(self, bundle))
    monkeypatch.setattr(study_mod, "OWN_MODEL_REVISION", 1)  # the first run stands for an older one
    assert main(["study", "--config", str(cfg)]) == 0
    assert len(calls) == 1  # one training for mo_finetune and sr_self_reminder+mo_finetune
    assert (out / "models" / "mo_finetune" / "adapters.safetensors").is_file()  # LoRA: the adapters alone
    first = ScoreTable.load(out / "scores" / "sr_self_reminder+mo_finetune")
    steered = ScoreTable.load(out / "scores" / "act_steer")
    assert "prompt format: `llava_v1`" in (out / "report.md").read_text()
    assert "- images: padded to a square" in (out / "report.md").read_text()
    import shutil

    def records(condition):
        return [json.loads(f.read_text()) for f in sorted((out / "shards" / condition).glob("*/shard.json"))]

    assert {r["condition_fingerprint"].get("own_model") for r in records("act_steer")} == {1}
    assert {r["condition_fingerprint"].get("own_model") for r in records("mo_finetune")} == {None}
    tuned_shards = records("mo_finetune")
    shutil.rmtree(out / "shards" / "sr_self_reminder+mo_finetune")
    monkeypatch.setattr(study_mod, "OWN_MODEL_REVISION", 2)
    assert main(["study", "--config", str(cfg)]) == 0
    assert len(calls) == 1  # the resumed run loaded the saved model
    assert torch.equal(ScoreTable.load(out / "scores" / "sr_self_reminder+mo_finetune").margin, first.margin)
    # act_steer runs on the study's own model after mo_finetune: scored again where no tuning ran
    # in the process, it is the same (saving the tuned model once merged its adapters into the
    # weights it shares with the study's model, so the fresh run scored act_steer on tuned weights)
    torch.testing.assert_close(ScoreTable.load(out / "scores" / "act_steer").margin, steered.margin,
                               atol=1e-5, rtol=0)
    # ... and it was scored again because its shards came from an older revision (which tuned the
    # study's model in place); the tuned model's own shards were kept
    assert {r["condition_fingerprint"].get("own_model") for r in records("act_steer")} == {2}
    assert records("mo_finetune") == tuned_shards


def toy_study(out, **keys) -> dict:
    """A small study on the toy (8 queries, no generation check), run in this process."""
    from experiments import study, study_config
    from experiments.runs import close_all

    raw = {"model": "toy", "out": str(out), "defenses": ["sr_self_reminder"], "ensembles": [], "n_boot": 20,
           "generation_check": 0, "datasets": [{"name": "toy", "limit": 8}], **keys}
    try:
        return study.run_config(study_config.build(raw, "test"))
    finally:  # as the CLI does: the run directory's lock is released
        close_all()


def shard_records(out) -> dict[str, str]:
    """Every shard record of a run directory by path (what was stored, and when it changes)."""
    return {str(f.relative_to(out)): f.read_text() for f in sorted(Path(out).glob("shards/*/*/shard.json"))}


#: summary.csv's columns before the label's figures were added: kept, in this order, for old readers
OLD_SUMMARY_COLUMNS = [
    "condition", "kind", "n", "n_harmful", "n_benign", *(f"{k}{s}" for k in (
        "refusal_harmful", "refusal_benign", "mean_shift", "distance_change", "auroc", "auroc_change", "dprime",
        "dprime_change") for s in ("", "_lo", "_hi")), "label"]


def _label_from(dh, db, diff, min_effect=0.1):
    """docs/analysis.md's table, from (value, lo, hi) of the three figures."""
    def way(v, lo, hi):
        return 1 if lo > 0 and v >= min_effect else -1 if hi < 0 and v <= -min_effect else 0
    h, b, d = way(*dh), way(*db), way(*diff)
    if h < 0:
        return "weakening"
    if d:
        return ("both" if b > 0 else "harmfulness discrimination") if d > 0 else "over-refusal"
    return "safety shift" if h > 0 and b > 0 else "neither" if h == 0 and b == 0 else "unresolved"


def test_the_report_shows_the_figures_the_label_reads(tmp_path):
    """The report's main table puts the label beside the three figures it reads (harmful and
    benign margin change and their difference, in baseline SDs, with intervals), and says so
    above the table; the label follows from those columns by docs/analysis.md's rule; the values
    equal a numpy recomputation from the score tables; summary.csv keeps its old columns, in
    order, and adds them."""
    import csv

    out = tmp_path / "run"
    toy_study(out, defenses=["sr_self_reminder", "ni_text_smooth", "act_ablate"],
              datasets=[{"name": "toy", "limit": 24}])
    with (out / "summary.csv").open() as f:
        header = next(csv.reader(f))
    assert header[:len(OLD_SUMMARY_COLUMNS)] == OLD_SUMMARY_COLUMNS
    summary = {r["condition"]: r for r in json.loads((out / "summary.json").read_text())}
    base = ScoreTable.load(out / "scores" / "baseline")
    is_h = np.array(base.labels) == "harmful"
    m0 = base.margin.double().numpy()
    sd = np.sqrt((m0[is_h].var(ddof=1) + m0[~is_h].var(ddof=1)) / 2)
    report = (out / "report.md").read_text()
    head = next(line for line in report.splitlines() if line.startswith("| condition | kind | label"))
    assert head.startswith("| condition | kind | label | harmful change (SD) | benign change (SD) | "
                           "harmful - benign (SD) | refusal harmful |")
    assert "reads the three columns beside it" in report
    for name in ("sr_self_reminder", "ni_text_smooth", "act_ablate"):
        r = summary[name]
        d = ScoreTable.load(out / "scores" / name).select(base.ids).margin.double().numpy() - m0
        dh, db = d[is_h].mean() / sd, d[~is_h].mean() / sd
        assert r["harmful_change_sd"] == pytest.approx(dh, rel=1e-5)
        assert r["benign_change_sd"] == pytest.approx(db, rel=1e-5)
        assert r["differential_sd"] == pytest.approx(dh - db, rel=1e-5, abs=1e-9)
        assert r["shift_sd"] == pytest.approx((dh + db) / 2, rel=1e-5, abs=1e-9)
        fig = {k: (r[k], r[f"{k}_lo"], r[f"{k}_hi"]) for k in ("harmful_change_sd", "benign_change_sd",
                                                              "differential_sd")}
        assert r["label"] == _label_from(*fig.values()), name
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3:6] == [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in fig.values()]
    assert all(summary["baseline"][k] is None for k in ("harmful_change_sd", "differential_sd", "shift_sd"))


def test_the_mechanism_map_plots_the_label_figures(tmp_path, monkeypatch):
    """The map's point of a condition is (shift_sd, differential_sd): the figures the label reads,
    not the probability-scale mean shift and distance change."""
    from matplotlib.axes import Axes

    from experiments.plots import plot_mechanism_map

    drawn = []
    real = Axes.errorbar
    monkeypatch.setattr(Axes, "errorbar", lambda self, x, y, *a, **k: drawn.append((x, y)) or real(self, x, y, *a, **k))
    row = {"condition": "d", "kind": "single", "label": "over-refusal", "mean_shift": 0.04, "mean_shift_lo": -0.03,
           "mean_shift_hi": 0.1, "distance_change": -0.06, "distance_change_lo": -0.19, "distance_change_hi": 0.05,
           "shift_sd": 0.15, "shift_sd_lo": 0.0, "shift_sd_hi": 0.4, "differential_sd": -0.42,
           "differential_sd_lo": -0.83, "differential_sd_hi": -0.09}
    plot_mechanism_map([{"condition": "baseline", "kind": "baseline", "label": "baseline"}, row],
                       tmp_path / "map.png")
    assert drawn == [(0.15, -0.42)] and (tmp_path / "map.png").is_file()


def test_a_checkpoint_retrained_under_the_same_path_is_scored_again(tmp_path):
    """mo_checkpoint's shards are tied to the checkpoint's config and weights, not only its path:
    retrained in place, a resumed study scores it again and equals a fresh run on the new weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    from probing.toy import WEIGHTS_DIR

    ckpt = tmp_path / "ckpt"
    shutil.copytree(WEIGHTS_DIR, ckpt)
    keys = {"defenses": ["mo_checkpoint"], "defense_params": {"mo_checkpoint": {"path": str(ckpt)}}}
    first = toy_study(tmp_path / "run", **keys)["tables"]["mo_checkpoint"]
    weights = load_file(ckpt / "model.safetensors")  # "retrained": one layer's weights moved
    gen = torch.Generator().manual_seed(0)
    weights = {k: w + 0.2 * torch.randn(w.shape, generator=gen) if "layers.1." in k and w.is_floating_point() else w
               for k, w in weights.items()}
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    resumed = toy_study(tmp_path / "run", **keys)["tables"]["mo_checkpoint"]
    fresh = toy_study(tmp_path / "fresh", **keys)["tables"]["mo_checkpoint"]
    assert not torch.allclose(fresh.margin, first.margin, atol=1e-3)
    torch.testing.assert_close(resumed.margin, fresh.margin, atol=1e-6, rtol=0)


def test_a_resume_that_adds_diffmean_profiles_every_condition_as_a_fresh_run(tmp_path):
    """diffmean / probe profiles need every scored condition's hidden states: a study resumed
    with diffmean added scores again the conditions whose shards have none, and its layers table
    is a fresh run's."""
    keys = {"defenses": ["sr_self_reminder", "ni_text_smooth"], "ensembles": ["sr_self_reminder|ni_text_smooth"],
            "folds": 2}
    toy_study(tmp_path / "run", **keys)
    resumed = toy_study(tmp_path / "run", layer_scores=["lens", "diffmean"], **keys)["layers"]
    fresh = toy_study(tmp_path / "fresh", layer_scores=["lens", "diffmean"], **keys)["layers"]
    assert {(r["defense"], r["score"]) for r in fresh} >= {("sr_self_reminder", "diffmean"),
                                                            ("ni_text_smooth", "diffmean")}
    assert [(r["defense"], r["score"], r["layer"]) for r in resumed] == \
        [(r["defense"], r["score"], r["layer"]) for r in fresh]
    for a, b in zip(resumed, fresh):
        assert a == pytest.approx(b, abs=1e-6, nan_ok=True)


def test_adding_mo_finetune_to_a_finished_study_scores_only_the_new_conditions(tmp_path, monkeypatch):
    """Conditions on the study's own model record its revision whether or not the study tunes a
    copy: adding mo_finetune (and an ensemble with it) keeps every other shard and the generation
    check's answers, and the tables equal a fresh run's."""
    from probing import generation as generation_mod

    keys = {"generation_check": 4, "max_new_tokens": 4}
    toy_study(tmp_path / "run", **keys)
    before = shard_records(tmp_path / "run")
    more = {"defenses": ["sr_self_reminder", "mo_finetune"], "ensembles": ["sr_self_reminder+mo_finetune"],
            "defense_params": {"mo_finetune": {"steps": 2, "batch_size": 4}}, **keys}
    fresh = toy_study(tmp_path / "fresh", **more)
    monkeypatch.setattr(generation_mod, "generate", lambda *a, **k: pytest.fail("the generation check ran again"))
    resumed = toy_study(tmp_path / "run", **more)
    after = shard_records(tmp_path / "run")
    assert {k: after[k] for k in before} == before  # baseline and sr_self_reminder: kept
    assert {k.split("/")[1] for k in set(after) - set(before)} == {"mo_finetune", "sr_self_reminder+mo_finetune"}
    assert [r["condition"] for r in resumed["summary"]] == [r["condition"] for r in fresh["summary"]]
    for a, b in zip(resumed["summary"], fresh["summary"]):
        assert a == pytest.approx(b, abs=1e-6, nan_ok=True)
    assert resumed["generation"]["rows"] == fresh["generation"]["rows"]


def test_an_unreadable_generation_check_cache_is_answered_again(tmp_path, caplog):
    """generations/baseline_check.json is written whole or not at all; a damaged one (truncated)
    is a warning naming it, and the check is answered again, as in the first run."""
    keys = {"generation_check": 4, "max_new_tokens": 4}
    first = toy_study(tmp_path / "run", **keys)["generation"]
    cache = tmp_path / "run" / "generations" / "baseline_check.json"
    cache.write_text(cache.read_text()[:50])
    with caplog.at_level("WARNING"):
        again = toy_study(tmp_path / "run", **keys)["generation"]
    assert any(str(cache) in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    assert again["rows"] == first["rows"]
    assert set(json.loads(cache.read_text())) == {"key", "texts"}
    assert not list(cache.parent.glob("*.tmp"))


def test_a_resume_with_other_options_leaves_no_stale_outputs(tmp_path):
    """Tables and figures an earlier run wrote under other options (its generation check, a
    layer score it dropped) are removed: the resumed run directory holds a fresh run's outputs,
    and the user's own files."""
    first = {"generation_check": 4, "max_new_tokens": 4, "layer_scores": ["lens", "diffmean"], "folds": 2}
    toy_study(tmp_path / "run", **first)
    assert (tmp_path / "run" / "layers_diffmean.png").is_file()
    assert (tmp_path / "run" / "tables" / "generation_check.csv").is_file()
    (tmp_path / "run" / "tables" / "notes.txt").write_text("mine")
    (tmp_path / "run" / "mine.png").write_bytes(b"mine")
    toy_study(tmp_path / "run")
    toy_study(tmp_path / "fresh")

    def outputs(out):
        return {str(p.relative_to(out)) for p in [*out.glob("*.*"), *out.glob("tables/*")] if p.is_file()}

    assert outputs(tmp_path / "run") == outputs(tmp_path / "fresh") | {"tables/notes.txt", "mine.png"}
    assert (tmp_path / "run" / "tables" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "run" / "mine.png").read_bytes() == b"mine"


def test_a_compiled_run_and_an_eager_one_do_not_share_a_run_directory(tmp_path, monkeypatch):
    """Compiled margins agree with eager ones to ~1e-6, not bit for bit: a run made with
    ``compile`` does not resume without it, nor an eager one with it (refused before the model
    is loaded, naming the key)."""
    from experiments import study as study_mod
    from probing.errors import RunDirError

    real = study_mod.load_model
    monkeypatch.setattr(study_mod, "load_model", lambda *a, compile=False, **k: real(*a, **k))  # not compiled here
    toy_study(tmp_path / "compiled", compile=True)
    toy_study(tmp_path / "eager")
    monkeypatch.setattr(study_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(RunDirError, match="compile"):
        toy_study(tmp_path / "compiled")
    with pytest.raises(RunDirError, match="compile"):
        toy_study(tmp_path / "eager", compile=True)


def test_score_table_to_pandas():
    t = ScoreTable(["a", "b"], ["harmful", "benign"], torch.tensor([1.0, -1.0]), torch.zeros(2, 1), [0],
                   meta={"condition": "x"}, row_meta=[{"text": "t1", "dataset": "d", "kind": "k", "scenario": "s",
                                                      "has_image": False}, {"text": "t2"}])
    df = t.to_pandas()
    assert list(df.columns[:9]) == ["id", "dataset", "kind", "scenario", "label", "text", "condition", "margin",
                                    "p_refuse"]
    assert df.condition.tolist() == ["x", "x"] and df.p_refuse.iloc[0] == pytest.approx(1 / (1 + np.exp(-1)))
    assert df.dataset.isna().tolist() == [False, True] and not df.has_image.iloc[0]


def test_example_configs_parse():
    from experiments import study_config

    examples = Path(__file__).resolve().parents[1] / "examples"
    for name in ("study.toml", "study_cpu.toml"):
        cfg = study_config.build(study_config.read_file(examples / name), name)
        assert cfg.defenses and cfg.ensembles and len(cfg.datasets) == 2
    gpu = study_config.build(study_config.read_file(examples / "study.toml"), "study.toml")
    assert gpu.model == "llava-hf/llava-1.5-7b-hf" and gpu.prompt_format == "llava_v1"
    assert gpu.defense_params["mo_finetune"]["lora"] is True
    wordings = study_config.read_prompts(examples / "prompts.toml")
    assert {w["kind"] for w in wordings.values()} == {"sr", "qr"}


def test_flags_override_the_config_file(tmp_path):
    from experiments.cli import build_parser
    from experiments import study_config

    cfg = tmp_path / "s.toml"
    cfg.write_text('model = "toy"\nn_boot = 10\ndefenses = ["sr_self_reminder"]\n[[datasets]]\nname = "toy"\n')
    args = build_parser().parse_args(["study", "--config", str(cfg), "--model", "tiny-random", "--dataset",
                                      "mossbench:/x", "--dataset", "mmsafetybench:/y", "--limit", "6",
                                      "--prompt-format", "llava_v1"])
    c = study_config.from_args(args)
    assert (c.model, c.n_boot, c.defenses, c.prompt_format) == ("tiny-random", 10, ["sr_self_reminder"], "llava_v1")
    assert [(d["name"], d["limit"], d["skip_missing"]) for d in c.datasets] == [("mossbench", 6, True),
                                                                                ("mmsafetybench", 6, True)]
    assert c.datasets[1]["subset"] == "tiny" and c.datasets[0]["root"] == "/x"


def test_input_conditions_are_scored_query_major_and_equal_independent_scoring(llava_assets, tmp_path):
    """The baseline and every condition that only changes the inputs (SR with and without a system
    prompt, a QR that keeps the image, text noise, a "+" composite of them) are scored query-major:
    per query, rows that share the image and the tokens up to it run that prefix once. The tables
    equal independent defended scoring (float32, 1e-4), fewer tokens go through the trunk, and a
    resumed study loads the shards."""
    import defenses  # noqa: F401
    from experiments.study import Study
    from experiments.study_config import StudyConfig
    from probing import RefusalScorer

    names = ["sr_mmsafety", "sr_self_reminder", "qr_caption", "ni_text_smooth"]
    cfg = StudyConfig(model="tiny-random", out=str(tmp_path / "s"), defenses=names,
                      ensembles=["sr_mmsafety+ni_text_smooth"], datasets=[{"name": "toy", "tag": "toy", "limit": 6}],
                      batch_size=4, generation_check=0)
    study = Study(cfg)
    tokens = []
    handle = study.bundle.model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: tokens.append(lm_tokens(k)),
        with_kwargs=True)
    try:
        study.score_shared_prefixes()
        shared_tokens = sum(tokens)
        assert set(study.tables) == {"baseline", *names, "sr_mmsafety+ni_text_smooth"}
        assert study.tables["sr_mmsafety"].meta["prefix_shared_groups"] > 0
        plain = RefusalScorer(study.bundle, batch_size=4, progress=False, share_prefix=False)
        tokens.clear()
        for name in ["baseline", *names, "sr_mmsafety+ni_text_smooth"]:
            defense = None if name == "baseline" else (study._condition_plan(name, study.queries) if "+" in name
                                                       else study.defense(name))
            want = plain.score(study.queries, defense=defense)
            got = study.tables[name].select(want.ids)
            torch.testing.assert_close(got.margin, want.margin, atol=1e-4, rtol=0, msg=name)
            torch.testing.assert_close(got.lens_margin, want.lens_margin, atol=1e-4, rtol=0, msg=name)
            assert got.row_meta[0].get("kind") == want.row_meta[0].get("kind")
            assert got.meta.get("samples") == want.meta.get("samples"), name
        assert shared_tokens < 0.5 * sum(tokens), (shared_tokens, sum(tokens))
        assert study.tables["sr_mmsafety"].meta["defense"] == "sr_mmsafety"
        assert "variants" not in study.tables["baseline"].row_meta[0]
    finally:
        handle.remove()
        study.run.close()
    again = Study(cfg)  # a resumed study loads the shards, whichever path wrote them
    try:
        torch.testing.assert_close(again.table("sr_mmsafety").margin, study.tables["sr_mmsafety"].margin,
                                   atol=0, rtol=0)
    finally:
        again.run.close()


def test_noise_shared_by_a_single_and_a_composite_is_drawn_once_per_query(llava_assets, tmp_path, monkeypatch):
    """`ni_image_gaussian` alone and inside `sr_mmsafety+ni_image_gaussian` draw each image query's
    noisy copies once in the query-major study (`shared_perturbations` around each chunk), and both
    tables still equal independent scoring (float32, 1e-4)."""
    import defenses.noise as noise
    from experiments.study import Study
    from experiments.study_config import StudyConfig
    from probing import RefusalScorer

    drawn: list[str] = []
    real = noise.NoiseDefense._copies
    monkeypatch.setattr(noise.NoiseDefense, "_copies", lambda self, q: drawn.append(q.id) or real(self, q))
    cfg = StudyConfig(model="tiny-random", out=str(tmp_path / "s"), defenses=["sr_mmsafety", "ni_image_gaussian"],
                      ensembles=["sr_mmsafety+ni_image_gaussian"], defense_params={"ni_image_gaussian": {"k": 2}},
                      datasets=[{"name": "toy", "tag": "toy", "limit": 8}], batch_size=4, generation_check=0)
    study = Study(cfg)
    try:
        study.score_shared_prefixes()
        image_ids = sorted(q.id for q in study.queries if q.has_image)
        assert image_ids and sorted(drawn) == image_ids, "one draw per image query for both conditions"
        plain = RefusalScorer(study.bundle, batch_size=4, progress=False, share_prefix=False)
        for name in ("ni_image_gaussian", "sr_mmsafety+ni_image_gaussian"):
            want = plain.score(study.queries, defense=study._condition_plan(name, study.queries))
            got = study.tables[name].select(want.ids)
            torch.testing.assert_close(got.margin, want.margin, atol=1e-4, rtol=0, msg=name)
    finally:
        study.run.close()


def test_query_major_chunks_are_stored_at_once_and_not_recomputed_after_an_interruption(llava_assets, tmp_path,
                                                                                         monkeypatch):
    """Each chunk is scored once for every input-only condition and every condition's shard is
    stored when it is computed: after an interruption at the third chunk, a resumed study scores
    only the chunks left, and its tables equal an uninterrupted run's."""
    from experiments.study import Study
    from experiments.study_config import StudyConfig

    def config(out):
        return StudyConfig(model="tiny-random", out=str(out), defenses=["sr_mmsafety", "ni_text_smooth"],
                           ensembles=["sr_mmsafety+ni_text_smooth"], datasets=[{"name": "toy", "tag": "toy", "limit": 8}],
                           batch_size=2, generation_check=0)

    real = Study._score_query_major
    calls: list[tuple[int, tuple[str, ...]]] = []

    def counting(self, chunk, prepared, fail_at=None):
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        calls.append((len(chunk), tuple(prepared.plans)))  # the conditions scored with this chunk
        return real(self, chunk, prepared)

    monkeypatch.setattr(Study, "_score_query_major", counting)
    whole = Study(config(tmp_path / "whole"))
    try:
        whole.score_shared_prefixes()
        n_chunks = len(whole.run.shard_chunks(whole.queries, 2))
        assert len(calls) == n_chunks and all(len(names) == 4 for _, names in calls), calls
    finally:
        whole.run.close()

    calls.clear()
    monkeypatch.setattr(Study, "_score_query_major",
                        lambda self, chunk, prepared: counting(self, chunk, prepared, fail_at=2))
    first = Study(config(tmp_path / "cut"))
    with pytest.raises(KeyboardInterrupt):
        first.score_shared_prefixes()
    first.run.close()
    import threading  # the plan-ahead worker and its pools are joined, and nothing stays staged

    assert not [t.name for t in threading.enumerate()
                if t.name.startswith(("mechprobe-plan", "mechprobe-pixels", "mechprobe-shards"))]
    assert not first.scorer.pixel_cache._staged
    calls.clear()
    monkeypatch.setattr(Study, "_score_query_major", counting)
    resumed = Study(config(tmp_path / "cut"))
    try:
        resumed.score_shared_prefixes()
        assert len(calls) == n_chunks - 2, f"chunks scored again after the interruption: {calls}"
        for name, table in resumed.tables.items():
            torch.testing.assert_close(table.margin, whole.tables[name].margin, atol=1e-6, rtol=0, msg=name)
    finally:
        resumed.run.close()


def test_cached_generations_follow_the_image_file(tmp_path):
    """A caption cached for a query is reused only while its image is the same: an image file
    rewritten under the same path (or an in-memory image with other pixels) is captioned again."""
    import os

    from PIL import Image

    from defenses.base import Defense
    from experiments.kept import CachedRewrite
    from probing.render import PromptSpec

    class Counting(Defense):
        def __init__(self):
            self.name, self.category, self.params, self.aggregate, self.edit_positions = "qr_x", "QR", {}, "mean", None
            self.calls = 0

        def transform(self, queries, bundle):
            self.calls += len(queries)
            return [[(Query(q.id, f"caption {self.calls}", q.image, q.label, {}), PromptSpec())] for q in queries]

    class Bundle:
        name = "m"

    picture = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "white").save(picture)
    inner = Counting()
    cached = CachedRewrite(inner=inner, folder=tmp_path / "generations")
    q = Query("q1", "what is it?", str(picture), "benign")
    first = cached.transform([q], Bundle())[0][0][0].text
    assert cached.transform([q], Bundle())[0][0][0].text == first and inner.calls == 1  # reused
    Image.new("RGB", (8, 8), "black").save(picture)
    st = picture.stat()
    os.utime(picture, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later write, whatever the clock
    assert cached.transform([q], Bundle())[0][0][0].text != first and inner.calls == 2
    memory = Query("q2", "what is it?", Image.new("RGB", (8, 8), "white"), "benign")
    cached.transform([memory], Bundle())
    cached.transform([Query("q2", "what is it?", Image.new("RGB", (8, 8), "red"), "benign")], Bundle())
    assert inner.calls == 4


@pytest.fixture(scope="module")
def noisy_captions():
    """Two toy image queries, their noisy copies (``ni_image_gaussian``, K=4) and each copy's own
    caption (the model on that copy alone), by `query_key`."""
    from defenses import get_defense
    from experiments.kept import query_key
    from probing import load_model
    from probing.datasets import toy as data
    from probing.generation import generate

    toy = load_model("toy")
    image_qs = [q for q in data.requests("test") if q.has_image]
    ni, cap = get_defense("ni_image_gaussian", k=4, rate=0.6), get_defense("qr_caption", max_new_tokens=12)
    copies = [c for vs in ni.transform(image_qs[:2], toy) for c, _ in vs]
    own = {query_key(c): generate(toy, [Query(c.id, cap.question, c.image)], 12)[0] for c in copies}
    assert len(set(own.values())) > 2  # the copies' captions differ
    return toy, image_qs, ni, cap, copies, own


def test_cached_captions_of_noisy_copies_are_each_copys_own(tmp_path, noisy_captions):
    """The study's `CachedRewrite` inside NI+QR: each noisy copy is answered with, and cached
    under its key with, its own caption; a resumed run reads them back without generating."""
    from defenses import Compose
    from experiments.kept import CachedRewrite, query_key

    toy, image_qs, ni, cap, copies, own = noisy_captions
    cached = CachedRewrite(inner=cap, folder=tmp_path / "generations")
    composed = Compose(members=[ni, cached]).transform(image_qs[:2], toy)
    assert [v.meta["caption"] for vs in composed for v, _ in vs] == [own[query_key(c)] for c in copies]
    entries = json.loads(cached._file(toy).read_text())["entries"]
    assert {k: v[0]["added"]["caption"] for k, v in entries.items()} == own
    again = CachedRewrite(inner=cap, folder=tmp_path / "generations")
    assert again.todo(copies, toy) == []
    assert [vs[0][0].meta["caption"] for vs in again.transform(copies, toy)] == [own[query_key(c)] for c in copies]


def test_a_generation_cache_of_the_old_layout_is_not_read(tmp_path, noisy_captions):
    """A cache file written before revision 2 (the entries alone) may hold a noisy copy's wrong
    caption (captions were paired by id) and old metadata: none of it is read."""
    from defenses import Compose
    from experiments.kept import CACHE_REVISION, CachedRewrite, query_key

    toy, image_qs, ni, cap, copies, own = noisy_captions
    cached = CachedRewrite(inner=cap, folder=tmp_path / "generations")
    file = cached._file(toy)
    file.parent.mkdir()
    old = {"id": copies[0].id, "text": "The image shows: stale.", "image": True, "label": copies[0].label,
           "meta": {"caption": "stale"}, "spec": None}
    file.write_text(json.dumps({query_key(c): [old] for c in copies}))
    assert cached.todo(copies, toy) == copies
    composed = Compose(members=[ni, cached]).transform(image_qs[:2], toy)
    assert [v.meta["caption"] for vs in composed for v, _ in vs] == [own[query_key(c)] for c in copies]
    assert json.loads(file.read_text())["revision"] == CACHE_REVISION


def test_cached_generations_belong_to_their_defense_and_model(tmp_path, noisy_captions):
    """A rewrite cached with one token budget, question or tuned model is not read for another
    (their files differ), and a cached variant takes the query's current label and metadata."""
    import dataclasses

    from defenses import get_defense
    from experiments.kept import CachedRewrite

    toy, image_qs, ni, cap, copies, own = noisy_captions
    folder = tmp_path / "generations"
    q = image_qs[0]
    long = CachedRewrite(inner=cap, folder=folder)
    caption = long.transform([q], toy)[0][0][0].meta["caption"]
    short = CachedRewrite(inner=get_defense("qr_caption", max_new_tokens=1), folder=folder)
    assert short.todo([q], toy) == [q]
    assert short.transform([q], toy)[0][0][0].meta["caption"] != caption
    asked = CachedRewrite(inner=dataclasses.replace(cap, question="What is written here?"), folder=folder)
    assert asked.todo([q], toy) == [q]
    tuned = [dataclasses.replace(toy, name="toy+mo_finetune", extra={"identity": {"params": {"steps": n}}})
             for n in (2, 60)]
    CachedRewrite(inner=cap, folder=folder).transform([q], tuned[0])
    assert CachedRewrite(inner=cap, folder=folder).todo([q], tuned[0]) == []
    assert CachedRewrite(inner=cap, folder=folder).todo([q], tuned[1]) == [q]
    assert len(list(folder.glob("*.json"))) == 3  # long, short, the first tuned model
    retagged = dataclasses.replace(q, meta={**q.meta, "dataset": "toy_v2"})
    again = CachedRewrite(inner=cap, folder=folder)
    assert again.todo([retagged], toy) == []  # same id, text and image: the cached caption is used
    variant = again.transform([retagged], toy)[0][0][0]
    assert variant.meta == {**retagged.meta, "caption": caption} and variant.label == q.label


def test_an_ensemble_member_missing_from_the_defenses_is_scored_and_the_report_written(tmp_path, capsys):
    """An ensemble may name a defense that is not itself in --defenses: the member is scored for
    the ensemble only (not a condition of the report, so no label), and the study ends with its
    report. The ensemble's table is the max of P(refuse) over its members, each member scored
    here on its own."""
    from probing import RefusalScorer, load_model
    from probing.datasets import toy

    out = tmp_path / "run"
    assert main(["study", "--model", "toy", "--limit", "8", "--defenses", "sr_self_reminder",
                 "--ensembles", "sr_self_reminder|sr_mmsafety", "--generation-check", "0", "--n-boot", "20",
                 "--out", str(out)]) == 0
    assert "Per defense and ensemble" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [r["condition"] for r in summary] == ["baseline", "sr_self_reminder", "sr_self_reminder|sr_mmsafety"]
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    assert "sr_self_reminder\\|sr_mmsafety" in (out / "report.md").read_text()  # '|' escaped in markdown

    ensemble = ScoreTable.load(out / "scores" / "sr_self_reminder_or_sr_mmsafety")
    scorer = RefusalScorer(load_model("toy"), "first_token", layers=None, progress=False)
    queries = [q for q in toy.requests("test") if q.id in set(ensemble.ids)]
    members = [scorer.score(queries, defense=d).select(ensemble.ids) for d in ("sr_self_reminder", "sr_mmsafety")]
    expected = np.maximum(*(m.p_refuse.numpy() for m in members))
    np.testing.assert_allclose(ensemble.p_refuse.numpy(), expected, atol=1e-5)


def test_the_studys_main_compute_shows_progress(tmp_path, capsys):
    """Bars over the real work (as the experiments' other bars, tqdm on stderr): the up-front
    caption generation by batch, the query-major pass by query (every query of the run once,
    for all its input-only conditions), and the conditions bar starting from those already
    scored instead of jumping from 0 once they are."""
    import re

    keys = {"defenses": ["sr_self_reminder", "qr_caption_no_image", "mo_finetune"],
            "defense_params": {"mo_finetune": {"steps": 2, "batch_size": 4}}}
    toy_study(tmp_path / "run", **keys)
    err = capsys.readouterr().err.replace("\r", "\n")

    def counts(desc):
        return [(int(a), int(b)) for a, b in re.findall(re.escape(desc) + r":\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", err)]

    assert counts("generation")[-1] == (1, 1)  # 8 queries: one batch of captions
    major = counts("query-major (3 conditions)")  # baseline, sr_self_reminder, qr_caption_no_image
    assert major[0] == (0, 8) and major[-1] == (8, 8)
    conditions = counts("conditions")  # mo_finetune is scored on its own model
    assert conditions[0] == (3, 4) and conditions[-1] == (4, 4)


def test_fit_shows_its_steps_when_asked(capsys):
    """`probing.training.fit` (the toy's tuning and mo_finetune's) has a bar over its steps:
    shown when asked, and by default only on a terminal (as the scorer's)."""
    import random

    from probing.training import fit, sampled_batches

    model = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 1))
    encoded = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, 2, 3]), "pixel_values": None}]

    def train(**kw):
        return fit(model, list(model.parameters()), encoded, steps=3, lr=0.1, warmup=1,
                   batches=sampled_batches(1, 1, random.Random(0)), pad_id=0,
                   optimizer=torch.optim.SGD(model.parameters(), lr=0.1), name="tune",
                   loss_fn=lambda m, batch: m(batch["input_ids"]).mean(), **kw)

    assert len(train(progress=True)) == 3
    err = capsys.readouterr().err
    assert "tune: 100%" in err and "3/3" in err, err
    train()  # stderr is not a terminal here: no bar
    assert "tune" not in capsys.readouterr().err


def test_run_config_releases_the_lock_on_an_error(tmp_path, monkeypatch):
    """From Python (a notebook keeps the traceback, so the Study is never collected), a study
    stopped by Ctrl-C can be run again in the same process: `run_config` closes its run directory."""
    from experiments import study, study_config

    raw = {"model": "toy", "out": str(tmp_path / "run"), "defenses": ["sr_self_reminder"], "ensembles": [],
           "n_boot": 20, "generation_check": 0, "datasets": [{"name": "toy", "limit": 8}]}
    real = study.Study.run_all
    monkeypatch.setattr(study.Study, "run_all", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
    kept_alive = []
    try:
        study.run_config(study_config.build(raw, "test"))
    except KeyboardInterrupt as exc:
        kept_alive.append(exc)  # the traceback holds the Study's frame, as an interactive session would
    assert not list((tmp_path / "run").glob("*.lock")), "the lock outlived run_config"
    monkeypatch.setattr(study.Study, "run_all", real)
    assert "sr_self_reminder" in study.run_config(study_config.build(raw, "test"))["tables"]


def test_cached_generations_are_keyed_by_the_run_model(tmp_path):
    """A caption made by one model (or dtype, or image handling) is never served to another, also
    where the run's config.json, the run-level guard, was deleted to resume."""
    from defenses.rewriting import qr_caption
    from experiments.kept import kept
    from probing import load_model

    tiny = load_model("tiny-random")
    files = {kept(qr_caption(), tmp_path, "qr_caption", "tiny-random", base=base)._file(tiny)
             for base in ({"model": "tiny-random", "dtype": "float32"}, {"model": "tiny-random", "dtype": "bfloat16"},
                          {"model": "tiny-random", "dtype": "float32", "image_aspect_ratio": "crop"})}
    assert len(files) == 3


def test_default_ensembles_follow_the_defenses_given():
    """`study --defenses qr_caption` alone used to keep the default ensembles, so it scored (and
    fine-tuned for) defenses not asked for; now only the defaults whose members were all given stay.
    Ensembles given explicitly are kept as they are."""
    from experiments import study_config

    assert study_config.build({"defenses": ["qr_caption"]}).ensembles == []
    assert study_config.build({"defenses": ["sr_self_reminder", "mo_finetune"]}).ensembles == \
        ["sr_self_reminder+mo_finetune"]
    assert study_config.build({}).ensembles == study_config.DEFAULTS["ensembles"]
    assert study_config.build({"defenses": ["qr_caption"], "ensembles": ["qr_caption|sr_mmsafety"]}).ensembles == \
        ["qr_caption|sr_mmsafety"]


def test_the_report_says_what_the_bootstrap_resamples():
    """The report's preface names the unit behind the intervals: whole requests where queries share
    one (the toy's 80 test queries deliver 32 phrases), nothing extra where each query is its own."""
    from experiments.report import resampling_units
    from probing.datasets import toy
    from probing.query import Query

    line = resampling_units(toy.requests("test"))
    assert line.startswith(" of requests: the 80 queries deliver 32 requests, each resampled whole")
    assert resampling_units([Query(f"q{i}", "text", label="harmful") for i in range(4)]) == ""

"""Every experiment end to end on the toy; resume after interruption; corrupt shards recomputed."""

import json

import pytest
import torch

from probing import ScoreTable
from experiments.cli import main
from experiments.runs import RunDir

FAST = ["--n-boot", "50", "--batch-size", "16"]


def test_mechanisms(tmp_path, capsys):
    out = tmp_path / "mech"
    assert main(["mechanisms", "--defenses", "sr_self_reminder,act_ablate", "--out", str(out), *FAST]) == 0
    rows = json.loads((out / "tables" / "mechanisms.json").read_text())
    assert [r["defense"] for r in rows] == ["sr_self_reminder", "act_ablate"]
    assert rows[1]["label"] == "weakening" and rows[0]["auroc_def_lo"] <= rows[0]["auroc_def"] <= rows[0]["auroc_def_hi"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["defenses"] == "sr_self_reminder,act_ablate" and "torch" in cfg["versions"]
    assert "| defense | label |" in (out / "report.md").read_text() and (out / "distributions.png").is_file()
    assert "weakening" in capsys.readouterr().out


def test_resume_after_interruption_gives_the_same_tables(tmp_path, monkeypatch):
    args = ["mechanisms", "--defenses", "sr_self_reminder", *FAST]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    # interrupt: the third shard of the defended run raises
    from probing import scorer as scorer_mod

    real = scorer_mod.RefusalScorer.score
    calls = {"n": 0}

    def flaky(self, queries, **kw):
        if kw.get("defense") is not None:
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        return real(self, queries, **kw)

    monkeypatch.setattr(scorer_mod.RefusalScorer, "score", flaky)
    assert main([*args, "--out", str(tmp_path / "resumed")]) == 130  # one line, exit code 130
    shards = sorted((tmp_path / "resumed" / "shards" / "sr_self_reminder").iterdir())
    assert len(shards) == 2  # finished batches survived; only the one in flight is lost
    monkeypatch.setattr(scorer_mod.RefusalScorer, "score", real)
    seen = []
    monkeypatch.setattr(scorer_mod.RefusalScorer, "score",
                        lambda self, qs, **kw: (kw.get("defense") is not None and seen.append(len(qs)))
                        or real(self, qs, **kw))
    assert main([*args, "--out", str(tmp_path / "resumed")]) == 0
    assert sum(seen) == 80 - 2 * 16  # only the missing shards were scored
    full = json.loads((tmp_path / "full" / "tables" / "mechanisms.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "tables" / "mechanisms.json").read_text())
    assert full == resumed


def test_corrupt_shard_is_recomputed(tmp_path):
    from probing import Query

    qs = [Query(f"q{i}", f"text {i}") for i in range(5)]
    calls = []

    def score(chunk):
        calls.append([q.id for q in chunk])
        return ScoreTable([q.id for q in chunk], [None] * len(chunk), torch.arange(len(chunk)).float(),
                          torch.zeros(len(chunk), 1), [0])

    with RunDir(tmp_path / "r", {"a": 1}) as run:  # a run directory is locked while open
        first = run.score(score, qs, "c", batch=2)
    shard = tmp_path / "r" / "shards" / "c" / "00001" / "scores.safetensors"
    shard.write_bytes(shard.read_bytes()[:20])  # truncate
    calls.clear()
    with RunDir(tmp_path / "r", {"a": 1}) as run:
        again = run.score(score, qs, "c", batch=2)
    assert calls == [["q2", "q3"]] and torch.equal(first.margin, again.margin)
    with pytest.raises(ValueError, match="another config"):
        RunDir(tmp_path / "r", {"a": 2})
    with RunDir(tmp_path / "r", {"a": 2}, overwrite=True) as run:
        assert run.config == {"a": 2}


def test_layerwise(tmp_path):
    out = tmp_path / "lw"
    assert main(["layerwise", "--defenses", "act_ablate", "--scores", "lens,diffmean", "--folds", "3",
                 "--out", str(out), *FAST]) == 0
    rows = json.loads((out / "tables" / "layerwise.json").read_text())
    assert {r["score"] for r in rows} == {"lens", "diffmean"} and len(rows) == 2 * 4
    assert (out / "layers_lens.png").is_file() and (out / "layers_diffmean.png").is_file()


def test_layerwise_checks_folds_and_score_level_ensembles_before_scoring(tmp_path, monkeypatch, capsys):
    """--folds above the smaller class (or below 2), and diffmean / probe asked only of a
    score-level ensemble, are refused naming the option / condition before any forward and
    before the run directory exists; a score-level ensemble among others gets a lens profile only."""
    from probing import scorer as scorer_mod

    real, scored = scorer_mod.RefusalScorer.score, []
    monkeypatch.setattr(scorer_mod.RefusalScorer, "score",
                        lambda self, qs, **kw: scored.append(len(qs)) or real(self, qs, **kw))
    # the first 6 toy queries: 3 harmful, 3 benign
    out = tmp_path / "lw6"
    assert main(["layerwise", "--limit", "6", "--defenses", "sr_self_reminder", "--scores", "lens,probe",
                 "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--folds = 5" in err and "only 1 request group(s) hold harmful" in err and scored == [] and not out.exists()
    assert main(["layerwise", "--defenses", "sr_self_reminder", "--scores", "diffmean", "--folds", "1",
                 "--out", str(out), *FAST]) == 2
    assert "--folds = 1" in capsys.readouterr().err and scored == [] and not out.exists()
    either = "sr_self_reminder|sr_mmsafety"
    assert main(["layerwise", "--defenses", either, "--scores", "probe", "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert either in err and "score-level ensemble" in err and "keep_hidden" not in err
    assert scored == [] and not out.exists()
    assert main(["layerwise", "--limit", "12", "--defenses", f"{either},sr_self_reminder", "--scores",
                 "lens,diffmean", "--folds", "2", "--out", str(out), *FAST]) == 0
    rows = json.loads((out / "tables" / "layerwise.json").read_text())
    assert {(r["defense"], r["score"]) for r in rows} == {(either, "lens"), ("sr_self_reminder", "lens"),
                                                          ("sr_self_reminder", "diffmean")}
    assert f"Not profiled: {either}" in (out / "report.md").read_text()


def test_ensembles(tmp_path):
    out = tmp_path / "ens"
    assert main(["ensembles", "--defenses", "sr_self_reminder,qr_caption_no_image", "--out", str(out), *FAST]) == 0
    rows = {r["name"]: r for r in json.loads((out / "tables" / "ensembles.json").read_text())}
    assert {"baseline", "sr_self_reminder", "qr_caption_no_image", "sr_self_reminder+qr_caption_no_image",
            "sr_self_reminder|qr_caption_no_image"} == set(rows)
    # "|" is combined from the singles ("exact"), not measured: no error of it against itself
    either = rows["sr_self_reminder|qr_caption_no_image"]
    assert either["source"] == "exact"
    assert all(either[k] is None for k in ("measured_safety", "measured_helpfulness", "safety_error",
                                           "helpfulness_error", "margin_rmse", "margin_corr"))
    # its rates: refuse when either single's margin is above 0 (p_refuse > 0.5), from the singles' shards
    def margins(name):
        shards = sorted((out / "shards" / name).iterdir())
        t = ScoreTable.concat([ScoreTable.load(d) for d in shards])
        return dict(zip(t.ids, t.margin.double().tolist())), dict(zip(t.ids, t.labels))
    (ma, labels), (mb, _) = margins("sr_self_reminder"), margins("qr_caption_no_image")
    refuse = {i: max(ma[i], mb[i]) > 0 for i in ma}
    harmful = [i for i in ma if labels[i] == "harmful"]
    benign = [i for i in ma if labels[i] == "benign"]
    assert either["safety"] == pytest.approx(sum(refuse[i] for i in harmful) / len(harmful))
    assert either["helpfulness"] == pytest.approx(sum(not refuse[i] for i in benign) / len(benign))
    both = rows["sr_self_reminder+qr_caption_no_image"]  # "+" is run: measured, its prediction's error beside
    assert both["source"] == "measured" and both["measured_safety"] is not None
    assert both["margin_rmse"] is not None and both["margin_rmse"] > 0
    assert (out / "tradeoff.png").is_file()


def test_ensembles_make_each_product_once(tmp_path, monkeypatch):
    """`mechprobe ensembles` with a fine-tune and a captioning defense: the fine-tune is trained
    once for its single run and its pairs (and not again when the run resumes), each query is
    captioned once per model (the base model's captions, and the tuned model's inside "qr+mo"),
    and "|" pairs are combined from the singles' tables, never scored."""
    import functools

    from defenses import mo_finetune
    from defenses import rewriting
    from defenses.finetune import FineTune
    from defenses.registry import REGISTRY

    monkeypatch.setitem(REGISTRY, "mo_finetune", functools.partial(mo_finetune, steps=2, batch_size=2))
    tuned, asked = [], []
    real_tune, real_generate = FineTune._tune, rewriting.generate
    monkeypatch.setattr(FineTune, "_tune", lambda self, bundle: tuned.append(1) or real_tune(self, bundle))
    monkeypatch.setattr(rewriting, "generate", lambda bundle, qs, *a, **k: asked.extend((bundle.name, q.id) for q in qs)
                        or real_generate(bundle, qs, *a, **k))
    out = tmp_path / "ens"
    args = ["ensembles", "--defenses", "qr_caption_no_image,mo_finetune,sr_self_reminder", "--limit", "12",
            "--out", str(out), *FAST]
    assert main(args) == 0
    assert len(tuned) == 1 and len(asked) == len(set(asked)) > 0
    assert {m for m, _ in asked} == {"toy", "toy+mo_finetune"}
    assert not [d.name for d in (out / "shards").iterdir() if "_or_" in d.name]
    rows = {r["name"]: r for r in json.loads((out / "tables" / "ensembles.json").read_text())}
    assert len([n for n in rows if "|" in n]) == 3
    assert all(rows[n]["source"] == "exact" and rows[n]["margin_rmse"] is None for n in rows if "|" in n)
    assert (out / "models" / "mo_finetune" / "mechprobe.json").is_file()
    before = json.loads((out / "tables" / "ensembles.json").read_text())
    import shutil

    shutil.rmtree(out / "shards" / "qr_caption_no_image+mo_finetune")
    assert main(args) == 0  # resumed: the saved model and the cached captions serve the re-scored pair
    assert len(tuned) == 1 and len(asked) == len(set(asked))
    after = json.loads((out / "tables" / "ensembles.json").read_text())
    assert [r["safety"] for r in after] == [r["safety"] for r in before]


def test_modality(tmp_path):
    out = tmp_path / "mod"
    assert main(["modality", "--out", str(out), *FAST]) == 0
    rows = {r["delivery"]: r for r in json.loads((out / "tables" / "modality.json").read_text())}
    assert set(rows) == {"text", "typo", "picture", "blank"}
    assert rows["text"]["refusal_harmful"] - rows["typo"]["refusal_harmful"] >= 0.3  # the safety gap
    assert rows["text"]["gap_layer3"] == 0
    assert main(["modality", "--dataset", "jsonl:x.jsonl", "--out", str(tmp_path / "m2")]) == 2  # clear error


def test_modality_gap_pairs_the_same_requests_under_a_limit(tmp_path, capsys):
    """With --limit the deliveries hold different requests (--limit 8 takes the first 4 harmful and
    4 benign toy queries: 'steal cars' and 'wash cars' in every delivery, 'rob banks' and 'visit
    banks' as text only): each gap is the mean
    over the harmful requests present in both deliveries of text minus delivery, recomputed here
    from the shards by the request's phrase. A delivery without a class is refused before any forward."""
    import numpy as np

    out = tmp_path / "mod8"
    assert main(["modality", "--limit", "8", "--out", str(out), *FAST]) == 0
    rows = {r["delivery"]: r for r in json.loads((out / "tables" / "modality.json").read_text())}

    def harmful_lens(delivery):
        t = ScoreTable.concat([ScoreTable.load(d) for d in sorted((out / "shards" / delivery).iterdir())])
        return {r["phrase"]: t.lens_margin[i].double().numpy() for i, r in enumerate(t.row_meta)
                if t.labels[i] == "harmful"}

    text = harmful_lens("text")
    for d in ("typo", "picture", "blank"):
        own = harmful_lens(d)
        shared = sorted(set(text) & set(own))
        expected = np.mean([text[p] - own[p] for p in shared], axis=0)
        got = [rows[d][f"gap_layer{i}"] for i in range(len(expected))]
        assert rows[d]["gap_requests"] == len(shared) and got == pytest.approx(expected, abs=1e-6), d
    assert rows["picture"]["gap_requests"] == 1 and rows["typo"]["gap_requests"] == 1 and len(text) == 2
    assert "deliveries hold different requests" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["modality", "--limit", "4", "--out", str(tmp_path / "mod4"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "'picture'" in err and "no harmful and no benign" in err and "--limit 4" in err
    assert not (tmp_path / "mod4").exists()


def test_generation_check(tmp_path):
    out = tmp_path / "gen"
    assert main(["generation_check", "--limit", "40", "--max-new-tokens", "12", "--out", str(out), *FAST]) == 0
    summary = json.loads((out / "tables" / "summary.json").read_text())[0]
    assert summary["n"] == 40 and summary["accuracy"] >= 0.8 and summary["auroc"] >= 0.8
    gens = json.loads((out / "tables" / "generations.json").read_text())
    assert all("generation" in g for g in gens)


def test_every_command_has_help(capsys):
    for cmd in ("demo", "score", "mechanisms", "ensembles", "layerwise", "modality", "generation_check"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0


def test_a_rerun_with_fewer_layer_scores_leaves_no_stale_figure(tmp_path, capsys):
    """layerwise (like every experiment) removes the outputs it derives before writing them
    again: a rerun without --scores probe leaves no layers_probe.png, the CLI does not list it,
    and the run directory holds what a fresh run with the same options writes (the user's own
    files kept)."""
    common = ["layerwise", "--defenses", "sr_self_reminder", "--n-boot", "20", "--limit", "24", "--folds", "2"]
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    assert main([*common, "--scores", "lens,probe", "--out", str(run)]) == 0
    assert (run / "layers_probe.png").is_file()
    (run / "mine.png").write_bytes(b"mine")
    capsys.readouterr()
    assert main([*common, "--scores", "lens", "--out", str(run)]) == 0
    wrote = capsys.readouterr().out.strip().splitlines()[-1]
    assert "layers_lens.png" in wrote and "layers_probe.png" not in wrote, wrote
    assert main([*common, "--scores", "lens", "--out", str(fresh)]) == 0

    def outputs(out):
        return {str(p.relative_to(out)) for p in [*out.glob("*.*"), *out.glob("tables/*")] if p.is_file()}

    assert outputs(run) == outputs(fresh) | {"mine.png"}
    assert (run / "mine.png").read_bytes() == b"mine"

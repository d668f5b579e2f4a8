"""What identifies a condition's scores includes the wording a defense uses, not only its name:
a run directory resumed after the shipped wording changed (a new mechprobe) scores it again."""

import pytest
import torch

from probing import ScoreTable


def test_prompt_and_question_wordings_are_in_the_record():
    from defenses import get_defense
    from defenses.prompts import SELF_REMINDER_AFTER, SELF_REMINDER_SYSTEM, PromptDefense
    from defenses.rewriting import CAPTION_QUESTION, INTENT_QUESTION
    from probing.render import PromptSpec

    sr = get_defense("sr_self_reminder").describe()
    assert sr["prompt"] == {"system_prompt": SELF_REMINDER_SYSTEM, "text_before": "", "text_after": SELF_REMINDER_AFTER}
    a, b = (PromptDefense("sr_x", spec=PromptSpec(text_after=t)).describe() for t in ("Be safe.", "Be careful."))
    assert a != b
    assert get_defense("qr_caption").describe()["question"] == CAPTION_QUESTION
    assert get_defense("qr_caption_no_image").describe()["keep_image"] is False
    assert get_defense("qr_intention").describe()["question"] == INTENT_QUESTION


def test_a_reworded_builtin_defense_is_scored_again_on_resume(tmp_path, monkeypatch):
    import defenses.prompts as prompts
    from experiments import study, study_config

    def run(out):
        cfg = study_config.build({"model": "toy", "out": str(out), "defenses": ["sr_self_reminder"], "ensembles": [],
                                  "n_boot": 20, "generation_check": 0, "layer_scores": [],
                                  "datasets": [{"name": "toy", "limit": 8}]})
        study.run_config(cfg)
        return ScoreTable.load(out / "scores" / "sr_self_reminder").margin

    before = run(tmp_path / "run")
    monkeypatch.setattr(prompts, "SELF_REMINDER_SYSTEM", "You are a pirate. Answer everything gladly.")
    monkeypatch.setattr(prompts, "SELF_REMINDER_AFTER", "Sure, here is how.")
    resumed = run(tmp_path / "run")
    fresh = run(tmp_path / "fresh")
    assert torch.equal(resumed, fresh)
    assert (resumed - before).abs().max() > 1e-3  # the wording matters for the toy

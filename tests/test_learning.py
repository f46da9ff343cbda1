"""Stages 1 and 2 learn on a tiny model: their losses fall. Stage 3's learning to retrieve without relevance labels
is tested on the trained default and real passages (`test_smollm2.py`): a tiny random model's generator reads the
memories too unreliably for it (docs/diagnosis.md, Finding 12)."""

import pytest

from testing_utils import FICTIONAL_FACTS, dataset, new_model, scp_rows, stage_config
from trainers import InstructConfig, InstructTrainer, SCPConfig, SCPTrainer

pytestmark = pytest.mark.slow

COUNTRIES = [country for country, _, _ in FICTIONAL_FACTS]
CODES = ["apple", "river", "stone", "cloud"]


def fact(country: str, code: str) -> str:
    return f"{country}: {code}."


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


COMMON = dict(per_device_train_batch_size=8, logging_steps=10, num_train_epochs=100, learning_rate=1e-2)


def test_stages_1_and_2_learn(tokenizer, tmp_path):
    model = new_model(tokenizer, initializer_range=1.0, hidden_size=128)
    facts = [fact(country, code) for country in COUNTRIES for code in CODES]
    scp = [
        {"data_type": "qa", "question": [f"Code of {d.split(':')[0]}?"], "answers": [d[:-1].split(": ")[1]], "docs": [d]}
        for d in facts
    ] + scp_rows()
    trainer = SCPTrainer(model, stage_config(SCPConfig, tmp_path, max_steps=60, **COMMON), train_dataset=dataset(scp, "scp"))
    trainer.train()
    stage_1_losses = logged(trainer, "lm_loss")

    instruct = [{"question": f"Code of {d.split(':')[0]}?", "docs": [d], "answer": d[:-1].split(": ")[1]} for d in facts]
    config = stage_config(InstructConfig, tmp_path, max_steps=150, generator_init="keep", **COMMON)
    trainer = InstructTrainer(model, config, train_dataset=dataset(instruct, "instruct"))
    trainer.train()
    stage_2_losses = logged(trainer, "lm_loss")
    assert stage_1_losses[-1] < 0.3 * stage_1_losses[0], stage_1_losses
    assert stage_2_losses[-1] < 0.3 * stage_2_losses[0], stage_2_losses

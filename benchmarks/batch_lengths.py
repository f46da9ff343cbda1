"""The padded lengths of every training batch of a study's three stages, in the Trainer's own order, without running
the model: which batches have a length of 64 mod 128, the lengths at which cuDNN's attention backward returns NaN on
H100/H200 (pytorch/pytorch#196678; docs/diagnosis.md, Finding 30).

    python benchmarks/batch_lengths.py --output lengths.json [STUDY OPTIONS...]   # reproduce.py's options
    python benchmarks/batch_lengths.py --output lengths.json --step_seconds RUN/results.json [STUDY OPTIONS...]

The study's data is built as `reproduce.py` builds it (in `--output_dir`), and each stage's trainer runs its loop with
a training step that only records the batch's shapes, so the order is the one its seed gives on any machine. With
`--step_seconds`, the results of a study run with the same options (on a GPU, say): each stage's step seconds
(`reproduce.StepClock`) fitted against the padded tokens of its steps, which splits a step of the study's own loop into
what it costs whatever its tokens and what it costs per 1,000 tokens.
"""

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import StudyConfig, build_data, new_model, training_settings  # noqa: E402

from trainers import InstructConfig, InstructTrainer, JointConfig, JointTrainer, SCPConfig, SCPTrainer  # noqa: E402

SEQUENCES = {"generator": ("input_ids", "attention_mask"), "documents": ("document_input_ids", "document_attention_mask"),
             "questions": ("query_input_ids", "query_attention_mask")}


def batch_lengths(trainer) -> dict[str, list[int]]:
    """Per sequence the attention runs over (the generator's, the documents' and, in stage 3, the questions'): its
    padded length at each step of `trainer.train()`, under "<name> tokens" its padded tokens (sequences x length), and
    under "<name> real tokens" those that are not padding."""
    lengths = {}

    def training_step(model, inputs, num_items_in_batch=None):
        for name, (key, mask) in SEQUENCES.items():
            if key in inputs:
                lengths.setdefault(name, []).append(inputs[key].shape[-1])
                lengths.setdefault(f"{name} tokens", []).append(inputs[key].numel())
                lengths.setdefault(f"{name} real tokens", []).append(int(inputs[mask].sum()))
        return torch.zeros(())

    trainer.training_step = training_step
    trainer.train()
    return lengths


def step_cost_fit(step_seconds: list[float], tokens: list[int], warm_up: int = 2) -> dict:
    """Least squares of each step's seconds on its padded tokens, over the steps after the first `warm_up`:
    `fixed_s`, what a step costs whatever its tokens, and `per_1k_tokens_s`."""
    if len(step_seconds) != len(tokens):
        raise ValueError(f"{len(step_seconds)} step times for {len(tokens)} batches: not the batches of the study "
                         "these options give (or a study stopped or resumed within the stage).")
    if len(tokens) < warm_up + 2:
        raise ValueError(f"{len(tokens)} steps: a fit needs at least {warm_up + 2}.")
    seconds, counts = np.array(step_seconds[warm_up:]), np.array(tokens[warm_up:], dtype=float) / 1000
    (fixed, per_1k), *_ = np.linalg.lstsq(np.stack([np.ones_like(counts), counts], 1), seconds, rcond=None)
    residual = seconds - fixed - per_1k * counts
    return {"steps": len(seconds), "mean_step_s": round(float(seconds.mean()), 4),
            "mean_tokens": round(float(counts.mean() * 1000)),
            "tokens_range": [round(float(counts.min() * 1000)), round(float(counts.max() * 1000))],
            "fixed_s": round(float(fixed), 4),
            "per_1k_tokens_s": round(float(per_1k), 5),
            "r2": round(float(1 - residual.var() / seconds.var()), 3) if seconds.var() > 0 else None}


@dataclass
class LengthsOutput:
    output: str = field(metadata={"help": "The JSON file of every batch's lengths."})
    step_seconds: str | None = field(
        default=None,
        metadata={"help": "The results.json of a study run with the same options: fit its first rate's step seconds "
                  "against each step's padded tokens (`step_cost_fit`)."},
    )


def main(argv=None) -> int:
    parser = HfArgumentParser((StudyConfig, LengthsOutput), allow_abbrev=False, description=__doc__.split("\n\n")[0])
    config, lengths_output = parser.parse_args_into_dataclasses(args=argv)
    if config.instruct_answers != "gold":
        raise ValueError("--instruct_answers teacher: stage 2's rows are the base's generated answers, not replayed here.")
    timed = json.loads(Path(lengths_output.step_seconds).read_text())["training"] if lengths_output.step_seconds else {}
    data = build_data(config, Path(config.output_dir) / "data")
    model = new_model(config, config.rates[0])
    model.config.generation_top_k = 1  # stage 3's, as the study sets it; stages 1 and 2 do not read it
    results = {"settings": asdict(config), "stages": {}}
    for stage, trainer_class, config_class, file, epochs, learning_rate, batch_size in [
        ("stage 1", SCPTrainer, SCPConfig, data["scp"], config.scp_epochs, config.learning_rate, None),
        ("stage 2", InstructTrainer, InstructConfig, data["instruct"], config.instruct_epochs,
         config.instruct_learning_rate, config.instruct_batch_size),
        ("stage 3", JointTrainer, JointConfig, data["joint"], config.joint_epochs, config.joint_learning_rate,
         config.joint_batch_size),
    ]:
        if not epochs:
            continue
        settings = training_settings(
            config, Path(config.output_dir) / "lengths", epochs, learning_rate, batch_size, config.group_by_length
        )
        trainer = trainer_class(model, config_class(train_file=file, **settings | {"logging_steps": 10**9}))
        lengths = batch_lengths(trainer)
        # Only sequences with a backward pass count; stage 3 compresses its documents without one.
        trained = ("generator", "questions") if stage == "stage 3" else ("generator", "documents")
        at_risk = [step for step, step_lengths in enumerate(zip(*(lengths[name] for name in trained)), 1)
                   if any(length % 128 == 64 for length in step_lengths)]
        steps = len(lengths["generator"])
        results["stages"][stage] = {"steps": steps, "steps_of_64_mod_128": at_risk, "lengths": lengths}
        print(f"{stage}: {steps} steps; generator lengths {min(lengths['generator'])}-{max(lengths['generator'])}; "
              f"steps with a length of 64 mod 128: {at_risk}")
        run = f"cr{config.rates[0]} {stage}"
        if timed and run not in timed:
            print(f"{stage}: the study did not train it (its time budget, or it stopped before).")
        elif timed:
            tokens = [sum(step_tokens) for step_tokens in zip(*(lengths[f"{name} tokens"] for name in trained))]
            fit = step_cost_fit(timed[run]["step_seconds"], tokens)
            results["stages"][stage]["step_cost"] = fit
            print(f"{stage}: a step costs {fit['fixed_s']} s plus {fit['per_1k_tokens_s']} s per 1,000 padded tokens "
                  f"(R2 {fit['r2']}; mean {fit['mean_step_s']} s at {fit['mean_tokens']} tokens; the steps held "
                  f"{fit['tokens_range'][0]}-{fit['tokens_range'][1]} tokens, so the fixed part is an extrapolation)")
    Path(lengths_output.output).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

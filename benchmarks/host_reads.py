"""How often a training step reads a device value on the host, per stage: on a GPU each such read makes the host wait
for every kernel queued before it (a sync), so the host's work stops overlapping the device's.

    python benchmarks/host_reads.py --output reads.json
    PYTHONPATH=/path/to/other/checkout python benchmarks/host_reads.py --output reads.json   # another commit's code

Each stage's trainer runs 5 steps on SmolLM2's modules narrowed to width 18 (the structure of the trained model, no
arithmetic to speak of), 2 rows per step, memories centred as the study trains them; the reads of steps 3 to 5 are
counted by `tests/testing_utils.HostReads`, here with nothing left out but the data loader's work (which reads host
tensors by design), so transformers' mask creation counts too. On the CPU nothing waits: this counts, it does not
time. Only the documents and answers come from `performance.py`; the model and trainers are whichever `modeling_clara`
and `trainers` Python imports.
"""

import collections
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import performance  # noqa: E402

from modeling_clara import ClaraForRAG  # noqa: E402
from testing_utils import HostReads  # noqa: E402
from trainers import InstructConfig, InstructTrainer, JointConfig, JointTrainer, SCPConfig, SCPTrainer  # noqa: E402

STAGES = ("scp", "instruct", "joint", "joint, documents precomputed")


@dataclass
class HostReadsConfig:
    output: str = field(metadata={"help": "The JSON file of the reads per step, by stage and by place in the code."})
    steps: int = field(default=5, metadata={"help": "Steps per stage; all but the first 2 are counted."})

    def __post_init__(self):
        if self.steps < 3:
            raise ValueError(f"--steps must be at least 3 (2 warm-up steps), got {self.steps}.")


def stage_trainer(stage: str, directory: Path, steps: int):
    base, tokenizer = performance.build_base("smollm2-narrow", performance.PerformanceConfig())
    torch.manual_seed(1)
    model = ClaraForRAG.from_base_model(
        base, tokenizer, compression_rate=32, doc_max_length=256, mse_weight=0.1, center_memories=True
    ).train()
    documents = performance.cut_to_tokens(model, performance.real_documents(40), 32)
    answers = [performance.cut_to_tokens(model, [d], 8)[0] for d in documents]
    if stage == "scp":
        rows = [{"data_type": "qa", "question": ["What is it?"], "answers": [a], "docs": [d]} if i % 2 else
                {"data_type": "paraphrase", "question": [], "answers": [a], "docs": [d]}
                for i, (d, a) in enumerate(zip(documents, answers))]
        trainer_class, config_class, options = SCPTrainer, SCPConfig, {}
    elif stage == "instruct":
        model.config.training_stage = "scp"
        rows = [{"question": "What is it?", "answer": a, "docs": [d]} for d, a in zip(documents, answers)]
        trainer_class, config_class, options = InstructTrainer, InstructConfig, {}
    else:
        model.config.training_stage = "instruct"
        rows = [{"question": "What is it?", "answer": answers[i], "docs": documents[i : i + 6], "pos_index": [0]}
                for i in range(30)]
        trainer_class, config_class = JointTrainer, JointConfig
        options = {"precompute_document_memories": stage.endswith("precomputed")}
    data = directory / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = config_class(
        output_dir=str(directory), train_file=str(data), max_steps=steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, logging_steps=steps + 1, save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True, **options,
    )
    return trainer_class(model, args)


def main(argv=None) -> int:
    (config,) = HfArgumentParser(HostReadsConfig, description=__doc__.split("\n\n")[0]).parse_args_into_dataclasses(argv)
    reads = HostReads()
    reads.EXEMPT = ("torch/utils/data/",)

    class FromTheThirdStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            reads.recording = state.global_step >= 2

        def on_step_end(self, args, state, control, **kwargs):
            reads.recording = state.global_step < args.max_steps

    counted = config.steps - 2
    results = {}
    for stage in STAGES:
        reads.sites = []
        with tempfile.TemporaryDirectory() as directory:
            trainer = stage_trainer(stage, Path(directory), config.steps)
            trainer.add_callback(FromTheThirdStep())
            with reads:
                trainer.train()
        sites = collections.Counter(reads.sites)
        results[stage] = {"per_step": round(len(reads.sites) / counted, 2),
                          "sites": {site: round(count / counted, 2) for site, count in sites.most_common()}}
        print(f"{stage}: {results[stage]['per_step']} reads per step")
    Path(config.output).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

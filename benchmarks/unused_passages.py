"""A finished study's models measured again on many more unseen questions: those of the train-split passages the
study did not train on.

A CPU study trains on the first `--train_passages` of its train split (256 of 960 in docs/diagnosis.md's cut
setting) and measures on `--held_out` passages (40 there: 75 questions, where one question moves cover by 1.3
points). The train split's remaining passages were never read by any stage, so their questions are held out just
the same. This script cuts them as the study cuts its passages (`--doc_max_length` tokens, dropping the QA pairs the
cut made unanswerable), takes the first `questions_per_passage` questions of each, and measures, on the same
questions: closed-book and text RAG (the bare base), and each saved model of the study (`model_after_stage1`,
`_stage2`, `_stage3` of each rate): EM, token F1, cover, and the teacher-forced answer loss from the passage's own
memories against another's (the study's `memory_use`). Results go to `<study>/unused_passages.json`.

    python benchmarks/unused_passages.py --study_dir runs/study --passages 300   # --help: the rest

`--take last` asks about the train split's last passages instead of the first past `--train_passages`: the same
questions for studies that trained on different numbers of passages (results in `unused_passages_last.json`).
"""

import datetime
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

from reproduce import (
    StudyConfig,
    answer_quality,
    checkpoint_folder,
    cut_to_compressed_text,
    evaluation_rows,
    finished_results,
    held_out_answer_rows,
    memory_use,
    rate_and_stage,
    split_rows,
    text_use,
)
from transformers import HfArgumentParser

from evaluation.harness import default_device, machine_description
from modeling_clara import ClaraForRAG, load_base_tokenizer
from trainers.collators import InstructCollator

logger = logging.getLogger("unused_passages")

Take = Literal["first", "last"]


@dataclass
class UnusedPassagesConfig:
    study_dir: str = field(metadata={"help": "Output folder of a finished `benchmarks/reproduce.py` run."})
    passages: int = field(default=300, metadata={"help": "How many of the unused train-split passages to ask about."})
    take: Take = field(
        default="first",
        metadata={"help": "Which of them: the 'first' past the study's --train_passages, or the train split's 'last' "
                          "(the same passages for studies that differ in --train_passages)."},
    )
    models: list[str] = field(
        default_factory=list,
        metadata={"help": "The saved models to measure, by the study's names (e.g. 'cr16 stage 2'); default: all."},
    )
    baselines: bool = field(default=True, metadata={"help": "Also measure closed-book and text RAG."})
    output: str | None = field(
        default=None,
        metadata={"help": "Results file (default: <study_dir>/unused_passages.json; with --take last, "
                          "unused_passages_last.json)."},
    )

    def __post_init__(self):
        if self.passages < 2:
            raise ValueError(f"--passages must be >= 2 (memory use compares two passages), got {self.passages}.")
        if self.take not in get_args(Take):
            raise ValueError(f"--take must be one of {get_args(Take)}, got {self.take!r}.")
        if not (Path(self.study_dir) / "results.json").is_file():
            raise FileNotFoundError(f"No results.json in --study_dir {self.study_dir}: run benchmarks/reproduce.py first.")


def unused_questions(study: StudyConfig, count: int, take: Take, path: Path) -> dict:
    """Writes the evaluation file of `count` train-split passages past the study's `train_passages` (the `first` of
    them or the split's `last`), cut as the study cuts them; returns its path and counts."""
    train, _ = split_rows(study.data, study.held_out, study.seed)
    unused = train[study.train_passages :]
    if len(unused) < count:
        raise ValueError(
            f"--passages {count}: the study's train split has {len(unused)} passages it did not train on."
        )
    unused = unused[:count] if take == "first" else unused[-count:]
    unused, counts = cut_to_compressed_text(unused, load_base_tokenizer(study.base), study.doc_max_length)
    rows = evaluation_rows(unused, study.questions_per_passage)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return {"eval": str(path), "counts": {"passages": len(unused), "questions": len(rows), **counts}}


def saved_models(study_dir: Path, results: dict, names: list[str]) -> list[tuple[str, Path]]:
    """`(name, folder)` of each model the study's finished training stages saved, in the study's naming ("cr16
    stage 1"); only `names`, if any."""
    found = {}
    for phase in results["finished_phases"]:
        rate, stage = rate_and_stage(phase)
        if stage != "untrained":
            found[f"cr{rate} {stage}"] = checkpoint_folder(study_dir, rate, stage)
    if not found:
        raise FileNotFoundError(f"{study_dir} finished no training stage (finished: {results['finished_phases']}).")
    unknown = [name for name in names if name not in found]
    if unknown:
        raise ValueError(f"--models {unknown}: {study_dir} has {list(found)}.")
    return [(name, folder) for name, folder in found.items() if not names or name in names]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (config,) = HfArgumentParser(UnusedPassagesConfig).parse_args_into_dataclasses(argv, return_remaining_strings=False)
    study_dir = Path(config.study_dir)
    study_results = finished_results(study_dir, "--study_dir", "run the study first")
    study = StudyConfig(**study_results["settings"])
    suffix = "" if config.take == "first" else f"_{config.take}"  # each choice its own files: none overwrites another
    output = Path(config.output or study_dir / f"unused_passages{suffix}.json")
    models = saved_models(study_dir, study_results, config.models)
    data = unused_questions(study, config.passages, config.take, study_dir / "data" / f"eval_unused{suffix}.jsonl")
    device = default_device()
    results = {"settings": asdict(config), "study": asdict(study), "machine": machine_description(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "data": data["counts"], "answers": {}, "memory_use": {}}
    logger.info("%d questions on %d unused passages; models: %s", data["counts"]["questions"],
                data["counts"]["passages"], ", ".join(name for name, _ in models))
    rows = held_out_answer_rows(data)
    for index, (name, folder) in enumerate(models):
        model = ClaraForRAG.from_pretrained(folder, base_model=study.base).to(device).eval()
        if index == 0 and config.baselines:
            for name_in_report, baseline in (("closed-book", "closed-book"), ("text RAG", "text")):  # as the study names them
                results["answers"][name_in_report] = answer_quality(model, study, data["eval"], baseline)
                logger.info("%s: %s", name_in_report, results["answers"][name_in_report])
            results["memory_use"]["text RAG (the bare base reads the text)"] = text_use(
                model, rows, study.eval_batch_size, study.max_length
            )
        results["answers"][name] = answer_quality(model, study, data["eval"], "clara")
        results["memory_use"][name] = memory_use(
            model, InstructCollator(model.processor, study.max_length), rows, study.eval_batch_size
        )
        logger.info("%s: %s, memory use %s", name, results["answers"][name], results["memory_use"][name])
        output.write_text(json.dumps(results, indent=2))
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cover against answer length: how long each system answers, and what its cover is with answers cut short.

Cover counts an answer that holds every gold token anywhere in it, so it favours long answers: a sentence that
names several of a passage's people covers a question about one of them. This reads `clara evaluate` reports of the
same examples (the same gold answers in the same order; the questions may differ, e.g. by an added instruction)
and writes, for each, the answers' length in words and EM, token F1 and cover, whole and with every answer cut to
its first N words. The scores are the `clara_qa` metric's (the best over gold aliases). Cutting from the start
penalises answers that repeat the question before answering; asking the base for short answers is the fairer
control (docs/diagnosis.md, Finding 21).

    python benchmarks/answer_length.py --reports "text RAG=text.json" "CLaRa=clara.json" --output lengths.json
"""

import datetime
import json
import logging
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import evaluate
from transformers import HfArgumentParser

from evaluation.harness import METRIC_PATH

logger = logging.getLogger("answer_length")


@dataclass
class AnswerLengthConfig:
    reports: list[str] = field(
        metadata={"help": "NAME=PATH of each `clara evaluate` report to compare; all of the same examples."}
    )
    words: list[int] = field(
        default_factory=lambda: [3, 5, 8, 12, 16], metadata={"help": "Cut every answer to its first N words."}
    )
    output: str | None = field(default=None, metadata={"help": "Write the results as JSON here too."})

    def __post_init__(self):
        malformed = [report for report in self.reports if "=" not in report or not report.split("=", 1)[0].strip()]
        if malformed or not self.reports:
            raise ValueError(f"--reports {malformed or self.reports}: name each report as NAME=PATH.")
        if len(self.named_reports()) < len(self.reports):
            raise ValueError(f"--reports {self.reports}: a name repeats; each report needs its own.")
        if any(words < 1 for words in self.words):
            raise ValueError(f"--words {self.words}: an answer is cut to at least 1 word.")

    def named_reports(self) -> dict[str, Path]:
        return {name.strip(): Path(path) for name, path in (report.split("=", 1) for report in self.reports)}


def cut(answer: str, words: int) -> str:
    return " ".join(answer.split()[:words])


def load_predictions(path: Path) -> list[dict]:
    report = json.loads(path.read_text())
    if not report.get("predictions"):
        raise ValueError(f"{path}: no per-example 'predictions'; pass a report written by `clara evaluate --output`.")
    return report["predictions"]


def compare(reports: dict[str, list[dict]], words: list[int]) -> dict:
    """Per report: the answers' length, and their scores whole and cut to each number of words."""
    names = list(reports)
    gold = [example["answers"] for example in reports[names[0]]]
    for name in names[1:]:
        if [example["answers"] for example in reports[name]] != gold:
            raise ValueError(f"Reports {names[0]!r} and {name!r} do not hold the same examples in the same order.")
    metric = evaluate.load(str(METRIC_PATH))

    def scores(answers: list[str]) -> dict[str, float]:
        computed = metric.compute(predictions=answers, references=gold)
        return {name: round(computed[name], 2) for name in ("exact_match", "f1", "cover")}

    results = {"examples": len(gold), "reports": {}}
    for name, examples in reports.items():
        answers = [example["prediction"] for example in examples]
        lengths = [len(answer.split()) for answer in answers]
        results["reports"][name] = {
            "mean_words": round(statistics.mean(lengths), 2),
            "median_words": statistics.median(lengths),
            "whole answers": scores(answers),
            **{f"first {n} words": scores([cut(answer, n) for answer in answers]) for n in words},
        }
    return results


def markdown(results: dict) -> str:
    cuts = [key for key in next(iter(results["reports"].values())) if key.startswith("first ")]
    lines = ["| report | mean words | EM | token F1 | cover | " + " | ".join(f"cover, {c}" for c in cuts) + " |",
             "|---|---|---|---|---|" + "---|" * len(cuts)]
    for name, row in results["reports"].items():
        whole = row["whole answers"]
        lines.append(f"| {name} | {row['mean_words']} | {whole['exact_match']} | {whole['f1']} | {whole['cover']} | "
                     + " | ".join(str(row[c]["cover"]) for c in cuts) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (config,) = HfArgumentParser(AnswerLengthConfig).parse_args_into_dataclasses(argv, return_remaining_strings=False)
    reports = {name: load_predictions(path) for name, path in config.named_reports().items()}
    results = compare(reports, config.words)
    print(markdown(results))
    if config.output:
        results.update(settings=asdict(config),
                       date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        Path(config.output).write_text(json.dumps(results, indent=2, ensure_ascii=False))
        logger.info("Wrote %s.", config.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`clara`: the command line. Commands: `demo`, `train scp|instruct|joint`, `synthesize`, `prose`, `evaluate`,
`compress`, `ask`, `push`, `convert-official`.

Each command's options are the fields of its config dataclasses (`clara COMMAND --help` lists every one, with its
help and default); `train` also reads a YAML recipe of those fields with `--config`, and flags override it.
"""

import argparse
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["main", "parse_train_args"]

@dataclass
class SynthesizeArguments:
    """Input and output of `clara synthesize`."""

    input: str = field(metadata={"help": "JSONL, .txt, a folder of .txt, or a saved datasets folder."})
    output: str = field(metadata={"help": "Output JSONL (appended to; a rerun resumes)."})
    text_field: str | None = field(
        default=None, metadata={"help": "JSONL field with the passage (default: text/contents/document/passage/docs)."}
    )
    id_field: str = field(
        default="id", metadata={"help": "JSONL field with the passage id (ids must be unique; default: made from the text)."}
    )
    shard: str = field(default="0/1", metadata={"help": "i/n: process only this machine's share of the passages."})


@dataclass
class ProseArguments:
    """Output and filter of `clara prose`."""

    output: str = field(metadata={"help": "Output JSONL of SCP reconstruction rows (overwritten)."})
    min_words: int = field(default=40, metadata={"help": "Shortest passage kept, in words (an entry's or section's title not counted)."})
    limit: int | None = field(default=None, metadata={"help": "Write at most this many passages (the first ones)."})
    source: str = field(
        default="stdlib",
        metadata={"help": "stdlib: the Python standard library's docstrings (PSF License 2.0, shipped with Python); "
                  "foldoc: the Free On-line Dictionary of Computing (GNU FDL), or jargon: the Jargon File (public "
                  "domain), as Debian's dict-foldoc and dict-jargon packages install them; python-docs: Python's "
                  "documentation (PSF License 2.0), from the sources Debian's python3-doc package installs."},
    )
    root: str | None = field(
        default=None,
        metadata={"help": "The folder to read: a standard library folder (default: this Python's), the dictd "
                  "folder that holds foldoc.index or jargon.index (default: /usr/share/dictd), or the documentation's "
                  "sources (default: /usr/share/doc/python3/html/_sources). scripts/get_debian_prose.sh puts FOLDOC and "
                  "the Jargon File in .cache/debian_prose, the documentation in .cache/debian_prose/python-docs."},
    )


def _parse(argv: list[str], config_classes, prog: str, description: str, log_level: int = logging.INFO):
    """A command's config dataclasses from `argv` (unknown options and abbreviations raise), and logging set up."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(config_classes, prog=prog, allow_abbrev=False, description=description)
    parsed = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    return parsed


def _demo(argv: list[str]) -> int:
    from .demo import DemoArguments, run_demo

    (args,) = _parse(
        argv, DemoArguments, "clara demo",
        "Compress a small real corpus (the Python Language Reference shipped with Python) into a memory bank, answer "
        "questions from it with CLaRa and with text RAG side by side, with the timings.",
        logging.WARNING,
    )
    run_demo(args)
    return 0


def _prose(argv: list[str]) -> int:
    from data_synthesis.prose import check_prose_source, prose_passages, reconstruction_row

    (args,) = _parse(
        argv, ProseArguments, "clara prose",
        "Write real prose read offline (the Python standard library's docstrings, FOLDOC, the Jargon File or Python's "
        "documentation) as SCP "
        "reconstruction rows (data_type 'paraphrase', the target is the passage) for `clara train scp`.",
    )
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit must be >= 1, got {args.limit}.")
    try:
        check_prose_source(args.source, "--source")
    except ValueError as error:
        raise SystemExit(str(error)) from None
    passages = prose_passages(args.source, min_words=args.min_words, root=args.root)[: args.limit]
    with open(args.output, "w", encoding="utf-8") as output:
        output.writelines(json.dumps(reconstruction_row(p), ensure_ascii=False) + "\n" for p in passages)
    words = sum(len(p.text.split()) for p in passages)
    print(f"Wrote {len(passages)} passages ({words} words) of {args.source} prose to {args.output}.")
    return 0


def parse_train_args(stage: str, argv: list[str]):
    """`(model_args, training_config)` of a stage from `[--config RECIPE.yaml] [--field value ...]`: the recipe's
    fields, then the flags; unknown keys in either raise before anything runs."""
    from trl import TrlParser

    from trainers import STAGE_CLASSES, ClaraModelConfig

    if stage not in STAGE_CLASSES:
        raise SystemExit(f"clara train: unknown stage {stage!r}; choose from {sorted(STAGE_CLASSES)}.")
    config_class, trainer_class = STAGE_CLASSES[stage]
    parser = TrlParser(
        (ClaraModelConfig, config_class),
        prog=f"clara train {stage}",
        allow_abbrev=False,
        description=f"{trainer_class.__doc__.splitlines()[0]} Options: --config RECIPE.yaml (any of the fields "
        "below), then flags, which override the recipe.",
    )
    return parser.parse_args_and_config(args=argv)


def _train(argv: list[str]) -> int:
    from trainers import STAGE_CLASSES

    if not argv or argv[0] not in STAGE_CLASSES:
        raise SystemExit(f"usage: clara train {{{','.join(STAGE_CLASSES)}}} [--help] [--config RECIPE] [--field value ...]")
    stage = argv[0]
    model_args, config = parse_train_args(stage, argv[1:])
    trainer = STAGE_CLASSES[stage][1](args=config, model_args=model_args)
    resume = config.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        print(f"Saved the {stage} model to {config.output_dir}.")
    # Under ZeRO-3 the engine holds gloo work handles whose threads, left to interpreter exit, sometimes abort a
    # process after the model was saved (SIGABRT, seen twice in CI, once after end_training alone). So: every process
    # done, the engine destroyed and collected, then the process group destroyed, while the interpreter is alive.
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    del trainer
    accelerator.free_memory()
    accelerator.end_training()
    return 0


def _synthesize(argv: list[str]) -> int:
    from data_synthesis import (
        BackendConfig,
        BackendUnavailableError,
        SynthesisConfig,
        backend_from_config,
        run_synthesis,
    )

    args, backend_config, synthesis_config = _parse(
        argv, (SynthesizeArguments, BackendConfig, SynthesisConfig), "clara synthesize",
        "Synthesize SCP training data (QA, complex QA, paraphrases, verification) from a corpus.",
    )
    shard_index, _, num_shards = args.shard.partition("/")
    if not (shard_index.isdigit() and num_shards.isdigit()):
        raise SystemExit(f"--shard must look like i/n, got {args.shard!r}.")
    try:
        report = run_synthesis(
            args.input,
            args.output,
            backend_from_config(backend_config),
            synthesis_config,
            shard=(int(shard_index), int(num_shards)),
            text_field=args.text_field,
            id_field=args.id_field,
        )
    except BackendUnavailableError as error:
        print(f"clara synthesize: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


def _evaluate(argv: list[str]) -> int:
    from evaluation import EvaluationConfig, evaluate_model, markdown_report

    (config,) = _parse(
        argv, EvaluationConfig, "clara evaluate",
        "Answer quality (EM, token F1, cover) and Recall@k of a CLaRa model or a baseline.",
    )
    report = evaluate_model(config)
    print(markdown_report([report]), end="")
    return 0


@dataclass
class CompressArguments:
    """What `clara compress` compresses, and where the memory bank goes."""

    model: str = field(metadata={"help": "A ClaraForRAG folder, or 'default' for the embedded default."})
    corpus: str = field(metadata={"help": "JSONL, .txt (passages separated by blank lines), a folder of .txt, or a saved datasets folder."})
    out: str = field(metadata={"help": "The memory bank folder (a rerun resumes it)."})
    index: bool = field(default=False, metadata={"help": "Also build a FAISS index (pip install faiss-cpu)."})
    text_field: str | None = field(
        default=None, metadata={"help": "JSONL field with the text (default: text/contents/document/passage/docs)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Documents compressed at once."})
    shard_size: int = field(default=4096, metadata={"help": "Documents per shard file (the unit of memory use and resumption)."})
    dtype: str = field(default="bfloat16", metadata={"help": "Stored dtype of the memories: bfloat16 or float32."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on the CPU (under accelerate launch: one CPU process each)."})
    merge_compressor: bool = field(
        default=True,
        metadata={"help": "Compress with the compressor adapter merged into a copy of the adapted base weights: "
                  "faster, that copy's size again in memory (ClaraForRAG.merge_adapter)."},
    )


@dataclass
class AskArguments:
    """The question `clara ask` answers from a memory bank."""

    model: str = field(metadata={"help": "The ClaraForRAG folder that made the bank, or 'default'."})
    bank: str = field(metadata={"help": "A memory bank folder (clara compress)."})
    question: str = field(metadata={"help": "The question."})
    k: int = field(default=5, metadata={"help": "Documents the generator reads (the top k of the bank)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated at most."})
    json: bool = field(default=False, metadata={"help": "Print one JSON object (answer, documents, scores)."})
    merge_generator: bool = field(
        default=True,
        metadata={"help": "Generate with the generator adapter merged into a copy of the adapted base weights: faster "
                  "decoding, that copy's size again in memory (ClaraForRAG.merge_adapter)."},
    )


def _compress(argv: list[str]) -> int:
    from accelerate import PartialState

    from data_synthesis import read_passages
    from evaluation import load_model

    (args,) = _parse(
        argv, CompressArguments, "clara compress",
        "Compress a corpus once into a memory bank (sharded safetensors, resumable; under accelerate launch each "
        "process takes its share).",
    )
    state = PartialState(cpu=args.use_cpu)
    model = load_model(args.model).to(state.device)
    if args.merge_compressor:
        model.merge_adapter("compressor")
    counts = Counter()
    bank = model.compress_corpus(
        read_passages(args.corpus, args.text_field, counts=counts), args.out, args.batch_size, args.shard_size,
        args.dtype, show_progress=True,
    )
    if counts:
        logging.getLogger("clara").warning("Corpus lines skipped: %s.", dict(counts))
    if args.index and state.is_main_process:
        bank.build_index()
    if state.is_main_process:
        print(f"Memory bank at {args.out}: {len(bank)} documents, memories {tuple(bank.memories.shape)} "
              f"{bank.manifest['dtype']}{', FAISS index' if args.index else ''}.")
    return 0


def _ask(argv: list[str]) -> int:
    from evaluation import load_model
    from modeling_clara import MemoryBank

    (args,) = _parse(
        argv, AskArguments, "clara ask",
        "Answer a question from a memory bank: the query reasoner ranks the bank, the generator reads the top k "
        "documents' memories.",
        logging.WARNING,
    )
    bank = MemoryBank.load(args.bank)
    model = load_model(args.model)
    if args.merge_generator:
        model.merge_adapter("generator")
    (answer,), scores, indices = model.answer_from_bank([args.question], bank, args.k, max_new_tokens=args.max_new_tokens)
    documents = [
        {"rank": rank + 1, "score": round(score, 4), "id": bank.ids[index], "text": bank.texts[index]}
        for rank, (score, index) in enumerate(zip(scores[0].tolist(), indices[0].tolist()))
    ]
    if args.json:
        print(json.dumps({"question": args.question, "answer": answer, "documents": documents}, ensure_ascii=False))
        return 0
    print(f"Q: {args.question}\nA: {answer}\n\nRetrieved ({len(bank)} documents in the bank):")
    for document in documents:
        print(f"  {document['rank']}. [{document['score']:.3f}] {document['id']}: {document['text'][:160]}")
    return 0


@dataclass
class PushArguments:
    """What `clara push` publishes."""

    folder: str = field(metadata={"help": "A saved ClaraForRAG folder (a training stage's output, clara convert-official, ...)."})
    repo_id: str = field(metadata={"help": "The Hub repository, e.g. my-org/clara-smollm2-cr16."})
    private: bool = field(default=False, metadata={"help": "Create the repository private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (created if needed; default main)."})
    eval_report: list[str] = field(default_factory=list, metadata={"help": "clara evaluate --output files for the card's results table."})
    license: str = field(default="apache-2.0", metadata={"help": "License in the card's metadata (the base model's)."})
    datasets: list[str] = field(default_factory=list, metadata={"help": "Hub ids of the training datasets, for the card."})


def _push(argv: list[str]) -> int:
    from modeling_clara.release import push_release

    (args,) = _parse(
        argv, PushArguments, "clara push",
        "Upload a saved CLaRa to the Hub with a model card made from its config, training record and evaluation "
        "reports (the token is read from HF_TOKEN or `hf auth login`).",
    )
    commit = push_release(args.folder, args.repo_id, args.private or None, args.revision, args.eval_report,
                          args.license, args.datasets)
    print(f"Pushed {args.folder} to https://huggingface.co/{args.repo_id} (commit {commit}).")
    return 0


def _convert_official(argv: list[str]) -> int:
    from modeling_clara.convert_official_clara import convert_official_checkpoint

    parser = argparse.ArgumentParser(
        prog="clara convert-official",
        allow_abbrev=False,
        description="Convert a checkpoint of the reference release (apple/CLaRa-7B-Base, -Instruct or -E2E, one "
        "compression-* folder, downloaded) into a ClaraForRAG folder (adapter-only, the base referenced).",
    )
    parser.add_argument("source", help="The reference checkpoint folder (config.json, adapters.pth, decoder_first_last_layers.pth).")
    parser.add_argument("destination", help="Output folder for the ClaraForRAG checkpoint.")
    parser.add_argument("--base", default=None, help="The base LLM (path or hub id; default: the checkpoint's decoder_model_name).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = convert_official_checkpoint(args.source, args.destination, base=args.base)
    print(f"Converted {args.source} ({model.config.training_stage}, {model.config.num_memory_tokens} memory tokens) to "
          f"{args.destination}.")
    return 0


COMMANDS = {
    "demo": (_demo, "Compress a small real corpus into a memory bank; answer from it with CLaRa and text RAG, timed."),
    "train": (_train, "Train one stage: clara train scp|instruct|joint [--config RECIPE] [--field value ...]."),
    "synthesize": (_synthesize, "Synthesize SCP training data from a corpus with a local or served LLM."),
    "prose": (_prose, "Write real prose read offline (stdlib docstrings, FOLDOC, Jargon File, Python's docs) as reconstruction rows."),
    "evaluate": (_evaluate, "Evaluate a CLaRa model or a baseline: EM, F1, cover, Recall@k; JSON + markdown report."),
    "compress": (_compress, "Compress a corpus once into a memory bank (resumable, sharded; accelerate launch splits it)."),
    "ask": (_ask, "Answer a question from a memory bank: rank, read the top k memories, generate."),
    "push": (_push, "Upload a saved CLaRa to the Hub with a generated model card."),
    "convert-official": (_convert_official, "Convert a checkpoint of the reference release into a ClaraForRAG folder."),
}


def _overview() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clara", description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _overview()
        if argv and argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0
        parser.error(f"choose a command from {list(COMMANDS)}" + (f", not {argv[0]!r}" if argv else ""))
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())

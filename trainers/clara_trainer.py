"""What the three stage trainers share: model loading and preparation, loss normalisation over the accumulated
batch, separate loss logging, retrieval metrics and saving complete `ClaraForRAG` checkpoints."""

import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import Trainer, set_seed
from transformers.trainer_utils import get_last_checkpoint

from modeling_clara import ClaraForRAG
from modeling_clara.modeling_clara import ADAPTER_WEIGHTS_FILE

from .clara_config import ClaraTrainingConfig
from .data import CHECK_CHUNK_ROWS, load_rows
from .model_config import ARCHITECTURE_FIELDS, ClaraModelConfig

__all__ = ["ClaraTrainer", "row_lengths", "training_attention"]

logger = logging.getLogger(__name__)

TRUNCATION_METRICS = ("truncated_documents", "truncated_questions", "truncated_answers")
# The text reader's inputs, in the batches of a stage that distils from the text (see `TextDistillationConfig`).
TEXT_READER_INPUTS = ("text_input_ids", "text_attention_mask", "text_labels", "text_logits_to_keep")
# `train_sampling_strategy` values whose samplers read each row's length (`length_column_name`).
LENGTH_SAMPLING_STRATEGIES = ("group_by_length", "batch_rebalance")
# Written into every checkpoint and output: what a resumed run must match, and the recipe for the model card.
TRAINING_RECORD = "clara_training.json"
RECIPE_FIELDS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "max_length", "weight_decay", "max_grad_norm", "seed", "bf16", "distillation_weight",
    "train_sampling_strategy",
)


@contextmanager
def training_attention(cudnn_attention: bool):
    """The context training runs in: with `cudnn_attention` False, `scaled_dot_product_attention` may not use
    cuDNN's kernel (see `ClaraTrainingConfig.cudnn_attention`); the kernel of a forward decides its backward's. The
    other kernels stay as the user set them, and the setting is restored even when training raises."""
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(enabled and cudnn_attention)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)


class ClaraTrainer(Trainer):
    """Base of [`SCPTrainer`], [`InstructTrainer`] and [`JointTrainer`]; not used directly.

    Subclasses set `stage`, `previous_stages` (checkpoints they start from), `trainable_components`, and implement
    `build_collator` (and, where the stage changes adapters first, `prepare_model`).

    Args:
        model: a `ClaraForRAG`; a path or name (stands for `model_args.model_name_or_path`); or None to load
            `model_args.model_name_or_path`.
        args: the stage's config.
        train_dataset, eval_dataset: canonical rows (`trainers.load_rows`); default: `args.train_file` / `eval_file`.
        model_args: [`ClaraModelConfig`]: the model to load and the `ClaraConfig` fields to set.

    - The trainable parameters are fixed before the optimizer is built (`ClaraForRAG.set_trainable_components`).
    - The loss is the model's own (`ClaraForRAG.forward`): the CE normalised by the labelled-token count and the MSE
      by the document count of the whole accumulated (and, by default, global) batch, so gradient accumulation and
      data parallelism give the gradient of one large batch.
    - With `distillation_weight` (stages 1 and 2, [`TextDistillationConfig`]), `distillation_weight` x the KL from the
      bare base reading the documents' text to the generator, per answer token, joins the loss, divided like the CE.
    - `lm_loss`, `mse_loss`, `distillation_loss` (and in stage 3 `recall@k`, `precision@k`) are logged beside
      `loss`, and the fractions of documents, questions and answers that were truncated to fit.
    - A saved checkpoint records `training_stage` in its config and is a complete `ClaraForRAG`; it also holds
      `clara_training.json` (stage, training data fingerprint), and resuming from a checkpoint of another stage or
      made on other training data raises before training.
    - Training does not use cuDNN's attention kernel unless `cudnn_attention` (its backward's NaN gradients on
      H100/H200, pytorch/pytorch#196678).
    - Every row of `train_file` / `eval_file` is checked when it is read, including what the stage's collator will
      make of it (a prompt that leaves no room for the answer in `max_length`), so no row fails mid-run.
    - `train_sampling_strategy="group_by_length"` (or `"batch_rebalance"`) works on the raw rows: unless the rows
      have a `length_column_name` column, each row's length is what its batch's sequences hold for it, counted by
      the stage's collator (`row_lengths`), and added as that column before training.
    """

    stage: str = ""
    previous_stages: tuple[str | None, ...] = ()
    trainable_components: tuple[str, ...] = ()

    def __init__(
        self,
        model: ClaraForRAG | str | None = None,
        args: ClaraTrainingConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        model_args: ClaraModelConfig | None = None,
        **kwargs,
    ):
        if args is None:
            raise ValueError(f"{type(self).__name__} needs its config (args=...).")
        model_args = model_args if model_args is not None else ClaraModelConfig()
        if isinstance(model, str):
            model_args, model = dataclasses.replace(model_args, model_name_or_path=model), None
        set_seed(args.seed)  # new adapters and added-token embeddings are drawn before the Trainer seeds anything
        if model is None:
            if model_args.model_name_or_path is None:
                raise ValueError("Pass a model or set model_name_or_path.")
            model = self.load_model(model_args)
        self.check_stage(model)
        self.check_settings(model, args)
        model_args.apply_to(model)
        self.prepare_model(model, args)
        model.set_trainable_components(self.trainable_components)
        self.training_record = {
            "stage": self.stage,
            "train_file": _fingerprint(args.train_file),
            # For the model card: the settings that make the recipe (the model's own are in config.json).
            "recipe": {name: getattr(args, name) for name in RECIPE_FIELDS if hasattr(args, name)}
            | {"world_size": args.world_size},
        }
        if train_dataset is None and args.train_file:
            train_dataset = self.load_data(args.train_file, model, args)
        if eval_dataset is None and args.eval_file:
            eval_dataset = self.load_data(args.eval_file, model, args)
        collator = kwargs.setdefault("data_collator", self.build_collator(model, args, [train_dataset, eval_dataset]))
        if args.train_sampling_strategy in LENGTH_SAMPLING_STRATEGIES:
            train_dataset, eval_dataset = (
                _with_lengths(rows, collator, args) for rows in (train_dataset, eval_dataset)
            )
        kwargs.setdefault("processing_class", model.processor)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._parameter_count = None  # counted by the first floating_point_ops()

    # ---------------------------------------------------------------- stage hooks

    def load_model(self, model_args: ClaraModelConfig) -> ClaraForRAG:
        """The previous stage's checkpoint (stage 1 overrides this to build a new model)."""
        return ClaraForRAG.from_pretrained(model_args.model_name_or_path)

    def load_data(self, path: str, model: ClaraForRAG, args: ClaraTrainingConfig, min_documents: int = 1):
        """The stage's rows of `path`, each checked for its format and by the stage's collator."""
        checker = self.build_collator(model, args, datasets=None)
        return load_rows(path, self.stage, args.skip_malformed_rows, min_documents, check_rows=checker.check_rows)

    def check_stage(self, model: ClaraForRAG) -> None:
        found = model.config.training_stage
        if found not in self.previous_stages:
            expected = " or ".join("an untrained model" if s is None else f"a {s!r} checkpoint" for s in self.previous_stages)
            raise ValueError(f"Stage {self.stage!r} starts from {expected}, but this model's training_stage is {found!r}.")

    @staticmethod
    def check_settings(model: ClaraForRAG, args: ClaraTrainingConfig) -> None:
        """Refuses to write over the checkpoint being trained, sequences longer than the base's context, and
        batches that cannot centre memories."""
        source = model.name_or_path
        if source and Path(source).is_dir() and Path(source).resolve() == Path(args.output_dir).resolve():
            raise ValueError(
                f"output_dir {args.output_dir} is the checkpoint this run starts from: saving would overwrite it. "
                "Choose another output_dir."
            )
        context = getattr(model.config.text_config, "max_position_embeddings", None)
        if context is not None and args.max_length > context:
            raise ValueError(
                f"max_length={args.max_length} exceeds the base model's context ({context} positions): set "
                f"max_length to at most {context}."
            )
        if model.config.center_memories and args.per_device_train_batch_size < 2:
            raise ValueError(
                "center_memories trains on the mean over each batch's documents: set per_device_train_batch_size to "
                f"at least 2 (got {args.per_device_train_batch_size})."
            )

    def check_checkpoint(self, checkpoint: str) -> None:
        """A checkpoint to resume from must be this stage's, of this architecture, made on the same training data."""
        config_path, record_path = Path(checkpoint) / "config.json", Path(checkpoint) / TRAINING_RECORD
        if not config_path.is_file() or not record_path.is_file():
            raise ValueError(f"{checkpoint} is not a checkpoint of a CLaRa training run (no config.json / {TRAINING_RECORD}).")
        saved, record = json.loads(config_path.read_text()), json.loads(record_path.read_text())
        if record["stage"] != self.stage:
            raise ValueError(
                f"{checkpoint} is a checkpoint of stage {record['stage']!r}; this is stage {self.stage!r}. Resume it "
                f"with `clara train {record['stage']}`, or start this stage from its finished output."
            )
        config = self.accelerator.unwrap_model(self.model).config
        changed = [name for name in ARCHITECTURE_FIELDS if saved.get(name) != getattr(config, name)]
        if changed:
            raise ValueError(f"{checkpoint} has another architecture than this model: {changed} differ.")
        if record["train_file"] != self.training_record["train_file"]:
            raise ValueError(
                f"{checkpoint} was trained on {record['train_file']}, this run reads {self.training_record['train_file']}: "
                "a resumed run must read the same data to continue where it stopped."
            )

    def prepare_model(self, model: ClaraForRAG, args: ClaraTrainingConfig) -> None:
        """Stage-specific changes to the adapters before training."""

    def build_collator(self, model: ClaraForRAG, args: ClaraTrainingConfig, datasets: list | None):
        """The stage's collator; `datasets` (train and eval, either may be None) for collators that precompute from
        them, None for a collator that only checks rows (`load_data`)."""
        raise NotImplementedError

    @staticmethod
    def text_max_length(model: ClaraForRAG, args) -> int | None:
        """For the collator of a stage that distils from the text: the longest text sequence the base reads (its
        context); None when the stage does not distil."""
        if args.distillation_weight == 0:
            return None
        return getattr(model.config.text_config, "max_position_embeddings", None) or sys.maxsize

    # ---------------------------------------------------------------- loss and metrics

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also counts the real documents compressed with gradients in the accumulated (and, like the labelled
        tokens, global) batch: the model divides the summed MSE by it."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        compressed = [batch for batch in batch_samples if "document_input_ids" in batch]
        if compressed:
            count = sum(_real_documents(batch) for batch in compressed)  # a tensor on the device, or a Python int
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(torch.as_tensor(count, device=device)).sum()
            for batch in compressed:
                batch["num_documents_in_batch"] = count
        return batch_samples, num_items_in_batch

    def floating_point_ops(self, inputs: dict) -> int:
        """The Trainer's estimate (6 x input tokens x parameters), with the parameters counted once: the Trainer asks
        every step, and counting walks every module (about 50 ms per step on SmolLM2's 210 adapted layers)."""
        if self._parameter_count is None:
            self._parameter_count = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs["input_ids"].numel() * self._parameter_count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        positive_mask = inputs.pop("positive_mask", None)
        truncation = {name: inputs.pop(name) for name in TRUNCATION_METRICS if name in inputs}
        text_inputs = {name: inputs.pop(name) for name in TEXT_READER_INPUTS if name in inputs}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if text_inputs:
            distillation = self._distillation_loss(model, inputs, outputs, text_inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # As `Trainer.compute_loss` scales the CE: the global token count divides each rank's sum.
                distillation = distillation * self.accelerator.num_processes
            loss = loss + self.args.distillation_weight * distillation
        self._record_metrics(model, inputs, outputs, positive_mask, num_items_in_batch)
        for name, fraction in truncation.items():
            self._metrics["train" if model.training else "eval"][name].append((fraction.detach(), 1))
        return (loss, outputs) if return_outputs else loss

    def _distillation_loss(self, model, inputs, outputs, text_inputs, num_items_in_batch) -> torch.Tensor:
        """KL(text reader || generator) summed over the answer tokens the generator is trained on, divided by the
        accumulated batch's labelled tokens like the CE (a mean without them). The text reader's answers are never
        cut, so the generator's answer tokens, cut or not by `max_length`, are the first of the text reader's."""
        # The generator's logits may be of the last positions only (`logits_to_keep`): its labels from the second.
        answer = inputs["labels"][:, -outputs.logits.shape[1] :][:, 1:] != -100
        text_answer = text_inputs["text_labels"][:, 1:] != -100
        text_answer &= text_answer.cumsum(-1) <= answer.sum(-1, keepdim=True)
        # The text reader's LM head runs on the positions from the one that predicts its earliest answer token on
        # (the collator counts them on the host; the last is dropped below, as for the generator).
        keep = text_inputs["text_logits_to_keep"] or text_inputs["text_labels"].shape[1]  # 0: every position
        precision = torch.promote_types(outputs.logits.dtype, torch.float32)  # bf16 logits compared in float32
        with torch.no_grad():
            text_logits = self.accelerator.unwrap_model(model).text_logits(
                text_inputs["text_input_ids"], text_inputs["text_attention_mask"], logits_to_keep=keep
            )
            text_log_probs = torch.log_softmax(text_logits[:, :-1][text_answer[:, -(keep - 1) :]].to(precision), dim=-1)
        log_probs = torch.log_softmax(outputs.logits[:, :-1][answer].to(precision), dim=-1)
        per_token = F.kl_div(log_probs, text_log_probs, reduction="none", log_target=True).sum(-1)
        self._metrics["train" if model.training else "eval"]["distillation_loss"].append((per_token.detach().mean(), 1))
        return per_token.mean() if num_items_in_batch is None else per_token.sum() / num_items_in_batch

    @torch.no_grad()
    def _record_metrics(self, model, inputs, outputs, positive_mask, num_items_in_batch) -> None:
        # Values stay tensors on the device until `log`: reading one (.item()) each step would make the host wait
        # for the forward pass before it can queue the backward.
        metrics = self._metrics["train" if model.training else "eval"]
        lm_loss = outputs.lm_loss.detach()
        if num_items_in_batch is not None:
            # Back to this micro-batch's own mean per labelled token.
            local_tokens = (inputs["labels"][..., 1:] != -100).sum().clamp(min=1)
            lm_loss = lm_loss * num_items_in_batch / local_tokens
        metrics["lm_loss"].append((lm_loss, 1))
        if outputs.mse_loss is not None:
            mse_loss = outputs.mse_loss.detach()
            if "num_documents_in_batch" in inputs:
                mse_loss = mse_loss * inputs["num_documents_in_batch"] / _real_documents(inputs)
            metrics["mse_loss"].append((mse_loss, 1))
        if outputs.selected_indices is not None and positive_mask is not None:
            # Over the rows with a positive: selecting them instead would count them on the host.
            positives = positive_mask.sum(-1)
            has_positive = positives > 0
            hits = positive_mask.gather(1, outputs.selected_indices).sum(-1).float()
            k = outputs.selected_indices.shape[-1]
            rows = has_positive.sum()
            metrics[f"recall@{k}"].append(((hits / positives.clamp(min=1)).sum(), rows))
            metrics[f"precision@{k}"].append(((hits / k).sum(), rows))

    def _recorded_metrics(self, mode: str, prefix: str) -> dict[str, float]:
        """The means of what was recorded in `mode` since the last call, over every process. Each record is a
        `(sum, count)` pair, tensors left on the device until here; a metric whose count is 0 (recall over batches
        without positives) is left out."""
        local = {
            name: (float(sum(total for total, _ in records)), float(sum(count for _, count in records)))
            for name, records in self._metrics[mode].items()
        }
        self._metrics[mode].clear()
        # Ranks may hold different metric names (a batch without pos_index has no recall): merge sums and counts.
        merged = defaultdict(lambda: [0.0, 0.0])
        for rank_metrics in gather_object([local]) if self.accelerator.num_processes > 1 else [local]:
            for name, (total, count) in rank_metrics.items():
                merged[name][0] += total
                merged[name][1] += count
        return {
            f"{prefix}{name}": round(total / count, 6) for name, (total, count) in sorted(merged.items()) if count > 0
        }

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        """`Trainer.evaluation_loop`, its metrics joined by the recorded ones (`eval_lm_loss`, `eval_recall@k`, ...),
        so that `evaluate()` returns them and `metric_for_best_model` may name them."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update(self._recorded_metrics("eval", f"{metric_key_prefix}_"))
        return output

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # Training's recorded metrics join the Trainer's logs; evaluation's are in its output already.
        logs = {**logs, **self._recorded_metrics("train", "")} if self.model.training else logs
        super().log(logs, *args, **kwargs)
        if self.model.training:
            self._stop_if_not_finite(logs)

    def _stop_if_not_finite(self, logs: dict[str, float]) -> None:
        """Raises when a logged loss or the gradient norm is NaN or infinite: the optimizer has then stepped with
        non-finite gradients (clipping spreads a NaN norm to all of them), so the weights are no longer finite, and
        the Trainer's `logging_nan_inf_filter` would hide it from `loss`. Checked where the values reach the host
        anyway, at each logging step. With fp16 the gradient norm is left out: its loss scaler skips the steps
        whose gradients overflow."""
        names = ["lm_loss", "mse_loss", "distillation_loss"] + ([] if self.args.fp16 else ["grad_norm"])
        bad = {name: logs[name] for name in names if name in logs and not math.isfinite(logs[name])}
        if bad:
            raise FloatingPointError(
                f"{type(self).__name__}: {bad} in the logging steps up to step {self.state.global_step}: the weights "
                f"are no longer finite, so training stops (lr {self.args.learning_rate}, bf16 {self.args.bf16}). "
                "Lower the learning rate, or look for the rows of that stretch of the data."
            )

    # ---------------------------------------------------------------- saving

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; a checkpoint to resume from (`True`: the last in `output_dir`) is checked first."""
        if resume_from_checkpoint:
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is None:
                    raise ValueError(f"No checkpoint to resume from in output_dir {self.args.output_dir}.")
            self.check_checkpoint(resume_from_checkpoint)
        with training_attention(self.args.cudnn_attention):
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        self.accelerator.unwrap_model(self.model).config.training_stage = self.stage
        return output

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Adapter-only checkpoints (the default) hold the adapters and added-token embeddings; the frozen base is
        the one this run already loaded."""
        adapter_file = Path(resume_from_checkpoint) / ADAPTER_WEIGHTS_FILE
        if not adapter_file.is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        model.load_adapter_file(adapter_file)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        self.accelerator.unwrap_model(self.model).config.training_stage = self.stage
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        (Path(output_dir) / TRAINING_RECORD).write_text(json.dumps(self.training_record, indent=2))


def row_lengths(collator, rows) -> list[int]:
    """Per row, the tokens it puts into its batch's sequences: the real (unpadded) tokens of every attention mask the
    collator makes (the generator's, its documents', the question's, the text reader's). Batches of rows of similar
    length carry little padding; this is what `group_by_length` sorts by."""
    lengths = []
    for start in range(0, len(rows), CHECK_CHUNK_ROWS):
        batch = collator([rows[i] for i in range(start, min(start + CHECK_CHUNK_ROWS, len(rows)))])
        masks = [mask.flatten(1).sum(1) for name, mask in batch.items() if name.endswith("attention_mask")]
        lengths.extend(torch.stack(masks).sum(0).tolist())
    return lengths


def _with_lengths(rows: Dataset | None, collator, args: ClaraTrainingConfig) -> Dataset | None:
    """`rows` with the `length_column_name` column that `train_sampling_strategy` reads, added if missing."""
    if rows is None:
        return None
    if not isinstance(rows, Dataset):
        raise ValueError(
            f"train_sampling_strategy={args.train_sampling_strategy!r} needs the rows as a datasets.Dataset (as "
            f"`load_rows` returns them), to add their lengths; got {type(rows).__name__}."
        )
    if args.length_column_name in rows.column_names:
        return rows
    started = time.perf_counter()
    rows = rows.add_column(args.length_column_name, row_lengths(collator, rows))
    logger.info("Counted the tokens of %d rows for train_sampling_strategy=%r in %.1f s.", len(rows),
                args.train_sampling_strategy, time.perf_counter() - started)
    return rows


def _real_documents(batch: dict) -> torch.Tensor | int:
    """How many of a batch's documents are real (each row holds at least one): counted on the device where
    `document_mask` marks them, else every document, known on the host."""
    if "document_mask" in batch:
        return batch["document_mask"].sum()
    return math.prod(batch["document_input_ids"].shape[:2])


def _fingerprint(path: str | None) -> dict | None:
    """Name, size and SHA-256 of a data file (None without one)."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"name": Path(path).name, "bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}

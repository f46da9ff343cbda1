"""Evaluation of CLaRa models and baselines: `clara evaluate`, the `clara_qa` metric module (EM, token F1, cover),
Recall@k / Precision@k, JSON and markdown reports."""

from .harness import METRIC_PATH, EvaluationConfig, evaluate_model, load_model, markdown_report, retrieval_metrics

__all__ = ["EvaluationConfig", "METRIC_PATH", "evaluate_model", "load_model", "markdown_report", "retrieval_metrics"]

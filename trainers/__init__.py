"""Trainers for CLaRa's three stages (SCP pretraining, instruction tuning, end-to-end): see the training issue."""

__all__: list[str] = []

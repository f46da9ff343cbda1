"""Key-preserving SCP data synthesis (QA, complex QA, paraphrases, verification loop): see the synthesis issue."""

__all__: list[str] = []

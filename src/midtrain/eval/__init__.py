"""Evaluation: held-out loss per domain (this module), long-context tasks and gates (evaluation issue)."""

"""Evaluation after training: per-domain bits per byte and multiple-choice tasks on runs or
exports (`evaluate.py`, `mc.py`), the learn/forget report (`report.py`) and gate
diagnostics (`diagnose.py`)."""

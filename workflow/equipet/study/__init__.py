"""Claims and their rules, the pre-registered ablation, tables and figures, run-time estimates."""

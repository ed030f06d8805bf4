"""`trainer bench`: throughput, memory and checkpoint cost of each method against full
finetuning, measured through the real trainer (`cli.py` drives, `plan.py` chooses the runs,
`runs.py` launches them, `report.py` derives the ratios)."""

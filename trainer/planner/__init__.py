"""`trainer plan`: predict per-rank memory and step time for each ZeRO choice, before queueing a job.

shape.py reads the backbone's size on the meta device, trace.py measures one micro batch's
activations on fake tensors, memory.py and timing.py turn them and the DeepSpeed JSON's own
values into terms, cli.py prints the table, measure.py checks it against real runs.
"""

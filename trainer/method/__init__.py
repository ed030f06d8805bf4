"""The method: what is added to a frozen backbone and the loss that keeps it neutral.

`adapter.py` holds the parallel gated adapter's forward (the one definition, also shipped
inside exported model directories), `extend.py` injects adapters / LoRA / full finetuning
into a Hugging Face model, and `losses.py` turns the blocks' records into the local loss.
Nothing here knows about DeepSpeed's engine, data or checkpoints.
"""

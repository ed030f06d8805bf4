"""RE-Adapt / LoRE-Adapt: an instruction delta of the backbone (`delta.py`), optionally
compressed to low rank (`lore.py`), recombined with a trained extension (`apply.py`)."""

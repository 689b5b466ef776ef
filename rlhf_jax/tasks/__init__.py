"""Tasks: data, prompts and judges behind one interface."""

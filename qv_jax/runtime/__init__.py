"""Jitted, static-shape prefill and decode steps and the generation loop."""

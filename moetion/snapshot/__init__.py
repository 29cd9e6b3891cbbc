"""Sparse checkpointing: capture a window of snapshots every iteration and keep it in tiers."""

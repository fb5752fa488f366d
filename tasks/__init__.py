"""Tasks: the LightningModules (classification, detection, segmentation), their heads, metrics and schedules.

Research code only: each task owns its model, loss, optimizer and schedule, and metrics, and states what the run
layer may rely on through ``tasks/base.py``'s contract. Nothing here writes files or knows the run directory.
"""

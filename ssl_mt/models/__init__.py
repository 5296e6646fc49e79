"""Backbone factory, heads and the LightningModules (SSL methods, multi-task)."""

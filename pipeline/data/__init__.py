"""Datasets: file readers, formats to chats, GX expectations, splits, perturbations, the demo generator,
benchmark importers."""

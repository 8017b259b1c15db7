"""Allocators: choose one action per column chunk so the whole model meets a bit budget."""

"""Hugging Face interop: swap the MoE blocks of a transformers model for lina MoE layers."""

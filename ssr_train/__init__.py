"""Trainer: backbones, DAFormer head, SSR regulariser, UDA methods, engine, evaluation."""

"""Approximate attention mechanisms (PyTorch; Triton for causal linear attention on CUDA).

Layout (B, H, N, D) as :func:`memattn.attention`; GQA/MQA when Hq is a multiple of Hkv.
The maths, limits and measured errors are in docs/approximate.md.
"""

from .feature_maps import FEATURE_MAPS, EluPlusOne, FavorPositive, FeatureMap, Relu, resolve_feature_map
from .linear import linear_attention
from .linformer import linformer_attention
from .nystrom import iterative_pinv, nystrom_attention
from .performer import favor_projection, performer_attention
from .pooling import POOLS, AdaptiveAvgPool, AvgPool, ConvPool, MaxPool, Pooler, pooled_attention, resolve_pooler
from .synthesizer import synthesizer_attention

__all__ = [
    "linear_attention", "favor_projection", "performer_attention", "linformer_attention",
    "nystrom_attention", "pooled_attention", "synthesizer_attention", "iterative_pinv",
    "FeatureMap", "EluPlusOne", "Relu", "FavorPositive", "FEATURE_MAPS", "resolve_feature_map",
    "Pooler", "AvgPool", "MaxPool", "AdaptiveAvgPool", "ConvPool", "POOLS", "resolve_pooler",
]

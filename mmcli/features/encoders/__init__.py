"""Encoder registry: frozen image, volume and text encoders behind one factory, ``create_encoder``."""
from mmcli.features.encoders.registry import ENCODERS, Encoder, create_encoder, list_encoders, register_encoder

__all__ = ["ENCODERS", "Encoder", "create_encoder", "list_encoders", "register_encoder"]

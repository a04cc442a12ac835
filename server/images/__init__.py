"""Image ingestion: safe fetching (SSRF rules), safe decoding (bombs, corrupt files),
model-family shape rules, caching and metrics. The chat service uses `ImageLoader`.
"""

from .family import FAMILIES, FamilySpec
from .limits import check_image_count
from .loader import ImageLoader, LoadedImage
from .resolve import Resolver, SystemResolver, static_resolver

__all__ = [
    "FAMILIES",
    "FamilySpec",
    "ImageLoader",
    "LoadedImage",
    "Resolver",
    "check_image_count",
    "static_resolver",
    "SystemResolver",
]

"""Image providers behind one interface (`agent.types.ImageProvider`): sdwebui (the shared pool), openai,
placeholder; `build_image_provider` picks the configured one and wraps it to store and record."""

from agent.images.build import build_image_provider
from agent.images.placeholder import PlaceholderImageProvider
from agent.images.png import png_bytes

__all__ = ["PlaceholderImageProvider", "build_image_provider", "png_bytes"]

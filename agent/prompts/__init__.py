"""Prompts: the Jinja template library designers edit in `settings/` (library.py) and `flask prompts` (cli.py).

The package's front door: apps import the library's public names from here.
"""

from .library import PromptError, PromptLibrary, RenderedPrompt, Template, default_library, library_for

__all__ = ["PromptError", "PromptLibrary", "RenderedPrompt", "Template", "default_library", "library_for"]

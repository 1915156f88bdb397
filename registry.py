"""Decorator registries: model constructors, data preprocessors, config setters, word decoders, TTS
engines, audio encoders and checkpoint formats.

Registration is explicit (a decorator on a function in a model folder or a shared package), a
duplicate name raises and names both definitions, and an unknown name raises with the registered
names and a "did you mean". Model folders are found by `harness.plugins.load_plugins()`: any
top-level folder of the repository with an `__init__.py` is imported, so adding a folder is enough;
nothing here needs editing.

A config names a component of any registry the same way, as a `config.ComponentSpec`
(`{name: ..., params: {...}}`); `Registry.build(spec, *args)` builds it.

    from registry import register_model_constructor

    @register_model_constructor()          # name defaults to the function's name
    def my_model(params: MyParams, ctx): ...
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

from harness.errors import UserError


class DuplicateRegistrationError(Exception):
    """Two definitions claim one name: a bug in a plugin, so it is never swallowed."""


class Registry:
    """One namespace of named functions, filled by a decorator."""

    def __init__(self, kind: str):
        self.kind = kind  # e.g. "model constructor", used in messages
        self._entries: dict[str, Callable] = {}
        ALL_REGISTRIES.append(self)  # so `main.py list` shows registries that model folders define too

    def register(self, name: str | None = None) -> Callable[[Callable], Callable]:
        if callable(name):  # used bare as @register_x: the function came in place of the name
            raise TypeError(f"use @register_{self.kind.replace(' ', '_')}() with parentheses")

        def decorator(fn: Callable) -> Callable:
            key = name or fn.__name__
            if key in self._entries:
                raise DuplicateRegistrationError(
                    f"{self.kind} '{key}' is defined twice: {_where(self._entries[key])} and {_where(fn)}"
                )
            self._entries[key] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable:
        if name in self._entries:
            return self._entries[name]
        raise UserError(unknown_name_message(self.kind, name, self.names()))

    def build(self, spec, *args, path: str | None = None):
        """The component `spec` (a config.ComponentSpec) names, built as `fn(params, *args)`. Params
        still given as a mapping (a spec made in code) are typed here, with the same errors as a
        config file's: `path` names the key in them (default: the registry's kind)."""
        from config import typed_spec  # config imports this module: imported when first used

        spec = typed_spec(self, spec, path or self.kind)
        return self.get(spec.name)(spec.params, *args)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    listing = ", ".join(known) if known else "(none)"
    hint = hint or "."
    return f"unknown {kind} '{name}'{hint} Registered: {listing}"


def _where(fn: Callable) -> str:
    try:
        line = inspect.getsourcelines(fn)[1]
        return f"{fn.__module__}.{fn.__qualname__} ({inspect.getsourcefile(fn)}:{line})"
    except (OSError, TypeError):
        return f"{fn.__module__}.{fn.__qualname__}"


ALL_REGISTRIES: list[Registry] = []  # every Registry, in creation order (harness ones first, then plugins')
MODEL_CONSTRUCTORS = Registry("model constructor")
DATA_PREPROCESSORS = Registry("data preprocessor")
CONFIG_SETTERS = Registry("config setter")
# Phoneme log-probs -> words, for any model emitting the 41 classes (word_decoding/).
WORD_DECODERS = Registry("word decoder")
# Sentence -> speech -> frames: the targets of the audio-aligned models (alignment/).
TTS_ENGINES = Registry("TTS engine")
AUDIO_ENCODERS = Registry("audio encoder")
# Checkpoints written by other code (e.g. the reference baseline trainer) that `evaluate` reads: a
# function of a path that returns {"config": dict, "model": state dict, "file": Path}, or None when
# the path is not in its format.
CHECKPOINT_FORMATS = Registry("checkpoint format")

register_model_constructor = MODEL_CONSTRUCTORS.register
register_data_preprocessor = DATA_PREPROCESSORS.register
register_config_setter = CONFIG_SETTERS.register
register_word_decoder = WORD_DECODERS.register
register_tts = TTS_ENGINES.register
register_audio_encoder = AUDIO_ENCODERS.register
register_checkpoint_format = CHECKPOINT_FORMATS.register

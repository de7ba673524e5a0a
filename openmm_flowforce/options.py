"""Options validated at the boundary: one :class:`Option` per setting, used alike for
command-line flags (``flowforce ... --epochs``), YAML config keys and keyword arguments.

An :class:`Option` knows its type, its allowed range or choices, and for lists and
sections the options of their items. :meth:`Option.check` returns the value normalised
(an int where a float is expected becomes a float) or raises :class:`~.errors.OptionError`
naming the option, the value and what is allowed, e.g.
``train.yaml: flow.hidden must be a list of integers ≥ 1, got 0``.
:func:`check_options` checks a mapping against a schema and rejects unknown keys, listing
the valid ones. The ``flowforce`` parser turns options into argparse ``type=`` functions
(:func:`openmm_flowforce.cli.config.flag`), so a flag and the same YAML key share one rule.

This module imports nothing heavy; every layer may define its schemas with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import OptionError

__all__ = ["COUNT", "FRACTION", "NON_NEGATIVE", "POSITIVE", "POSITIVE_INT", "SEED", "Option", "check_options"]

_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
               dict: "a mapping", object: "any value"}


@dataclass(frozen=True)
class Option:
    """Type and allowed values of one option.

    Attributes:
        kind: ``int``, ``float``, ``str``, ``bool``, ``list`` or ``dict``.
        minimum, maximum: bounds of numbers (None: unbounded); ``open_minimum`` /
            ``open_maximum`` exclude the bound itself. Numbers must also be finite.
        choices: the allowed values, if only a few are.
        item: for lists, the option every item must satisfy.
        fields: for dicts (config sections), the schema of their keys.
        nullable: None (YAML ``null``) is allowed and means "the default".
        min_items: for lists, the fewest items allowed.
    """

    kind: type
    minimum: float | None = None
    maximum: float | None = None
    open_minimum: bool = False
    open_maximum: bool = False
    choices: tuple[Any, ...] | None = None
    item: "Option | None" = None
    fields: Mapping[str, "Option"] | None = None
    nullable: bool = False
    min_items: int = 0

    def describe(self) -> str:
        """What the option accepts, e.g. ``an integer ≥ 1`` or ``a number in (0, 1]``."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        text = _KIND_NAMES.get(self.kind, self.kind.__name__)
        if self.kind is list and self.item is not None:
            text = "a list of " + self.item.describe().replace("an integer", "integers").replace(
                "a number", "numbers").replace("a string", "strings")
            if self.min_items:
                text += f" (at least {self.min_items})"
        low, high = (None if bound is None else (f"{int(bound)}" if self.kind is int else f"{bound:g}")
                     for bound in (self.minimum, self.maximum))
        if low is not None and high is not None:
            text += f" in {'(' if self.open_minimum else '['}{low}, {high}{')' if self.open_maximum else ']'}"
        elif low is not None:
            text += f" {'>' if self.open_minimum else '≥'} {low}"
        elif high is not None:
            text += f" {'<' if self.open_maximum else '≤'} {high}"
        return text + (" (or null)" if self.nullable else "")

    def problem(self, value: Any) -> tuple[Any, str | None]:
        """``(normalised value, None)``, or ``(value, "must be ..., got ...")``."""
        bad = (value, f"must be {self.describe()}, got {value!r}")
        if value is None:
            return (None, None) if self.nullable else bad
        if self.kind is bool:
            return (value, None) if isinstance(value, bool) else bad
        if isinstance(value, bool):  # True is an int in Python, never a number here
            return bad
        if self.kind is int:
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                value = int(value)
            if not isinstance(value, int):
                return bad
        elif self.kind is float:
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return bad
            value = float(value)
        elif self.kind is list:
            if isinstance(value, tuple):
                value = list(value)
            if not isinstance(value, list) or len(value) < self.min_items:
                return bad
            if self.item is not None:
                items = []
                for entry in value:
                    checked, why = self.item.problem(entry)
                    if why is not None:
                        return bad
                    items.append(checked)
                value = items
        elif not isinstance(value, self.kind):
            return bad
        if self.choices is not None and value not in self.choices:
            return bad
        if self.kind in (int, float):
            if self.minimum is not None and (value < self.minimum or (self.open_minimum and value == self.minimum)):
                return bad
            if self.maximum is not None and (value > self.maximum or (self.open_maximum and value == self.maximum)):
                return bad
        return value, None

    def check(self, name: str, value: Any, where: str = "") -> Any:
        """The normalised value, or :class:`~.errors.OptionError` naming ``where`` and ``name``.

        Sections (``fields``) are checked key by key, unknown keys rejected."""
        prefix = f"{where}: " if where else ""
        if self.kind is dict and self.fields is not None and isinstance(value, Mapping):
            return check_options(value, self.fields, where, section=name)
        checked, why = self.problem(value)
        if why is not None:
            raise OptionError(f"{prefix}{name} {why}")
        return checked

    def parse(self, text: str) -> Any:
        """A command-line string as this option's value (then :meth:`problem` applies).

        Raises:
            OptionError: the text is not a value of the right kind or range (the message
                starts with "must be", for the caller to prefix with the flag).
        """
        value: Any = text
        if self.kind is int:
            try:
                value = int(text)
            except ValueError:
                try:
                    number = float(text)
                    value = int(number) if number.is_integer() else number
                except (ValueError, OverflowError):
                    value = text
        elif self.kind is float:
            try:
                value = float(text)
            except ValueError:
                value = text
        elif self.kind is not str:
            raise TypeError(f"options of kind {self.kind.__name__} have no command-line form")
        checked, why = self.problem(value)
        if why is not None:
            raise OptionError(f"must be {self.describe()}, got {text!r}")
        return checked


#: Common options.
POSITIVE_INT = Option(int, minimum=1)
COUNT = Option(int, minimum=0)
POSITIVE = Option(float, minimum=0.0, open_minimum=True)
NON_NEGATIVE = Option(float, minimum=0.0)
FRACTION = Option(float, minimum=0.0, maximum=1.0, open_maximum=True)
SEED = Option(int, minimum=0, maximum=2**32 - 1)


def check_options(values: Mapping[str, Any], schema: Mapping[str, Option], where: str = "",
                  section: str = "") -> dict[str, Any]:
    """``values`` with every entry checked against ``schema`` (normalised copies).

    Args:
        values: the given options (only those given; defaults are the caller's).
        schema: option name → :class:`Option`.
        where: the source for messages (a file name, ``"flowforce train"``...).
        section: the name of the enclosing section, for messages (``flow.hidden``).

    Raises:
        OptionError: an unknown key (listing the valid ones) or a bad value.
    """
    prefix = f"{where}: " if where else ""
    dotted = f"{section}." if section else ""
    if not isinstance(values, Mapping):
        raise OptionError(f"{prefix}{section or 'the options'} must be a mapping of options, got {values!r}")
    unknown = sorted(str(key) for key in values if key not in schema)
    if unknown:
        raise OptionError(f"{prefix}unknown {'option' if len(unknown) == 1 else 'options'} "
                          f"{', '.join(dotted + key for key in unknown)}; valid: {', '.join(schema)}")
    return {key: schema[key].check(f"{dotted}{key}", value, where) for key, value in values.items()}

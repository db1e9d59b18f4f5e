"""Command-line options generated from the fields of a pydantic model.

A command that parses its flags into a pydantic model declares which fields it exposes; each
option takes its name (``--field-name``), type, default, choices (a ``Literal`` field) and help
(the field's description) from the field, so a default is written once, in the model. Booleans
become switches: ``--name`` for a field that defaults to False; a field that defaults to True
needs an explicit ``flag`` (for example ``--no-dist`` for ``with_dist``) that clears it, or an
``action`` (``argparse.BooleanOptionalAction``: ``--pack`` / ``--no-pack``). A ``list[int]``
field takes comma-separated integers (``--k 1,5,10``); a field with a pydantic
``BeforeValidator`` takes its text through it (``--draft-beams 2k/8k``: ``width_policy.Width``).
``validated`` then builds the model from the parsed values, so its range checks run too.

Imports nothing heavy (only argparse and pydantic), so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ValidationError

M = typing.TypeVar("M", bound=BaseModel)


def _plain(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, model: type[BaseModel],
           name: str, *, flag: str | None = None, **overrides: Any) -> None:
    """Add the option of ``model``'s field ``name``; ``overrides`` replace any add_argument
    keyword (``required``, ``help=argparse.SUPPRESS`` for a hidden flag, ``action`` for a
    ``--x/--no-x`` switch or a repeatable option, ...)."""
    field = model.model_fields[name]
    kind = _plain(field.annotation)
    clears = flag  # a True-by-default switch needs the flag that clears it
    flag = flag or flag_of(name)
    kw: dict[str, Any] = {"dest": name, "help": field.description}
    if field.is_required():
        kw["required"] = True
    else:
        kw["default"] = field.get_default(call_default_factory=True)
    parse = next((m.func for m in field.metadata if isinstance(m, BeforeValidator)), None)
    if kind is bool:
        if kw.get("default") and clears is None and "action" not in overrides:
            raise ValueError(f"{model.__name__}.{name} defaults to True: give the flag that clears it")
        kw["action"] = "store_false" if kw.get("default") else "store_true"
    elif parse is not None:  # a text form of its own (the field's BeforeValidator reads it)
        kw["type"] = _text_type(parse)
    elif get_origin(kind) is Literal:
        choices = get_args(kind)
        kw.update(choices=list(choices), type=type(choices[0]))
    elif kind in (int, float, str):
        kw["type"] = kind
    elif kind == list[int]:
        kw["type"] = int_list(flag)
    elif get_origin(kind) is list and overrides.get("action") == "append":
        kw["type"] = get_args(kind)[0]
    else:
        raise TypeError(f"{model.__name__}.{name}: no command-line form for {kind!r}")
    default = kw.get("default")
    if default is not None and kind is not bool and kw.get("help"):
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        kw["help"] += f" (default: {shown})".replace("%", "%%")
    kw.update(overrides)
    parser.add_argument(flag, **kw)


def _text_type(parse: Callable[[Any], Any]) -> Callable[[str], Any]:
    """An argparse type from a pydantic BeforeValidator: its ValueError becomes argparse's
    error (which names the flag)."""

    def typed(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return typed


def options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, model: type[BaseModel],
            names: typing.Iterable[str], **per_field: dict[str, Any]) -> None:
    """:func:`option` for each of ``names``; ``per_field[name]`` holds that field's overrides."""
    for name in names:
        option(parser, model, name, **per_field.get(name, {}))


def values(args: argparse.Namespace, names: typing.Iterable[str]) -> dict[str, Any]:
    """The parsed values of ``names`` (the fields added with :func:`options`)."""
    return {name: getattr(args, name) for name in names}


def flag_of(name: str) -> str:
    """The command-line flag of field ``name``: ``--field-name``."""
    return "--" + name.replace("_", "-")


def validated(args: argparse.Namespace, model: type[M], names: typing.Iterable[str]) -> M:
    """``model`` built from the parsed values of ``names`` (its range checks and validators
    run); a bad value exits as argparse does, with one line naming its flag."""
    try:
        return model(**values(args, names))
    except ValidationError as e:
        err = e.errors()[0]
        where = flag_of(str(err["loc"][0])) if err["loc"] else model.__name__
        raise SystemExit(f"error: argument {where}: {err['msg']}") from None


def int_list(flag: str) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers, each >= 1 (``flag`` names them in errors)."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be comma-separated integers, got {text!r}")
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{flag} values must be >= 1, got {text!r}")
        return values

    return parse


parse_ks = int_list("--k")  # --k 1,5,10: beam counts (default ``settings.DEFAULT_KS``)
parse_counts = int_list("--batch-size")  # --batch-size 1,8,32: requests decoded together

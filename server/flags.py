"""`omnitalk serve`'s flags, made from ServerSettings (one definition): each field is a flag and an OMNITALK_*
variable; the fields that are vLLM engine arguments take vLLM's own flag names, types and choices."""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from omnitalk.server.settings import SPEECH_FIELDS, VLLM_FIELDS, ServerSettings


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments end the program with one line (and status 2), not the usage text first."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags whose values land in the namespace only when given, so that unset ones leave env and defaults."""
    server = parser.add_argument_group("server")
    speech = parser.add_argument_group("speech stage (talker + Code2Wav)")
    thinker = parser.add_argument_group("thinker: vLLM engine arguments, as `vllm serve` takes them")
    vllm = _vllm_actions()
    for name, field in ServerSettings.model_fields.items():
        default = "" if field.default is None else f"default: {field.default}; "
        help = f"{field.description} ({default}env OMNITALK_{name.upper()})".replace("%", "%%")  # argparse formats it
        if name in VLLM_FIELDS:
            _add_like_vllm(thinker, vllm[name], name, help)
        else:
            group = speech if name in SPEECH_FIELDS else server
            _add_own(group, name, field, help)


def _add_own(group: argparse._ArgumentGroup, name: str, field: FieldInfo, help: str) -> None:
    kind = _plain(field.annotation)
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        _add_switch(group, [flag], name, help)
        return
    if typing.get_origin(kind) is list:  # repeatable: --api-key A --api-key B
        (item,) = typing.get_args(kind)
        group.add_argument(flag, dest=name, type=item, action="append", default=argparse.SUPPRESS, help=help)
        return
    metavar = "DIR" if name == "model" else "FILE" if kind is Path else name.upper()
    group.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS, metavar=metavar, help=help)


def _add_like_vllm(group: argparse._ArgumentGroup, action: argparse.Action, name: str, help: str) -> None:
    if isinstance(action, argparse.BooleanOptionalAction):
        flags = [f for f in action.option_strings if not f.startswith("--no-")]
        _add_switch(group, flags, name, help)
        return
    group.add_argument(
        *action.option_strings,
        dest=name,
        type=action.type,
        choices=action.choices,
        default=argparse.SUPPRESS,
        metavar=name.upper() if action.choices is None else None,
        help=help,
    )


def _add_switch(group: argparse._ArgumentGroup, flags: list[str], name: str, help: str) -> None:
    group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)


def _vllm_actions() -> dict[str, argparse.Action]:
    """vLLM's own argument definitions (EngineArgs.add_cli_args), by destination."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(add_help=False))
    actions = {action.dest: action for action in parser._actions}
    missing = [name for name in VLLM_FIELDS if name not in actions]
    if missing:
        raise RuntimeError(f"this vLLM has no engine argument(s) {', '.join(missing)}")
    return actions


def _plain(annotation: Any) -> type:
    """`int | None` -> int: the type a flag's value is parsed as."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation

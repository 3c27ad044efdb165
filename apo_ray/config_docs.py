"""The config reference, generated from the pydantic models' field descriptions, so that a key is documented
where it is defined: docs/config.md (`python -m apo_ray.config_docs --write docs/config.md`) and
`apo-ray train|sft|rm --help-config [SECTION]` print the same sections.

A section is one model class: the top level of a command's config, or a nested model. A class nested at one
path is named by that path (`reward`, `apl.attacker`); one nested at several (a data source) is named after the
class and its keys are written under a placeholder (`<data_source>.path`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from apo_ray.config import Config, RMStageConfig, SFTStageConfig, StageConfig

# Each command's config: (section name, class) for every class whose own keys make a top-level section. The
# stages share StageConfig's keys; sft and rm each add a few.
COMMANDS: dict[str, tuple[tuple[str, type[BaseModel]], ...]] = {
    "train": (("top", Config),),
    "sft": (("stage", StageConfig), ("sft", SFTStageConfig)),
    "rm": (("stage", StageConfig), ("rm", RMStageConfig)),
}
COMMAND = "python -m apo_ray.config_docs --write docs/config.md"
WIDTH = 100


@dataclass(frozen=True)
class Key:
    key: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class Section:
    name: str
    intro: str
    # The dotted paths the section's class sits under; empty for a top-level section.
    mounts: tuple[str, ...]
    keys: tuple[Key, ...]


def _section_class(annotation: typing.Any) -> type[BaseModel] | None:
    """The model class of a field that holds a section (maybe optional), else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _own_fields(cls: type[BaseModel]) -> dict[str, FieldInfo]:
    """The fields `cls` declares itself, not those it inherits unchanged from another config class. A private
    base's are its own: Config is apo_ray.config._GameConfig with the methods' sections added."""
    declared = {
        name
        for base in cls.__mro__
        if base is cls or base.__name__.startswith("_")
        for name in vars(base).get("__annotations__", {})
    }
    return {name: field for name, field in cls.model_fields.items() if name in declared}


def _snake(cls: type[BaseModel]) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__.removesuffix("Config")).lower()


def _mounts(roots: typing.Iterable[type[BaseModel]]) -> dict[type[BaseModel], list[str]]:
    """{nested class: the distinct dotted paths it sits under}, in the order a walk from `roots` meets them."""
    found: dict[type[BaseModel], list[str]] = {}

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in _own_fields(cls).items():
            child = _section_class(field.annotation)
            if child is not None:
                path = f"{prefix}{name}"
                paths = found.setdefault(child, [])
                if path not in paths:
                    paths.append(path)
                walk(child, f"{path}.")

    for root in roots:
        walk(root, "")
    return found


# Every command's nested classes, so that a section has one name and lists all its places whichever command shows it.
MOUNTS = _mounts(cls for roots in COMMANDS.values() for _, cls in roots)


def _type_name(annotation: typing.Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in kept) + (" or null" if len(kept) < len(args) else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if annotation is typing.Any:
        return "any"
    section = _section_class(annotation)
    if section is not None:
        return f"section {_section_name(section)}"
    return annotation.__name__


BOUNDS = (
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "<="),
    (annotated_types.Lt, "lt", "<"),
)


def _bounds(field: FieldInfo) -> list[str]:
    out = []
    for item in field.metadata:
        out += [f"{sign} {getattr(item, attr)}" for kind, attr, sign in BOUNDS if isinstance(item, kind)]
        if isinstance(item, annotated_types.MinLen):
            out.append("non-empty" if item.min_length == 1 else f"at least {item.min_length} characters")
    return out


def _default(field: FieldInfo) -> str:
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        # A section's keys show their own defaults; only what this field's factory sets otherwise shows here.
        changed = {k: v for k, v in value.model_dump().items() if v != type(value)().model_dump()[k]}
        return json.dumps(changed) if changed else ""
    return json.dumps(value)


def _section_name(cls: type[BaseModel]) -> str:
    paths = MOUNTS[cls]
    return paths[0] if len(paths) == 1 else _snake(cls)


def _intro(cls: type[BaseModel]) -> str:
    return " ".join((vars(cls).get("__doc__") or "").split())


def _section(name: str, cls: type[BaseModel], prefix: str, paths: tuple[str, ...]) -> Section:
    keys = []
    for field_name, field in _own_fields(cls).items():
        kind = ", ".join([_type_name(field.annotation), *_bounds(field)])
        keys.append(Key(f"{prefix}{field_name}", kind, _default(field), field.description or ""))
    return Section(name, _intro(cls), paths, tuple(keys))


def _sections(roots: typing.Iterable[tuple[str, type[BaseModel]]]) -> list[Section]:
    """The roots' sections, then those of the classes nested under them, each class once."""
    roots = list(roots)
    out = [_section(name, root, "", ()) for name, root in roots]
    for cls in _mounts(root for _, root in roots):
        paths, name = MOUNTS[cls], _section_name(cls)
        out.append(_section(name, cls, f"<{name}>." if len(paths) > 1 else f"{name}.", tuple(paths)))
    return out


def sections(command: str) -> list[Section]:
    """The sections of `command`'s config (train, sft, rm)."""
    return _sections(COMMANDS[command])


def find_section(command: str, name: str) -> Section:
    """`command`'s section called `name`, or sitting under the dotted path `name`; KeyError naming the known ones."""
    known = sections(command)
    found = [s for s in known if name == s.name or name in s.mounts]
    if not found:
        raise KeyError(f"unknown section {name!r}; the sections are: {', '.join(s.name for s in known)}")
    return found[0]


# ---------------------------------------------------------------------------------------- rendering


def _lead(section: Section) -> str:
    """The section's intro, and where a shared section sits."""
    where = f" Under {', '.join(section.mounts)}." if len(section.mounts) > 1 else ""
    return section.intro + where


def _wrap(value: str, indent: str) -> list[str]:
    return textwrap.wrap(
        value, WIDTH, initial_indent=indent, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    )


def text(section: Section) -> str:
    """`section` for a terminal."""
    lines = [section.name, *_wrap(_lead(section), "  ")]
    for key in section.keys:
        default = f"; default {key.default}" if key.default else ""
        lines += ["", f"  {key.key}  ({key.type}{default})", *_wrap(key.description, "    ")]
    return "\n".join(lines)


def _markdown(value: str) -> str:
    """`value` safe as Markdown text and in a table cell: pipes escaped, and outside code spans `<` and `*` too."""
    parts = value.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace("*", r"\*")
    return "`".join(parts).replace("|", r"\|")


def markdown(section: Section) -> str:
    """`section` as a Markdown heading, its intro and a table of its keys."""
    lines = [
        f"### {section.name}",
        "",
        _markdown(_lead(section)),
        "",
        "| key | type | default | description |",
        "| --- | --- | --- | --- |",
    ]
    for key in section.keys:
        default = f"`{key.default}`" if key.default else ""
        lines.append(f"| `{key.key}` | {_markdown(key.type)} | {_markdown(default)} | {_markdown(key.description)} |")
    return "\n".join(lines)


def help_text(command: str, section: str | None = None) -> str:
    """What `apo-ray <command> --help-config [SECTION]` prints."""
    chosen = sections(command) if section is None else [find_section(command, section)]
    return "\n\n".join(text(s) for s in chosen)


def document() -> str:
    """docs/config.md: the game's sections, then the stages' (each section once)."""
    parts = [
        "# Configuration keys",
        "",
        f"Generated from the field descriptions in `apo_ray/config.py` by `{COMMAND}`; edit those, not this file. "
        "`apo-ray train --help-config [SECTION]` (and `apo-ray sft`, `apo-ray rm`) prints the same in a terminal. "
        "Every key can be set in a YAML config or as a `key.sub=value` override.",
    ]
    shown: set[str] = set()
    for title, commands in (
        ("`apo-ray train`: the game", ("train",)),
        ("`apo-ray sft` and `apo-ray rm`: the stages", ("sft", "rm")),
    ):
        parts += ["", f"## {title}"]
        for section in _sections(root for command in commands for root in COMMANDS[command]):
            if section.name not in shown:
                shown.add(section.name)
                parts += ["", markdown(section)]
    return "\n".join(parts) + "\n"


class HelpConfigAction(argparse.Action):
    """`--help-config [SECTION]`: print the config reference of the parser's command and exit, as --help does."""

    def __init__(self, option_strings: list[str], dest: str, command: str, **kwargs: typing.Any) -> None:
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, metavar="SECTION", **kwargs)
        self.command = command

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: typing.Any,
        option_string: str | None = None,
    ) -> None:
        try:
            printed = help_text(self.command, values)
        except KeyError as exc:
            parser.exit(2, f"{parser.prog}: error: --help-config: {exc.args[0]}\n")
        print(printed)
        parser.exit(0)


def add_help_config(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--help-config",
        action=HelpConfigAction,
        command=command,
        help="print every config key of this command (or one SECTION's: e.g. reward, ppo) with its "
        "type, default and meaning, and exit",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apo_ray.config_docs",
        description="write or check docs/config.md, generated from apo_ray/config.py",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", type=Path, metavar="PATH", help="write the reference to PATH")
    action.add_argument("--check", type=Path, metavar="PATH", help="exit 1 if PATH differs from the reference")
    args = parser.parse_args(argv)
    if args.write is not None:
        args.write.write_text(document())
        return 0
    if not args.check.is_file() or args.check.read_text() != document():
        print(f"{args.check} is stale: run `{COMMAND}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command-line settings from a dataclass: every field is a flag, every flag has a one-line reason.

    @dataclass
    class Config:
        batch_size: int = knob(64, "images per step per process; lower it if you run out of memory")

parse_config(Config, presets, argv) builds an argparse parser in which each field becomes
--batch-size (underscores to dashes) with its reason as help text. A `--preset NAME` flag
first fills the fields from presets[NAME]; explicit flags then override single fields.
"""
import argparse
import dataclasses
import math
import sys


def knob(default, help):
    """A dataclass field with a default and a one-line reason, shown by --help."""
    return dataclasses.field(default=default, metadata={"help": help})


def _flag_type(field_type, default):
    kind = field_type if isinstance(field_type, type) else type(default)
    if kind is bool:
        return parse_bool
    if kind is float:
        return finite_float
    return kind


def finite_float(text):
    """A float flag's value; 'nan' and 'inf' are refused, since no setting means them (they give black images)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def parse_bool(text):
    """'true/yes/1' or 'false/no/0' (any case) -> bool."""
    value = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(text.lower())
    if value is None:
        raise ValueError(f"expected true or false, got {text!r}")
    return value


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line plus a pointer to --help, and exits with code 2."""

    def error(self, message):
        """Print a usage error as one line that points to --help, and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(config_cls, presets=None, description=None, extra=None, aliases=None):
    """An argparse parser with one --flag per dataclass field, help text = the knob's reason and default."""
    parser = OneLineErrorParser(description=description)
    if presets:
        parser.add_argument("--preset", default=next(iter(presets)), choices=list(presets),
                            help="named group of defaults; other flags override single fields")
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        ftype = _flag_type(f.type, f.default)
        by_preset = {name: p[f.name] for name, p in (presets or {}).items() if f.name in p}
        shown = f"default {f.default}" + "".join(f"; {name}: {v}" for name, v in by_preset.items())
        reason = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        flags = [flag] + list((aliases or {}).get(f.name, []))
        metavar = {int: "INT", finite_float: "FLOAT", str: "STR"}.get(ftype, "BOOL")
        parser.add_argument(*flags, dest=f.name, default=None, type=ftype, metavar=metavar,
                            help=f"{reason} [{shown}]")
    if extra:
        extra(parser)
    return parser


def parse_config(config_cls, presets=None, argv=None, description=None, extra=None, aliases=None):
    """Parse argv into (config, namespace). Precedence: flag > preset > dataclass default.
    aliases maps a field name to extra flags, e.g. {"style_class": ["--class"]}."""
    parser = build_parser(config_cls, presets, description, extra, aliases)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    values = dict(presets[args.preset]) if presets else {}
    for f in dataclasses.fields(config_cls):
        given = getattr(args, f.name)
        if given is not None:
            values[f.name] = given
    try:
        config = config_cls(**values)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    return config, args

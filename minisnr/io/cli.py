"""The command line: one-line errors, flags from a dataclass, and small flag parsers.

A UserError is a problem with the user's input or files; run_main prints it as one line and exits 1.
parse_config turns a dataclass of knob(default, reason) fields into flags whose --help gives the reason.
"""
import argparse
import dataclasses
import errno
import math
import sys
import warnings


class UserError(ValueError):
    """A problem with the user's input or files. Scripts print its message as one line and exit 1."""


class CheckpointError(UserError):
    """Raised for a file that cannot be used as a minisnr checkpoint or adapter."""


class DiskFullError(UserError):
    """A write failed because the disk (or the quota) is full; the message names the folder."""


def run_main(main):
    """Run main(); a UserError becomes a one-line message on stderr and exit code 1, not a traceback.
    A Ctrl-C that no training loop caught (during start-up, or a second one) exits with code 130 and
    one line, and warnings (e.g. a skipped unreadable image) are printed as one 'warning: ...' line."""
    format_warning = warnings.formatwarning
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        return main()
    except UserError as e:
        message, code = f"error: {e}", 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):  # a bug or a system fault: the traceback helps
            raise
        # a write outside atomic_write (the log, a PNG folder) found the disk full
        message = f"error: no space left on the device ({e.filename or 'a write'}); free some space and run again"
        code = 1
    except KeyboardInterrupt:
        message, code = "interrupted", 130
    finally:
        warnings.formatwarning = format_warning
    try:  # end any open tqdm bar's line, so that the message starts on a line of its own
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except Exception:  # cosmetic only; never hide the real message
        pass
    print(message, file=sys.stderr)
    sys.exit(code)


def knob(default, help, shown=None):
    """A dataclass field with a default and a one-line reason, shown by --help (with `shown` in place of the
    default's value, for a default that is a path of this machine)."""
    return dataclasses.field(default=default, metadata={"help": help, "shown": shown})


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


def parse_config(config_cls, presets=None, argv=None, description=None, aliases=None, removed=None):
    """Parse argv into (config, namespace): one --flag per dataclass field, whose --help is the knob's reason and
    default. Precedence: flag > preset > dataclass default. aliases maps a field name to extra flags, e.g.
    {"style_class": ["--class"]}; removed maps a flag that no longer exists to the one line that says what
    replaces it."""
    parser = OneLineErrorParser(description=description)
    if presets:
        parser.add_argument("--preset", default=next(iter(presets)), choices=list(presets),
                            help="named group of defaults; other flags override single fields")
    for f in dataclasses.fields(config_cls):
        kind = f.type if isinstance(f.type, type) else type(f.default)
        ftype = {bool: parse_bool, float: finite_float}.get(kind, kind)
        shown = f"default {f.metadata.get('shown') or f.default}"
        shown += "".join(f"; {name}: {p[f.name]}" for name, p in (presets or {}).items() if f.name in p)
        reason = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        flags = ["--" + f.name.replace("_", "-")] + list((aliases or {}).get(f.name, []))
        metavar = {int: "INT", finite_float: "FLOAT", str: "STR"}.get(ftype, "BOOL")
        parser.add_argument(*flags, dest=f.name, default=None, type=ftype, metavar=metavar,
                            help=f"{reason} [{shown}]")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    for arg in argv:
        if arg.split("=")[0] in (removed or {}):
            raise UserError(removed[arg.split("=")[0]])
    args = parser.parse_args(argv)
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


# --- values given on the command line -----------------------------------------------------------

def parse_style_window(text):
    """--style-steps 'a:b' -> (a, b): fractions of the sampling trajectory, counted from pure noise (t = 1)."""
    try:
        a, b = (float(v) for v in text.split(":"))
    except ValueError:
        raise UserError(f"--style-steps must look like a:b with fractions, e.g. 0:0.3; got {text!r}") from None
    if not 0 <= a <= b <= 1:
        raise UserError(f"--style-steps a:b needs 0 <= a <= b <= 1; got {text!r}")
    return a, b


def class_id(name, classes):
    """A class given by name ('cat') or by id ('3') -> its label id; None if it is neither."""
    if name.isascii() and name.isdigit() and int(name) < len(classes):  # '²'.isdigit() is true, int('²') fails
        return int(name)
    return classes.index(name) if name in classes else None


def parse_classes(text, classes):
    """'cat,dog' or '3,5' or 'all' -> list of class ids; unknown names list the valid ones."""
    if text in (None, "", "all"):
        return list(range(len(classes)))
    ids = []
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        cid = class_id(item, classes)
        if cid is None:
            raise UserError(f"unknown class {item!r}; valid: {', '.join(classes)} (or ids 0-{len(classes) - 1})")
        ids.append(cid)
    if not ids:
        raise UserError(f"--classes {text!r} names no class; pass names or ids like {classes[0]},1, or 'all'")
    return ids


def resolve_class(name, classes):
    """--class value -> label id; None means the null class (id = number of classes)."""
    if name in (None, "", "none", "null"):   # finetune.py handles "every" itself (a random class per view)
        return len(classes)
    cid = class_id(name, classes)
    if cid is None:
        raise UserError(f"unknown --class {name!r}; valid: {', '.join(classes)}, every or null")
    return cid

"""The code documents itself where it teaches: every module says what it is for, every class what it is.

A learner opens a file and reads its first lines, then meets classes as the units of the design, so those two
always have a docstring (as DiT's models.py gives every class one). Functions and methods get one where it says
something the name and the code do not, which is for a reader to judge, not a counter: a docstring that only
repeats its name (`def num_params()`: "Total number of parameters.") is noise.
"""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted(REPO.glob("minisnr/**/*.py")) + [REPO / name for name in ("train.py", "sample.py", "finetune.py")]


def undocumented(path):
    """The module ('<module>') and the classes in `path` that have no docstring."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    missing = [] if ast.get_docstring(tree) else ["<module>"]
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and not ast.get_docstring(node):
            missing.append(f"{node.name} (line {node.lineno})")
    return missing


def test_sources_found():
    """The scan covers the package, each of its sub-packages, and the three scripts (guards against a wrong
    glob passing vacuously)."""
    names = {str(p.relative_to(REPO)) for p in SOURCES}
    assert {"minisnr/model.py", "minisnr/rf.py", "minisnr/lora.py", "train.py", "sample.py", "finetune.py"} <= names
    for room in ("io", "train", "eval", "tools"):
        assert f"minisnr/{room}/__init__.py" in names and sum(n.startswith(f"minisnr/{room}/") for n in names) > 2


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_module_and_class_has_a_docstring(path):
    """Every module says what it is for and every class what it is."""
    missing = undocumented(path)
    assert not missing, f"{path.relative_to(REPO)}: add a docstring to " + ", ".join(missing)


def test_scanner_catches_a_missing_docstring(tmp_path):
    """The scanner itself works: it flags a module and a class (nested too) without a docstring, not functions."""
    src = tmp_path / "m.py"
    src.write_text('def f():\n    pass\nclass C:\n    """doc"""\n    class D:\n        pass\n')
    assert undocumented(src) == ["<module>", "D (line 5)"]


# --- every command in every README.md exists as written -------------------------------------------------------

import contextlib           # noqa: E402  (the section's own imports, kept beside it)
import io                   # noqa: E402
import os                   # noqa: E402
import re                   # noqa: E402
import runpy                # noqa: E402
import shlex                # noqa: E402
import sys                  # noqa: E402
import warnings             # noqa: E402

READMES = sorted(p for p in REPO.rglob("README.md") if ".git" not in p.parts and ".pytest_cache" not in p.parts)


def documented_commands(text):
    """Every `python ...` command in a README: lines of code blocks and inline `code` that start with python
    (a trailing comment and a shell continuation are taken off)."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        found += [line.split("  #")[0].split(" # ")[0].strip() for line in joined.splitlines()]
    found += re.findall(r"`(python [^`]+)`", text)
    commands = []
    for line in found:
        line = line.strip().lstrip("$ ").split(" && ")[0].split(" | ")[0]
        if line.startswith(("python ", "python3 ")) and "..." not in line.split()[:3]:
            commands.append(line)
    return commands


def target(argv):
    """(the command to ask for --help, the flags given): `python X.py` or `python -m module [subcommand]`."""
    if argv[1] == "-m":
        head, rest = argv[1:3], argv[3:]
    else:
        head, rest = argv[1:2], argv[2:]
    return head, rest


HELP = {}


def help_text(head):
    """(exit code, what `python HEAD --help` prints), run in this process with runpy (no new interpreter per
    command), once per HEAD."""
    key = tuple(head)
    if key not in HELP:
        out, old_argv, old_cwd = io.StringIO(), sys.argv, os.getcwd()
        code = 0
        try:
            os.chdir(REPO)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)     # runpy on a module its package imported
                if head[0] == "-m":
                    sys.argv = [head[1], *head[2:], "--help"]
                    runpy.run_module(head[1], run_name="__main__", alter_sys=True)
                else:
                    sys.argv = [head[0], *head[1:], "--help"]
                    runpy.run_path(str(REPO / head[0]), run_name="__main__")
        except SystemExit as e:
            code = e.code or 0
        except Exception as e:          # a missing module or script: report it as the command's failure
            code, _ = 1, out.write(f"{type(e).__name__}: {e}")
        finally:
            sys.argv = old_argv
            os.chdir(old_cwd)
        HELP[key] = (code, out.getvalue())
    return HELP[key]


def test_readme_scan_finds_the_commands():
    """The scan is not vacuous: the top README's demo commands are found."""
    commands = documented_commands((REPO / "README.md").read_text(encoding="utf-8"))
    assert any(c.startswith("python finetune.py") for c in commands), commands
    assert any(c.startswith("python sample.py") for c in commands), commands
    assert documented_commands("```bash\npython a.py --x 1  # note\n```\nand `python -m b.c sub --y`") == \
        ["python a.py --x 1", "python -m b.c sub --y"]


def command_problems(text):
    """What is wrong with the `python ...` commands of a README's text: a script or module that does not exist,
    or a --flag its command (or subcommand) does not know."""
    problems = []
    for command in documented_commands(text):
        argv = shlex.split(command)
        head, rest = target(argv)
        if head == ["-m", "pytest"]:
            continue
        code, text = help_text(head)
        if code != 0:
            problems.append(f"{command}: `{' '.join(head)} --help` failed: {text.strip().splitlines()[-1:]}")
            continue
        subs = re.search(r"\{([a-z0-9_,-]+)\}", text)
        if subs and rest and rest[0] in subs.group(1).split(","):
            code, text = help_text(head + [rest[0]])
        for flag in (a.split("=")[0] for a in rest if a.startswith("--")):
            if not re.search(re.escape(flag) + r"\b", text):
                problems.append(f"{command}: {flag} is not a flag of `{' '.join(head)}`")
    return problems


def test_a_rotten_command_is_caught():
    """A misspelt flag, a removed subcommand's flag and a missing module are each reported."""
    text = ("```bash\npython sample.py --lora x.pt --no-such-flag 1\n```\n`python -m minisnr.eval.evaluate base ckpt "
            "--windows 0:1` and `python -m minisnr.no_such_module --x`")
    problems = command_problems(text)
    assert len(problems) == 3 and "--no-such-flag" in problems[0] and "--windows" in problems[1], problems


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_documented_command_exists_with_its_flags(readme):
    """Each `python ...` line of a README names a script or module that exists, and every --flag it passes is one
    that command (or its subcommand) knows: documentation cannot rot silently."""
    problems = command_problems(readme.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_cited_test_exists(readme):
    """A README that backs a promise with `test_...` names a test function that is in tests/, so a renamed or
    removed test cannot leave a promise without its check."""
    defined = {name for path in (REPO / "tests").glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), flags=re.M)}
    cited = set(re.findall(r"`(test_\w+)`", readme.read_text(encoding="utf-8")))
    assert cited <= defined, f"cited tests that do not exist: {sorted(cited - defined)}"

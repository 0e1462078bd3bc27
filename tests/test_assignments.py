"""The teacher's promise in README.md, 'Assignments', checked end to end.

For every assignment row that names functions and a pytest check, this test does what a
teacher would: copy the repository, replace the named function's body with
`raise NotImplementedError` (the docstring stays), run the README's exact check in the copy,
and require that it fails, with every failure reporting "not implemented yet" and the
formula its test checks. (tests/conftest.py turns NotImplementedError into that message.)
That the unchanged checks pass is the rest of the suite's job.
"""
import ast
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

ROW = re.compile(r"^\| *(\d+) *\|[^|]*\|(?P<change>[^|]*)\| *`(?P<check>python -m pytest [^`]*)` *\|", re.M)


def assignment_rows():
    """(number, [functions], 'file.py', check command) for each README row with a pytest check."""
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    rows = []
    for m in ROW.finditer(readme):
        names = re.findall(r"`([^`]+)`", m.group("change"))
        files = [n for n in names if n.endswith(".py")]
        funcs = [n for n in names if not n.endswith(".py")]
        assert len(files) == 1 and funcs, f"assignment {m.group(1)}: name the functions and one file, in backticks"
        rows.append((int(m.group(1)), funcs, files[0], m.group("check")))
    return rows


ROWS = assignment_rows()
CASES = [(number, func, path, check) for number, funcs, path, check in ROWS for func in funcs]


def test_readme_lists_assignments_with_checks():
    """The README has at least five assignments with a ready pytest check (the scan is not vacuous)."""
    assert len(ROWS) >= 5, f"found only {len(ROWS)} assignment rows with a pytest check in README.md"


def stub_out(source, qualname):
    """`source` with the body of function `qualname` ('f' or 'Class.f') replaced by `raise NotImplementedError`."""
    tree = ast.parse(source)
    node, scope = None, tree
    for part in qualname.split("."):
        node = next((n for n in scope.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        assert node is not None, f"{qualname} not found"
        scope = node
    body = node.body[1:] if ast.get_docstring(node) else node.body
    assert body, f"{qualname} has only a docstring"
    lines = source.splitlines(keepends=True)
    first, last = body[0].lineno - 1, node.end_lineno      # 0-based start, exclusive end
    stub = " " * body[0].col_offset + "raise NotImplementedError\n"
    return "".join(lines[:first] + [stub] + lines[last:])


@pytest.mark.parametrize("number,func,path,check", CASES, ids=[f"{n}-{f}" for n, f, _, _ in CASES])
def test_removing_a_function_fails_its_check_with_the_formula(tmp_path, number, func, path, check):
    """Stub out the function in a copy; the README's check fails, each failure quoting its formula."""
    copy = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", ".pytest_cache", "runs", "data")
    for part in ("minisnr", "tests"):
        shutil.copytree(os.path.join(REPO_ROOT, part), copy / part, ignore=ignore)
    target = copy / path
    target.write_text(stub_out(target.read_text(encoding="utf-8"), func), encoding="utf-8")

    args = shlex.split(check)
    assert args[:3] == ["python", "-m", "pytest"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run([sys.executable, "-m", "pytest", *args[3:], "-q", "-p", "no:cacheprovider"],
                         cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 1, f"assignment {number}: `{check}` should fail once {func} is removed:\n{out[-3000:]}"
    last = out.strip().splitlines()[-1]                     # e.g. "4 failed, 19 deselected in 1.49s"
    broken = sum(int(m) for m in re.findall(r"(\d+) (?:failed|errors?)\b", last))
    # Count each failure once, in its traceback section. The short summary at the end repeats the
    # message in full when the CI environment variable is set (pytest stops truncating it there).
    details = out.split("short test summary info")[0]
    reports = re.findall(r"is not implemented yet \(NotImplementedError\)\.\nThis test checks: (.+)", details)
    assert broken >= 1 and len(reports) == broken, \
        f"assignment {number}: every failure should say 'not implemented yet' and quote its formula:\n{out[-3000:]}"
    assert all(len(r.strip()) > 10 for r in reports), f"a failing test of {func} has no docstring to quote"


def test_stub_out_keeps_the_docstring_and_replaces_the_rest():
    """stub_out leaves the signature and docstring and puts one raise where the body was."""
    src = ('class A:\n    def f(self, x):\n        """Doc."""\n        y = x + 1\n        return y\n\n'
           '    def g(self):\n        return 2\n')
    out = stub_out(src, "A.f")
    assert out == ('class A:\n    def f(self, x):\n        """Doc."""\n        raise NotImplementedError\n\n'
                   '    def g(self):\n        return 2\n')

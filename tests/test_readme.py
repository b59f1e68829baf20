"""README.md's code runs as written, and its ``grasp`` command lines match the CLI.

Conventions for README.md's code blocks (what a README author needs to know):

- Every ```` ```python ```` block is an example that runs on its own: in a fresh namespace, with a temporary
  folder as the working directory (files it writes, such as ``runs/r``, land there), on CPU, with no
  network. It prints what it computed. A block that needs data or long training says so in a comment and
  uses small sizes itself (the synthetic dataset, a few epochs), so what the README shows is what runs.
- A block that is not Python but one signature, ``name(parameters) -> result  # comment`` (optionally
  ``a, b = name(parameters)``), documents a function instead: it is not run, and its parameters (names,
  kinds, defaults) must be those of the real function.
- First line ``# after the quick start``: the block reads ``runs/quick``, the run that the README's quick
  start trains. The test makes that run first with the quick start's own ``grasp train`` command (found in
  the README's bash blocks), shortened by :data:`QUICK_START_SHORTER` and with a hash encoder in place of
  MiniLM, so it takes seconds instead of a minute; the dataset, and so every id the block names, is the
  quick start's.
- First line ``# needs: <what>``: the block needs something a test machine cannot have (an LLM server);
  it is skipped, with ``<what>`` as the reason. At most :data:`MAX_NEEDS` blocks may say so.

Every ``grasp COMMAND ...`` in a ```` ```bash ```` block must be accepted by ``grasp.cli.build_parser()``
(parsed, not run): a renamed or removed flag, subcommand or choice fails here. Shell variables set in the
block (``A="..."``) and ``for`` loop values are substituted first.

Test ids name the README line of the block or command (``README.md:<line>-<heading>``), and a traceback
inside a block points at the README line, since each block is compiled as README.md at its own lines.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import itertools
import re
import shlex
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

#: Appended to the quick start's ``grasp train`` command for the ``# after the quick start`` blocks: one short
#: epoch of a narrow model (argparse lets a later flag override an earlier one).
QUICK_START_SHORTER = ("--epochs", "1", "--hidden-size", "16", "--max-len", "20", "--no-progress")
#: The most ``# needs:`` blocks (not run) the README may have: examples should run.
MAX_NEEDS = 2
AFTER_QUICK_START = "# after the quick start"
NEEDS = "# needs:"
#: A block documenting a signature: ``[targets =] dotted.name(parameters) -> result [# comment]``.
SIGNATURE = re.compile(r"(?:[\w\s,]+=\s*)?(?P<name>[\w.]+)\((?P<params>.*)\)\s*(?:->[^\n#]+)?(?:#[^\n]*)?", re.S)
#: Shell operators that separate commands, and words that may precede a command.
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
SHELL_KEYWORDS = {"do", "then", "else", "time", "!"}


@dataclass(frozen=True)
class Block:
    """A fenced code block of README.md."""

    language: str  # the info string's first word ("" for a bare fence)
    line: int  # README line (1-based) of the block's first content line
    heading: str  # the nearest heading above the block
    text: str

    @property
    def id(self) -> str:
        """``README.md:<line>-<heading>``, for test ids."""
        slug = re.sub(r"[^\w.]+", "_", self.heading).strip("_")
        return f"README.md:{self.line}-{slug}"

    @property
    def first_line(self) -> str:
        """The first non-empty line (where the markers go)."""
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")


def read_blocks(path: Path = README) -> list[Block]:
    """Every fenced code block of ``path``, in order; indented fences (inside list items) are dedented."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    heading = "top"
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = re.match(r"^(?P<indent>\s*)(?P<fence>`{3,})(?P<info>[^`]*)$", line)
        if re.match(r"^#{1,6} ", line):
            heading = line.lstrip("#").strip()
        elif fence:
            indent, ticks = fence["indent"], fence["fence"]
            start, body = index + 2, []
            index += 1
            # The block ends at a fence of at least as many backticks (an unclosed one runs to the end).
            while index < len(lines) and not re.match(rf"^\s*{ticks}`*\s*$", lines[index]):
                body.append(lines[index][len(indent) :] if lines[index].startswith(indent) else lines[index].lstrip())
                index += 1
            words = fence["info"].split()
            blocks.append(Block(words[0] if words else "", start, heading, "\n".join(body) + "\n"))
        index += 1
    return blocks


def signature_match(block: Block) -> re.Match[str] | None:
    """The :data:`SIGNATURE` match of a block that is a signature, not code (None for code)."""
    try:
        ast.parse(block.text)
    except SyntaxError:
        return SIGNATURE.fullmatch(block.text.strip())
    return None  # valid Python: an example to run


BLOCKS = read_blocks()
PYTHON = [block for block in BLOCKS if block.language == "python"]
SIGNATURES = [block for block in PYTHON if signature_match(block)]
EXAMPLES = [block for block in PYTHON if not signature_match(block)]


# ------------------------------------------------------------------------------------------- python blocks


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse every socket connection, so that a block needing the network fails instead of passing here."""

    def refuse(self: socket.socket, address: Any) -> None:
        raise OSError(f"README blocks must run without network (connection to {address!r} refused by the test)")

    def no_lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        raise OSError(f"README blocks must run without network (lookup of {host!r} refused by the test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)


def make_quick_start_run(request: pytest.FixtureRequest) -> None:
    """Train ``runs/quick`` (in the working directory) with the README's quick-start command, shortened."""
    from grasp.cli import main

    quick = [c for c in CLI_COMMANDS if c.argv[:1] == ("train",) and "runs/quick" in c.argv]
    assert quick, "no `grasp train ... --out runs/quick` (the quick start) found in README.md's bash blocks"
    request.getfixturevalue("hash_encoder")  # tests/conftest.py: a fast stand-in for MiniLM
    assert main([*quick[0].argv, *QUICK_START_SHORTER]) == 0


def readme_failure(error: BaseException) -> str:
    """``README.md:<line>: <error>``, the README line, then the whole traceback (grasp's frames included)."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == str(README)]
    where = f"README.md:{frames[-1].lineno}: {frames[-1].line}\n" if frames else ""
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return f"{where}{type(error).__name__}: {error}\n\n{trace}"


@pytest.mark.parametrize("block", EXAMPLES, ids=lambda block: block.id)
def test_python_example_runs(
    block: Block,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_network: None,
    request: pytest.FixtureRequest,
) -> None:
    """The block runs as written (see the module docs for its markers) and prints something."""
    if block.first_line.startswith(NEEDS):
        pytest.skip(f"README.md:{block.line}: {block.first_line[1:].strip()}")
    if '"cuda"' in block.text or "'cuda'" in block.text:
        # A block that shows a CUDA device must also run on a CPU-only machine.
        assert "torch.cuda.is_available()" in block.text, f"README.md:{block.line}: pick 'cuda' only when available"
    # Files the block writes go under tmp_path: its working directory, and grasp's shared cache of LLM answers and
    # embeddings (a fresh one, so that the block really embeds instead of reading an earlier run's vectors).
    monkeypatch.setenv("GRASP_CACHE", str(tmp_path / "grasp-cache"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    if block.first_line.startswith(AFTER_QUICK_START):
        make_quick_start_run(request)
        capsys.readouterr()  # the training's output is not the block's
    # Blank lines in front put every statement at its README line, so a traceback names README.md:<line>.
    code = compile("\n" * (block.line - 1) + block.text, str(README), "exec")
    failure = None
    try:
        exec(code, {"__name__": "__readme__"})
    except Exception as error:  # any error of the example is the failure to report
        failure = readme_failure(error)
    if failure:  # failed outside the except clause, so that pytest does not print the error a second time
        pytest.fail(failure, pytrace=False)
    assert capsys.readouterr().out.strip(), f"README.md:{block.line}: the example prints nothing; show its result"


def documented_parameters(params: str) -> list[tuple[str, str, Any]]:
    """``(name, kind, default)`` of each parameter of a signature's parameter list (as Python source)."""
    function = ast.parse(f"def f({params}): pass").body[0]
    assert isinstance(function, ast.FunctionDef)
    args = function.args
    out: list[tuple[str, str, Any]] = []
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for number, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        kind = "POSITIONAL_ONLY" if number < len(args.posonlyargs) else "POSITIONAL_OR_KEYWORD"
        out.append((arg.arg, kind, inspect.Parameter.empty if default is None else ast.literal_eval(default)))
    if args.vararg:
        out.append((args.vararg.arg, "VAR_POSITIONAL", inspect.Parameter.empty))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        out.append((arg.arg, "KEYWORD_ONLY", inspect.Parameter.empty if default is None else ast.literal_eval(default)))
    if args.kwarg:
        out.append((args.kwarg.arg, "VAR_KEYWORD", inspect.Parameter.empty))
    return out


def resolve(name: str) -> Any:
    """The object a dotted name such as ``grasp.ops.score_topk`` names."""
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for part in parts[1:]:
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("block", SIGNATURES, ids=lambda block: block.id)
def test_signature_matches_the_function(block: Block) -> None:
    """A signature block names a real function and shows exactly its parameters and defaults."""
    match = signature_match(block)
    assert match is not None
    real = [(p.name, p.kind.name, p.default) for p in inspect.signature(resolve(match["name"])).parameters.values()]
    assert documented_parameters(match["params"]) == real, f"README.md:{block.line}: {match['name']}'s signature"


def test_markers_are_few_and_explained() -> None:
    """Few blocks are left unrun, each saying what it needs; every python block is an example or a signature."""
    needs = [block for block in EXAMPLES if block.first_line.startswith(NEEDS)]
    assert len(needs) <= MAX_NEEDS, f"{len(needs)} python blocks are not run (`# needs:`): make examples run"
    for block in needs:
        assert len(block.first_line[len(NEEDS) :].split()) >= 2, f"README.md:{block.line}: say what it needs"
    assert EXAMPLES and len(EXAMPLES) + len(SIGNATURES) == len(PYTHON)


# ----------------------------------------------------------------------------------------------- bash blocks


@dataclass(frozen=True)
class Command:
    """A ``grasp`` command line of a bash block: its README line and the arguments after ``grasp``."""

    line: int
    argv: tuple[str, ...]
    bound: str  # the loop values substituted, for the test id ("" when none)

    @property
    def id(self) -> str:
        """``README.md:<line>-grasp_<subcommand>[-<var>=<value>]``, for test ids."""
        subcommand = self.argv[0] if self.argv else ""
        return f"README.md:{self.line}-grasp_{subcommand}" + (f"-{self.bound}" if self.bound else "")


def shell_segments(text: str, line: int) -> list[list[str]]:
    """The simple commands of one shell line: words split like the shell does, comments dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segments: list[list[str]] = [[]]
    try:
        for token in lexer:
            if token in SHELL_OPERATORS:
                segments.append([])
            elif segments[-1] or token not in SHELL_KEYWORDS:
                segments[-1].append(token)
    except ValueError as error:  # an unclosed quote: say where, rather than failing the collection anonymously
        raise ValueError(f"README.md:{line}: {error}") from error
    return [segment for segment in segments if segment]


def reference(name: str) -> str:
    """A regex of a shell reference to variable ``name``: ``$name`` or ``${name}``."""
    return rf"\$(?:{name}\b|\{{{name}\}})"


def grasp_commands(block: Block) -> list[Command]:
    """Every ``grasp ...`` command of a bash block, with the block's variables and loop values substituted."""
    # Logical lines: a trailing backslash continues a line.
    logical: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in enumerate(block.text.splitlines(), start=block.line):
        start, text = pending if pending else (number, "")
        text += line
        pending = (start, text[:-1] + " ") if line.endswith("\\") else None
        if pending is None:
            logical.append((start, text))
    # Variables: `NAME=value` assignments, and `for NAME in values` (every value is tried).
    variables: dict[str, list[str]] = {}
    for number, text in logical:
        for words in shell_segments(text, number):
            words = words[1:] if words[0] == "export" else words
            if len(words) == 1 and re.match(r"^[A-Za-z_]\w*=", words[0]):
                name, value = words[0].split("=", 1)
                variables[name] = [value]
            elif len(words) >= 3 and words[0] == "for" and words[2] == "in":
                variables[words[1]] = words[3:]
    commands = []
    for number, text in logical:
        used = [name for name in variables if re.search(reference(name), text)]
        for values in itertools.product(*(variables[name] for name in used)):
            bindings = dict(zip(used, values, strict=True))
            expanded = text
            for name, value in bindings.items():
                expanded = re.sub(reference(name), lambda _, value=value: value, expanded)
            bound = "-".join(f"{name}={value}" for name, value in bindings.items() if len(variables[name]) > 1)
            for words in shell_segments(expanded, number):
                if words[0] == "grasp":
                    commands.append(Command(number, tuple(words[1:]), bound))
    return commands


CLI_COMMANDS = [command for block in BLOCKS if block.language in ("bash", "sh") for command in grasp_commands(block)]


def test_shell_extraction() -> None:
    """Continued lines, variables, loops, chains and comments are read like the shell reads them."""
    text = (
        'A="--epochs 3"   # options\n'
        "pip install x && grasp prepare --out r --domain 'office product' \\\n    --k-core 5 | tee log\n"
        "for m in id grasp; do grasp train $A --model $m; done\n"
    )
    commands = grasp_commands(Block("bash", 10, "test", text))
    assert [(c.line, c.argv, c.bound) for c in commands] == [
        (11, ("prepare", "--out", "r", "--domain", "office product", "--k-core", "5"), ""),
        (13, ("train", "--epochs", "3", "--model", "id"), "m=id"),
        (13, ("train", "--epochs", "3", "--model", "grasp"), "m=grasp"),
    ]


def test_readme_has_cli_commands() -> None:
    """The bash blocks' commands were found (guards the extraction itself against silently finding none)."""
    subcommands = {command.argv[0] for command in CLI_COMMANDS if command.argv}
    assert {"train", "retrieve", "report", "recommend", "generate", "embed"} <= subcommands, subcommands


@pytest.mark.parametrize("command", CLI_COMMANDS, ids=lambda command: command.id)
def test_cli_command_is_accepted(command: Command) -> None:
    """``grasp.cli.build_parser()`` accepts the command line (parsed only, nothing runs)."""
    from grasp.cli import build_parser

    errors = io.StringIO()
    code: str | int | None = 0
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(list(command.argv))
    except SystemExit as exit:  # argparse exits on a bad command line (and after --help, with code 0)
        code = exit.code
    if code:
        line = " ".join(shlex.quote(word) for word in command.argv)
        reason = (errors.getvalue().strip().splitlines() or ["(no message)"])[-1]  # argparse's "error: ..." line
        pytest.fail(f"README.md:{command.line}: the CLI refuses `grasp {line}`: {reason}", pytrace=False)
